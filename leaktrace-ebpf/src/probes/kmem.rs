//! Kernel allocations, from the kmem and percpu tracepoints (there are no
//! kprobes here): each allocation still outstanding, with its kernel stack,
//! the process in whose context it was made and, for `-p --kernel`, the
//! user stack that entered the kernel. Frees are taken from every context:
//! an object allocated by the target is often freed by an RCU callback or a
//! kernel worker.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::tracepoint,
    programs::{tracing::StackIdContext, TracePointContext},
    EbpfContext,
};
use leaktrace_common::{
    is_sampled, CacheName, KernelAlloc, KernelKind, KmemConfig, KmemField, Lost, KMEM_ON,
    KMEM_PERCPU, KMEM_TARGET, NO_FIELD, NO_KERNEL_STACK, NO_STACK, PAGE_KEY, PERCPU_KEY,
};

use super::Result;
use crate::{
    context::user_frame_of_current,
    maps::{
        config, count_lost, kmem_config, KERNEL_ALLOCS, KERNEL_CACHES, KERNEL_COUNTS, KERNEL_STACKS,
    },
    record::{size_wanted, target_tid},
    unwind::stack_id_at,
};

/// The page allocator's migrate type of user memory and the page cache.
const MIGRATE_MOVABLE: i32 = 1;

