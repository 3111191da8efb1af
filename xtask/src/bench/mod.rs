//! `cargo xtask bench`: what leaktrace adds to each malloc/free pair, timed
//! round by round against the same workload untraced and under a bpftrace
//! memleak script, then what holding a large live set costs leaktrace.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context as _};

mod footprint;
mod kernel;
mod links;
mod live;
mod process;
mod redis;
mod service;

use crate::{compile_c, install_packages, output_of, workspace_root};
use links::LinkFloor;
use live::*;
use process::*;

/// How long a tracer may take to load and attach its probes.
pub(super) const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a tracer may take to print its last output and exit after SIGINT.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a first one-second report may take once the probes are attached.
pub(super) const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Far longer than any run, so no periodic report lands inside the timed loop.
pub(super) const TRACE_INTERVAL: &str = "3600";
/// bpftrace says "Attaching N probes..." before it has attached them and has
/// no signal for having done so; this is the margin after that line.
pub(super) const BPFTRACE_SETTLE: Duration = Duration::from_secs(1);
/// Seconds between leaktrace's reports in the live-set part: short, so the
/// idle window below sees its periodic work several times over.
pub(super) const LIVE_INTERVAL: &str = "1";
/// How long leaktrace's reports may take to count the whole live set.
pub(super) const LIVE_SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The window over which leaktrace's CPU is measured while the target idles.
pub(super) const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// Output lines kept per tracer for error messages.
pub(super) const TAIL_LINES: usize = 30;
pub(super) const SIGINT: i32 = 2;
pub(super) const SC_CLK_TCK: i32 = 2;

/// Options for `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// malloc/free pairs each thread makes per run.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pairs: u64,
    /// Threads allocating at the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    threads: u32,
    /// Rounds of one run per mode; the table shows median, min and max.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Live allocations for the live-set part (report time, peak RSS, idle
    /// CPU under leaktrace); 0 skips it.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    live: u64,
    /// Leave the bpftrace baseline out of the rounds.
    #[arg(long)]
    no_bpftrace: bool,
    /// Leave out the trap floor by link kind (uprobe_multi needs kernel 6.6,
    /// uprobe sessions 6.13).
    #[arg(long)]
    no_link_kinds: bool,
    /// Leave out the cost of tracing kernel allocations.
    #[arg(long)]
    no_kernel: bool,
    /// Leave out the real service (redis-server under redis-benchmark).
    #[arg(long)]
    no_redis: bool,
}

/// Run both parts of the benchmark and print their results on stdout.
pub fn run(leaktrace: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let bpftrace = if args.no_bpftrace { None } else { Some(find_bpftrace()?) };
    time_pairs(leaktrace, bpftrace.as_ref(), args)?;
    service::measure_service(leaktrace, args.pairs, args.rounds)?;
    footprint::measure_small_process(leaktrace, args.rounds)?;
    if !args.no_redis {
        redis::measure_redis(leaktrace, args.rounds)?;
    }
    if !args.no_kernel {
        kernel::measure_kernel(leaktrace, args.rounds)?;
    }
    if args.live > 0 {
        let live = measure_live_set(leaktrace, args.live)?;
        println!();
        live.print();
    }
    Ok(())
}

/// bpftrace and the memleak script it runs.
struct Bpftrace {
    bin: PathBuf,
    version: String,
    script: PathBuf,
}

/// Finds bpftrace, installing the Debian package if it is missing.
fn find_bpftrace() -> anyhow::Result<Bpftrace> {
    let version = || output_of(Command::new("bpftrace").arg("--version"));
    if version().is_none() {
        install_packages(&["bpftrace"]).context("failed to install bpftrace for the baseline")?;
    }
    let version = version()
        .context("bpftrace --version fails even after installing it (or pass --no-bpftrace)")?;
    let script = workspace_root().join("xtask/bench/memleak.bt");
    ensure!(script.exists(), "{} is missing", script.display());
    Ok(Bpftrace { bin: PathBuf::from("bpftrace"), version: version.trim().to_owned(), script })
}

