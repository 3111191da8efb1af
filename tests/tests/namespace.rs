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

/// Copies `binary` to `root`/prog with the libraries it loads (at the same
/// paths under `root`): a root file system holding that program alone.
fn make_root(root: &Path, binary: &Path) {
    fs::create_dir_all(root).unwrap();
    fs::copy(binary, root.join("prog")).unwrap();
    let ldd = Command::new("ldd").arg(binary).output().expect("run ldd");
    let listing = String::from_utf8_lossy(&ldd.stdout);
    for library in listing.split_whitespace().filter(|word| word.starts_with('/')) {
        let inside = root.join(library.trim_start_matches('/'));
        fs::create_dir_all(inside.parent().unwrap()).unwrap();
        fs::copy(library, &inside).unwrap_or_else(|err| panic!("copy {library}: {err}"));
    }
}

/// Asserts the final report of mntns_leak run in a root of its own: its
/// leak named, with its bytes.
fn assert_root_leak(report: &Report) {
    assert_eq!(
        totals(report.stacks_by_first_frame("mntns_leak")),
        (37000, 10),
        "mntns_leak should hold 10 x 3700 bytes: {}",
        json(report)
    );
}

/// Check that a target in a plain chroot is traced with -p alone: its maps
/// name its files by host paths under the chroot, which /proc/PID/root
/// would put the directory in twice.
#[test]
fn chroot_target_traced() {
    require_root();
    let scratch = ScratchDir::new("chroot");
    make_root(&scratch.0, &fixture_path("mntns_leak"));
    let mut command = Command::new("chroot");
    command.arg(&scratch.0).arg("/prog");
    let mut fixture = Fixture::spawn("mntns_leak", command);
    let report = trace_started(&mut fixture, &[]);
    assert_root_leak(&report);
}

/// Check that a target whose root is a tmpfs mounted in its own mount
/// namespace, on a directory that is empty on the host, entered with
/// chroot, is traced with -p alone.
#[test]
fn private_tmpfs_root_traced() {
    require_root();
    let scratch = ScratchDir::new("tmpfs-root");
    let source = scratch.0.join("source");
    let root = scratch.0.join("root");
    make_root(&source, &fixture_path("mntns_leak"));
    fs::create_dir_all(&root).unwrap();
    let mut command = Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs none "$1" && cp -a "$0/." "$1/" && exec chroot "$1" /prog"#)
        .arg(&source)
        .arg(&root);
    let mut fixture = Fixture::spawn("mntns_leak", command);
    assert!(
        fs::read_dir(&root).unwrap().next().is_none(),
        "{} is not empty on the host; the tmpfs escaped the namespace",
        root.display()
    );
    let report = trace_started(&mut fixture, &[]);
    assert_root_leak(&report);
}

/// Check a root set up the way a container runtime does it: an overlayfs
/// (the program and its libraries below, a tmpfs above) mounted in a new
/// mount namespace, pivot_root into it, in a new PID namespace. leaktrace
/// runs on the host with the host PID, -p alone, and the report also
/// gives the PID inside the container.
#[test]
fn container_root_with_pid_namespace_traced() {
    require_root();
    let scratch = ScratchDir::new("container");
    let lower = scratch.0.join("lower");
    let (upper, root) = (scratch.0.join("upper"), scratch.0.join("root"));
    make_root(&lower, &fixture_path("mntns_leak"));
    fs::create_dir_all(&upper).unwrap();
    fs::create_dir_all(&root).unwrap();
    let mut command = Command::new("unshare");
    command
        .args(["-m", "-p", "-f", "--kill-child", "--propagation", "private", "sh", "-c"])
        .arg(concat!(
            r#"mount -t tmpfs none "$1" && mkdir "$1/upper" "$1/work" && "#,
            r#"mount -t overlay overlay -o "lowerdir=$0,upperdir=$1/upper,workdir=$1/work" "$2" && "#,
            r#"cd "$2" && mkdir old && pivot_root . old && exec /prog"#
        ))
        .arg(&lower)
        .arg(&upper)
        .arg(&root);
    let (mut fixture, inner) = Fixture::spawn_in_pid_namespace("mntns_leak", command);
    assert_eq!(inner, 1, "the program is not the first process of its PID namespace");
    let report = trace_started(&mut fixture, &[]);
    assert_root_leak(&report);
    assert_eq!(
        report.pid_in_namespace,
        Some(1),
        "the report does not give the PID inside the container: {}",
        json(&report)
    );
}

