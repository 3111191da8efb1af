//! Leaks from real programs: the leaking function is named, freed memory is
//! absent, and the byte counts are right.

use leaktrace_tests::*;
use std::time::Duration;

/// Check that calloc leaks in a worker thread are reported at leak_helper with
/// file and line, while blocks freed by the same or another thread are not.
#[test]
fn calloc_leak_in_thread_named_and_churn_absent() {
    let report = trace_fixture("leak_calloc", &[], &[]);
    let top =
        report.stacks.first().unwrap_or_else(|| panic!("no stacks reported: {}", json(&report)));
    assert_eq!(
        top.first_symbol(),
        Some("leak_helper"),
        "largest stack does not start at leak_helper: {}",
        json(&report)
    );
    assert!(
        top.frames.iter().skip(1).any(|frame| frame.symbol.as_deref() == Some("worker_step")),
        "worker_step missing from the leak_helper stack: {}",
        json(&report)
    );
    let first = &top.frames[0];
    assert!(
        first.file.as_deref().is_some_and(|file| file.ends_with("leak_calloc.c")),
        "leak_helper frame does not name leak_calloc.c: {}",
        json(&report)
    );
    assert!(first.line.is_some(), "leak_helper frame has no line: {}", json(&report));
    assert!(
        within(top.bytes, 200 * 1024, 10),
        "leak_helper bytes {} not within 10% of 204800: {}",
        top.bytes,
        json(&report)
    );
    for churn in ["churn_same_thread", "churn_cross_thread_alloc"] {
        let mentioning = report.stacks.iter().filter(|stack| has_symbol(&stack.frames, churn));
        let left: u64 = mentioning.map(|stack| stack.bytes).sum();
        assert!(
            left < 4096,
            "{left} bytes reported under freed-memory churn {churn}: {}",
            json(&report)
        );
    }
}

/// Check that a chain of reallocs leaves only the final block, as one allocation.
#[test]
fn realloc_chain_keeps_only_final_block() {
    let report = trace_fixture("realloc_chain", &[], &[]);
    assert_eq!(
        totals(report.stacks_by_first_frame("grow_buffer")),
        (65536, 1),
        "grow_buffer should hold exactly its final 65536-byte block: {}",
        json(&report)
    );
    assert!(
        report.stacks_by_first_frame("grow_and_free").next().is_none(),
        "freed realloc chain grow_and_free reported: {}",
        json(&report)
    );
}

/// Check that large mallocs served by mmap inside glibc are counted once, under malloc's caller.
#[test]
fn big_malloc_counted_once() {
    let report = trace_fixture("big_malloc", &[], &[]);
    assert_eq!(
        totals(report.stacks_by_first_frame("big_leak")),
        (3 * 1024 * 1024, 3),
        "big_leak should hold 3 x 1 MiB: {}",
        json(&report)
    );
    let from_libc = report.stacks.iter().find(|stack| {
        stack.bytes >= 1024 * 1024
            && stack
                .frames
                .first()
                .and_then(|frame| frame.module.as_deref())
                .is_some_and(|module| module.contains("libc.so"))
    });
    assert!(
        from_libc.is_none(),
        "malloc's internal mmap reported as a separate leak from libc: {}",
        json(&report)
    );
}

/// Check that a leak inside a shared library names the library function and module.
#[test]
fn shared_library_leak_named() {
    let report = trace_fixture("uses_lib", &[], &[]);
    let stack = stack_by_first_frame(&report, "lib_leak")
        .unwrap_or_else(|| panic!("leak at lib_leak not reported: {}", json(&report)));
    assert!(
        stack.frames[0].module.as_deref().is_some_and(|module| module.ends_with("libleaky.so")),
        "lib_leak frame does not name libleaky.so as its module: {}",
        json(&report)
    );
    assert_eq!(
        totals(report.stacks_by_first_frame("lib_leak")),
        (20480, 10),
        "lib_leak should hold 10 x 2048 bytes: {}",
        json(&report)
    );
}

