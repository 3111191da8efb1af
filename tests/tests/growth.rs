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
        .unwrap_or_else(|| panic!("leak at steady_leak_step not reported: {report}"));
    assert_eq!(trend(stack), "growing", "steady_leak_step should be growing: {report}");
    let rate = bytes_per_second(stack);
    assert!(
        within_f64(rate, 10240.0, 20.0),
        "steady_leak_step grows at {rate} B/s, not within 20% of 10240: {report}"
    );
    assert!(
        stacks_by_first_frame(report, "steady_churn").is_empty(),
        "freed churn at steady_churn reported: {report}"
    );
    let kinds = verdict_kinds(report);
    assert!(kinds.contains(&"leak"), "verdict kinds {kinds:?} lack leak: {report}");
    let text = verdict_text(report);
    assert!(
        text.contains("steady_leak_step"),
        "verdict {text:?} does not name steady_leak_step: {report}"
    );
    let total = number_at(report, "/verdict/leak_bytes_per_second");
    assert!(
        within_f64(total, 10240.0, 20.0),
        "verdict.leak_bytes_per_second is {total}, not within 20% of 10240: {report}"
    );
}

/// Check that a cache which filled to 1 MiB and stopped is a plateau at
/// cache_insert, not a leak.
#[test]
fn filled_cache_is_plateau_not_leak() {
    let reports = trace_over_time("cache_plateau", REPORTS);
    let report = final_report(&reports);
    let stack = stack_by_first_frame(report, "cache_insert")
        .unwrap_or_else(|| panic!("cache entries at cache_insert not reported: {report}"));
    assert_eq!(
        trend(stack),
        "plateau",
        "the full cache at cache_insert should be a plateau: {report}"
    );
    assert!(
        within(bytes(stack), 256 * 4 * KIB, 10),
        "cache_insert holds {} bytes, not within 10% of the 1 MiB cache: {report}",
        bytes(stack)
    );
    assert!(
        stacks_by_first_frame(report, "cache_lookup").is_empty(),
        "freed lookup buffers at cache_lookup reported: {report}"
    );
    let kinds = verdict_kinds(report);
    assert!(
        !kinds.contains(&"leak"),
        "a cache that stopped growing judged a leak ({kinds:?}): {report}"
    );
}

/// Check that a working set which only replaces blocks of the same size is no leak.
#[test]
fn stable_working_set_is_no_leak() {
    let reports = trace_over_time("stable", REPORTS);
    let report = final_report(&reports);
    let kinds = verdict_kinds(report);
    assert_eq!(kinds, ["no_leak"], "a stable working set judged {kinds:?}: {report}");
}

/// Check that heap RSS climbing while live bytes stay flat (glibc arenas that
/// cannot trim under a pinned top) is judged allocator retention, not a leak.
#[test]
fn arena_growth_with_flat_live_bytes_is_retention() {
    let reports = trace_over_time("arena_retention", REPORTS);
    let report = final_report(&reports);
    let kinds = verdict_kinds(report);
    assert!(kinds.contains(&"retention"), "verdict kinds {kinds:?} lack retention: {report}");
    assert!(!kinds.contains(&"leak"), "freed memory judged a leak ({kinds:?}): {report}");
    let heap_rss = int_at(report, "/memory/since_attach/heap_rss");
    assert!(
        heap_rss > 20 * MIB as i64,
        "heap RSS grew by {heap_rss} bytes since attach, expected more than 20 MiB: {report}"
    );
    let live = int_at(report, "/totals/bytes");
    assert!(
        live < 2 * MIB as i64,
        "{live} bytes live in malloc, expected under 2 MiB (only the pins stay): {report}"
    );
}
