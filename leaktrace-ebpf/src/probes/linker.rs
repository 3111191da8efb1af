//! The dynamic linker's hook for debuggers: wakes the loader when the
//! target's loaded objects change, so that the unwind tables of a new
//! library are published at once rather than at the next poll.

use aya_ebpf::{macros::uprobe, programs::ProbeContext};

use super::Result;
use crate::{maps::LINK_MAP_CHANGES, record::target_tid};

/// void _dl_debug_state(void);
///
/// The dynamic linker calls it (r_brk, the debuggers' hook) after each
/// change to the target's loaded objects: dlopen, dlclose, start-up.
#[uprobe]
pub fn linker_enter_dl_debug_state(ctx: ProbeContext) -> u32 {
    let _ = try_linker_enter_dl_debug_state(&ctx);
    0
}

fn try_linker_enter_dl_debug_state(_ctx: &ProbeContext) -> Result {
    target_tid().ok_or(())?;
    // A full buffer already holds a wake-up.
    let _ = LINK_MAP_CHANGES.output::<u32>(&1, 0);
    Ok(())
}
