//! One tracing session, start to end: check privileges, find the target and
//! its allocator, load and attach, then run one event loop until Ctrl-C,
//! SIGTERM, SIGHUP, COUNT, --duration or the target's exit, with a final
//! report. The loop (a current-thread tokio runtime) waits on every event
//! source at once: the signals, the report ticks, the dynamic linker's hook
//! (a ring buffer), the poll of the target's mappings, the target's exit,
//! and the programs' own log records.

use std::{
    io::{self, Write as _},
    os::fd::AsRawFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use aya::maps::{MapData, RingBuf};
use aya_log::EbpfLogger;
use bytes::Buf as _;
use leaktrace_common::{MappingsChanged, CHANGE_EXEC, MAP_LINK_MAP_CHANGES, YOUNG_EPOCHS};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    time::{interval, interval_at, sleep_until, Interval, MissedTickBehavior},
};

use crate::{
    analyze::{Analyzer, ReportOptions},
    attach::{self, LoadOptions},
    cli::Args,
    collect::Collector,
    report,
    target::{objects_to_probe, Target},
    unwind::Unwinder,
};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// How often the session looks at whether the target has exited.
const EXIT_POLL: Duration = Duration::from_millis(100);
/// How often the target's mappings are checked besides the linker's hook:
/// often while a `-c` program is starting (its libraries are being
/// mapped), then at the exit poll's pace.
const FAST_MAPS_POLL: Duration = Duration::from_millis(5);
const FAST_PERIOD: Duration = Duration::from_secs(1);
const MAPS_POLL: Duration = Duration::from_millis(100);

