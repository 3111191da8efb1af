//! Running the leaktrace binary: started with arguments (or through a
//! command such as nsenter), waited for, and what it printed.

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{line_channel, reports, require_root, tracer_bin, Report};

/// How long the tracer may take to attach its probes.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the tracer may run in total before a test gives up on it.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// How a tracer run ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Asserts a zero exit status and returns the JSON reports on stdout.
    pub fn reports(&self) -> Vec<Report> {
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
        Self::start_through(&[], args)
    }

    /// Starts leaktrace with `args` through the command `prefix` (e.g.
    /// `nsenter --target PID --pid --mount --`), capturing stdout and stderr.
    pub fn start_through(prefix: &[&str], args: &[&str]) -> Self {
        let bin = tracer_bin();
        Self::start_through_at(prefix, bin.to_str().expect("a UTF-8 path"), args)
    }

    /// Like [`Tracer::start_through`], running the leaktrace at `bin` (a
    /// path as the prefix command's program sees it).
    pub fn start_through_at(prefix: &[&str], bin: &str, args: &[&str]) -> Self {
        require_root();
        let bin = PathBuf::from(bin);
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(&bin);
                command
            }
            None => Command::new(&bin),
        };
        let mut child = command
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
        self.wait_stderr("attached to pid");
    }

    /// Waits until leaktrace writes a line containing `needle` on stderr.
    pub fn wait_stderr(&mut self, needle: &str) {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "leaktrace did not print `{needle}` within {ATTACH_TIMEOUT:?}; stderr:\n{}",
                    self.stderr_text()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "leaktrace exited ({status:?}) before printing `{needle}`; stderr:\n{}",
                        self.stderr_text()
                    )
                }
            }
        }
    }

    /// leaktrace's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// Everything leaktrace wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
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
