//! A workload shaped like a service (`xtask/bench/service_loop.c`: sizes
//! 16..4096 bytes over a window of 1,024 live blocks a thread, replaced in
//! pseudo-random order, freed across threads), timed with 1 and 2 threads
//! untraced, at the probe floor, under leaktrace and under `-s 10`, round by
//! round: how far leaktrace is from the floor on realistic work.

use std::path::Path;

use anyhow::Context as _;

use super::{timed_run, Mode, Summary, Tools, C_FLAGS, SAMPLED_RUN_FACTOR};
use crate::{compile_c, workspace_root};

const MODES: [Mode; 4] = [Mode::Untraced, Mode::Floor, Mode::Leaktrace, Mode::Sampled];

pub(super) fn measure_service(leaktrace: &Path, pairs: u64, rounds: u32) -> anyhow::Result<()> {
    let source = workspace_root().join("xtask/bench/service_loop.c");
    let workload = compile_c(&source, "service_loop", &C_FLAGS)?;
    let tools = Tools { leaktrace, bpftrace: None, link_floor: None };
    println!();
    println!(
        "service-shaped workload (xtask/bench/service_loop.c): {pairs} pairs a thread ({SAMPLED_RUN_FACTOR}x as many under -s 10), {rounds} rounds, median ns per pair"
    );
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>14} {:>16}",
        "threads", "untraced", "floor", "leaktrace", "-s 10", "traced/floor", "-s 10 / floor*"
    );
    for threads in [1u32, 2] {
        let args = [pairs.to_string(), threads.to_string()];
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
        let mut paired = Vec::new();
        for round in 1..=rounds {
            for (index, &mode) in MODES.iter().enumerate() {
                let ns = timed_run(mode, &tools, threads, &workload, &args).with_context(|| {
                    format!("service {} run ({threads} threads, round {round}) failed", mode.name())
                })?;
                samples[index].push(ns);
            }
            paired.push(samples[2][samples[2].len() - 1] / samples[1][samples[1].len() - 1]);
        }
        let medians: Vec<f64> = samples.iter_mut().map(|s| Summary::of(s).median).collect();
        let added = |index: usize| medians[index] - medians[0];
        println!(
            "{threads:<8} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>13.2}x {:>15.2}",
            medians[0],
            medians[1],
            medians[2],
            medians[3],
            Summary::of(&mut paired).median,
            added(3) / added(1)
        );
    }
    println!(
        "traced/floor: paired within rounds; *: -s 10's added cost over the floor's added cost (the trap-skipping target is 0.5)"
    );
    Ok(())
}
