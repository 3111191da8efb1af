//! One tracing session, start to end: check privileges, find the target and
//! its allocator, load and attach, then run one event loop until Ctrl-C,
//! SIGTERM, SIGHUP, COUNT, --duration or the target's exit, with a final
//! report. The loop (a current-thread tokio runtime) waits on every event
//! source at once: the signals, the report ticks, the dynamic linker's hook
//! (a ring buffer), the poll of the target's mappings, the target's exit,
//! and the programs' own log records.

mod epochs;
mod events;
mod exec;
mod system;
mod windows;

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use aya::maps::RingBuf;
use aya_log::EbpfLogger;
use leaktrace_common::{
    KmemConfig, CHANGE_EXEC, DEFAULT_MAX_KERNEL_STACKS, DEFAULT_UNWIND_CHUNKS, KMEM_ON,
    KMEM_TARGET, MAP_LINK_MAP_CHANGES, MAP_TRACE_EVENTS, UNWIND_CHUNK_ROWS, YOUNG_EPOCHS,
};
use leaktrace_report::{read_last_report, Ended, Report, Sampling, VerdictKind};
use tokio::time::{interval, interval_at, MissedTickBehavior};

use events::{
    after_change, flush_log, flush_now, keep_unwinding, mappings_changed, poll_every, resume,
    until, watch, Signals, TraceLines,
};

