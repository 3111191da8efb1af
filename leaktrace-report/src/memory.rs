//! A process's memory picture from /proc, split by kind of mapping, and its
//! change since attach.

use serde::{Deserialize, Serialize};

/// Memory of one kind of mapping, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Virtual size of the mappings.
    pub size: u64,
    /// Resident set size.
    pub rss: u64,
    /// Proportional set size: shared pages divided among their sharers.
    pub pss: u64,
    /// Unique set size: pages only this process maps (Private_Clean + Private_Dirty).
    pub uss: u64,
    /// Swapped out.
    pub swap: u64,
    /// Number of mappings.
    pub count: u64,
}

/// A process's memory at one moment, in bytes, split by kind of mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPicture {
    /// Resident set size over all mappings.
    pub rss: u64,
    /// Proportional set size over all mappings.
    pub pss: u64,
    /// Unique set size over all mappings.
    pub uss: u64,
    /// Swapped-out memory over all mappings.
    pub swap: u64,
    /// Size of the writable private mappings, as `pmap -d` counts "writeable/private".
    pub writable_private: u64,
    /// Number of threads (entries in /proc/PID/task).
    pub threads: u64,
    /// The brk heap and glibc malloc arenas.
    pub heap: Usage,
    /// Stacks of threads other than the main one.
    pub thread_stacks: Usage,
    /// The main thread's `[stack]`.
    pub main_stack: Usage,
    /// Every other private anonymous mapping, and pseudo-mappings like `[vdso]`.
    pub other_anon: Usage,
    /// Private file-backed mappings: code, data and read-only files.
    pub file: Usage,
    /// Shared mappings (files, anonymous, SysV, memfd, /dev/shm) and deleted files.
    pub shared: Usage,
}

/// The change of every field since a baseline, signed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryDelta {
    /// Change of total RSS.
    pub rss: i64,
    /// Change of total PSS.
    pub pss: i64,
    /// Change of total USS.
    pub uss: i64,
    /// Change of total swap.
    pub swap: i64,
    /// Change of the writable private size.
    pub writable_private: i64,
    /// Change of the thread count.
    pub threads: i64,
    /// Change of heap RSS.
    pub heap_rss: i64,
    /// Change of thread stack RSS.
    pub thread_stacks_rss: i64,
    /// Change of the number of thread stack mappings.
    pub thread_stacks_count: i64,
    /// Change of other anonymous RSS.
    pub other_anon_rss: i64,
    /// Change of private file-backed RSS.
    pub file_rss: i64,
    /// Change of shared RSS.
    pub shared_rss: i64,
}

/// The memory section of a report: the picture now, and since attach.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    #[serde(flatten)]
    pub picture: MemoryPicture,
    pub since_attach: MemoryDelta,
}

impl MemoryPicture {
    /// The change of every field from `baseline` to `self`.
    pub fn since(&self, baseline: &MemoryPicture) -> MemoryDelta {
        MemoryDelta {
            rss: diff(self.rss, baseline.rss),
            pss: diff(self.pss, baseline.pss),
            uss: diff(self.uss, baseline.uss),
            swap: diff(self.swap, baseline.swap),
            writable_private: diff(self.writable_private, baseline.writable_private),
            threads: diff(self.threads, baseline.threads),
            heap_rss: diff(self.heap.rss, baseline.heap.rss),
            thread_stacks_rss: diff(self.thread_stacks.rss, baseline.thread_stacks.rss),
            thread_stacks_count: diff(self.thread_stacks.count, baseline.thread_stacks.count),
            other_anon_rss: diff(self.other_anon.rss, baseline.other_anon.rss),
            file_rss: diff(self.file.rss, baseline.file.rss),
            shared_rss: diff(self.shared.rss, baseline.shared.rss),
        }
    }
}

fn diff(now: u64, then: u64) -> i64 {
    let diff = i128::from(now) - i128::from(then);
    i64::try_from(diff).unwrap_or(if diff < 0 { i64::MIN } else { i64::MAX })
}
