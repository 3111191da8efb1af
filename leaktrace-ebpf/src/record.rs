//! Bookkeeping shared by the probe families: the target filter, calls in
//! flight between entry and return, the live-allocation records with their
//! per-stack totals, and the threads' records with their per-site counts.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_pidns_info, BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_get_ns_current_pid_tgid, bpf_probe_read_user},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use leaktrace_common::{
    free_stack_sampled, is_sampled, size_class, table_bucket, window_is_open, AllocBucket,
    AllocInfo, CallKind, Config, Lost, Pending, PendingSlot, StackStats, ThreadInfo,
    ThreadSiteStats, TraceEvent, YoungSlot, BUCKET_SLOTS, CONFIG_GLIBC_CHUNKS, CONFIG_PIDNS,
    CONFIG_TRACE, CONFIG_WINDOWS, NO_STACK, PENDING_SLOT_COUNT, PREATTACH_BYTES, PREATTACH_CLASSES,
    PREATTACH_COUNT, PREATTACH_INTERNAL, SLOT_CLAIMED, STACK_SLOT_COUNT, TRACE_ALLOC, TRACE_FREE,
    YOUNG_SLOTS,
};

use crate::{
    atomic,
    context::{frame, stack_pointer},
    maps::{
        config, count_lost, count_preattach, window, worth_logging, ALLOCATOR_TEXT, ALLOCS,
        ALLOC_TABLE, EPOCH, LAST_FREE, PENDING, PENDING_SLOTS, PREATTACH_STACKS, PTHREADS,
        STACK_SLOTS, STACK_STATS, THREADS, THREAD_SITES, TRACE_EVENTS,
    },
    unwind::{stack_id, stack_id_at},
};

/// `Pending::sp` of a thread with no call in flight.
const IDLE: u64 = 0;