pub fn run(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    check_privileges()?;

    let mut target = match (&args.command, args.pid) {
        (Some(command), _) => Target::spawn(command)?,
        (None, Some(pid)) => Target::existing(pid)?,
        (None, None) => bail!("give a PID with -p or a command with -c"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the event loop")?;
    let result = runtime.block_on(trace(&args, &mut target));
    if result.is_err() {
        target.kill_child();
    }
    result
}

/// Why the loop ended.
enum End {
    /// A signal, --duration, or the last of COUNT reports (already printed).
    Stopped,
    Exited,
    Counted,
}

async fn trace(args: &Args, target: &mut Target) -> anyhow::Result<()> {
    let pid = target.pid;
    let objects = objects_to_probe(target, args.obj.as_deref())?;
    let plan = attach::plan(
        &objects,
        &attach::AttachOptions {
            pid,
            symbol_prefix: args.symbol_prefix.as_deref(),
            allocator: args.obj.as_deref(),
        },
    )
    .map_err(|err| attach_error(err, target))?;

    // A `-c` target is stopped where its mappings change until they are
    // published: its first allocations, and those of a library it dlopen()s,
    // get whole stacks. leaktrace is its parent, so nobody else sees it stop.
    let hold = target.program().is_some();
    // Epochs of a quarter of --older: every allocation younger than --older
    // is left out, and none older than 1.25x --older.
    let epoch_ns = args.older * 1_000_000 / u64::from(YOUNG_EPOCHS);
    let mut ebpf = attach::load(&LoadOptions {
        // PID 0 never allocates: the programs stop at their first check.
        tgid: if args.floor { 0 } else { pid },
        epoch_ns,
        min_size: args.min_size.unwrap_or(0),
        max_size: args.max_size.unwrap_or(u64::MAX),
        max_allocations: args.allocation_slots(),
        max_stacks: args.max_stacks,
        sample_rate: args.sample_rate,
        unwind_rows: args.unwind_rows,
        glibc_allocator: plan.glibc_allocator,
        glibc_pthread: plan.glibc_pthread,
        hold,
        kernel_log: args.verbose >= 2,
    })?;
    // The programs' log records (rare paths only), shown with -vv.
    let mut logger = match EbpfLogger::init(&mut ebpf) {
        Ok(logger) => Some(watch(logger).context("failed to watch the programs' log")?),
        Err(err) => {
            log::debug!("no log from the kernel programs: {err}");
            None
        }
    };
    // Held open for the session: the kernel times program runs while it is.
    let program_stats = args
        .program_stats
        .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
        .transpose()
        .context("failed to enable BPF run-time statistics")?;
    // The unwind tables go in before the probes, so that the first events
    // already get whole stacks. A `-c` child has not run its program yet:
    // its tables are loaded as it maps it.
    let mut unwinder = Unwinder::new(&mut ebpf, pid)?;
    match target.program() {
        Some(program) => {
            let paths: Vec<PathBuf> = objects.iter().map(|object| object.open.clone()).collect();
            unwinder.preload(program, &paths);
        }
        None => {
            unwinder.refresh().map_err(|err| attach_error(err, target))?;
        }
    }
    let link_changes = ebpf
        .take_map(MAP_LINK_MAP_CHANGES)
        .ok_or_else(|| anyhow!("map {MAP_LINK_MAP_CHANGES} missing from the eBPF object"))?;
    let mut link_changes = watch(RingBuf::try_from(link_changes)?)
        .context("failed to watch the dynamic linker's hook")?;
    let probed = attach::attach_all(&mut ebpf, &plan).map_err(|err| attach_error(err, target))?;
    attach::attach_tracepoints(&mut ebpf)?;
    attach::reset_lost(&mut ebpf)?;
    let summary: Vec<String> = probed
        .iter()
        .map(|object| format!("{} in {}", object.functions.len(), object.object))
        .collect();
    eprintln!(
        "leaktrace: attached to pid {pid}: functions probed: {}; Ctrl-C to stop",
        summary.join(", ")
    );
    let mut signals = Signals::new()?;

    let mut analyzer = Analyzer::new(
        Collector { epoch_ns, sample_rate: args.sample_rate },
        ReportOptions {
            pid,
            top: args.top,
            older_ms: args.older,
            probed,
            debug_dirs: args.debug_dirs.clone(),
            sysroot: args.sysroot.clone(),
            baseline_now: target.program().is_none(),
            glibc_allocator: plan.glibc_allocator,
        },
    );
    target.release()?;
    let emit = |analyzer: &mut Analyzer,
                unwinder: &Unwinder,
                is_final: bool,
                exited: bool|
     -> anyhow::Result<()> {
        let mut report =
            analyzer.report(&ebpf, unwinder.mappings(), unwinder.file_paths(), is_final, exited)?;
        report::finish(&mut report);
        let mut out = io::stdout().lock();
        if args.json {
            report::write_json(&report, &mut out)?;
        } else {
            report::write_text(&report, &mut out)?;
        }
        Ok(out.flush()?)
    };

    let started = Instant::now();
    let period = Duration::from_secs_f64(args.interval);
    let mut report_tick = interval_at((started + period).into(), period);
    report_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = args.duration.map(|secs| started + Duration::from_secs_f64(secs));
    let mut exit_poll = interval(EXIT_POLL);
    let mut maps_poll = poll_every(FAST_MAPS_POLL);
    let mut fast_maps_poll = true;
    let mut unwinding = true;
    let mut reports = 0u64;
    let end = loop {
        tokio::select! {
            biased;
            () = signals.any() => break End::Stopped,
            () = until(deadline) => break End::Stopped,
            _ = exit_poll.tick() => {
                if target.has_exited() {
                    log::info!("pid {pid} {}", target.exit_status().unwrap_or("exited"));
                    break End::Exited;
                }
            }
            _ = report_tick.tick() => {
                reports += 1;
                let last = args.count == Some(reports);
                emit(&mut analyzer, &unwinder, last, false)?;
                if last {
                    break End::Counted;
                }
            }
            changes = mappings_changed(&mut link_changes) => {
                after_change(&changes, &mut unwinder, &mut unwinding);
            }
            _ = maps_poll.tick(), if unwinding => {
                if fast_maps_poll && started.elapsed() >= FAST_PERIOD {
                    fast_maps_poll = false;
                    maps_poll = poll_every(MAPS_POLL);
                }
                unwinding = keep_unwinding(&mut unwinder);
            }
            () = flush_log(&mut logger) => {}
        }
    };
    if hold {
        // Whatever happened, a held target must not stay stopped.
        resume(pid);
    }
    let result = match end {
        End::Stopped => emit(&mut analyzer, &unwinder, true, false),
        End::Exited => emit(&mut analyzer, &unwinder, true, true),
        End::Counted => Ok(()),
    };
    flush_now(&mut logger);
    if program_stats.is_some() {
        attach::print_program_stats(&ebpf);
    }
    result
}

/// The signals that end a session with a final report.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        let install = |kind: SignalKind| signal(kind).context("failed to install a signal handler");
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            // A closed terminal: the report still gets written where it can.
            hangup: install(SignalKind::hangup())?,
        })
    }

    async fn any(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = self.hangup.recv() => {}
        }
    }
}

