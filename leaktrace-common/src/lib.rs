//! Types shared by the kernel programs and the loader: map names, map values
//! and the load-time configuration. Every struct is `#[repr(C)]` with explicit
//! padding so both sides agree on the layout.
#![no_std]

mod kernel;
mod lost;
mod stack;

pub use kernel::*;
pub use lost::Lost;
pub use stack::*;

/// Live heap allocations, most of them: an array of [`AllocBucket`]s,
/// `1 << Config::table_bits` of them, each block in the bucket of its
/// address ([`table_bucket`]).
pub const MAP_ALLOC_TABLE: &str = "ALLOC_TABLE";
/// Live heap allocations whose bucket of [`MAP_ALLOC_TABLE`] was full:
/// user address -> [`AllocInfo`].
pub const MAP_ALLOCS: &str = "ALLOCS";
/// Live anonymous mappings made through mmap/mremap: start -> [`AllocInfo`].
pub const MAP_MMAPS: &str = "MMAPS";
/// Per-CPU outstanding totals per user stack: stack id -> [`StackStats`].
pub const MAP_STACK_STATS: &str = "STACK_STATS";
/// Per-CPU outstanding totals of the stacks that first took each slot on
/// that CPU: the slot at stack id modulo [`STACK_SLOT_COUNT`] ->
/// [`StackSlot`]. A stack's totals are the sum of its slots' and its
/// [`MAP_STACK_STATS`] entry's, over every CPU.
pub const MAP_STACK_SLOTS: &str = "STACK_SLOTS";
/// Slots of [`MAP_STACK_SLOTS`] on each CPU.
pub const STACK_SLOT_COUNT: u32 = 1024;
/// User stacks, as unwound by the programs: stack id -> [`UserStack`].
pub const MAP_STACKS: &str = "STACKS";
/// Unwind rules of every loaded object, [`UNWIND_CHUNK_ROWS`] rows per entry:
/// chunk index -> [`UnwindChunk`].
pub const MAP_UNWIND_ROWS: &str = "UNWIND_ROWS";
/// The target's executable mappings, two sets of [`MAX_UNWIND_MAPPINGS`]
/// sorted by address: index -> [`UnwindMapping`].
pub const MAP_UNWIND_MAPPINGS: &str = "UNWIND_MAPPINGS";
/// Wake-ups for the loader: one record each time the dynamic linker changes
/// the target's list of loaded objects (a ring buffer).
pub const MAP_LINK_MAP_CHANGES: &str = "LINK_MAP_CHANGES";
/// Which mapping set is live and how many mappings it has: one
/// [`UnwindState`] at index 0, written whole so that a probe never sees a
/// half-written set.
pub const MAP_UNWIND_STATE: &str = "UNWIND_STATE";
/// Calls in flight, between entry and return probe: a thread's
/// [`PendingSlot`] at its id modulo [`PENDING_SLOT_COUNT`], claimed for as long
/// as it lives.
pub const MAP_PENDING_SLOTS: &str = "PENDING_SLOTS";
/// Calls in flight of threads whose slot of [`MAP_PENDING_SLOTS`] another
/// thread holds: thread id -> [`Pending`].
pub const MAP_PENDING: &str = "PENDING";
/// The age epoch now (a `u32` at index 0: CLOCK_MONOTONIC / `epoch_ns`),
/// kept by the loader, which the programs stamp allocations with.
pub const MAP_EPOCH: &str = "EPOCH";
/// With [`CONFIG_WINDOWS`]: the sampling window's number (a `u32` at index
/// 0), raised by the loader as each window opens and as it closes: odd
/// while it is open, even between windows.
pub const MAP_WINDOW: &str = "WINDOW";

