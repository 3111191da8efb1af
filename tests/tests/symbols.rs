//! Symbolizing binaries that carry no symbols of their own or that the host
//! cannot see: separate debug files (by .gnu_debuglink and by build ID),
//! stripped binaries, binaries only present in the target's mount namespace,
//! and --sysroot copies of them.

use leaktrace_tests::*;
use std::{fs, path::Path, process::Command, time::Duration};

/// Where the namespace fixtures run from: a tmpfs mounted on /mnt inside the
/// target's private mount namespace only.
const NS_ONLY_PROG: &str = "/mnt/ns-only/prog";

/// Asserts that the largest stack starting at `function` names `file` and a line,
/// and that `function`'s stacks total (bytes, allocations).
fn assert_leak_with_line(report: &Report, function: &str, file: &str, expected: (u64, u64)) {
    let stack = stack_by_first_frame(report, function)
        .unwrap_or_else(|| panic!("leak at {function} not reported: {}", json(report)));
    let first = &stack.frames[0];
    assert!(
        first.file.as_deref().is_some_and(|name| name.ends_with(file)),
        "{function} frame does not name {file}: {}",
        json(report)
    );
    assert!(first.line.is_some(), "{function} frame has no line: {}", json(report));
    assert_eq!(
        totals(report.stacks_by_first_frame(function)),
        expected,
        "{function} should hold {} bytes in {} allocations: {}",
        expected.0,
        expected.1,
        json(report)
    );
}

/// Check that a stripped PIE is symbolized, with file and line, from the debug
/// file its .gnu_debuglink names.
#[test]
fn stripped_pie_symbolized_through_debuglink() {
    let report = trace_fixture("debuglink_leak", &[], &[]);
    assert_leak_with_line(&report, "dbg_leak", "debuglink_leak.c", (34000, 10));
}

/// Check that a stripped PIE is symbolized, with file and line, from
/// --debug-dir DIR/.build-id/xx/rest.debug by its build ID.
#[test]
fn stripped_pie_symbolized_through_build_id() {
    let report = trace_fixture("buildid_leak", &[], &["--debug-dir", FIXTURE_DEBUG_DIR]);
    assert_leak_with_line(&report, "bid_leak", "buildid_leak.c", (35000, 10));
}

/// Check that a frame in a binary with no symbols at all is given as module and
/// offset with a null symbol.
#[test]
fn stripped_binary_frame_has_module_and_offset() {
    let report = trace_fixture("nosyms_leak", &[], &[]);
    let ours: Vec<&StackReport> = report
        .stacks
        .iter()
        .filter(|stack| {
            stack
                .frames
                .first()
                .and_then(|frame| frame.module.as_deref())
                .is_some_and(|module| module.ends_with("nosyms_leak"))
        })
        .collect();
    let total = totals(ours.iter().copied());
    assert_eq!(
        total,
        (38000, 10),
        "stacks starting in module nosyms_leak should hold 10 x 3800 bytes: {}",
        json(&report)
    );
    for stack in ours {
        let first = &stack.frames[0];
        assert!(first.symbol.is_none(), "stripped frame has a symbol: {}", json(&report));
        assert!(first.offset.is_some(), "stripped frame has no numeric offset: {}", json(&report));
    }
}

/// Check that a stripped -rdynamic binary's leaking function is named from .dynsym.
#[test]
fn stripped_binary_symbolized_from_dynsym() {
    let report = trace_fixture("dynsym_leak", &[], &[]);
    assert_eq!(
        totals(report.stacks_by_first_frame("dyn_leak")),
        (39000, 10),
        "dyn_leak (in .dynsym only) should hold 10 x 3900 bytes: {}",
        json(&report)
    );
}

/// Starts fixture `name` from NS_ONLY_PROG: a copy on a tmpfs mounted on /mnt
/// in a private mount namespace, so the path does not exist on the host.
fn start_in_private_mnt(name: &str) -> Fixture {
    start_in_private_mnt_from(name, &fixture_path(name))
}

/// Like [`start_in_private_mnt`], running `binary` as fixture `name`.
fn start_in_private_mnt_from(name: &str, binary: &Path) -> Fixture {
    let mut command = Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs none /mnt && mkdir -p "${1%/*}" && cp "$0" "$1" && exec "$1""#)
        .arg(binary)
        .arg(NS_ONLY_PROG);
    let fixture = Fixture::spawn(name, command);
    let exe = fs::read_link(format!("/proc/{}/exe", fixture.pid())).unwrap();
    assert_eq!(exe, Path::new(NS_ONLY_PROG), "{name} does not run from {NS_ONLY_PROG}");
    assert!(
        !Path::new(NS_ONLY_PROG).exists(),
        "{NS_ONLY_PROG} exists on the host; the tmpfs mount escaped the namespace"
    );
    fixture
}

