//! leaktrace's kernel programs: uprobes on the allocator API that keep every
//! live allocation of the target and, per user stack, the bytes it holds.
//!
//! `probes/` holds the programs, one file per family of probed functions.
//! The helpers under them import only from helpers further down, never up:
//! `record` (the books) uses `unwind` (the stack walk), which uses `maps`
//! (every map and the configuration), which uses `types` (what only the
//! kernel side stores); `context` (arguments, registers) and `atomic`
//! (atomic operations on map values) import nothing; `changes` (waking the
//! loader, holding the target) uses `maps`.
#![no_std]
#![no_main]
// BPF atomics in assembly (atomic.rs): Rust's are not atomic for this target.
#![feature(asm_experimental_arch)]

mod atomic;
mod changes;
mod context;
mod maps;
mod probes;
mod record;
mod types;
mod unwind;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so
    // this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}
