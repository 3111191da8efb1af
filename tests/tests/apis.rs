//! Every allocation API the tracer hooks: each leak is counted once at its
//! caller with its requested size, and freed or failed allocations leave nothing.

use leaktrace_tests::*;

/// Leaking function in fixtures/all_apis.c and the bytes it leaks (one allocation each).
const LEAKS: &[(&str, u64)] = &[
    ("leak_malloc", 1001),
    ("leak_calloc", 1002),
    ("leak_realloc", 1003),
    ("leak_reallocarray", 1004),
    ("leak_posix_memalign", 1005),
    ("leak_aligned_alloc", 1088),
    ("leak_memalign", 1006),
    ("leak_valloc", 1007),
    // The requested size: glibc rounds pvalloc up to a page.
    ("leak_pvalloc", 1008),
    ("leak_mmap", 3 * 4096),
    // 6 pages mapped, the first 2 unmapped.
    ("mmap_partial", 4 * 4096),
    // The block a failed realloc left in place.
    ("realloc_fail", 1011),
];

/// Functions whose allocations were all freed, unmapped or failed.
const ABSENT: &[&str] =
    &["mmap_whole", "realloc_zero", "failed_malloc", "failed_mmap", "freed_pairs"];

/// Check that each allocation API's leak is reported once with its exact size, and
/// that freed, unmapped and failed allocations are not.
#[test]
fn every_api_leak_counted_exactly_once() {
    let report = trace_fixture("all_apis", &[], &[]);
    for &(name, size) in LEAKS {
        // aligned_alloc and memalign share one address in glibc 2.36; a probe on
        // each would count the same call twice, hence the exact allocation count.
        assert_eq!(
            totals(report.stacks_by_first_frame(name)),
            (size, 1),
            "leak at {name} should be 1 allocation of {size} bytes: {}",
            json(&report)
        );
    }
    for name in ABSENT {
        assert!(
            report.stacks_by_first_frame(name).next().is_none(),
            "{name} freed or failed all its allocations but is reported: {}",
            json(&report)
        );
    }
}

/// Check that -z/-Z keep only allocations whose requested size is in range (inclusive).
#[test]
fn size_filters_select_by_requested_size() {
    let report = trace_fixture("all_apis", &[], &["-z", "1004", "-Z", "1006"]);
    for name in ["leak_reallocarray", "leak_posix_memalign", "leak_memalign"] {
        assert!(
            report.stacks_by_first_frame(name).next().is_some(),
            "leak at {name} (size within -z 1004 -Z 1006) not reported: {}",
            json(&report)
        );
    }
    for name in ["leak_malloc", "leak_calloc", "leak_valloc", "leak_pvalloc", "realloc_fail"] {
        assert!(
            report.stacks_by_first_frame(name).next().is_none(),
            "leak at {name} (size outside -z 1004 -Z 1006) reported: {}",
            json(&report)
        );
    }
}

/// Check that --top limits every report to the largest N stacks.
#[test]
fn top_limits_stacks() {
    let report = trace_fixture("all_apis", &[], &["--top", "3"]);
    let sizes: Vec<u64> = report.stacks.iter().map(|stack| stack.bytes).collect();
    assert!(
        !sizes.is_empty() && sizes.len() <= 3,
        "--top 3 gave {} stacks: {}",
        sizes.len(),
        json(&report)
    );
    assert!(
        sizes.windows(2).all(|pair| pair[0] >= pair[1]),
        "stacks not sorted by bytes, largest first: {}",
        json(&report)
    );
    // The two mmap leaks (16384, 12288) are the largest in the fixture.
    assert_eq!(
        report.stacks[0].first_symbol(),
        Some("mmap_partial"),
        "largest stack under --top 3 is not mmap_partial: {}",
        json(&report)
    );
}

/// Check that frees of memory allocated before attach are ignored in the
/// books (nothing lost or subtracted, only the leak made after attach is
/// reported) and counted apart, with glibc's usable size of each block.
#[test]
fn free_of_memory_from_before_attach_ignored() {
    let report = trace_fixture("preattach_free", &[], &[]);
    assert_eq!(
        totals(report.stacks_by_first_frame("post_leak")),
        (2000, 4),
        "post_leak should hold 4 x 500 bytes: {}",
        json(&report)
    );
    assert_eq!(report.totals.bytes, 2000, "totals should be post_leak's alone: {}", json(&report));
    let lost = lost_events(&report);
    assert_eq!(lost, 0, "frees of untracked memory counted as lost events: {}", json(&report));
    let freed = report.freed_before_attach.unwrap_or_else(|| {
        panic!("the 100 frees of pre-attach blocks are not counted: {}", json(&report))
    });
    // A 777-byte request is an 800-byte glibc chunk with 792 usable bytes.
    assert_eq!(
        (freed.count, freed.bytes),
        (100, Some(100 * 792)),
        "100 pre-attach blocks of 777 bytes freed: {}",
        json(&report)
    );
}

/// Check that -s 4 --sampling address tracks about one allocation in four
/// and scales the report back: a burst of 2000 leaked blocks is estimated
/// within 15%, and the report says it is sampled, and how.
#[test]
fn sampling_by_address_scales_estimates() {
    let report =
        trace_fixture("args_leak", &["2000", "100"], &["-s", "4", "--sampling", "address"]);
    assert_eq!(report.sample_rate, 4, "report does not say it is sampled: {}", json(&report));
    assert_eq!(
        report.sampling,
        Some(leaktrace_report::Sampling::Address),
        "report does not say how it sampled: {}",
        json(&report)
    );
    let (bytes, allocations) = totals(report.stacks_by_first_frame("arg_leak"));
    assert!(
        within(allocations, 2000, 15) && within(bytes, 200_000, 15),
        "arg_leak estimated at {bytes} bytes in {allocations} allocations, not 200000 in 2000 within 15%: {}", json(&report)
    );
    assert_eq!(bytes % 4, 0, "sampled bytes are not scaled by 4: {}", json(&report));
}

/// Check that when the stack map is full, each allocation whose stack is not
/// kept is counted once as lost (a stack), not also as a full totals map,
/// and its bytes still count.
#[test]
fn full_stack_map_counts_each_loss_once() {
    let whole = trace_fixture("all_apis", &[], &[]);
    let cramped = trace_fixture("all_apis", &[], &["--max-stacks", "2"]);
    let lost = |reason| cramped.lost.get(&reason).copied().unwrap_or(0);
    assert!(lost(Lost::StackCollision) > 0, "2 stack slots did not fill: {}", json(&cramped));
    assert_eq!(
        lost(Lost::StatsMapFull),
        0,
        "a dropped stack also counted as a full totals map: {}",
        json(&cramped)
    );
    assert_eq!(
        cramped.totals,
        whole.totals,
        "allocations whose stack was not kept must still count: {}",
        json(&cramped)
    );
}
