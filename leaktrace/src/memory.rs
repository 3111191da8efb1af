//! Reads a process's own memory picture from /proc: RSS, PSS, USS and swap, split by kind of mapping, so a leak can be told from a cache and from allocator retention.
//!
//! The split is a heuristic over `/proc/PID/smaps`, because the kernel does
//! not say which allocator owns an anonymous mapping:
//!
//! - heap: `[heap]` (the brk heap) and glibc malloc arenas. glibc maps every
//!   non-main arena heap at an address aligned to HEAP_MAX_SIZE (64 MiB on
//!   64-bit), commits the low part read-write and leaves the rest PROT_NONE.
//! - thread stacks: glibc and musl put a PROT_NONE guard at the low end of
//!   each thread stack, so a read-write anonymous mapping directly above a
//!   `---p` anonymous mapping is taken for a stack.
//! - shared: anything another process could see (MAP_SHARED, SysV, memfd,
//!   /dev/shm) and deleted files, which are usually one of those.
//!
//! Pseudo-mappings such as `[vdso]` and `[vvar]` count as other anon, so the
//! categories add up to the totals.

use std::io::{self, Write};

use anyhow::{Context as _, Result};
use procfs::process::{MMPermissions, MMapPath, MemoryMap, Process};
use serde::Serialize;

/// glibc's HEAP_MAX_SIZE on 64-bit (2 * DEFAULT_MMAP_THRESHOLD_MAX): every
/// non-main arena heap starts at a multiple of it.
const ARENA_ALIGN: u64 = 64 << 20;

/// The smallest guard mapping taken as a thread stack's guard: one page.
const MIN_GUARD: u64 = 4096;

/// Memory of one kind of mapping, in bytes.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Usage {
    /// Virtual size of the mappings.
    pub size: u64,
    /// Resident set size.
    pub rss: u64,
    /// Proportional set size: shared pages divided among their sharers.
    pub pss: u64,
    /// Unique set size: pages only this process maps (Private_Clean + Private_Dirty).
    pub uss: u64,
    /// Swapped out.
    pub swap: u64,
    /// Number of mappings.
    pub count: u64,
}

impl Usage {
    fn add(&mut self, map: &MemoryMap) {
        self.size += map_size(map);
        self.rss += field(map, "Rss");
        self.pss += field(map, "Pss");
        self.uss += uss(map);
        self.swap += field(map, "Swap");
        self.count += 1;
    }
}

/// A process's memory at one moment, in bytes, split by kind of mapping.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct MemoryPicture {
    /// Resident set size over all mappings.
    pub rss: u64,
    /// Proportional set size over all mappings.
    pub pss: u64,
    /// Unique set size over all mappings.
    pub uss: u64,
    /// Swapped-out memory over all mappings.
    pub swap: u64,
    /// Size of the writable private mappings, as `pmap -d` counts "writeable/private".
    pub writable_private: u64,
    /// Number of threads (entries in /proc/PID/task).
    pub threads: u64,
    /// The brk heap and glibc malloc arenas.
    pub heap: Usage,
    /// Stacks of threads other than the main one.
    pub thread_stacks: Usage,
    /// The main thread's `[stack]`.
    pub main_stack: Usage,
    /// Every other private anonymous mapping, and pseudo-mappings like `[vdso]`.
    pub other_anon: Usage,
    /// Private file-backed mappings: code, data and read-only files.
    pub file: Usage,
    /// Shared mappings (files, anonymous, SysV, memfd, /dev/shm) and deleted files.
    pub shared: Usage,
}

/// The change of every field since a baseline, signed.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct MemoryDelta {
    /// Change of total RSS.
    pub rss: i64,
    /// Change of total PSS.
    pub pss: i64,
    /// Change of total USS.
    pub uss: i64,
    /// Change of total swap.
    pub swap: i64,
    /// Change of the writable private size.
    pub writable_private: i64,
    /// Change of the thread count.
    pub threads: i64,
    /// Change of heap RSS.
    pub heap_rss: i64,
    /// Change of thread stack RSS.
    pub thread_stacks_rss: i64,
    /// Change of the number of thread stack mappings.
    pub thread_stacks_count: i64,
    /// Change of other anonymous RSS.
    pub other_anon_rss: i64,
    /// Change of private file-backed RSS.
    pub file_rss: i64,
    /// Change of shared RSS.
    pub shared_rss: i64,
}

/// Readings a [`MemoryReader`] may take from its last walk of smaps before
/// it walks again anyway (PSS moves when other processes map or drop shared
/// pages, which the target's own counters do not show).
const MAX_REUSES: u32 = 9;