/// Whether the sampling window numbered `window` (in [`MAP_WINDOW`]) is
/// open: its number is odd. Without windows the programs see 1, open.
pub const fn window_is_open(window: u32) -> bool {
    window & 1 == 1
}
/// Per-CPU counters of lost events, indexed by [`Lost`].
pub const MAP_LOST: &str = "LOST";
/// Per-CPU counters of frees of blocks the programs never saw allocated
/// (allocated before attach): [`PREATTACH_COUNT`] and [`PREATTACH_BYTES`],
/// the allocator's own ([`PREATTACH_INTERNAL`]), and the count in each
/// size class from [`PREATTACH_CLASSES`] on.
pub const MAP_PREATTACH_FREES: &str = "PREATTACH_FREES";
/// Index of the count of such frees in [`MAP_PREATTACH_FREES`].
pub const PREATTACH_COUNT: u32 = 0;
/// Index of their bytes, where the allocator's chunk header tells them
/// ([`CONFIG_GLIBC_CHUNKS`]).
pub const PREATTACH_BYTES: u32 = 1;
/// Index of the frees of unknown blocks that the allocator made itself
/// (called from inside [`MAP_ALLOCATOR_TEXT`]): glibc's thread cache,
/// emptied as a thread exits, frees chunks the program freed already and
/// the cache itself, which glibc got without malloc. Not memory from
/// before attach being replaced.
pub const PREATTACH_INTERNAL: u32 = 2;
/// Index of the first size class's count ([`size_class`]).
pub const PREATTACH_CLASSES: u32 = 3;
/// Entries of [`MAP_PREATTACH_FREES`].
pub const PREATTACH_SLOTS: u32 = PREATTACH_CLASSES + SIZE_CLASSES;
/// Size classes of chunks: 16-byte steps up to 1 KiB (glibc's thread
/// cache and small bins), then powers of two up to 2^40.
pub const SIZE_CLASSES: u32 = 64 + 30;

/// The size class of a chunk of `chunk` bytes (its header included).
pub const fn size_class(chunk: u64) -> u32 {
    if chunk <= 1024 {
        return (chunk.saturating_sub(1) / 16) as u32;
    }
    // 1025..=2048 is the first power-of-two class.
    let bits = 64 - (chunk - 1).leading_zeros();
    let class = 64 + bits - 11;
    if class < SIZE_CLASSES {
        class
    } else {
        SIZE_CLASSES - 1
    }
}

/// The chunk glibc's malloc serves a request of `size` bytes from: the
/// request and the 8-byte header, rounded up to 16, at least 32 (what
/// [`size_class`] of a free of such a block sees).
pub const fn glibc_chunk(size: u64) -> u64 {
    let chunk = size.saturating_add(8 + 15) & !15;
    if chunk < 32 {
        32
    } else {
        chunk
    }
}

/// Per-CPU, one word: the address of the last free seen on this CPU. The
/// same free seen at two layers (`__rust_dealloc` then `free`, a C++
/// `operator delete` jumping to `tc_free`, `realloc(p, 0)` freeing inside)
/// comes back to back on one CPU, and counts once.
pub const MAP_LAST_FREE: &str = "LAST_FREE";
/// One [`TextRange`]: where the code of glibc's shared libc is mapped in
/// the target (zero when the allocator is not that library), kept by the
/// unwinder as it publishes the mappings.
pub const MAP_ALLOCATOR_TEXT: &str = "ALLOCATOR_TEXT";
/// Frees of pre-attach memory by stack, a sample of them (one block in
/// [`FREE_STACK_SAMPLE`] by address): stack id -> count, per CPU. Where a
/// structure filled before attach is being replaced.
pub const MAP_PREATTACH_STACKS: &str = "PREATTACH_STACKS";
/// Stacks of [`MAP_PREATTACH_STACKS`].
pub const PREATTACH_STACK_COUNT: u32 = 4096;
/// One free of pre-attach memory in this many has its stack taken.
pub const FREE_STACK_SAMPLE: u64 = 4;

/// Whether the free of pre-attach memory at `addr` has its stack taken:
/// bits of the address hash that address sampling (`is_sampled`) does
/// not use.
pub const fn free_stack_sampled(addr: u64) -> bool {
    (address_hash(addr) >> 16).is_multiple_of(FREE_STACK_SAMPLE)
}

