//! Growth over time: a steady leak is growing at its real rate, a cache that
//! filled up is a plateau, a stable working set is no leak, and heap RSS that
//! climbs while live bytes stay flat is allocator retention, not a leak.

use leaktrace_tests::*;

/// Reports a second over 8 s: enough intervals for every trend to settle.
const REPORTS: u32 = 8;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Check that a steady 1 KiB per 100 ms leak is growing at about 10240 B/s,
/// both at steady_leak_step and in a leak verdict that names it.
#[test]
fn steady_leak_growing_at_its_rate() {
    let reports = trace_over_time("steady_leak", REPORTS);
    let report = final_report(&reports);
    let stack = stack_by_first_frame(report, "steady_leak_step")
        .unwrap_or_else(|| panic!("leak at steady_leak_step not reported: {}", json(report)));
    let growth =
        stack.growth.unwrap_or_else(|| panic!("steady_leak_step has no growth: {}", json(report)));
    assert_eq!(
        growth.trend,
        Trend::Growing,
        "steady_leak_step should be growing: {}",
        json(report)
    );
    let rate = growth.bytes_per_second;
    assert!(
        within_f64(rate, 10240.0, 20.0),
        "steady_leak_step grows at {rate} B/s, not within 20% of 10240: {}",
        json(report)
    );
    assert!(
        report.stacks_by_first_frame("steady_churn").next().is_none(),
        "freed churn at steady_churn reported: {}",
        json(report)
    );
    let verdict = verdict(report);
    let kinds = &verdict.kinds;
    assert!(
        kinds.contains(&VerdictKind::Leak),
        "verdict kinds {kinds:?} lack leak: {}",
        json(report)
    );
    let text = &verdict.text;
    assert!(
        text.contains("steady_leak_step"),
        "verdict {text:?} does not name steady_leak_step: {}",
        json(report)
    );
    let total = verdict.leak_bytes_per_second;
    assert!(
        within_f64(total, 10240.0, 20.0),
        "verdict.leak_bytes_per_second is {total}, not within 20% of 10240: {}",
        json(report)
    );
}

/// Check that a cache which filled to 1 MiB and stopped is a plateau at
/// cache_insert, not a leak.
#[test]
fn filled_cache_is_plateau_not_leak() {
    let reports = trace_over_time("cache_plateau", REPORTS);
    let report = final_report(&reports);
    let stack = stack_by_first_frame(report, "cache_insert")
        .unwrap_or_else(|| panic!("cache entries at cache_insert not reported: {}", json(report)));
    let growth =
        stack.growth.unwrap_or_else(|| panic!("cache_insert has no growth: {}", json(report)));
    assert_eq!(
        growth.trend,
        Trend::Plateau,
        "the full cache at cache_insert should be a plateau: {}",
        json(report)
    );
    assert!(
        within(stack.bytes, 256 * 4 * KIB, 10),
        "cache_insert holds {} bytes, not within 10% of the 1 MiB cache: {}",
        stack.bytes,
        json(report)
    );
    assert!(
        report.stacks_by_first_frame("cache_lookup").next().is_none(),
        "freed lookup buffers at cache_lookup reported: {}",
        json(report)
    );
    let kinds = &verdict(report).kinds;
    assert!(
        !kinds.contains(&VerdictKind::Leak),
        "a cache that stopped growing judged a leak ({kinds:?}): {}",
        json(report)
    );
}

/// Check that a working set which only replaces blocks of the same size is no leak.
#[test]
fn stable_working_set_is_no_leak() {
    let reports = trace_over_time("stable", REPORTS);
    let report = final_report(&reports);
    let kinds = &verdict(report).kinds;
    assert_eq!(
        kinds,
        &[VerdictKind::NoLeak],
        "a stable working set judged {kinds:?}: {}",
        json(report)
    );
}