/// The thread id when the event comes from the target, `None` otherwise.
/// Probes are attached for the target only; this is the second fence.
///
/// The thread id returned is the kernel's global one in any case: the fork
/// tracepoint names new threads by it, and the maps are keyed by it.
#[inline(always)]
pub fn target_tid() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let config = config();
    if config.flags & CONFIG_PIDNS == 0 {
        return ((pid_tgid >> 32) as u32 == config.tgid).then_some(pid_tgid as u32);
    }
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: `ns` is a valid bpf_pidns_info for the helper to fill.
    let status = unsafe {
        bpf_get_ns_current_pid_tgid(
            config.pidns_dev,
            config.pidns_ino,
            &mut ns,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    (status == 0 && ns.tgid == config.tgid).then_some(pid_tgid as u32)
}

/// Remember an allocator call until its return probe. A call made while
/// another is in flight on this thread (malloc calling mmap, reallocarray
/// calling realloc) is nested: the outer record stays, so the allocation is
/// charged to the caller of the outer function with its real size.
/// Returns whether a new record was made (not a nested call).
///
/// A thread's record (`own_record`) stays between calls, marked idle (sp
/// 0), and is rewritten in place: an update or delete of a hash map
/// element takes its bucket lock and recycles the element, which cost more
/// than the rest of the entry probe. The thread's exit frees it.
#[inline(always)]
pub fn enter(ctx: &ProbeContext, tid: u32, kind: CallKind, size: u64, arg: u64) -> bool {
    let sp = stack_pointer(ctx);
    let window = window(&config());
    let Some(outer) = own_record(tid) else {
        count_lost(Lost::PendingMapFull);
        return false;
    };
    if outer.sp != IDLE && !stale(outer, window) {
        if outer.sp > sp {
            // Nesting is for an allocator inside an allocator. A malloc
            // call inside pthread_create (glibc's loader callocs each new
            // thread's TLS table) is the program's block: kept beside the
            // outer record, taken by its own return (see `exit`). Its stack
            // ends in pthread_create, whose return address is the kernel's
            // uretprobe trampoline while it runs.
            if outer.kind == CallKind::ThreadCreate as u32
                && CallKind::allocates(kind as u32)
                && outer.inner_sp == IDLE
            {
                // SAFETY: as below, this thread's own record.
                unsafe {
                    write_volatile(&raw mut outer.inner_size, size);
                    write_volatile(&raw mut outer.inner_arg, arg);
                    write_volatile(&raw mut outer.inner_kind, kind as u32);
                    write_volatile(&raw mut outer.inner_sp, sp);
                }
                return true;
            }
            return false;
        }
        if outer.sp == sp {
            outer.tail_calls += 1;
            return false;
        }
        // An entry above the recorded frame: that call's return probe
        // never fired (longjmp, or the kernel dropped it).
        count_lost(Lost::MissedReturn);
    }
    // SAFETY: `outer` is this thread's entry, valid for this run.
    // Volatile stores, field by field: LLVM merges adjacent plain stores
    // of zero (malloc's arg and kind are 0) into a call to memset, a BPF
    // function looping over bytes (~15 ns an entry).
    unsafe {
        write_volatile(&raw mut outer.sp, sp);
        write_volatile(&raw mut outer.size, size);
        write_volatile(&raw mut outer.arg, arg);
        write_volatile(&raw mut outer.kind, kind as u32);
        write_volatile(&raw mut outer.child, 0);
        write_volatile(&raw mut outer.flags, 0);
        write_volatile(&raw mut outer.tail_calls, 0);
        write_volatile(&raw mut outer.window, window);
        write_volatile(&raw mut outer.inner_sp, IDLE);
    }
    true
}

/// This thread's record of calls in flight, made idle on its first call:
/// in its slot of `PENDING_SLOTS`, or in `PENDING` if another thread holds
/// the slot.
#[inline(always)]
fn own_record(tid: u32) -> Option<&'static mut Pending> {
    if let Some(record) = own_slot(tid, true) {
        return Some(record);
    }
    let record = match PENDING.get_ptr_mut(tid) {
        Some(record) => record,
        None => {
            // Idle: sp 0.
            PENDING.insert(tid, Pending::default(), BPF_ANY.into()).ok()?;
            PENDING.get_ptr_mut(tid)?
        }
    };
    // SAFETY: a pointer from a successful lookup, valid for this run; only
    // this thread reads or writes its own entry.
    Some(unsafe { &mut *record })
}

/// This thread's slot of `PENDING_SLOTS`, if it holds it; with `claim`,
/// taken when free (by compare-and-exchange: another thread of the same
/// slot may race), unless the thread has a call in flight in `PENDING`
/// (an outer call's record: its idle record there is dropped as it moves).
/// A slot is its thread's until the thread exits (`forget_pending`).
#[inline(always)]
fn own_slot(tid: u32, claim: bool) -> Option<&'static mut Pending> {
    let (slot, held) = pending_slot(tid)?;
    if !held {
        if !claim || slot.owner != 0 {
            return None;
        }
        // SAFETY: copied out at once.
        let kept = unsafe { PENDING.get(tid) }.map(|record| record.sp);
        if kept.is_some_and(|sp| sp != IDLE) {
            return None;
        }
        // SAFETY: an aligned u64 of a map value.
        if !unsafe { atomic::claim(&raw mut slot.owner, u64::from(tid)) } {
            return None;
        }
        if kept.is_some() {
            let _ = PENDING.remove(tid);
        }
        slot.pending.sp = IDLE;
    }
    Some(&mut slot.pending)
}

/// The slot of `PENDING_SLOTS` for `tid`, and whether `tid` holds it.
#[inline(always)]
fn pending_slot(tid: u32) -> Option<(&'static mut PendingSlot, bool)> {
    let slot = PENDING_SLOTS.get_ptr_mut(tid % PENDING_SLOT_COUNT)?;
    // SAFETY: a pointer from a successful lookup in an array, valid for
    // this run; only the holder writes the record, and `owner` changes by
    // compare-and-exchange or by its holder.
    let slot = unsafe { &mut *slot };
    let held = slot.owner == u64::from(tid);
    Some((slot, held))
}

