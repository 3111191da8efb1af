//! User stacks unwound from call-frame information, so that code built
//! without frame pointers (most distributions' -O2, glibc, libstdc++, Rust's
//! standard library) still gives the whole chain of callers.
//!
//! The loader turns each object's .eh_frame (or .debug_frame) into rows of
//! two rules, where the caller's stack pointer (the CFA) is and where the
//! caller's rbp was saved, and publishes the target's executable mappings.
//! Each frame is one `bpf_loop` step: find the mapping, binary-search its
//! rows, read the return address at CFA - 8. A frame without rows, or with a
//! rule we do not follow, ends the stack there (counted), so no guessed
//! frame ever enters a report. Frames in an object whose every function
//! keeps a frame pointer (the loader checks all of its call-frame
//! information) skip the row search: CFA = rbp + 16.
//!
//! The two searches are paid once per address: each CPU keeps what an
//! address resolved to, for as long as the same mapping set is live. A
//! program allocating in a loop walks the same return addresses again and
//! again.

use core::{
    ffi::c_void,
    mem::MaybeUninit,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf, generated::bpf_loop},
    EbpfContext,
};
use aya_log_ebpf::{debug, warn};
use leaktrace_common::{
    CfaRule, Lost, RbpRule, StackEnd, UnwindMapping, UnwindRow, UserStack, MAPPING_FRAME_POINTERS,
    MAX_FRAMES, MAX_UNWIND_MAPPINGS, NO_STACK, UNWIND_CHUNK_ROWS,
};

use crate::{
    atomic,
    context::frame,
    maps::{
        count_lost, worth_logging, EEXIST, STACKS, STACK_CACHE, STACK_CACHE_BITS, STACK_SCRATCH,
        STACK_WINDOW, UNWIND_CACHE, UNWIND_CACHE_BITS, UNWIND_MAPPINGS, UNWIND_ROWS, UNWIND_STATE,
    },
    types::{CachedAddress, StackWindow, WINDOW_WORDS},
};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Enough halvings for [`MAX_UNWIND_MAPPINGS`] mappings.
const MAPPING_SEARCH_STEPS: u32 = 11;
/// Enough halvings for 16 Mi rows in one object.
const ROW_SEARCH_STEPS: u32 = 24;

/// The rule of a function body built with frame pointers: the caller's
/// frame starts 16 bytes above rbp, where rbp was pushed.
const FRAME_POINTER_ROW: UnwindRow = UnwindRow {
    pc: 0,
    cfa_offset: 16,
    rbp_offset: -16,
    cfa_rule: CfaRule::Rbp as u8,
    rbp_rule: RbpRule::AtCfa as u8,
};

/// Fibonacci hashing of an address to its cache slot.
const CACHE_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// What an address resolved to, as [`Resolved::kind`].
const OUTSIDE: u32 = 0;
/// In a mapping whose object has no row for it.
const NO_ROWS: u32 = 1;
/// In a mapping, with [`Resolved::row`] in force there.
const ROW: u32 = 2;
/// In a mapping flagged [`MAPPING_FRAME_POINTERS`]; the row is not searched.
const FRAME_POINTERS: u32 = 3;

/// A frame's address, resolved against the live mapping set.
#[derive(Clone, Copy)]
struct Resolved {
    row: UnwindRow,
    kind: u32,
}

/// [`CachedAddress::check`]: FNV over the slot's other fields.
#[inline(always)]
fn checksum(slot: &CachedAddress) -> u64 {
    let row = u64::from(slot.row.pc) | u64::from(slot.row.cfa_offset as u32) << 32;
    let rules = u64::from(slot.row.rbp_offset as u16)
        | u64::from(slot.row.cfa_rule) << 16
        | u64::from(slot.row.rbp_rule) << 24
        | u64::from(slot.kind) << 32;
    let mut hash = FNV_OFFSET;
    for word in [slot.addr, slot.state, row, rules] {
        hash = (hash ^ word).wrapping_mul(FNV_PRIME);
    }
    hash
}

