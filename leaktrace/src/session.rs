//! One tracing session, start to end: check privileges, find the target and
//! its allocator, load and attach, then report every interval until Ctrl-C,
//! SIGTERM, COUNT, --duration or the target's exit, with a final report.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use leaktrace_common::YOUNG_EPOCHS;

use crate::{
    cli::Args,
    collector::Collector,
    elf::ElfFile,
    loader::{self, LoadOptions, Object},
    report::ProbedObject,
    reporter::{ReportOptions, Reporter},
    target::{self, Target},
    unwind::Unwinder,
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
    let objects = objects_to_probe(args, target)?;

    // Epochs of a quarter of --older: every allocation younger than --older
    // is left out, and none older than 1.25x --older.
    let epoch_ns = args.older * 1_000_000 / u64::from(YOUNG_EPOCHS);
    let mut ebpf = loader::load(&LoadOptions {
        // PID 0 never allocates: the programs stop at their first check.
        tgid: if args.floor { 0 } else { pid },
        epoch_ns,
        min_size: args.min_size.unwrap_or(0),
        max_size: args.max_size.unwrap_or(u64::MAX),
        max_allocations: args.allocation_slots(),
        max_stacks: args.max_stacks,
        sample_rate: args.sample_rate,
        unwind_rows: args.unwind_rows,
    })?;
    // The unwind tables go in before the probes, so that the first events
    // already get whole stacks. A `-c` child has not run its program yet:
    // its tables are loaded as it maps it.
    // Held open for the session: the kernel times program runs while it is.
    let program_stats = args
        .program_stats
        .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
        .transpose()
        .context("failed to enable BPF run-time statistics")?;
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
    let allocator = args.obj.as_deref();
    let probed = loader::attach_all(
        &mut ebpf,
        &objects,
        &loader::AttachOptions { pid, symbol_prefix: args.symbol_prefix.as_deref(), allocator },
    )
    .map_err(|err| attach_error(err, target))?;
    loader::attach_tracepoints(&mut ebpf)?;
    loader::reset_lost(&mut ebpf)?;
    for object in &probed {
        for probe in &object.probes {
            let symbol = probe.symbol;
            match (probe.alias_of, probe.skipped) {
                (Some(alias), _) => log::info!("{symbol}: same address as {alias}, probed once"),
                (None, 0) => log::info!("{symbol}: probe at entry (file offset {:#x})", probe.offset),
                (None, n) => log::info!(
                    "{symbol}: probe {n} bytes past entry (file offset {:#x}), past an instruction the kernel would single-step",
                    probe.offset
                ),
            }
        }
    }
    let summary: Vec<String> = probed
        .iter()
        .map(|object| format!("{} in {}", object.functions.len(), object.object.display()))
        .collect();
    eprintln!(
        "leaktrace: attached to pid {pid}: functions probed: {}; Ctrl-C to stop",
        summary.join(", ")
    );
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("failed to install a signal handler")?;
    }
    target.release()?;
    let followed = unwinder.followed();
    let _unwinding = unwinder.spawn(Arc::clone(&stop));

    let mut reporter = Reporter::new(
        ebpf,
        Collector { epoch_ns, sample_rate: args.sample_rate },
        ReportOptions {
            pid,
            top: args.top,
            older_ms: args.older,
            json: args.json,
            probed: probed
                .iter()
                .map(|object| ProbedObject {
                    object: object.object.display().to_string(),
                    functions: object.functions.clone(),
                })
                .collect(),
            debug_dirs: args.debug_dirs.clone(),
            sysroot: args.sysroot.clone(),
            baseline_now: target.program().is_none(),
            followed: followed.clone(),
        },
    );
    let started = Instant::now();
    let interval = Duration::from_secs_f64(args.interval);
    let deadline = args.duration.map(|secs| started + Duration::from_secs_f64(secs));
    let mut next_report = started + interval;
    let mut reports = 0u64;
    let result = loop {
        std::thread::sleep(TICK);
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| now >= d) {
            break reporter.report(true, false);
        }
        if target.has_exited() {
            log::info!("pid {pid} {}", target.exit_status().unwrap_or("exited"));
            break reporter.report(true, true);
        }
        if now >= next_report {
            reports += 1;
            let last = args.count == Some(reports);
            if let Err(err) = reporter.report(last, false) {
                break Err(err);
            }
            if last {
                break Ok(());
            }
            next_report += interval;
        }
    };
    if program_stats.is_some() {
        reporter.print_program_stats();
    }
    result
}

/// The objects whose functions may be probed, executable first: what the
/// target maps, or for a `-c` child that has not run its program yet, the
/// program and the libraries it needs as the loader would find them.
fn objects_to_probe(args: &Args, target: &Target) -> anyhow::Result<Vec<Object>> {
    let local = |path: PathBuf| Object { shown: path.clone(), open: path };
    let mut objects: Vec<Object> = match target.program() {
        Some(program) => {
            let mut objects = vec![local(program.to_path_buf())];
            let elf = ElfFile::open(program)?;
            if elf.is_dynamic() {
                for soname in elf.needed()? {
                    if let Some(path) = target::find_library(&soname) {
                        objects.push(local(path));
                    }
                }
                // The dynamic linker, whose debugger hook says when a
                // library is loaded.
                objects.extend(elf.interpreter().map(local));
                // The C library and libstdc++ ours would load, whatever
                // the program names directly.
                let ours = target::mapped_objects(std::process::id())?;
                objects.extend(target::find_libc(&ours).map(local));
                objects.extend(target::system_cxx_runtime().map(local));
            }
            objects
        }
        None => target::mapped_objects(target.pid)?
            .into_iter()
            .map(|shown| Object { open: target.host_path(&shown), shown })
            .collect(),
    };
    if let Some(obj) = &args.obj {
        if !objects.iter().any(|object| &object.shown == obj) {
            let object = if target.program().is_some() {
                local(obj.clone())
            } else {
                Object { open: target.host_path(obj), shown: obj.clone() }
            };
            anyhow::ensure!(object.open.exists(), "--obj {} does not exist", obj.display());
            objects.push(object);
        }
    }
    let mut seen = std::collections::HashSet::new();
    objects.retain(|object| seen.insert(object.shown.clone()));
    Ok(objects)
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
