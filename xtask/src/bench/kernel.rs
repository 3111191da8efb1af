//! What tracing kernel allocations costs: an eventfd()+close() loop timed
//! untraced, under the system mode (`leaktrace`, machine-wide) and under
//! `leaktrace -p PID --kernel`, round by round; the kernel allocations per
//! iteration (from `--program-stats` run counts), so that the cost reads per
//! kmalloc/kfree pair; and the system mode's CPU and map memory at rest.

use std::{path::Path, process::Command, thread, time::Instant};

use anyhow::Context as _;

use super::{
    live::*, process::*, program_times_of, Summary, ATTACH_TIMEOUT, C_FLAGS, IDLE_WINDOW,
    LIVE_INTERVAL, TRACE_INTERVAL,
};
use crate::{compile_c, workspace_root};

/// eventfd()+close() iterations per timed run.
const ITERATIONS: u64 = 200_000;
/// What the system mode prints once its tracepoints are attached.
const SYSTEM_ATTACHED: &str = "attached to the kernel's allocation events";

/// The ways the loop runs.
#[derive(Clone, Copy)]
enum KernelMode {
    Untraced,
    System,
    SystemSampled,
    Target,
}

const MODES: [(KernelMode, &str); 4] = [
    (KernelMode::Untraced, "untraced"),
    (KernelMode::System, "system mode"),
    (KernelMode::SystemSampled, "system -s 10"),
    (KernelMode::Target, "-p --kernel"),
];

pub(super) fn measure_kernel(leaktrace: &Path, rounds: u32) -> anyhow::Result<()> {
    let source = workspace_root().join("xtask/bench/kmem_loop.c");
    let workload = compile_c(&source, "kmem_loop", &C_FLAGS)?;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for round in 1..=rounds {
        eprintln!("xtask: kernel round {round}/{rounds}");
        for (index, &(mode, _)) in MODES.iter().enumerate() {
            samples[index].push(kernel_run(leaktrace, &workload, mode)?);
        }
    }
    // Allocations (and as many frees) per iteration, from one run's counts.
    let args = [ITERATIONS.to_string()];
    let programs =
        program_times_of(leaktrace, &workload, &args, "ns_per_iteration", &["--kernel"])?;
    let allocs: u64 = programs
        .iter()
        .filter(|program| matches!(program.name.as_str(), "kmem_kmalloc" | "kmem_cache_alloc"))
        .map(|program| program.runs)
        .sum();
    let per_iteration = allocs as f64 / ITERATIONS as f64;
    let (idle_cpu, map_memory) = system_at_rest(leaktrace)?;

    let summaries: Vec<Summary> = samples.iter_mut().map(|s| Summary::of(s)).collect();
    println!();
    println!(
        "Kernel allocations: {} eventfd()+close() per run, {rounds} rounds, ns per iteration",
        grouped(ITERATIONS)
    );
    println!("{:<16} {:>15} {:>10} {:>10}", "mode", "median", "min", "max");
    for (summary, (_, name)) in summaries.iter().zip(MODES) {
        summary.print_row(name);
    }
    let untraced = summaries[0].median;
    println!(
        "kernel allocations per iteration (kmalloc + kmem_cache_alloc runs, machine-wide): {per_iteration:.2}"
    );
    for (summary, (_, name)) in summaries.iter().zip(MODES).skip(1) {
        let added = summary.median - untraced;
        let per_pair = if per_iteration > 0.0 { added / per_iteration } else { f64::NAN };
        println!(
            "{name}: +{added:.0} ns per iteration ({:.2}x untraced), ~{per_pair:.0} ns per allocation/free pair",
            summary.median / untraced
        );
    }
    println!(
        "system mode at rest: {:.1}% of a core (a report a second), {:.1} MB of map memory",
        idle_cpu * 100.0,
        mb(map_memory)
    );
    Ok(())
}

/// One timed run of the loop in `mode`.
fn kernel_run(leaktrace: &Path, workload: &Path, mode: KernelMode) -> anyhow::Result<f64> {
    let mut run = Workload::start(workload, &[ITERATIONS.to_string()])?;
    let tracer = match mode {
        KernelMode::Untraced => None,
        KernelMode::System => Some(system_tracer(leaktrace, &[TRACE_INTERVAL])?),
        KernelMode::SystemSampled => Some(system_tracer(leaktrace, &["-s", "10", TRACE_INTERVAL])?),
        KernelMode::Target => {
            Some(Tracer::leaktrace(leaktrace, run.pid, TRACE_INTERVAL, &["--kernel"])?)
        }
    };
    run.go()?;
    let ns = run.read_value("ns_per_iteration")?;
    let ns = ns.parse().with_context(|| format!("bad ns_per_iteration: {ns:?}"))?;
    if let Some(tracer) = tracer {
        tracer.stop()?;
    }
    run.wait()?;
    Ok(ns)
}

/// `leaktrace ARGS...` (the system mode), once attached.
fn system_tracer(leaktrace: &Path, args: &[&str]) -> anyhow::Result<Tracer> {
    let mut cmd = Command::new(leaktrace);
    cmd.args(args);
    let mut tracer = Tracer::spawn("leaktrace", &mut cmd)?;
    tracer.wait_for(&format!("`{SYSTEM_ATTACHED}`"), ATTACH_TIMEOUT, |line| {
        !line.from_stdout && line.text.contains(SYSTEM_ATTACHED)
    })?;
    Ok(tracer)
}

/// The system mode's CPU (share of a core) over the idle window, reporting
/// every second, and its maps' kernel memory.
fn system_at_rest(leaktrace: &Path) -> anyhow::Result<(f64, u64)> {
    let tracer = system_tracer(leaktrace, &[LIVE_INTERVAL])?;
    let pid = tracer.child.0.id();
    // Past the first reports, which read every process's name.
    thread::sleep(std::time::Duration::from_secs(2));
    let start = (Instant::now(), cpu_ticks(pid)?);
    thread::sleep(IDLE_WINDOW);
    let end = (Instant::now(), cpu_ticks(pid)?);
    let cpu =
        (end.1 - start.1) as f64 / clock_ticks_per_second()? / (end.0 - start.0).as_secs_f64();
    let memory = bpf_map_memory(pid)?;
    tracer.stop()?;
    Ok((cpu, memory))
}
