//! The unwind tables the kernel programs walk: each executable object's
//! call-frame information (.eh_frame, with .debug_frame filling what it does
//! not cover) reduced to the two rules an x86-64 walk needs, where the
//! caller's stack pointer is (the CFA) and where rbp was saved, and the
//! target's executable mappings, republished whenever they change (dlopen).
//!
//! gimli evaluates the CFI programs (it is what blazesym and the Rust
//! backtrace crates use); this module only reduces its rows.

use std::{
    collections::HashMap,
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use aya::maps::{Array, Map, MapData, RingBuf};
use gimli::{
    BaseAddresses, CfaRule as GimliCfa, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian,
    RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use leaktrace_common::{
    CfaRule, RbpRule, UnwindChunk, UnwindMapping, UnwindRow, MAPPING_FRAME_POINTERS,
    MAP_LINK_MAP_CHANGES, MAP_UNWIND_MAPPINGS, MAP_UNWIND_ROWS, MAP_UNWIND_STATE,
    MAX_UNWIND_MAPPINGS, UNWIND_CHUNK_ROWS,
};
use memmap2::Mmap;

use crate::symbolizer::{Module, SharedModules};
use object::{elf::PF_X, Object as _, ObjectSection as _, ObjectSegment as _, SegmentFlags};
use procfs::process::{MMPermissions, MMapPath, Process};

/// How often the mappings are checked: often while a `-c` program is
/// starting (its libraries are being mapped), then at the report tick.
const FAST_POLL: Duration = Duration::from_millis(5);
const FAST_PERIOD: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(100);

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

/// The unwind table of an object file.
pub fn object_rows(data: &[u8]) -> anyhow::Result<ObjectTable> {
    let file = object::File::parse(data)?;
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

/// An executable mapping as /proc/PID/maps shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ExecMapping {
    start: u64,
    end: u64,
    offset: u64,
    /// (device, inode): the same file mapped twice shares its rows.
    file: (u64, u64),
    path: PathBuf,
}

/// A PT_LOAD segment: file range and link-time address.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    size: u64,
    address: u64,
}

const PAGE_SIZE: u64 = 4096;

/// Runtime minus link-time address for an executable mapping. The kernel
/// maps a segment from its file offset rounded down to a page, so the
/// mapping's offset can lie before the segment's own (lld does not
/// page-align segments in the file).
fn mapping_bias(segments: &[Segment], mapping: &ExecMapping) -> Option<u64> {
    segments.iter().find_map(|segment| {
        let page_start = segment.offset & !(PAGE_SIZE - 1);
        (page_start <= mapping.offset && mapping.offset < segment.offset + segment.size).then(
            || {
                // The link-time address of the mapping's first byte.
                let address = (segment.address - segment.offset).wrapping_add(mapping.offset);
                mapping.start.wrapping_sub(address)
            },
        )
    })
}

/// Where an object's rows are, and how its file offsets become addresses.
#[derive(Clone, Debug)]
struct LoadedObject {
    first_row: u32,
    rows: u32,
    frame_pointers: bool,
    /// The executable PT_LOAD segments.
    segments: Vec<Segment>,
}

/// Keeps the kernel's unwind maps in step with the target's mappings.
pub struct Unwinder {
    pid: u32,
    rows: Array<MapData, UnwindChunk>,
    mappings: Array<MapData, UnwindMapping>,
    state: Array<MapData, u64>,
    /// Wake-ups from the dynamic linker's hook.
    changes: RingBuf<MapData>,
    objects: HashMap<(u64, u64), LoadedObject>,
    next_chunk: u32,
    /// Publications so far; the live set is `generation & 1`.
    generation: u32,
    seen: Vec<ExecMapping>,
    full_warned: bool,
    /// For `-c`: the program's (device, inode), which the target runs once
    /// it has exec'd.
    program: Option<(u64, u64)>,
    /// The mappings last published, for the symbolizer.
    followed: SharedModules,
}

impl Unwinder {
    /// Takes the unwind maps out of `ebpf`: from now on only this writes them.
    pub fn new(ebpf: &mut aya::Ebpf, pid: u32) -> anyhow::Result<Self> {
        let mut take = |name: &str| -> anyhow::Result<Map> {
            ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        Ok(Self {
            pid,
            rows: Array::try_from(take(MAP_UNWIND_ROWS)?)?,
            mappings: Array::try_from(take(MAP_UNWIND_MAPPINGS)?)?,
            state: Array::try_from(take(MAP_UNWIND_STATE)?)?,
            changes: RingBuf::try_from(take(MAP_LINK_MAP_CHANGES)?)?,
            objects: HashMap::new(),
            next_chunk: 0,
            generation: 0,
            seen: Vec::new(),
            full_warned: false,
            program: None,
            followed: SharedModules::default(),
        })
    }

    /// Publish the target's executable mappings if they changed, loading
    /// the tables of objects not seen before. Returns whether they changed.
    pub fn refresh(&mut self) -> anyhow::Result<bool> {
        if let Some(program) = self.program {
            // A `-c` child still held before exec maps leaktrace itself.
            let exe = file_key(Path::new(&format!("/proc/{}/exe", self.pid)))
                .map_err(|_| anyhow!("process {} has exited", self.pid))?;
            if exe != program {
                return Ok(false);
            }
        }
        let current = exec_mappings(self.pid)?;
        if current == self.seen {
            return Ok(false);
        }
        let started = Instant::now();
        let chunks_before = self.next_chunk;
        let mut published = Vec::with_capacity(current.len());
        for mapping in &current {
            let Some(object) = self.object(mapping) else {
                continue;
            };
            let Some(bias) = mapping_bias(&object.segments, mapping) else {
                continue;
            };
            published.push(UnwindMapping {
                start: mapping.start,
                end: mapping.end,
                bias,
                first_row: object.first_row,
                rows: object.rows,
                flags: if object.frame_pointers { MAPPING_FRAME_POINTERS } else { 0 },
            });
        }
        published.sort_by_key(|mapping| mapping.start);
        published.truncate(MAX_UNWIND_MAPPINGS as usize);
        let generation = self.generation.wrapping_add(1);
        let set = generation & 1;
        for (index, mapping) in published.iter().enumerate() {
            self.mappings
                .set(set * MAX_UNWIND_MAPPINGS + index as u32, mapping, 0)
                .context("failed to publish an unwind mapping")?;
        }
        let state = (published.len() as u64) << 32 | u64::from(generation);
        self.state.set(0, state, 0).context("failed to publish the unwind mappings")?;
        self.generation = generation;
        if let Ok(mut followed) = self.followed.lock() {
            *followed = current
                .iter()
                .map(|mapping| Module {
                    start: mapping.start,
                    end: mapping.end,
                    offset: mapping.offset,
                    path: mapping.path.clone(),
                })
                .collect();
        }
        log::info!(
            "unwind: {} executable mappings published, {} new rows loaded, in {:.1} ms",
            published.len(),
            (self.next_chunk - chunks_before) as usize * UNWIND_CHUNK_ROWS,
            started.elapsed().as_secs_f64() * 1000.0
        );
        self.seen = current;
        Ok(true)
    }

    /// The loaded rows of a mapping's file, loading them on first sight.
    /// `None` when the file cannot be read (it is then never walked into).
    fn object(&mut self, mapping: &ExecMapping) -> Option<LoadedObject> {
        if let Some(object) = self.objects.get(&mapping.file) {
            return Some(object.clone());
        }
        let object = match self.load(mapping) {
            Ok(object) => object,
            Err(err) => {
                log::info!("unwind: no table for {}: {err:#}", mapping.path.display());
                LoadedObject { first_row: 0, rows: 0, frame_pointers: false, segments: Vec::new() }
            }
        };
        self.objects.insert(mapping.file, object.clone());
        Some(object)
    }

    fn load(&mut self, mapping: &ExecMapping) -> anyhow::Result<LoadedObject> {
        // map_files opens exactly the file mapped, in whatever mount
        // namespace, even if it was deleted or replaced since.
        let path = format!("/proc/{}/map_files/{:x}-{:x}", self.pid, mapping.start, mapping.end);
        let file = File::open(&path).with_context(|| format!("failed to open {path}"))?;
        self.load_file(&file, &mapping.path)
    }

    /// Load the tables of objects a `-c` program will map, before it runs:
    /// its mappings then only need publishing, which the dynamic linker's
    /// hook triggers before the program's first line. `program` is the file
    /// it will execute; until the target runs it, its mappings are ignored.
    pub fn preload(&mut self, program: &Path, objects: &[PathBuf]) {
        self.program = file_key(program).ok();
        for path in objects {
            let Ok(key) = file_key(path) else {
                continue;
            };
            if self.objects.contains_key(&key) {
                continue;
            }
            let loaded = File::open(path)
                .map_err(anyhow::Error::from)
                .and_then(|file| self.load_file(&file, path));
            match loaded {
                Ok(object) => {
                    self.objects.insert(key, object);
                }
                Err(err) => log::info!("unwind: no table for {}: {err:#}", path.display()),
            }
        }
    }

    fn load_file(&mut self, file: &File, shown: &Path) -> anyhow::Result<LoadedObject> {
        // SAFETY: read-only; the object crate and gimli validate what they
        // parse, so a file changed underneath gives wrong rows, not UB.
        let data = unsafe { Mmap::map(file) }
            .with_context(|| format!("failed to map {}", shown.display()))?;
        let segments = object::File::parse(&*data)?
            .segments()
            .filter(|segment| {
                matches!(segment.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0)
            })
            .map(|segment| {
                let (offset, size) = segment.file_range();
                Segment {
                    offset,
                    size,
                    address: segment.address(),
                }
            })
            .collect();
        let ObjectTable { rows, frame_pointers } = object_rows(&data)?;
        let chunks = rows.len().div_ceil(UNWIND_CHUNK_ROWS) as u32;
        let capacity = self.rows.len();
        if self.next_chunk + chunks > capacity {
            if !self.full_warned {
                eprintln!(
                    "leaktrace: warning: unwind tables full ({} rows, see --unwind-rows); stacks through {} and later libraries end there",
                    capacity as usize * UNWIND_CHUNK_ROWS,
                    shown.display()
                );
                self.full_warned = true;
            }
            anyhow::bail!("unwind tables full");
        }
        let first_chunk = self.next_chunk;
        for (index, part) in rows.chunks(UNWIND_CHUNK_ROWS).enumerate() {
            let mut chunk = UnwindChunk { rows: [UnwindRow::EMPTY; UNWIND_CHUNK_ROWS] };
            chunk.rows[..part.len()].copy_from_slice(part);
            self.rows
                .set(first_chunk + index as u32, chunk, 0)
                .context("failed to load unwind rows")?;
        }
        self.next_chunk += chunks;
        log::info!(
            "unwind: {} rows for {}{}",
            rows.len(),
            shown.display(),
            if frame_pointers { ", built with frame pointers" } else { "" }
        );
        Ok(LoadedObject {
            first_row: first_chunk * UNWIND_CHUNK_ROWS as u32,
            rows: rows.len() as u32,
            frame_pointers,
            segments,
        })
    }

    /// The mappings last published, kept current from now on.
    pub fn followed(&self) -> SharedModules {
        Arc::clone(&self.followed)
    }

    /// Keep the tables current from a thread of its own until `stop`:
    /// at once when the dynamic linker says its objects changed, and by
    /// polling for anything mapped otherwise.
    pub fn spawn(mut self, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Err(err) = self.refresh() {
                    if Process::new(self.pid as i32).is_ok() {
                        eprintln!(
                            "leaktrace: warning: unwind tables no longer kept current: {err:#}"
                        );
                    }
                    // Otherwise the target is gone; the session reports it.
                    return;
                }
                let fast = started.elapsed() < FAST_PERIOD;
                self.wait_for_change(if fast { FAST_POLL } else { POLL });
            }
        })
    }

    /// Sleep until the linker's hook fires or `timeout` passes.
    fn wait_for_change(&mut self, timeout: Duration) {
        let mut poll =
            libc::pollfd { fd: self.changes.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
        while self.changes.next().is_some() {}
    }
}

