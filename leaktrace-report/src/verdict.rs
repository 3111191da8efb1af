//! The verdict as data: what was found, with the numbers behind it. The
//! text renderer turns the findings into the sentence that ends a report.

use serde::{Deserialize, Serialize};

/// The kinds of verdict, as scripts read them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    /// Call sites still growing.
    Leak,
    /// Threads exited and never joined, or piling up alive.
    ThreadLeak,
    /// Heap RSS rising while live bytes are flat.
    Retention,
    /// Growth matched by frees of memory allocated before attach: a
    /// structure being replaced, not judged until the replacement ends.
    Replacing,
    /// Live memory grows, but no one call site steadily: not judged yet.
    Growth,
    /// Events were lost: what the verdict does not see may be a leak.
    Incomplete,
    NoLeak,
    /// Kernel memory still growing at a kernel call stack.
    KernelLeak,
    /// A process's own memory grows (the system mode): trace it with -p.
    ProcessGrowth,
    /// Kernel memory grows at a stack that frees nearly all it allocates
    /// (see [`KERNEL_LEAK_MIN_SHARE`]): frees running late, or a leak of a
    /// few of its objects; not judged yet.
    KernelGrowth,
    /// The heap was sampled (`-s N`) and no leak was seen: one too slow to
    /// show in the sample may still be there.
    Sampled,
    /// The target exited holding memory it never freed (valgrind's "in use
    /// at exit"): a fact, not a trend.
    InUseAtExit,
}

/// The share of what a kernel stack allocates that its growth must keep to
/// be called a leak. A leak keeps most of what its stack allocates (the
/// kernel_leak fixture's about half); sockets' and pipes' inodes are freed
/// after an RCU grace period, and under a storm of fds that backlog grew
/// for seconds at under 1% of the allocations (a false leak, seen once in
/// CI), and lsm_inode_cache's at 6% in a run of a busy day. Slower growth
/// is still said, as `kernel_growth`: it may be a leak of a few objects in
/// ten.
pub const KERNEL_LEAK_MIN_SHARE: f64 = 0.2;

/// Threads of one kind of thread leak, and the worst site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadFinding {
    /// Threads over every site that qualifies.
    pub threads: u64,
    /// "function (file:line)" of the worst site.
    pub site: String,
    /// Stack bytes the worst site holds.
    pub stack_bytes: u64,
}

/// One thing the verdict found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "finding", rename_all = "snake_case")]
pub enum Finding {
    /// Heap call sites still growing.
    Leak {
        sites: usize,
        bytes_per_second: f64,
        /// "function (file:line)" of the fastest.
        top: String,
    },
    /// Threads that exited but were never joined, or that pile up alive.
    ThreadLeak { unjoined: Option<ThreadFinding>, piling_up: Option<ThreadFinding> },
    /// The allocator keeps freed memory.
    Retention { live_bytes: u64, heap_rss: u64 },
    /// Call sites growing as fast as memory allocated before attach is
    /// freed: a structure filled before attach being replaced.
    Replacing {
        /// Growing call sites whose growth the replacement explains.
        sites: usize,
        /// Frees of memory allocated before attach, per second.
        count_per_second: f64,
        bytes_per_second: Option<f64>,
        /// The fastest such site and its evidence (absent while no site
        /// grows at that pace).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        top: Option<ReplacingSite>,
    },
    /// Live memory grows while no call site grows steadily.
    Growth { bytes_per_second: f64 },
    /// Events were lost (the maps full, returns missed): the books are
    /// incomplete, and so is the verdict.
    Incomplete { lost: u64 },
    /// Kernel memory growing at one kernel stack: the fastest.
    KernelLeak {
        /// Kernel stacks growing.
        stacks: usize,
        bytes_per_second: f64,
        kind: crate::KernelKind,
        cache: Option<String>,
        /// The kernel function that allocated (the system call's, when
        /// there is one).
        site: String,
        /// The user call site that entered the kernel (`-p --kernel`).
        user_site: Option<String>,
        /// The process that allocated most of it.
        pid: Option<u32>,
        comm: Option<String>,
        /// The share of what its kernel stack allocates that the growth
        /// keeps, when known. Under [`KERNEL_LEAK_MIN_SHARE`] the finding
        /// is `kernel_growth`, not `kernel_leak`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kept_share: Option<f64>,
    },
    /// Neither the kernel's allocations nor any process grows (the system
    /// mode).
    NoGrowth { kernel_outstanding: u64 },
    /// A process whose memory grows (the system mode).
    ProcessGrowth { pid: u32, comm: String, uss_per_second: f64 },
    /// Nothing grows, though too few reports to call a trend.
    NoLeakYet { outstanding: u64, reports_needed: usize },
    /// Nothing grows.
    NoLeak { outstanding: u64 },
    /// No heap leak was seen in a sample of one allocation in `rate`.
    Sampled { rate: u64 },
    /// The target has exited; what it held then was never freed.
    InUseAtExit {
        bytes: u64,
        blocks: u64,
        /// Call sites holding it.
        sites: usize,
        /// "function (file:line)" of the site holding the most.
        top: String,
    },
}

/// A call site taken for replacement, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplacingSite {
    /// "function (file:line)".
    pub label: String,
    pub evidence: crate::ReplacementEvidence,
}

impl Finding {
    pub fn kind(&self) -> VerdictKind {
        match self {
            Finding::Leak { .. } => VerdictKind::Leak,
            Finding::ThreadLeak { .. } => VerdictKind::ThreadLeak,
            Finding::Retention { .. } => VerdictKind::Retention,
            Finding::Replacing { .. } => VerdictKind::Replacing,
            Finding::Growth { .. } => VerdictKind::Growth,
            Finding::Incomplete { .. } => VerdictKind::Incomplete,
            Finding::NoLeakYet { .. } | Finding::NoLeak { .. } | Finding::NoGrowth { .. } => {
                VerdictKind::NoLeak
            }
            // A share not known yet (its stack's allocations have no rate
            // yet) is not judged either: seen as a false leak on a busy
            // machine, inode security blobs freed after a grace period.
            Finding::KernelLeak { kept_share, .. }
                if kept_share.is_none_or(|share| share < KERNEL_LEAK_MIN_SHARE) =>
            {
                VerdictKind::KernelGrowth
            }
            Finding::KernelLeak { .. } => VerdictKind::KernelLeak,
            Finding::ProcessGrowth { .. } => VerdictKind::ProcessGrowth,
            Finding::Sampled { .. } => VerdictKind::Sampled,
            Finding::InUseAtExit { .. } => VerdictKind::InUseAtExit,
        }
    }
}

/// The statement that ends each report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// One per finding, in order.
    pub kinds: Vec<VerdictKind>,
    /// The findings as one sentence (written by the text renderer).
    pub text: String,
    /// Sum of the rates of the growing call sites.
    pub leak_bytes_per_second: f64,
    #[serde(default)]
    pub findings: Vec<Finding>,
}

impl Verdict {
    /// A verdict of `findings`, its text still to be written.
    pub fn new(findings: Vec<Finding>) -> Self {
        let leak_bytes_per_second = findings
            .iter()
            .map(|finding| match finding {
                Finding::Leak { bytes_per_second, .. } => *bytes_per_second,
                _ => 0.0,
            })
            .sum();
        Self {
            kinds: findings.iter().map(Finding::kind).collect(),
            text: String::new(),
            leak_bytes_per_second,
            findings,
        }
    }

    pub fn has(&self, kind: VerdictKind) -> bool {
        self.kinds.contains(&kind)
    }
}
