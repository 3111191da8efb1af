//! Unwind tables, built from an object's bytes alone: each executable
//! object's call-frame information (.eh_frame, with .debug_frame filling
//! what it does not cover) reduced to the two rules an x86-64 walk needs,
//! where the caller's stack pointer is (the CFA) and where rbp was saved.
//!
//! gimli evaluates the CFI programs (it is what blazesym and the Rust
//! backtrace crates use); this module only reduces its rows. It opens no
//! file and writes no map: [`super::publish`] does.

use anyhow::anyhow;
use gimli::{
    BaseAddresses, CfaRule as GimliCfa, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian,
    RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use leaktrace_common::{CfaRule, RbpRule, UnwindRow};
use object::{Object as _, ObjectSection as _};

use crate::elf::ElfFile;

/// One object's unwind table.
pub struct ObjectTable {
    /// In `pc` order: each holds until the next.
    pub rows: Vec<UnwindRow>,
    /// Every function keeps rbp as a frame pointer.
    pub frame_pointers: bool,
}

/// Whether every function described follows the frame-pointer discipline:
/// a body with CFA = rbp + 16 (rbp pushed at CFA - 16), or no frame at all.
/// A function that pushes rbp but never makes it the CFA register uses it
/// as a plain register, and rules the whole object out.
struct FramePointerCheck {
    /// Address ranges of the PLT sections, whose rules are expressions.
    plt: Vec<(u64, u64)>,
    every_function: bool,
    any_function: bool,
}

impl FramePointerCheck {
    fn function(&mut self, start: u64, rows: &[UnwindRow]) {
        let rsp = CfaRule::Rsp as u8;
        let rbp = CfaRule::Rbp as u8;
        let pushed =
            |row: &UnwindRow| row.rbp_rule == RbpRule::AtCfa as u8 && row.rbp_offset == -16;
        let in_plt = self.plt.iter().any(|&(low, high)| low <= start && start < high);
        let allowed = rows.iter().all(|row| {
            row.cfa_rule == CfaRule::End as u8
                || (row.cfa_rule == rsp && row.cfa_offset == 8)
                || (row.cfa_rule == rsp && row.cfa_offset == 16 && pushed(row))
                || (row.cfa_rule == rbp && row.cfa_offset == 16 && pushed(row))
                || in_plt
        });
        let has_frame = rows.iter().any(|row| row.cfa_rule == rbp);
        let frameless = rows.iter().all(|row| row.cfa_rule != rsp || row.cfa_offset == 8);
        self.every_function &= allowed && (has_frame || frameless || in_plt);
        self.any_function |= has_frame;
    }
}

/// Rows [`object_rows`] would make of an object, over-estimated from the
/// size of its call-frame sections alone (no parse): glibc's libc has ~6
/// bytes of .eh_frame a row, libstdc++ ~7.
pub fn estimated_rows(elf: &ElfFile) -> u64 {
    let file = elf.parse();
    let size = |name: &str| file.section_by_name(name).map_or(0, |section| section.size());
    (size(".eh_frame") + size(".debug_frame")) / BYTES_PER_ROW_AT_LEAST
}

/// Fewer call-frame bytes than any object seen here spends on a row.
const BYTES_PER_ROW_AT_LEAST: u64 = 4;

/// The unwind table of an object file.
pub fn object_rows(elf: &ElfFile) -> anyhow::Result<ObjectTable> {
    let file = elf.parse();
    let mut check = FramePointerCheck {
        plt: file
            .sections()
            .filter(|section| section.name().is_ok_and(|name| name.starts_with(".plt")))
            .map(|section| (section.address(), section.address() + section.size()))
            .collect(),
        every_function: true,
        any_function: false,
    };
    let section_data = |name: &str| {
        file.section_by_name(name)
            .and_then(|section| Some((section.address(), section.data().ok()?)))
    };
    let mut spans = Vec::new();
    if let Some((address, bytes)) = section_data(".eh_frame") {
        let mut bases = BaseAddresses::default().set_eh_frame(address);
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        if let Some(got) = file.section_by_name(".got") {
            bases = bases.set_got(got.address());
        }
        let mut section = EhFrame::new(bytes, LittleEndian);
        section.set_address_size(8);
        collect(&section, &bases, &mut spans, &mut check);
    }
    if let Some((_, bytes)) = section_data(".debug_frame") {
        let mut section = DebugFrame::new(bytes, LittleEndian);
        section.set_address_size(8);
        let mut extra = Vec::new();
        collect(&section, &BaseAddresses::default(), &mut extra, &mut check);
        // .eh_frame wins where both describe an address.
        spans.sort_by_key(|span: &Span| span.start);
        let covered = |span: &Span| {
            let after = spans.partition_point(|other| other.start < span.end);
            after > 0 && spans[after - 1].end > span.start
        };
        let extra: Vec<Span> = extra.into_iter().filter(|span| !covered(span)).collect();
        spans.extend(extra);
    }
    Ok(ObjectTable {
        rows: compact(spans)?,
        frame_pointers: check.every_function && check.any_function,
    })
}

/// One row of gimli's table: `[start, end)` and its rules.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
    row: UnwindRow,
}