/// A range of addresses, `[start, end)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextRange {
    pub start: u64,
    pub end: u64,
}
/// [`Config::flags`]: the allocator is glibc's, whose chunk header (the 8
/// bytes before a block) holds the chunk's size.
pub const CONFIG_GLIBC_CHUNKS: u32 = 1;
/// [`Config::flags`]: pthread_create is glibc's, whose `pthread_attr_t`
/// holds its flags (bit 0: detached) at offset 8 and the stack size at 32.
pub const CONFIG_GLIBC_PTHREAD: u32 = 2;
/// [`Config::flags`]: stop the target (SIGSTOP) where its mappings change
/// (exec, the dynamic linker's hook) until the loader has published them
/// and sent SIGCONT. Only for a `-c` target, whose parent is leaktrace: a
/// stop would otherwise reach the target's own parent (a shell's job
/// control).
pub const CONFIG_HOLD: u32 = 4;
/// [`Config::flags`]: leaktrace runs in a PID namespace of its own (a
/// container): `tgid` is the target's PID there, and the programs compare
/// it with the current task's PID in that namespace
/// (`bpf_get_ns_current_pid_tgid`), not with the kernel's global one.
pub const CONFIG_PIDNS: u32 = 8;

/// [`Config::flags`]: `-t`: every allocation and free of the target goes to
/// [`MAP_TRACE_EVENTS`].
pub const CONFIG_TRACE: u32 = 16;

/// [`Config::flags`]: `-s N` by time windows: the allocating functions are
/// probed for one window in N. A free of a block never seen allocated was
/// most likely allocated between windows, not before attach: not counted.
pub const CONFIG_WINDOWS: u32 = 32;
/// `-t`: one [`TraceEvent`] per allocation and free (a ring buffer).
pub const MAP_TRACE_EVENTS: &str = "TRACE_EVENTS";
/// Bytes of [`MAP_TRACE_EVENTS`] with `-t` (one page without).
pub const TRACE_EVENTS_BYTES: u32 = 1 << 20;

/// A record of [`MAP_TRACE_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceEvent {
    /// [`TRACE_ALLOC`] or [`TRACE_FREE`].
    pub kind: u32,
    pub tid: u32,
    pub address: u64,
    /// 0 for a free.
    pub size: u64,
    /// The allocation's stack (`NO_STACK` for a free).
    pub stack_id: u32,
    pub _pad: u32,
}

/// [`TraceEvent::kind`].
pub const TRACE_ALLOC: u32 = 1;
pub const TRACE_FREE: u32 = 2;

/// A record of [`MAP_LINK_MAP_CHANGES`]: the target's mappings changed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MappingsChanged {
    /// [`CHANGE_LINKER`] or [`CHANGE_EXEC`].
    pub cause: u32,
    /// 1 when the target was stopped until the loader lets it go.
    pub held: u32,
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) when it happened.
    pub time_ns: u64,
}

/// [`MappingsChanged::cause`]: the dynamic linker's hook fired.
pub const CHANGE_LINKER: u32 = 1;
/// [`MappingsChanged::cause`]: the target exec'd a program.
pub const CHANGE_EXEC: u32 = 2;
/// Whether the heap block at `addr` is one of the 1 in `rate` tracked, by
/// its [`address_hash`].
#[inline(always)]
pub fn is_sampled(addr: u64, rate: u64) -> bool {
    rate <= 1 || (address_hash(addr) >> 32).is_multiple_of(rate)
}

