//! Kernel allocations (`--kernel` and the system mode): the kmem and percpu
//! tracepoints' records, read at offsets the loader takes from each
//! tracepoint's format file, and the books the programs keep of them.

/// Outstanding kernel allocations: tagged address -> [`KernelAlloc`].
pub const MAP_KERNEL_ALLOCS: &str = "KERNEL_ALLOCS";
/// Kernel stacks (`bpf_get_stackid`): stack id -> return addresses.
pub const MAP_KERNEL_STACKS: &str = "KERNEL_STACKS";
/// The slab cache a kernel stack allocates from: stack id -> [`CacheName`].
pub const MAP_KERNEL_CACHES: &str = "KERNEL_CACHES";
/// Allocations recorded per kernel stack, per CPU: stack id -> `u64`, so
/// that a stack's growth reads against what it allocates.
pub const MAP_KERNEL_COUNTS: &str = "KERNEL_COUNTS";
/// The load-time configuration of the kernel-allocation programs, a
/// `Global<KmemConfig>`.
pub const GLOBAL_KMEM: &str = "KMEM";

/// Default capacity of [`MAP_KERNEL_ALLOCS`].
pub const DEFAULT_MAX_KERNEL_ALLOCATIONS: u32 = 262_144;
/// Default capacity of [`MAP_KERNEL_STACKS`] (about 1 KiB each).
pub const DEFAULT_MAX_KERNEL_STACKS: u32 = 8_192;
/// The kernel stack id recorded when none could be kept.
pub const NO_KERNEL_STACK: i32 = -1;

/// [`KmemConfig::flags`]: the programs record kernel allocations.
pub const KMEM_ON: u32 = 1;
/// [`KmemConfig::flags`]: only the target's (`Config::tgid`), each with the
/// user stack that entered the kernel (`-p --kernel`). Without it, every
/// process's but leaktrace's own (the system mode).
pub const KMEM_TARGET: u32 = 2;
/// [`KmemConfig::flags`]: percpu allocations too (`--percpu`).
pub const KMEM_PERCPU: u32 = 4;

/// Where a field is missing from a tracepoint's record.
pub const NO_FIELD: u16 = u16::MAX;

/// The record fields the programs read: indexes into [`KmemConfig::offsets`].
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KmemField {
    KmallocPtr,
    KmallocBytes,
    CacheAllocPtr,
    CacheAllocBytes,
    CacheAllocName,
    KfreePtr,
    CacheFreePtr,
    PageAllocPfn,
    PageAllocOrder,
    PageAllocMigratetype,
    PageFreePfn,
    PageFreeOrder,
    PageFreeBatchedPfn,
    PercpuAllocPtr,
    PercpuAllocBytes,
    PercpuFreePtr,
}

/// Fields in [`KmemField`].
pub const KMEM_FIELDS: usize = 16;

/// What the loader tells the kernel-allocation programs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KmemConfig {
    /// `KMEM_*` bits.
    pub flags: u32,
    /// leaktrace's own process, whose allocations (map updates, /proc
    /// reads) are not the machine's.
    pub own_tgid: u32,
    /// Bytes in a page.
    pub page_size: u64,
    /// Each [`KmemField`]'s offset in its record, or [`NO_FIELD`].
    pub offsets: [u16; KMEM_FIELDS],
    /// One kernel allocation in this many is kept, chosen by address (the
    /// tracepoints cost no trap: sampling them saves their work).
    pub sample_rate: u64,
}

impl Default for KmemConfig {
    fn default() -> Self {
        Self {
            flags: 0,
            own_tgid: 0,
            page_size: 4096,
            offsets: [NO_FIELD; KMEM_FIELDS],
            sample_rate: 1,
        }
    }
}

/// What kind of kernel memory an allocation is (reports carry it, as
/// `"kind"`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum KernelKind {
    /// kmalloc and friends (a kmalloc-N cache, or pages past 8 KiB).
    Kmalloc = 0,
    /// An object of a named slab cache (kmem_cache_alloc).
    Slab = 1,
    /// Pages straight from the page allocator (not movable: user memory and
    /// the page cache are movable, and left to the process picture).
    Page = 2,
    /// A percpu allocation (`--percpu`).
    Percpu = 3,
}

impl KernelKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Kmalloc),
            1 => Some(Self::Slab),
            2 => Some(Self::Page),
            3 => Some(Self::Percpu),
            _ => None,
        }
    }

    /// The name used in reports and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Kmalloc => "kmalloc",
            Self::Slab => "slab",
            Self::Page => "page",
            Self::Percpu => "percpu",
        }
    }
}

/// The tag of a page's key in [`MAP_KERNEL_ALLOCS`]: pfns are small
/// numbers, slab pointers start 0xffff8..., so neither collides.
pub const PAGE_KEY: u64 = 1 << 63;
/// The tag of a percpu pointer's key (an offset into the percpu area).
pub const PERCPU_KEY: u64 = 1 << 61;

/// One outstanding kernel allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelAlloc {
    pub size: u64,
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) at the allocation.
    pub time_ns: u64,
    /// In [`MAP_KERNEL_STACKS`], or [`NO_KERNEL_STACK`].
    pub kernel_stack: i32,
    /// The user stack that entered the kernel, in `STACKS` (`-p --kernel`),
    /// or `NO_STACK`.
    pub user_stack: u32,
    /// The process in whose context it was allocated.
    pub tgid: u32,
    /// A [`KernelKind`].
    pub kind: u32,
}

/// A slab cache's name, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CacheName {
    pub bytes: [u8; 32],
}

impl CacheName {
    /// The name up to its first NUL, if it is text.
    pub fn as_str(&self) -> Option<&str> {
        let end = self.bytes.iter().position(|&b| b == 0).unwrap_or(self.bytes.len());
        core::str::from_utf8(&self.bytes[..end]).ok().filter(|name| !name.is_empty())
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data with no padding holes and no pointers.
    unsafe impl aya::Pod for super::KmemConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelAlloc {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CacheName {}
}

const _: () = assert!(core::mem::size_of::<KmemConfig>() == 56);