/// Check that a C++ leak through operator new is reported under the demangled template method.
#[test]
fn cpp_template_leak_demangled() {
    let report = trace_fixture("cpp_leak", &[], &[]);
    let found: Vec<&StackReport> = report
        .stacks
        .iter()
        .filter(|stack| {
            stack
                .frames
                .iter()
                .filter_map(|frame| frame.symbol.as_deref())
                .any(|symbol| symbol.contains("Registry<") && symbol.contains("make"))
        })
        .collect();
    let total: u64 = found.iter().map(|stack| stack.bytes).sum();
    // operator new in libstdc++ keeps no frame pointer, so a plain frame-pointer
    // walk from malloc skips the frame of its caller, Registry<Widget>::make:
    // the tracer has to recover it.
    assert!(
        !found.is_empty(),
        "no frame names Registry<...>::make (demangled; its frame sits under \
         operator new, which has no frame pointer): {}",
        json(&report)
    );
    assert!(
        within(total, 50 * 256, 10),
        "Registry<...>::make bytes {total} not within 10% of 12800: {}",
        json(&report)
    );
}

/// Check that tracing ends by itself when the target exits, with a final report of its leaks.
#[test]
fn target_exit_ends_tracing() {
    let mut fixture = Fixture::start("exits_midway", &[]);
    let pid = fixture.pid().to_string();
    let mut tracer = Tracer::start(&["-p", &pid, "--json", "1"]);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    let status = fixture.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "fixture exits_midway failed: {status}");
    let reports = tracer.finish().reports();
    let report = final_report(&reports);
    assert!(report.exited, "final report does not say the target exited: {}", json(report));
    assert_eq!(
        totals(report.stacks_by_first_frame("exit_leak")),
        (20480, 5),
        "exit_leak should hold 5 x 4096 bytes: {}",
        json(report)
    );
}

/// Check that when the target execs another program, what the old image
/// held leaves the reports, the report says so, and the new program's leak
/// is found with whole stacks and called a leak.
#[test]
fn exec_drops_the_old_image_and_traces_the_new() {
    let new = fixture_path("exec_new");
    let mut fixture = Fixture::start("exec_old", &[new.to_str().unwrap()]);
    let mut tracer = Tracer::trace_pid(fixture.pid(), 1, 8, &["--top", "1000"]);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    let reports = tracer.finish().reports();
    let report = final_report(&reports);
    let exec = report.exec.as_ref().unwrap_or_else(|| panic!("no exec reported: {}", json(report)));
    assert!(exec.program.ends_with("exec_new"), "exec of {}: {}", exec.program, json(report));
    assert!(
        report.stacks_by_first_frame("old_leak").next().is_none(),
        "the old image's blocks are still reported: {}",
        json(report)
    );
    let stack = stack_by_first_frame(report, "new_leak_step")
        .unwrap_or_else(|| panic!("the new program's leak is not reported: {}", json(report)));
    assert!(
        has_symbol(&stack.frames, "main") && stack.stack_end == StackEnd::Complete,
        "the new program's stack is not whole: {}",
        json(report)
    );
    assert!(
        verdict(report).kinds.contains(&VerdictKind::Leak),
        "the new program's leak is not called a leak: {}",
        json(report)
    );
}

/// Check that the books stay exact past their fast tables: 60,000 blocks
/// live in a target whose allocation table holds 20,480-81,920 (the rest
/// spill to the hash map), 60,000 more freed out of order, and 2,048 stacks each
/// holding a block, against 1,024 per-CPU slots of per-stack totals.
#[test]
fn books_exact_past_their_tables() {
    let report = trace_fixture("many_blocks", &[], &["--top", "5000"]);
    let held = stack_by_first_frame(&report, "hold_block")
        .unwrap_or_else(|| panic!("hold_block not reported: {}", json(&report)));
    assert_eq!(
        (held.bytes, held.allocations),
        (60_000 * 48, 60_000),
        "hold_block's blocks: {}",
        json(&report)
    );
    let branches: Vec<&StackReport> = report.stacks_by_first_frame("branch_leak").collect();
    assert_eq!(branches.len(), 2048, "stacks through branch_leak: {}", json(&report));
    assert_eq!(
        totals(branches.iter().copied()),
        (2048 * 24, 2048),
        "branch_leak's blocks: {}",
        json(&report)
    );
    assert!(
        report.stacks_by_first_frame("churn_block").next().is_none(),
        "freed blocks at churn_block reported: {}",
        json(&report)
    );
    assert_eq!(lost_events(&report), 0, "events lost: {}", json(&report));
}
