//! Each interval: read the maps and /proc, follow each call site's growth,
//! weigh the verdict, and put it all in a [`Report`] (the model). Rendering
//! it is `report`'s job.

pub mod diff;
pub mod growth;
pub mod kernel;
pub mod system;
pub mod verdict;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::Instant,
};

use aya::Ebpf;
use leaktrace_common::{glibc_chunk, size_class, Lost, StackEnd, NO_STACK, SIZE_CLASSES};
use leaktrace_report::{
    site_label, ExecEvent, Finding, Frame, HeapApi, MappingReport, MemoryReport, PreattachFrees,
    ProbedObject, RecordKind, ReplacementEvidence, Report, Sampling, StackReport, ThreadSiteReport,
    ThreadsBeforeAttach, ThreadsReport, Totals, Trend, Verdict, VerdictKind, SCHEMA,
};

use crate::{
    collect::{
        collect_threads, known_threads, user_stack, Collector, Snapshot, StackUsage, ThreadSite,
    },
    proc::{self, memory::MemoryReader, ExecMapping},
    symbolize::Symbolizer,
};
use growth::History;
use kernel::{kernel_losses, FdCount, KernelAnalyzer};
use verdict::{
    ExitEvidence, GrowingSite, LiveEvidence, Replacement, RetentionEvidence, ThreadSiteEvidence,
};

/// glibc's allocator of stdio buffers (`__GI__IO_file_doallocate` with
/// its debug info): what it holds at exit is libc's.
const STDIO_BUFFERS: &str = "_IO_file_doallocate";

/// Byte changes below this are noise for a call site.
const STACK_TOLERANCE: f64 = 256.0;
/// Heap RSS changes below this are noise.
const HEAP_TOLERANCE: f64 = (1 << 20) as f64;
/// Live-byte changes below this are noise when judging retention.
const LIVE_TOLERANCE: f64 = (256 << 10) as f64;
/// The total's rise since the last report that is more than noise: this,
/// or 2% of the total.
const RISE_TOLERANCE: f64 = 4096.0;
/// Outstanding allocations listed per stack with `-a`.
const SHOWN_ALLOCS: usize = 10;
/// Used for threads whose stack came from glibc's cache (no mmap seen).
const DEFAULT_THREAD_STACK: u64 = 8 << 20;

/// What the reports need to know of the session.
pub struct ReportOptions {
    pub pid: u32,
    pub top: usize,
    pub older_ms: u64,
    /// What was probed where, for every report.
    pub probed: Vec<ProbedObject>,
    /// Extra directories for separate debug info.
    pub debug_dirs: Vec<PathBuf>,
    /// Copies of the target's binaries.
    pub sysroot: Option<PathBuf>,
    /// Thread ids in /proc are the kernel's (leaktrace is not in a PID
    /// namespace of its own), so they compare with the programs'.
    pub global_tids: bool,
    /// The one allocator is glibc's, whose chunk headers give the bytes of
    /// frees of pre-attach memory.
    pub glibc_allocator: bool,
    /// Order stacks by allocations rather than bytes (`--sort count`).
    pub sort_by_count: bool,
    /// List each stack's outstanding allocations (`-a`).
    pub show_allocs: bool,
    /// Whether the target runs its own program yet (a `-c` child may still
    /// be exec'ing): the memory baseline is read now, or at the first report.
    pub baseline_now: bool,
    /// How the heap is sampled, under `-s N`.
    pub sampling: Option<Sampling>,
}

pub struct Analyzer {
    collector: Collector,
    symbolizer: Symbolizer,
    options: ReportOptions,
    started: Instant,
    stacks: History<u32>,
    /// Outstanding allocations per stack, to weigh against pre-attach frees.
    stack_allocations: History<u32>,
    /// Frees of pre-attach memory so far: count, and bytes.
    preattach_count: History<()>,
    preattach_bytes: History<()>,
    /// The same frees per size class, where chunk sizes are known.
    preattach_classes: History<u32>,
    thread_sites: History<u32>,
    heap_rss: History<()>,
    live_bytes: History<()>,
    baseline: Option<leaktrace_report::MemoryPicture>,
    /// Reads the target's memory picture at each report.
    memory: MemoryReader,
    default_stack: u64,
    reports: usize,
    glibc_allocator: bool,
    /// Read at attach: it stays once the target has exited.
    pid_in_namespace: Option<u32>,
    /// Threads alive or unjoined at the last report.
    threads_held: HashSet<u32>,
    /// The target's last exec since attach.
    exec: Option<ExecEvent>,
    /// Kernel allocations in the target's context (`--kernel`).
    kernel: Option<KernelAnalyzer>,
    /// Open fds (`--kernel`).
    fds: Option<FdCount>,
}

