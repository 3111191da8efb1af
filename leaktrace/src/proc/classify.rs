//! Which kind of memory each mapping is: the split of a process's memory
//! picture by kind of mapping, a heuristic over `/proc/PID/smaps`, because
//! the kernel does not say which allocator owns an anonymous mapping:
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

use leaktrace_report::{MemoryPicture, Usage};
use procfs::process::{MMPermissions, MMapPath, MemoryMap};

/// glibc's HEAP_MAX_SIZE on 64-bit (2 * DEFAULT_MMAP_THRESHOLD_MAX): every
/// non-main arena heap starts at a multiple of it.
const ARENA_ALIGN: u64 = 64 << 20;

/// The smallest guard mapping taken as a thread stack's guard: one page.
const MIN_GUARD: u64 = 4096;

fn add(usage: &mut Usage, map: &MemoryMap) {
    usage.size += map_size(map);
    usage.rss += field(map, "Rss");
    usage.pss += field(map, "Pss");
    usage.uss += uss(map);
    usage.swap += field(map, "Swap");
    usage.count += 1;
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
pub fn classify(maps: &[MemoryMap]) -> MemoryPicture {
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
        add(usage, map);
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

#[cfg(test)]
pub(crate) mod tests;
