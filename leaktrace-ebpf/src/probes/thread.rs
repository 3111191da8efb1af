//! Probes on the pthread API: who creates threads (the creating stack), and
//! whether each is joined or detached. With the exit tracepoint in
//! `probes/kernel.rs` they tell threads piling up alive from threads that exited but
//! were never joined (their stacks stay mapped).

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::bpf_probe_read_user,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{
    CallKind, Lost, ThreadInfo, CONFIG_GLIBC_PTHREAD, THREAD_DETACHED, THREAD_EXITED,
    THREAD_REGISTERED,
};

use super::Result;
use crate::{
    context::arg,
    maps::{config, count_lost, DETACH_ATTRS, PTHREADS, THREADS},
    record::{count_site, enter, exit, forget_thread, in_flight, target_tid, SiteEvent},
    unwind::stack_id,
};

const PTHREAD_CREATE_DETACHED: u32 = 1;
/// glibc's `struct pthread_attr`: `int flags` at 8 (ATTR_FLAG_DETACHSTATE
/// is bit 0), `size_t guardsize` at 16 and `size_t stacksize` at 32 (0: the
/// default). glibc maps the stack size and the guard together.
const GLIBC_ATTR_FLAGS: u64 = 8;
const GLIBC_ATTR_DETACHED: u32 = 1;
const GLIBC_ATTR_GUARDSIZE: u64 = 16;
const GLIBC_ATTR_STACKSIZE: u64 = 32;
const PAGE: u64 = 4096;

/// int pthread_attr_setdetachstate(pthread_attr_t *attr, int detachstate);
#[uprobe]
pub fn thread_enter_pthread_attr_setdetachstate(ctx: ProbeContext) -> u32 {
    let _ = try_thread_enter_pthread_attr_setdetachstate(&ctx);
    0
}

fn try_thread_enter_pthread_attr_setdetachstate(ctx: &ProbeContext) -> Result {
    target_tid().ok_or(())?;
    let _ = DETACH_ATTRS.insert(arg(ctx, 0)?, arg(ctx, 1)? as u32, BPF_ANY.into());
    Ok(())
}

/// int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
///                    void *(*start_routine)(void *), void *arg);
#[uprobe]
pub fn thread_enter_pthread_create(ctx: ProbeContext) -> u32 {
    let _ = try_thread_enter_pthread_create(&ctx);
    0
}

fn try_thread_enter_pthread_create(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let attr = arg(ctx, 1)?;
    // The attribute says it, whenever it was set up: before attach too.
    let (mut detached, stack_size) = match attr {
        0 => (false, 0),
        _ if config().flags & CONFIG_GLIBC_PTHREAD != 0 => glibc_attr(attr),
        _ => (false, 0),
    };
    // SAFETY: copied out at once.
    detached |= attr != 0
        && unsafe { DETACH_ATTRS.get(attr) }.is_some_and(|&state| state == PTHREAD_CREATE_DETACHED);
    // A stack glibc takes from its cache is not mapped again: the size comes
    // from the attribute, or (the default) from the nested mmap if any.
    if !enter(ctx, tid, CallKind::ThreadCreate, stack_size, arg(ctx, 0)?) {
        return Ok(());
    }
    if detached {
        if let Some(pending) = in_flight(tid) {
            pending.flags = THREAD_DETACHED;
        }
    }
    Ok(())
}

/// (detached, stack size) from a glibc `pthread_attr_t`.
#[inline(always)]
fn glibc_attr(attr: u64) -> (bool, u64) {
    // SAFETY: reads of the target's memory, which the helper checks.
    let flags = unsafe { bpf_probe_read_user((attr + GLIBC_ATTR_FLAGS) as *const u32) };
    let size = unsafe { bpf_probe_read_user((attr + GLIBC_ATTR_STACKSIZE) as *const u64) };
    let guard = unsafe { bpf_probe_read_user((attr + GLIBC_ATTR_GUARDSIZE) as *const u64) };
    let size = match size {
        Ok(size) if size > 0 => {
            let round = |bytes: u64| (bytes + PAGE - 1) & !(PAGE - 1);
            round(size) + round(guard.unwrap_or(0))
        }
        _ => 0,
    };
    (flags.is_ok_and(|flags| flags & GLIBC_ATTR_DETACHED != 0), size)
}

/// Return of int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
/// void *(*start_routine)(void *), void *arg): on success (0) the new
/// thread's id is in `*thread`, its kernel tid came from the fork
/// tracepoint, and the stack here starts at pthread_create's caller.
#[uretprobe]
pub fn thread_exit_pthread_create(ctx: RetProbeContext) -> u32 {
    let _ = try_thread_exit_pthread_create(&ctx);
    0
}