/// `bpf_loop` callback results.
const CONTINUE: i64 = 0;
const STOP: i64 = 1;

/// The walk's registers and progress, on the probe's stack; `bpf_loop`
/// hands it to every step.
#[repr(C)]
struct Walk {
    ip: u64,
    sp: u64,
    bp: u64,
    hash: u64,
    /// The [`leaktrace_common::UnwindState`] the walk started under.
    state: u64,
    /// This walk's number on its CPU ([`StackWindow::started`]).
    ticket: u64,
    /// First index of the live mapping set.
    set_base: u32,
    count: u32,
    /// Whether `bp` still holds the frame's rbp.
    bp_known: u32,
    /// Frames recorded so far.
    len: u32,
    /// A [`StackEnd`], once the walk stops.
    end: u32,
    _pad: u32,
}

/// End the walk short of the outermost frame, counted.
#[inline(always)]
fn cut(walk: &mut Walk, end: StackEnd) -> i64 {
    walk.end = end as u32;
    count_lost(match end {
        StackEnd::NoInfo => Lost::UnwindNoInfo,
        StackEnd::Depth => Lost::UnwindDepth,
        _ => Lost::UnwindFailed,
    });
    STOP
}

/// End the walk at a rule it does not follow (a DWARF expression, another
/// register), counted as a failure; logged with the address now and then.
#[inline(always)]
fn unsupported(walk: &mut Walk, addr: u64) -> i64 {
    walk.end = StackEnd::Failed as u32;
    if worth_logging(count_lost(Lost::UnwindFailed)) {
        // A bpf_loop step has no program context to give; aya-log-ebpf
        // 0.2.0 never reads the one it is given.
        debug!(walk, "unwind: unsupported call-frame rule at {:x}, stack cut there", addr);
    }
    STOP
}

/// The id of the current user stack in `STACKS`, or `NO_STACK` (counted).
/// Called from return probes, where the first frame is the allocator's
/// caller, at the instruction after its call.
#[inline(always)]
pub fn stack_id<C: EbpfContext>(ctx: &C) -> u32 {
    let (ip, sp, bp) = frame(ctx);
    stack_id_at(ctx, ip, sp, bp)
}

