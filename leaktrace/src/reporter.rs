//! Each interval: read the maps and /proc, follow each call site's growth,
//! weigh the verdict, and print the report.

use std::{
    collections::HashSet,
    io::{self, Write as _},
    time::Instant,
};

use aya::Ebpf;
use leaktrace_common::{StackEnd, NO_STACK};

use crate::{
    collector::{collect_threads, user_stack, Collector, StackUsage, ThreadSite},
    growth::{History, Trend},
    memory::{MemoryPicture, MemoryReader},
    report::{
        frame_label, MemoryReport, ProbedObject, Report, StackReport, ThreadSiteReport,
        ThreadsReport,
    },
    symbolizer::{Frame, SharedModules, Symbolizer},
    verdict::{self, GrowingSite, RetentionEvidence, ThreadSiteEvidence},
};

/// Byte changes below this are noise for a call site.
const STACK_TOLERANCE: f64 = 256.0;
/// Heap RSS changes below this are noise.
const HEAP_TOLERANCE: f64 = (1 << 20) as f64;
/// Live-byte changes below this are noise when judging retention.
const LIVE_TOLERANCE: f64 = (256 << 10) as f64;
/// Used for threads whose stack came from glibc's cache (no mmap seen).
const DEFAULT_THREAD_STACK: u64 = 8 << 20;

/// What the reports need to know of the session.
pub struct ReportOptions {
    pub pid: u32,
    pub top: usize,
    pub older_ms: u64,
    pub json: bool,
    /// What was probed where, for every report.
    pub probed: Vec<ProbedObject>,
    /// Extra directories for separate debug info.
    pub debug_dirs: Vec<std::path::PathBuf>,
    /// Copies of the target's binaries.
    pub sysroot: Option<std::path::PathBuf>,
    /// Whether the target runs its own program yet (a `-c` child may still
    /// be exec'ing): the memory baseline is read now, or at the first report.
    pub baseline_now: bool,
    /// The target's executable mappings, kept current by the unwinder.
    pub followed: SharedModules,
}

pub struct Reporter {
    ebpf: Ebpf,
    collector: Collector,
    symbolizer: Symbolizer,
    options: ReportOptions,
    started: Instant,
    stacks: History<u32>,
    thread_sites: History<u32>,
    heap_rss: History<()>,
    live_bytes: History<()>,
    baseline: Option<MemoryPicture>,
    /// Reads the target's memory picture at each report.
    memory: MemoryReader,
    default_stack: u64,
    reports: usize,
}

impl Reporter {
    pub fn new(ebpf: Ebpf, collector: Collector, options: ReportOptions) -> Self {
        let pid = options.pid;
        let mut memory = MemoryReader::new(pid);
        // The picture at attach, for "since attach"; also the reader's first
        // walk of smaps.
        let baseline = if options.baseline_now { memory.read().ok() } else { None };
        Self {
            ebpf,
            collector,
            symbolizer: Symbolizer::new(
                pid,
                &options.debug_dirs,
                options.sysroot.clone(),
                options.followed.clone(),
            ),
            baseline,
            memory,
            default_stack: default_thread_stack(pid),
            options,
            started: Instant::now(),
            stacks: History::new(STACK_TOLERANCE),
            thread_sites: History::new(0.5),
            heap_rss: History::new(HEAP_TOLERANCE),
            live_bytes: History::new(LIVE_TOLERANCE),
            reports: 0,
        }
    }

    /// `--program-stats`: each program that ran, with its runs and mean
    /// time, on stderr; the last line says how many.
    pub fn print_program_stats(&self) {
        let mut ran = 0;
        for (name, program) in self.ebpf.programs() {
            let Ok(info) = program.info() else {
                continue;
            };
            let runs = info.run_count();
            if runs == 0 {
                continue;
            }
            ran += 1;
            let mean = info.run_time().as_nanos() / u128::from(runs);
            eprintln!("leaktrace: program {name}: {runs} runs, {mean} ns mean");
        }
        eprintln!("leaktrace: program stats: {ran} programs ran");
    }

