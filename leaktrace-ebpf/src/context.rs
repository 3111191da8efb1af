//! What a program reads from its context: the probed function's arguments
//! and the user registers of the probed thread.

use aya_ebpf::{bindings::pt_regs, programs::ProbeContext, EbpfContext};

/// The `n`-th integer or pointer argument of the probed function (rdi, rsi,
/// rdx, rcx, r8, r9), as a u64. Valid at a function's entry only.
#[inline(always)]
pub fn arg(ctx: &ProbeContext, n: usize) -> Result<u64, ()> {
    ctx.arg::<u64>(n).ok_or(())
}

/// The user registers of the probed thread.
#[inline(always)]
fn regs<C: EbpfContext>(ctx: &C) -> *const pt_regs {
    ctx.as_ptr().cast::<pt_regs>()
}

/// The probed thread's stack pointer.
#[inline(always)]
pub fn stack_pointer<C: EbpfContext>(ctx: &C) -> u64 {
    let regs = regs(ctx);
    // SAFETY: the context of a (u)probe program is the user pt_regs, which
    // the verifier lets the program read directly.
    unsafe { (*regs).rsp }
}

/// Where the probed thread is: its instruction, stack and frame pointers.
#[inline(always)]
pub fn frame<C: EbpfContext>(ctx: &C) -> (u64, u64, u64) {
    let regs = regs(ctx);
    // SAFETY: as in `stack_pointer`.
    unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) }
}
