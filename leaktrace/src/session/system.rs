//! The system mode (no `-p`, no `-c`): the machine's memory picture and the
//! kernel's allocations, machine-wide, reported until Ctrl-C, SIGTERM,
//! COUNT or --duration.

use std::time::{Duration, Instant};

use leaktrace_common::{
    KmemConfig, DEFAULT_MAX_KERNEL_STACKS, KMEM_ON, KMEM_PERCPU, UNWIND_CHUNK_ROWS,
};
use tokio::time::{interval_at, MissedTickBehavior};

use super::events::{until, Signals};
use crate::{
    analyze::system::SystemAnalyzer,
    attach::{self, KernelLoad, LoadOptions},
    cli::Args,
    report::{self, outputs::Outputs},
};

pub async fn trace(args: &Args, outputs: &mut Outputs) -> anyhow::Result<u8> {
    let plan = attach::kmem::plan(args.percpu)?;
    let kernel = super::kernel_analyzer(args, &plan)?;
    let flags = KMEM_ON | if args.percpu { KMEM_PERCPU } else { 0 };
    let (mut ebpf, mut links) = attach::load(&LoadOptions {
        tgid: 0,
        epoch_ns: 0,
        min_size: args.min_size.unwrap_or(0),
        max_size: args.max_size.unwrap_or(u64::MAX),
        // No heap is traced: its maps hold one entry each.
        max_allocations: 1,
        table_bits: 0,
        max_stacks: 1,
        sample_rate: args.sample_rate,
        windows: false,
        unwind_rows: UNWIND_CHUNK_ROWS as u64,
        glibc_allocator: false,
        glibc_pthread: false,
        hold: false,
        pid_namespace: None,
        kernel_log: args.verbose >= 2,
        trace: false,
        user: false,
        programs: Default::default(),
        kernel: Some(KernelLoad {
            config: KmemConfig {
                flags,
                own_tgid: std::process::id(),
                sample_rate: args.sample_rate,
                ..plan.config
            },
            programs: attach::kmem::programs(&plan).collect(),
            max_allocations: args.max_kernel_allocations,
            max_stacks: DEFAULT_MAX_KERNEL_STACKS,
        }),
    })?;
    let mut analyzer = SystemAnalyzer::new(kernel, args.older, args.sample_rate);
    analyzer.baseline()?;
    attach::kmem::attach(&mut ebpf, &plan, &mut links)?;
    attach::reset_lost(&mut ebpf)?;
    // Before the line that says Ctrl-C stops it.
    let mut signals = Signals::new()?;
    eprintln!(
        "leaktrace: attached to the kernel's allocation events machine-wide ({} events), and watching the machine's memory; Ctrl-C to stop",
        plan.events.len()
    );
    let mut emit = |analyzer: &mut SystemAnalyzer, is_final: bool| -> anyhow::Result<()> {
        let mut report = analyzer.report(&ebpf, is_final)?;
        report::finish(&mut report);
        outputs.write(&mut report);
        Ok(report::print(&report, args.json)?)
    };
    let started = Instant::now();
    let period = Duration::from_secs_f64(args.interval);
    let mut report_tick = interval_at((started + period).into(), period);
    report_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = args.duration.map(|secs| started + Duration::from_secs_f64(secs));
    let mut reports = 0u64;
    loop {
        tokio::select! {
            biased;
            () = signals.any() => break,
            () = until(deadline) => break,
            _ = report_tick.tick() => {
                reports += 1;
                let last = args.count == Some(reports);
                emit(&mut analyzer, last)?;
                if last {
                    return Ok(0);
                }
            }
        }
    }
    emit(&mut analyzer, true)?;
    Ok(0)
}
