//! Kernel allocations outstanding, per stack: their growth, the processes
//! that made them, the frames (kernel, then the user stack that entered the
//! kernel with `-p --kernel`), and the kernel-leak finding.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use aya::Ebpf;
use leaktrace_common::{KernelKind, Lost, StackEnd, NO_STACK};
use leaktrace_report::{
    site_label, FdReport, Finding, Frame, KernelSummary, ProcessShare, StackReport, Trend,
    KERNEL_LEAK_MIN_SHARE,
};

use super::growth::History;
use crate::{
    collect::{
        kernel::{cache_name, collect_kernel, kernel_counts, kernel_stack, KernelUsage},
        user_stack,
    },
    proc::system::{fd_count, slab_reclaimable, Comms},
    symbolize::{kernel::KernelSymbolizer, Symbolizer},
};

/// Byte changes below a page are noise for a kernel stack: a machine at
/// rest still allocates and frees a little at every one.
const KERNEL_TOLERANCE: f64 = 4096.0;
/// Slower growth than this is not called a kernel leak.
const MIN_LEAK_RATE: f64 = 1024.0;
/// A kernel stack holding fewer objects is not called a leak: a pool that
/// grows by a few (kthreadd starting three kworkers, 17 KiB of task_struct
/// on a machine at rest, seen in CI) is not one. A leak passes it soon.
const MIN_LEAK_OBJECTS: u64 = 16;
/// Kernel functions that fill the page cache: a page allocated under one
/// of them is reclaimable.
const PAGE_CACHE_FUNCTIONS: [&str; 6] = [
    "__filemap_get_folio",
    "filemap_alloc_folio_noprof",
    "page_cache_ra_unbounded",
    "page_cache_ra_order",
    "filemap_add_folio",
    "grow_dev_folio",
];

/// Processes named per stack.
const TOP_PROCESSES: usize = 3;

/// The share of `allocated_per_second` that `kept_per_second` is, at most 1.
fn kept_share(kept_per_second: f64, allocated_per_second: f64) -> f64 {
    (kept_per_second / allocated_per_second).min(1.0)
}

/// Frames of the tracing machinery and the allocators, skipped when naming
/// the kernel function that asked for memory.
const ALLOCATOR_PREFIXES: &[&str] = &[
    "perf_",
    "trace_",
    "__traceiter",
    "bpf_",
    "kmem_cache_alloc",
    "__kmem_cache",
    "kmalloc",
    "__kmalloc",
    "kzalloc",
    "kvmalloc",
    "__kvmalloc",
    "krealloc",
    "slab_",
    "___slab",
    "__slab",
    "new_slab",
    "allocate_slab",
    "alloc_slab",
    "alloc_pages",
    "__alloc_pages",
    "alloc_frozen",
    "__alloc_frozen",
    "get_page_from_freelist",
    "folio_alloc",
    "__folio_alloc",
    "pcpu_",
    "__pcpu",
    "pcpu",
    "__alloc_percpu",
    "memcg_",
    "__memcg",
    "obj_cgroup",
];

/// Frames at the system-call boundary: the call a user made.
const SYSCALL_PREFIXES: &[&str] = &["__x64_sys_", "__ia32_sys_", "__do_sys_", "__se_sys_"];

pub struct KernelAnalyzer {
    symbols: KernelSymbolizer,
    history: History<(i32, u32, u32)>,
    /// Allocations per kernel stack since attach.
    counts: History<i32>,
    comms: Comms,
    older_ns: u64,
    sample_rate: u64,
    top: usize,
    missing_events: Vec<String>,
    /// Per page stack: whether its pages back objects counted elsewhere.
    slab_pages: HashMap<i32, bool>,
}

/// Frames of the slab allocator taking pages for a cache, or of a kmalloc
/// too large for the caches.
const SLAB_PAGE_MARKS: &[&str] = &["allocate_slab", "new_slab", "slab_alloc", "kmalloc_large"];

/// One report's kernel side.
pub struct KernelPart {
    pub stacks: Vec<StackReport>,
    pub summary: KernelSummary,
    /// A kernel leak, or nothing.
    pub finding: Option<Finding>,
    /// Outstanding kernel bytes per process.
    pub per_process: Vec<(u32, u64)>,
}