/// The programs' log records, read as they come.
type Logger = EbpfLogger<&'static dyn log::Log>;

/// Wake the loop when `inner`'s descriptor has something to read.
fn watch<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor (a ring buffer map's), which stays
    // open and the same for as long as the AsyncFd, which owns `inner`.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|err| err.into_parts().1)
}

fn poll_every(period: Duration) -> Interval {
    let mut poll = interval(period);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    poll
}

/// Resolves at `deadline`, or never.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the target's mappings changed (an exec, or the dynamic
/// linker's hook: start-up, dlopen, dlclose), with what the programs said.
async fn mappings_changed(changes: &mut AsyncFd<RingBuf<MapData>>) -> Vec<Change> {
    let Ok(mut guard) = changes.readable_mut().await else {
        return std::future::pending().await;
    };
    let mut records = Vec::new();
    while let Some(item) = guard.get_inner_mut().next() {
        records.extend(Change::parse(&item));
    }
    guard.clear_ready();
    records
}

/// One record of the programs' `MappingsChanged`.
struct Change {
    cause: u32,
    held: bool,
    time_ns: u64,
}

impl Change {
    /// The record's fields, in the order and sizes of `MappingsChanged`.
    fn parse(mut record: &[u8]) -> Option<Self> {
        if record.remaining() < std::mem::size_of::<MappingsChanged>() {
            return None;
        }
        let cause = record.get_u32_le();
        let held = record.get_u32_le() != 0;
        let time_ns = record.get_u64_le();
        Some(Self { cause, held, time_ns })
    }
}

/// Publish the new mappings, then let a held target go, saying how long
/// it waited.
fn after_change(changes: &[Change], unwinder: &mut Unwinder, unwinding: &mut bool) {
    if *unwinding {
        *unwinding = keep_unwinding(unwinder);
    }
    let Some(first) = changes.iter().filter(|change| change.held).min_by_key(|c| c.time_ns) else {
        return;
    };
    resume(unwinder.pid());
    let waited = monotonic_ns().saturating_sub(first.time_ns);
    let cause = if first.cause == CHANGE_EXEC { "exec" } else { "the dynamic linker's hook" };
    log::info!(
        "held pid {} for {:.2} ms at {cause}, until its mappings were published",
        unwinder.pid(),
        waited as f64 / 1e6
    );
}

/// SIGCONT: a target held where its mappings changed goes on.
fn resume(pid: u32) {
    // SAFETY: a plain syscall; the target is our own `-c` child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Publish the target's mappings if they changed. Returns whether to go on:
/// not once the target is gone, or after an error, which is said once.
fn keep_unwinding(unwinder: &mut Unwinder) -> bool {
    match unwinder.refresh() {
        Ok(_) => true,
        Err(err) => {
            if !crate::proc::has_exited(unwinder.pid()) {
                eprintln!("leaktrace: warning: unwind tables no longer kept current: {err:#}");
            }
            false
        }
    }
}

/// Resolves once the programs' log records that arrived are written out.
async fn flush_log(logger: &mut Option<AsyncFd<Logger>>) {
    let Some(logger) = logger else {
        return std::future::pending().await;
    };
    match logger.readable_mut().await {
        Ok(mut guard) => {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
        Err(_) => std::future::pending().await,
    }
}

fn flush_now(logger: &mut Option<AsyncFd<Logger>>) {
    if let Some(logger) = logger {
        logger.get_mut().flush();
    }
}

fn attach_error(err: anyhow::Error, target: &mut Target) -> anyhow::Error {
    if target.has_exited() {
        anyhow!("process {} exited while leaktrace was attaching", target.pid)
    } else {
        err
    }
}

/// Fail early, with what to do, when BPF is out of reach.
fn check_privileges() -> anyhow::Result<()> {
    let caps = procfs::process::Process::myself()
        .and_then(|me| me.status())
        .map(|status| status.capeff)
        .context("failed to read this process's capabilities")?;
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        bail!("leaktrace needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF programs: run it with sudo")
    }
}
