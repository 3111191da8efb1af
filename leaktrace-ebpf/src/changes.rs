//! Telling the loader that the target's mappings changed, and holding the
//! target there when the loader asked for it (`CONFIG_HOLD`).

use aya_ebpf::helpers::{bpf_ktime_get_ns, bpf_send_signal};
use leaktrace_common::{MappingsChanged, CONFIG_HOLD};

use crate::maps::{config, LINK_MAP_CHANGES};

const SIGSTOP: u32 = 19;

/// Wake the loader with `cause`; with `CONFIG_HOLD`, stop the target's
/// process as it returns to user space, until the loader has published its
/// new mappings and sent SIGCONT.
#[inline(always)]
pub fn mappings_changed(cause: u32) {
    let held = config().flags & CONFIG_HOLD != 0
        // SAFETY: signals the current task's process, the target's.
        && unsafe { bpf_send_signal(SIGSTOP) } == 0;
    // SAFETY: reads the clock.
    let time_ns = unsafe { bpf_ktime_get_ns() };
    let record = MappingsChanged { cause, held: u32::from(held), time_ns };
    // A full buffer already holds a wake-up.
    let _ = LINK_MAP_CHANGES.output::<MappingsChanged>(&record, 0);
}
