//! What a program reads from its context: the probed function's arguments
//! and the user registers of the probed thread.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    programs::ProbeContext,
    EbpfContext,
};

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

/// Where the current thread was in user space when it entered the kernel
/// (a system call, a fault, an interrupt), from the registers the kernel
/// saved on entry: for programs that do not run on a user context
/// (tracepoints). `None` for a kernel thread or an unreadable save area.
#[inline(always)]
pub fn user_frame_of_current() -> Option<(u64, u64, u64)> {
    // SAFETY: bpf_get_current_task_btf has no preconditions, and its result
    // is the task bpf_task_pt_regs expects.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    if regs.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the addresses it reads; these are
    // fields of the saved registers the kernel gave us.
    let (ip, sp, bp) = unsafe {
        (
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rip)).ok()?,
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rsp)).ok()?,
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rbp)).ok()?,
        )
    };
    // Kernel threads have no user side: their saved ip is 0 or a kernel one.
    (ip != 0 && ip < USER_END).then_some((ip, sp, bp))
}

/// Addresses below this are user space (x86-64, 4-level page tables and 5).
const USER_END: u64 = 0x0100_0000_0000_0000;
