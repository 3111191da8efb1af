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
pub(crate) fn sample() -> Vec<MemoryMap> {
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
    smaps += &entry(0x7fe8_711f_c000, 0x7fe8_712f_c000, "rw-s", "/memfd:fixture (deleted)", 1024);
    smaps += &entry(0x7fe8_712f_c000, 0x7fe8_713f_c000, "rw-s", "/SYSV00000000 (deleted)", 1024);
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
    smaps +=
        &entry(0x7f00_1420_1000, 0x7f00_1421_1000, "rw-p", "[anon: glibc: pthread stack: 77]", 8);
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
    smaps += &entry(arena + ARENA_ALIGN + 4096, arena + ARENA_ALIGN + 4096 + MIB, "rw-p", "", 4);
    smaps +=
        &entry(arena + ARENA_ALIGN + 4096 + MIB, arena + ARENA_ALIGN + 8192 + MIB, "rw-p", "", 4);
    // Only page aligned: not an arena.
    smaps += &entry(arena + 2 * ARENA_ALIGN + 4096, arena + 2 * ARENA_ALIGN + MIB, "rw-p", "", 4);
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
