//! Atomic operations on map values, in BPF assembly: the BPF target is
//! built single-threaded (`"singlethread": true` in its spec), so Rust's
//! atomics would not be atomic across CPUs, and `core` has no
//! compare-and-exchange for it. LLVM emits these at any BPF CPU version;
//! the kernel takes them from 5.12 (the x86 JIT: `lock cmpxchg`, `lock
//! xadd`).

use core::arch::asm;

/// If `*word` is `old`, make it `new`. Returns what `*word` held.
///
/// # Safety
/// `word` is an aligned u64 of a map value.
#[inline(always)]
pub unsafe fn compare_exchange(word: *mut u64, old: u64, new: u64) -> u64 {
    let found: u64;
    // SAFETY: the caller's; BPF_CMPXCHG compares with r0 and leaves the
    // old value there.
    unsafe {
        asm!(
            "r0 = cmpxchg_64({word} + 0, r0, {new})",
            word = in(reg) word,
            new = in(reg) new,
            inout("r0") old => found,
            options(nostack),
        );
    }
    found
}

/// Take `*word` from 0 to `value`: whether this caller did (nobody had).
///
/// # Safety
/// `word` is an aligned u64 of a map value.
#[inline(always)]
pub unsafe fn claim(word: *mut u64, value: u64) -> bool {
    // SAFETY: the caller's.
    unsafe { compare_exchange(word, 0, value) == 0 }
}

/// Add `value` to `*word` (wrapping: `u64::MAX` subtracts 1).
///
/// # Safety
/// `word` is an aligned u64 of a map value.
#[inline(always)]
pub unsafe fn add(word: *mut u64, value: u64) {
    // SAFETY: the caller's; BPF_ATOMIC | BPF_ADD.
    unsafe {
        asm!(
            "lock *(u64 *)({word} + 0) += {value}",
            word = in(reg) word,
            value = in(reg) value,
            options(nostack),
        );
    }
}

/// Add `value` to `*word`; returns what it held.
///
/// # Safety
/// `word` is an aligned u64 of a map value.
#[inline(always)]
pub unsafe fn fetch_add(word: *mut u64, value: u64) -> u64 {
    let found: u64;
    // SAFETY: the caller's; BPF_ATOMIC | BPF_ADD | BPF_FETCH.
    unsafe {
        asm!(
            "{value} = atomic_fetch_add((u64 *)({word} + 0), {value})",
            word = in(reg) word,
            value = inout(reg) value => found,
            options(nostack),
        );
    }
    found
}