/// Check that a target running a binary that exists only in its own mount
/// namespace has its leaking function named with the right bytes.
#[test]
fn binary_only_in_target_mount_namespace_symbolized() {
    require_root();
    let mut fixture = start_in_private_mnt("mntns_leak");
    let report = trace_started(&mut fixture, &[]);
    assert_eq!(
        totals(report.stacks_by_first_frame("mntns_leak")),
        (37000, 10),
        "mntns_leak should hold 10 x 3700 bytes: {}",
        json(&report)
    );
}

/// Check that once a target whose binary existed only in its mount namespace
/// has exited, --sysroot lets the final report name its leaking function
/// from the copy: the target runs a stripped binary, so only the unstripped
/// copy under the sysroot has the name.
#[test]
fn exited_target_symbolized_from_sysroot() {
    require_root();
    let scratch = ScratchDir::new("sysroot");
    let sysroot = scratch.0.join("sysroot");
    let copy = sysroot.join(NS_ONLY_PROG.trim_start_matches('/'));
    fs::create_dir_all(copy.parent().unwrap()).unwrap();
    fs::copy(fixture_path("sysroot_leak"), &copy).unwrap();
    let stripped = scratch.0.join("sysroot_leak.stripped");
    fs::copy(fixture_path("sysroot_leak"), &stripped).unwrap();
    let status =
        Command::new("strip").arg("--strip-all").arg(&stripped).status().expect("run strip");
    assert!(status.success(), "strip failed on {}", stripped.display());

    let mut fixture = start_in_private_mnt_from("sysroot_leak", &stripped);
    let pid = fixture.pid().to_string();
    let mut tracer =
        Tracer::start(&["-p", &pid, "--sysroot", sysroot.to_str().unwrap(), "--json", "1"]);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    let status = fixture.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "fixture sysroot_leak failed: {status}");
    let reports = tracer.finish().reports();
    let report = final_report(&reports);
    assert!(report.exited, "final report does not say the target exited: {}", json(report));
    assert_eq!(
        totals(report.stacks_by_first_frame("sysroot_leak")),
        (18000, 5),
        "sysroot_leak should hold 5 x 3600 bytes: {}",
        json(report)
    );
}

/// The 1-based line of fixture `source` that carries `marker`.
fn marked_line(source: &str, marker: &str) -> u32 {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(source);
    let text = std::fs::read_to_string(&path).expect("read the fixture's source");
    let index = text
        .lines()
        .position(|line| line.contains(marker))
        .unwrap_or_else(|| panic!("{marker} not in {}", path.display()));
    index as u32 + 1
}

/// Check that an inlined helper whose last instruction is the allocator call
/// is named as an inlined frame at the call's own line, inside main at the
/// line that calls the helper: frames are looked up at the call, not at the
/// return address, which lies past the helper's code.
#[test]
fn inlined_caller_named_at_its_call() {
    let report = trace_fixture("unwind_inlined", &[], &[]);
    let (call, helper_call) = (
        marked_line("unwind_inlined.c", "LEAK_CALL"),
        marked_line("unwind_inlined.c", "HELPER_CALL"),
    );
    let stack = report
        .stacks
        .iter()
        .find(|stack| has_symbol(&stack.frames, "aligned_block"))
        .unwrap_or_else(|| panic!("no stack names the inlined aligned_block: {}", json(&report)));
    let helper = &stack.frames[0];
    assert_eq!(
        (helper.symbol.as_deref(), helper.inlined, helper.line),
        (Some("aligned_block"), true, Some(call)),
        "the first frame should be aligned_block, inlined, at its posix_memalign call: {}",
        json(&report)
    );
    let caller = &stack.frames[1];
    assert_eq!(
        (caller.symbol.as_deref(), caller.inlined, caller.line),
        (Some("main"), false, Some(helper_call)),
        "aligned_block should sit in main at the line that calls it: {}",
        json(&report)
    );
    assert_eq!(caller.address, helper.address, "an inlined frame shares its caller's address");
    assert_eq!(totals([stack]), (32 * 200, 32), "32 blocks of 200 bytes: {}", json(&report));
}
