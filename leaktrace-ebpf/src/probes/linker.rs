//! The dynamic linker's hook for debuggers: wakes the loader when the
//! target's loaded objects change, so that the unwind tables of a new
//! library are published at once rather than at the next poll.

use aya_ebpf::{macros::uprobe, programs::ProbeContext};
use leaktrace_common::CHANGE_LINKER;

use super::Result;
use crate::{changes::mappings_changed, record::target_tid};

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
    mappings_changed(CHANGE_LINKER);
    Ok(())
}
