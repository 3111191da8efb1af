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

/// Words of user stack a walk reads at once into a [`StackWindow`].
pub const WINDOW_WORDS: usize = 32;

/// A piece of the user stack a walk read in one helper call, per CPU: a
/// read of user memory costs ~50 ns whatever its size up to a few hundred
/// bytes, and a walk's frames mostly lie within a few hundred bytes of
/// each other. In a map, not on the program's stack: the verifier tracks
/// every slot of a stack buffer, and a window there multiplied its work
/// tenfold. Per CPU, so a walk checks no other walk ran on its CPU in the
/// middle of it (`started`), since the program may be preempted.
#[repr(C)]
pub struct StackWindow {
    /// Walks started on this CPU: each walk's ticket.
    pub started: u64,
    /// The ticket of the walk whose words these are.
    pub owner: u64,
    /// The ticket of a walk that could not read a window (its stack's top
    /// is near): the rest of that walk reads word by word.
    pub failed: u64,
    /// The user address of `words[0]`.
    pub base: u64,
    /// Where a frame's two words are in `words` (see `frame_words`).
    pub indices: [u64; 2],
    pub words: [u64; WINDOW_WORDS],
}
