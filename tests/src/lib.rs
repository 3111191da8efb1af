//! Harness for the integration tests: starts fixture programs, runs the
//! leaktrace binary against them, and reads the JSON reports it prints.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Directory holding the compiled fixtures (set by build.rs).
pub const FIXTURE_DIR: &str = env!("FIXTURE_DIR");

/// How long a fixture may take to print its PID or READY.
const FIXTURE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the tracer may take to attach its probes.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the tracer may run in total before a test gives up on it.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

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

/// How a tracer run ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Asserts a zero exit status and returns the JSON reports on stdout.
    pub fn reports(&self) -> Vec<Value> {
        assert!(
            self.status.success(),
            "leaktrace exited with {}; stderr:\n{}\nstdout:\n{}",
            self.status,
            self.stderr,
            self.stdout
        );
        reports(&self.stdout)
    }
}

/// A running leaktrace process. Killed and reaped on drop.
pub struct Tracer {
    child: Child,
    stderr_lines: Receiver<String>,
    /// Every stderr line seen so far, for error messages.
    stderr: Arc<Mutex<String>>,
    stdout: Option<thread::JoinHandle<String>>,
}

impl Tracer {
    /// Starts leaktrace with `args`, capturing stdout and stderr.
    pub fn start(args: &[&str]) -> Self {
        require_root();
        let bin = tracer_bin();
        let mut child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("failed to start {}: {err}", bin.display()));
        let mut out = child.stdout.take().unwrap();
        let stdout = thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut text);
            text
        });
        let raw = line_channel(child.stderr.take().unwrap());
        // Mirror stderr into a buffer as it arrives, so it is available for
        // messages whether or not anyone is waiting on the channel.
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, stderr_lines) = mpsc::channel();
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in raw {
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
                drop(all);
                let _ = tx.send(line);
            }
        });
        Self { child, stderr_lines, stderr, stdout: Some(stdout) }
    }

    /// Starts `leaktrace -p PID --json INTERVAL COUNT` plus `extra` flags.
    pub fn trace_pid(pid: u32, interval: u32, count: u32, extra: &[&str]) -> Self {
        let (pid, interval, count) = (pid.to_string(), interval.to_string(), count.to_string());
        let mut args = vec!["-p", &pid, "--json"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&interval, &count]);
        Self::start(&args)
    }

    /// Waits until leaktrace reports on stderr that all probes are attached.
    pub fn wait_attached(&mut self) {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if line.contains("attached to pid") => return,
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "leaktrace did not print `attached to pid` within {ATTACH_TIMEOUT:?}; stderr:\n{}",
                    self.stderr_text()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "leaktrace exited ({status:?}) before attaching; stderr:\n{}",
                        self.stderr_text()
                    )
                }
            }
        }
    }

    /// Whether leaktrace is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (e.g. libc::SIGINT) to leaktrace.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill() only sends a signal; the child is not yet reaped, so
        // the PID still names it.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "failed to signal leaktrace: {}", std::io::Error::last_os_error());
    }

    /// Waits for leaktrace to exit on its own and returns what it printed.
    pub fn finish(mut self) -> Finished {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("failed to wait for leaktrace") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "leaktrace did not exit within {FINISH_TIMEOUT:?}; stderr:\n{}",
                    self.stderr_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        let stdout = self.stdout.take().unwrap().join().unwrap_or_default();
        self.drain_stderr();
        Finished { status, stdout, stderr: self.stderr_text() }
    }

    /// Waits until every stderr line is in the buffer: the channel
    /// disconnects once stderr reaches EOF and the mirroring thread is done.
    fn drain_stderr(&self) {
        while self.stderr_lines.recv_timeout(Duration::from_secs(5)).is_ok() {}
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs leaktrace to completion with `args` (no fixture involved).
pub fn run_tracer(args: &[&str]) -> Finished {
    Tracer::start(args).finish()
}

/// The usual test: start fixture `name`, trace it with
/// `-p PID --json --top 1000 1 5` plus `extra`, let it run its workload once the
/// probes are attached, and return the final report.
pub fn trace_fixture(name: &str, args: &[&str], extra: &[&str]) -> Value {
    let mut fixture = Fixture::start(name, args);
    trace_started(&mut fixture, extra)
}

/// Like [`trace_fixture`] for a fixture that is already started (and waiting
/// for its go line).
pub fn trace_started(fixture: &mut Fixture, extra: &[&str]) -> Value {
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

/// Parses every JSON line of leaktrace's stdout (lines starting with `{`;
/// in -c mode the traced program shares stdout).
pub fn reports(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("leaktrace printed invalid JSON ({err}): {line}"))
        })
        .collect()
}