    pub fn report(&mut self, is_final: bool, exited: bool) -> anyhow::Result<()> {
        let alive = !exited;
        let t = self.started.elapsed().as_secs_f64();
        self.reports += 1;
        self.symbolizer.refresh_modules();
        let mapped = if alive { mapped_ranges(self.options.pid) } else { None };
        let snapshot = self.collector.collect(&self.ebpf, mapped.as_deref())?;
        self.stacks.record(t, snapshot.stacks.iter().map(|s| (s.stack_id, s.bytes as f64)));
        self.live_bytes.record(t, [((), snapshot.total_bytes() as f64)]);

        // The growing sites, fastest first, for the verdict and the report.
        let mut growing: Vec<(StackUsage, f64)> = snapshot
            .stacks
            .iter()
            .filter_map(|usage| {
                let growth = self.stacks.growth(usage.stack_id)?;
                (growth.trend == Trend::Growing).then_some((*usage, growth.bytes_per_second))
            })
            .collect();
        growing.sort_by(|a, b| b.1.total_cmp(&a.1));

        // The top stacks by bytes, and the fastest growing ones even if small.
        let mut shown: Vec<StackUsage> =
            snapshot.stacks.iter().take(self.options.top).copied().collect();
        let shown_ids: HashSet<u32> = shown.iter().map(|s| s.stack_id).collect();
        shown.extend(
            growing
                .iter()
                .take(self.options.top)
                .map(|(usage, _)| *usage)
                .filter(|usage| !shown_ids.contains(&usage.stack_id)),
        );
        shown.sort_by_key(|stack| std::cmp::Reverse(stack.bytes));
        let stacks: Vec<StackReport> = shown
            .iter()
            .map(|usage| StackReport {
                bytes: usage.bytes,
                allocations: usage.allocations,
                frames: self.frames(usage.stack_id, alive),
                stack_end: self.stack_end(usage.stack_id),
                growth: self.stacks.growth(usage.stack_id),
            })
            .collect();
        let growing_sites: Vec<GrowingSite> = growing
            .iter()
            .map(|(usage, rate)| GrowingSite {
                label: frame_label(&self.frames(usage.stack_id, alive)),
                bytes_per_second: *rate,
            })
            .collect();

        let threads = self.threads(t, alive)?;
        let thread_evidence: Vec<ThreadSiteEvidence> = threads
            .sites
            .iter()
            .map(|site| ThreadSiteEvidence {
                label: frame_label(&site.frames),
                alive: site.counts.alive,
                exited_unjoined: site.counts.exited_unjoined,
                piling_up: site.trend == Trend::Growing,
                stack_bytes: site.counts.stack_bytes,
            })
            .collect();

        let memory = if alive { self.memory.read().ok() } else { None };
        let retention = memory.as_ref().map(|picture| {
            self.heap_rss.record(t, [((), picture.heap.rss as f64)]);
            RetentionEvidence {
                live_bytes: snapshot.total_bytes(),
                heap_rss: picture.heap.rss,
                heap_rss_trend: trend(&self.heap_rss),
                live_trend: trend(&self.live_bytes),
            }
        });
        let verdict = verdict::decide(
            &growing_sites,
            &thread_evidence,
            retention.as_ref(),
            snapshot.total_bytes(),
            self.reports,
        );

        let mut report = Report::new(
            &snapshot,
            stacks,
            self.options.pid,
            self.options.older_ms,
            is_final,
            exited,
        );
        report.threads = Some(threads);
        report.memory = memory.map(|picture| {
            let baseline = self.baseline.get_or_insert_with(|| picture.clone());
            MemoryReport { since_attach: picture.since(baseline), picture }
        });
        report.verdict = Some(verdict);
        report.probed = self.options.probed.clone();
        report.sample_rate = self.collector.sample_rate;
        let mut out = io::stdout().lock();
        if self.options.json {
            report.write_json(&mut out)?;
        } else {
            report.write_text(&mut out)?;
        }
        out.flush()?;
        Ok(())
    }

    /// The threads section: per creating site, with its trend.
    fn threads(&mut self, t: f64, alive: bool) -> anyhow::Result<ThreadsReport> {
        let sites: Vec<ThreadSite> = collect_threads(&self.ebpf, self.default_stack)?;
        self.thread_sites.record(
            t,
            sites.iter().map(|site| (site.site, (site.alive + site.exited_unjoined) as f64)),
        );
        let live = procfs::process::Process::new(self.options.pid as i32)
            .and_then(|process| process.tasks())
            .map(|tasks| tasks.count() as u64)
            .unwrap_or(0);
        let sites = sites
            .iter()
            .map(|site| {
                let trend = self.thread_sites.growth(site.site).map_or(Trend::Flat, |g| g.trend);
                ThreadSiteReport {
                    frames: self.frames(site.site, alive),
                    stack_end: self.stack_end(site.site),
                    counts: *site,
                    trend,
                }
            })
            .collect();
        Ok(ThreadsReport { live, sites })
    }

    fn frames(&mut self, stack_id: u32, alive: bool) -> Vec<Frame> {
        if stack_id == NO_STACK {
            return Vec::new();
        }
        let ips = user_stack(&self.ebpf, stack_id).map(|(ips, _)| ips).unwrap_or_default();
        self.symbolizer.frames(stack_id, &ips, alive)
    }

    fn stack_end(&self, stack_id: u32) -> StackEnd {
        match user_stack(&self.ebpf, stack_id) {
            Ok((_, end)) => end,
            Err(_) => StackEnd::Unavailable,
        }
    }
}

fn trend(history: &History<()>) -> Trend {
    history.growth(()).map_or(Trend::New, |growth| growth.trend)
}

/// The default pthread stack size of the target: its RLIMIT_STACK, as glibc
/// uses it.
fn default_thread_stack(pid: u32) -> u64 {
    use procfs::process::LimitValue;
    procfs::process::Process::new(pid as i32)
        .and_then(|process| process.limits())
        .ok()
        .and_then(|limits| match limits.max_stack_size.soft_limit {
            LimitValue::Value(bytes) => Some(bytes),
            LimitValue::Unlimited => None,
        })
        .unwrap_or(DEFAULT_THREAD_STACK)
}

/// The target's mapped address ranges, sorted; `None` if it is gone.
fn mapped_ranges(pid: u32) -> Option<Vec<(u64, u64)>> {
    let maps = procfs::process::Process::new(pid as i32).ok()?.maps().ok()?;
    Some(maps.into_iter().map(|map| map.address).collect())
}
