//! The ways an event can be lost, each counted apart.

/// Ways an event can be lost; the index into [`MAP_LOST`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Lost {
    /// The live-allocation map was full.
    AllocMapFull = 0,
    /// The mapping map was full.
    MmapMapFull = 1,
    /// The per-stack totals map was full.
    StatsMapFull = 2,
    /// Two different stacks hashed to one slot of the stack map (it is full).
    #[cfg_attr(feature = "serde", serde(rename = "stack_map_full_or_collision"))]
    StackCollision = 3,
    /// The user stack could not be read at all.
    StackUnavailable = 4,
    /// A return probe fired with no entry record.
    ReturnWithoutEntry = 5,
    /// An entry found a stale record: its return probe never fired.
    MissedReturn = 6,
    /// The in-flight call map was full.
    PendingMapFull = 7,
    /// Reading the result of posix_memalign or pthread_create failed.
    ReadFailed = 8,
    /// The thread map was full.
    ThreadMapFull = 9,
    /// A stack was cut where a frame had no call-frame information (or lay
    /// outside every known executable mapping).
    UnwindNoInfo = 10,
    /// A stack was cut at a rule the programs do not follow, or at stack
    /// memory that could not be read.
    UnwindFailed = 11,
    /// A stack was deeper than [`MAX_FRAMES`] and was cut.
    UnwindDepth = 12,
    /// The kernel-allocation map was full (`--kernel` and the system mode).
    KernelAllocMapFull = 13,
    /// A kernel stack could not be kept (the kernel stack map full, or two
    /// stacks in one bucket); its allocation still counts, stackless.
    KernelStack = 14,
    /// `-t`: an event did not fit in the trace ring buffer (its line is
    /// missing; the books are whole).
    TraceDropped = 15,
}

impl Lost {
    pub const COUNT: u32 = 16;

    /// Whether this loss cuts a stack short (its bytes still count) rather
    /// than drops an event from the books.
    pub const fn cuts_stack(self) -> bool {
        matches!(self, Lost::UnwindNoInfo | Lost::UnwindFailed | Lost::UnwindDepth)
    }
    pub const ALL: [Lost; Self::COUNT as usize] = [
        Lost::AllocMapFull,
        Lost::MmapMapFull,
        Lost::StatsMapFull,
        Lost::StackCollision,
        Lost::StackUnavailable,
        Lost::ReturnWithoutEntry,
        Lost::MissedReturn,
        Lost::PendingMapFull,
        Lost::ReadFailed,
        Lost::ThreadMapFull,
        Lost::UnwindNoInfo,
        Lost::UnwindFailed,
        Lost::UnwindDepth,
        Lost::KernelAllocMapFull,
        Lost::KernelStack,
        Lost::TraceDropped,
    ];

    /// The name used in reports and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Lost::AllocMapFull => "alloc_map_full",
            Lost::MmapMapFull => "mmap_map_full",
            Lost::StatsMapFull => "stats_map_full",
            Lost::StackCollision => "stack_map_full_or_collision",
            Lost::StackUnavailable => "stack_unavailable",
            Lost::ReturnWithoutEntry => "return_without_entry",
            Lost::MissedReturn => "missed_return",
            Lost::PendingMapFull => "pending_map_full",
            Lost::ReadFailed => "read_failed",
            Lost::ThreadMapFull => "thread_map_full",
            Lost::UnwindNoInfo => "unwind_no_info",
            Lost::UnwindFailed => "unwind_failed",
            Lost::UnwindDepth => "unwind_depth",
            Lost::KernelAllocMapFull => "kernel_alloc_map_full",
            Lost::KernelStack => "kernel_stack",
            Lost::TraceDropped => "trace_dropped",
        }
    }
}