/// Times alloc_loop in every mode, round by round, and prints the table.
fn time_pairs(
    leaktrace: &Path,
    bpftrace: Option<&Bpftrace>,
    args: &BenchArgs,
) -> anyhow::Result<()> {
    let source = workspace_root().join("xtask/bench/alloc_loop.c");
    // With frame pointers (bpftrace's ustack needs them), and the same
    // program as distributions build it, -O2 without: leaktrace unwinds both
    // from their call-frame information, and the second pair of modes shows
    // what walking frames without frame pointers costs.
    let workloads = Workloads {
        frame_pointers: compile_c(&source, "alloc_loop", &C_FLAGS)?,
        no_frame_pointers: compile_c(&source, "alloc_loop_nofp", &C_FLAGS_NO_FRAME_POINTERS)?,
    };
    let workload_args = [args.pairs.to_string(), args.threads.to_string()];
    let mut modes = vec![
        Mode::Untraced,
        Mode::Floor,
        Mode::Leaktrace,
        Mode::Sampled,
        Mode::UntracedNoFp,
        Mode::LeaktraceNoFp,
    ];
    if bpftrace.is_some() {
        modes.push(Mode::Bpftrace);
    }
    let link_floor = if args.no_link_kinds {
        None
    } else {
        modes.extend([Mode::LinkPerf, Mode::LinkMulti, Mode::LinkSession]);
        Some(LinkFloor::prepare(leaktrace, &workloads.frame_pointers)?)
    };
    let tools = Tools { leaktrace, bpftrace, link_floor: link_floor.as_ref() };

    // Alternate the modes so drift (CPU frequency, other load) hits all alike.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 1..=args.rounds {
        let mut line = format!("xtask: round {round}/{}:", args.rounds);
        for (&mode, samples) in modes.iter().zip(&mut samples) {
            let ns =
                timed_run(mode, &tools, args.threads, workloads.for_mode(mode), &workload_args)
                    .with_context(|| format!("{} run in round {round} failed", mode.name()))?;
            samples.push(ns);
            line.push_str(&format!(" {} {ns:.1}", mode.name()));
        }
        eprintln!("{line} ns/pair");
    }

    let threads = if args.threads == 1 { "thread" } else { "threads" };
    let rounds = if args.rounds == 1 { "round" } else { "rounds" };
    println!(
        "leaktrace bench: {} malloc/free pairs x {} {threads} ({SAMPLED_RUN_FACTOR}x as many under -s 10, sampled by time), {} {rounds}, kernel {}",
        grouped(args.pairs),
        args.threads,
        args.rounds,
        kernel_release()
    );
    if let Some(bpftrace) = bpftrace {
        // bpftrace before 0.20 ignores -p for probes in shared libraries
        // (bpftrace/bpftrace#2817): its libc probes then fire in every process
        // and the script's pid filter throws the others' events away.
        println!(
            "bpftrace: {} running xtask/bench/memleak.bt (size by address, bytes by user stack)",
            bpftrace.version
        );
    }
    println!("{:<16} {:>15} {:>10} {:>10}", "mode", "median ns/pair", "min", "max");
    // Ratios within each round, before the samples are sorted: the modes of
    // one round ran within seconds of each other, so host drift between
    // rounds (seen here: the floor moving 1.6-2.3 µs) cancels out.
    let index_of = |wanted: Mode| modes.iter().position(|&mode| mode == wanted);
    let per_round = |ratio: &dyn Fn(usize) -> f64| {
        let mut ratios: Vec<f64> = (0..samples[0].len()).map(ratio).collect();
        Summary::of(&mut ratios)
    };
    let traced_over_floor = per_round(&|round| samples[2][round] / samples[1][round]);
    let bpftrace_over_traced = index_of(Mode::Bpftrace).map(|bpftrace| {
        per_round(&|round| {
            (samples[bpftrace][round] - samples[0][round]) / (samples[2][round] - samples[0][round])
        })
    });
    let summaries: Vec<Summary> = samples.iter_mut().map(|s| Summary::of(s)).collect();
    for (mode, summary) in modes.iter().zip(&summaries) {
        summary.print_row(mode.name());
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
    let sampled = &summaries[3];
    let floor_added = floor.median - untraced.median;
    println!(
        "-s 10 (allocation probes attached one window in 10) saves {:.2} µs per pair ({:.2} µs added, {:.2} of the floor's added cost; the target is 0.5)",
        (traced.median - sampled.median) / 1000.0,
        (sampled.median - untraced.median) / 1000.0,
        (sampled.median - untraced.median) / floor_added
    );
    let [untraced_nofp, traced_nofp] = [&summaries[4], &summaries[5]];
    let added_nofp = traced_nofp.median - untraced_nofp.median;
    println!(
        "-O2 without frame pointers: {:.2} µs added per pair, against {:.2} µs with frame pointers ({:+.2} µs)",
        added_nofp / 1000.0,
        added / 1000.0,
        (added_nofp - added) / 1000.0
    );
    let summary_of = |wanted: Mode| index_of(wanted).map(|index| &summaries[index]);
    if let Some(bpftrace) = summary_of(Mode::Bpftrace) {
        let bpftrace_added = bpftrace.median - untraced.median;
        let ratio = if added > 0.0 {
            format!("{:.1}x less", bpftrace_added / added)
        } else {
            "leaktrace's cost is within noise".to_owned()
        };
        println!(
            "added cost per pair: leaktrace {:.2} µs vs bpftrace {:.2} µs ({ratio})",
            added / 1000.0,
            bpftrace_added / 1000.0
        );
    }
    print!(
        "paired within each round: traced/floor median {:.2}x ({:.2}-{:.2})",
        traced_over_floor.median, traced_over_floor.min, traced_over_floor.max
    );
    match bpftrace_over_traced {
        Some(ratio) => println!(
            "; bpftrace's added cost / leaktrace's median {:.1}x ({:.1}-{:.1})",
            ratio.median, ratio.min, ratio.max
        ),
        None => println!(),
    }
    for (label, workload) in [
        ("alloc_loop", &workloads.frame_pointers),
        ("alloc_loop nofp", &workloads.no_frame_pointers),
    ] {
        let programs = program_times(leaktrace, workload, &workload_args)
            .with_context(|| format!("the program-time run of {label} failed"))?;
        // The programs every pair runs; the others (thread, mmap) ran a few
        // times at start-up.
        let pairs = args.pairs * u64::from(args.threads);
        let hot: Vec<&ProgramTime> = programs.iter().filter(|p| p.runs >= pairs / 2).collect();
        let per_pair: f64 = hot.iter().map(|p| p.mean_ns * p.runs as f64 / pairs as f64).sum();
        let each: Vec<String> =
            hot.iter().map(|p| format!("{} {:.0} ns", p.name, p.mean_ns)).collect();
        println!(
            "program time, {label} (leaktrace --program-stats, one run): {} = {per_pair:.0} ns per pair",
            each.join(", ")
        );
    }
    if let (Some(perf), Some(multi), Some(session)) =
        (summary_of(Mode::LinkPerf), summary_of(Mode::LinkMulti), summary_of(Mode::LinkSession))
    {
        let added = |summary: &Summary| (summary.median - untraced.median) / 1000.0;
        println!(
            "trap floor by link kind (empty programs at leaktrace's malloc and free attach points): perf-event links {:.2} µs, uprobe_multi {:.2} µs, uprobe session {:.2} µs added per pair",
            added(perf),
            added(multi),
            added(session)
        );
    }
    Ok(())
}

