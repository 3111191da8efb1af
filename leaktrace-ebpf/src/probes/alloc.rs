//! Probes on the heap API: the malloc family, realloc, posix_memalign and
//! free. Entry probes remember the request, return probes record the result
//! with the caller's stack.
//!
//! One program serves every function of one C prototype: the loader attaches
//! `alloc_enter_malloc` to malloc, valloc and pvalloc, for example.

use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{window_is_open, CallKind, Lost};

use super::Result;
use crate::{
    context::{arg, stack_pointer},
    maps::count_lost,
    record::{enter, exit, record_alloc, release, target_tid},
};

/// `a * b`, or `u64::MAX` on overflow. Done in 32-bit halves: LLVM turns
/// `checked_mul` (and a division check) into a 128-bit multiply, which BPF
/// does not have.
#[inline(always)]
fn mul(a: u64, b: u64) -> u64 {
    let (small, big) = if a < b { (a, b) } else { (b, a) };
    if small >> 32 != 0 {
        return u64::MAX;
    }
    let high = (big >> 32) * small;
    if high >> 32 != 0 {
        return u64::MAX;
    }
    let low = (big & 0xffff_ffff) * small;
    let product = (high << 32).wrapping_add(low);
    if product < low {
        u64::MAX
    } else {
        product
    }
}

/// void *malloc(size_t size); also valloc and pvalloc.
#[uprobe]
pub fn alloc_enter_malloc(ctx: ProbeContext) -> u32 {
    let _ = try_alloc_enter_malloc(&ctx);
    0
}

fn try_alloc_enter_malloc(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let _ = enter(ctx, tid, CallKind::Alloc, arg(ctx, 0)?, 0);
    Ok(())
}

/// void *calloc(size_t nmemb, size_t size);
#[uprobe]
pub fn alloc_enter_calloc(ctx: ProbeContext) -> u32 {
    let _ = try_alloc_enter_calloc(&ctx);
    0
}

fn try_alloc_enter_calloc(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    // An overflowing product makes calloc fail; record the call anyway so
    // its return is matched, with a size no allocation can have.
    let size = mul(arg(ctx, 0)?, arg(ctx, 1)?);
    let _ = enter(ctx, tid, CallKind::Alloc, size, 0);
    Ok(())
}

/// void *memalign(size_t alignment, size_t size); also aligned_alloc.
#[uprobe]
pub fn alloc_enter_memalign(ctx: ProbeContext) -> u32 {
    let _ = try_alloc_enter_memalign(&ctx);
    0
}

fn try_alloc_enter_memalign(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let _ = enter(ctx, tid, CallKind::Alloc, arg(ctx, 1)?, 0);
    Ok(())
}

/// Return of void *malloc(size_t size), and of every function that returns
/// the new block or NULL (calloc, memalign, operator new, ...).
#[uretprobe]
pub fn alloc_exit_malloc(ctx: RetProbeContext) -> u32 {
    let _ = try_alloc_exit_malloc(&ctx);
    0
}

fn try_alloc_exit_malloc(ctx: &RetProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let pending = exit(ctx, tid).ok_or(())?;
    let addr: u64 = ctx.ret();
    record_alloc(ctx, addr, pending.size);
    Ok(())
}

/// void *realloc(void *ptr, size_t size);
#[uprobe]
pub fn alloc_enter_realloc(ctx: ProbeContext) -> u32 {
    let _ = try_alloc_enter_realloc(&ctx);
    0
}

fn try_alloc_enter_realloc(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let _ = enter(ctx, tid, CallKind::Realloc, arg(ctx, 1)?, arg(ctx, 0)?);
    Ok(())
}

/// void *reallocarray(void *ptr, size_t nmemb, size_t size);
#[uprobe]
pub fn alloc_enter_reallocarray(ctx: ProbeContext) -> u32 {
    let _ = try_alloc_enter_reallocarray(&ctx);
    0
}