/// The id of the user stack whose innermost frame is at `ip` with stack
/// pointer `sp` and frame pointer `bp`, where `ip` is a return address (the
/// instruction after a call, or after the `syscall` that entered the
/// kernel).
#[inline(always)]
pub fn stack_id_at<C: EbpfContext>(ctx: &C, ip: u64, sp: u64, bp: u64) -> u32 {
    let state = UNWIND_STATE.get(0).copied().unwrap_or(0);
    let count = (state >> 32) as u32;
    let Some(window) = STACK_WINDOW.get_ptr_mut(0) else {
        count_lost(Lost::StackUnavailable);
        return NO_STACK;
    };
    // SAFETY: a pointer from a successful lookup in a per-CPU array, valid
    // for this program run.
    let window = unsafe { &mut *window };
    // Atomic: a walk preempting this one between a load and a store would
    // get the same ticket.
    // SAFETY: an aligned u64 of a map value.
    let ticket = unsafe { atomic::fetch_add(&raw mut window.started, 1) }.wrapping_add(1);
    // Field by field, with volatile stores: LLVM merges the adjacent zero
    // fields of a struct literal into a call to memset, a BPF function
    // looping over bytes (~15 ns a walk).
    let mut walk = MaybeUninit::<Walk>::uninit();
    let fields = walk.as_mut_ptr();
    // SAFETY: `fields` points to this function's own `walk`, whose every
    // field is written here before it is read.
    let walk = unsafe {
        write_volatile(&raw mut (*fields).ip, ip);
        write_volatile(&raw mut (*fields).sp, sp);
        write_volatile(&raw mut (*fields).bp, bp);
        write_volatile(&raw mut (*fields).hash, FNV_OFFSET);
        write_volatile(&raw mut (*fields).state, state);
        write_volatile(&raw mut (*fields).ticket, ticket);
        write_volatile(&raw mut (*fields).set_base, (state as u32 & 1) * MAX_UNWIND_MAPPINGS);
        write_volatile(
            &raw mut (*fields).count,
            if count > MAX_UNWIND_MAPPINGS { MAX_UNWIND_MAPPINGS } else { count },
        );
        write_volatile(&raw mut (*fields).bp_known, 1);
        write_volatile(&raw mut (*fields).len, 0);
        write_volatile(&raw mut (*fields).end, StackEnd::Complete as u32);
        write_volatile(&raw mut (*fields)._pad, 0);
        walk.assume_init_mut()
    };
    // SAFETY: `step` has the callback signature bpf_loop expects, and
    // `walk` outlives the call.
    unsafe {
        bpf_loop(
            MAX_FRAMES as u32,
            step as *const () as *mut c_void,
            core::ptr::from_mut(walk).cast(),
            0,
        )
    };
    // Another walk started on this CPU in the middle of ours (this one was
    // preempted): the words read from the window may be that walk's.
    if walk.len == 0 || window.started != ticket {
        count_lost(Lost::StackUnavailable);
        return NO_STACK;
    }
    let mut id = (walk.hash ^ (walk.hash >> 32)) as u32;
    if id == NO_STACK {
        id = 0;
    }
    let tag = ((walk.hash ^ u64::from(walk.len)).wrapping_mul(FNV_PRIME)) | 1;
    let seen = STACK_CACHE.get_ptr_mut(id & ((1 << STACK_CACHE_BITS) - 1));
    if let Some(seen) = seen {
        // SAFETY: a pointer from a successful lookup in a per-CPU array,
        // valid for this program run; one word, written whole.
        if unsafe { *seen } == tag {
            return id;
        }
    }
    if let Some(known) = STACKS.get_ptr(id) {
        // SAFETY: a pointer from a successful lookup, valid for this run;
        // stacks are never changed once inserted.
        let known = unsafe { &*known };
        if known.hash == walk.hash && known.len == walk.len {
            if let Some(seen) = seen {
                // SAFETY: as above.
                unsafe { *seen = tag };
            }
            return id;
        }
        count_lost(Lost::StackCollision);
        return NO_STACK;
    }
    // A stack not seen before: only now is the scratch completed and kept.
    let Some(stack) = STACK_SCRATCH.get_ptr_mut(0) else {
        count_lost(Lost::StackUnavailable);
        return NO_STACK;
    };
    // SAFETY: a pointer from a successful lookup in a per-CPU array, valid
    // for this program run and used by this CPU only.
    let stack = unsafe { &mut *stack };
    stack.hash = walk.hash;
    stack.len = walk.len;
    stack.end = walk.end;
    // The scratch is per CPU, and a fully preemptible kernel can run this
    // program for another thread on this CPU in the middle of our walk: the
    // addresses must still hash to what this walk computed before they are
    // kept.
    if hash_of(stack) != walk.hash {
        count_lost(Lost::StackUnavailable);
        return NO_STACK;
    }
    match STACKS.insert(id, &*stack, BPF_NOEXIST.into()) {
        Ok(()) => id,
        // Another CPU inserted it between our lookup and insert.
        Err(err) if i64::from(err) == -EEXIST => id,
        Err(_) => {
            if worth_logging(count_lost(Lost::StackCollision)) {
                warn!(ctx, "the stack map is full: new stacks go unrecorded (--max-stacks)");
            }
            NO_STACK
        }
    }
}

