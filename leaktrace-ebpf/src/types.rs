//! Values of the maps the programs keep for themselves: userspace never
//! reads them, so they live here rather than in leaktrace-common.

use leaktrace_common::UnwindRow;

/// One slot of a CPU's `UNWIND_CACHE`: what a walked address resolved to.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedAddress {
    pub addr: u64,
    /// The [`leaktrace_common::UnwindState`] it was resolved under.
    pub state: u64,
    pub row: UnwindRow,
    /// What the address resolved to: one of the kinds in `unwind.rs`.
    pub kind: u32,
    /// Over all of the above: a slot half written when this program was
    /// preempted by another on the same CPU does not match.
    pub check: u64,
}
