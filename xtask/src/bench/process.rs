//! The processes a benchmark run drives: the workload, held at its "go"
//! handshake, and a tracer (leaktrace or bpftrace) whose output threads read.

use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader, Lines, Read, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError, Sender},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _};

use super::links::LinkFloor;
use super::*;
use crate::KillOnDrop;

/// A running workload (alloc_loop or live_set), stopped at its "go"
/// handshake until told to start.
pub(super) struct Workload {
    pub(super) child: KillOnDrop,
    pub(super) pid: u32,
    pub(super) stdin: ChildStdin,
    pub(super) stdout: Lines<BufReader<ChildStdout>>,
    pub(super) path: PathBuf,
}

impl Workload {
    /// Starts the workload and reads the PID it prints.
    pub(super) fn start(path: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {}", path.display()))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let mut run =
            Self { child: KillOnDrop(child), pid: 0, stdin, stdout, path: path.to_path_buf() };
        let pid = run.read_value("PID")?;
        run.pid = pid
            .parse()
            .with_context(|| format!("bad PID line from {}: {pid:?}", path.display()))?;
        Ok(run)
    }

    /// Lets the workload start.
    pub(super) fn go(&mut self) -> anyhow::Result<()> {
        writeln!(self.stdin, "go")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("failed to tell {} to start", self.path.display()))
    }

    /// Reads stdout up to the line `KEY VALUE` and returns VALUE.
    pub(super) fn read_value(&mut self, key: &str) -> anyhow::Result<String> {
        for line in &mut self.stdout {
            let line = line
                .with_context(|| format!("failed to read the output of {}", self.path.display()))?;
            if let Some(value) = line.strip_prefix(key).and_then(|rest| rest.strip_prefix(' ')) {
                return Ok(value.trim().to_owned());
            }
        }
        let status =
            self.child.0.wait().map_or_else(|err| err.to_string(), |status| status.to_string());
        bail!("{} exited ({status}) before printing `{key}`", self.path.display())
    }

    /// Closes stdin (live_set idles until then) and waits for the workload
    /// to exit, which must be a success.
    pub(super) fn wait(self) -> anyhow::Result<()> {
        let Self { mut child, stdin, path, .. } = self;
        drop(stdin);
        let status =
            child.0.wait().with_context(|| format!("failed to wait for {}", path.display()))?;
        ensure!(status.success(), "{} failed: {status}", path.display());
        Ok(())
    }
}

/// One line a tracer printed, stamped when it arrived.
pub(super) struct Line {
    pub(super) at: Instant,
    pub(super) from_stdout: bool,
    pub(super) text: String,
}

/// A running tracer (leaktrace or bpftrace) attached to a workload, its
/// stdout and stderr read by threads.
pub(super) struct Tracer {
    pub(super) name: &'static str,
    pub(super) child: KillOnDrop,
    pub(super) lines: Receiver<Line>,
    /// The last lines received, for error messages.
    pub(super) tail: VecDeque<String>,
}

impl Tracer {
    /// Starts `leaktrace -p PID INTERVAL EXTRA...` and waits until it has attached.
    pub(super) fn leaktrace(
        leaktrace: &Path,
        pid: u32,
        interval: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(leaktrace);
        cmd.args(["-p", &pid.to_string(), interval]).args(extra);
        let mut tracer = Self::spawn("leaktrace", &mut cmd)?;
        tracer.wait_for("`attached to pid`", ATTACH_TIMEOUT, |line| {
            !line.from_stdout && line.text.contains("attached to pid")
        })?;
        Ok(tracer)
    }

    /// Starts memleak.bt on `pid` and waits until its probes should be attached.
    pub(super) fn bpftrace(bpftrace: &Bpftrace, pid: u32, threads: u32) -> anyhow::Result<Self> {
        let pid = pid.to_string();
        let mut cmd = Command::new(&bpftrace.bin);
        // The script's $1 is the PID its probes keep events of. Each thread
        // keeps 64 blocks live; room for them in @size, whatever --threads says.
        cmd.args(["-p", &pid])
            .arg(&bpftrace.script)
            .arg(&pid)
            .env("BPFTRACE_MAP_KEYS_MAX", (4096 + 128 * u64::from(threads)).to_string());
        let mut tracer = Self::spawn("bpftrace", &mut cmd)?;
        tracer.wait_for("`Attaching N probes`", ATTACH_TIMEOUT, |line| {
            line.text.starts_with("Attaching ")
        })?;
        thread::sleep(BPFTRACE_SETTLE);
        Ok(tracer)
    }