fn collect<'data, S>(
    section: &S,
    bases: &BaseAddresses,
    spans: &mut Vec<Span>,
    check: &mut FramePointerCheck,
) where
    S: UnwindSection<EndianSlice<'data, LittleEndian>>,
{
    let mut context = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    loop {
        let entry = match entries.next() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            // A malformed entry ends the section: its length cannot be trusted.
            Err(_) => break,
        };
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(S::cie_from_offset) else {
            continue;
        };
        let Ok(mut table) = fde.rows(section, bases, &mut context) else {
            continue;
        };
        let first = spans.len();
        while let Ok(Some(row)) = table.next_row() {
            if row.start_address() < row.end_address() {
                spans.push(Span {
                    start: row.start_address(),
                    end: row.end_address(),
                    row: reduce(row.cfa(), row.register(X86_64::RA), row.register(X86_64::RBP)),
                });
            }
        }
        let rows: Vec<UnwindRow> = spans[first..].iter().map(|span| span.row).collect();
        check.function(fde.initial_address(), &rows);
    }
}

/// The rules of one gimli row, as the programs follow them.
fn reduce(
    cfa: &GimliCfa<usize>,
    return_address: Option<RegisterRule<usize>>,
    rbp: Option<RegisterRule<usize>>,
) -> UnwindRow {
    let mut row = UnwindRow::EMPTY;
    row.cfa_rule = CfaRule::Unsupported as u8;
    match return_address {
        Some(RegisterRule::Undefined) => {
            row.cfa_rule = CfaRule::End as u8;
            return row;
        }
        // The programs read the return address at CFA - 8, the ABI's rule.
        None | Some(RegisterRule::Offset(-8)) => {}
        Some(_) => return row,
    }
    if let GimliCfa::RegisterAndOffset { register, offset } = *cfa {
        if let Ok(offset) = i32::try_from(offset) {
            row.cfa_offset = offset;
            if register == X86_64::RSP {
                row.cfa_rule = CfaRule::Rsp as u8;
            } else if register == X86_64::RBP {
                row.cfa_rule = CfaRule::Rbp as u8;
            }
        }
    }
    match rbp {
        None | Some(RegisterRule::SameValue | RegisterRule::Undefined) => {}
        Some(RegisterRule::Offset(offset)) => match i16::try_from(offset) {
            Ok(offset) => {
                row.rbp_rule = RbpRule::AtCfa as u8;
                row.rbp_offset = offset;
            }
            Err(_) => row.rbp_rule = RbpRule::Lost as u8,
        },
        Some(_) => row.rbp_rule = RbpRule::Lost as u8,
    }
    row
}

