//! Harness for the integration tests: starts fixture programs, runs the
//! leaktrace binary against them, and reads the JSON reports it prints.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

mod tracer;

pub use tracer::{run_tracer, Finished, Tracer};

pub use leaktrace_report::{
    is_runtime_symbol, read_reports, Ended, Finding, Frame, HeapApi, KernelKind, Lost,
    MemoryReport, ReadError, RecordKind, Report, StackEnd, StackReport, ThreadSiteReport,
    ThreadsBeforeAttach, Trend, Verdict, VerdictKind,
};

/// Directory holding the compiled fixtures (set by build.rs).
pub const FIXTURE_DIR: &str = env!("FIXTURE_DIR");

/// How long a fixture may take to print its PID or READY.
const FIXTURE_TIMEOUT: Duration = Duration::from_secs(30);

/// Directory of separate debug files by build ID, for --debug-dir (set by build.rs).
pub const FIXTURE_DEBUG_DIR: &str = env!("FIXTURE_DEBUG_DIR");

/// Path of a compiled fixture program. A fixture that needs an optional
/// package fails here with the package to install, if build.rs could not build it.
pub fn fixture_path(name: &str) -> PathBuf {
    let path = Path::new(FIXTURE_DIR).join(name);
    if let Ok(why) = std::fs::read_to_string(path.with_extension("missing")) {
        panic!("fixture {name} was not built: {why}");
    }
    assert!(path.exists(), "fixture {} was not built", path.display());
    path
}

/// Path of the leaktrace binary: $LEAKTRACE_BIN, else the workspace's
/// target/release/leaktrace, else target/debug/leaktrace.
pub fn tracer_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("LEAKTRACE_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.exists(),
            "LEAKTRACE_BIN={} does not exist; build it with `cargo xtask test`",
            bin.display()
        );
        return bin;
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    for profile in ["release", "debug"] {
        let bin = target.join(profile).join("leaktrace");
        if bin.exists() {
            return bin;
        }
    }
    panic!(
        "leaktrace binary not found: set LEAKTRACE_BIN or build {}/release/leaktrace \
         (`cargo xtask test` does both)",
        target.display()
    );
}

/// Fails the test unless it runs as root: BPF and uprobes need it, and a
/// skipped test would hide that nothing was checked.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests load BPF programs and must run as root (try `sudo -E cargo xtask test`)"
    );
}