/// Reads a process's memory picture (/proc/PID/smaps and /proc/PID/task)
/// report after report. Reading
/// /proc/PID/smaps walks the target's page tables: with 1,000,000 small
/// blocks live (a ~100 MB heap) that walk was about half of leaktrace's CPU
/// while the target idled. So the walk is redone only when the process's
/// counters (/proc/PID/statm) or its mappings (/proc/PID/maps, no walk)
/// changed since the last one, and at least every [`MAX_REUSES`] + 1
/// readings.
pub struct MemoryReader {
    pid: u32,
    last: Option<Walked>,
}

/// The last walk of smaps and what the process looked like then.
struct Walked {
    counters: [u64; 5],
    maps: Vec<MemoryMap>,
    picture: MemoryPicture,
    reuses: u32,
}

impl MemoryReader {
    pub fn new(pid: u32) -> Self {
        Self { pid, last: None }
    }

    pub fn read(&mut self) -> Result<MemoryPicture> {
        let pid = self.pid;
        let process = process(pid)?;
        let statm = process.statm().with_context(|| format!("failed to read /proc/{pid}/statm"))?;
        let counters = [statm.size, statm.resident, statm.shared, statm.text, statm.data];
        let maps = process.maps().with_context(|| format!("failed to read /proc/{pid}/maps"))?.0;
        let threads = count_threads(&process, pid)?;
        if let Some(last) = &mut self.last {
            if last.counters == counters && last.maps == maps && last.reuses < MAX_REUSES {
                last.reuses += 1;
                return Ok(MemoryPicture { threads, ..last.picture.clone() });
            }
        }
        let mut picture = read_smaps(&process, pid)?;
        picture.threads = threads;
        self.last = Some(Walked { counters, maps, picture: picture.clone(), reuses: 0 });
        Ok(picture)
    }
}

fn process(pid: u32) -> Result<Process> {
    let raw_pid = i32::try_from(pid).with_context(|| format!("pid {pid} is out of range"))?;
    Process::new(raw_pid).with_context(|| format!("failed to read /proc/{pid}"))
}

/// The picture from /proc/PID/smaps, `threads` left at zero.
fn read_smaps(process: &Process, pid: u32) -> Result<MemoryPicture> {
    let maps = process.smaps().with_context(|| format!("failed to read /proc/{pid}/smaps"))?;
    Ok(classify(&maps.0))
}

fn count_threads(process: &Process, pid: u32) -> Result<u64> {
    let tasks = process.tasks().with_context(|| format!("failed to list /proc/{pid}/task"))?;
    let mut threads = 0;
    for task in tasks {
        // Threads that exit during the listing are skipped by procfs; what is
        // left here is a failure to read the directory itself.
        task.with_context(|| format!("failed to list /proc/{pid}/task"))?;
        threads += 1;
    }
    Ok(threads)
}

impl MemoryPicture {
    /// The change of every field from `baseline` to `self`.
    pub fn since(&self, baseline: &MemoryPicture) -> MemoryDelta {
        MemoryDelta {
            rss: diff(self.rss, baseline.rss),
            pss: diff(self.pss, baseline.pss),
            uss: diff(self.uss, baseline.uss),
            swap: diff(self.swap, baseline.swap),
            writable_private: diff(self.writable_private, baseline.writable_private),
            threads: diff(self.threads, baseline.threads),
            heap_rss: diff(self.heap.rss, baseline.heap.rss),
            thread_stacks_rss: diff(self.thread_stacks.rss, baseline.thread_stacks.rss),
            thread_stacks_count: diff(self.thread_stacks.count, baseline.thread_stacks.count),
            other_anon_rss: diff(self.other_anon.rss, baseline.other_anon.rss),
            file_rss: diff(self.file.rss, baseline.file.rss),
            shared_rss: diff(self.shared.rss, baseline.shared.rss),
        }
    }

    /// Write the memory section of a text report: three lines indented with a tab.
    ///
    /// The total RSS always shows its change since attach; the other changes
    /// show only where they are not zero, so a steady process reads short.
    pub fn write_text(&self, delta: &MemoryDelta, out: &mut impl Write) -> io::Result<()> {
        writeln!(
            out,
            "\tMemory: RSS {} ({} since attach), PSS {}, USS {}, swap {}{}; writable/private {}{}",
            human_bytes(self.rss),
            human_bytes_signed(delta.rss),
            human_bytes(self.pss),
            human_bytes(self.uss),
            human_bytes(self.swap),
            change(delta.swap),
            human_bytes(self.writable_private),
            change(delta.writable_private),
        )?;
        writeln!(
            out,
            "\t  heap {}; main stack {}; thread stacks {} for {}{}; other anon {}",
            category(&self.heap, delta.heap_rss, 0),
            category(&self.main_stack, 0, 0),
            category(&self.thread_stacks, delta.thread_stacks_rss, delta.thread_stacks_count),
            plural(self.threads, "thread"),
            count_change(delta.threads),
            category(&self.other_anon, delta.other_anon_rss, 0),
        )?;
        writeln!(
            out,
            "\t  file {}; shared {}",
            category(&self.file, delta.file_rss, 0),
            category(&self.shared, delta.shared_rss, 0),
        )
    }
}

