//! A verdict that never swallows a leak: each free counted once through
//! wrappers (Rust's `__rust_dealloc`, C++'s sized delete into tcmalloc) and
//! thread exit (glibc's thread cache), and "replacing" only for a call site
//! with evidence about itself (its size class freed, a sampled free in its
//! own function), never for a leak beside it. C names as written.

use leaktrace_tests::*;

/// The final report's verdict, checked to call a leak whose fastest site
/// starts with `function` (a Rust path may come first), and to say
/// nothing of a replacement unless `replacing`.
fn assert_leak(reports: &[Report], function: &str, replacing: bool) {
    let report = final_report(reports);
    let verdict = verdict(report);
    let leak = verdict.findings.iter().find_map(|finding| match finding {
        Finding::Leak { top, .. } => Some(top.as_str()),
        _ => None,
    });
    assert!(
        leak.is_some_and(|top| top.contains(function)),
        "the leak at {function} is not the leak named ({:?}): {}",
        verdict.text,
        json(report)
    );
    assert_eq!(
        verdict.kinds.contains(&VerdictKind::Replacing),
        replacing,
        "replacing said {}: {}",
        if replacing { "not" } else { "wrongly" },
        json(report)
    );
}

/// Check that no report takes the leak at `function` for a replacement:
/// its stack is never labelled `replacing`.
fn never_replacing(reports: &[Report], function: &str) {
    for report in reports {
        for stack in stacks_by_first_frame_containing(report, function) {
            assert!(
                stack.replacing.is_none()
                    && stack.growth.is_none_or(|growth| growth.trend != Trend::Replacing),
                "the leak at {function} was taken for a replacement: {}",
                json(report)
            );
        }
    }
}

/// Frees of memory from before attach that a report counted.
fn preattach_frees(report: &Report) -> u64 {
    report.freed_before_attach.map_or(0, |freed| freed.count)
}

/// Check that a Rust program leaking beside an 8 MiB/s Vec churn is a
/// leak: each free, seen at `__rust_dealloc` and again at libc's `free`,
/// counts once (no phantom frees of pre-attach memory), and `-t` prints
/// it once.
#[test]
fn rust_churn_beside_a_leak_is_a_leak() {
    let mut fixture = Fixture::start("rust_churn", &[]);
    let finished = run_over_time(&mut fixture, 6, &["--top", "1000", "-t"]);
    let reports = finished.reports();
    assert_leak(&reports, "leak_step", false);
    never_replacing(&reports, "leak_step");
    let report = final_report(&reports);
    assert!(preattach_frees(report) < 50, "phantom pre-attach frees: {}", json(report));
    // The trace in order, split where lines were dropped (over 1000 a
    // second): one free a block means no free right after a free of the
    // same address.
    let mut frees = 0;
    let mut twice = 0;
    let mut last: Option<(bool, &str)> = None;
    for line in finished.stderr.lines() {
        let event = line.strip_prefix("trace: ").and_then(|rest| {
            Some((
                rest.starts_with("free"),
                rest.split_whitespace().find(|w| w.starts_with("addr="))?,
            ))
        });
        match event {
            Some((true, addr)) => {
                frees += 1;
                twice += usize::from(last == Some((true, addr)));
                last = Some((true, addr));
            }
            Some((false, addr)) => last = Some((false, addr)),
            None => last = None,
        }
    }
    assert!(frees > 100, "too few free lines traced:\n{}", finished.stderr);
    assert_eq!(twice, 0, "{twice} frees traced twice in a row");
}

/// Check that C++ on tcmalloc, whose sized operator delete tail-jumps to
/// tc_free, leaking 1 KiB strings into a vector beside string churn, is a
/// leak at the vector's appender, with no phantom frees of pre-attach
/// memory.
#[test]
fn tcmalloc_sized_delete_beside_a_leak_is_a_leak() {
    let reports = trace_over_time("tcmalloc_sized_delete", 6);
    assert_leak(&reports, "remember", false);
    never_replacing(&reports, "remember");
    let report = final_report(&reports);
    assert!(preattach_frees(report) < 50, "phantom pre-attach frees: {}", json(report));
}

/// Check that a 40 MB store from before attach, replaced at 10,000 blocks
/// a second, is `replacing` with its evidence (blocks of its size freed in
/// its own function), while a slow leak of 32 blocks a second beside it
/// is called a leak.
#[test]
fn big_heap_replaced_beside_a_slow_leak() {
    let reports = trace_over_time("big_heap_replaced", 6);
    assert_leak(&reports, "slow_leak", true);
    never_replacing(&reports, "slow_leak");
    let report = final_report(&reports);
    let renew = stack_by_first_frame(report, "session_renew")
        .unwrap_or_else(|| panic!("no session_renew stack: {}", json(report)));
    let evidence = renew
        .replacing
        .as_ref()
        .unwrap_or_else(|| panic!("session_renew not replacing: {}", json(report)));
    assert_eq!(evidence.freed_in.as_deref(), Some("session_renew"), "{}", json(report));
    assert!(
        evidence.same_size_frees_per_second.is_some_and(|rate| rate > 5000.0),
        "{}",
        json(report)
    );
    assert_eq!(renew.growth.map(|growth| growth.trend), Some(Trend::Replacing));
}

/// Check that a leak of blocks of the ring's own size class, at a tenth of
/// the ring's pace (inside any slack of a match of rates), is a leak: the
/// frees of the ring's old members are in ring_put, not in the leak's
/// function.
#[test]
fn leak_of_the_rings_size_class_is_a_leak() {
    let reports = trace_over_time("ring_same_class", 6);
    assert_leak(&reports, "leak_same_size", true);
    never_replacing(&reports, "leak_same_size");
    let report = final_report(&reports);
    let ring = stack_by_first_frame(report, "ring_put")
        .unwrap_or_else(|| panic!("no ring_put stack: {}", json(report)));
    assert!(ring.replacing.is_some(), "ring_put not replacing: {}", json(report));
}