/// The last report, checked to be marked final.
pub fn final_report(reports: &[Value]) -> &Value {
    let last = reports.last().expect("leaktrace printed no JSON report");
    assert_eq!(last["final"], true, "last report is not marked final: {last}");
    last
}

/// The report's stacks (empty if missing).
pub fn stacks(report: &Value) -> &[Value] {
    report["stacks"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A stack's frames, innermost first.
pub fn frames(stack: &Value) -> &[Value] {
    stack["frames"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The symbol of a frame, if known.
pub fn symbol(frame: &Value) -> Option<&str> {
    frame["symbol"].as_str()
}

/// The symbol of a stack's first frame (the allocator's caller).
pub fn first_symbol(stack: &Value) -> Option<&str> {
    frames(stack).first().and_then(symbol)
}

/// Bytes outstanding in a stack.
pub fn bytes(stack: &Value) -> u64 {
    stack["bytes"].as_u64().unwrap_or_else(|| panic!("stack without bytes: {stack}"))
}

/// Allocations outstanding in a stack.
pub fn allocations(stack: &Value) -> u64 {
    stack["allocations"].as_u64().unwrap_or_else(|| panic!("stack without allocations: {stack}"))
}

/// Every stack whose first frame is the function `name`.
pub fn stacks_by_first_frame<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    stacks(report).iter().filter(|stack| first_symbol(stack) == Some(name)).collect()
}

/// The largest stack whose first frame is the function `name`.
pub fn stack_by_first_frame<'a>(report: &'a Value, name: &str) -> Option<&'a Value> {
    stacks_by_first_frame(report, name).into_iter().max_by_key(|stack| bytes(stack))
}

/// (bytes, allocations) summed over every stack whose first frame is `name`;
/// a function that calls the allocator from several lines has several stacks.
pub fn totals_by_first_frame(report: &Value, name: &str) -> (u64, u64) {
    stacks_by_first_frame(report, name)
        .iter()
        .fold((0, 0), |(b, a), stack| (b + bytes(stack), a + allocations(stack)))
}

/// Every stack with a frame whose symbol contains all of `parts`.
pub fn stacks_containing<'a>(report: &'a Value, parts: &[&str]) -> Vec<&'a Value> {
    stacks(report)
        .iter()
        .filter(|stack| {
            frames(stack)
                .iter()
                .filter_map(symbol)
                .any(|sym| parts.iter().all(|part| sym.contains(part)))
        })
        .collect()
}

/// The largest stack with a frame whose symbol contains `part`.
pub fn stack_containing<'a>(report: &'a Value, part: &str) -> Option<&'a Value> {
    stacks_containing(report, &[part]).into_iter().max_by_key(|stack| bytes(stack))
}

/// Bytes summed over every stack with a frame whose symbol is `name`.
pub fn bytes_mentioning(report: &Value, name: &str) -> u64 {
    stacks(report)
        .iter()
        .filter(|stack| frames(stack).iter().any(|frame| symbol(frame) == Some(name)))
        .map(bytes)
        .sum()
}

/// Whether `actual` is within `percent` % of `expected`.
pub fn within(actual: u64, expected: u64, percent: u64) -> bool {
    actual.abs_diff(expected) * 100 <= expected * percent
}

/// For fixtures that keep working until killed (READY right after go): start
/// fixture `name`, trace it with `-p PID --json --top 1000 1 COUNT` (a report
/// a second, so growth is seen over COUNT intervals), let it go as soon as the
/// probes are attached, and return every report, the last one final.
pub fn trace_over_time(name: &str, count: u32) -> Vec<Value> {
    let mut fixture = Fixture::start(name, &[]);
    let mut tracer = Tracer::trace_pid(fixture.pid(), 1, count, &["--top", "1000"]);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    let reports = tracer.finish().reports();
    final_report(&reports);
    reports
}

/// The value at JSON `pointer` (e.g. "/memory/since_attach/heap_rss") as an
/// i64, failing with the report if it is missing or not an integer.
pub fn int_at(report: &Value, pointer: &str) -> i64 {
    report
        .pointer(pointer)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("report has no integer at {pointer}: {report}"))
}

/// The value at JSON `pointer` as an f64, failing with the report if it is
/// missing or not a number.
pub fn number_at(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("report has no number at {pointer}: {report}"))
}