use crate::{
    analyze::{self, kernel::KernelAnalyzer, Analyzer, ReportOptions},
    attach::{self, KernelLoad, LoadOptions},
    cli::{Args, DiffArgs, SampleBy, SortKey},
    collect::Collector,
    report::{self, outputs::Outputs},
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
/// How often the status line before the first report is redrawn.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The next tick of `timer`, or never without one.
async fn tick(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Run a session. Returns leaktrace's exit code: 0, or for a `-c` program
/// that ended by itself, its own (the status, or 128 + the signal that
/// killed it), as `time` and `timeout` do.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.validate()?;
    check_privileges()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the event loop")?;
    if args.is_system() {
        raise_fd_limit();
        let mut outputs = outputs(&args, "kernel", None)?;
        return runtime.block_on(system::trace(&args, &mut outputs));
    }
    let mut target = match (&args.command, args.pid) {
        (Some(command), _) => Target::spawn(command, args.json, args.keep_running)?,
        (None, Some(pid)) => Target::existing(pid)?,
        (None, None) => bail!("give a PID with -p or a command with -c"),
    };
    // After the fork: a -c program keeps the limit it was given.
    raise_fd_limit();
    let comm = match &args.command {
        Some(command) => shlex::split(command)
            .and_then(|words| words.into_iter().next())
            .map(|program| leaktrace_report::short_module(&program).to_string())
            .unwrap_or_default(),
        None => crate::proc::system::comm(target.pid).unwrap_or_default(),
    };
    let mut outputs = match outputs(&args, &comm, Some(target.pid)) {
        Ok(outputs) => outputs,
        Err(err) => {
            target.kill_child();
            return Err(err);
        }
    };
    let result = runtime.block_on(trace(&args, &mut target, &mut outputs));
    if result.is_err() {
        target.kill_child();
    }
    result
}

/// Why the loop ended.
#[derive(Clone, Copy)]
enum End {
    /// A signal, --duration, or the last of COUNT reports (already printed).
    Stopped,
    Exited,
    Counted,
}

async fn trace(args: &Args, target: &mut Target, outputs: &mut Outputs) -> anyhow::Result<u8> {
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
    // In a container's PID namespace the target's PID is numbered there;
    // the programs compare it in that namespace, not with the kernel's.
    let pid_namespace = crate::proc::own_pid_namespace();
    if pid_namespace.is_some() {
        log::info!("leaktrace runs in a PID namespace of its own: PIDs are compared there");
    }
    // Epochs of a quarter of --older: every allocation younger than --older
    // is left out, and none older than 1.25x --older.
    let epoch_ns = args.older * 1_000_000 / u64::from(YOUNG_EPOCHS);
    // --kernel: the kernel's allocations in the target's threads.
    let kernel = if args.kernel {
        let plan = attach::kmem::plan(false)?;
        let analyzer = kernel_analyzer(args, &plan)?;
        Some((plan, analyzer))
    } else {
        None
    };
    // `links` after `ebpf`, so dropped before it on every way out.
    let (mut ebpf, mut links) = attach::load(&LoadOptions {
        // PID 0 never allocates: the programs stop at their first check.
        tgid: if args.floor { 0 } else { pid },
        epoch_ns,
        min_size: args.min_size.unwrap_or(0),
        max_size: args.max_size.unwrap_or(u64::MAX),
        max_allocations: args.allocation_slots(),
        // A -c target has not run its program yet (its pages are still
        // leaktrace's): the smallest table.
        table_bits: attach::table_bits(
            if hold { 0 } else { crate::proc::resident_bytes(pid).unwrap_or(0) },
            args.allocation_slots(),
        ),
        max_stacks: args.max_stacks,
        sample_rate: args.sample_rate,
        windows: args.sampling == SampleBy::Windows,
        unwind_rows: args.unwind_rows.unwrap_or_else(|| unwind_capacity(&objects)),
        glibc_allocator: plan.glibc_allocator,
        glibc_pthread: plan.glibc_pthread,
        hold,
        pid_namespace,
        kernel_log: args.verbose >= 2,
        trace: args.trace,
        user: true,
        programs: plan.programs(),
        kernel: kernel.as_ref().map(|(plan, _)| KernelLoad {
            config: KmemConfig {
                flags: KMEM_ON | KMEM_TARGET,
                sample_rate: args.sample_rate,
                ..plan.config
            },
            programs: attach::kmem::programs(plan).collect(),
            max_allocations: args.max_kernel_allocations,
            max_stacks: DEFAULT_MAX_KERNEL_STACKS,
        }),
    })?;
    let _epochs = epochs::EpochClock::start(&mut ebpf, epoch_ns)?;
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
    unwinder.set_allocator(plan.glibc_libc);
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
    let mut trace_events = if args.trace {
        let map = ebpf
            .take_map(MAP_TRACE_EVENTS)
            .ok_or_else(|| anyhow!("map {MAP_TRACE_EVENTS} missing from the eBPF object"))?;
        Some(watch(RingBuf::try_from(map)?).context("failed to watch the trace events")?)
    } else {
        None
    };
    let mut trace_lines = TraceLines::default();
    let probed = attach::attach_all(&mut ebpf, &plan, &mut links)
        .map_err(|err| attach_error(err, target))?;
    attach::attach_tracepoints(&mut ebpf, &mut links)?;
    if let Some((plan, _)) = &kernel {
        attach::kmem::attach(&mut ebpf, plan, &mut links)?;
    }
    attach::reset_lost(&mut ebpf)?;
    let summary: Vec<String> = probed
        .iter()
        .map(|object| format!("{} in {}", object.functions.len(), object.object))
        .collect();
    // Before the line that says Ctrl-C stops it: a Ctrl-C right after must
    // give the final report, not kill leaktrace (seen in a test).
    let mut signals = Signals::new()?;
    eprintln!(
        "leaktrace: attached to pid {pid}: functions probed: {}; Ctrl-C to stop",
        summary.join(", ")
    );
    let mut windows = links.windows().then(|| windows::Windows::new(args.sample_rate));
    let how = if windows.is_some() { Sampling::Windows } else { Sampling::Address };
    let sampling = (args.sample_rate > 1).then_some(how);

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
            global_tids: pid_namespace.is_none(),
            sort_by_count: args.sort == SortKey::Count,
            show_allocs: args.show_allocs,
            sampling,
        },
    );
    if let Some((_, kernel)) = kernel {
        analyzer = analyzer.with_kernel(kernel);
    }
    target.release()?;
    let json = args.json;
    // Returns whether the report found a leak (`--error-exitcode`).
    let mut emit = |ebpf: &aya::Ebpf,
                    analyzer: &mut Analyzer,
                    unwinder: &Unwinder,
                    ended: Option<&Ended>,
                    is_final: bool,
                    exited: bool|
     -> anyhow::Result<bool> {
        let mut report =
            analyzer.report(ebpf, unwinder.mappings(), unwinder.file_paths(), is_final, exited)?;
        report.ended = ended.cloned();
        report::finish(&mut report);
        outputs.write(&mut report);
        report::print(&report, json)?;
        let verdict = report.verdict.as_ref();
        Ok(verdict.is_some_and(|verdict| {
            verdict.has(VerdictKind::Leak) || verdict.has(VerdictKind::InUseAtExit)
        }))
    };
    // The files probed so far, so that an exec probes only what is new.
    let mut probed_files = plan.files();
    // A -c program's first exec is the one leaktrace released it into.
    let mut expected_execs = u32::from(target.program().is_some());

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
    let mut leaked = false;
    // Until the first report, a status line on a terminal says it works.
    // SAFETY: isatty only inspects the descriptor.
    let mut status = (unsafe { libc::isatty(2) } == 1).then(|| interval(STATUS_EVERY));
    let end = loop {
        tokio::select! {
            biased;
            () = signals.any() => break End::Stopped,
            _ = tick(&mut status) => {
                if let Ok((allocations, stacks)) = crate::collect::tracked(&ebpf) {
                    let next = (started + period).saturating_duration_since(Instant::now());
                    eprint!(
                        "\rleaktrace: {allocations} allocations tracked in {stacks} stacks; first report in {:.0} s\x1b[K",
                        next.as_secs_f64().ceil()
                    );
                }
            }
            () = until(deadline) => break End::Stopped,
            () = until(windows.as_ref().map(windows::Windows::next)) => {
                if let Some(windows) = &mut windows {
                    windows.toggle(&mut links, &mut ebpf);
                }
            }
            _ = exit_poll.tick() => {
                if target.has_exited() {
                    log::info!("pid {pid} {}", target.exit_status().unwrap_or("exited"));
                    break End::Exited;
                }
            }
            _ = report_tick.tick() => {
                if status.take().is_some() {
                    eprint!("\r\x1b[K");
                }
                reports += 1;
                let last = args.count == Some(reports);
                leaked = emit(&ebpf, &mut analyzer, &unwinder, None, last, false)?;
                if last {
                    break End::Counted;
                }
            }
            changes = mappings_changed(&mut link_changes) => {
                let execs = changes.iter().filter(|change| change.cause == CHANGE_EXEC).count();
                let fresh = (execs as u32).saturating_sub(expected_execs);
                expected_execs = expected_execs.saturating_sub(execs as u32);
                if fresh > 0 {
                    // The old image is gone: so are its books.
                    let program = exec::forget_image(
                        &mut ebpf,
                        target,
                        args.symbol_prefix.as_deref(),
                        &mut probed_files,
                        &mut links,
                    )?;
                    analyzer.exec(program);
                }
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
            () = trace_lines.print(&mut trace_events) => {}
        }
    };
    trace_lines.finish();
    if status.is_some() {
        eprint!("\r\x1b[K");
    }
    if hold {
        // Whatever happened, a held target must not stay stopped.
        resume(pid);
    }
    let result = match end {
        End::Stopped => emit(&ebpf, &mut analyzer, &unwinder, None, true, false),
        End::Exited => emit(&ebpf, &mut analyzer, &unwinder, target.ended(), true, true),
        End::Counted => Ok(leaked),
    };
    flush_now(&mut logger);
    if program_stats.is_some() {
        attach::print_program_stats(&ebpf, &links);
    }
    let detaching = Instant::now();
    let count = links.len();
    links.detach_all();
    log::info!("{count} probes detached in {:.0} ms", detaching.elapsed().as_secs_f64() * 1e3);
    // A -c program ended by itself gives leaktrace its exit code; one still
    // running is ended with leaktrace unless --keep-running.
    let code = match (end, target.ended()) {
        (End::Exited, Some(ended)) => u8::try_from(ended.shell_code()).unwrap_or(u8::MAX),
        _ => 0,
    };
    if !args.keep_running {
        target.stop_child();
    }
    result.map(|leaked| match args.error_exitcode {
        Some(error) if leaked => error,
        _ => code,
    })
}