/// The call in flight on this thread, if any: its record, to update.
#[inline(always)]
pub fn in_flight(tid: u32) -> Option<&'static mut Pending> {
    let pending = match own_slot(tid, false) {
        Some(pending) => pending,
        // SAFETY: a pointer from a successful lookup, valid for this run;
        // only this thread reads or writes its own entry.
        None => unsafe { &mut *PENDING.get_ptr_mut(tid)? },
    };
    (pending.sp != IDLE).then_some(pending)
}

/// Whether `record` is a windowed call's from outside the open window
/// `window`: from an earlier window, or made between windows, while the
/// closed window's links were still going (its return probe may have gone
/// first). Such a record is not an outer call: an entry overwrites it (not
/// a missed return: redis under `-s 10` counted a few, which made its
/// report at rest "incomplete"), and its return, if it comes, records
/// nothing.
#[inline(always)]
fn stale(record: &Pending, window: u32) -> bool {
    CallKind::windowed(record.kind) && (record.window != window || !window_is_open(window))
}

/// Take the record of the call whose return probe this is. `None` for the
/// return of a nested call (its sp is not above the outer entry's sp).
///
/// With sampling windows, a return without an entry is the edge of a
/// window (the return probes go in first): not a loss; and a stale record
/// (see [`stale`]) is dropped.
#[inline(always)]
pub fn exit(ctx: &RetProbeContext, tid: u32) -> Option<Pending> {
    let config = config();
    let Some(pending) = in_flight(tid) else {
        if config.flags & CONFIG_WINDOWS == 0 {
            count_lost(Lost::ReturnWithoutEntry);
        }
        return None;
    };
    if stale(pending, window(&config)) {
        pending.sp = IDLE;
        return None;
    }
    let sp = stack_pointer(ctx);
    if pending.inner_sp != IDLE {
        if sp <= pending.inner_sp {
            return None;
        }
        let inner = pending.inner_sp;
        pending.inner_sp = IDLE;
        // Still inside the outer call: the return of the call made in it.
        if sp <= pending.sp {
            return Some(Pending {
                sp: inner,
                size: pending.inner_size,
                arg: pending.inner_arg,
                kind: pending.inner_kind,
                window: pending.window,
                ..Pending::default()
            });
        }
        // Else the outer's own return: the inner one was missed.
    }
    if sp <= pending.sp {
        return None;
    }
    if pending.tail_calls > 0 {
        pending.tail_calls -= 1;
        return None;
    }
    let taken = *pending;
    pending.sp = IDLE;
    Some(taken)
}

/// Forget a thread's record of calls when it exits (in its own context):
/// its slot of `PENDING_SLOTS` is free again.
#[inline(always)]
pub fn forget_pending(tid: u32) {
    if let Some((slot, true)) = pending_slot(tid) {
        slot.pending.sp = IDLE;
        // SAFETY: an aligned u64 of a map value, this thread's.
        unsafe { write_volatile(&raw mut slot.owner, 0) };
    }
    let _ = PENDING.remove(tid);
}

/// The age epoch of an allocation made now.
#[inline(always)]
pub fn current_epoch(config: &Config) -> u32 {
    if config.epoch_ns == 0 {
        return 0;
    }
    EPOCH.get(0).copied().unwrap_or(0)
}

/// Whether an allocation of `size` bytes passes `--min-size`/`--max-size`.
#[inline(always)]
pub fn size_wanted(size: u64, config: &Config) -> bool {
    size >= config.min_size && size <= config.max_size
}