impl KernelAnalyzer {
    pub fn new(
        kallsyms: PathBuf,
        older_ms: u64,
        sample_rate: u64,
        top: usize,
        missing_events: Vec<String>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            symbols: KernelSymbolizer::new(kallsyms)?,
            history: History::new(KERNEL_TOLERANCE),
            counts: History::new(0.0),
            comms: Comms::default(),
            older_ns: older_ms * 1_000_000,
            sample_rate,
            top,
            missing_events,
            slab_pages: HashMap::new(),
        })
    }

    /// The share of what `usage`'s kernel stack allocates that its growth
    /// of `bytes_per_second` keeps, once the stack's allocations have a rate.
    fn kept_share(&self, usage: &KernelUsage, bytes_per_second: f64) -> Option<f64> {
        let allocated = self.counts.growth(usage.kernel_stack)?.bytes_per_second;
        if usage.allocations == 0 || allocated <= 0.0 {
            return None;
        }
        let object = usage.bytes as f64 / usage.allocations as f64;
        Some(kept_share(bytes_per_second / object, allocated))
    }

    pub fn comms(&mut self) -> &mut Comms {
        &mut self.comms
    }

    /// The kernel side of the report at `t` seconds. `user` symbolizes the
    /// user stacks (`-p --kernel`), `alive` says whether the target is.
    pub fn analyze(
        &mut self,
        ebpf: &Ebpf,
        t: f64,
        mut user: Option<&mut Symbolizer>,
        alive: bool,
    ) -> anyhow::Result<KernelPart> {
        let mut usages = collect_kernel(ebpf, self.older_ns, self.sample_rate)?;
        // Pages that back slab objects, or a kmalloc past the caches, are
        // counted already, as those objects.
        usages.retain(|usage| {
            usage.kind != KernelKind::Page || !self.counted_elsewhere(ebpf, usage.kernel_stack)
        });
        self.history.record(t, usages.iter().map(|usage| (usage.key(), usage.bytes as f64)));
        let counts = kernel_counts(ebpf, self.sample_rate)?;
        self.counts.record(t, counts.into_iter().map(|(stack, count)| (stack, count as f64)));
        let mut growing: Vec<(&KernelUsage, f64)> = usages
            .iter()
            .filter_map(|usage| {
                let growth = self.history.growth(usage.key())?;
                (growth.trend == Trend::Growing
                    && growth.bytes_per_second >= MIN_LEAK_RATE
                    && usage.allocations >= MIN_LEAK_OBJECTS)
                    .then_some((usage, growth.bytes_per_second))
            })
            .collect();
        growing.sort_by(|a, b| b.1.total_cmp(&a.1));

        let mut shown: Vec<&KernelUsage> = usages.iter().take(self.top).collect();
        let shown_keys: HashSet<(i32, u32, u32)> = shown.iter().map(|usage| usage.key()).collect();
        shown.extend(
            growing
                .iter()
                .take(self.top)
                .map(|(usage, _)| *usage)
                .filter(|usage| !shown_keys.contains(&usage.key())),
        );
        shown.sort_by_key(|usage| std::cmp::Reverse(usage.bytes));
        let mut stacks = Vec::with_capacity(shown.len());
        for usage in shown {
            stacks.push(self.stack_report(ebpf, usage, user.as_deref_mut(), alive));
        }

        // The fastest growing stack that is not a reclaimable cache, one
        // that keeps a real share of what it allocates first.
        let mut leaking = Vec::new();
        for &(usage, rate) in &growing {
            let cache = cache_name(ebpf, usage.kernel_stack);
            if cache.as_deref().is_some_and(slab_reclaimable) || self.page_cache(ebpf, usage) {
                continue;
            }
            leaking.push((usage, rate, cache, self.kept_share(usage, rate)));
        }
        let is_leak = |share: &Option<f64>| share.is_some_and(|s| s >= KERNEL_LEAK_MIN_SHARE);
        leaking.sort_by_key(|(.., share)| !is_leak(share));
        let leaks = leaking.iter().filter(|(.., share)| is_leak(share)).count();
        let finding = match leaking.first() {
            Some((usage, rate, cache, kept_share)) => {
                let report = self.stack_report(ebpf, usage, user, alive);
                let (kernel_frames, user_frames): (Vec<Frame>, Vec<Frame>) =
                    report.frames.iter().cloned().partition(is_kernel_frame);
                let top = report.processes.first();
                Some(Finding::KernelLeak {
                    stacks: if leaks > 0 { leaks } else { leaking.len() },
                    bytes_per_second: *rate,
                    kind: usage.kind,
                    cache: cache.clone(),
                    site: kernel_site(&kernel_frames),
                    user_site: (!user_frames.is_empty()).then(|| site_label(&user_frames)),
                    pid: top.map(|process| process.pid),
                    comm: top.map(|process| process.comm.clone()),
                    kept_share: *kept_share,
                })
            }
            None => None,
        };

        let mut per_process: HashMap<u32, u64> = HashMap::new();
        for usage in &usages {
            for (&pid, &bytes) in &usage.processes {
                *per_process.entry(pid).or_default() += bytes;
            }
        }
        let summary = KernelSummary {
            bytes: usages.iter().map(|usage| usage.bytes).sum(),
            allocations: usages.iter().map(|usage| usage.allocations).sum(),
            stack_count: usages.len(),
            symbols: if self.symbols.named {
                "kallsyms".to_string()
            } else {
                "hidden by kernel.kptr_restrict: kernel frames are addresses".to_string()
            },
            missing_events: self.missing_events.clone(),
        };
        Ok(KernelPart { stacks, summary, finding, per_process: per_process.into_iter().collect() })
    }

    /// Whether the pages of kernel stack `id` hold objects a kmalloc or
    /// slab event counts: the slab allocator growing a cache, or a large
    /// kmalloc served by the page allocator.
    fn counted_elsewhere(&mut self, ebpf: &Ebpf, id: i32) -> bool {
        if let Some(&known) = self.slab_pages.get(&id) {
            return known;
        }
        let ips = kernel_stack(ebpf, id).unwrap_or_default();
        let counted = self.symbols.frames(&ips).iter().any(|frame| {
            frame
                .symbol
                .as_deref()
                .is_some_and(|name| SLAB_PAGE_MARKS.iter().any(|mark| name.contains(mark)))
        });
        self.slab_pages.insert(id, counted);
        counted
    }

    /// Whether `usage` is pages of the page cache (a file or a directory
    /// read, a block device's buffers): reclaimable, as the reclaimable
    /// slabs are, never a leak (`ls -R` on a cold cache grew 550 KiB/s
    /// of them, a false kernel leak).
    fn page_cache(&mut self, ebpf: &Ebpf, usage: &KernelUsage) -> bool {
        if usage.kind != KernelKind::Page {
            return false;
        }
        let ips = kernel_stack(ebpf, usage.kernel_stack).unwrap_or_default();
        self.symbols.frames(&ips).iter().any(|frame| {
            frame.symbol.as_deref().is_some_and(|symbol| PAGE_CACHE_FUNCTIONS.contains(&symbol))
        })
    }

    fn stack_report(
        &mut self,
        ebpf: &Ebpf,
        usage: &KernelUsage,
        user: Option<&mut Symbolizer>,
        alive: bool,
    ) -> StackReport {
        let ips = kernel_stack(ebpf, usage.kernel_stack).unwrap_or_default();
        let mut frames: Vec<Frame> = self
            .symbols
            .frames(&ips)
            .into_iter()
            .skip_while(|frame| frame.symbol.as_deref().is_some_and(is_tracing_frame))
            .collect();
        let mut stack_end = StackEnd::Complete;
        if let Some(symbolizer) = user {
            if usage.user_stack != NO_STACK {
                if let Ok((ips, end)) = user_stack(ebpf, usage.user_stack) {
                    frames.extend(symbolizer.frames(usage.user_stack, &ips, alive));
                    stack_end = end;
                }
            } else {
                stack_end = StackEnd::Unavailable;
            }
        }
        let mut processes: Vec<(u32, u64)> =
            usage.processes.iter().map(|(&pid, &bytes)| (pid, bytes)).collect();
        processes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let processes = processes
            .into_iter()
            .take(TOP_PROCESSES)
            .map(|(pid, bytes)| ProcessShare { pid, comm: self.comms.get(pid), bytes })
            .collect();
        StackReport {
            bytes: usage.bytes,
            allocations: usage.allocations,
            frames,
            stack_end,
            growth: self.history.growth(usage.key()),
            kind: Some(usage.kind),
            cache: cache_name(ebpf, usage.kernel_stack),
            processes,
            allocs: Vec::new(),
            delta: None,
            api: None,
            replacing: None,
        }
    }
}