/// `leaktrace diff`: read both files' final reports, compare, print.
pub fn diff(args: &DiffArgs) -> anyhow::Result<()> {
    let read = |path: &Path| -> anyhow::Result<Report> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        read_last_report(io::BufReader::new(file))
            .map_err(|err| anyhow!("{} is not leaktrace --json output: {err}", path.display()))
    };
    let before = read(&args.before)?;
    let after = read(&args.after)?;
    let names = (args.before.display().to_string(), args.after.display().to_string());
    let mut report = analyze::diff::diff(&before, &after, (&names.0, &names.1));
    report.stacks.truncate(args.top);
    Ok(report::print(&report, args.json)?)
}

/// Where each report also goes (`--folded`, `--svg`, `--pprof`, `--push`),
/// checked before tracing starts. `comm` names the application pushed.
fn outputs(args: &Args, comm: &str, pid: Option<u32>) -> anyhow::Result<Outputs> {
    let push = match &args.push {
        Some(url) => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let mut labels = Vec::new();
            if let Some(pid) = pid {
                labels.push(("pid", pid.to_string()));
            }
            labels.push(("host", host.trim().to_string()));
            Some(report::Pusher::new(url, comm, &labels)?)
        }
        None => None,
    };
    Outputs::new(args.folded.clone(), args.svg.clone(), args.pprof.clone(), push)
}

