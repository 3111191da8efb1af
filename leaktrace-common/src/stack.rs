//! User stacks and the unwind tables the programs walk them with.

use crate::{MAX_FRAMES, UNWIND_CHUNK_ROWS};

/// A user stack: return addresses, innermost first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UserStack {
    /// The 64-bit hash of `ips[..len]`; the map key is its folded 32 bits,
    /// so a key collision between two different stacks is detected.
    pub hash: u64,
    pub len: u32,
    /// Why the walk ended: a [`StackEnd`].
    pub end: u32,
    pub ips: [u64; MAX_FRAMES],
}

/// Why a stack ends where it does.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum StackEnd {
    /// At the outermost frame: the whole chain is there.
    Complete = 0,
    /// The next frame had no call-frame information, or lay outside every
    /// known executable mapping.
    #[cfg_attr(feature = "serde", serde(rename = "no_unwind_info"))]
    NoInfo = 1,
    /// A rule the walk does not follow, or unreadable stack memory.
    #[cfg_attr(feature = "serde", serde(rename = "unwind_failed"))]
    Failed = 2,
    /// [`MAX_FRAMES`] reached.
    #[cfg_attr(feature = "serde", serde(rename = "depth_limit"))]
    Depth = 3,
    /// No stack was collected at all (a report's word for [`NO_STACK`];
    /// the programs never store it).
    Unavailable = 4,
}

impl StackEnd {
    pub const fn from_u32(value: u32) -> Self {
        match value {
            1 => StackEnd::NoInfo,
            2 => StackEnd::Failed,
            3 => StackEnd::Depth,
            4 => StackEnd::Unavailable,
            _ => StackEnd::Complete,
        }
    }

    /// The name used in reports and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            StackEnd::Complete => "complete",
            StackEnd::NoInfo => "no_unwind_info",
            StackEnd::Failed => "unwind_failed",
            StackEnd::Depth => "depth_limit",
            StackEnd::Unavailable => "unavailable",
        }
    }
}

/// How to find the canonical frame address (CFA, the caller's stack pointer)
/// at an address, from its call-frame information.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfaRule {
    /// No call-frame information covers the address.
    NoInfo = 0,
    /// CFA = rsp + offset.
    Rsp = 1,
    /// CFA = rbp + offset.
    Rbp = 2,
    /// The return address is undefined: the outermost frame (_start, a new
    /// thread's clone).
    End = 3,
    /// A rule the programs do not follow (a DWARF expression, another
    /// register); the walk stops there.
    Unsupported = 4,
}

/// Where the caller's rbp is, at an address.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RbpRule {
    /// Unchanged (not yet saved, or restored).
    Same = 0,
    /// Saved at CFA + offset.
    AtCfa = 1,
    /// Not recoverable with our rules: frames above cannot use it.
    Lost = 2,
}

/// One row of an object's unwind table: the rules from `pc` (relative to the
/// object's link-time addresses) up to the next row's `pc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    pub cfa_offset: i32,
    pub rbp_offset: i16,
    /// A [`CfaRule`].
    pub cfa_rule: u8,
    /// An [`RbpRule`].
    pub rbp_rule: u8,
}

impl UnwindRow {
    pub const EMPTY: UnwindRow = UnwindRow {
        pc: 0,
        cfa_offset: 0,
        rbp_offset: 0,
        cfa_rule: CfaRule::NoInfo as u8,
        rbp_rule: RbpRule::Same as u8,
    };
}

/// [`UNWIND_CHUNK_ROWS`] rows; one value of [`MAP_UNWIND_ROWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnwindChunk {
    pub rows: [UnwindRow; UNWIND_CHUNK_ROWS],
}

/// One executable mapping of the target and where its object's rows are.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Runtime address minus link-time address.
    pub bias: u64,
    /// Index of the object's first row in [`MAP_UNWIND_ROWS`] (global row
    /// index, chunk * [`UNWIND_CHUNK_ROWS`] + row).
    pub first_row: u32,
    /// Number of rows; 0 when the object has no call-frame information.
    pub rows: u32,
    /// [`MAPPING_FRAME_POINTERS`] or 0.
    pub flags: u64,
}

/// Every function of the mapping's object keeps rbp as a frame pointer
/// (checked on all of its call-frame information): frames there are walked
/// by the frame-pointer rule without a row search.
pub const MAPPING_FRAME_POINTERS: u64 = 1;

/// The live mapping set: its `count` of mappings and the publication's
/// `generation`, packed in one u64 (`count << 32 | generation`) so that it
/// is written atomically. The set is `generation & 1`; a probe's cache of
/// resolved addresses is only trusted for the generation it was filled in.
pub type UnwindState = u64;
