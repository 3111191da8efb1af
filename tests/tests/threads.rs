//! Thread leaks: threads that exit but are never joined, and threads that
//! never exit, reported per pthread_create call site with a thread_leak verdict.

use leaktrace_tests::*;

/// Reports a second over 8 s: each fixture starts 10 threads a second.
const REPORTS: u32 = 8;

/// Check that threads which exit without being joined are reported at their
/// creation site, spawn_worker, with their stacks and a thread_leak verdict.
#[test]
fn unjoined_threads_reported_at_creation_site() {
    let reports = trace_over_time("threads_unjoined", REPORTS);
    let report = final_report(&reports);
    let site = thread_site_through(report, "spawn_worker")
        .unwrap_or_else(|| panic!("no thread site through spawn_worker: {}", json(report)));
    let unjoined = site.counts.exited_unjoined;
    assert!(
        unjoined >= 10,
        "{unjoined} threads exited unjoined at spawn_worker, expected 10 or more (10 a second): {}",
        json(report)
    );
    assert_eq!(site.counts.joined, 0, "spawn_worker never joins a thread: {}", json(report));
    assert!(
        site.counts.stack_bytes > 0,
        "unjoined threads keep their stacks, yet spawn_worker's site has no stack_bytes: {}",
        json(report)
    );
    let verdict = verdict(report);
    let kinds = &verdict.kinds;
    assert!(
        kinds.contains(&VerdictKind::ThreadLeak),
        "verdict kinds {kinds:?} lack thread_leak: {}",
        json(report)
    );
    let text = &verdict.text;
    assert!(
        text.contains("spawn_worker"),
        "verdict {text:?} does not name the creation site spawn_worker: {}",
        json(report)
    );
}

/// Check that threads which block forever are counted alive at
/// start_blocked_worker, growing, with the process's thread count, as a thread leak.
#[test]
fn blocked_threads_counted_alive_and_growing() {
    let reports = trace_over_time("threads_blocked", REPORTS);
    let report = final_report(&reports);
    let site = thread_site_through(report, "start_blocked_worker")
        .unwrap_or_else(|| panic!("no thread site through start_blocked_worker: {}", json(report)));
    let (created, alive) = (site.counts.created, site.counts.alive);
    assert!(
        alive >= 10,
        "{alive} threads alive at start_blocked_worker, expected 10 or more (10 a second): {}",
        json(report)
    );
    assert_eq!(alive, created, "no thread from start_blocked_worker ever exits: {}", json(report));
    assert_eq!(
        site.counts.exited_unjoined,
        0,
        "no thread from start_blocked_worker ever exits: {}",
        json(report)
    );
    assert_eq!(
        site.trend,
        Trend::Growing,
        "start_blocked_worker's threads should be growing: {}",
        json(report)
    );
    let first = memory(&reports[0]).picture.threads;
    let last = memory(report).picture.threads;
    assert!(
        last >= first + 10,
        "memory.threads went from {first} to {last}, expected 10 or more new threads: {}",
        json(report)
    );
    let since = memory(report).since_attach.threads;
    assert!(
        since >= 10,
        "memory.since_attach.threads is {since}, expected 10 or more: {}",
        json(report)
    );
    let kinds = &verdict(report).kinds;
    assert!(
        kinds.contains(&VerdictKind::ThreadLeak),
        "verdict kinds {kinds:?} lack thread_leak: {}",
        json(report)
    );
}

/// Check that a thread's record of calls in flight goes when the thread
/// exits: more short-lived threads than that map holds, one after another,
/// each leaking one block, and every block is counted.
#[test]
fn short_lived_threads_do_not_exhaust_call_records() {
    let threads = u64::from(leaktrace_common::MAX_PENDING) + 4_096;
    let report = trace_fixture("thread_churn", &[&threads.to_string()], &[]);
    let (bytes, allocations) = totals(report.stacks_by_first_frame("leak_in_thread"));
    assert_eq!(
        allocations,
        threads,
        "{threads} threads leaked one block each from leak_in_thread: {}",
        json(&report)
    );
    assert_eq!(bytes, threads * 24, "each block is 24 bytes: {}", json(&report));
    let lost = report.lost.get(&Lost::PendingMapFull).copied().unwrap_or(0);
    assert_eq!(lost, 0, "no call record may be lost: {}", json(&report));
}

/// Check thread attributes set up before attach: threads created detached
/// through one are detached, not a thread leak; threads on glibc's cached
/// stacks are counted at their real stack size (256 KiB and the guard page,
/// not the 8 MiB default); and the threads alive since before attach are
/// counted with their stacks (128 KiB and the guard page each).
#[test]
fn thread_attributes_from_before_attach() {
    const GUARD: u64 = 4096;
    let report = trace_fixture("threads_attrs", &[], &[]);
    let detached = thread_site_through(&report, "spawn_detached")
        .unwrap_or_else(|| panic!("no thread site through spawn_detached: {}", json(&report)));
    assert_eq!(
        (detached.counts.created, detached.counts.detached, detached.counts.exited_unjoined),
        (12, 12, 0),
        "12 threads created detached through an attribute: {}",
        json(&report)
    );
    let verdict = verdict(&report);
    assert!(
        !verdict.kinds.contains(&VerdictKind::ThreadLeak),
        "detached threads judged a thread leak: {}",
        json(&report)
    );
    let small = thread_site_through(&report, "spawn_small")
        .unwrap_or_else(|| panic!("no thread site through spawn_small: {}", json(&report)));
    assert_eq!(small.counts.alive, 28, "28 threads blocked at spawn_small: {}", json(&report));
    assert_eq!(
        small.counts.stack_bytes,
        28 * (256 * 1024 + GUARD),
        "28 stacks of 256 KiB and a guard page: {}",
        json(&report)
    );
    let threads = report.threads.as_ref().expect("a threads section");
    assert_eq!(
        threads.before_attach,
        ThreadsBeforeAttach { alive: 5, stack_bytes: 5 * (128 * 1024 + GUARD) },
        "5 threads of 128 KiB stacks from before attach: {}",
        json(&report)
    );
}

/// Check that a thread pool that joins every thread within ~50 ms of its
/// start is never a thread leak, in any of 10 reports, though its bursts
/// grow (so do the threads each report catches alive): threads alive, or
/// exited and not yet joined, count as held only if they were already at
/// the report before.
#[test]
fn thread_pool_joining_at_once_is_no_thread_leak() {
    let reports = trace_over_time("thread_pool", 10);
    for report in &reports {
        assert!(
            !verdict(report).kinds.contains(&VerdictKind::ThreadLeak),
            "a pool joining every thread at once judged a thread leak: {}",
            json(report)
        );
    }
    let report = final_report(&reports);
    let site = thread_site_through(report, "pool_start")
        .unwrap_or_else(|| panic!("no thread site through pool_start: {}", json(report)));
    assert!(
        site.counts.joined >= 300,
        "the pool joined {} threads: {}",
        site.counts.joined,
        json(report)
    );
}