/// A heap block's address mixed (Fibonacci hashing) above its 16-byte
/// alignment: its high bits are spread whatever the allocator's layout.
#[inline(always)]
pub const fn address_hash(addr: u64) -> u64 {
    (addr >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Threads of the target created since attach: kernel tid -> [`ThreadInfo`].
pub const MAP_THREADS: &str = "THREADS";
/// pthread_t -> kernel tid, for join and detach.
pub const MAP_PTHREADS: &str = "PTHREADS";
/// Per-CPU counters per creating stack: stack id -> [`ThreadSiteStats`].
pub const MAP_THREAD_SITES: &str = "THREAD_SITES";
/// Attributes set to create detached threads: attr address -> detach state.
pub const MAP_DETACH_ATTRS: &str = "DETACH_ATTRS";
/// The load-time configuration, a `Global<Config>`.
pub const GLOBAL_CONFIG: &str = "CONFIG";

/// Default capacity of [`MAP_ALLOCS`]: a power of two, as the kernel's
/// bucket count is, so that none of the buckets' memory goes unused.
pub const DEFAULT_MAX_ALLOCATIONS: u32 = 1 << 20;
/// Default capacity of [`MAP_MMAPS`].
pub const DEFAULT_MAX_MAPPINGS: u32 = 65_536;
/// Default number of distinct user stacks kept.
pub const DEFAULT_MAX_STACKS: u32 = 16_384;
/// Capacity of [`MAP_PENDING`]: threads inside an allocator call at once.
pub const MAX_PENDING: u32 = 16_384;
/// Capacity of [`MAP_THREADS`]: threads alive or exited and not joined.
pub const MAX_THREADS: u32 = 65_536;

/// The stack id recorded when the user stack could not be collected.
pub const NO_STACK: u32 = u32::MAX;

/// Deepest user stack kept (the kernel's own stack map default is 127).
pub const MAX_FRAMES: usize = 128;
/// Unwind rows per entry of [`MAP_UNWIND_ROWS`]: one map update loads 256.
pub const UNWIND_CHUNK_ROWS: usize = 256;
/// Default capacity of [`MAP_UNWIND_ROWS`] in chunks (2,097,152 rows, 24 MiB).
pub const DEFAULT_UNWIND_CHUNKS: u32 = 8_192;
/// Executable mappings per set in [`MAP_UNWIND_MAPPINGS`].
pub const MAX_UNWIND_MAPPINGS: u32 = 1_024;

/// Young-allocation buckets kept per stack (see [`StackStats`]).
pub const YOUNG_SLOTS: usize = 8;
/// An allocation whose epoch is within this many epochs of now is "young".
/// With an epoch of `older / 4`, every allocation younger than `older` is
/// excluded, and none older than `1.25 * older`.
pub const YOUNG_EPOCHS: u32 = 4;

/// What the loader tells the programs at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Only events of this process (tgid) are recorded.
    pub tgid: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Length of an age epoch in ns; 0 disables young-allocation tracking.
    pub epoch_ns: u64,
    /// Allocations smaller than this are not recorded.
    pub min_size: u64,
    /// Allocations larger than this are not recorded.
    pub max_size: u64,
    /// Offset of `child_pid` in the sched_process_fork tracepoint record,
    /// read from its format file (it differs between kernels).
    pub fork_child_pid_offset: u32,
    /// log2 of the buckets in [`MAP_ALLOC_TABLE`].
    pub table_bits: u32,
    /// Track one heap allocation in this many (1: all), chosen by address
    /// so that its free is recognised without a lookup.
    pub sample_rate: u64,
    /// With [`CONFIG_PIDNS`]: the PID namespace `tgid` is numbered in, as
    /// the device and inode of leaktrace's /proc/self/ns/pid.
    pub pidns_dev: u64,
    pub pidns_ino: u64,
}

/// One live allocation or mapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocInfo {
    pub size: u64,
    pub stack_id: u32,
    /// The age epoch when allocated ([`MAP_EPOCH`]).
    pub epoch: u32,
}

/// Slots of an [`AllocBucket`].
pub const BUCKET_SLOTS: usize = 5;

/// A slot's key while its block's record is being written (addresses are
/// never 1): only the program that claimed it writes it.
pub const SLOT_CLAIMED: u64 = 1;

/// Blocks whose address falls in one bucket of [`MAP_ALLOC_TABLE`]: two
/// cache lines, the keys in the first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocBucket {
    /// The blocks' addresses; 0 for a free slot, [`SLOT_CLAIMED`] for one
    /// being filled.
    pub keys: [u64; BUCKET_SLOTS],
    /// Blocks of this bucket kept in [`MAP_ALLOCS`] (the bucket was full
    /// when they came): a free looks there only if some are.
    pub spilled: u64,
    pub infos: [AllocInfo; BUCKET_SLOTS],
}

/// The bucket of [`MAP_ALLOC_TABLE`] (of `1 << bits`) of the block at
/// `addr`: the top bits of its [`address_hash`].
pub const fn table_bucket(addr: u64, bits: u32) -> u32 {
    address_hash(addr).wrapping_shr(64u32.wrapping_sub(bits)) as u32
}

/// log2 of the fewest buckets [`MAP_ALLOC_TABLE`] has (4,096: 512 KiB,
/// 20,480 blocks).
pub const MIN_TABLE_BITS: u32 = 12;
/// log2 of the most (262,144: 32 MiB, 1,310,720 blocks).
pub const MAX_TABLE_BITS: u32 = 18;