/// One frame: record `walk.ip`, then move `walk` to the caller's frame.
/// Returns [`STOP`] when the stack ends or cannot be followed further.
#[inline(never)]
extern "C" fn step(index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `stack_id` gave it, to
    // a `Walk` on that function's stack.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    // A return address is the instruction after the call; the call itself
    // belongs to the frame's function (a call to a noreturn function can be
    // its last instruction). The first frame's ip is where it resumes.
    let lookup = if index == 0 { walk.ip } else { walk.ip.wrapping_sub(1) };
    // rbp lost in a frame below: even code with frame pointers needs its
    // real row.
    let resolved = resolve(walk, lookup, walk.bp_known == 0);
    // A return address outside every executable mapping is not code we
    // know: it is left out rather than shown as a frame.
    if index > 0 && resolved.kind == OUTSIDE {
        return cut(walk, StackEnd::NoInfo);
    }
    let (Some(stack), Some(window)) = (STACK_SCRATCH.get_ptr_mut(0), STACK_WINDOW.get_ptr_mut(0))
    else {
        return STOP;
    };
    // SAFETY: as in `stack_id`.
    let (stack, window) = unsafe { (&mut *stack, &mut *window) };
    stack.ips[index as usize & (MAX_FRAMES - 1)] = walk.ip;
    walk.len = index + 1;
    walk.hash = (walk.hash ^ walk.ip).wrapping_mul(FNV_PRIME);
    if index as usize + 1 >= MAX_FRAMES {
        return cut(walk, StackEnd::Depth);
    }
    let row = if resolved.kind == ROW {
        resolved.row
    } else if resolved.kind == FRAME_POINTERS {
        // The fast path: code built with frame pointers. rbp 0 marks the
        // outermost frame (_start and clone clear it).
        if walk.bp == 0 {
            return STOP;
        }
        FRAME_POINTER_ROW
    } else {
        return cut(walk, StackEnd::NoInfo);
    };
    let offset = row.cfa_offset as i64 as u64;
    let cfa = if row.cfa_rule == CfaRule::Rsp as u8 {
        walk.sp.wrapping_add(offset)
    } else if row.cfa_rule == CfaRule::Rbp as u8 && walk.bp_known != 0 {
        walk.bp.wrapping_add(offset)
    } else if row.cfa_rule == CfaRule::End as u8 {
        return STOP;
    } else if row.cfa_rule == CfaRule::NoInfo as u8 {
        return cut(walk, StackEnd::NoInfo);
    } else if row.cfa_rule == CfaRule::Unsupported as u8 {
        return unsupported(walk, lookup);
    } else {
        return cut(walk, StackEnd::Failed);
    };
    // The caller's frame is above ours: anything else is a corrupt stack or
    // a wrong rule, and could loop.
    if cfa <= walk.sp {
        return cut(walk, StackEnd::Failed);
    }
    // Both words of the frame, the saved rbp's (when it was saved) and
    // the return address's, from one window of the stack.
    let return_slot = cfa - 8;
    let rbp_saved = row.rbp_rule == RbpRule::AtCfa as u8;
    let rbp_slot =
        if rbp_saved { cfa.wrapping_add(row.rbp_offset as i64 as u64) } else { return_slot };
    let Some((bp, return_address)) = frame_words(window, walk.ticket, rbp_slot, return_slot) else {
        return cut(walk, StackEnd::Failed);
    };
    if rbp_saved {
        walk.bp = bp;
    } else if row.rbp_rule == RbpRule::Lost as u8 {
        walk.bp_known = 0;
    }
    if return_address == 0 {
        return STOP;
    }
    walk.sp = cfa;
    walk.ip = return_address;
    CONTINUE
}

/// The window's span past its first word, in bytes.
const WINDOW_SPAN: u64 = (WINDOW_WORDS as u64 - 1) * 8;

