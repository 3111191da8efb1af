//! Where in a function an entry probe goes. The kernel emulates a few
//! instruction kinds at a probe (push of a register, relative jumps, jcc and
//! calls) for about 0.6 µs a hit here, and single-steps anything else out of
//! line for about 17 µs. An entry-only probe whose program reads only
//! argument registers can sit further in, on the first instruction the
//! kernel emulates, as long as nothing before it writes those registers, the
//! stack pointer or memory, or branches. glibc's free starts with
//! `test %rdi,%rdi; je`; jemalloc's runs ten arithmetic instructions before
//! its first branch. When unsure, the probe stays at the entry.
//!
//! A return probe needs only that the word at the stack pointer still be
//! the return address when it fires: the kernel swaps it for its
//! trampoline. So a function with a return probe is probed at the same
//! place as one without, on the first emulated instruction, when nothing
//! before it moves the stack pointer, writes memory, or writes an argument
//! register the entry program reads: its entry and return
//! handlers then share one cheap trap. jemalloc's malloc begins with
//! `cmp $0x1000,%rdi; ja`: both go on the `ja`; tcmalloc's on its first
//! `jne`, past a copy of the size to r8; mimalloc's at its entry, as it
//! reuses rdi at once.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

/// Instructions decoded at most past the entry.
const MAX_SKIPPED: usize = 16;

/// Registers an entry-only program may read: the first two arguments (free,
/// munmap, pthread_attr_setdetachstate), the stack pointer (free reads its
/// return address there) and the frame pointer (free walks its caller's
/// stack from there, for a sample of frees of pre-attach memory).
const PRESERVED: [Register; 4] = [Register::RDI, Register::RSI, Register::RSP, Register::RBP];

/// The argument registers, in order (System V x86-64).
const ARGUMENTS: [Register; 6] =
    [Register::RDI, Register::RSI, Register::RDX, Register::RCX, Register::R8, Register::R9];

/// Bytes of a function's start handed to [`entry_probe_offset`].
pub const CODE_BYTES: usize = 96;

/// Offset from the function's start for an entry-only probe, given the
/// function's first bytes.
pub fn entry_probe_offset(code: &[u8]) -> u64 {
    probe_offset(code, &PRESERVED)
}

/// Offset from the function's start for an entry probe and a return probe
/// sharing one trap, given the function's first bytes and how many of its
/// leading arguments the entry program reads: those registers and the
/// stack pointer (whose word is the return address the kernel hijacks)
/// must be as they were at the call.
pub fn call_probe_offset(code: &[u8], arguments: usize) -> u64 {
    let mut preserved: Vec<Register> = ARGUMENTS[..arguments.min(ARGUMENTS.len())].to_vec();
    preserved.push(Register::RSP);
    probe_offset(code, &preserved)
}

fn probe_offset(code: &[u8], preserved: &[Register]) -> u64 {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut instruction = Instruction::default();
    for _ in 0..MAX_SKIPPED {
        if !decoder.can_decode() {
            break;
        }
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            break;
        }
        if is_emulated(&instruction) {
            return instruction.ip();
        }
        if !is_harmless(&instruction, &mut info, preserved) {
            break;
        }
    }
    0
}

/// What the kernel emulates instead of single-stepping (x86 uprobes:
/// relative jmp, jcc and call, and push of a register).
fn is_emulated(instruction: &Instruction) -> bool {
    instruction.is_jcc_short_or_near()
        || instruction.is_jmp_short_or_near()
        || instruction.is_call_near()
        || (instruction.mnemonic() == Mnemonic::Push && instruction.op0_kind() == OpKind::Register)
}

