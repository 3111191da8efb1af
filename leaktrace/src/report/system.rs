//! The machine's picture in text: meminfo, the slab caches that moved, the
//! processes that grew.

use std::io::{self, Write};

use leaktrace_report::{KernelSummary, Report, SystemReport};

use super::units::{human_bytes, human_bytes_signed};

pub fn write_system(system: &SystemReport, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "\tMachine (since start):")?;
    let figure = |name: &str| -> Option<String> {
        let value = *system.meminfo.get(name)?;
        let delta = system.meminfo.get(&format!("{name}_delta")).copied().unwrap_or(0);
        let trend = system.meminfo_trends.get(name).map_or("new", |trend| trend.as_str());
        Some(format!(
            "{name} {} ({}, {trend})",
            human_bytes(value.max(0) as u64),
            human_bytes_signed(delta)
        ))
    };
    let names = [
        "mem_total",
        "mem_available",
        "anon_pages",
        "shmem",
        "slab_reclaimable",
        "slab_unreclaimable",
        "kernel_stack",
        "page_tables",
        "vmalloc_used",
        "percpu",
    ];
    let figures: Vec<String> = names.iter().filter_map(|name| figure(name)).collect();
    for line in figures.chunks(4) {
        writeln!(out, "\t\t{}", line.join(", "))?;
    }
    if !system.slabs.is_empty() {
        writeln!(out, "\tSlab caches that moved most:")?;
        for slab in &system.slabs {
            let reclaimable = if slab.reclaimable { ", reclaimable" } else { "" };
            writeln!(
                out,
                "\t\t{:<24} {:>10} ({}, {}{reclaimable})",
                slab.name,
                human_bytes(slab.bytes),
                human_bytes_signed(slab.delta),
                slab.trend.as_str()
            )?;
        }
    }
    if !system.processes.is_empty() {
        writeln!(out, "\tProcesses that grew most (USS is resident less shared):")?;
        for process in &system.processes {
            let kernel = if process.kernel_bytes > 0 {
                format!(", {} kernel", human_bytes(process.kernel_bytes))
            } else {
                String::new()
            };
            writeln!(
                out,
                "\t\tpid {:<7} {:<16} USS {:>10} ({}, {}), RSS {:>10}{kernel}",
                process.pid,
                process.comm,
                human_bytes(process.uss),
                human_bytes_signed(process.uss_delta),
                process.trend.as_str(),
                human_bytes(process.rss)
            )?;
        }
    }
    Ok(())
}

/// What kernel allocations were traced, and whether frames are named.
pub fn write_kernel_summary(
    report: &Report,
    kernel: &KernelSummary,
    out: &mut impl Write,
) -> io::Result<()> {
    let whose = if report.system.is_some() { "" } else { " in the target's context" };
    writeln!(
        out,
        "\tKernel memory allocated{whose} since attach, outstanding: {} in {} allocations over {} stacks; frames named from {}.",
        human_bytes(kernel.bytes),
        kernel.allocations,
        kernel.stack_count,
        kernel.symbols
    )?;
    if !kernel.missing_events.is_empty() {
        writeln!(
            out,
            "\tNot traced (this kernel lacks the events): {}.",
            kernel.missing_events.join(", ")
        )?;
    }
    Ok(())
}