/// Reads lines from `reader` on a thread and hands them over a channel, so
/// callers can wait with a timeout.
fn line_channel(reader: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running fixture program that follows the handshake in fixtures/fixture.h.
/// Killed (SIGKILL) and reaped on drop.
pub struct Fixture {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    pid: u32,
}

impl Fixture {
    /// Starts fixture `name` with `args` and waits for its `PID <n>` line.
    pub fn start(name: &str, args: &[&str]) -> Self {
        let mut command = Command::new(fixture_path(name));
        command.args(args);
        Self::spawn(name, command)
    }

    /// Starts a fixture through a custom command line (e.g. a wrapper that
    /// execs it) and waits for its `PID <n>` line.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("failed to start fixture {name}: {err}"));
        let stdin = child.stdin.take();
        let stdout = line_channel(child.stdout.take().unwrap());
        let mut fixture = Self { name: name.to_owned(), child, stdin, stdout, pid: 0 };
        let line = fixture.next_line("its PID");
        fixture.pid = line
            .strip_prefix("PID ")
            .and_then(|pid| pid.trim().parse().ok())
            .unwrap_or_else(|| panic!("fixture {name} printed {line:?} instead of `PID <n>`"));
        fixture
    }

    /// Starts a fixture through `command`, which runs it as the first process
    /// of a new PID namespace (`unshare -p -f --kill-child ...`): it prints
    /// `PID 1`, and its PID here is that of the one child of the command.
    /// Returns the fixture and its PID inside its namespace.
    pub fn spawn_in_pid_namespace(name: &str, command: Command) -> (Self, u32) {
        let mut fixture = Self::spawn(name, command);
        let inner = fixture.pid;
        let outer = fixture.child.id();
        let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children"))
            .unwrap_or_else(|err| panic!("failed to read the children of {outer}: {err}"));
        fixture.pid = children
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("{name}'s launcher {outer} has no child: {children:?}"));
        (fixture, inner)
    }

    /// The fixture's process ID, as it printed it.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Lets the fixture start its workload.
    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("go() called twice");
        stdin
            .write_all(b"\n")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|err| panic!("failed to tell fixture {} to go: {err}", self.name));
        self.stdin = None;
    }

    /// Waits for a fixture that ends on its own to exit, and reaps it (as a
    /// real parent would, so it does not linger as a zombie).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("failed to wait for fixture") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fixture {} did not exit within {timeout:?}",
                self.name
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the fixture prints READY (its workload is done).
    pub fn wait_ready(&mut self) {
        let line = self.next_line("READY");
        assert_eq!(line, "READY", "fixture {} printed {line:?} instead of READY", self.name);
    }

    fn next_line(&mut self, what: &str) -> String {
        match self.stdout.recv_timeout(FIXTURE_TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("fixture {} did not print {what} within {FIXTURE_TIMEOUT:?}", self.name)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                panic!("fixture {} exited ({status:?}) before printing {what}", self.name)
            }
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The child is not reaped until wait() below, so its PID cannot have
        // been reused by another process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The usual test: start fixture `name`, trace it with
/// `-p PID --json --top 1000 1 5` plus `extra`, let it run its workload once the
/// probes are attached, and return the final report.
pub fn trace_fixture(name: &str, args: &[&str], extra: &[&str]) -> Report {
    let mut fixture = Fixture::start(name, args);
    trace_started(&mut fixture, extra)
}

/// Like [`trace_fixture`] for a fixture that is already started (and waiting
/// for its go line).
pub fn trace_started(fixture: &mut Fixture, extra: &[&str]) -> Report {
    let name = fixture.name.clone();
    // Show every stack unless the test is about --top: assertions that
    // something is absent mean nothing if it was merely cut off.
    let mut args = extra.to_vec();
    if !extra.iter().any(|arg| *arg == "--top" || *arg == "-T") {
        args.extend_from_slice(&["--top", "1000"]);
    }
    // 1 s reports, 5 of them: the workload takes well under a second, so its
    // leaks are seconds old (past the default --older 500 ms) at the end.
    let mut tracer = Tracer::trace_pid(fixture.pid(), 1, 5, &args);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    assert!(
        tracer.is_running(),
        "fixture {name} finished its workload after leaktrace had already exited; stderr:\n{}",
        tracer.stderr_text()
    );
    let finished = tracer.finish();
    let reports = finished.reports();
    final_report(&reports).clone()
}

/// Reads every report of leaktrace's stdout (lines starting with `{`; in -c
/// mode the traced program shares stdout), none if it printed none.
pub fn reports(stdout: &str) -> Vec<Report> {
    match read_reports(stdout.as_bytes()) {
        Ok(reports) => reports,
        Err(ReadError::Empty) => Vec::new(),
        Err(err) => panic!("leaktrace printed what is not a report ({err}):\n{stdout}"),
    }
}

/// The last report, checked to be marked final.
pub fn final_report(reports: &[Report]) -> &Report {
    let last = reports.last().expect("leaktrace printed no JSON report");
    assert!(last.is_final, "last report is not marked final: {}", json(last));
    last
}

/// A report as one line of JSON, for failure messages.
pub fn json(report: &Report) -> String {
    serde_json::to_string(report).unwrap_or_else(|err| format!("(unprintable report: {err})"))
}

/// (bytes, allocations) summed over `stacks`.
pub fn totals<'a>(stacks: impl IntoIterator<Item = &'a StackReport>) -> (u64, u64) {
    stacks.into_iter().fold((0, 0), |(b, a), stack| (b + stack.bytes, a + stack.allocations))
}

/// The largest stack whose first frame is the function `name`.
pub fn stack_by_first_frame<'a>(report: &'a Report, name: &'a str) -> Option<&'a StackReport> {
    report.stacks_by_first_frame(name).max_by_key(|stack| stack.bytes)
}

/// Every stack whose first frame's symbol contains `part` (for demangled
/// names with paths and generics, e.g. `rust_system::box_leak`).
pub fn stacks_by_first_frame_containing<'a>(
    report: &'a Report,
    part: &'a str,
) -> impl Iterator<Item = &'a StackReport> {
    report.stacks.iter().filter(move |stack| stack.first_symbol().is_some_and(|s| s.contains(part)))
}