/// Whether an instruction can be passed over: it falls through, writes no
/// memory and no preserved register.
fn is_harmless(
    instruction: &Instruction,
    info: &mut InstructionInfoFactory,
    preserved: &[Register],
) -> bool {
    if instruction.flow_control() != FlowControl::Next {
        return false;
    }
    let info = info.info(instruction);
    let writes = |access: OpAccess| {
        matches!(
            access,
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        )
    };
    let writes_memory = info.used_memory().iter().any(|memory| writes(memory.access()));
    let writes_preserved = info
        .used_registers()
        .iter()
        .any(|used| writes(used.access()) && preserved.contains(&used.register().full_register()));
    !writes_memory && !writes_preserved
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that glibc 2.36's free (`test %rdi,%rdi; je`) is probed past the test.
    #[test]
    fn glibc_free_skips_test() {
        let free = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55];
        assert_eq!(entry_probe_offset(&free), 3);
    }

    /// Check that a function starting with an emulated push stays at its entry.
    #[test]
    fn push_stays_at_entry() {
        let malloc = [0x41, 0x54, 0x55, 0x53];
        assert_eq!(entry_probe_offset(&malloc), 0);
    }

    /// Check that jemalloc 5.3's free is probed at its first branch, past ten
    /// instructions that only compute into other registers.
    #[test]
    fn jemalloc_free_skips_arithmetic() {
        let free = [
            0x48, 0x89, 0xf8, // mov %rdi,%rax
            0x48, 0x8b, 0x15, 0x0e, 0x53, 0x0a, 0x00, // mov 0xa530e(%rip),%rdx
            0x48, 0x89, 0xf9, // mov %rdi,%rcx
            0x48, 0xc1, 0xe8, 0x1a, // shr $0x1a,%rax
            0x48, 0x81, 0xe1, 0x00, 0x00, 0x00, 0xc0, // and $0xffffffffc0000000,%rcx
            0x25, 0xf0, 0x00, 0x00, 0x00, // and $0xf0,%eax
            0x64, 0x48, 0x03, 0x04, 0x25, 0x00, 0x00, 0x00, 0x00, // add %fs:0x0,%rax
            0x48, 0x01, 0xd0, // add %rdx,%rax
            0x48, 0x3b, 0x88, 0xb0, 0x01, 0x00, 0x00, // cmp 0x1b0(%rax),%rcx
            0x75, 0x10, // jne
        ];
        assert_eq!(entry_probe_offset(&free), 48);
    }

    /// Check that an instruction writing an argument register stops the walk.
    #[test]
    fn argument_write_stays_at_entry() {
        // lea -0x1(%rdi),%rdi; je
        let code = [0x48, 0x8d, 0x7f, 0xff, 0x74, 0x05];
        assert_eq!(entry_probe_offset(&code), 0);
    }

    /// Check that a memory store stops the walk.
    #[test]
    fn memory_store_stays_at_entry() {
        // mov %rdi,(%rax); je
        let code = [0x48, 0x89, 0x38, 0x74, 0x05];
        assert_eq!(entry_probe_offset(&code), 0);
    }

    /// Check that jemalloc 5.3's malloc (`cmp $0x1000,%rdi; ja`) gets its
    /// entry and return probes on the `ja`, and that a function whose
    /// first instructions write an argument register or the stack does not.
    #[test]
    fn call_probes_past_compare() {
        let malloc = [0x48, 0x81, 0xff, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x87, 0x10, 0x00, 0x00, 0x00];
        assert_eq!(call_probe_offset(&malloc, 1), 7);
        // mov %rsi,%rdx; ja: rdx is posix_memalign's size, not malloc's.
        assert_eq!(call_probe_offset(&[0x48, 0x89, 0xf2, 0x77, 0x05], 3), 0);
        assert_eq!(call_probe_offset(&[0x48, 0x89, 0xf2, 0x77, 0x05], 1), 3);
        // sub $0x8,%rsp; je: the return address moves.
        assert_eq!(call_probe_offset(&[0x48, 0x83, 0xec, 0x08, 0x74, 0x05], 1), 0);
        // glibc's malloc starts with an emulated push: at the entry.
        assert_eq!(call_probe_offset(&[0x41, 0x54, 0x55, 0x53], 1), 0);
        // tcmalloc 2.10's malloc: mov 0x132f9(%rip),%rax; mov %rdi,%r8;
        // test %rax,%rax; jne: the size is kept, so on the jne.
        let tcmalloc = [
            0x48, 0x8b, 0x05, 0xf9, 0x32, 0x01, 0x00, 0x49, 0x89, 0xf8, 0x48, 0x85, 0xc0, 0x0f,
            0x85, 0x8e, 0x00, 0x00, 0x00,
        ];
        assert_eq!(call_probe_offset(&tcmalloc, 1), 13);
        // mimalloc 2.0's malloc moves the size to rsi and reuses rdi: entry.
        // mov 0xb449(%rip),%rax; mov %rdi,%rsi; mov %fs:(%rax),%rdi;
        // cmp $0x400,%rsi; ja
        let mimalloc = [
            0x48, 0x8b, 0x05, 0x49, 0xb4, 0x00, 0x00, 0x48, 0x89, 0xfe, 0x64, 0x48, 0x8b, 0x38,
            0x48, 0x81, 0xfe, 0x00, 0x04, 0x00, 0x00, 0x77, 0x29,
        ];
        assert_eq!(call_probe_offset(&mimalloc, 1), 0);
    }

    /// Check that a test not followed by an emulated instruction is left alone.
    #[test]
    fn no_branch_stays_at_entry() {
        // test %rdi,%rdi; syscall
        let code = [0x48, 0x85, 0xff, 0x0f, 0x05];
        assert_eq!(entry_probe_offset(&code), 0);
    }
}