/// One program's runs and mean run time, as the kernel timed them.
struct ProgramTime {
    name: String,
    runs: u64,
    mean_ns: f64,
}

/// Every program that ran in one run of `workload` under
/// `leaktrace --program-stats`.
fn program_times(
    leaktrace: &Path,
    workload: &Path,
    args: &[String],
) -> anyhow::Result<Vec<ProgramTime>> {
    program_times_of(leaktrace, workload, args, "ns_per_pair", &[])
}

/// Every program that ran in one run of `workload` (which ends by printing
/// `done_key`) under `leaktrace --program-stats EXTRA...`.
fn program_times_of(
    leaktrace: &Path,
    workload: &Path,
    args: &[String],
    done_key: &str,
    extra: &[&str],
) -> anyhow::Result<Vec<ProgramTime>> {
    let mut run = Workload::start(workload, args)?;
    let mut flags = vec!["--program-stats"];
    flags.extend_from_slice(extra);
    let mut tracer = Tracer::leaktrace(leaktrace, run.pid, TRACE_INTERVAL, &flags)?;
    run.go()?;
    run.read_value(done_key)?;
    tracer.interrupt()?;
    let mut programs = Vec::new();
    tracer.wait_for("`program stats`", STOP_TIMEOUT, |line| {
        programs.extend(program_time(&line.text));
        line.text.starts_with("leaktrace: program stats:")
    })?;
    tracer.finish()?;
    run.wait()?;
    Ok(programs)
}

/// `leaktrace: program NAME: RUNS runs, MEAN ns mean`.
fn program_time(line: &str) -> Option<ProgramTime> {
    let rest = line.strip_prefix("leaktrace: program ")?;
    let (name, rest) = rest.split_once(": ")?;
    let (runs, rest) = rest.split_once(" runs, ")?;
    let mean = rest.strip_suffix(" ns mean")?;
    Some(ProgramTime {
        name: name.to_owned(),
        runs: runs.parse().ok()?,
        mean_ns: mean.parse().ok()?,
    })
}

/// What a timed run may start.
struct Tools<'a> {
    leaktrace: &'a Path,
    bpftrace: Option<&'a Bpftrace>,
    link_floor: Option<&'a LinkFloor>,
}

/// The C flags of both workloads.
pub(super) const C_FLAGS: [&str; 4] = ["-O2", "-g", "-fno-omit-frame-pointer", "-Wall"];
/// alloc_loop as distributions build programs.
const C_FLAGS_NO_FRAME_POINTERS: [&str; 4] = ["-O2", "-g", "-fomit-frame-pointer", "-Wall"];

/// alloc_loop built two ways.
struct Workloads {
    frame_pointers: PathBuf,
    no_frame_pointers: PathBuf,
}