/// A file's (device, inode), as /proc/PID/maps gives them.
fn file_key(path: &Path) -> std::io::Result<(u64, u64)> {
    let metadata = std::fs::metadata(path)?;
    let device = metadata.dev();
    Ok((u64::from(libc::major(device)) << 32 | u64::from(libc::minor(device)), metadata.ino()))
}

/// The target's file-backed executable mappings.
fn exec_mappings(pid: u32) -> anyhow::Result<Vec<ExecMapping>> {
    let maps = Process::new(pid as i32)
        .and_then(|process| process.maps())
        .map_err(|_| anyhow!("process {pid} has exited"))?;
    Ok(maps
        .into_iter()
        .filter(|map| map.perms.contains(MMPermissions::EXECUTE))
        .filter_map(|map| match map.pathname {
            MMapPath::Path(path) => Some(ExecMapping {
                start: map.address.0,
                end: map.address.1,
                offset: map.offset,
                file: ((map.dev.0 as u64) << 32 | map.dev.1 as u64, map.inode),
                path,
            }),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_of(path: &str) -> ObjectTable {
        let file = File::open(path).unwrap();
        // SAFETY: a system library, read-only.
        let data = unsafe { Mmap::map(&file) }.unwrap();
        object_rows(&data).unwrap()
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

    /// Check the bias of a mapping whose segment starts mid-page in the file
    /// (as lld lays out Rust binaries): offset 0x154d0 at 0x164d0.
    #[test]
    fn bias_of_unaligned_segment() {
        let segments = [Segment { offset: 0x154d0, size: 0x40000, address: 0x164d0 }];
        let mapping = ExecMapping {
            start: 0x5555_5556_a000,
            end: 0x5555_555a_a000,
            offset: 0x15000,
            file: (0, 0),
            path: PathBuf::new(),
        };
        // File offset 0x15000 is link-time address 0x16000.
        assert_eq!(mapping_bias(&segments, &mapping), Some(0x5555_5556_a000 - 0x16000));
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