/// Whether one of `frames` has the symbol `name`.
pub fn has_symbol(frames: &[Frame], name: &str) -> bool {
    frames.iter().any(|frame| frame.symbol.as_deref() == Some(name))
}

/// Whether `actual` is within `percent` % of `expected`.
pub fn within(actual: u64, expected: u64, percent: u64) -> bool {
    actual.abs_diff(expected) * 100 <= expected * percent
}

/// Whether `actual` is within `percent` % of `expected`.
pub fn within_f64(actual: f64, expected: f64, percent: f64) -> bool {
    (actual - expected).abs() * 100.0 <= expected.abs() * percent
}

/// For fixtures that keep working until killed (READY right after go): start
/// fixture `name`, trace it with `-p PID --json --top 1000 1 COUNT` (a report
/// a second, so growth is seen over COUNT intervals), let it go as soon as the
/// probes are attached, and return every report, the last one final.
pub fn trace_over_time(name: &str, count: u32) -> Vec<Report> {
    trace_over_time_with(name, count, &[])
}

/// Like [`trace_over_time`], with `extra` flags for the tracer.
pub fn trace_over_time_with(name: &str, count: u32, extra: &[&str]) -> Vec<Report> {
    let mut fixture = Fixture::start(name, &[]);
    let mut args = vec!["--top", "1000"];
    args.extend_from_slice(extra);
    let reports = run_over_time(&mut fixture, count, &args).reports();
    final_report(&reports);
    reports
}

/// Trace the started `fixture` with `-p PID --json 1 COUNT` plus `extra`,
/// let it go once the probes are attached, and return how leaktrace
/// ended (its reports and its stderr).
pub fn run_over_time(fixture: &mut Fixture, count: u32, extra: &[&str]) -> Finished {
    let mut tracer = Tracer::trace_pid(fixture.pid(), 1, count, extra);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    tracer.finish()
}

/// Events lost, of every kind, in `report`.
pub fn lost_events(report: &Report) -> u64 {
    report.lost.values().sum()
}

/// The report's verdict, failing with the report if it has none.
pub fn verdict(report: &Report) -> &Verdict {
    report.verdict.as_ref().unwrap_or_else(|| panic!("report has no verdict: {}", json(report)))
}

/// The report's memory section, failing with the report if it has none.
pub fn memory(report: &Report) -> &MemoryReport {
    report.memory.as_ref().unwrap_or_else(|| panic!("report has no memory: {}", json(report)))
}

/// The thread site with a frame whose symbol is `name` and the most threads
/// created there.
pub fn thread_site_through<'a>(report: &'a Report, name: &str) -> Option<&'a ThreadSiteReport> {
    report
        .threads
        .iter()
        .flat_map(|threads| &threads.sites)
        .filter(|site| has_symbol(&site.frames, name))
        .max_by_key(|site| site.counts.created)
}

/// The symbol of a stack's first frame outside the language runtime's
/// allocation path, as the model's [`is_runtime_symbol`] tells it.
pub fn first_user_symbol(stack: &StackReport) -> Option<&str> {
    stack
        .frames
        .iter()
        .filter(|frame| frame.symbol.is_some())
        .find(|frame| !is_runtime_symbol(frame))
        .and_then(|frame| frame.symbol.as_deref())
}

/// A scratch directory under the system temp dir, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// Creates an empty leaktrace-TAG-PID directory.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("leaktrace-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asserts a failed run with a single error line containing `needle` and no panic.
pub fn assert_clean_error(finished: &Finished, needle: &str) {
    assert!(
        !finished.status.success(),
        "leaktrace succeeded on bad input; stderr:\n{}",
        finished.stderr
    );
    assert!(
        !finished.stderr.contains("panicked"),
        "leaktrace panicked on bad input:\n{}",
        finished.stderr
    );
    let lines: Vec<&str> = finished.stderr.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{}", finished.stderr);
    assert!(
        lines[0].to_lowercase().contains(needle),
        "error does not mention {needle:?}: {}",
        lines[0]
    );
}