fn try_alloc_enter_reallocarray(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let size = mul(arg(ctx, 1)?, arg(ctx, 2)?);
    let _ = enter(ctx, tid, CallKind::Realloc, size, arg(ctx, 0)?);
    Ok(())
}

/// Rust: void *__rust_realloc(void *ptr, size_t old_size, size_t align, size_t new_size);
#[uprobe]
pub fn alloc_enter_rust_realloc(ctx: ProbeContext) -> u32 {
    let _ = try_alloc_enter_rust_realloc(&ctx);
    0
}

fn try_alloc_enter_rust_realloc(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let _ = enter(ctx, tid, CallKind::Realloc, arg(ctx, 3)?, arg(ctx, 0)?);
    Ok(())
}

/// Return of void *realloc(void *ptr, size_t size), and of reallocarray and
/// __rust_realloc: the record moves to the new block and is charged to this
/// call's stack. realloc(NULL, n) allocates, realloc(p, 0) returning NULL
/// frees, any other NULL is a failure that leaves the old block (and its
/// record) alone. Entered between sampling windows (its probes stay on: it
/// frees; its record carries the window), the new block is kept only if
/// the old one was: else every realloc would
/// be tracked and scaled as a sample (redis's outstanding memory came out
/// 35x too high).
#[uretprobe]
pub fn alloc_exit_realloc(ctx: RetProbeContext) -> u32 {
    let _ = try_alloc_exit_realloc(&ctx);
    0
}

fn try_alloc_exit_realloc(ctx: &RetProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let pending = exit(ctx, tid).ok_or(())?;
    let new: u64 = ctx.ret();
    let old = pending.arg;
    if new == 0 {
        if pending.size == 0 && old != 0 {
            release(ctx, old, None);
        }
        return Ok(());
    }
    let tracked = old != 0 && release(ctx, old, None);
    if !tracked && !window_is_open(pending.window) {
        return Ok(());
    }
    record_alloc(ctx, new, pending.size);
    Ok(())
}

/// int posix_memalign(void **memptr, size_t alignment, size_t size);
#[uprobe]
pub fn alloc_enter_posix_memalign(ctx: ProbeContext) -> u32 {
    let _ = try_alloc_enter_posix_memalign(&ctx);
    0
}

fn try_alloc_enter_posix_memalign(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let _ = enter(ctx, tid, CallKind::PosixMemalign, arg(ctx, 2)?, arg(ctx, 0)?);
    Ok(())
}

/// Return of int posix_memalign(void **memptr, size_t alignment, size_t size):
/// on success (0) the new block is in `*memptr`.
#[uretprobe]
pub fn alloc_exit_posix_memalign(ctx: RetProbeContext) -> u32 {
    let _ = try_alloc_exit_posix_memalign(&ctx);
    0
}

fn try_alloc_exit_posix_memalign(ctx: &RetProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let pending = exit(ctx, tid).ok_or(())?;
    let status: i32 = ctx.ret();
    if status != 0 {
        return Ok(());
    }
    // SAFETY: bpf_probe_read_user checks the user address itself.
    let addr = match unsafe { bpf_probe_read_user(pending.arg as *const u64) } {
        Ok(addr) => addr,
        Err(_) => {
            count_lost(Lost::ReadFailed);
            return Err(());
        }
    };
    record_alloc(ctx, addr, pending.size);
    Ok(())
}

/// void free(void *ptr);
///
/// The loader may place this probe past a leading `test %rdi,%rdi`: the
/// kernel emulates jumps but single-steps a test, 25x dearer here, and
/// `ptr` is still in rdi there.
#[uprobe]
pub fn alloc_enter_free(ctx: ProbeContext) -> u32 {
    let _ = try_alloc_enter_free(&ctx);
    0
}

fn try_alloc_enter_free(ctx: &ProbeContext) -> Result {
    target_tid().ok_or(())?;
    // At the entry (or past a leading test): the return address at sp.
    release(ctx, arg(ctx, 0)?, Some(stack_pointer(ctx)));
    Ok(())
}