/// Check that heap RSS climbing while live bytes stay flat (glibc arenas that
/// cannot trim under a pinned top) is judged allocator retention, not a leak.
#[test]
fn arena_growth_with_flat_live_bytes_is_retention() {
    let reports = trace_over_time("arena_retention", REPORTS);
    let report = final_report(&reports);
    let kinds = &verdict(report).kinds;
    assert!(
        kinds.contains(&VerdictKind::Retention),
        "verdict kinds {kinds:?} lack retention: {}",
        json(report)
    );
    assert!(
        !kinds.contains(&VerdictKind::Leak),
        "freed memory judged a leak ({kinds:?}): {}",
        json(report)
    );
    let heap_rss = memory(report).since_attach.heap_rss;
    assert!(
        heap_rss > 20 * MIB as i64,
        "heap RSS grew by {heap_rss} bytes since attach, expected more than 20 MiB: {}",
        json(report)
    );
    let live = report.totals.bytes;
    assert!(
        live < 2 * MIB,
        "{live} bytes live in malloc, expected under 2 MiB (only the pins stay): {}",
        json(report)
    );
}

/// Check that a ring filled before attach and replaced member by member is
/// not called a leak while its old members are being freed, that the frees
/// of pre-attach memory are counted with their bytes, and that a true leak
/// beside it is still the one leak named, in every report of 10 s.
#[test]
fn ring_replacing_preattach_memory_is_not_a_leak() {
    let reports = trace_over_time("ring_replaced", 10);
    for report in &reports {
        let verdict = verdict(report);
        for finding in &verdict.findings {
            if let Finding::Leak { sites, top, .. } = finding {
                assert!(
                    *sites == 1 && top.starts_with("leak_steady"),
                    "a leak verdict other than leak_steady alone ({finding:?}): {}",
                    json(report)
                );
            }
        }
    }
    let report = final_report(&reports);
    let verdict = verdict(report);
    assert_eq!(
        verdict.kinds,
        [VerdictKind::Leak, VerdictKind::Replacing],
        "10 s in, leak_steady leaks and ring_put replaces: {}",
        json(report)
    );
    let freed = report
        .freed_before_attach
        .unwrap_or_else(|| panic!("no frees of pre-attach memory counted: {}", json(report)));
    // 200 a second over about 10 s.
    assert!(freed.count >= 1000, "only {} pre-attach frees counted: {}", freed.count, json(report));
    assert!(
        within_f64(freed.count_per_second, 200.0, 25.0),
        "pre-attach frees at {} a second, not about 200: {}",
        freed.count_per_second,
        json(report)
    );
    // glibc's usable size of a 256-byte request is 264 bytes.
    let bytes = freed.bytes.unwrap_or_else(|| panic!("glibc chunk sizes unread: {}", json(report)));
    assert!(
        (256 * freed.count..=280 * freed.count).contains(&bytes),
        "{bytes} bytes for {} frees of 256-byte blocks: {}",
        freed.count,
        json(report)
    );
}

/// Check that the verdict never says "no leak" while live memory rose since
/// the report before: a leak that starts late has a call site too new for a
/// trend in its first reports, and those are "not seen yet", not "flat".
#[test]
fn no_leak_never_said_while_memory_rises() {
    let reports = trace_over_time("late_leak", 7);
    for pair in reports.windows(2) {
        let (before, report) = (&pair[0], &pair[1]);
        let rose = report.totals.bytes.saturating_sub(before.totals.bytes);
        let said_no_leak = verdict(report).text.contains("no leak: live memory flat");
        assert!(
            !(said_no_leak && rose > 4096),
            "\"no leak\" while live memory rose {rose} bytes since the report before: {}",
            json(report)
        );
    }
    let report = final_report(&reports);
    assert!(
        report.stacks_by_first_frame("late_leak_step").next().is_some(),
        "the late leak is not reported at all: {}",
        json(report)
    );
}

/// Check that when allocations are lost (the allocation map full), the
/// verdict says it is incomplete instead of "no leak".
#[test]
fn lost_events_make_the_verdict_incomplete() {
    let reports = trace_over_time_with("steady_leak", 6, &["--max-allocations", "16"]);
    let report = final_report(&reports);
    let lost = report.lost.get(&Lost::AllocMapFull).copied().unwrap_or(0);
    assert!(lost > 0, "the 16-slot allocation map never filled: {}", json(report));
    let verdict = verdict(report);
    assert!(
        verdict.kinds.contains(&VerdictKind::Incomplete)
            && !verdict.kinds.contains(&VerdictKind::NoLeak),
        "{lost} allocations lost, yet the verdict is {:?}: {}",
        verdict.kinds,
        json(report)
    );
}