/// Outstanding allocations of the last few epochs, so a report can leave out
/// allocations younger than `--older` without walking every allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct YoungSlot {
    pub epoch: u32,
    pub _pad: u32,
    pub bytes: i64,
    pub allocs: i64,
}

/// Outstanding totals of one stack on one CPU. A free on another CPU than the
/// allocation subtracts there, so one CPU's value may be negative: only the
/// sum over CPUs is meaningful.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StackStats {
    pub bytes: i64,
    pub allocs: i64,
    /// Slot `epoch % YOUNG_SLOTS` holds allocations made in that epoch.
    pub young: [YoungSlot; YOUNG_SLOTS],
}

/// A slot of [`MAP_STACK_SLOTS`]: one stack's totals on one CPU, in an
/// array (no hash lookup at each allocation and free).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StackSlot {
    /// The stack id + 1 of the stack that holds the slot; 0 when free.
    pub tag: u64,
    pub stats: StackStats,
}

/// Which call a [`Pending`] entry belongs to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// malloc, calloc, memalign, aligned_alloc, valloc, pvalloc.
    Alloc = 0,
    Realloc = 1,
    PosixMemalign = 2,
    Mmap = 3,
    /// An mmap that is not tracked (file-backed or a thread stack).
    MmapIgnored = 4,
    Mremap = 5,
    ThreadCreate = 6,
    ThreadJoin = 7,
    ThreadDetach = 8,
}

/// An allocator call between its entry and its return probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending {
    /// Stack pointer at entry: a return whose sp is not above it belongs to a
    /// nested call, and an entry above it means the return was missed.
    pub sp: u64,
    /// Requested size (new size for realloc and mremap).
    pub size: u64,
    /// realloc and mremap: the old address; posix_memalign: `memptr`.
    pub arg: u64,
    pub kind: u32,
    /// pthread_create: the new thread's kernel tid, from the fork tracepoint.
    pub child: u32,
    /// pthread_create: [`THREAD_DETACHED`] when the attributes say so.
    pub flags: u32,
    /// Probed functions entered by a tail jump at the same sp (glibc's
    /// operator new[] jumps to operator new): each has its own return
    /// probe, and the last of them to fire takes the record.
    pub tail_calls: u32,
    /// With [`CONFIG_WINDOWS`]: the sampling window the call entered in. A
    /// window's return probe may go before its entry probe (they are
    /// detached together): an allocating call's record from an earlier
    /// window is stale, not an outer call.
    pub window: u32,
    /// pthread_create: the kind of the allocator call in flight inside it
    /// (glibc's loader `calloc`s each new thread's TLS table there), whose
    /// block is the program's like any other, not folded into the call.
    pub inner_kind: u32,
    /// That call's stack pointer at entry; 0 when there is none.
    pub inner_sp: u64,
    /// That call's requested size and argument, as `size` and `arg`.
    pub inner_size: u64,
    pub inner_arg: u64,
}

/// Slots of [`MAP_PENDING_SLOTS`].
pub const PENDING_SLOT_COUNT: u32 = 16_384;

/// A thread's calls in flight, in an array: no hash lookup at each entry
/// and return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingSlot {
    /// The thread id that holds the slot; 0 when free.
    pub owner: u64,
    pub pending: Pending,
}

impl CallKind {
    /// Calls of the malloc family (their returns record a block).
    pub fn allocates(kind: u32) -> bool {
        kind == Self::Alloc as u32
            || kind == Self::Realloc as u32
            || kind == Self::PosixMemalign as u32
    }

    /// Calls of the functions `-s N` probes in sampling windows only: the
    /// kinds the programs of the loader's `probes::allocates_only` record
    /// (the two lists name one set, from each side).
    pub fn windowed(kind: u32) -> bool {
        kind == Self::Alloc as u32
            || kind == Self::PosixMemalign as u32
            || kind == Self::Mmap as u32
            || kind == Self::MmapIgnored as u32
    }
}

/// [`ThreadInfo::state`] bit: the thread has exited.
pub const THREAD_EXITED: u32 = 1;
/// [`ThreadInfo::state`] bit: detached (created so, or pthread_detach).
pub const THREAD_DETACHED: u32 = 2;
/// [`ThreadInfo::state`] bit: pthread_create returned and filled the rest.
pub const THREAD_REGISTERED: u32 = 4;