/// Record a new heap allocation at `addr` made from the current stack.
#[inline(always)]
pub fn record_alloc<C: EbpfContext>(ctx: &C, addr: u64, size: u64) {
    let config = config();
    // Sampling skips the dear part (the stack walk and the map insert).
    if addr == 0 || !size_wanted(size, &config) || !is_sampled(addr, config.sample_rate) {
        return;
    }
    let info = AllocInfo { size, stack_id: stack_id(ctx), epoch: current_epoch(&config) };
    let inserted = keep(addr, info, &config);
    if config.flags & CONFIG_TRACE != 0 {
        trace_event(TRACE_ALLOC, addr, size, info.stack_id);
    }
    if !inserted {
        if worth_logging(count_lost(Lost::AllocMapFull)) {
            warn!(
                ctx,
                "the allocation map is full: new allocations go untracked (--max-allocations)"
            );
        }
        return;
    }
    account(info, 1, &config);
}

/// Forget the heap allocation at `addr`, if we recorded it. Frees of memory
/// allocated before attach find nothing, and are counted; with a size filter
/// a block may also have been filtered out, and with sampling windows
/// allocated between windows, so nothing is counted then. Returns whether
/// the block was tracked.
///
/// A free seen at two layers (a wrapper and the allocator it calls or
/// jumps to: `__rust_dealloc` and `free`, `operator delete` and `tc_free`,
/// `realloc(p, 0)` and the `free` inside it) counts once: the second
/// sighting, right after on the same CPU, finds its address in
/// `LAST_FREE` and is dropped (a double free in the target is too).
///
/// `entry_sp`: the stack pointer at the entry of a free function, where
/// its return address is; `None` elsewhere (realloc's return).
#[inline(always)]
pub fn release<C: EbpfContext>(ctx: &C, addr: u64, entry_sp: Option<u64>) -> bool {
    let config = config();
    if addr == 0 {
        return false;
    }
    if !is_sampled(addr, config.sample_rate) {
        if config.flags & CONFIG_TRACE != 0 {
            trace_event(TRACE_FREE, addr, 0, NO_STACK);
        }
        return false;
    }
    let tracked = forget(addr, &config);
    let last = LAST_FREE.get_ptr_mut(0);
    // SAFETY: a per-CPU word of this program run.
    let seen = last.is_some_and(|last| unsafe { *last } == addr);
    if let Some(last) = last {
        // SAFETY: as above.
        unsafe { *last = addr };
    }
    if !tracked && seen {
        return false;
    }
    if config.flags & CONFIG_TRACE != 0 {
        trace_event(TRACE_FREE, addr, 0, NO_STACK);
    }
    if !tracked
        && config.min_size == 0
        && config.max_size == u64::MAX
        && config.flags & CONFIG_WINDOWS == 0
    {
        count_replaced(ctx, addr, entry_sp, &config);
    }
    tracked
}

/// `-t`: one allocation or free for the loader to print; a full buffer
/// loses the line (counted), never the event.
#[inline(always)]
fn trace_event(kind: u32, address: u64, size: u64, stack_id: u32) {
    let tid = bpf_get_current_pid_tgid() as u32;
    let event = TraceEvent { kind, tid, address, size, stack_id, _pad: 0 };
    if TRACE_EVENTS.output::<TraceEvent>(&event, 0).is_err() {
        count_lost(Lost::TraceDropped);
    }
}

/// The `ALLOC_TABLE` bucket of the block at `addr`.
#[inline(always)]
fn bucket(addr: u64, config: &Config) -> Option<&'static mut AllocBucket> {
    // No table (`--max-allocations` below its size): ALLOCS alone.
    if config.table_bits == 0 {
        return None;
    }
    let bucket = ALLOC_TABLE.get_ptr_mut(table_bucket(addr, config.table_bits))?;
    // SAFETY: a pointer from a successful lookup in an array, valid for
    // this program run; its words are changed by compare-and-exchange
    // where programs on other CPUs may race (see `keep` and `forget`).
    Some(unsafe { &mut *bucket })
}