impl Workloads {
    fn for_mode(&self, mode: Mode) -> &Path {
        match mode {
            Mode::UntracedNoFp | Mode::LeaktraceNoFp => &self.no_frame_pointers,
            _ => &self.frame_pointers,
        }
    }
}

/// One way of running alloc_loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Untraced,
    /// leaktrace --floor: every probe attached, every program returns at once.
    Floor,
    Leaktrace,
    /// leaktrace -s 10: one allocation in ten tracked.
    Sampled,
    /// The -O2 build without frame pointers, untraced.
    UntracedNoFp,
    /// The -O2 build without frame pointers under leaktrace.
    LeaktraceNoFp,
    /// xtask/bench/memleak.bt under bpftrace.
    Bpftrace,
    /// link_floor perf: empty programs through perf-event links (as aya's).
    LinkPerf,
    /// link_floor multi: empty programs through uprobe_multi links.
    LinkMulti,
    /// link_floor session: an empty uprobe session program on malloc.
    LinkSession,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Floor => "floor",
            Self::Leaktrace => "leaktrace",
            Self::Sampled => "leaktrace -s 10",
            Self::UntracedNoFp => "untraced nofp",
            Self::LeaktraceNoFp => "leaktrace nofp",
            Self::Bpftrace => "bpftrace",
            Self::LinkPerf => "links: perf",
            Self::LinkMulti => "links: multi",
            Self::LinkSession => "links: session",
        }
    }
}

/// How many times longer the `-s 10` runs are: its sampling windows are
/// 100 ms of each second, at a random place, and a 200,000-pair run lasts a
/// quarter of a second; ten times that spans a few windows. The figure is
/// per pair, so runs of other lengths compare.
const SAMPLED_RUN_FACTOR: u64 = 10;

/// One run of a workload (PAIRS THREADS) in `mode`, the tracer attached
/// before the loop starts.
fn timed_run(
    mode: Mode,
    tools: &Tools,
    threads: u32,
    workload: &Path,
    args: &[String],
) -> anyhow::Result<f64> {
    let leaktrace = tools.leaktrace;
    let mut args = args.to_vec();
    if mode == Mode::Sampled {
        let pairs: u64 = args[0].parse().context("bad pair count")?;
        args[0] = (pairs * SAMPLED_RUN_FACTOR).to_string();
    }
    let mut run = Workload::start(workload, &args)?;
    let pid = run.pid;
    let link_floor = |kind: &str| -> anyhow::Result<Option<Tracer>> {
        let floor = tools.link_floor.expect("link kinds run only when link_floor was built");
        Ok(Some(Tracer::link_floor(floor, kind, pid)?))
    };
    let tracer = match mode {
        Mode::Untraced | Mode::UntracedNoFp => None,
        Mode::Floor => Some(Tracer::leaktrace(leaktrace, run.pid, TRACE_INTERVAL, &["--floor"])?),
        Mode::Leaktrace | Mode::LeaktraceNoFp => {
            Some(Tracer::leaktrace(leaktrace, run.pid, TRACE_INTERVAL, &[])?)
        }
        Mode::Sampled => {
            Some(Tracer::leaktrace(leaktrace, run.pid, TRACE_INTERVAL, &["-s", "10"])?)
        }
        Mode::Bpftrace => {
            let bpftrace =
                tools.bpftrace.expect("the bpftrace mode runs only when bpftrace was found");
            Some(Tracer::bpftrace(bpftrace, run.pid, threads)?)
        }
        Mode::LinkPerf => link_floor("perf")?,
        Mode::LinkMulti => link_floor("multi")?,
        Mode::LinkSession => link_floor("session")?,
    };
    run.go()?;
    let ns = run.read_value("ns_per_pair")?;
    let ns = ns
        .parse()
        .with_context(|| format!("bad ns_per_pair from {}: {ns:?}", run.path.display()))?;
    if let Some(tracer) = tracer {
        tracer.stop()?;
    }
    run.wait()?;
    Ok(ns)
}

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
        let median =
            if n % 2 == 1 { samples[n / 2] } else { (samples[n / 2 - 1] + samples[n / 2]) / 2.0 };
        Self { median, min: samples[0], max: samples[n - 1] }
    }

    /// Prints one table row under the header `time_pairs` prints.
    fn print_row(&self, mode: &str) {
        println!("{mode:<16} {:>15.1} {:>10.1} {:>10.1}", self.median, self.min, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that leaktrace's --program-stats lines are read back.
    #[test]
    fn program_stats_lines() {
        let program =
            program_time("leaktrace: program alloc_exit_malloc: 200000 runs, 452 ns mean")
                .expect("a program line");
        assert_eq!((program.name.as_str(), program.runs), ("alloc_exit_malloc", 200_000));
        assert_eq!(program.mean_ns, 452.0);
        assert!(program_time("leaktrace: program stats: 3 programs ran").is_none());
    }
}
