//! Targets in another mount namespace, whose libc is a different file than the host's.

use leaktrace_tests::*;
use std::{fs, os::unix::fs::MetadataExt, path::Path, process::Command};

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// (device, inode) of a file.
fn file_id(path: impl AsRef<Path>) -> (u64, u64) {
    let path = path.as_ref();
    let meta = fs::metadata(path).unwrap_or_else(|err| panic!("stat {}: {err}", path.display()));
    (meta.dev(), meta.ino())
}

/// Inode of the libc.so.6 mapped into `pid`, from /proc/PID/maps.
fn mapped_libc_inode(pid: u32) -> u64 {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .find(|line| line.ends_with("libc.so.6"))
        .and_then(|line| line.split_whitespace().nth(4))
        .and_then(|inode| inode.parse().ok())
        .unwrap_or_else(|| panic!("no libc.so.6 mapping in /proc/{pid}/maps:\n{maps}"))
}

/// Check that a target in its own mount namespace, running a copy of libc that
/// is not the host's file, has its leak reported with the right function and bytes.
#[test]
fn leak_reported_in_private_mount_namespace() {
    require_root();
    let scratch = ScratchDir::new("ns");
    let copy = scratch.0.join("libc.so.6");
    fs::copy(LIBC, &copy).unwrap();

    let mut command = Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" "$1" && exec "$2""#)
        .arg(&copy)
        .arg(LIBC)
        .arg(fixture_path("ns_leak"));
    let mut fixture = Fixture::spawn("ns_leak", command);
    let pid = fixture.pid();

    // Make sure the target really runs another libc file than the host's.
    let host = file_id(LIBC);
    let inside = file_id(format!("/proc/{pid}/root{LIBC}"));
    assert_ne!(host, inside, "libc inside the namespace is the host's file; the bind mount failed");
    assert_eq!(mapped_libc_inode(pid), file_id(&copy).1, "the target did not map the copied libc");

    let report = trace_started(&mut fixture, &[]);
    assert_eq!(
        totals(report.stacks_by_first_frame("ns_leak")),
        (18000, 12),
        "ns_leak should hold 12 x 1500 bytes: {}",
        json(&report)
    );
}