/// Record the block at `addr`: in a free slot of its bucket, or in
/// `ALLOCS` when the bucket is full. Returns whether it was kept.
///
/// A slot is claimed by exchanging its key from 0 to [`SLOT_CLAIMED`], its
/// record written, and only then the address stored: a free of another
/// block never reads a half-written record, and a block is never freed
/// before the allocator's return (where this runs) hands it out.
#[inline(always)]
fn keep(addr: u64, info: AllocInfo, config: &Config) -> bool {
    let mut bucket = bucket(addr, config);
    // The address may be live in our records: its free was missed (it
    // happened in a way we do not probe). The stale record goes first (a
    // scan of the bucket; `ALLOCS` only if the bucket spilled, or without
    // a table).
    let _ = forget_in(bucket.as_deref_mut(), addr, config);
    let Some(bucket) = bucket else {
        return spill(addr, info, None);
    };
    for slot in 0..BUCKET_SLOTS {
        // SAFETY: an aligned u64 of a map value.
        if bucket.keys[slot] != 0
            || !unsafe { atomic::claim(&raw mut bucket.keys[slot], SLOT_CLAIMED) }
        {
            continue;
        }
        // SAFETY: fields of the slot this program claimed; volatile so
        // that they are written before the address that publishes them.
        unsafe {
            write_volatile(&raw mut bucket.infos[slot].size, info.size);
            write_volatile(&raw mut bucket.infos[slot].stack_id, info.stack_id);
            write_volatile(&raw mut bucket.infos[slot].epoch, info.epoch);
        }
        // SAFETY: as above; the claimed slot is this program's alone.
        unsafe { write_volatile(&raw mut bucket.keys[slot], addr) };
        return true;
    }
    spill(addr, info, Some(bucket))
}

/// Record the block at `addr` in `ALLOCS`: its bucket is full, or there
/// is no table. (`keep` forgot any stale record of it first.)
#[inline(always)]
fn spill(addr: u64, info: AllocInfo, bucket: Option<&mut AllocBucket>) -> bool {
    if ALLOCS.insert(addr, info, BPF_ANY.into()).is_err() {
        return false;
    }
    if let Some(bucket) = bucket {
        // SAFETY: an aligned u64 of a map value.
        unsafe { atomic::add(&raw mut bucket.spilled, 1) };
    }
    true
}

/// Forget the record of the block at `addr`, taken off its stack's
/// totals. Whether one was found.
#[inline(always)]
fn forget(addr: u64, config: &Config) -> bool {
    forget_in(bucket(addr, config), addr, config)
}

/// [`forget`], with the address's bucket (`None` without a table).
#[inline(always)]
fn forget_in(bucket: Option<&mut AllocBucket>, addr: u64, config: &Config) -> bool {
    let Some(bucket) = bucket else {
        return forget_spilled(addr, None, config);
    };
    for slot in 0..BUCKET_SLOTS {
        if bucket.keys[slot] != addr {
            continue;
        }
        // Read before the slot is freed: once it is, another block may
        // claim it and write its own record.
        // SAFETY: a slot of the bucket, whose record was written before
        // its address.
        let info = unsafe { read_volatile(&raw const bucket.infos[slot]) };
        // A lost race is a double free in the target: one of us subtracts.
        // SAFETY: an aligned u64 of a map value.
        if unsafe { atomic::compare_exchange(&raw mut bucket.keys[slot], addr, 0) } == addr {
            account(info, -1, config);
        }
        return true;
    }
    if bucket.spilled == 0 {
        return false;
    }
    forget_spilled(addr, Some(bucket), config)
}

