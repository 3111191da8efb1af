//! The machine's memory picture (the system mode), and what the kernel
//! allocations add to a stack: their kind, slab cache and processes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Trend;

/// Where the machine's memory goes: /proc/meminfo, /proc/slabinfo and every
/// process's statm, each with its change since start and its trend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemReport {
    /// In bytes: "mem_available", ... and each one's "..._delta" since start.
    pub meminfo: BTreeMap<String, i64>,
    /// The trend of each meminfo figure.
    #[serde(default)]
    pub meminfo_trends: BTreeMap<String, Trend>,
    /// The slab caches that changed most since start, growing ones first.
    pub slabs: Vec<SlabReport>,
    /// The processes whose memory grew most since start.
    pub processes: Vec<ProcessReport>,
}

/// One slab cache of /proc/slabinfo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlabReport {
    pub name: String,
    /// Active objects times their size.
    pub bytes: u64,
    /// Since start.
    pub delta: i64,
    pub trend: Trend,
    pub bytes_per_second: f64,
    /// The kernel may shrink it under pressure (dentries, inodes): growth
    /// here is a cache, not a leak.
    #[serde(default)]
    pub reclaimable: bool,
}

/// One process's memory, from /proc/PID/statm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    pub pid: u32,
    pub comm: String,
    pub rss: u64,
    /// Resident memory not shared with files or shmem (statm's resident
    /// less shared): its anonymous memory, what a leak grows.
    pub uss: u64,
    pub rss_delta: i64,
    pub uss_delta: i64,
    pub trend: Trend,
    pub uss_per_second: f64,
    /// Outstanding kernel memory allocated in its context since start.
    #[serde(default)]
    pub kernel_bytes: u64,
}

/// A process in whose context a kernel stack's outstanding memory was
/// allocated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessShare {
    pub pid: u32,
    pub comm: String,
    pub bytes: u64,
}

/// Kernel allocations traced, in all.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelSummary {
    /// Outstanding (older than `older_ms`) kernel bytes and allocations.
    pub bytes: u64,
    pub allocations: u64,
    /// Kernel stacks holding memory, of which the report shows the top.
    pub stack_count: usize,
    /// Whether kernel frames could be named ("kallsyms"), or why not.
    pub symbols: String,
    /// Tracepoints this kernel lacks, whose allocations are not seen.
    #[serde(default)]
    pub missing_events: Vec<String>,
}

/// The target's open file descriptors (`-p --kernel`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FdReport {
    pub count: u64,
    /// Since attach.
    pub delta: i64,
    pub trend: Trend,
    pub per_second: f64,
}
