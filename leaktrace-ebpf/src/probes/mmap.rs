//! Probes on mmap, munmap and mremap: anonymous mappings the program makes
//! to hold data. Thread stacks (MAP_STACK) belong to the thread tracer, file
//! mappings are not heap, mappings made inside malloc are nested calls that
//! the malloc record already covers, and address-space reservations
//! (PROT_NONE or MAP_NORESERVE, as glibc makes for a new arena, even from
//! inside free) hold no memory until the allocator commits them.
//!
//! Mappings are kept apart from heap blocks because they can be unmapped in
//! part: munmap of a region's start is handled here, anything else the
//! collector reconciles against /proc/PID/maps.

use aya_ebpf::{
    bindings::BPF_ANY,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{AllocInfo, CallKind, Lost};

use super::Result;
use crate::{
    context::{arg, stack_pointer},
    maps::{config, count_lost, MMAPS},
    record::{current_epoch, enter, exit, in_flight, size_wanted, target_tid},
    unwind::stack_id,
};

const PROT_NONE: u64 = 0;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_NORESERVE: u64 = 0x4000;
const MAP_STACK: u64 = 0x20000;
const MAP_FAILED: u64 = u64::MAX;
const PAGE_SIZE: u64 = 4096;

#[inline(always)]
fn page_align(len: u64) -> u64 {
    len.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

#[inline(always)]
fn insert(addr: u64, info: AllocInfo) {
    if MMAPS.insert(addr, info, BPF_ANY.into()).is_err() {
        count_lost(Lost::MmapMapFull);
    }
}

/// void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset);
#[uprobe]
pub fn mmap_enter_mmap(ctx: ProbeContext) -> u32 {
    let _ = try_mmap_enter_mmap(&ctx);
    0
}

fn try_mmap_enter_mmap(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let prot = arg(ctx, 2)?;
    let flags = arg(ctx, 3)?;
    // Untracked mappings still get a record, so the return is matched and
    // a nested call inside them is seen as nested.
    let tracked =
        flags & MAP_ANONYMOUS != 0 && flags & (MAP_STACK | MAP_NORESERVE) == 0 && prot != PROT_NONE;
    let kind = if tracked { CallKind::Mmap } else { CallKind::MmapIgnored };
    let len = page_align(arg(ctx, 1)?);
    if flags & MAP_STACK != 0 {
        note_thread_stack(ctx, tid, len);
    }
    let _ = enter(ctx, tid, kind, len, 0);
    Ok(())
}

/// A thread stack mapped inside pthread_create: remember its size for the
/// thread about to be created.
#[inline(always)]
fn note_thread_stack(ctx: &ProbeContext, tid: u32, len: u64) {
    if let Some(outer) = in_flight(tid) {
        if outer.kind == CallKind::ThreadCreate as u32 && outer.sp > stack_pointer(ctx) {
            outer.size = len;
        }
    }
}

/// Return of void *mmap(void *addr, size_t length, int prot, int flags, int fd,
/// off_t offset): the new mapping, or MAP_FAILED.
#[uretprobe]
pub fn mmap_exit_mmap(ctx: RetProbeContext) -> u32 {
    let _ = try_mmap_exit_mmap(&ctx);
    0
}

fn try_mmap_exit_mmap(ctx: &RetProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let pending = exit(ctx, tid).ok_or(())?;
    let addr: u64 = ctx.ret();
    let config = config();
    if pending.kind != CallKind::Mmap as u32
        || addr == MAP_FAILED
        || !size_wanted(pending.size, &config)
    {
        return Ok(());
    }
    let info =
        AllocInfo { size: pending.size, stack_id: stack_id(ctx), epoch: current_epoch(&config) };
    insert(addr, info);
    Ok(())
}

/// int munmap(void *addr, size_t length);
#[uprobe]
pub fn mmap_enter_munmap(ctx: ProbeContext) -> u32 {
    let _ = try_mmap_enter_munmap(&ctx);
    0
}

fn try_mmap_enter_munmap(ctx: &ProbeContext) -> Result {
    target_tid().ok_or(())?;
    let addr = arg(ctx, 0)?;
    let len = page_align(arg(ctx, 1)?);
    // SAFETY: copied out at once.
    let Some(info) = (unsafe { MMAPS.get(addr) }).copied() else {
        return Ok(());
    };
    let _ = MMAPS.remove(addr);
    if len < info.size {
        // The head is unmapped: the rest stays live.
        insert(addr + len, AllocInfo { size: info.size - len, ..info });
    }
    Ok(())
}

/// void *mremap(void *old_address, size_t old_size, size_t new_size, int flags, ...);
#[uprobe]
pub fn mmap_enter_mremap(ctx: ProbeContext) -> u32 {
    let _ = try_mmap_enter_mremap(&ctx);
    0
}

fn try_mmap_enter_mremap(ctx: &ProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let _ = enter(ctx, tid, CallKind::Mremap, page_align(arg(ctx, 2)?), arg(ctx, 0)?);
    Ok(())
}

/// Return of void *mremap(void *old_address, size_t old_size, size_t new_size,
/// int flags, ...): a tracked mapping keeps its stack and age when it moves
/// or resizes.
#[uretprobe]
pub fn mmap_exit_mremap(ctx: RetProbeContext) -> u32 {
    let _ = try_mmap_exit_mremap(&ctx);
    0
}

fn try_mmap_exit_mremap(ctx: &RetProbeContext) -> Result {
    let tid = target_tid().ok_or(())?;
    let pending = exit(ctx, tid).ok_or(())?;
    let new: u64 = ctx.ret();
    if new == MAP_FAILED {
        return Ok(());
    }
    // SAFETY: copied out at once.
    let Some(info) = (unsafe { MMAPS.get(pending.arg) }).copied() else {
        return Ok(());
    };
    let _ = MMAPS.remove(pending.arg);
    insert(new, AllocInfo { size: pending.size, ..info });
    Ok(())
}
