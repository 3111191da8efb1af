//! Keeps the kernel's unwind maps in step with the target: loads each
//! executable object's table ([`super::table`]) into `UNWIND_ROWS` once,
//! however often it is mapped, and publishes the target's executable
//! mappings to `UNWIND_MAPPINGS` whenever they change (dlopen). The session
//! calls [`Unwinder::refresh`] when the dynamic linker's hook fires and on
//! a poll; this module owns no thread and no timer.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{anyhow, Context as _};
use aya::maps::{Array, Map, MapData};
use leaktrace_common::{
    TextRange, UnwindChunk, UnwindMapping, UnwindRow, MAPPING_FRAME_POINTERS, MAP_ALLOCATOR_TEXT,
    MAP_UNWIND_MAPPINGS, MAP_UNWIND_ROWS, MAP_UNWIND_STATE, MAX_UNWIND_MAPPINGS, UNWIND_CHUNK_ROWS,
};

use super::table::{object_rows, ObjectTable};
use crate::{
    elf::ElfFile,
    proc::{exec_mappings, file_key, map_file, maps, ExecMapping},
};

/// Half the soft limit of open files (`RLIMIT_NOFILE`, which the session
/// raised to its hard limit).
fn keep_files() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 512;
    }
    usize::try_from(limit.rlim_cur / 2).unwrap_or(usize::MAX)
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
    /// Where glibc's libc code is (`ALLOCATOR_TEXT`), and its file.
    allocator_text: Array<MapData, TextRange>,
    allocator: Option<(u64, u64)>,
    objects: HashMap<(u64, u64), LoadedObject>,
    /// Objects' files, open for the session (at most `keep_files`).
    files: HashMap<(u64, u64), File>,
    /// How many files to keep open: half the descriptors leaktrace may
    /// have. Past that, an object's file is closed once its table is
    /// loaded, and symbolized through the target's /proc/PID/root.
    keep_files: usize,
    next_chunk: u32,
    /// Publications so far; the live set is `generation & 1`.
    generation: u32,
    seen: Vec<ExecMapping>,
    full_warned: bool,
    /// For `-c`: the program's (device, inode), which the target runs once
    /// it has exec'd.
    program: Option<(u64, u64)>,
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
            allocator_text: Array::try_from(take(MAP_ALLOCATOR_TEXT)?)?,
            allocator: None,
            objects: HashMap::new(),
            files: HashMap::new(),
            keep_files: keep_files(),
            next_chunk: 0,
            generation: 0,
            seen: Vec::new(),
            full_warned: false,
            program: None,
        })
    }

    /// Publish the target's executable mappings if they changed, loading
    /// the tables of objects not seen before. Returns whether they changed.
    pub fn refresh(&mut self) -> anyhow::Result<bool> {
        if let Some(program) = self.program {
            // A `-c` child still held before exec maps leaktrace itself.
            let exe = file_key(Path::new(&format!("/proc/{}/exe", crate::proc::reader(self.pid))))
                .map_err(|_| anyhow!("process {} has exited", self.pid))?;
            if exe != program {
                return Ok(false);
            }
            // It runs its program: from now on, whatever it maps counts,
            // another program it execs too.
            self.program = None;
        }
        let current =
            exec_mappings(&maps(self.pid).map_err(|_| anyhow!("process {} has exited", self.pid))?);
        // No executable mapping at all: the process is exiting (a zombie's
        // maps are empty). Its last mappings stay, to symbolize what it held.
        if current == self.seen || current.is_empty() {
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
        self.publish_allocator_text(&current)?;
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
        let path = map_file(self.pid, mapping.start, mapping.end);
        let file =
            File::open(&path).with_context(|| format!("failed to open {}", path.display()))?;
        let loaded = self.load_file(&file, &mapping.path);
        self.keep(mapping.file, file);
        loaded
    }

    /// Keep `file` open for the session, while under [`Self::keep_files`].
    fn keep(&mut self, key: (u64, u64), file: File) {
        if self.files.len() < self.keep_files {
            self.files.insert(key, file);
        }
    }

    /// Each object's file as this process can open it, by (device, inode):
    /// `/proc/self/fd/N` of the file kept open since it was first mapped, so
    /// that it is the very file mapped, in any mount namespace, and still
    /// there once the target has exited.
    pub fn file_paths(&self) -> HashMap<(u64, u64), PathBuf> {
        self.files
            .iter()
            .map(|(&key, file)| (key, PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))))
            .collect()
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
            let loaded = File::open(path).map_err(anyhow::Error::from).and_then(|file| {
                let loaded = self.load_file(&file, path);
                self.keep(key, file);
                loaded
            });
            match loaded {
                Ok(object) => {
                    self.objects.insert(key, object);
                }
                Err(err) => log::info!("unwind: no table for {}: {err:#}", path.display()),
            }
        }
    }

    fn load_file(&mut self, file: &File, shown: &Path) -> anyhow::Result<LoadedObject> {
        let elf = ElfFile::from_file(file, shown)?;
        let segments = elf
            .exec_segments()
            .into_iter()
            .map(|(offset, size, address)| Segment { offset, size, address })
            .collect();
        let ObjectTable { rows, frame_pointers } = object_rows(&elf)?;
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

    /// The process whose mappings these are.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The target's executable mappings as last published: its libraries
    /// loaded since, and once it has exited, the last ones it had.
    pub fn mappings(&self) -> &[ExecMapping] {
        &self.seen
    }

    /// Name the file of glibc's shared libc (by device and inode), whose
    /// code's range the programs are told at each publication: a free
    /// called from there is the allocator's own.
    pub fn set_allocator(&mut self, file: Option<(u64, u64)>) {
        self.allocator = file;
    }

    /// Write where the allocator's code is mapped among `current` (none:
    /// zero) to `ALLOCATOR_TEXT`.
    fn publish_allocator_text(&mut self, current: &[ExecMapping]) -> anyhow::Result<()> {
        let range = allocator_text(current, self.allocator);
        self.allocator_text.set(0, range, 0).context("failed to publish the allocator's range")?;
        Ok(())
    }
}

/// The range of `file`'s executable mappings among `mappings`, or zero.
fn allocator_text(mappings: &[ExecMapping], file: Option<(u64, u64)>) -> TextRange {
    let mut ranges = mappings.iter().filter(|mapping| Some(mapping.file) == file);
    let Some(first) = ranges.next() else {
        return TextRange::default();
    };
    ranges.fold(TextRange { start: first.start, end: first.end }, |range, mapping| TextRange {
        start: range.start.min(mapping.start),
        end: range.end.max(mapping.end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that the allocator's range spans its file's mappings alone.
    #[test]
    fn allocator_range() {
        let mapping = |start: u64, end: u64, file: (u64, u64)| ExecMapping {
            start,
            end,
            offset: 0,
            file,
            path: PathBuf::new(),
        };
        let maps = [mapping(0x1000, 0x2000, (1, 2)), mapping(0x8000, 0x9000, (1, 3))];
        assert_eq!(allocator_text(&maps, Some((1, 3))), TextRange { start: 0x8000, end: 0x9000 });
        assert_eq!(allocator_text(&maps, None), TextRange::default());
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
}
