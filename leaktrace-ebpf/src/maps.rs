//! Every map and the load-time configuration, in one place. The loader
//! overrides the sizes with `map_max_entries` and `CONFIG` with
//! `override_global`; the names it looks up are constants in leaktrace-common.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    Global,
};
use leaktrace_common::{
    AllocBucket, AllocInfo, CacheName, Config, KernelAlloc, KmemConfig, Lost, Pending, PendingSlot,
    StackSlot, StackStats, TextRange, ThreadInfo, ThreadSiteStats, UnwindChunk, UnwindMapping,
    UnwindState, UserStack, CONFIG_WINDOWS, DEFAULT_MAX_ALLOCATIONS,
    DEFAULT_MAX_KERNEL_ALLOCATIONS, DEFAULT_MAX_KERNEL_STACKS, DEFAULT_MAX_MAPPINGS,
    DEFAULT_MAX_STACKS, DEFAULT_UNWIND_CHUNKS, KMEM_FIELDS, MAX_PENDING, MAX_THREADS,
    MAX_UNWIND_MAPPINGS, MIN_TABLE_BITS, NO_FIELD, PENDING_SLOT_COUNT, PREATTACH_SLOTS,
    PREATTACH_STACK_COUNT, STACK_SLOT_COUNT,
};

use crate::types::{CachedAddress, StackWindow};

/// What an insert with `BPF_NOEXIST` returns, negated, when the key is
/// already present.
pub const EEXIST: i64 = 17;

#[unsafe(no_mangle)]
pub static CONFIG: Global<Config> = Global::new(Config {
    tgid: 0,
    flags: 0,
    epoch_ns: 0,
    min_size: 0,
    max_size: u64::MAX,
    fork_child_pid_offset: 0,
    table_bits: 0,
    sample_rate: 1,
    pidns_dev: 0,
    pidns_ino: 0,
});

/// The kernel-allocation programs' configuration: off unless the loader
/// turns them on.
#[unsafe(no_mangle)]
pub static KMEM: Global<KmemConfig> = Global::new(KmemConfig {
    flags: 0,
    own_tgid: 0,
    page_size: 4096,
    offsets: [NO_FIELD; KMEM_FIELDS],
    sample_rate: 1,
});

/// Outstanding kernel allocations. Preallocated, as `ALLOCS`: these
/// programs run inside the kernel's allocator, where a map that allocated
/// would trace its own allocations.
#[map]
pub static KERNEL_ALLOCS: HashMap<u64, KernelAlloc> =
    HashMap::with_max_entries(DEFAULT_MAX_KERNEL_ALLOCATIONS, 0);

#[map]
pub static KERNEL_STACKS: StackTrace = StackTrace::with_max_entries(DEFAULT_MAX_KERNEL_STACKS, 0);

#[map]
pub static KERNEL_CACHES: HashMap<i32, CacheName> =
    HashMap::with_max_entries(DEFAULT_MAX_KERNEL_STACKS, 0);

/// Allocations per kernel stack. Preallocated, as `KERNEL_ALLOCS`.
#[map]
pub static KERNEL_COUNTS: PerCpuHashMap<i32, u64> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_KERNEL_STACKS, 0);

/// Live heap allocations, most of them: buckets of slots in an array (no
/// lock, no element to allocate: a hash map's insert and delete cost ~180
/// ns a block). Sized by the loader from the target.
#[map]
pub static ALLOC_TABLE: Array<AllocBucket> = Array::with_max_entries(1 << MIN_TABLE_BITS, 0);

/// Live heap allocations whose bucket of `ALLOC_TABLE` was full. Allocated as used (the kernel's per-CPU caches
/// serve the hot path): a small target costs its buckets alone (16 B an
/// entry of capacity), not a million preallocated elements; a full map
/// fails fast (counted as `AllocMapFull`).
#[map]
pub static ALLOCS: HashMap<u64, AllocInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_ALLOCATIONS, BPF_F_NO_PREALLOC);

/// Live anonymous mappings; few, so allocated on demand.
#[map]
pub static MMAPS: HashMap<u64, AllocInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_MAPPINGS, BPF_F_NO_PREALLOC);

/// Per-CPU so that the hot path needs no atomics and no shared cache line.
/// An entry is made once per new stack: allocated as used.
#[map]
pub static STACK_STATS: PerCpuHashMap<u32, StackStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

/// Per-stack totals, per CPU, in an array: a stack takes the slot at its
/// id modulo the array on a CPU where it is free, for good; the others go
/// to `STACK_STATS`. A per-CPU hash lookup cost ~35 ns an allocation and
/// a free.
#[map]
pub static STACK_SLOTS: PerCpuArray<StackSlot> = PerCpuArray::with_max_entries(STACK_SLOT_COUNT, 0);

/// Distinct user stacks; inserted rarely, so allocated on demand.
#[map]
pub static STACKS: HashMap<u32, UserStack> =
    HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

/// The stack being unwound (too big for the 512-byte program stack).
#[map]
pub static STACK_SCRATCH: PerCpuArray<UserStack> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static UNWIND_ROWS: Array<UnwindChunk> = Array::with_max_entries(DEFAULT_UNWIND_CHUNKS, 0);

#[map]
pub static UNWIND_MAPPINGS: Array<UnwindMapping> =
    Array::with_max_entries(2 * MAX_UNWIND_MAPPINGS, 0);

