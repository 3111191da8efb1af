//! Rust programs on the system allocator: leaks through Box and Vec are
//! counted at the Rust function that allocated (the first frame outside the
//! standard library's allocation helpers, which are real frames in a debug
//! build), under demangled names, for both legacy and v0 symbol mangling.

use leaktrace_tests::*;

/// Whether `symbol` still looks mangled: a legacy `_ZN...17h<16 hex>E` name or
/// a v0 `_R...` name.
fn looks_mangled(symbol: &str) -> bool {
    let legacy_hash = symbol.match_indices("17h").any(|(at, _)| {
        let rest = &symbol[at + 3..];
        rest.len() >= 17
            && rest[..16].bytes().all(|b| b.is_ascii_hexdigit())
            && rest.as_bytes()[16] == b'E'
    });
    symbol.starts_with("_ZN") || symbol.starts_with("_R") || legacy_hash
}

/// Every stack whose first frame outside the standard library's allocation
/// helpers contains `function`.
fn leaking_at<'a>(report: &'a Report, function: &'a str) -> impl Iterator<Item = &'a StackReport> {
    report
        .stacks
        .iter()
        .filter(move |stack| first_user_symbol(stack).is_some_and(|sym| sym.contains(function)))
}

/// Checks the report of one build of fixtures/rust_system.rs.
fn check_rust_system(name: &str) {
    let report = trace_fixture(name, &[], &[]);
    for (function, expected) in [("box_leak", (40000, 10)), ("forget_vec", (50000, 10))] {
        assert_eq!(
            totals(leaking_at(&report, function)),
            expected,
            "{name}: {function} should hold {} bytes in {} allocations: {}",
            expected.0,
            expected.1,
            json(&report)
        );
        for stack in leaking_at(&report, function) {
            for symbol in stack.frames.iter().filter_map(|frame| frame.symbol.as_deref()) {
                assert!(
                    !looks_mangled(symbol),
                    "{name}: symbol {symbol:?} in the {function} stack is not demangled: {}",
                    json(&report)
                );
            }
        }
    }
    // A Vec<u64> pushed to 1000 elements ends in one 1024 x 8-byte block; the
    // smaller blocks it grew through were freed by __rust_realloc.
    assert_eq!(
        totals(leaking_at(&report, "grow_forever")),
        (8192, 1),
        "{name}: grow_forever should hold its final 8192-byte block: {}",
        json(&report)
    );
    assert!(
        stacks_by_first_frame_containing(&report, "__rust_alloc").next().is_none(),
        "{name}: stacks start at the __rust_alloc shim instead of its caller: {}",
        json(&report)
    );
}

/// Check that Box and Vec leaks in a Rust program (legacy mangling) are counted
/// at the leaking function with demangled names.
#[test]
fn rust_legacy_mangling_leaks_named() {
    check_rust_system("rust_system");
}

/// Check that Box and Vec leaks in a Rust program built with v0 mangling are
/// counted at the leaking function with demangled names.
#[test]
fn rust_v0_mangling_leaks_named() {
    check_rust_system("rust_system_v0");
}