/// Check that a target whose executable (a static program, its allocator
/// inside) was deleted after it started is traced with -p alone.
#[test]
fn deleted_static_executable_traced() {
    require_root();
    let scratch = ScratchDir::new("deleted");
    let copy = scratch.0.join("static_glibc");
    fs::copy(fixture_path("static_glibc"), &copy).unwrap();
    let mut fixture = Fixture::spawn("static_glibc", Command::new(&copy));
    fs::remove_file(&copy).unwrap();
    let report = trace_started(&mut fixture, &[]);
    assert_eq!(
        totals(report.stacks_by_first_frame("static_leak")),
        (30000, 10),
        "static_leak should hold 10 x 3000 bytes: {}",
        json(&report)
    );
}

/// Check the other direction: leaktrace itself inside the target's PID (and
/// mount) namespace, as when copied into a container, given the PID it sees
/// there (1). The programs must compare that PID in the namespace, not with
/// the kernel's global one, or they see nothing and call it "no leak".
#[test]
fn tracer_inside_pid_namespace_traced() {
    require_root();
    let mut command = Command::new("unshare");
    command
        .args(["-p", "-f", "-m", "--mount-proc", "--kill-child"])
        .arg(fixture_path("mntns_leak"));
    let (mut fixture, inner) = Fixture::spawn_in_pid_namespace("mntns_leak", command);
    assert_eq!(inner, 1, "the fixture is not the first process of its PID namespace");
    let host = fixture.pid().to_string();
    let mut tracer = Tracer::start_through(
        &["nsenter", "--target", &host, "--pid", "--mount", "--"],
        &["-p", "1", "--json", "--top", "1000", "1", "5"],
    );
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    let reports = tracer.finish().reports();
    let report = final_report(&reports);
    assert_eq!(report.pid, 1, "leaktrace inside the namespace names the PID it was given");
    assert_root_leak(report);
}

/// Check the static build copied into a root that holds nothing else (no
/// libc, no shell, no mount program; the container's /proc and /sys
/// mounted, as a runtime does), run there in the target's mount and PID
/// namespaces against a static leaking program in the same root, given the
/// PID it sees (1): the leak is named. leaktrace mounts tracefs itself.
#[test]
fn static_tracer_in_bare_root() {
    require_root();
    let static_bin = std::env::var_os("LEAKTRACE_STATIC_BIN")
        .expect("LEAKTRACE_STATIC_BIN is not set: run `cargo xtask test`, which builds it");
    let scratch = ScratchDir::new("bare-root");
    let root = &scratch.0;
    for dir in ["proc", "sys"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::copy(&static_bin, root.join("leaktrace")).unwrap();
    fs::copy(fixture_path("static_glibc"), root.join("prog")).unwrap();
    let mut command = Command::new("unshare");
    command
        .args(["-m", "-p", "-f", "--kill-child", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t proc proc "$0/proc" && mount -t sysfs sysfs "$0/sys" && exec chroot "$0" /prog"#)
        .arg(root);
    let (mut fixture, inner) = Fixture::spawn_in_pid_namespace("static_glibc", command);
    assert_eq!(inner, 1, "the program is not the first process of its PID namespace");
    let host = fixture.pid().to_string();
    let mut tracer = Tracer::start_through_at(
        &["nsenter", "--target", &host, "--pid", "--mount", "--root", "--wd", "--"],
        "/leaktrace",
        &["-p", "1", "--json", "--top", "1000", "1", "5"],
    );
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    let reports = tracer.finish().reports();
    let report = final_report(&reports);
    assert_eq!(
        totals(report.stacks_by_first_frame("static_leak")),
        (30000, 10),
        "static_leak should hold 10 x 3000 bytes: {}",
        json(report)
    );
}