fn try_thread_exit_pthread_create(ctx: &RetProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let pending = exit(ctx, tid).ok_or(())?;
    let status: i32 = ctx.ret();
    let child = pending.child;
    if status != 0 || child == 0 {
        if child != 0 {
            let _ = THREADS.remove(child);
        }
        return Ok(());
    }
    // SAFETY: bpf_probe_read_user checks the user address itself.
    let Ok(pthread) = (unsafe { bpf_probe_read_user(pending.arg as *const u64) }) else {
        count_lost(Lost::ReadFailed);
        return Err(());
    };
    let site = stack_id(ctx);
    // The thread may already have run and exited: keep what the tracepoint set.
    // SAFETY: copied out at once.
    let state = unsafe { THREADS.get(child) }.map_or(0, |info| info.state);
    let info = ThreadInfo {
        pthread,
        stack_size: pending.size,
        site,
        state: state | pending.flags | THREAD_REGISTERED,
    };
    count_site(site, SiteEvent::Created);
    if info.state & (THREAD_EXITED | THREAD_DETACHED) == THREAD_EXITED | THREAD_DETACHED {
        count_site(site, SiteEvent::DetachedExited);
        let _ = THREADS.remove(child);
        return Ok(());
    }
    if THREADS.insert(child, info, BPF_ANY.into()).is_err()
        || PTHREADS.insert(pthread, child, BPF_ANY.into()).is_err()
    {
        count_lost(Lost::ThreadMapFull);
    }
    Ok(())
}

/// int pthread_join(pthread_t thread, void **retval); also pthread_tryjoin_np,
/// pthread_timedjoin_np and pthread_clockjoin_np, whose first argument is the same.
#[uprobe]
pub fn thread_enter_pthread_join(ctx: ProbeContext) -> u32 {
    let _ = try_thread_enter_pthread_join(&ctx);
    0
}

fn try_thread_enter_pthread_join(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let _ = enter(ctx, tid, CallKind::ThreadJoin, 0, arg(ctx, 0)?);
    Ok(())
}

/// Return of int pthread_join(pthread_t thread, void **retval), and of the
/// other join variants: on success (0) the thread is gone for good.
#[uretprobe]
pub fn thread_exit_pthread_join(ctx: RetProbeContext) -> u32 {
    let _ = try_thread_exit_pthread_join(&ctx);
    0
}

fn try_thread_exit_pthread_join(ctx: &RetProbeContext) -> Result {
    let child = named_thread(ctx)?;
    // SAFETY: copied out at once.
    let info = *unsafe { THREADS.get(child) }.ok_or(())?;
    forget_thread(child, &info, SiteEvent::Joined);
    Ok(())
}

/// int pthread_detach(pthread_t thread);
#[uprobe]
pub fn thread_enter_pthread_detach(ctx: ProbeContext) -> u32 {
    let _ = try_thread_enter_pthread_detach(&ctx);
    0
}

fn try_thread_enter_pthread_detach(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let _ = enter(ctx, tid, CallKind::ThreadDetach, 0, arg(ctx, 0)?);
    Ok(())
}

/// Return of int pthread_detach(pthread_t thread): on success (0) the thread
/// is forgotten once it exits, or now if it already has.
#[uretprobe]
pub fn thread_exit_pthread_detach(ctx: RetProbeContext) -> u32 {
    let _ = try_thread_exit_pthread_detach(&ctx);
    0
}

fn try_thread_exit_pthread_detach(ctx: &RetProbeContext) -> Result {
    let child = named_thread(ctx)?;
    let info = THREADS.get_ptr_mut(child).ok_or(())?;
    // SAFETY: a pointer from a successful lookup, valid for this run.
    let info = unsafe { &mut *info };
    if info.state & THREAD_EXITED != 0 {
        let gone = *info;
        forget_thread(child, &gone, SiteEvent::DetachedExited);
    } else {
        info.state |= THREAD_DETACHED;
    }
    Ok(())
}

/// The kernel tid of the thread a join or detach named, once it succeeded.
#[inline(always)]
fn named_thread(ctx: &RetProbeContext) -> core::result::Result<u32, ()> {
    let tid = target_tid().ok_or(())?;
    let pending = exit(ctx, tid).ok_or(())?;
    let status: i32 = ctx.ret();
    if status != 0 {
        return Err(());
    }
    // SAFETY: copied out at once.
    unsafe { PTHREADS.get(pending.arg) }.copied().ok_or(())
}
