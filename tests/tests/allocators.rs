//! Programs whose malloc is not glibc's shared one: static glibc and musl,
//! jemalloc, tcmalloc and mimalloc (linked as C libraries or as a Rust
//! #[global_allocator]). Each leak is counted at its caller, and the report
//! says which allocator functions were probed in which object.

use leaktrace_tests::*;

/// Asserts that the leaks total (bytes, allocations) under first frame `function`.
fn assert_leak(report: &Report, function: &str, expected: (u64, u64)) {
    assert_eq!(
        totals(report.stacks_by_first_frame(function)),
        expected,
        "leak at {function} should hold {} bytes in {} allocations: {}",
        expected.0,
        expected.1,
        json(report)
    );
}

/// Asserts that nothing is reported under first frame `function`, which freed all it allocated.
fn assert_freed(report: &Report, function: &str) {
    assert!(
        report.stacks_by_first_frame(function).next().is_none(),
        "{function} freed everything it allocated but is reported: {}",
        json(report)
    );
}

/// The functions probed in the first object whose path satisfies `matches`.
fn probed_in(report: &Report, matches: impl Fn(&str) -> bool) -> Option<Vec<&str>> {
    let probed = report.probed.iter().find(|probed| matches(&probed.object))?;
    Some(probed.functions.iter().map(String::as_str).collect())
}

/// The functions probed in the object whose path contains `library`,
/// failing with the report if it was not probed at all.
fn probed_library<'a>(report: &'a Report, library: &str) -> Vec<&'a str> {
    probed_in(report, |object| object.contains(library))
        .unwrap_or_else(|| panic!("no object matching {library} in `probed`: {}", json(report)))
}

/// Check that a static glibc program's leak is found and its freed blocks are
/// not, with malloc and free probed in the executable itself (no libc.so is mapped).
#[test]
fn static_glibc_leak_found_in_executable() {
    let report = trace_fixture("static_glibc", &[], &[]);
    assert_leak(&report, "static_leak", (30000, 10));
    assert_freed(&report, "static_churn");
    let exe = std::fs::canonicalize(fixture_path("static_glibc")).unwrap();
    let exe = exe.to_str().unwrap();
    let functions = probed_in(&report, |object| object == exe).unwrap_or_else(|| {
        panic!("the static executable {exe} is not in `probed`: {}", json(&report))
    });
    for function in ["malloc", "free"] {
        assert!(
            functions.contains(&function),
            "{function} not probed in the static executable {exe}: {}",
            json(&report)
        );
    }
}

/// Check that a static musl program's leak is found (musl's own malloc, inside
/// the executable) and its freed blocks are not.
#[test]
fn static_musl_leak_found() {
    let report = trace_fixture("static_musl", &[], &[]);
    assert_leak(&report, "musl_leak", (31000, 10));
    assert_freed(&report, "musl_churn");
}

/// Check that leaks through jemalloc's operator new, which never calls malloc,
/// are counted at their caller and that objects deleted again are not.
#[test]
fn jemalloc_operator_new_leak_counted() {
    let report = trace_fixture("jemalloc_new", &[], &[]);
    let functions = probed_library(&report, "libjemalloc.so.2");
    assert!(
        functions.contains(&"_Znwm"),
        "operator new (_Znwm) not probed in libjemalloc.so.2: {}",
        json(&report)
    );
    // C++ names are demangled with their parameter list: "jemalloc_leak()".
    let (total, count) = totals(stacks_by_first_frame_containing(&report, "jemalloc_leak"));
    assert!(
        count > 0,
        "leak at jemalloc_leak (through jemalloc's operator new) not reported: {}",
        json(&report)
    );
    assert_eq!(count, 20, "jemalloc_leak should hold 20 Widgets: {}", json(&report));
    // The requested size is exact; a tracer that reports usable sizes may round up a little.
    assert!(
        within(total, 20 * 512, 10),
        "jemalloc_leak bytes {total} not within 10% of 10240: {}",
        json(&report)
    );
    assert!(
        stacks_by_first_frame_containing(&report, "churn").next().is_none(),
        "Widgets deleted again in churn() are reported: {}",
        json(&report)
    );
    // jemalloc's malloc and operator new begin with `cmp $0x1000,%rdi`,
    // which the kernel single-steps: their entry and return probes share
    // the `ja` after it, and the counts above are exact through it.
    for symbol in ["malloc", "_Znwm"] {
        let skipped = probe_skip(&report, "libjemalloc.so.2", symbol);
        assert!(skipped > 0, "{symbol} probed at its entry: {}", json(&report));
    }
}

/// Check that a leak through tcmalloc's malloc is counted at its caller, with libtcmalloc probed.
#[test]
fn tcmalloc_leak_counted() {
    let report = trace_fixture("tcmalloc_leak", &[], &[]);
    assert_leak(&report, "tc_leak", (32000, 10));
    let functions = probed_library(&report, "libtcmalloc.so");
    assert!(functions.contains(&"malloc"), "malloc not probed in libtcmalloc: {}", json(&report));
    // tcmalloc's malloc copies its size to r8 and tests a global before its
    // first branch: entry and return probes share that jne, and the leak
    // above is still exact.
    assert!(probe_skip(&report, "libtcmalloc.so", "malloc") > 0, "{}", json(&report));
}

/// Bytes past the entry of `symbol`'s probe in the object named `object`.
fn probe_skip(report: &Report, object: &str, symbol: &str) -> u64 {
    report
        .probed
        .iter()
        .filter(|probed| probed.object.contains(object))
        .flat_map(|probed| probed.probes.iter())
        .find(|probe| probe.symbol == symbol)
        .unwrap_or_else(|| panic!("no placement for {symbol} in {object}: {}", json(report)))
        .skipped
}

/// Check that a leak through mimalloc's malloc is counted at its caller, with libmimalloc probed.
#[test]
fn mimalloc_leak_counted() {
    let report = trace_fixture("mimalloc_leak", &[], &[]);
    assert_leak(&report, "mi_leak_fn", (33000, 10));
    let functions = probed_library(&report, "libmimalloc.so");
    assert!(functions.contains(&"malloc"), "malloc not probed in libmimalloc: {}", json(&report));
}

/// Check that Box leaks in a release-built Rust program whose #[global_allocator]
/// is the mimalloc crate are counted at the leaking function.
#[test]
fn rust_global_allocator_leak_counted() {
    let report = trace_fixture("rust_global", &[], &[]);
    // Release code inlines the __rust_alloc shim: global_leak calls mimalloc's
    // mi_malloc_aligned (linked into the executable) directly.
    assert_eq!(
        totals(stacks_by_first_frame_containing(&report, "global_leak")),
        (41000, 10),
        "global_leak should hold 10 x 4100 bytes: {}",
        json(&report)
    );
}
