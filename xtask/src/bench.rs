//! `cargo xtask bench`: what leaktrace adds to each malloc/free pair, measured
//! by timing the same workload untraced and traced, round by round.

use std::{
    io::{BufRead as _, BufReader, Lines, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::{KillOnDrop, compile_c, run_cmd, workspace_root};

/// How long leaktrace may take to load and attach its probes.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long leaktrace may take to print its final report after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Far longer than any run, so no periodic report lands inside the timed loop.
const TRACE_INTERVAL: &str = "3600";

/// Options for `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// malloc/free pairs each thread makes per run.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pairs: u64,
    /// Threads allocating at the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    threads: u32,
    /// Rounds of one untraced and one traced run; the table shows median, min and max.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// Build the workload, time it untraced and under leaktrace, and print the table.
pub fn run(leaktrace: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let source = workspace_root().join("xtask/bench/alloc_loop.c");
    // Frame pointers, as in the programs leaktrace is meant for: its stack walks
    // rely on them, so leaving them out would time a cheaper, less useful trace.
    let workload = compile_c(
        &source,
        "alloc_loop",
        &["-O2", "-g", "-fno-omit-frame-pointer"],
    )?;
    let workload_args = [args.pairs.to_string(), args.threads.to_string()];

    // Alternate the modes so drift (CPU frequency, other load) hits all alike.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for round in 1..=args.rounds {
        let mut line = format!("xtask: round {round}/{}:", args.rounds);
        for (mode, samples) in MODES.iter().zip(&mut samples) {
            let ns = match mode.tracer_args {
                None => untraced_run(&workload, &workload_args),
                Some(extra) => traced_run(leaktrace, extra, &workload, &workload_args),
            }
            .with_context(|| format!("{} run {round} failed", mode.name))?;
            samples.push(ns);
            line.push_str(&format!(" {} {ns:.1}", mode.name));
        }
        eprintln!("{line} ns/pair");
    }

    let threads = if args.threads == 1 {
        "thread"
    } else {
        "threads"
    };
    let rounds = if args.rounds == 1 { "round" } else { "rounds" };
    println!(
        "leaktrace bench: {} malloc/free pairs x {} {threads}, {} {rounds}, kernel {}",
        args.pairs,
        args.threads,
        args.rounds,
        kernel_release()
    );
    println!(
        "{:<10} {:>15} {:>10} {:>10}",
        "mode", "median ns/pair", "min", "max"
    );
    let summaries: Vec<Summary> = samples.iter_mut().map(|s| Summary::of(s)).collect();
    for (mode, summary) in MODES.iter().zip(&summaries) {
        summary.print_row(mode.name);
    }
    let [untraced, floor, traced] = [&summaries[0], &summaries[1], &summaries[2]];
    let added = traced.median - untraced.median;
    println!(
        "traced/untraced: {:.1}x; added per pair: {added:.0} ns ({:.2} µs)",
        traced.median / untraced.median,
        added / 1000.0
    );
    println!(
        "traced/floor: {:.2}x (floor: the same probes with programs that return at once, {:.2} µs added per pair)",
        traced.median / floor.median,
        (floor.median - untraced.median) / 1000.0
    );
    Ok(())
}

/// One way of running the workload.
struct Mode {
    name: &'static str,
    /// `None`: untraced; otherwise leaktrace runs with these extra arguments.
    tracer_args: Option<&'static [&'static str]>,
}

/// The modes, in the order each round runs them.
const MODES: [Mode; 3] = [
    Mode {
        name: "untraced",
        tracer_args: None,
    },
    Mode {
        name: "floor",
        tracer_args: Some(&["--floor"]),
    },
    Mode {
        name: "leaktrace",
        tracer_args: Some(&[]),
    },
];

/// Median, min and max of one mode's ns/pair over the rounds.
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

impl Summary {
    /// Summarizes `samples` (sorting them); there is at least one.
    fn of(samples: &mut [f64]) -> Self {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Self {
            median,
            min: samples[0],
            max: samples[n - 1],
        }
    }

    /// Prints one table row under the header `run` prints.
    fn print_row(&self, mode: &str) {
        println!(
            "{mode:<10} {:>15.1} {:>10.1} {:>10.1}",
            self.median, self.min, self.max
        );
    }
}

/// One run of the workload with nothing attached.
fn untraced_run(workload: &Path, args: &[String]) -> anyhow::Result<f64> {
    let mut run = Workload::start(workload, args)?;
    let ns = run.go_and_measure()?;
    run.wait()?;
    Ok(ns)
}

/// One run of the workload with leaktrace attached before the loop starts.
fn traced_run(
    leaktrace: &Path,
    extra: &[&str],
    workload: &Path,
    args: &[String],
) -> anyhow::Result<f64> {
    let mut run = Workload::start(workload, args)?;
    let mut tracer = Tracer::start(leaktrace, extra, run.pid)?;
    tracer.wait_attached()?;
    let ns = run.go_and_measure()?;
    tracer.stop()?;
    run.wait()?;
    Ok(ns)
}

