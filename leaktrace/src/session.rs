//! One tracing session, start to end: check privileges, find the target and
//! its allocator, load and attach, then report every interval until Ctrl-C,
//! SIGTERM, COUNT, --duration or the target's exit, with a final report.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use leaktrace_common::YOUNG_EPOCHS;
use object::Object as _;

use crate::{
    cli::Args,
    loader::{self, LoadOptions},
    reporter::{ReportOptions, Reporter},
    target::{self, Target},
};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// How often the session looks at signals and the target between reports.
const TICK: Duration = Duration::from_millis(100);

pub fn run(args: Args) -> anyhow::Result<()> {
    args.validate()?;
    check_privileges()?;

    let mut target = match (&args.command, args.pid) {
        (Some(command), _) => Target::spawn(command)?,
        (None, Some(pid)) => Target::existing(pid)?,
        (None, None) => bail!("give a PID with -p or a command with -c"),
    };
    let result = trace(&args, &mut target);
    if result.is_err() {
        target.kill_child();
    }
    result
}

fn trace(args: &Args, target: &mut Target) -> anyhow::Result<()> {
    let pid = target.pid;
    let plan = probe_plan(args, target)?;

    // Epochs of a quarter of --older: every allocation younger than --older
    // is left out, and none older than 1.25x --older.
    let epoch_ns = args.older * 1_000_000 / u64::from(YOUNG_EPOCHS);
    let mut ebpf = loader::load(&LoadOptions {
        // PID 0 never allocates: the programs stop at their first check.
        tgid: if args.floor { 0 } else { pid },
        epoch_ns,
        min_size: args.min_size.unwrap_or(0),
        max_size: args.max_size.unwrap_or(u64::MAX),
        max_allocations: args.max_allocations,
        max_stacks: args.max_stacks,
    })?;
    let mut probes = loader::attach_allocator(&mut ebpf, &plan.allocator.open, pid)
        .map_err(|err| attach_error(err, target))?;
    if let Some(threads) = &plan.threads {
        let thread_probes = loader::attach_threads(&mut ebpf, &threads.open, pid)
            .map_err(|err| attach_error(err, target))?;
        if thread_probes.is_empty() {
            log::info!("no pthread_create in {}: threads not traced", threads.shown.display());
        }
        probes.extend(thread_probes);
    }
    loader::attach_tracepoints(&mut ebpf)?;
    if let Some(cxx) = &plan.cxx_runtime {
        let cxx_probes = loader::attach_cxx_new(&mut ebpf, &cxx.open, pid)
            .map_err(|err| attach_error(err, target))?;
        if !cxx_probes.is_empty() {
            log::info!("operator new probed in {}", cxx.shown.display());
        }
        probes.extend(cxx_probes);
    }
    loader::reset_lost(&mut ebpf)?;
    for probe in &probes {
        match (probe.alias_of, probe.skipped) {
            (Some(alias), _) => log::info!("{}: same address as {alias}, probed once", probe.symbol),
            (None, 0) => log::info!("{}: probe at entry (file offset {:#x})", probe.symbol, probe.offset),
            (None, n) => log::info!(
                "{}: probe {n} bytes past entry (file offset {:#x}), past an instruction the kernel would single-step",
                probe.symbol,
                probe.offset
            ),
        }
    }
    eprintln!(
        "leaktrace: attached to pid {pid}: {} functions probed in {}; Ctrl-C to stop",
        probes.len(),
        plan.allocator.shown.display()
    );
    target.release()?;

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("failed to install a signal handler")?;
    }

    let mut reporter = Reporter::new(
        ebpf,
        epoch_ns,
        ReportOptions {
            pid,
            top: args.top,
            older_ms: args.older,
            json: args.json,
            baseline_now: target.program().is_none(),
        },
    );
    let started = Instant::now();
    let interval = Duration::from_secs_f64(args.interval);
    let deadline = args.duration.map(|secs| started + Duration::from_secs_f64(secs));
    let mut next_report = started + interval;
    let mut reports = 0u64;
    loop {
        std::thread::sleep(TICK);
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| now >= d) {
            return reporter.report(true, false);
        }
        if target.has_exited() {
            log::info!("pid {pid} {}", target.exit_status().unwrap_or("exited"));
            return reporter.report(true, true);
        }
        if now >= next_report {
            reports += 1;
            let last = args.count == Some(reports);
            reporter.report(last, false)?;
            if last {
                return Ok(());
            }
            next_report += interval;
        }
    }
}

/// An object to probe: its path as the target names it (for the user) and
/// the path to open it by from here.
struct Object {
    shown: PathBuf,
    open: PathBuf,
}

impl Object {
    fn seen_by(target: &Target, shown: PathBuf) -> Self {
        let open = target.host_path(&shown);
        Self { shown, open }
    }

    fn local(path: PathBuf) -> Self {
        Self {
            shown: path.clone(),
            open: path,
        }
    }
}

/// Which objects get which probes.
struct ProbePlan {
    /// Provides malloc and free.
    allocator: Object,
    /// Provides operator new, when it is not the allocator.
    cxx_runtime: Option<Object>,
    /// Provides pthread_create.
    threads: Option<Object>,
}

fn probe_plan(args: &Args, target: &Target) -> anyhow::Result<ProbePlan> {
    if let Some(program) = target.program() {
        // A `-c` child has not run its program yet: a static program is its
        // own allocator, a dynamic one gets the system libc, which is ours.
        if !is_dynamic(program)? {
            return Ok(ProbePlan {
                allocator: Object::local(program.to_path_buf()),
                cxx_runtime: Some(Object::local(program.to_path_buf())),
                threads: Some(Object::local(program.to_path_buf())),
            });
        }
        let ours = target::mapped_objects(std::process::id())?;
        let allocator = match &args.obj {
            Some(obj) => obj.clone(),
            None => target::find_allocator(&ours[1..]).ok_or_else(|| {
                anyhow!("no allocator found for {}: use --obj", program.display())
            })?,
        };
        return Ok(ProbePlan {
            allocator: Object::local(allocator),
            cxx_runtime: target::system_cxx_runtime().map(Object::local),
            threads: target::find_thread_library(&ours[1..]).map(Object::local),
        });
    }
    let objects = target::mapped_objects(target.pid)?;
    let allocator = match &args.obj {
        Some(obj) => obj.clone(),
        None => target::find_allocator(&objects).ok_or_else(|| {
            anyhow!("no allocator found in process {}: use --obj PATH", target.pid)
        })?,
    };
    let allocator = Object::seen_by(target, allocator);
    anyhow::ensure!(
        allocator.open.exists(),
        "{} does not exist in process {}",
        allocator.shown.display(),
        target.pid
    );
    let cxx_runtime = target::find_cxx_runtime(&objects)
        .or_else(|| (objects.first() == Some(&allocator.shown)).then(|| allocator.shown.clone()))
        .map(|path| Object::seen_by(target, path));
    let threads = target::find_thread_library(&objects).map(|path| Object::seen_by(target, path));
    Ok(ProbePlan {
        allocator,
        cxx_runtime,
        threads,
    })
}

fn attach_error(err: anyhow::Error, target: &mut Target) -> anyhow::Error {
    if target.has_exited() {
        anyhow!("process {} exited while leaktrace was attaching", target.pid)
    } else {
        err
    }
}

fn is_dynamic(program: &std::path::Path) -> anyhow::Result<bool> {
    let data = std::fs::read(program)
        .with_context(|| format!("failed to read {}", program.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{} is not an ELF executable", program.display()))?;
    Ok(file.section_by_name(".interp").is_some())
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