/// A thread created since attach, alive or exited and not yet joined.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadInfo {
    /// The pthread_t pthread_create stored.
    pub pthread: u64,
    /// Bytes of its stack mapping, when pthread_create mapped a new one
    /// (0 when glibc reused a cached stack).
    pub stack_size: u64,
    /// Stack id of the pthread_create call.
    pub site: u32,
    /// `THREAD_*` bits.
    pub state: u32,
}

/// What became of the threads created at one call site (per CPU: sum them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadSiteStats {
    pub created: u64,
    pub joined: u64,
    /// Detached threads that have exited (their records are gone).
    pub detached_exited: u64,
}

const _: () = assert!(core::mem::size_of::<Config>() == 64);
const _: () = assert!(core::mem::size_of::<TextRange>() == 16);
const _: () = assert!(core::mem::size_of::<ThreadInfo>() == 24);
const _: () = assert!(core::mem::size_of::<ThreadSiteStats>() == 24);
const _: () = assert!(core::mem::size_of::<AllocInfo>() == 16);
const _: () = assert!(core::mem::size_of::<StackStats>() == 16 + 24 * YOUNG_SLOTS);
const _: () = assert!(core::mem::size_of::<Pending>() == 72);
const _: () = assert!(core::mem::size_of::<UnwindRow>() == 12);
const _: () = assert!(core::mem::size_of::<UnwindMapping>() == 40);
const _: () = assert!(core::mem::size_of::<MappingsChanged>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are plain-old-data `#[repr(C)]` structs with
    // explicit padding; any bit pattern is a valid value.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::AllocInfo {}
    unsafe impl aya::Pod for super::AllocBucket {}
    unsafe impl aya::Pod for super::StackStats {}
    unsafe impl aya::Pod for super::StackSlot {}
    unsafe impl aya::Pod for super::Pending {}
    unsafe impl aya::Pod for super::PendingSlot {}
    unsafe impl aya::Pod for super::ThreadInfo {}
    unsafe impl aya::Pod for super::ThreadSiteStats {}
    unsafe impl aya::Pod for super::UserStack {}
    unsafe impl aya::Pod for super::UnwindChunk {}
    unsafe impl aya::Pod for super::UnwindMapping {}
    unsafe impl aya::Pod for super::TextRange {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check the size classes: 16-byte steps to 1 KiB, then powers of two,
    /// and glibc's chunk for a request.
    #[test]
    fn size_classes() {
        let cases = [(32, 1), (48, 2), (1024, 63), (1025, 64), (2048, 64), (2049, 65), (4112, 66)];
        for (chunk, class) in cases {
            assert_eq!(size_class(chunk), class, "chunk {chunk}");
        }
        assert_eq!(size_class(1 << 50), SIZE_CLASSES - 1);
        assert_eq!(size_class(0), 0);
        let requests = [(0, 32), (24, 32), (25, 48), (64, 80), (1024, 1040), (4096, 4112)];
        for (request, chunk) in requests {
            assert_eq!(glibc_chunk(request), chunk, "request {request}");
        }
        assert_eq!(size_class(glibc_chunk(1024)), size_class(1040));
    }

    /// Check that about one free in FREE_STACK_SAMPLE has its stack taken,
    /// whatever address sampling chose.
    #[test]
    fn free_stacks_sampled_apart() {
        let addresses = (0..100_000u64).map(|i| 0x5555_0000_0000 + i * 48);
        let both = addresses.clone().filter(|&a| is_sampled(a, 4) && free_stack_sampled(a)).count();
        let sampled = addresses.filter(|&a| free_stack_sampled(a)).count();
        assert!((22_000..28_000).contains(&sampled), "{sampled}");
        assert!((5_000..7_500).contains(&both), "{both}");
    }

    /// Check that about one address in N is sampled, and all when N is 1.
    #[test]
    fn sampling_rate() {
        let addresses = (0..100_000u64).map(|i| 0x5555_0000_0000 + i * 48);
        let sampled = addresses.clone().filter(|&a| is_sampled(a, 10)).count();
        assert!((9_000..11_000).contains(&sampled), "{sampled} of 100000 sampled at 1 in 10");
        assert!(addresses.into_iter().all(|a| is_sampled(a, 1)));
    }
}