/// A target's open fds over time (`--kernel`).
pub struct FdCount {
    pid: u32,
    start: u64,
    history: History<()>,
}

impl FdCount {
    pub fn new(pid: u32) -> Option<Self> {
        let start = fd_count(pid).ok()?;
        Some(Self { pid, start, history: History::new(0.5) })
    }

    /// The count at `t` seconds, with its change since attach and trend.
    pub fn read(&mut self, t: f64, alive: bool) -> Option<FdReport> {
        if !alive {
            return None;
        }
        let count = fd_count(self.pid).ok()?;
        self.history.record(t, [((), count as f64)]);
        let growth = self.history.growth(());
        Some(FdReport {
            count,
            delta: count as i64 - self.start as i64,
            trend: growth.map_or(Trend::New, |growth| growth.trend),
            per_second: growth.map_or(0.0, |growth| growth.bytes_per_second),
        })
    }
}

/// Lost events that leave the kernel books incomplete.
pub fn kernel_losses(lost: &[(Lost, u64)]) -> u64 {
    lost.iter()
        .filter(|(reason, _)| *reason == Lost::KernelAllocMapFull)
        .map(|(_, count)| count)
        .sum()
}

fn is_kernel_frame(frame: &Frame) -> bool {
    frame.module.as_deref() == Some(crate::symbolize::kernel::KERNEL_MODULE)
}