#[map]
pub static UNWIND_STATE: Array<UnwindState> = Array::with_max_entries(1, 0);

/// log2 of the slots in [`UNWIND_CACHE`].
pub const UNWIND_CACHE_BITS: u32 = 12;

/// What recently walked addresses resolved to, per CPU (160 KiB each).
#[map]
pub static UNWIND_CACHE: PerCpuArray<CachedAddress> =
    PerCpuArray::with_max_entries(1 << UNWIND_CACHE_BITS, 0);

/// log2 of the slots in [`STACK_CACHE`].
pub const STACK_CACHE_BITS: u32 = 10;

/// The stacks this CPU found in `STACKS` lately, by id: a tag of the walk's
/// hash and length (one word: a slot is never seen half written). A hit
/// skips the `STACKS` lookup (~30 ns an allocation); stacks are never
/// removed, so a slot stays true.
#[map]
pub static STACK_CACHE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1 << STACK_CACHE_BITS, 0);

/// What the walk on this CPU read of the user stack (one value).
#[map]
pub static STACK_WINDOW: PerCpuArray<StackWindow> = PerCpuArray::with_max_entries(1, 0);

/// `-t`: every allocation and free, for the loader to print (sized by the
/// loader: one page unless tracing).
#[map]
pub static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(4096, 0);

/// One page: the loader only needs to wake, not to count.
#[map]
pub static LINK_MAP_CHANGES: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Each thread's calls in flight, in the slot at its id modulo the array
/// (claimed for its life): a hash lookup at entry and return cost ~35 ns
/// each.
#[map]
pub static PENDING_SLOTS: Array<PendingSlot> = Array::with_max_entries(PENDING_SLOT_COUNT, 0);

/// Calls in flight of threads whose slot another thread holds.
#[map]
pub static PENDING: HashMap<u32, Pending> = HashMap::with_max_entries(MAX_PENDING, 0);

/// The age epoch now, kept by the loader: reading the clock here (the
/// helper and a division) cost ~25 ns an allocation.
#[map]
pub static EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// The sampling window's number (`-s N` by windows), written by the loader.
#[map]
pub static WINDOW: Array<u32> = Array::with_max_entries(1, 0);

/// The sampling window's number (odd while the window is open, even
/// between windows); 1 without windows (not looked up).
#[inline(always)]
pub fn window(config: &Config) -> u32 {
    if config.flags & CONFIG_WINDOWS == 0 {
        return 1;
    }
    WINDOW.get(0).copied().unwrap_or(1)
}

#[map]
pub static THREADS: HashMap<u32, ThreadInfo> =
    HashMap::with_max_entries(MAX_THREADS, BPF_F_NO_PREALLOC);

#[map]
pub static PTHREADS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_THREADS, BPF_F_NO_PREALLOC);

#[map]
pub static THREAD_SITES: PerCpuHashMap<u32, ThreadSiteStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

/// LRU: attributes are rarely destroyed through a probed call.
#[map]
pub static DETACH_ATTRS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(1024, 0);

#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(Lost::COUNT, 0);

/// Frees of blocks allocated before attach: count, bytes, the
/// allocator's own, and the count per size class (see leaktrace-common).
#[map]
pub static PREATTACH_FREES: PerCpuArray<u64> = PerCpuArray::with_max_entries(PREATTACH_SLOTS, 0);

/// The address of the last free seen on this CPU ([`MAP_LAST_FREE`]).
#[map]
pub static LAST_FREE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Where glibc's libc code is mapped in the target ([`MAP_ALLOCATOR_TEXT`]).
#[map]
pub static ALLOCATOR_TEXT: Array<TextRange> = Array::with_max_entries(1, 0);

/// A sample of the stacks of pre-attach frees: stack id -> count, per CPU.
#[map]
pub static PREATTACH_STACKS: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(PREATTACH_STACK_COUNT, 0);

#[inline(always)]
pub fn config() -> Config {
    CONFIG.load()
}

#[inline(always)]
pub fn kmem_config() -> KmemConfig {
    KMEM.load()
}

/// Count one lost event; returns the count of its kind on this CPU now (0
/// if the counter could not be read).
#[inline(always)]
pub fn count_lost(reason: Lost) -> u64 {
    let Some(counter) = LOST.get_ptr_mut(reason as u32) else {
        return 0;
    };
    // SAFETY: the pointer comes from a successful lookup in a per-CPU array,
    // valid for this program run and not shared with other CPUs.
    unsafe {
        *counter += 1;
        *counter
    }
}

/// Add `value` to slot `index` of [`PREATTACH_FREES`] on this CPU.
#[inline(always)]
pub fn count_preattach(index: u32, value: u64) {
    if let Some(counter) = PREATTACH_FREES.get_ptr_mut(index) {
        // SAFETY: as in count_lost: a per-CPU slot, this run's alone.
        unsafe { *counter += value };
    }
}

/// Whether a loss whose [`count_lost`] returned `count` is worth a log line:
/// the 1st, 2nd, 4th, 8th... of its kind on a CPU, so that a map that stays
/// full logs a few lines, not one per event.
#[inline(always)]
pub fn worth_logging(count: u64) -> bool {
    // Not `is_power_of_two`: a population count is a long sequence in BPF.
    count != 0 && count & count.wrapping_sub(1) == 0
}
