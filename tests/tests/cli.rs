//! The command line: -c with arguments, the ways a run ends, and bad input.

use leaktrace_tests::*;
use std::{path::Path, thread, time::Duration};

/// Check that -c runs a command with its arguments, traces it from its first
/// allocation and ends with a final report once it exits.
#[test]
fn command_with_arguments_traced_until_exit() {
    let cmd = format!("{} 7 300 nowait", fixture_path("args_leak").display());
    let finished = run_tracer(&["--json", "-c", &cmd, "1"]);
    let reports = finished.reports();
    let report = final_report(&reports);
    assert!(report.exited, "final report does not say the command exited: {}", json(report));
    assert_eq!(
        totals(report.stacks_by_first_frame("arg_leak")),
        (2100, 7),
        "arg_leak should hold 7 x 300 bytes: {}",
        json(report)
    );
}

/// Check that a short -c program that leaks and exits at once has its leaks
/// in the final report, named: once it has exited, everything it held is
/// outstanding, however young (with the default --older and with -o 0).
#[test]
fn short_command_leaks_reported_after_exit() {
    let cmd = format!("{} 10 100 exit", fixture_path("args_leak").display());
    for older in ["500", "0"] {
        let finished = run_tracer(&["--json", "-o", older, "-c", &cmd, "1"]);
        let reports = finished.reports();
        let report = final_report(&reports);
        assert!(report.exited, "-o {older}: the report does not say it exited: {}", json(report));
        assert_eq!(
            totals(report.stacks_by_first_frame("arg_leak")),
            (1000, 10),
            "-o {older}: arg_leak should hold 10 x 100 bytes, named: {}",
            json(report)
        );
    }
}

/// Starts args_leak (4 x 1000 bytes), lets it leak under `leaktrace -p PID --json 1 extra...`
/// and returns the tracer still running.
fn trace_args_leak(extra: &[&str]) -> (Fixture, Tracer) {
    let mut fixture = Fixture::start("args_leak", &["4", "1000"]);
    let pid = fixture.pid().to_string();
    let mut args = vec!["-p", pid.as_str(), "--json"];
    args.extend_from_slice(extra);
    args.push("1");
    let mut tracer = Tracer::start(&args);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    (fixture, tracer)
}

/// Check that SIGINT, SIGTERM and SIGHUP end tracing with exit 0 and a
/// final report.
#[test]
fn signal_ends_tracing_with_final_report() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let (_fixture, mut tracer) = trace_args_leak(&[]);
        // Let the leaks age past the default --older 500 ms.
        thread::sleep(Duration::from_secs(2));
        assert!(tracer.is_running(), "leaktrace exited before signal {signal}");
        tracer.signal(signal);
        let reports = tracer.finish().reports();
        let report = final_report(&reports);
        assert_eq!(
            totals(report.stacks_by_first_frame("arg_leak")),
            (4000, 4),
            "after signal {signal}, arg_leak should hold 4 x 1000 bytes: {}",
            json(report)
        );
    }
}

/// Check that --duration ends tracing with exit 0 and a final report.
#[test]
fn duration_ends_tracing() {
    let (_fixture, tracer) = trace_args_leak(&["--duration", "3"]);
    let reports = tracer.finish().reports();
    let report = final_report(&reports);
    assert_eq!(
        totals(report.stacks_by_first_frame("arg_leak")),
        (4000, 4),
        "arg_leak should hold 4 x 1000 bytes: {}",
        json(report)
    );
}

/// A PID with no process behind it, searched downwards from pid_max.
fn unused_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(32768);
    (1..max).rev().find(|pid| !Path::new(&format!("/proc/{pid}")).exists()).expect("no free PID")
}

/// Check that a PID with no process fails with a one-line error naming the PID.
#[test]
fn nonexistent_pid_rejected() {
    let pid = unused_pid().to_string();
    let finished = run_tracer(&["-p", &pid, "1", "1"]);
    assert_clean_error(&finished, &pid);
}

/// Check that a kernel thread (kthreadd, PID 2) is refused with a one-line error.
#[test]
fn kernel_thread_rejected() {
    let finished = run_tracer(&["-p", "2", "1", "1"]);
    assert_clean_error(&finished, "kernel thread");
}

/// Check that invalid flags are usage errors (exit 2), not panics.
#[test]
fn invalid_flags_rejected() {
    let pid = std::process::id().to_string();
    for args in [
        vec!["-p", pid.as_str(), "--top", "banana"],
        vec!["--nonsense"],
        vec!["-p", pid.as_str(), "-T", "0"],
        vec!["-p", pid.as_str(), "1e300"],
        vec!["-p", pid.as_str(), "--duration", "18446744073709551615"],
    ] {
        let finished = run_tracer(&args);
        assert_eq!(
            finished.status.code(),
            Some(2),
            "leaktrace {args:?} should be a usage error; stderr:\n{}",
            finished.stderr
        );
        assert!(
            !finished.stderr.contains("panicked"),
            "leaktrace {args:?} panicked:\n{}",
            finished.stderr
        );
    }
}

