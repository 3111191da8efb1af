//! Loading the kernel programs configured for one target, and attaching
//! them: uprobes on the allocator API of the objects the target maps
//! ([`uprobes`], from the tables in [`probes`]) and the thread tracepoints
//! ([`tracepoints`]).

mod probes;
mod tracepoints;
mod uprobes;

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    Ebpf, EbpfLoader,
};
use leaktrace_common::{
    Config, Lost, CONFIG_GLIBC_CHUNKS, CONFIG_GLIBC_PTHREAD, CONFIG_HOLD, GLOBAL_CONFIG,
    MAP_ALLOCS, MAP_LOST, MAP_STACKS, MAP_STACK_STATS, MAP_UNWIND_ROWS, UNWIND_CHUNK_ROWS,
};

use probes::ALL_SETS;
pub use tracepoints::attach_tracepoints;
use tracepoints::{fork_child_pid_offset, tracepoint, TRACEPOINTS};
use uprobes::program;
pub use uprobes::{attach_all, plan, AttachOptions};

/// What the programs are told at load time.
pub struct LoadOptions {
    pub tgid: u32,
    pub epoch_ns: u64,
    pub min_size: u64,
    pub max_size: u64,
    pub max_allocations: u32,
    pub max_stacks: u32,
    pub sample_rate: u64,
    /// Capacity of the unwind tables, in rows.
    pub unwind_rows: u64,
    /// The one allocator is glibc's (see `uprobes::Plan::glibc_allocator`).
    pub glibc_allocator: bool,
    /// pthread_create is glibc's (see `uprobes::Plan::glibc_pthread`).
    pub glibc_pthread: bool,
    /// Stop the target where its mappings change until they are published
    /// (a `-c` target only: see `CONFIG_HOLD`).
    pub hold: bool,
    /// Whether the programs log their rare paths (-vv). Off, the verifier
    /// prunes the log calls: they cost nothing.
    pub kernel_log: bool,
}

/// Load every program, configured for one target.
pub fn load(options: &LoadOptions) -> anyhow::Result<Ebpf> {
    let config = Config {
        tgid: options.tgid,
        flags: if options.glibc_allocator { CONFIG_GLIBC_CHUNKS } else { 0 }
            | if options.glibc_pthread { CONFIG_GLIBC_PTHREAD } else { 0 }
            | if options.hold { CONFIG_HOLD } else { 0 },
        epoch_ns: options.epoch_ns,
        min_size: options.min_size,
        max_size: options.max_size,
        fork_child_pid_offset: fork_child_pid_offset()?,
        _pad2: 0,
        sample_rate: options.sample_rate,
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_CONFIG, &config, true)
        .override_global(aya_log::LEVEL, &kernel_log_level(options.kernel_log), false)
        .map_max_entries(MAP_ALLOCS, options.max_allocations)
        .map_max_entries(MAP_STACKS, options.max_stacks)
        .map_max_entries(MAP_STACK_STATS, options.max_stacks)
        .map_max_entries(
            MAP_UNWIND_ROWS,
            options.unwind_rows.div_ceil(UNWIND_CHUNK_ROWS as u64) as u32,
        )
        .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace")))
        .context("failed to load the eBPF programs")?;
    let mut names: Vec<&str> = ALL_SETS
        .iter()
        .flat_map(|set| set.iter())
        .flat_map(|p| [Some(p.enter), p.exit])
        .flatten()
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        program(&mut ebpf, name)?
            .load()
            .with_context(|| format!("failed to load program {name}"))?;
    }
    for (name, _, _) in TRACEPOINTS {
        tracepoint(&mut ebpf, name)?
            .load()
            .with_context(|| format!("failed to load program {name}"))?;
    }
    Ok(ebpf)
}

/// aya-log-ebpf's level: calls at or below it are kept (log's order, Error
/// 1 to Trace 5); 0 keeps none.
fn kernel_log_level(on: bool) -> u8 {
    if on {
        log::Level::Debug as u8
    } else {
        0
    }
}

/// Zero the lost-event counters once every probe is in: calls already under
/// way while the probes went in are not events leaktrace lost.
pub fn reset_lost(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(MAP_LOST)
        .ok_or_else(|| anyhow!("map {MAP_LOST} missing from the eBPF object"))?;
    let mut counters: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(map)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, err)| err).context("failed to count CPUs")?;
    for index in 0..Lost::COUNT {
        counters.set(index, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
    }
    Ok(())
}

/// `--program-stats`: each program that ran, with its runs and mean time,
/// on stderr; the last line says how many.
pub fn print_program_stats(ebpf: &Ebpf) {
    let mut ran = 0;
    for (name, program) in ebpf.programs() {
        let Ok(info) = program.info() else {
            continue;
        };
        let runs = info.run_count();
        if runs == 0 {
            continue;
        }
        ran += 1;
        let mean = info.run_time().as_nanos() / u128::from(runs);
        eprintln!("leaktrace: program {name}: {runs} runs, {mean} ns mean");
    }
    eprintln!("leaktrace: program stats: {ran} programs ran");
}