    /// Starts xtask/bench/link_floor.c with links of `kind` on `pid` and
    /// waits until it has attached.
    pub(super) fn link_floor(floor: &LinkFloor, kind: &str, pid: u32) -> anyhow::Result<Self> {
        let mut cmd = Command::new(&floor.bin);
        cmd.arg(kind)
            .arg(&floor.library)
            .arg(format!("{:#x}", floor.malloc))
            .arg(format!("{:#x}", floor.free))
            .arg(pid.to_string());
        let mut tracer = Self::spawn("link_floor", &mut cmd)?;
        tracer.wait_for("`attached`", ATTACH_TIMEOUT, |line| {
            line.from_stdout && line.text == "attached"
        })?;
        Ok(tracer)
    }

    pub(super) fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {cmd:?}"))?;
        let (tx, lines) = mpsc::channel();
        // The channel is unbounded, so the tracer never blocks on a full pipe
        // while the loop is being timed, whether or not anyone reads.
        forward_lines(child.stdout.take().expect("stdout is piped"), true, tx.clone());
        forward_lines(child.stderr.take().expect("stderr is piped"), false, tx);
        Ok(Self { name, child: KillOnDrop(child), lines, tail: VecDeque::new() })
    }

    /// Receives lines until `wanted` accepts one, and returns that line.
    pub(super) fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut wanted: impl FnMut(&Line) -> bool,
    ) -> anyhow::Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.remember(&line);
                    if wanted(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{} did not print {what} within {timeout:?}; its last output:\n{}",
                    self.name,
                    self.tail()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .0
                        .wait()
                        .map_or_else(|err| err.to_string(), |status| status.to_string());
                    bail!(
                        "{} exited ({status}) before printing {what}; its last output:\n{}",
                        self.name,
                        self.tail()
                    )
                }
            }
        }
    }

    /// Sends SIGINT and returns when it was sent.
    pub(super) fn interrupt(&self) -> anyhow::Result<Instant> {
        let pid = i32::try_from(self.child.0.id()).context("PID out of range")?;
        let sent = Instant::now();
        // SAFETY: kill has no memory-safety preconditions; the PID is our
        // unreaped child's, so it cannot name another process. A tracer that
        // already exited by itself is a zombie until waited for, so this
        // still succeeds.
        if unsafe { libc_kill(pid, SIGINT) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("failed to send SIGINT to {} (pid {pid})", self.name));
        }
        Ok(sent)
    }

    /// Waits for the tracer to exit after SIGINT, which must be a success.
    pub(super) fn finish(mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self
                .child
                .0
                .try_wait()
                .with_context(|| format!("failed to wait for {}", self.name))?
            {
                break status;
            }
            if Instant::now() >= deadline {
                self.drain();
                return Err(anyhow!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGINT; its last output:\n{}",
                    self.name,
                    self.tail()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            self.drain();
            bail!(
                "{} failed after SIGINT ({status}); its last output:\n{}",
                self.name,
                self.tail()
            );
        }
        Ok(())
    }

    /// Sends SIGINT and waits for the tracer to print its last output and exit 0.
    pub(super) fn stop(self) -> anyhow::Result<()> {
        self.interrupt()?;
        self.finish()
    }

    /// Keeps `line` among the last few, shortened: a JSON report can be long.
    pub(super) fn remember(&mut self, line: &Line) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        let stream = if line.from_stdout { "stdout" } else { "stderr" };
        let mut text = line.text.clone();
        if let Some((cut, _)) = text.char_indices().nth(300) {
            text.truncate(cut);
            text.push_str(" [...]");
        }
        self.tail.push_back(format!("  {stream}: {text}"));
    }

    /// Moves the lines that have arrived into the tail.
    pub(super) fn drain(&mut self) {
        // Give the reader threads a moment to pass on an exited tracer's last lines.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.remember(&line);
        }
    }

    pub(super) fn tail(&self) -> String {
        if self.tail.is_empty() {
            return "  (nothing)".to_owned();
        }
        Vec::from(self.tail.clone()).join("\n")
    }
}

/// Sends each line of `stream` to `tx` from a thread, until it closes.
pub(super) fn forward_lines(
    stream: impl Read + Send + 'static,
    from_stdout: bool,
    tx: Sender<Line>,
) {
    thread::spawn(move || {
        for text in BufReader::new(stream).lines().map_while(Result::ok) {
            let line = Line { at: Instant::now(), from_stdout, text };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

unsafe extern "C" {
    #[link_name = "kill"]
    pub(super) fn libc_kill(pid: i32, sig: i32) -> i32;
    #[link_name = "sysconf"]
    pub(super) fn libc_sysconf(name: i32) -> i64;
}