/// Sorted rows with a "no information" row wherever no span covers the
/// addresses, and runs of equal rules merged.
fn compact(mut spans: Vec<Span>) -> anyhow::Result<Vec<UnwindRow>> {
    spans.sort_by_key(|span| span.start);
    let mut rows: Vec<UnwindRow> = Vec::with_capacity(spans.len() + 1);
    let mut covered_to = 0u64;
    let pc = |address: u64| {
        u32::try_from(address)
            .map_err(|_| anyhow!("address {address:#x} beyond 4 GiB in an object"))
    };
    for span in spans {
        if span.start < covered_to {
            // Overlapping descriptions: the first one stays.
            continue;
        }
        if span.start > covered_to && !rows.is_empty() {
            rows.push(UnwindRow { pc: pc(covered_to)?, ..UnwindRow::EMPTY });
        }
        let row = UnwindRow { pc: pc(span.start)?, ..span.row };
        let same_as_last = rows
            .last()
            .is_some_and(|last| UnwindRow { pc: 0, ..*last } == UnwindRow { pc: 0, ..row });
        if !same_as_last {
            rows.push(row);
        }
        covered_to = span.end;
    }
    if !rows.is_empty() {
        rows.push(UnwindRow { pc: pc(covered_to)?, ..UnwindRow::EMPTY });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_of(path: &str) -> ObjectTable {
        let elf = crate::elf::ElfFile::open(std::path::Path::new(path)).unwrap();
        object_rows(&elf).unwrap()
    }

    /// Check that libc's table is sorted, ends with a no-information row,
    /// and that malloc's entry has the CFA at rsp + 8.
    #[test]
    fn libc_rows() {
        let table = table_of("/lib/x86_64-linux-gnu/libc.so.6");
        assert!(!table.frame_pointers, "Debian's libc has no frame pointers");
        let rows = table.rows;
        assert!(rows.len() > 10_000, "{} rows", rows.len());
        assert!(rows.windows(2).all(|pair| pair[0].pc < pair[1].pc));
        assert_eq!(rows.last().unwrap().cfa_rule, CfaRule::NoInfo as u8);
        let libc =
            crate::elf::ElfFile::open(std::path::Path::new("/lib/x86_64-linux-gnu/libc.so.6"))
                .unwrap();
        let malloc = libc.functions(|name| (name == "malloc").then(|| name.to_string()));
        let address = libc.virtual_address(malloc["malloc"].offset).unwrap() as u32;
        let at = rows.partition_point(|row| row.pc <= address) - 1;
        assert_eq!((rows[at].cfa_rule, rows[at].cfa_offset), (CfaRule::Rsp as u8, 8));
    }

    /// Check the frame-pointer discipline on hand-made functions: a frame
    /// pointer body and a frameless leaf pass; rbp pushed as a plain
    /// register, or a frame kept on rsp, rules the object out.
    #[test]
    fn frame_pointer_discipline() {
        let row = |cfa_rule: CfaRule, cfa_offset, rbp_saved: bool| UnwindRow {
            cfa_rule: cfa_rule as u8,
            cfa_offset,
            rbp_rule: if rbp_saved { RbpRule::AtCfa as u8 } else { RbpRule::Same as u8 },
            rbp_offset: if rbp_saved { -16 } else { 0 },
            ..UnwindRow::EMPTY
        };
        let check = |functions: &[&[UnwindRow]]| {
            let mut check =
                FramePointerCheck { plt: Vec::new(), every_function: true, any_function: false };
            for rows in functions {
                check.function(0x1000, rows);
            }
            check.every_function && check.any_function
        };
        let body =
            [row(CfaRule::Rsp, 8, false), row(CfaRule::Rsp, 16, true), row(CfaRule::Rbp, 16, true)];
        let leaf = [row(CfaRule::Rsp, 8, false)];
        let rbp_as_register = [row(CfaRule::Rsp, 8, false), row(CfaRule::Rsp, 16, true)];
        let rsp_frame = [row(CfaRule::Rsp, 8, false), row(CfaRule::Rsp, 32, false)];
        assert!(check(&[&body, &leaf]));
        assert!(!check(&[&body, &rbp_as_register]));
        assert!(!check(&[&body, &rsp_frame]));
        assert!(!check(&[&leaf]), "no function keeps a frame pointer");
    }

    /// Check the gap and merge rules on hand-made spans.
    #[test]
    fn compaction() {
        let rule =
            |cfa_offset| UnwindRow { cfa_rule: CfaRule::Rsp as u8, cfa_offset, ..UnwindRow::EMPTY };
        let span = |start, end, row| Span { start, end, row };
        let rows = compact(vec![
            span(0x120, 0x130, rule(16)),
            span(0x100, 0x110, rule(8)),
            span(0x110, 0x120, rule(8)),
        ])
        .unwrap();
        let summary: Vec<(u32, u8, i32)> =
            rows.iter().map(|row| (row.pc, row.cfa_rule, row.cfa_offset)).collect();
        assert_eq!(summary, [(0x100, 1, 8), (0x120, 1, 16), (0x130, 0, 0)],);
        let gap = compact(vec![span(0x100, 0x110, rule(8)), span(0x200, 0x210, rule(8))]).unwrap();
        let pcs: Vec<(u32, u8)> = gap.iter().map(|row| (row.pc, row.cfa_rule)).collect();
        assert_eq!(pcs, [(0x100, 1), (0x110, 0), (0x200, 1), (0x210, 0)]);
    }
}