/// Check that an unprivileged user gets a one-line error saying what to do.
#[test]
fn unprivileged_user_rejected() {
    // A copy under /tmp, so user nobody can reach it whatever the checkout's
    // directory permissions are.
    let copy = std::env::temp_dir().join(format!("leaktrace-unprivileged-{}", std::process::id()));
    std::fs::copy(tracer_bin(), &copy).expect("copy leaktrace to /tmp");
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("make the copy executable");
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&copy)
        .args(["-p", "1", "1", "1"])
        .output()
        .expect("run setpriv");
    let _ = std::fs::remove_file(&copy);
    let finished = Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert_clean_error(&finished, "root");
}

/// Check that an object with no malloc and free is refused with a one-line error.
#[test]
fn object_without_allocator_rejected() {
    let mut fixture = Fixture::start("args_leak", &["1", "10"]);
    let pid = fixture.pid().to_string();
    let finished = run_tracer(&["-p", &pid, "-O", "/lib/x86_64-linux-gnu/libm.so.6", "1", "1"]);
    assert_clean_error(&finished, "no allocator found");
    fixture.go();
}

/// Check that a --sysroot that does not exist is refused with a one-line error.
#[test]
fn missing_sysroot_rejected() {
    let pid = std::process::id().to_string();
    let finished = run_tracer(&["-p", &pid, "--sysroot", "/nonexistent", "1", "1"]);
    assert_clean_error(&finished, "--sysroot /nonexistent");
}

/// Check that an --obj that is not an ELF object is refused, naming the flag.
#[test]
fn object_not_elf_rejected() {
    let mut fixture = Fixture::start("args_leak", &["1", "10"]);
    let pid = fixture.pid().to_string();
    let finished = run_tracer(&["-p", &pid, "-O", "/etc/passwd", "1", "1"]);
    assert_clean_error(&finished, "--obj /etc/passwd");
    fixture.go();
}

/// Runs `leaktrace --json -c "ends ARGS" 1` to its end; returns how it ended
/// and its final report, having checked that stdout held JSON alone.
fn run_ends(args: &str) -> (Finished, Report) {
    let cmd = format!("{} {args}", fixture_path("ends").display());
    let finished = run_tracer(&["--json", "-c", &cmd, "1"]);
    for line in finished.stdout.lines() {
        assert!(
            serde_json::from_str::<Report>(line).is_ok(),
            "with --json, stdout holds a line that is not a report: {line:?}"
        );
    }
    assert!(
        finished.stderr.contains("ends: this is the program's own output"),
        "the program's output is not on stderr: {}",
        finished.stderr
    );
    let reports = read_reports(finished.stdout.as_bytes()).expect("reports on stdout");
    let report = final_report(&reports).clone();
    (finished, report)
}

/// Check that a -c program's exit status is in the final report and is
/// leaktrace's own exit code (as with `time`), and that with --json its
/// output goes to stderr, not among the reports.
#[test]
fn command_exit_status_reported() {
    let (finished, report) = run_ends("status 3");
    assert_eq!(report.ended, Some(Ended::Exited { code: 3 }), "{}", json(&report));
    assert_eq!(
        finished.status.code(),
        Some(3),
        "leaktrace's exit code; stderr:\n{}",
        finished.stderr
    );
    assert_eq!(totals(report.stacks_by_first_frame("ends_leak")), (500, 5), "{}", json(&report));
}

/// Check that a -c program that crashes is reported killed by its signal,
/// and leaktrace exits with 128 + the signal.
#[test]
fn command_crash_reported() {
    let (finished, report) = run_ends("segv");
    assert!(
        matches!(&report.ended, Some(Ended::Killed { signal: 11, name, .. }) if name == "SIGSEGV"),
        "the crash is not reported: {}",
        json(&report)
    );
    assert_eq!(finished.status.code(), Some(139), "stderr:\n{}", finished.stderr);
}

/// Check that a -c program does not outlive leaktrace stopped by SIGINT.
#[test]
fn command_ends_with_leaktrace() {
    let cmd = format!("{} run", fixture_path("ends").display());
    let mut tracer = Tracer::start(&["--json", "-c", &cmd, "1"]);
    tracer.wait_attached();
    let tracer_pid = tracer.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{tracer_pid}/task/{tracer_pid}/children"))
            .expect("read leaktrace's children");
    let program: u32 = children
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("leaktrace has no child: {children:?}"));
    std::thread::sleep(Duration::from_secs(2));
    tracer.signal(libc::SIGINT);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tracer.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let alive = Path::new("/proc").join(program.to_string()).exists();
    if alive {
        // SAFETY: a plain kill of the orphan, so that the test ends.
        unsafe { libc::kill(program as libc::pid_t, libc::SIGKILL) };
    }
    assert!(!alive, "the -c program (pid {program}) outlived leaktrace");
    let reports = tracer.finish().reports();
    final_report(&reports);
}