/// The user words at `low` and `high` (`low` not above `high`): from the
/// CPU's window of the stack when this walk (`ticket`) filled it and it
/// holds both, else after reading the window afresh from `low` up; read
/// one by one when they are not 8-aligned, too far apart, or this walk
/// could not read a window (the top of the stack within its length).
///
/// Every way ends in one read of the window at two indices that went
/// through the map value: the verifier then sees unknown indices, one
/// state, where its own tracking of each way's constants multiplied the
/// states of every step of the walk.
#[inline(always)]
fn frame_words(window: &mut StackWindow, ticket: u64, low: u64, high: u64) -> Option<(u64, u64)> {
    let base = window.base;
    // Whole words, in order, within one window's span of each other.
    let fits = (low | high) & 7 == 0 && high >= low && high - low <= WINDOW_SPAN;
    let indices = if fits
        && window.owner == ticket
        && low >= base
        && high.wrapping_sub(base) <= WINDOW_SPAN
    {
        ((low - base) / 8, (high - base) / 8)
    } else {
        // SAFETY: the words are plain memory of the map value.
        let bytes = unsafe {
            core::slice::from_raw_parts_mut(
                window.words.as_mut_ptr().cast::<u8>(),
                WINDOW_WORDS * 8,
            )
        };
        if fits
            && window.failed != ticket
            // SAFETY: bpf_probe_read_user_buf checks the user address.
            && unsafe { bpf_probe_read_user_buf(low as *const u8, bytes) }.is_ok()
        {
            window.base = low;
            window.owner = ticket;
            (0, (high - low) / 8)
        } else {
            if fits {
                window.failed = ticket;
            }
            window.owner = 0;
            let (low_word, high_word) = (read_user(low)?, read_user(high)?);
            window.words[0] = low_word;
            window.words[1] = high_word;
            (0, 1)
        }
    };
    // SAFETY: the map value's own fields.
    let (low_index, high_index) = unsafe {
        write_volatile(&raw mut window.indices[0], indices.0);
        write_volatile(&raw mut window.indices[1], indices.1);
        (read_volatile(&raw const window.indices[0]), read_volatile(&raw const window.indices[1]))
    };
    let mask = WINDOW_WORDS as u64 - 1;
    Some((window.words[(low_index & mask) as usize], window.words[(high_index & mask) as usize]))
}

/// The user word at `addr`, read alone.
#[inline(always)]
fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the address.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// What `addr` resolves to under the walk's mapping set: from this CPU's
/// cache when it holds the address for that set, else by the two searches
/// (and then cached). With `want_row`, code built with frame pointers
/// resolves to its real row too. The searches are inlined here only, once:
/// each inlined copy is verified again, and the stack-walking programs'
/// verification is most of leaktrace's start-up.
#[inline(always)]
fn resolve(walk: &Walk, addr: u64, want_row: bool) -> Resolved {
    let slot = (addr.wrapping_mul(CACHE_MULTIPLIER) >> (64 - UNWIND_CACHE_BITS)) as u32;
    let cached = UNWIND_CACHE.get_ptr_mut(slot);
    if let Some(cached) = cached {
        // SAFETY: a pointer from a successful lookup in a per-CPU array,
        // valid for this program run; the checksum rejects a torn slot.
        let cached = unsafe { &*cached };
        if cached.addr == addr
            && cached.state == walk.state
            && cached.check == checksum(cached)
            && !(want_row && cached.kind == FRAME_POINTERS)
        {
            return Resolved { row: cached.row, kind: cached.kind };
        }
    }
    let resolved = match find_mapping(walk, addr) {
        None => Resolved { row: UnwindRow::EMPTY, kind: OUTSIDE },
        Some(mapping) if mapping.flags & MAPPING_FRAME_POINTERS != 0 && !want_row => {
            Resolved { row: FRAME_POINTER_ROW, kind: FRAME_POINTERS }
        }
        Some(mapping) => match find_row(&mapping, addr) {
            Some(row) => Resolved { row, kind: ROW },
            None => Resolved { row: UnwindRow::EMPTY, kind: NO_ROWS },
        },
    };
    // Only addresses in code are worth a slot: the others end the walk.
    let Some(cached) = cached else {
        return resolved;
    };
    if resolved.kind >= ROW {
        let mut fresh = CachedAddress {
            addr,
            state: walk.state,
            row: resolved.row,
            kind: resolved.kind,
            check: 0,
        };
        fresh.check = checksum(&fresh);
        // SAFETY: as above; this CPU's slot.
        unsafe { *cached = fresh };
    }
    resolved
}

/// The hash `step` computes, over a stored stack.
#[inline(always)]
fn hash_of(stack: &UserStack) -> u64 {
    let mut hash = FNV_OFFSET;
    for index in 0..MAX_FRAMES {
        if index as u32 >= stack.len {
            break;
        }
        hash = (hash ^ stack.ips[index]).wrapping_mul(FNV_PRIME);
    }
    hash
}