/// Where a mapping's memory is counted.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Heap,
    ThreadStack,
    MainStack,
    OtherAnon,
    File,
    Shared,
}

/// Sum parsed smaps entries into a picture; `threads` is left at zero.
fn classify(maps: &[MemoryMap]) -> MemoryPicture {
    let mut picture = MemoryPicture::default();
    for (map, kind) in maps.iter().zip(kinds(maps)) {
        picture.rss += field(map, "Rss");
        picture.pss += field(map, "Pss");
        picture.uss += uss(map);
        picture.swap += field(map, "Swap");
        if map.perms.contains(MMPermissions::WRITE | MMPermissions::PRIVATE) {
            picture.writable_private += map_size(map);
        }
        let usage = match kind {
            Kind::Heap => &mut picture.heap,
            Kind::ThreadStack => &mut picture.thread_stacks,
            Kind::MainStack => &mut picture.main_stack,
            Kind::OtherAnon => &mut picture.other_anon,
            Kind::File => &mut picture.file,
            Kind::Shared => &mut picture.shared,
        };
        usage.add(map);
    }
    picture
}

/// The kind of each mapping, in the order given.
///
/// Arenas and stacks are recognised by their neighbours, so the mappings are
/// walked in address order (the order smaps lists them in).
fn kinds(maps: &[MemoryMap]) -> Vec<Kind> {
    let mut order: Vec<usize> = (0..maps.len()).collect();
    order.sort_by_key(|&i| maps[i].address.0);
    let mut kinds = vec![Kind::OtherAnon; maps.len()];
    // The end of the 64 MiB arena heap the previous mapping belongs to.
    let mut arena_end = None;
    let mut previous: Option<&MemoryMap> = None;
    for i in order {
        let map = &maps[i];
        let (start, end) = map.address;
        let adjacent = previous.filter(|prev| prev.address.1 == start);
        let kind = if is_shared(map) {
            Kind::Shared
        } else if !is_anonymous(map) {
            match &map.pathname {
                MMapPath::Path(_) => Kind::File,
                MMapPath::Heap => Kind::Heap,
                MMapPath::Stack => Kind::MainStack,
                MMapPath::TStack(_) => Kind::ThreadStack,
                _ => Kind::OtherAnon,
            }
        } else if start % ARENA_ALIGN == 0 || has_name(map, "anon: glibc: malloc arena") {
            Kind::Heap
        } else if adjacent.is_some() && arena_end.is_some_and(|arena_end| end <= arena_end) {
            // The PROT_NONE tail (or a later committed piece) of the arena
            // heap just below.
            Kind::Heap
        } else if is_read_write(map)
            && (adjacent.is_some_and(is_guard) || has_name(map, "anon: glibc: pthread stack"))
        {
            Kind::ThreadStack
        } else {
            Kind::OtherAnon
        };
        arena_end = match kind {
            Kind::Heap if start % ARENA_ALIGN == 0 => Some(start.saturating_add(ARENA_ALIGN)),
            Kind::Heap => arena_end,
            _ => None,
        };
        // A guard that is an arena's tail must not make the next mapping a stack.
        previous = Some(map).filter(|_| kind != Kind::Heap || !is_guard(map));
        kinds[i] = kind;
    }
    kinds
}

/// A private mapping with no file behind it: plain or named with prctl(PR_SET_VMA_ANON_NAME).
fn is_anonymous(map: &MemoryMap) -> bool {
    match &map.pathname {
        MMapPath::Anonymous => true,
        MMapPath::Other(name) => name.starts_with("anon:"),
        _ => false,
    }
}

/// Memory another process can map too, or a file that is gone from the file system.
fn is_shared(map: &MemoryMap) -> bool {
    if map.perms.contains(MMPermissions::SHARED) {
        return true;
    }
    match &map.pathname {
        MMapPath::Vsys(_) => true,
        MMapPath::Path(path) => {
            let path = path.to_string_lossy();
            path.ends_with(" (deleted)")
                || path.starts_with("/dev/shm/")
                || path.starts_with("/memfd:")
        }
        MMapPath::Other(name) => name.starts_with("anon_shmem:"),
        _ => false,
    }
}

/// A private anonymous PROT_NONE mapping of at least a page: a stack guard, or reserved space.
fn is_guard(map: &MemoryMap) -> bool {
    map.perms == MMPermissions::PRIVATE && is_anonymous(map) && map_size(map) >= MIN_GUARD
}