/// The tracing machinery's frames, above the function that allocated.
fn is_tracing_frame(name: &str) -> bool {
    ["perf_", "trace_", "__traceiter", "bpf_"].iter().any(|prefix| name.starts_with(prefix))
}

/// The kernel function that asked for memory, as a verdict names it: the
/// system call's, when the allocation came from one, else the first frame
/// outside the allocators.
pub fn kernel_site(frames: &[Frame]) -> String {
    let named = |frame: &&Frame| frame.symbol.is_some();
    if let Some(call) = frames.iter().filter(named).find(|frame| {
        let name = frame.symbol.as_deref().unwrap_or_default();
        SYSCALL_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
    }) {
        return call.name();
    }
    frames
        .iter()
        .find(|frame| {
            let name = frame.symbol.as_deref().unwrap_or_default();
            !ALLOCATOR_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
        })
        .or(frames.first())
        .map_or_else(|| "an unknown kernel stack".to_string(), Frame::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check the share a growth keeps: half for a leak beside as much churn
    /// (leak_socketpair and churn_fds), all of a pure leak, under 2% for a
    /// storm's late frees (90 objects a second of 5,000).
    #[test]
    fn kept_shares() {
        assert_eq!(kept_share(100.0, 200.0), 0.5);
        assert_eq!(kept_share(60.0, 50.0), 1.0);
        assert!(kept_share(90.0, 5_000.0) < KERNEL_LEAK_MIN_SHARE);
    }

    fn frame(name: &str) -> Frame {
        Frame {
            address: 0xffff_ffff_8100_0000,
            symbol: Some(name.to_string()),
            offset: Some(0x10),
            file: None,
            line: None,
            module: Some("[kernel]".to_string()),
            inlined: false,
            mangled: None,
        }
    }

    /// Check that the system call names a kernel stack, and without one the
    /// first frame past the allocator.
    #[test]
    fn kernel_sites() {
        let frames: Vec<Frame> = [
            "kmem_cache_alloc_noprof",
            "alloc_empty_file",
            "anon_inode_getfile",
            "do_eventfd",
            "__x64_sys_eventfd2",
            "do_syscall_64",
        ]
        .into_iter()
        .map(frame)
        .collect();
        assert_eq!(kernel_site(&frames), "__x64_sys_eventfd2");
        let frames: Vec<Frame> = ["__kmalloc_cache_noprof", "alloc_pipe_info", "worker_thread"]
            .into_iter()
            .map(frame)
            .collect();
        assert_eq!(kernel_site(&frames), "alloc_pipe_info");
        assert_eq!(kernel_site(&[]), "an unknown kernel stack");
    }
}