/// A binary search's bounds, handed to each `bpf_loop` step of it. The
/// searches run as `bpf_loop` callbacks, not as unrolled loops: the
/// verifier then checks one step instead of every halving (the two
/// searches were about half of each stack-walking program's verification,
/// and that verification most of leaktrace's start-up). They run on a
/// cache miss only (`resolve`), so the calls cost little.
#[repr(C)]
struct Search {
    /// The key: an address (mappings) or a pc (rows).
    key: u64,
    /// First index of the searched set (mappings: the live set's base).
    base: u32,
    low: u32,
    high: u32,
    /// Mappings: the index found, or [`NOT_FOUND`].
    found: u32,
}

const NOT_FOUND: u32 = u32::MAX;

/// One halving of the mapping search.
#[inline(never)]
extern "C" fn mapping_step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `find_mapping` gave it, to
    // a `Search` on that function's stack.
    let search = unsafe { &mut *ctx.cast::<Search>() };
    if search.low >= search.high {
        return STOP;
    }
    let middle = search.low + (search.high - search.low) / 2;
    let Some(mapping) = UNWIND_MAPPINGS.get(search.base + middle) else {
        return STOP;
    };
    if search.key < mapping.start {
        search.high = middle;
    } else if search.key >= mapping.end {
        search.low = middle + 1;
    } else {
        search.found = search.base + middle;
        return STOP;
    }
    CONTINUE
}

/// The live mapping containing `addr`.
#[inline(always)]
fn find_mapping(walk: &Walk, addr: u64) -> Option<UnwindMapping> {
    let mut search =
        Search { key: addr, base: walk.set_base, low: 0, high: walk.count, found: NOT_FOUND };
    // SAFETY: `mapping_step` has the callback signature bpf_loop expects,
    // and `search` outlives the call.
    unsafe {
        bpf_loop(
            MAPPING_SEARCH_STEPS,
            mapping_step as *const () as *mut c_void,
            (&raw mut search).cast(),
            0,
        )
    };
    if search.found == NOT_FOUND {
        return None;
    }
    UNWIND_MAPPINGS.get(search.found).copied()
}

/// One halving of the row search.
#[inline(never)]
extern "C" fn row_step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `find_row` gave it, to a
    // `Search` on that function's stack.
    let search = unsafe { &mut *ctx.cast::<Search>() };
    if search.high <= search.low + 1 {
        return STOP;
    }
    let middle = search.low + (search.high - search.low) / 2;
    let Some(row) = row(middle) else {
        search.found = NOT_FOUND;
        return STOP;
    };
    if u64::from(row.pc) <= search.key {
        search.low = middle;
    } else {
        search.high = middle;
    }
    CONTINUE
}

/// The row in force at `addr` in `mapping`'s object: the last row whose pc
/// is not above it.
#[inline(always)]
fn find_row(mapping: &UnwindMapping, addr: u64) -> Option<UnwindRow> {
    let pc = addr.wrapping_sub(mapping.bias);
    if mapping.rows == 0 || pc > u32::MAX as u64 {
        return None;
    }
    // The answer is in [low, high); `found` is cleared if a row is missing.
    let (low, high) = (mapping.first_row, mapping.first_row + mapping.rows);
    let mut search = Search { key: pc, base: 0, low, high, found: 0 };
    // SAFETY: `row_step` has the callback signature bpf_loop expects, and
    // `search` outlives the call.
    unsafe {
        bpf_loop(
            ROW_SEARCH_STEPS,
            row_step as *const () as *mut c_void,
            (&raw mut search).cast(),
            0,
        )
    };
    if search.found == NOT_FOUND || search.high > search.low + 1 {
        return None;
    }
    let found = row(search.low)?;
    (u64::from(found.pc) <= pc).then_some(found)
}

#[inline(always)]
fn row(index: u32) -> Option<UnwindRow> {
    let chunk = UNWIND_ROWS.get(index / UNWIND_CHUNK_ROWS as u32)?;
    Some(chunk.rows[index as usize % UNWIND_CHUNK_ROWS])
}