fn is_read_write(map: &MemoryMap) -> bool {
    map.perms.contains(MMPermissions::READ | MMPermissions::WRITE)
}

/// Whether the mapping's `[anon:...]` name starts with `prefix` (glibc 2.39+
/// names its mappings when the glibc.mem.decorate_maps tunable is set).
fn has_name(map: &MemoryMap, prefix: &str) -> bool {
    matches!(&map.pathname, MMapPath::Other(name) if name.starts_with(prefix))
}

fn map_size(map: &MemoryMap) -> u64 {
    map.address.1.saturating_sub(map.address.0)
}

/// One smaps field in bytes (procfs has already multiplied the kB by 1024).
fn field(map: &MemoryMap, key: &str) -> u64 {
    map.extension.map.get(key).copied().unwrap_or(0)
}

fn uss(map: &MemoryMap) -> u64 {
    field(map, "Private_Clean") + field(map, "Private_Dirty")
}

fn diff(now: u64, then: u64) -> i64 {
    let diff = i128::from(now) - i128::from(then);
    i64::try_from(diff).unwrap_or(if diff < 0 { i64::MIN } else { i64::MAX })
}

/// "176.0 MiB RSS (+170.0 MiB) in 9 mappings (+2)", changes only where not zero.
fn category(usage: &Usage, rss_delta: i64, count_delta: i64) -> String {
    let swap =
        if usage.swap > 0 { format!(" + {} swap", human_bytes(usage.swap)) } else { String::new() };
    format!(
        "{} RSS{}{} in {}{}",
        human_bytes(usage.rss),
        change(rss_delta),
        swap,
        plural(usage.count, "mapping"),
        count_change(count_delta),
    )
}

/// " (+1.5 MiB)", or nothing for no change.
fn change(delta: i64) -> String {
    if delta == 0 {
        String::new()
    } else {
        format!(" ({})", human_bytes_signed(delta))
    }
}

/// " (+2)", or nothing for no change.
fn count_change(delta: i64) -> String {
    if delta == 0 {
        String::new()
    } else {
        format!(" ({delta:+})")
    }
}

fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Bytes with a binary unit: "512 bytes", "12.0 KiB", "1.5 MiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A signed change with a binary unit: "+1.5 MiB", "-12.0 KiB", "+0 bytes".
pub fn human_bytes_signed(delta: i64) -> String {
    let sign = if delta < 0 { '-' } else { '+' };
    format!("{sign}{}", human_bytes(delta.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    /// Check that a reading of an idle process reuses the last walk of
    /// smaps, and gives the same picture.
    #[test]
    fn idle_process_read_without_walking_again() {
        let mut idle = std::process::Command::new("sleep").arg("30").spawn().expect("sleep runs");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut reader = MemoryReader::new(idle.id());
        let first = reader.read().expect("first reading");
        let second = reader.read().expect("second reading");
        let reuses = reader.last.as_ref().map(|last| last.reuses);
        let _ = idle.kill();
        let _ = idle.wait();
        assert!(first.rss > 0, "sleep has resident memory: {first:?}");
        assert_eq!(reuses, Some(1), "the second reading should reuse the first walk");
        assert_eq!(first, second);
    }

    use procfs::process::MemoryMaps;
    use procfs::FromBufRead as _;

    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    /// One smaps entry whose resident pages are all private dirty.
    fn entry(start: u64, end: u64, perms: &str, path: &str, rss_kib: u64) -> String {
        format!(
            "{start:x}-{end:x} {perms} 00000000 00:00 0                          {path}\n\
             Size: {size} kB\nRss: {rss_kib} kB\nPss: {rss_kib} kB\n\
             Shared_Clean: 0 kB\nShared_Dirty: 0 kB\nPrivate_Clean: 0 kB\nPrivate_Dirty: {rss_kib} kB\n\
             Swap: 0 kB\nVmFlags: rd wr mr mw me ac\n",
            size = (end - start) / KIB,
        )
    }

    fn parse(smaps: &str) -> Vec<MemoryMap> {
        MemoryMaps::from_buf_read(smaps.as_bytes()).expect("sample smaps parses").0
    }

    /// The layout of a real glibc process (trimmed from the fixture's smaps):
    /// program, brk heap, two arenas, three thread stacks, shared mappings,
    /// a malloc mmap chunk, libc, vdso and the main stack.
    fn sample() -> Vec<MemoryMap> {
        let mut smaps = String::new();
        smaps += &entry(0x55ae_d723_2000, 0x55ae_d723_3000, "r--p", "/tmp/memfix/fix", 4);
        smaps += &entry(0x55ae_d723_6000, 0x55ae_d723_7000, "rw-p", "/tmp/memfix/fix", 4);
        smaps += &entry(0x55ae_fc1b_3000, 0x55ae_fc96_f000, "rw-p", "[heap]", 7000);
        smaps += &entry(0x7fe8_5800_0000, 0x7fe8_5931_5000, "rw-p", "", 19000);
        smaps += &entry(0x7fe8_5931_5000, 0x7fe8_5c00_0000, "---p", "", 0);
        smaps += &entry(0x7fe8_6000_0000, 0x7fe8_6131_5000, "rw-p", "", 19000);
        smaps += &entry(0x7fe8_6131_5000, 0x7fe8_6400_0000, "---p", "", 0);
        smaps += &entry(0x7fe8_6f9f_9000, 0x7fe8_6f9f_a000, "---p", "", 0);
        smaps += &entry(0x7fe8_6f9f_a000, 0x7fe8_701f_a000, "rw-p", "", 8);
        smaps += &entry(0x7fe8_701f_a000, 0x7fe8_701f_b000, "---p", "", 0);
        smaps += &entry(0x7fe8_701f_b000, 0x7fe8_709f_b000, "rw-p", "", 8);
        smaps += &entry(0x7fe8_709f_b000, 0x7fe8_709f_c000, "---p", "", 0);
        smaps += &entry(0x7fe8_709f_c000, 0x7fe8_711f_c000, "rw-p", "", 8);
        smaps +=
            &entry(0x7fe8_711f_c000, 0x7fe8_712f_c000, "rw-s", "/memfd:fixture (deleted)", 1024);
        smaps +=
            &entry(0x7fe8_712f_c000, 0x7fe8_713f_c000, "rw-s", "/SYSV00000000 (deleted)", 1024);
        smaps += &entry(0x7fe8_713f_c000, 0x7fe8_714f_c000, "rw-s", "/dev/zero (deleted)", 1024);
        smaps += &entry(0x7fe8_714f_c000, 0x7fe8_7290_0000, "rw-p", "", 20488);
        smaps += &entry(
            0x7fe8_7290_0000,
            0x7fe8_7292_6000,
            "r--p",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            152,
        );
        smaps += &entry(
            0x7fe8_72ad_3000,
            0x7fe8_72ad_5000,
            "rw-p",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            8,
        );
        smaps += &entry(0x7fe8_72ae_d000, 0x7fe8_72af_1000, "r--p", "[vvar]", 0);
        smaps += &entry(0x7fe8_72af_3000, 0x7fe8_72af_5000, "r-xp", "[vdso]", 8);
        smaps += &entry(0x7ffe_82a5_6000, 0x7ffe_82a7_7000, "rw-p", "[stack]", 20);
        parse(&smaps)
    }

    /// Check that procfs reports smaps sizes in bytes, not kB.
    #[test]
    fn fields_are_bytes() {
        let maps = parse(&entry(0x1000, 0x3000, "rw-p", "", 8));
        assert_eq!(field(&maps[0], "Rss"), 8 * KIB, "Rss not in bytes: {:?}", maps[0].extension);
        assert_eq!(map_size(&maps[0]), 8 * KIB);
    }

    /// Check that every mapping of a real layout lands in its category.
    #[test]
    fn categories_of_a_glibc_process() {
        let kinds = kinds(&sample());
        use Kind::*;
        let expected = [
            File,
            File,
            Heap,
            Heap,
            Heap,
            Heap,
            Heap,
            OtherAnon,
            ThreadStack,
            OtherAnon,
            ThreadStack,
            OtherAnon,
            ThreadStack,
            Shared,
            Shared,
            Shared,
            OtherAnon,
            File,
            File,
            OtherAnon,
            OtherAnon,
            MainStack,
        ];
        assert_eq!(kinds, expected);
    }

    /// Check the sums of each category and of the totals on a real layout.
    #[test]
    fn sums_of_a_glibc_process() {
        let picture = classify(&sample());
        assert_eq!(picture.heap.rss, (7000 + 19000 + 19000) * KIB);
        assert_eq!(picture.heap.count, 5);
        // Both arenas in full, PROT_NONE tails included.
        assert_eq!(picture.heap.size, (0x55ae_fc96_f000 - 0x55ae_fc1b_3000) + 2 * ARENA_ALIGN);
        assert_eq!(picture.thread_stacks.count, 3);
        assert_eq!(picture.thread_stacks.rss, 24 * KIB);
        assert_eq!(picture.thread_stacks.size, 3 * 8 * MIB);
        assert_eq!(picture.main_stack.rss, 20 * KIB);
        assert_eq!(picture.main_stack.count, 1);
        assert_eq!(picture.shared.rss, 3 * MIB);
        assert_eq!(picture.shared.count, 3);
        assert_eq!(picture.file.rss, (4 + 4 + 152 + 8) * KIB);
        // Three guards, the malloc mmap chunk, vvar and vdso.
        assert_eq!(picture.other_anon.count, 6);
        assert_eq!(picture.other_anon.rss, (20488 + 8) * KIB);
        let parts = [
            &picture.heap,
            &picture.thread_stacks,
            &picture.main_stack,
            &picture.other_anon,
            &picture.file,
            &picture.shared,
        ];
        assert_eq!(
            parts.iter().map(|usage| usage.rss).sum::<u64>(),
            picture.rss,
            "categories must add up"
        );
        assert_eq!(picture.uss, picture.rss, "the sample is all private dirty");
        assert_eq!(picture.threads, 0, "classify does not count threads");
    }

    /// Check that USS is Private_Clean + Private_Dirty and that PSS and swap are summed.
    #[test]
    fn uss_pss_and_swap() {
        let smaps = "7f0000001000-7f0000009000 rw-p 00000000 00:00 0 \n\
                     Rss: 24 kB\nPss: 14 kB\nShared_Clean: 4 kB\nShared_Dirty: 8 kB\n\
                     Private_Clean: 4 kB\nPrivate_Dirty: 8 kB\nSwap: 8 kB\n\
                     7f0000010000-7f0000012000 r--p 00000000 fe:00 42                   /usr/lib/libz.so.1\n\
                     Rss: 8 kB\nPss: 2 kB\nShared_Clean: 8 kB\nShared_Dirty: 0 kB\n\
                     Private_Clean: 0 kB\nPrivate_Dirty: 0 kB\nSwap: 0 kB\n";
        let picture = classify(&parse(smaps));
        assert_eq!(picture.rss, 32 * KIB);
        assert_eq!(picture.pss, 16 * KIB);
        assert_eq!(picture.uss, 12 * KIB);
        assert_eq!(picture.swap, 8 * KIB);
        assert_eq!(picture.other_anon.uss, 12 * KIB);
        assert_eq!(picture.other_anon.swap, 8 * KIB);
        assert_eq!(picture.file.uss, 0);
        assert_eq!(picture.file.pss, 2 * KIB);
    }

    /// Check that writable/private counts mapping sizes of `w` + `p` mappings only.
    #[test]
    fn writable_private_by_size() {
        let mut smaps = String::new();
        smaps += &entry(0x10000, 0x30000, "rw-p", "", 4);
        smaps += &entry(0x30000, 0x40000, "r--p", "/usr/lib/libc.so.6", 4);
        smaps += &entry(0x50000, 0x60000, "rw-s", "/dev/shm/cache", 4);
        smaps += &entry(0x60000, 0x61000, "---p", "", 0);
        smaps += &entry(0x70000, 0x72000, "rwxp", "/tmp/jit", 0);
        let picture = classify(&parse(&smaps));
        assert_eq!(picture.writable_private, 0x20000 + 0x2000);
    }

    /// Check that a stack needs an adjacent PROT_NONE anonymous guard of a page or more.
    #[test]
    fn stack_needs_adjacent_guard() {
        let mut smaps = String::new();
        // A stack above its guard.
        smaps += &entry(0x7f00_1020_0000, 0x7f00_1020_1000, "---p", "", 0);
        smaps += &entry(0x7f00_1020_1000, 0x7f00_10a0_1000, "rw-p", "", 8);
        // A gap between the guard and the mapping: not a stack.
        smaps += &entry(0x7f00_1120_0000, 0x7f00_1120_1000, "---p", "", 0);
        smaps += &entry(0x7f00_1120_2000, 0x7f00_11a0_2000, "rw-p", "", 8);
        // Above a read-only file gap (as in a library): not a stack.
        smaps += &entry(0x7f00_1220_0000, 0x7f00_1220_1000, "---p", "/usr/lib/libm.so.6", 0);
        smaps += &entry(0x7f00_1220_1000, 0x7f00_1221_1000, "rw-p", "", 8);
        // Above a guard but read-only: not a stack.
        smaps += &entry(0x7f00_1320_0000, 0x7f00_1320_1000, "---p", "", 0);
        smaps += &entry(0x7f00_1320_1000, 0x7f00_1321_1000, "r--p", "", 8);
        // Named by glibc's decorate_maps, with no guard at all (guardsize 0).
        smaps += &entry(
            0x7f00_1420_1000,
            0x7f00_1421_1000,
            "rw-p",
            "[anon: glibc: pthread stack: 77]",
            8,
        );
        let kinds = kinds(&parse(&smaps));
        use Kind::*;
        assert_eq!(
            kinds,
            [
                OtherAnon,
                ThreadStack,
                OtherAnon,
                OtherAnon,
                File,
                OtherAnon,
                OtherAnon,
                OtherAnon,
                ThreadStack
            ]
        );
    }

    /// Check that only 64 MiB aligned anonymous mappings start an arena, and
    /// that a mapping above an arena's PROT_NONE tail is not taken for a stack.
    #[test]
    fn arena_alignment() {
        let arena = 0x7f00_0000_0000_u64;
        assert_eq!(arena % ARENA_ALIGN, 0);
        let mut smaps = String::new();
        smaps += &entry(arena, arena + MIB, "rw-p", "", 512);
        smaps += &entry(arena + MIB, arena + ARENA_ALIGN, "---p", "", 0);
        // Directly above the arena's tail: neither heap nor stack.
        smaps +=
            &entry(arena + ARENA_ALIGN + 4096, arena + ARENA_ALIGN + 4096 + MIB, "rw-p", "", 4);
        smaps += &entry(
            arena + ARENA_ALIGN + 4096 + MIB,
            arena + ARENA_ALIGN + 8192 + MIB,
            "rw-p",
            "",
            4,
        );
        // Only page aligned: not an arena.
        smaps +=
            &entry(arena + 2 * ARENA_ALIGN + 4096, arena + 2 * ARENA_ALIGN + MIB, "rw-p", "", 4);
        // Named by glibc's decorate_maps.
        smaps += &entry(
            arena + 3 * ARENA_ALIGN + 4096,
            arena + 3 * ARENA_ALIGN + MIB,
            "rw-p",
            "[anon: glibc: malloc arena]",
            4,
        );
        let kinds = kinds(&parse(&smaps));
        use Kind::*;
        assert_eq!(kinds, [Heap, Heap, OtherAnon, OtherAnon, OtherAnon, Heap]);
        let picture = classify(&parse(&smaps));
        assert_eq!(picture.heap.size, ARENA_ALIGN + MIB - 4096);
    }

    /// Check that shared, SysV, /dev/shm, memfd and deleted mappings are shared, and named anon is anon.
    #[test]
    fn shared_and_deleted() {
        let mut smaps = String::new();
        smaps += &entry(0x10000, 0x11000, "rw-s", "/var/cache/app.db", 4);
        smaps += &entry(0x20000, 0x21000, "rw-s", "/SYSV0000162e (deleted)", 4);
        smaps += &entry(0x30000, 0x31000, "r--p", "/dev/shm/ring", 4);
        smaps += &entry(0x40000, 0x41000, "rw-s", "/memfd:wayland (deleted)", 4);
        smaps += &entry(0x50000, 0x51000, "r-xp", "/usr/lib/libold.so (deleted)", 4);
        smaps += &entry(0x60000, 0x61000, "rw-s", "[anon_shmem:ring]", 4);
        smaps += &entry(0x70000, 0x71000, "rw-p", "[anon:scudo:primary]", 4);
        smaps += &entry(0x80000, 0x81000, "r--p", "/usr/lib/libnew.so", 4);
        let kinds = kinds(&parse(&smaps));
        use Kind::*;
        assert_eq!(kinds, [Shared, Shared, Shared, Shared, Shared, Shared, OtherAnon, File]);
    }

    /// Check that mappings given out of address order are classified as if sorted.
    #[test]
    fn order_does_not_matter() {
        let mut maps = sample();
        let sorted = classify(&maps);
        maps.reverse();
        assert_eq!(classify(&maps), sorted);
    }

    /// Check that `since` subtracts every field, with the sign.
    #[test]
    fn since_subtracts() {
        let baseline = MemoryPicture {
            rss: 10 * MIB,
            swap: 4 * MIB,
            threads: 4,
            heap: Usage { rss: 2 * MIB, ..Usage::default() },
            thread_stacks: Usage { rss: 24 * KIB, count: 3, ..Usage::default() },
            ..MemoryPicture::default()
        };
        let now = MemoryPicture {
            rss: 30 * MIB,
            pss: MIB,
            uss: MIB,
            writable_private: 2 * MIB,
            threads: 2,
            heap: Usage { rss: 22 * MIB, ..Usage::default() },
            thread_stacks: Usage { rss: 16 * KIB, count: 1, ..Usage::default() },
            other_anon: Usage { rss: 5, ..Usage::default() },
            file: Usage { rss: 6, ..Usage::default() },
            shared: Usage { rss: 7, ..Usage::default() },
            ..MemoryPicture::default()
        };
        let delta = now.since(&baseline);
        let expected = MemoryDelta {
            rss: 20 * MIB as i64,
            pss: MIB as i64,
            uss: MIB as i64,
            swap: -4 * MIB as i64,
            writable_private: 2 * MIB as i64,
            threads: -2,
            heap_rss: 20 * MIB as i64,
            thread_stacks_rss: -8 * KIB as i64,
            thread_stacks_count: -2,
            other_anon_rss: 5,
            file_rss: 6,
            shared_rss: 7,
        };
        assert_eq!(delta, expected);
        assert_eq!(baseline.since(&baseline), MemoryDelta::default());
    }

    /// Check the text section's wording, with and without changes.
    #[test]
    fn text_lines() {
        let mut baseline = classify(&sample());
        baseline.threads = 4;
        let mut now = baseline.clone();
        now.rss += 170 * MIB;
        now.heap.rss += 170 * MIB;
        now.swap += 4 * MIB;
        now.heap.swap += 4 * MIB;
        now.writable_private += 1024 * MIB;
        now.thread_stacks.count += 2;
        now.threads += 2;
        let mut out = Vec::new();
        now.write_text(&now.since(&baseline), &mut out).expect("write to a Vec");
        let text = String::from_utf8(out).expect("text is UTF-8");
        let expected =
            "\tMemory: RSS 237.2 MiB (+170.0 MiB since attach), PSS 67.2 MiB, USS 67.2 MiB, \
                        swap 4.0 MiB (+4.0 MiB); writable/private 1.1 GiB (+1.0 GiB)\n\
                        \t  heap 213.9 MiB RSS (+170.0 MiB) + 4.0 MiB swap in 5 mappings; \
                        main stack 20.0 KiB RSS in 1 mapping; \
                        thread stacks 24.0 KiB RSS in 5 mappings (+2) for 6 threads (+2); \
                        other anon 20.0 MiB RSS in 6 mappings\n\
                        \t  file 168.0 KiB RSS in 4 mappings; shared 3.0 MiB RSS in 3 mappings\n";
        assert_eq!(text, expected);

        let mut out = Vec::new();
        baseline.write_text(&MemoryDelta::default(), &mut out).expect("write to a Vec");
        let text = String::from_utf8(out).expect("text is UTF-8");
        let rest = text.replacen("(+0 bytes since attach)", "", 1);
        assert!(rest.len() < text.len(), "RSS change missing: {text}");
        assert!(!rest.contains("(+0") && !rest.contains("(-0"), "zero changes shown: {text}");
    }

    /// Check that the JSON field names are the documented snake_case ones.
    #[test]
    fn json_field_names() {
        let picture = serde_json::to_value(classify(&sample())).expect("picture serializes");
        for key in [
            "rss",
            "pss",
            "uss",
            "swap",
            "writable_private",
            "threads",
            "heap",
            "thread_stacks",
            "main_stack",
            "other_anon",
            "file",
            "shared",
        ] {
            assert!(picture.get(key).is_some(), "{key} missing from {picture}");
        }
        for key in ["size", "rss", "pss", "uss", "swap", "count"] {
            assert!(picture["heap"].get(key).is_some(), "heap.{key} missing from {picture}");
        }
        let delta = serde_json::to_value(MemoryDelta::default()).expect("delta serializes");
        for key in [
            "heap_rss",
            "thread_stacks_rss",
            "thread_stacks_count",
            "other_anon_rss",
            "file_rss",
            "shared_rss",
        ] {
            assert!(delta.get(key).is_some(), "{key} missing from {delta}");
        }
    }

    /// Check byte formatting, unsigned and signed.
    #[test]
    fn bytes() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(12 * KIB), "12.0 KiB");
        assert_eq!(human_bytes(3 * MIB / 2), "1.5 MiB");
        assert_eq!(human_bytes_signed(3 * MIB as i64 / 2), "+1.5 MiB");
        assert_eq!(human_bytes_signed(-12 * KIB as i64), "-12.0 KiB");
        assert_eq!(human_bytes_signed(0), "+0 bytes");
        assert_eq!(human_bytes_signed(i64::MIN), format!("-{}", human_bytes(1 << 63)));
    }

    /// Check that the test process reads itself: resident memory, a thread, a main stack.
    #[test]
    fn read_self() {
        let picture =
            MemoryReader::new(std::process::id()).read().expect("read own memory picture");
        assert!(picture.rss > 0, "no RSS: {picture:?}");
        assert!(picture.threads >= 1, "no threads: {picture:?}");
        assert_eq!(picture.main_stack.count, 1, "no [stack]: {picture:?}");
        assert!(picture.file.count > 0, "no file mappings: {picture:?}");
        assert!(picture.uss <= picture.rss && picture.pss <= picture.rss, "{picture:?}");
    }

    /// Check that a missing process fails with its /proc path in the message.
    #[test]
    fn read_missing_process() {
        // Above the kernel's PID_MAX_LIMIT (4 Mi), so never a live process.
        let err = MemoryReader::new(0x7fff_fff0).read().expect_err("no such process");
        assert!(format!("{err:#}").contains("failed to read /proc/2147483632"), "{err:#}");
    }
}