/// The verdict's kinds ("leak", "thread_leak", "retention", "no_leak").
pub fn verdict_kinds(report: &Value) -> Vec<&str> {
    report["verdict"]["kinds"]
        .as_array()
        .unwrap_or_else(|| panic!("report has no verdict.kinds: {report}"))
        .iter()
        .map(|kind| kind.as_str().unwrap_or_else(|| panic!("verdict kind {kind} is not a string")))
        .collect()
}

/// The verdict's one-line text.
pub fn verdict_text(report: &Value) -> &str {
    report["verdict"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("report has no verdict.text: {report}"))
}

/// A stack's growth trend ("new", "growing", "plateau", "flat", "shrinking").
pub fn trend(stack: &Value) -> &str {
    stack["growth"]["trend"]
        .as_str()
        .unwrap_or_else(|| panic!("stack without growth.trend: {stack}"))
}

/// A stack's recent growth rate in bytes per second.
pub fn bytes_per_second(stack: &Value) -> f64 {
    stack["growth"]["bytes_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("stack without growth.bytes_per_second: {stack}"))
}

/// The report's pthread_create call sites (empty if missing).
pub fn thread_sites(report: &Value) -> &[Value] {
    report["threads"]["sites"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The thread site with a frame whose symbol is `name` and the most threads
/// created there.
pub fn thread_site_through<'a>(report: &'a Value, name: &str) -> Option<&'a Value> {
    thread_sites(report)
        .iter()
        .filter(|site| frames(site).iter().any(|frame| symbol(frame) == Some(name)))
        .max_by_key(|site| site_count(site, "created"))
}

/// An integer field of a thread site ("created", "alive", "exited_unjoined",
/// "joined", "detached", "stack_bytes").
pub fn site_count(site: &Value, field: &str) -> u64 {
    site[field].as_u64().unwrap_or_else(|| panic!("thread site without {field}: {site}"))
}

/// Whether `actual` is within `percent` % of `expected`.
pub fn within_f64(actual: f64, expected: f64, percent: f64) -> bool {
    (actual - expected).abs() * 100.0 <= expected.abs() * percent
}

/// The report's `probed` list: which functions were probed in which object.
pub fn probed(report: &Value) -> &[Value] {
    report["probed"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("report has no `probed` list: {report}"))
}

/// The functions probed in the first object whose path satisfies `matches`.
pub fn probed_in<'a>(report: &'a Value, matches: impl Fn(&str) -> bool) -> Option<Vec<&'a str>> {
    probed(report).iter().find(|entry| entry["object"].as_str().is_some_and(&matches)).map(
        |entry| {
            entry["functions"]
                .as_array()
                .unwrap_or_else(|| panic!("probed object without functions: {entry}"))
                .iter()
                .filter_map(Value::as_str)
                .collect()
        },
    )
}

/// Every stack whose first frame's symbol contains `part` (for demangled
/// names with paths and generics, e.g. `rust_system::box_leak`).
pub fn stacks_by_first_frame_containing<'a>(report: &'a Value, part: &str) -> Vec<&'a Value> {
    stacks(report)
        .iter()
        .filter(|stack| first_symbol(stack).is_some_and(|sym| sym.contains(part)))
        .collect()
}

/// Frames of the language runtime's allocation path, as the tracer skips
/// them when naming a stack: Rust's alloc/core/std helpers (real frames in
/// debug builds) and C++ operator new.
const RUNTIME_PREFIXES: [&str; 8] =
    ["alloc::", "core::", "std::", "<alloc::", "<core::", "<std::", "__rust", "operator new"];

/// The symbol of a stack's first frame outside the language runtime.
pub fn first_user_symbol(stack: &Value) -> Option<&str> {
    frames(stack)
        .iter()
        .filter_map(symbol)
        .find(|sym| !RUNTIME_PREFIXES.iter().any(|prefix| sym.starts_with(prefix)))
}

/// (bytes, allocations) summed over every stack whose first frame outside
/// the language runtime contains `part`.
pub fn totals_by_first_user_frame_containing(report: &Value, part: &str) -> (u64, u64) {
    stacks(report)
        .iter()
        .filter(|stack| first_user_symbol(stack).is_some_and(|sym| sym.contains(part)))
        .fold((0, 0), |(b, a), stack| (b + bytes(stack), a + allocations(stack)))
}

/// (bytes, allocations) summed over every stack whose first frame's symbol contains `part`.
pub fn totals_by_first_frame_containing(report: &Value, part: &str) -> (u64, u64) {
    stacks_by_first_frame_containing(report, part)
        .iter()
        .fold((0, 0), |(b, a), stack| (b + bytes(stack), a + allocations(stack)))
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