impl Analyzer {
    pub fn new(collector: Collector, options: ReportOptions) -> Self {
        let pid = options.pid;
        let glibc_allocator = options.glibc_allocator;
        let mut memory = MemoryReader::new(pid);
        // The picture at attach, for "since attach"; also the reader's first
        // walk of smaps.
        let baseline = if options.baseline_now { memory.read().ok() } else { None };
        Self {
            collector,
            symbolizer: Symbolizer::new(pid, &options.debug_dirs, options.sysroot.clone()),
            baseline,
            memory,
            default_stack: proc::stack_limit(pid).unwrap_or(DEFAULT_THREAD_STACK),
            options,
            started: Instant::now(),
            stacks: History::new(STACK_TOLERANCE),
            stack_allocations: History::new(0.5),
            preattach_count: History::new(0.5),
            preattach_bytes: History::new(STACK_TOLERANCE),
            preattach_classes: History::new(0.5),
            thread_sites: History::new(0.5),
            heap_rss: History::new(HEAP_TOLERANCE),
            live_bytes: History::new(LIVE_TOLERANCE),
            reports: 0,
            glibc_allocator,
            pid_in_namespace: proc::pid_in_namespace(pid),
            threads_held: HashSet::new(),
            exec: None,
            kernel: None,
            fds: None,
        }
    }

    /// Also report the kernel allocations made in the target's context,
    /// and its open fds.
    pub fn with_kernel(mut self, kernel: KernelAnalyzer) -> Self {
        self.fds = FdCount::new(self.options.pid);
        self.kernel = Some(kernel);
        self
    }

    /// The target exec'd `program`: the old image's history goes (its
    /// stacks, their growth, the memory baseline), and the reports say so.
    pub fn exec(&mut self, program: PathBuf) {
        self.stacks = History::new(STACK_TOLERANCE);
        self.stack_allocations = History::new(0.5);
        self.thread_sites = History::new(0.5);
        self.heap_rss = History::new(HEAP_TOLERANCE);
        self.live_bytes = History::new(LIVE_TOLERANCE);
        self.baseline = None;
        self.threads_held.clear();
        self.symbolizer.forget_stacks();
        self.exec = Some(ExecEvent {
            program: program.display().to_string(),
            after_seconds: self.started.elapsed().as_secs_f64(),
            count: self.exec.as_ref().map_or(1, |exec| exec.count + 1),
        });
    }