/// Forget the record of `addr` in `ALLOCS`, if there is one.
#[inline(always)]
fn forget_spilled(addr: u64, bucket: Option<&mut AllocBucket>, config: &Config) -> bool {
    // SAFETY: copied out at once; a racing free of the same address on
    // another thread is a double free in the target, and at worst makes
    // both of us subtract it.
    let Some(info) = (unsafe { ALLOCS.get(addr) }).copied() else {
        return false;
    };
    if ALLOCS.remove(addr).is_ok() {
        if let Some(bucket) = bucket {
            // SAFETY: an aligned u64 of a map value.
            unsafe { atomic::add(&raw mut bucket.spilled, u64::MAX) };
        }
        account(info, -1, config);
    }
    true
}

/// A block this program never saw allocated is freed: it was allocated
/// before attach (or its allocation was lost, which is counted apart). A
/// structure filled before attach and being replaced (a ring, a pool, an
/// LRU) frees such blocks while its new members pile up in the books; the
/// analysis weighs one against the other, call site by call site, by size
/// class and by the stacks of a sample of these frees.
///
/// A free called from inside glibc's libc is the allocator's own (its
/// thread cache emptied at a thread's exit): counted apart. glibc's chunk
/// header, the 8 bytes before the block, gives its size: a chunk size
/// with 3 flag bits, the header itself (and the footer of an mmapped
/// chunk) not usable.
#[inline(always)]
fn count_replaced<C: EbpfContext>(ctx: &C, addr: u64, entry_sp: Option<u64>, config: &Config) {
    // The free's caller, from its return address at the entry's sp.
    let caller = entry_sp.and_then(|sp| {
        // SAFETY: a read of the target's memory, which the helper checks.
        unsafe { bpf_probe_read_user(sp as *const u64) }.ok().map(|ip| (ip, sp + 8))
    });
    if let (Some((ip, _)), Some(text)) = (caller, ALLOCATOR_TEXT.get(0)) {
        if text.start <= ip && ip < text.end {
            count_preattach(PREATTACH_INTERNAL, 1);
            return;
        }
    }
    count_preattach(PREATTACH_COUNT, 1);
    if let Some((ip, sp)) = caller {
        if free_stack_sampled(addr) {
            let (_, _, bp) = frame(ctx);
            let stack = stack_id_at(ctx, ip, sp, bp);
            if stack != NO_STACK {
                count_free_stack(stack);
            }
        }
    }
    if config.flags & CONFIG_GLIBC_CHUNKS == 0 {
        return;
    }
    // SAFETY: a read of the target's memory, which the helper checks.
    let Ok(header) = (unsafe { bpf_probe_read_user((addr - 8) as *const u64) }) else {
        return;
    };
    let chunk = header & !7;
    let overhead = if header & IS_MMAPPED != 0 { 16 } else { 8 };
    if chunk > overhead && chunk < MAX_CHUNK {
        count_preattach(PREATTACH_BYTES, chunk - overhead);
        count_preattach(PREATTACH_CLASSES + size_class(chunk), 1);
    }
}

/// Count one sampled free of pre-attach memory at `stack`, on this CPU.
#[inline(always)]
fn count_free_stack(stack: u32) {
    if let Some(count) = PREATTACH_STACKS.get_ptr_mut(stack) {
        // SAFETY: a per-CPU value from a successful lookup; this CPU's.
        unsafe { *count += 1 };
    } else {
        let _ = PREATTACH_STACKS.insert(stack, 1, BPF_NOEXIST.into());
    }
}

/// glibc's flag for a chunk served by its own mmap.
const IS_MMAPPED: u64 = 2;
/// A chunk size past this is not a header.
const MAX_CHUNK: u64 = 1 << 40;