/// Check that a leak beside 200 short threads a second is a leak: what
/// glibc frees of its thread caches as threads exit is the allocator's
/// own, counted apart, not memory from before attach being replaced.
#[test]
fn short_threads_beside_a_leak_is_a_leak() {
    let reports = trace_over_time("short_threads", 6);
    assert_leak(&reports, "leak_page", false);
    never_replacing(&reports, "leak_page");
    let report = final_report(&reports);
    let freed = report
        .freed_before_attach
        .unwrap_or_else(|| panic!("the thread caches' frees not counted: {}", json(report)));
    assert!(freed.allocator_frees > 100, "{}", json(report));
}

/// Check that C functions named f, i, d, v, c and x keep their names (not
/// float, int, double, void, char, long long), each with its own block.
#[test]
fn c_names_as_written() {
    let report = trace_fixture("c_short_names", &[], &[]);
    for (name, size) in [("f", 100), ("i", 200), ("d", 300), ("v", 400), ("c", 500), ("x", 600)] {
        let stack = stack_by_first_frame(&report, name)
            .unwrap_or_else(|| panic!("no stack of {name}: {}", json(&report)));
        assert_eq!((stack.bytes, stack.allocations), (size, 1), "{name}: {}", json(&report));
    }
    for wrong in ["float", "int", "double", "void", "char", "long long"] {
        assert!(stack_by_first_frame(&report, wrong).is_none(), "{wrong}: {}", json(&report));
    }
}

/// Check that a `-c` program that exits holding blocks gets "in use at
/// exit" in its final report, with its blocks and site, however short its
/// run (no trend needed), and that `--error-exitcode N` makes leaktrace
/// exit N then (the program's own status otherwise).
#[test]
fn in_use_at_exit_with_error_exitcode() {
    let command = format!("{} status 3", fixture_path("ends").display());
    let finished = run_tracer(&["--json", "-c", &command, "--error-exitcode", "42", "1"]);
    assert_eq!(finished.status.code(), Some(42), "{}", finished.stderr);
    let reports = reports(&finished.stdout);
    let report = final_report(&reports);
    let held = verdict(report).findings.iter().find_map(|finding| match finding {
        Finding::InUseAtExit { bytes, blocks, top, .. } => Some((*bytes, *blocks, top.clone())),
        _ => None,
    });
    let (bytes, blocks, top) =
        held.unwrap_or_else(|| panic!("no in-use-at-exit finding: {}", json(report)));
    assert!(bytes >= 500 && blocks >= 5 && top.starts_with("ends_leak"), "{}", json(report));
    let finished = run_tracer(&["--json", "-c", &command, "1"]);
    assert_eq!(finished.status.code(), Some(3), "{}", finished.stderr);
}

/// Check that libstdc++'s pool, allocated from the loader's entry code
/// (`_dl_start_user`) before main, has a whole stack, not one "cut short",
/// and that heap stacks say they came from the malloc family.
#[test]
fn loader_entry_stack_is_whole() {
    let command = fixture_path("cpp_template").display().to_string();
    // Its stdin is closed: it exits at once, after the loader's work.
    let finished = run_tracer(&["--json", "-c", &command, "1"]);
    let reports = reports(&finished.stdout);
    let report = final_report(&reports);
    let outermost = |stack: &&StackReport| {
        stack.frames.last().and_then(|frame| frame.symbol.as_deref()) == Some("_dl_start_user")
    };
    let pool = report
        .stacks
        .iter()
        .find(outermost)
        .unwrap_or_else(|| panic!("no stack from _dl_start_user: {}", json(report)));
    assert_eq!(pool.stack_end, StackEnd::Complete, "{}", json(report));
    assert_eq!(pool.api, Some(HeapApi::Malloc), "{}", json(report));
}

/// Check that each heap stack says which API its memory came from: mmap
/// for leak_mmap's mappings, the malloc family for leak_malloc's blocks.
#[test]
fn stacks_say_their_api() {
    let report = trace_fixture("all_apis", &[], &[]);
    let api = |function: &str| {
        stack_by_first_frame(&report, function)
            .unwrap_or_else(|| panic!("no {function} stack: {}", json(&report)))
            .api
    };
    assert_eq!(api("leak_mmap"), Some(HeapApi::Mmap), "{}", json(&report));
    assert_eq!(api("leak_malloc"), Some(HeapApi::Malloc), "{}", json(&report));
}

/// Check that blocks allocated inside pthread_create (glibc's loader
/// callocs each new thread's TLS table there) are counted, as valgrind and
/// heaptrack count them: 4 threads, 4 blocks, held at exit. Their stacks
/// end in pthread_create: while it runs, its return address on the stack
/// is the kernel's uretprobe trampoline, which no unwind table covers.
#[test]
fn allocations_inside_pthread_create_counted() {
    let command = fixture_path("four_threads").display().to_string();
    let finished = run_tracer(&["--json", "-c", &command, "1"]);
    let reports = finished.reports();
    let report = final_report(&reports);
    let through_create = |stack: &&StackReport| {
        stack.frames.iter().any(|frame| {
            frame.symbol.as_deref().is_some_and(|symbol| symbol.contains("pthread_create"))
        })
    };
    let blocks: u64 =
        report.stacks.iter().filter(through_create).map(|stack| stack.allocations).sum();
    assert!(blocks >= 4, "{blocks} blocks counted inside pthread_create: {}", json(report));
}