    /// The report of now. `mappings` are the target's executable mappings
    /// as last published (kept once it has exited).
    pub fn report(
        &mut self,
        ebpf: &Ebpf,
        mappings: &[ExecMapping],
        files: HashMap<(u64, u64), PathBuf>,
        is_final: bool,
        exited: bool,
    ) -> anyhow::Result<Report> {
        let alive = !exited;
        let pid = self.options.pid;
        let t = self.started.elapsed().as_secs_f64();
        self.reports += 1;
        self.symbolizer.set_mappings(mappings, files);
        let mapped =
            if alive { proc::maps(pid).ok().map(|maps| proc::ranges(&maps)) } else { None };
        let snapshot = self.collector.collect(ebpf, mapped.as_deref())?;
        self.stacks.record(t, snapshot.stacks.iter().map(|s| (s.stack_id, s.bytes as f64)));
        self.live_bytes.record(t, [((), snapshot.total_bytes() as f64)]);
        self.stack_allocations
            .record(t, snapshot.stacks.iter().map(|s| (s.stack_id, s.allocations as f64)));
        let (freed_count, freed_bytes) = snapshot.preattach_frees;
        self.preattach_count.record(t, [((), freed_count as f64)]);
        self.preattach_bytes.record(t, [((), freed_bytes as f64)]);
        self.preattach_classes.record(
            t,
            snapshot
                .preattach_classes
                .iter()
                .enumerate()
                .filter(|&(_, &count)| count > 0)
                .map(|(class, &count)| (class as u32, count as f64)),
        );
        let bytes_known = self.glibc_allocator;
        let rate = |history: &History<()>| history.growth(()).map_or(0.0, |g| g.bytes_per_second);
        // Under -c nothing ran before attach: a free of a block never seen
        // is the loader's (its own malloc, before libc's), or a double
        // free, never memory from before attach.
        let before_attach = self.options.baseline_now;
        let freed_before_attach = (before_attach
            && (freed_count > 0 || snapshot.allocator_frees > 0))
            .then(|| PreattachFrees {
                count: freed_count,
                bytes: bytes_known.then_some(freed_bytes),
                count_per_second: rate(&self.preattach_count).max(0.0),
                bytes_per_second: bytes_known.then(|| rate(&self.preattach_bytes).max(0.0)),
                allocator_frees: snapshot.allocator_frees,
            });

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

        let growing_sites: Vec<GrowingSite> = growing
            .iter()
            .map(|(usage, rate)| {
                let frames = self.frames(ebpf, usage.stack_id, alive);
                GrowingSite {
                    label: site_label(&frames),
                    bytes_per_second: *rate,
                    allocations_per_second: self
                        .stack_allocations
                        .growth(usage.stack_id)
                        .map_or(0.0, |g| g.bytes_per_second),
                    size_class: (bytes_known && usage.allocations > 0)
                        .then(|| size_class(glibc_chunk(usage.bytes / usage.allocations))),
                    functions: verdict::own_functions(&frames),
                }
            })
            .collect();
        let replacement =
            freed_before_attach.filter(|frees| frees.count > 0).map(|frees| Replacement {
                count_per_second: frees.count_per_second,
                bytes_per_second: frees.bytes_per_second,
                class_rates: bytes_known.then(|| {
                    (0..SIZE_CLASSES)
                        .map(|class| {
                            self.preattach_classes
                                .growth(class)
                                .map_or(0.0, |g| g.bytes_per_second.max(0.0))
                        })
                        .collect()
                }),
                free_paths: snapshot
                    .preattach_stacks
                    .iter()
                    .map(|&(stack, count)| {
                        (verdict::own_functions(&self.frames(ebpf, stack, alive)), count)
                    })
                    .collect(),
            });
        let replaced = verdict::replaced_sites(&growing_sites, replacement.as_ref());
        let replaced_stacks: HashMap<u32, ReplacementEvidence> = growing
            .iter()
            .zip(replaced)
            .filter_map(|((usage, _), evidence)| Some((usage.stack_id, evidence?)))
            .collect();
        let stacks = self.shown_stacks(ebpf, &snapshot, &growing, &replaced_stacks, alive);

        let (threads, persistent) = self.threads(ebpf, t, alive)?;
        let thread_evidence: Vec<ThreadSiteEvidence> = threads
            .sites
            .iter()
            .zip(&persistent)
            .map(|(site, &(alive, exited_unjoined))| ThreadSiteEvidence {
                label: site_label(&site.frames),
                alive,
                exited_unjoined,
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
        let total = snapshot.total_bytes();
        let live_growth = self.live_bytes.growth(());
        let tolerance = RISE_TOLERANCE.max(0.02 * total as f64);
        let live = LiveEvidence {
            bytes: total,
            trend: live_growth.map_or(Trend::New, |growth| growth.trend),
            bytes_per_second: live_growth.map_or(0.0, |growth| growth.bytes_per_second),
            rising: self.live_bytes.last_step(()).is_some_and(|step| step > tolerance),
            new_sites: snapshot
                .stacks
                .iter()
                .filter(|usage| usage.bytes as f64 > tolerance)
                .filter(|usage| {
                    self.stacks.growth(usage.stack_id).is_some_and(|g| g.trend == Trend::New)
                })
                .count(),
            lost: dropped(&snapshot.lost, snapshot.total_allocations()),
        };
        let exit = exited.then(|| self.held_at_exit(ebpf, &snapshot));
        let mut verdict = verdict::decide(
            &growing_sites,
            replacement.as_ref(),
            &thread_evidence,
            retention.as_ref(),
            &live,
            exit.as_ref(),
            self.reports,
        );
        let mut stacks = stacks;
        let mut kernel_summary = None;
        if let Some(kernel) = self.kernel.as_mut() {
            let part = kernel.analyze(ebpf, t, Some(&mut self.symbolizer), alive)?;
            stacks.extend(part.stacks);
            kernel_summary = Some(part.summary);
            let mut findings = verdict.findings;
            if let Some(finding) = part.finding {
                findings.retain(|finding| {
                    !matches!(finding, Finding::NoLeak { .. } | Finding::NoLeakYet { .. })
                });
                findings.insert(0, finding);
            }
            let dropped = kernel_losses(&snapshot.lost);
            if dropped > 0 && !findings.iter().any(|f| matches!(f, Finding::Incomplete { .. })) {
                findings.retain(|finding| !matches!(finding, Finding::NoLeak { .. }));
                findings.push(Finding::Incomplete { lost: dropped });
            }
            verdict = Verdict::new(findings);
        }
        // A sample that shows no leak is not the whole story.
        let rate = self.collector.sample_rate;
        if rate > 1 && !verdict.findings.iter().any(|finding| finding.kind() == VerdictKind::Leak) {
            let mut findings = verdict.findings;
            findings.push(Finding::Sampled { rate });
            verdict = Verdict::new(findings);
        }
        let fds = self.fds.as_mut().and_then(|fds| fds.read(t, alive));
        let memory = memory.map(|picture| {
            let baseline = self.baseline.get_or_insert_with(|| picture.clone());
            MemoryReport { since_attach: picture.since(baseline), picture }
        });
        Ok(Report {
            kind: RecordKind::Report,
            schema: SCHEMA,
            is_final,
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            pid,
            pid_in_namespace: self.pid_in_namespace,
            ended: None,
            exec: self.exec.clone(),
            exited,
            older_ms: self.options.older_ms,
            totals: Totals {
                bytes: snapshot.total_bytes(),
                allocations: snapshot.total_allocations(),
            },
            stack_count: snapshot.stacks.len(),
            stacks,
            lost: snapshot.lost.iter().copied().collect(),
            threads: Some(threads),
            memory,
            verdict: Some(verdict),
            freed_before_attach,
            probed: self.options.probed.clone(),
            mappings: self
                .symbolizer
                .modules()
                .iter()
                .map(|mapping| MappingReport {
                    path: proc::shown_path(&mapping.path).display().to_string(),
                    start: mapping.start,
                    end: mapping.end,
                    offset: mapping.offset,
                })
                .collect(),
            sample_rate: self.collector.sample_rate,
            sampling: self.options.sampling,
            system: None,
            kernel: kernel_summary,
            fds,
            push: None,
            diff: None,
        })
    }

    /// The top stacks by bytes, and the fastest growing ones even if small,
    /// most bytes first.
    fn shown_stacks(
        &mut self,
        ebpf: &Ebpf,
        snapshot: &Snapshot,
        growing: &[(StackUsage, f64)],
        replaced: &HashMap<u32, ReplacementEvidence>,
        alive: bool,
    ) -> Vec<StackReport> {
        let top = self.options.top;
        let mut ranked: Vec<StackUsage> = snapshot.stacks.clone();
        if self.options.sort_by_count {
            ranked.sort_by(|a, b| {
                b.allocations.cmp(&a.allocations).then(a.stack_id.cmp(&b.stack_id))
            });
        }
        let mut shown: Vec<StackUsage> = ranked.iter().take(top).copied().collect();
        let shown_ids: HashSet<u32> = shown.iter().map(|s| s.stack_id).collect();
        shown.extend(
            growing
                .iter()
                .take(top)
                .map(|(usage, _)| *usage)
                .filter(|usage| !shown_ids.contains(&usage.stack_id)),
        );
        if self.options.sort_by_count {
            shown.sort_by_key(|stack| std::cmp::Reverse(stack.allocations));
        } else {
            shown.sort_by_key(|stack| std::cmp::Reverse(stack.bytes));
        }
        let mut allocs = if self.options.show_allocs {
            let ids: HashSet<u32> = shown.iter().map(|usage| usage.stack_id).collect();
            self.collector.collect_allocs(ebpf, &ids, SHOWN_ALLOCS).unwrap_or_default()
        } else {
            HashMap::new()
        };
        shown
            .iter()
            .map(|usage| {
                let replacing = replaced.get(&usage.stack_id).cloned();
                let mut growth = self.stacks.growth(usage.stack_id);
                if let (Some(growth), true) = (&mut growth, replacing.is_some()) {
                    growth.trend = Trend::Replacing;
                }
                let frames = self.frames(ebpf, usage.stack_id, alive);
                StackReport {
                    bytes: usage.bytes,
                    allocations: usage.allocations,
                    stack_end: whole_at_loader_entry(stack_end(ebpf, usage.stack_id), &frames),
                    frames,
                    growth,
                    kind: None,
                    cache: None,
                    processes: Vec::new(),
                    allocs: allocs.remove(&usage.stack_id).unwrap_or_default(),
                    delta: None,
                    api: Some(if usage.mapped { HeapApi::Mmap } else { HeapApi::Malloc }),
                    replacing,
                }
            })
            .collect()
    }

    /// What the target held as it exited: every stack but those of glibc's
    /// stdio buffers (kept for the process's life; valgrind frees them
    /// through `__libc_freeres` before it counts) and of threads' TLS
    /// tables allocated in pthread_create.
    fn held_at_exit(&mut self, ebpf: &Ebpf, snapshot: &Snapshot) -> ExitEvidence {
        let mut exit = ExitEvidence { bytes: 0, blocks: 0, sites: 0, top: String::new() };
        for usage in &snapshot.stacks {
            let frames = self.frames(ebpf, usage.stack_id, false);
            let stdio =
                |frame: &Frame| frame.symbol.as_deref().is_some_and(|s| s.ends_with(STDIO_BUFFERS));
            // Threads' TLS tables, allocated in pthread_create and kept with
            // glibc's cached stacks: libc's too (valgrind does not flag them).
            let in_create = |frame: &Frame| {
                frame.symbol.as_deref().is_some_and(|s| s.contains("pthread_create"))
            };
            if frames.iter().any(stdio) || frames.iter().any(in_create) {
                continue;
            }
            if exit.sites == 0 {
                exit.top = site_label(&frames);
            }
            exit.bytes += usage.bytes;
            exit.blocks += usage.allocations;
            exit.sites += 1;
        }
        exit
    }

    /// The threads section: per creating site, with its trend.
    /// The threads section: per creating site, with its trend; and per site
    /// the threads (alive, exited and unjoined) held since the report
    /// before, the evidence of a thread leak. A pool's thread that lives
    /// for a moment and is joined never counts there, whatever instant a
    /// report catches it at.
    fn threads(
        &mut self,
        ebpf: &Ebpf,
        t: f64,
        alive: bool,
    ) -> anyhow::Result<(ThreadsReport, Vec<(u64, u64)>)> {
        let sites: Vec<ThreadSite> = collect_threads(ebpf, self.default_stack)?;
        let held_before = std::mem::take(&mut self.threads_held);
        let persistent: Vec<(u64, u64)> = sites
            .iter()
            .map(|site| {
                let count = |tids: &[u32]| {
                    tids.iter().filter(|tid| held_before.contains(tid)).count() as u64
                };
                (count(&site.alive), count(&site.unjoined))
            })
            .collect();
        self.threads_held = sites
            .iter()
            .flat_map(|site| site.alive.iter().chain(&site.unjoined))
            .copied()
            .collect();
        self.thread_sites.record(
            t,
            sites
                .iter()
                .zip(&persistent)
                .map(|(site, (alive, unjoined))| (site.site, (alive + unjoined) as f64)),
        );
        let pid = self.options.pid;
        let tasks = if alive { proc::task_ids(pid).unwrap_or_default() } else { Vec::new() };
        let live = tasks.len() as u64;
        let known = known_threads(ebpf)?;
        let maps = if alive { proc::maps(pid).unwrap_or_default() } else { Vec::new() };
        let mut before_attach = ThreadsBeforeAttach::default();
        // In a PID namespace of its own, /proc numbers threads there while the
        // programs use the kernel's numbers: the two cannot be matched.
        let unknown = tasks.iter().filter(|&&tid| tid != pid && !known.contains(&tid));
        for &tid in unknown.filter(|_| self.options.global_tids) {
            before_attach.alive += 1;
            before_attach.stack_bytes +=
                proc::thread_stack_size(pid, tid, &maps).unwrap_or(self.default_stack);
        }
        let sites = sites
            .iter()
            .map(|site| {
                let trend = self.thread_sites.growth(site.site).map_or(Trend::Flat, |g| g.trend);
                ThreadSiteReport {
                    frames: self.frames(ebpf, site.site, alive),
                    stack_end: stack_end(ebpf, site.site),
                    counts: site.counts,
                    trend,
                }
            })
            .collect();
        Ok((ThreadsReport { live, sites, before_attach }, persistent))
    }

    fn frames(&mut self, ebpf: &Ebpf, stack_id: u32, alive: bool) -> Vec<Frame> {
        if stack_id == NO_STACK {
            return Vec::new();
        }
        let ips = user_stack(ebpf, stack_id).map(|(ips, _)| ips).unwrap_or_default();
        self.symbolizer.frames(stack_id, &ips, alive)
    }
}

/// The lost events that make the verdict unreliable: any loss to a full map
/// (it goes on as long as the map stays full), and calls missed otherwise
/// (a longjmp past a return probe, ...) once they are more than 1% of the
/// allocations tracked. Stacks cut short or not kept lose no bytes.
fn dropped(lost: &[(Lost, u64)], allocations: u64) -> u64 {
    let count = |reasons: &[Lost]| -> u64 {
        lost.iter().filter(|(reason, _)| reasons.contains(reason)).map(|(_, n)| n).sum()
    };
    let full = count(&[
        Lost::AllocMapFull,
        Lost::MmapMapFull,
        Lost::StatsMapFull,
        Lost::PendingMapFull,
        Lost::ThreadMapFull,
    ]);
    let missed = count(&[Lost::ReturnWithoutEntry, Lost::MissedReturn, Lost::ReadFailed]);
    full + if missed * 100 > allocations { missed } else { 0 }
}

fn stack_end(ebpf: &Ebpf, stack_id: u32) -> StackEnd {
    match user_stack(ebpf, stack_id) {
        Ok((_, end)) => end,
        Err(_) => StackEnd::Unavailable,
    }
}

/// The dynamic loader's entry code that runs a program's initializers
/// (libstdc++'s pool is allocated there): the real outermost frame,
/// written in assembly without unwind information.
const LOADER_ENTRY: &str = "_dl_start_user";

/// A stack's end, where a walk that stopped for want of unwind
/// information at the loader's entry code is whole: nothing is above it.
fn whole_at_loader_entry(end: StackEnd, frames: &[Frame]) -> StackEnd {
    let outermost = frames.last().and_then(|frame| frame.symbol.as_deref());
    if end == StackEnd::NoInfo && outermost == Some(LOADER_ENTRY) {
        StackEnd::Complete
    } else {
        end
    }
}

fn trend(history: &History<()>) -> Trend {
    history.growth(()).map_or(Trend::New, |growth| growth.trend)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that a walk stopped at the loader's entry code is whole, and
    /// one stopped anywhere else is not.
    #[test]
    fn loader_entry_is_the_outermost_frame() {
        let frame = |symbol: &str| Frame {
            address: 0x7f00_0000_1000,
            symbol: Some(symbol.into()),
            offset: Some(4),
            file: None,
            line: None,
            module: Some("/lib64/ld-linux-x86-64.so.2".into()),
            inlined: false,
            mangled: None,
        };
        let cut = StackEnd::NoInfo;
        let at_entry = [frame("pool_init"), frame(LOADER_ENTRY)];
        assert_eq!(whole_at_loader_entry(cut, &at_entry), StackEnd::Complete);
        assert_eq!(whole_at_loader_entry(cut, &[frame("asm_helper")]), cut);
        assert_eq!(whole_at_loader_entry(StackEnd::Complete, &at_entry), StackEnd::Complete);
    }

    /// Check which losses make the verdict incomplete: a full map always, a
    /// few missed returns not, stacks not kept never.
    #[test]
    fn losses_that_count() {
        assert_eq!(dropped(&[(Lost::AllocMapFull, 3)], 1_000_000), 3);
        assert_eq!(dropped(&[(Lost::MissedReturn, 5)], 1000), 0);
        assert_eq!(dropped(&[(Lost::MissedReturn, 50)], 1000), 50);
        assert_eq!(dropped(&[(Lost::StackCollision, 50), (Lost::UnwindNoInfo, 9)], 10), 0);
    }
}