/// Unwind rows to make room for: twice what the target's objects need (an
/// estimate from their call-frame sections), room for libraries it loads
/// later, at least [`MIN_UNWIND_ROWS`], at most the old fixed size.
fn unwind_capacity(objects: &[crate::target::Object]) -> u64 {
    let needed: u64 = objects
        .iter()
        .filter_map(|object| crate::elf::ElfFile::open(&object.open).ok())
        .map(|elf| crate::unwind::table::estimated_rows(&elf))
        .sum();
    let rows = (2 * needed).clamp(MIN_UNWIND_ROWS, MAX_UNWIND_ROWS);
    log::info!("unwind tables: room for {rows} rows (the target's objects need ~{needed})");
    rows
}

/// The least room made for unwind rows (3 MiB): libc and libstdc++ loaded
/// later fit.
const MIN_UNWIND_ROWS: u64 = 1 << 18;
/// The most made without --unwind-rows (24 MiB).
const MAX_UNWIND_ROWS: u64 = DEFAULT_UNWIND_CHUNKS as u64 * UNWIND_CHUNK_ROWS as u64;

/// The analysis of kernel allocations, for the events in `plan`.
fn kernel_analyzer(args: &Args, plan: &attach::kmem::KmemPlan) -> anyhow::Result<KernelAnalyzer> {
    KernelAnalyzer::new(
        args.kallsyms.clone(),
        args.older,
        args.sample_rate,
        args.top,
        plan.missing.clone(),
    )
}

fn attach_error(err: anyhow::Error, target: &mut Target) -> anyhow::Error {
    if target.has_exited() {
        anyhow!("process {} exited while leaktrace was attaching", target.pid)
    } else if out_of_fds(&err) {
        let limit = fd_limit().map_or("?".to_string(), |limit| limit.rlim_cur.to_string());
        err.context(format!(
            "leaktrace ran out of file descriptors (RLIMIT_NOFILE {limit}, raised to its hard \
             limit): raise the hard limit (ulimit -Hn) for a process that maps this many files"
        ))
    } else {
        err
    }
}

/// Whether `err` was caused by this process's file descriptors running out.
fn out_of_fds(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::EMFILE))
    })
}

fn fd_limit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// Raise the soft limit of open files to the hard one: leaktrace holds
/// one descriptor for each object the target maps (a target may map
/// thousands), besides its maps and links; the usual soft limit is 1024.
fn raise_fd_limit() {
    let Some(mut limit) = fd_limit() else {
        return;
    };
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: a valid rlimit, read above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            log::debug!("cannot raise RLIMIT_NOFILE: {}", io::Error::last_os_error());
        }
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