/// A running alloc_loop, stopped at its "go" handshake until told to start.
struct Workload {
    child: KillOnDrop,
    pid: u32,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    path: PathBuf,
}

impl Workload {
    /// Starts the workload and reads the PID it prints.
    fn start(path: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {}", path.display()))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let mut run = Self {
            child: KillOnDrop(child),
            pid: 0,
            stdin,
            stdout,
            path: path.to_path_buf(),
        };
        let pid = run.read_value("PID")?;
        run.pid = pid
            .parse()
            .with_context(|| format!("bad PID line from {}: {pid:?}", path.display()))?;
        Ok(run)
    }

    /// Lets the loop start and returns the ns/pair it reports.
    fn go_and_measure(&mut self) -> anyhow::Result<f64> {
        writeln!(self.stdin, "go")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("failed to tell {} to start", self.path.display()))?;
        let ns = self.read_value("ns_per_pair")?;
        ns.parse()
            .with_context(|| format!("bad ns_per_pair from {}: {ns:?}", self.path.display()))
    }

    /// Reads stdout up to the line `KEY VALUE` and returns VALUE.
    fn read_value(&mut self, key: &str) -> anyhow::Result<String> {
        for line in &mut self.stdout {
            let line = line
                .with_context(|| format!("failed to read the output of {}", self.path.display()))?;
            if let Some(value) = line
                .strip_prefix(key)
                .and_then(|rest| rest.strip_prefix(' '))
            {
                return Ok(value.trim().to_owned());
            }
        }
        let status = self
            .child
            .0
            .wait()
            .map_or_else(|err| err.to_string(), |status| status.to_string());
        bail!(
            "{} exited ({status}) before printing `{key}`",
            self.path.display()
        )
    }

    /// Waits for the workload to free its blocks and exit, which must be a success.
    fn wait(mut self) -> anyhow::Result<()> {
        let status = self
            .child
            .0
            .wait()
            .with_context(|| format!("failed to wait for {}", self.path.display()))?;
        ensure!(status.success(), "{} failed: {status}", self.path.display());
        Ok(())
    }
}

/// A running `leaktrace -p PID`, its stderr read by a thread.
struct Tracer {
    child: KillOnDrop,
    stderr_lines: Receiver<String>,
    /// Every stderr line received so far, for error messages.
    stderr: String,
}

impl Tracer {
    /// Starts tracing `pid`; its reports go nowhere, as only the cost matters here.
    fn start(leaktrace: &Path, extra: &[&str], pid: u32) -> anyhow::Result<Self> {
        let mut child = Command::new(leaktrace)
            .args(["-p", &pid.to_string(), TRACE_INTERVAL])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {}", leaktrace.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, stderr_lines) = mpsc::channel();
        // The channel is unbounded, so leaktrace never blocks on a full pipe
        // while the loop is being timed, whether or not anyone reads.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child: KillOnDrop(child),
            stderr_lines,
            stderr: String::new(),
        })
    }

    /// Waits for the stderr line saying every probe is attached.
    fn wait_attached(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    let attached = line.contains("attached to pid");
                    self.stderr.push_str(&line);
                    self.stderr.push('\n');
                    if attached {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "leaktrace did not print `attached to pid` within {ATTACH_TIMEOUT:?}; stderr:\n{}",
                    self.stderr
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .0
                        .wait()
                        .map_or_else(|err| err.to_string(), |status| status.to_string());
                    bail!(
                        "leaktrace exited ({status}) before attaching; stderr:\n{}",
                        self.stderr
                    )
                }
            }
        }
    }

    /// Sends SIGINT and waits for leaktrace to print its final report and exit 0.
    fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.0.id().to_string();
        // leaktrace may already be finishing because the workload exited; it is
        // not reaped yet, so the PID still names it and kill succeeds.
        run_cmd(Command::new("kill").args(["-INT", &pid]))
            .context("failed to send SIGINT to leaktrace")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self
                .child
                .0
                .try_wait()
                .context("failed to wait for leaktrace")?
            {
                break status;
            }
            if Instant::now() >= deadline {
                self.drain_stderr();
                return Err(anyhow!(
                    "leaktrace did not exit within {STOP_TIMEOUT:?} of SIGINT; stderr:\n{}",
                    self.stderr
                ));
            }
            thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            self.drain_stderr();
            bail!(
                "leaktrace failed after SIGINT ({status}); stderr:\n{}",
                self.stderr
            );
        }
        Ok(())
    }

    /// Moves the stderr lines that have arrived into `self.stderr`.
    fn drain_stderr(&mut self) {
        // Give the reader thread a moment to pass on the last lines of an exited tracer.
        while let Ok(line) = self.stderr_lines.recv_timeout(Duration::from_millis(200)) {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
    }
}

/// The running kernel's release, as `uname -r` prints it.
fn kernel_release() -> String {
    Command::new("uname")
        .arg("-r")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}
