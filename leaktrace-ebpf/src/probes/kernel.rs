//! Tracepoints, the kernel's side of a thread's life (there are no kprobes
//! here): sched_process_fork names the new thread's kernel tid to the
//! pthread_create in flight, sched_process_exit marks it exited, and
//! sched_process_exec says the target runs a new program.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::warn;
use leaktrace_common::{
    CallKind, ThreadInfo, CHANGE_EXEC, NO_STACK, THREAD_DETACHED, THREAD_EXITED, THREAD_REGISTERED,
};

use super::Result;
use crate::{
    changes::mappings_changed,
    maps::{config, THREADS},
    record::{forget_pending, forget_thread, in_flight, target_tid, SiteEvent},
};

/// sched:sched_process_fork, in the parent: `child_pid` at the offset the
/// loader read from the tracepoint's format file.
#[tracepoint]
pub fn kernel_sched_process_fork(ctx: TracePointContext) -> u32 {
    let _ = try_kernel_sched_process_fork(&ctx);
    0
}

fn try_kernel_sched_process_fork(ctx: &TracePointContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let pending = in_flight(tid).ok_or(())?;
    if pending.kind != CallKind::ThreadCreate as u32 {
        return Ok(());
    }
    let offset = config().fork_child_pid_offset as usize;
    // SAFETY: reads the tracepoint record with bpf_probe_read_kernel.
    let read = unsafe { ctx.read_at::<i32>(offset) };
    if !matches!(read, Ok(child) if child > 0) {
        // The loader misread the record's layout from the format file.
        warn!(ctx, "sched_process_fork: no thread id at child_pid's offset {}", offset);
    }
    let child = read.map_err(|_| ())?;
    pending.child = child as u32;
    let info = ThreadInfo { site: NO_STACK, ..ThreadInfo::default() };
    let _ = THREADS.insert(child as u32, info, BPF_NOEXIST.into());
    Ok(())
}

/// sched:sched_process_exit, in the exiting thread.
#[tracepoint]
pub fn kernel_sched_process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_kernel_sched_process_exit(&ctx);
    0
}

fn try_kernel_sched_process_exit(_ctx: &TracePointContext) -> Result {
    let tid = target_tid().ok_or(())?;
    forget_pending(tid);
    let info = THREADS.get_ptr_mut(tid).ok_or(())?;
    // SAFETY: a pointer from a successful lookup, valid for this run.
    let info = unsafe { &mut *info };
    info.state |= THREAD_EXITED;
    let done = THREAD_REGISTERED | THREAD_DETACHED;
    if info.state & done == done {
        let gone = *info;
        forget_thread(tid, &gone, SiteEvent::DetachedExited);
    }
    Ok(())
}

/// sched:sched_process_exec, in the task that exec'd, its new program
/// mapped: its first instruction has not run yet.
#[tracepoint]
pub fn kernel_sched_process_exec(ctx: TracePointContext) -> u32 {
    let _ = try_kernel_sched_process_exec(&ctx);
    0
}

fn try_kernel_sched_process_exec(_ctx: &TracePointContext) -> Result {
    target_tid().ok_or(())?;
    mappings_changed(CHANGE_EXEC);
    Ok(())
}
