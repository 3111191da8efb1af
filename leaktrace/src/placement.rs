//! Where in a function an entry probe goes. The kernel emulates a few
//! instruction kinds at a probe (push, jumps, calls) for about 0.6 µs a hit
//! here, and single-steps anything else out of line for about 17 µs. An
//! entry-only probe that reads just its arguments can sit past a leading
//! flag-setting test when the next instruction is a jump the kernel emulates:
//! no register has changed by then.
//!
//! Return probes always go at the entry: the kernel hijacks the return
//! address there.

/// Offset from the function's start for an entry-only probe whose program
/// reads only argument registers, given the function's first bytes.
pub fn entry_probe_offset(code: &[u8]) -> u64 {
    match test_reg_reg_len(code) {
        Some(len) if is_conditional_jump(&code[len..]) => len as u64,
        _ => 0,
    }
}

/// Length of a `test r64, r64` (or `test r32, r32`) at the start of `code`:
/// it writes only flags.
fn test_reg_reg_len(code: &[u8]) -> Option<usize> {
    let (rex, rest) = match code.first()? {
        0x40..=0x4f => (1, &code[1..]),
        _ => (0, code),
    };
    match rest {
        [0x85, modrm, ..] if modrm >> 6 == 0b11 => Some(rex + 2),
        _ => None,
    }
}

/// Whether `code` starts with a jcc, short (7x) or near (0f 8x).
fn is_conditional_jump(code: &[u8]) -> bool {
    matches!(code, [0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..])
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

    /// Check that a test not followed by a jump is left alone.
    #[test]
    fn test_without_jump_stays() {
        let code = [0x48, 0x85, 0xff, 0x48, 0x89, 0xfb];
        assert_eq!(entry_probe_offset(&code), 0);
    }

    /// Check that a memory-operand test is not mistaken for a register test.
    #[test]
    fn memory_test_stays() {
        let code = [0x48, 0x85, 0x3f, 0x74, 0x05];
        assert_eq!(entry_probe_offset(&code), 0);
    }
}