/// A field of the tracepoint's record, at the offset the loader read from
/// its format file.
#[inline(always)]
fn field<T>(ctx: &TracePointContext, kmem: &KmemConfig, which: KmemField) -> Option<T> {
    let offset = kmem.offsets[which as usize];
    if offset == NO_FIELD {
        return None;
    }
    // SAFETY: reads the tracepoint record with bpf_probe_read_kernel.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

/// Whether this event's context is one whose allocations are kept.
#[inline(always)]
fn wanted_context(kmem: &KmemConfig) -> Option<u32> {
    if kmem.flags & KMEM_ON == 0 {
        return None;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if kmem.flags & KMEM_TARGET != 0 {
        target_tid()?;
    } else if tgid == kmem.own_tgid {
        return None;
    }
    Some(tgid)
}

/// Record an allocation of `size` bytes under `key`. Returns the kernel
/// stack id it was charged to.
#[inline(always)]
fn record(
    ctx: &TracePointContext,
    kmem: &KmemConfig,
    tgid: u32,
    key: u64,
    size: u64,
    kind: KernelKind,
) -> Option<i32> {
    let config = config();
    if !size_wanted(size, &config) || !is_sampled(key, kmem.sample_rate) {
        return None;
    }
    let kernel_stack = match ctx.get_stackid(&KERNEL_STACKS, 0) {
        Ok(id) => id as i32,
        Err(_) => {
            count_lost(Lost::KernelStack);
            NO_KERNEL_STACK
        }
    };
    count_allocation(kernel_stack);
    let user_stack = if kmem.flags & KMEM_TARGET != 0 {
        match user_frame_of_current() {
            Some((ip, sp, bp)) => stack_id_at(ctx, ip, sp, bp),
            None => NO_STACK,
        }
    } else {
        NO_STACK
    };
    let alloc = KernelAlloc {
        size,
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        kernel_stack,
        user_stack,
        tgid,
        kind: kind as u32,
    };
    // BPF_ANY: an address still in the books was freed in a way not traced
    // (or before a sampled-out free); the new allocation replaces it.
    if KERNEL_ALLOCS.insert(key, alloc, BPF_ANY.into()).is_err() {
        count_lost(Lost::KernelAllocMapFull);
        return None;
    }
    Some(kernel_stack)
}

/// One more allocation at `kernel_stack`, on this CPU.
#[inline(always)]
fn count_allocation(kernel_stack: i32) {
    match KERNEL_COUNTS.get_ptr_mut(kernel_stack) {
        // SAFETY: a pointer from a successful lookup in a per-CPU map,
        // valid for this program run and written by this CPU only.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = KERNEL_COUNTS.insert(kernel_stack, 1u64, BPF_NOEXIST.into());
        }
    }
}

/// Forget the allocation whose key is `field` of the record, tagged with
/// `tag`, when the programs are on (`on`: the `KMEM_*` bit needed).
#[inline(always)]
fn release(ctx: &TracePointContext, field_of: KmemField, tag: u64, on: u32) -> u32 {
    let kmem = kmem_config();
    if kmem.flags & on != 0 {
        if let Some(key) = field::<u64>(ctx, &kmem, field_of) {
            let _ = KERNEL_ALLOCS.remove(key | tag);
        }
    }
    0
}

/// kmem:kmalloc.
#[tracepoint]
pub fn kmem_kmalloc(ctx: TracePointContext) -> u32 {
    let _ = try_kmalloc(&ctx);
    0
}

fn try_kmalloc(ctx: &TracePointContext) -> Result {
    let kmem = kmem_config();
    let tgid = wanted_context(&kmem).ok_or(())?;
    let ptr: u64 = field(ctx, &kmem, KmemField::KmallocPtr).ok_or(())?;
    let bytes: u64 = field(ctx, &kmem, KmemField::KmallocBytes).ok_or(())?;
    if ptr == 0 {
        return Ok(());
    }
    record(ctx, &kmem, tgid, ptr, bytes, KernelKind::Kmalloc);
    Ok(())
}

/// kmem:kmem_cache_alloc: the cache's name is kept once per kernel stack.
#[tracepoint]
pub fn kmem_cache_alloc(ctx: TracePointContext) -> u32 {
    let _ = try_cache_alloc(&ctx);
    0
}

fn try_cache_alloc(ctx: &TracePointContext) -> Result {
    let kmem = kmem_config();
    let tgid = wanted_context(&kmem).ok_or(())?;
    let ptr: u64 = field(ctx, &kmem, KmemField::CacheAllocPtr).ok_or(())?;
    let bytes: u64 = field(ctx, &kmem, KmemField::CacheAllocBytes).ok_or(())?;
    if ptr == 0 {
        return Ok(());
    }
    let stack = record(ctx, &kmem, tgid, ptr, bytes, KernelKind::Slab).ok_or(())?;
    // SAFETY: a lookup whose result is only tested.
    if stack == NO_KERNEL_STACK || unsafe { KERNEL_CACHES.get(stack) }.is_some() {
        return Ok(());
    }
    // `name` is a __data_loc: its low 16 bits are the string's offset in
    // the record.
    let location: u32 = field(ctx, &kmem, KmemField::CacheAllocName).ok_or(())?;
    let mut name = CacheName { bytes: [0; 32] };
    let at = (ctx.as_ptr() as usize + (location & 0xffff) as usize) as *const u8;
    // SAFETY: the helper bounds the read by the buffer and checks the source.
    unsafe { bpf_probe_read_kernel_str_bytes(at, &mut name.bytes) }.map_err(|_| ())?;
    let _ = KERNEL_CACHES.insert(stack, name, BPF_NOEXIST.into());
    Ok(())
}

/// kmem:kfree.
#[tracepoint]
pub fn kmem_kfree(ctx: TracePointContext) -> u32 {
    release(&ctx, KmemField::KfreePtr, 0, KMEM_ON)
}

/// kmem:kmem_cache_free.
#[tracepoint]
pub fn kmem_cache_free(ctx: TracePointContext) -> u32 {
    release(&ctx, KmemField::CacheFreePtr, 0, KMEM_ON)
}

/// kmem:mm_page_alloc: unmovable pages only (movable ones are user memory
/// or the page cache, in the process picture already).
#[tracepoint]
pub fn kmem_mm_page_alloc(ctx: TracePointContext) -> u32 {
    let _ = try_page_alloc(&ctx);
    0
}

fn try_page_alloc(ctx: &TracePointContext) -> Result {
    let kmem = kmem_config();
    let tgid = wanted_context(&kmem).ok_or(())?;
    let migratetype: i32 = field(ctx, &kmem, KmemField::PageAllocMigratetype).ok_or(())?;
    if migratetype == MIGRATE_MOVABLE {
        return Ok(());
    }
    let pfn: u64 = field(ctx, &kmem, KmemField::PageAllocPfn).ok_or(())?;
    let order: u32 = field(ctx, &kmem, KmemField::PageAllocOrder).ok_or(())?;
    if pfn == u64::MAX || order > 20 {
        return Ok(());
    }
    record(ctx, &kmem, tgid, pfn | PAGE_KEY, kmem.page_size << order, KernelKind::Page);
    Ok(())
}

/// kmem:mm_page_free.
#[tracepoint]
pub fn kmem_mm_page_free(ctx: TracePointContext) -> u32 {
    release(&ctx, KmemField::PageFreePfn, PAGE_KEY, KMEM_ON)
}

/// kmem:mm_page_free_batched (order-0 pages freed in a batch).
#[tracepoint]
pub fn kmem_mm_page_free_batched(ctx: TracePointContext) -> u32 {
    release(&ctx, KmemField::PageFreeBatchedPfn, PAGE_KEY, KMEM_ON)
}

/// percpu:percpu_alloc_percpu (`--percpu`).
#[tracepoint]
pub fn kmem_percpu_alloc(ctx: TracePointContext) -> u32 {
    let _ = try_percpu_alloc(&ctx);
    0
}

fn try_percpu_alloc(ctx: &TracePointContext) -> Result {
    let kmem = kmem_config();
    if kmem.flags & KMEM_PERCPU == 0 {
        return Ok(());
    }
    let tgid = wanted_context(&kmem).ok_or(())?;
    let ptr: u64 = field(ctx, &kmem, KmemField::PercpuAllocPtr).ok_or(())?;
    let bytes: u64 = field(ctx, &kmem, KmemField::PercpuAllocBytes).ok_or(())?;
    if ptr == 0 {
        return Ok(());
    }
    record(ctx, &kmem, tgid, ptr | PERCPU_KEY, bytes, KernelKind::Percpu);
    Ok(())
}

/// percpu:percpu_free_percpu.
#[tracepoint]
pub fn kmem_percpu_free(ctx: TracePointContext) -> u32 {
    release(&ctx, KmemField::PercpuFreePtr, PERCPU_KEY, KMEM_PERCPU)
}