/// Add (`sign` 1) or remove (`sign` -1) an allocation from its stack's totals
/// on this CPU.
#[inline(always)]
fn account(info: AllocInfo, sign: i64, config: &Config) {
    let stats = match stack_slot(info.stack_id) {
        Some(stats) => stats,
        None => match stack_stats(info.stack_id) {
            Some(stats) => stats,
            None => return,
        },
    };
    let bytes = sign * info.size as i64;
    stats.bytes += bytes;
    stats.allocs += sign;
    if config.epoch_ns == 0 {
        return;
    }
    let slot: &mut YoungSlot = &mut stats.young[info.epoch as usize % YOUNG_SLOTS];
    if sign > 0 {
        if slot.epoch != info.epoch {
            // The slot's previous epoch is old now: its allocations are in
            // the totals already and simply stop being young.
            *slot = YoungSlot { epoch: info.epoch, ..YoungSlot::default() };
        }
    } else if slot.epoch != info.epoch {
        // Allocated in an epoch this slot no longer holds: not young.
        return;
    }
    slot.bytes += bytes;
    slot.allocs += sign;
}

/// The stack's totals on this CPU in its slot of `STACK_SLOTS`, when the
/// stack holds it there or takes it now (free; by compare-and-exchange, as
/// another program preempting this one on the CPU may race). A slot never
/// changes hands, so an update never lands on another stack's totals.
#[inline(always)]
fn stack_slot(stack_id: u32) -> Option<&'static mut StackStats> {
    let slot = STACK_SLOTS.get_ptr_mut(stack_id % STACK_SLOT_COUNT)?;
    // SAFETY: a pointer from a successful lookup in a per-CPU array, valid
    // for this program run.
    let slot = unsafe { &mut *slot };
    let tag = u64::from(stack_id) + 1;
    // SAFETY: an aligned u64 of a map value.
    if slot.tag != tag && (slot.tag != 0 || !unsafe { atomic::claim(&raw mut slot.tag, tag) }) {
        return None;
    }
    Some(&mut slot.stats)
}

/// The stack's totals on this CPU in `STACK_STATS`, made if missing.
#[inline(always)]
fn stack_stats(stack_id: u32) -> Option<&'static mut StackStats> {
    let stats = match STACK_STATS.get_ptr_mut(stack_id) {
        Some(stats) => stats,
        None => {
            let zero = StackStats::default();
            // BPF_NOEXIST: another program on this CPU may have created it.
            let _ = STACK_STATS.insert(stack_id, zero, BPF_NOEXIST.into());
            match STACK_STATS.get_ptr_mut(stack_id) {
                Some(stats) => stats,
                None => {
                    count_lost(Lost::StatsMapFull);
                    return None;
                }
            }
        }
    };
    // SAFETY: the pointer comes from a successful lookup in a per-CPU map
    // and stays valid for this program run; only this CPU writes it (a
    // program preempting another on the CPU may make an update of the
    // totals lose the other's: plain adds, as in the slots).
    Some(unsafe { &mut *stats })
}

/// Which counter of a site's [`ThreadSiteStats`] to bump.
#[derive(Clone, Copy)]
pub enum SiteEvent {
    Created,
    Joined,
    DetachedExited,
}

/// Bump one counter of a creating site, on this CPU.
#[inline(always)]
pub fn count_site(site: u32, event: SiteEvent) {
    let stats = match THREAD_SITES.get_ptr_mut(site) {
        Some(stats) => stats,
        None => {
            let _ = THREAD_SITES.insert(site, ThreadSiteStats::default(), BPF_ANY.into());
            match THREAD_SITES.get_ptr_mut(site) {
                Some(stats) => stats,
                None => {
                    count_lost(Lost::ThreadMapFull);
                    return;
                }
            }
        }
    };
    // SAFETY: a per-CPU value from a successful lookup; only this CPU writes it.
    let stats = unsafe { &mut *stats };
    match event {
        SiteEvent::Created => stats.created += 1,
        SiteEvent::Joined => stats.joined += 1,
        SiteEvent::DetachedExited => stats.detached_exited += 1,
    }
}

/// Forget a thread that is gone for good (joined, or detached and exited).
#[inline(always)]
pub fn forget_thread(tid: u32, info: &ThreadInfo, event: SiteEvent) {
    let _ = THREADS.remove(tid);
    let _ = PTHREADS.remove(info.pthread);
    count_site(info.site, event);
}
