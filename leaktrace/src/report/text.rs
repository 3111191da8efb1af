//! The text report, in the shape bcc memleak users know, and the verdict's
//! findings as one sentence.

use std::io::{self, Write};

use leaktrace_report::{
    short_module, Ended, Finding, Frame, Growth, Lost, Report, Sampling, StackEnd, ThreadFinding,
    ThreadsReport, Trend, VerdictKind,
};

use super::{memory::write_memory, system::write_system, units::human_bytes};

pub fn write_text(report: &Report, out: &mut impl Write) -> io::Result<()> {
    // "2026-11-22T06:41:02Z" -> "06:41:02"
    let clock = report.time.get(11..19).unwrap_or(&report.time);
    let pid = match report.pid_in_namespace {
        Some(inner) => format!("{} (pid {inner} in its namespace)", report.pid),
        None => report.pid.to_string(),
    };
    if let Some(diff) = &report.diff {
        return super::diff::write_diff(report, diff, out);
    }
    if report.system.is_some() {
        writeln!(
            out,
            "[{clock}] Top {} of {} kernel stacks with outstanding allocations older than {} ms, machine-wide: {} in {} allocations",
            report.stacks.len(),
            report.stack_count,
            report.older_ms,
            human_bytes(report.totals.bytes),
            report.totals.allocations,
        )?;
    } else {
        // Once the target has exited, all it held counts, however young.
        let age = if report.exited {
            "held at exit".to_string()
        } else {
            format!("older than {} ms", report.older_ms)
        };
        writeln!(
            out,
            "[{clock}] Top {} of {} stacks with outstanding allocations {age} in pid {pid}: {} in {} allocations",
            report.stacks.iter().filter(|stack| stack.kind.is_none()).count(),
            report.stack_count,
            human_bytes(report.totals.bytes),
            report.totals.allocations,
        )?;
    }
    if let Some(kernel) = &report.kernel {
        super::system::write_kernel_summary(report, kernel, out)?;
    }
    if let Some(exec) = &report.exec {
        writeln!(
            out,
            "\tThe target exec'd {} {:.1} s after attach: what its old image held was dropped; this is the new one's.",
            exec.program, exec.after_seconds
        )?;
    }
    match (report.sample_rate, report.sampling) {
        (1, _) => {}
        (rate, Some(Sampling::Windows)) => writeln!(
            out,
            "\tSampled: allocations traced one time window in {rate}; bytes, counts and rates are scaled estimates, and an allocation made only between windows is not seen."
        )?,
        (rate, _) if report.system.is_some() => writeln!(
            out,
            "\tSampled: 1 kernel allocation in {rate} tracked, chosen by address; bytes and counts are scaled estimates."
        )?,
        (rate, _) => writeln!(
            out,
            "\tSampled: 1 heap allocation in {rate} tracked; bytes and counts are scaled estimates."
        )?,
    }
    for stack in &report.stacks {
        let growth = match stack.growth {
            Some(Growth { trend: Trend::New, .. }) | None => String::new(),
            Some(Growth { trend: Trend::Growing, bytes_per_second }) => {
                format!(" (growing, +{}/s)", human_bytes(bytes_per_second.max(0.0) as u64))
            }
            Some(growth) => format!(" ({})", growth.trend.as_str()),
        };
        let from = match (stack.kind, &stack.cache) {
            (Some(kind), Some(cache)) => format!("kernel stack ({} {cache})", kind.name()),
            (Some(kind), None) => format!("kernel stack ({})", kind.name()),
            (None, _) => match stack.api {
                Some(api) => format!("stack ({})", api.as_str()),
                None => "stack".to_string(),
            },
        };
        writeln!(
            out,
            "\t{} bytes in {} allocations from {from}{growth}",
            stack.bytes, stack.allocations
        )?;
        for frame in &stack.frames {
            writeln!(out, "\t\t{}", frame_line(frame))?;
        }
        if !stack.processes.is_empty() {
            let processes: Vec<String> = stack
                .processes
                .iter()
                .map(|p| format!("pid {} ({}) {}", p.pid, p.comm, human_bytes(p.bytes)))
                .collect();
            writeln!(out, "\t\tallocated by {}", processes.join(", "))?;
        }
        if let Some(note) = stack_end_note(stack.stack_end) {
            writeln!(out, "\t\t{note}")?;
        }
        for alloc in &stack.allocs {
            writeln!(
                out,
                "\t\t\taddr = {:#x} size = {} age = {} ms",
                alloc.address, alloc.size, alloc.age_ms
            )?;
        }
        let listed = stack.allocs.len() as u64;
        if listed > 0 && stack.allocations > listed {
            writeln!(out, "\t\t\t... and {} more", stack.allocations - listed)?;
        }
    }
    if let Some(threads) = &report.threads {
        write_threads(threads, out)?;
    }
    if let Some(memory) = &report.memory {
        write_memory(&memory.picture, &memory.since_attach, out)?;
    }
    if let Some(fds) = &report.fds {
        writeln!(
            out,
            "\tOpen fds: {} ({:+} since attach, {}, {:+.1}/s)",
            fds.count,
            fds.delta,
            fds.trend.as_str(),
            fds.per_second
        )?;
    }
    if let Some(system) = &report.system {
        write_system(system, out)?;
    }
    if let Some(freed) = &report.freed_before_attach {
        let (bytes, rate) = match (freed.bytes, freed.bytes_per_second) {
            (Some(bytes), Some(rate)) => (
                format!(" ({})", human_bytes(bytes)),
                format!(" ({}/s)", human_bytes(rate.max(0.0) as u64)),
            ),
            _ => (String::new(), String::new()),
        };
        writeln!(
            out,
            "\tAllocated before attach and freed since: {} blocks{bytes}, {:.0} a second{rate}.",
            freed.count, freed.count_per_second
        )?;
        if freed.allocator_frees > 0 {
            writeln!(
                out,
                "\tFreed by the allocator itself, never seen allocated (thread caches emptied as threads exit): {} blocks, not counted above.",
                freed.allocator_frees
            )?;
        }
    }
    // Stacks cut short lose frames, not bytes: said apart.
    let is_cut = |reason: Lost| {
        matches!(reason, Lost::UnwindNoInfo | Lost::UnwindFailed | Lost::UnwindDepth)
    };
    let counts = |cut: bool| -> (u64, String) {
        let counted: Vec<(Lost, u64)> = report
            .lost
            .iter()
            .filter(|(reason, n)| is_cut(**reason) == cut && **n > 0)
            .map(|(reason, n)| (*reason, *n))
            .collect();
        let total = counted.iter().map(|(_, n)| n).sum();
        let reasons: Vec<String> =
            counted.iter().map(|(reason, n)| format!("{}: {n}", reason.name())).collect();
        (total, reasons.join(", "))
    };
    let (lost, reasons) = counts(false);
    if lost == 0 {
        writeln!(out, "\tNo events lost.")?;
    } else {
        writeln!(
            out,
            "\tWARNING: {lost} events lost ({reasons}); the figures above may be off (see --max-allocations, --max-stacks, --max-kernel-allocations)."
        )?;
    }
    let (cut, reasons) = counts(true);
    if cut > 0 {
        writeln!(
            out,
            "\t{cut} stack walks were cut short ({reasons}): their bytes are counted, the frames past the cut are missing."
        )?;
    }
    if report.exited {
        let how = match &report.ended {
            Some(Ended::Exited { code }) => format!("exited with status {code}"),
            Some(Ended::Killed { signal, name, core_dumped }) => format!(
                "was killed by signal {signal} ({name}){}",
                if *core_dumped { ", core dumped" } else { "" }
            ),
            None => "exited".to_string(),
        };
        writeln!(out, "\tThe target (pid {}) {how}; this is the final report.", report.pid)?;
    }
    if let Some(verdict) = &report.verdict {
        // A report read back from an older leaktrace has the text alone.
        let text = if verdict.findings.is_empty() {
            verdict.text.clone()
        } else {
            verdict_text(&verdict.findings)
        };
        writeln!(out, "\tVerdict: {text}")?;
    }
    writeln!(out)?;
    out.flush()
}

fn write_threads(threads: &ThreadsReport, out: &mut impl Write) -> io::Result<()> {
    let before = &threads.before_attach;
    let before = if before.alive > 0 {
        format!(
            "; {} alive from before attach ({} of stacks, creating site unknown)",
            before.alive,
            human_bytes(before.stack_bytes)
        )
    } else {
        String::new()
    };
    if threads.sites.is_empty() {
        return writeln!(
            out,
            "\tThreads: {} live{before}, none created since attach.",
            threads.live
        );
    }
    writeln!(
        out,
        "\tThreads: {} live{before}; created since attach at {} call sites:",
        threads.live,
        threads.sites.len()
    )?;
    for site in &threads.sites {
        writeln!(
            out,
            "\t  {} created: {} alive, {} exited but not joined, {} joined, {} detached; {} of stacks held ({}), from",
            site.counts.created,
            site.counts.alive,
            site.counts.exited_unjoined,
            site.counts.joined,
            site.counts.detached,
            human_bytes(site.counts.stack_bytes),
            site.trend.as_str()
        )?;
        for frame in &site.frames {
            writeln!(out, "\t\t{}", frame_line(frame))?;
        }
        if let Some(note) = stack_end_note(site.stack_end) {
            writeln!(out, "\t\t{note}")?;
        }
    }
    Ok(())
}

/// The line the text report adds under a stack that ends early.
fn stack_end_note(end: StackEnd) -> Option<&'static str> {
    match end {
        StackEnd::Complete => None,
        StackEnd::NoInfo => Some("(stack cut here: no unwind information past this frame)"),
        StackEnd::Failed => Some("(stack cut here: this frame could not be unwound)"),
        StackEnd::Depth => Some("(stack cut here: deeper than 128 frames)"),
        StackEnd::Unavailable => Some("(no stack)"),
    }
}

/// `func+0x1d (file.c:12) [module]`, or `[module]+0x1234` when unknown.
pub(super) fn frame_line(frame: &Frame) -> String {
    let module = frame.module.as_deref().map(short_module);
    let mut line = match (&frame.symbol, frame.inlined) {
        (Some(symbol), true) => format!("{symbol} [inlined]"),
        (Some(symbol), false) => match frame.offset {
            Some(offset) => format!("{symbol}+{offset:#x}"),
            None => symbol.clone(),
        },
        (None, _) => return frame.name(),
    };
    if let Some(file) = &frame.file {
        match frame.line {
            Some(n) => line.push_str(&format!(" ({file}:{n})")),
            None => line.push_str(&format!(" ({file})")),
        }
    }
    match (module, frame.inlined) {
        // "[kernel]" is bracketed already.
        (Some(module), false) if module.starts_with('[') => line.push_str(&format!(" {module}")),
        (Some(module), false) => line.push_str(&format!(" [{module}]")),
        _ => {}
    }
    line
}

/// The verdict's findings as the sentence that ends a report.
pub fn verdict_text(findings: &[Finding]) -> String {
    let statements: Vec<String> = findings.iter().map(finding_text).collect();
    statements.join("; ")
}

fn finding_text(finding: &Finding) -> String {
    match finding {
        Finding::Leak { sites, bytes_per_second, top } => {
            let noun = if *sites == 1 { "call site" } else { "call sites" };
            format!(
                "leak: {sites} {noun} growing, {}/s in total, top: {top}",
                human_bytes(bytes_per_second.max(0.0) as u64)
            )
        }
        Finding::ThreadLeak { unjoined, piling_up } => {
            let part = |finding: &ThreadFinding, what: &str| {
                format!(
                    "{} threads {what}, created at {}, {} of stacks",
                    finding.threads,
                    finding.site,
                    human_bytes(finding.stack_bytes)
                )
            };
            let parts: Vec<String> = [
                unjoined.as_ref().map(|f| part(f, "exited but never joined")),
                piling_up.as_ref().map(|f| part(f, "alive and piling up")),
            ]
            .into_iter()
            .flatten()
            .collect();
            format!("thread leak: {}", parts.join(", and "))
        }
        Finding::Retention { live_bytes, heap_rss } => format!(
            "allocator retention: {} live in malloc, {} heap RSS and rising while live bytes are flat; \
             glibc arenas keep freed memory; try malloc_trim(0), MALLOC_ARENA_MAX, or jemalloc/tcmalloc",
            human_bytes(*live_bytes),
            human_bytes(*heap_rss)
        ),
        Finding::Replacing { sites, count_per_second, bytes_per_second, top } => {
            let freed = match bytes_per_second {
                Some(bytes) => format!(
                    "{}/s of it freed ({count_per_second:.0} blocks/s)",
                    human_bytes(bytes.max(0.0) as u64)
                ),
                None => format!("{count_per_second:.0} blocks/s of it freed"),
            };
            let noun = if *sites == 1 { "call site grows" } else { "call sites grow" };
            let evidence = top.as_ref().map_or(String::new(), |top| {
                let mut why = Vec::new();
                if let Some(rate) = top.evidence.same_size_frees_per_second {
                    why.push(format!("{rate:.0} frees/s of blocks of its size"));
                }
                if let Some(function) = &top.evidence.freed_in {
                    why.push(format!("sampled frees in {function}"));
                }
                format!(" ({}: {})", top.label, why.join(", "))
            });
            format!(
                "still replacing memory allocated before attach: {freed}; {sites} {noun} at that pace{evidence}, \
                 not called a leak until the replacement ends"
            )
        }
        Finding::Growth { bytes_per_second } => format!(
            "live memory grows {}/s with no one call site growing steadily: not judged yet \
             (the call sites above show where it is held)",
            human_bytes(bytes_per_second.max(0.0) as u64)
        ),
        Finding::Incomplete { lost } => format!(
            "incomplete: {lost} events were lost, so a leak may be missed \
             (see the lost counters; raise --max-allocations or --max-stacks, \
             or --max-kernel-allocations for kernel allocations)"
        ),
        Finding::InUseAtExit { bytes, blocks, sites, top } => {
            let noun = if *sites == 1 { "call site" } else { "call sites" };
            format!(
                "in use at exit: {} in {blocks} blocks never freed, at {sites} {noun}, most at {top}",
                human_bytes(*bytes)
            )
        }
        Finding::NoLeakYet { outstanding, reports_needed } => format!(
            "no leak seen yet: a trend needs {reports_needed} reports of settled memory ({} outstanding)",
            human_bytes(*outstanding)
        ),
        Finding::Sampled { rate } => format!(
            "sampled 1 in {rate}: a leak of fewer than ~{rate} allocations a report may not show \
             (run without -s to be sure)"
        ),
        Finding::NoLeak { outstanding } => {
            format!("no leak: live memory flat ({} outstanding)", human_bytes(*outstanding))
        }
        Finding::KernelLeak {
            stacks,
            bytes_per_second,
            kind,
            cache,
            site,
            user_site,
            pid,
            comm,
            kept_share,
        } => {
            let what = match cache {
                Some(cache) => format!("{} {cache}", kind.name()),
                None => kind.name().to_string(),
            };
            let mut text = format!(
                "kernel: {what} +{}/s, allocated in {site}",
                human_bytes(bytes_per_second.max(0.0) as u64)
            );
            if let (Some(pid), Some(comm)) = (pid, comm) {
                text.push_str(&format!(" by pid {pid} ({comm})"));
            }
            if let Some(user_site) = user_site {
                text.push_str(&format!(", called from {user_site}"));
            }
            if *stacks > 1 {
                text.push_str(&format!(" ({stacks} kernel stacks growing)"));
            }
            if finding.kind() == VerdictKind::KernelGrowth {
                text = match kept_share {
                    Some(share) => format!(
                        "{text}; it keeps {:.1}% of what it allocates: frees running late \
                         (RCU) or a leak of a few of its objects, not judged yet",
                        share * 100.0
                    ),
                    None => format!(
                        "{text}; how much of what it allocates it keeps is not known yet: \
                         not judged yet"
                    ),
                };
            }
            text
        }
        Finding::ProcessGrowth { pid, comm, uss_per_second } => format!(
            "process {pid} ({comm}): USS +{}/s; run `leaktrace -p {pid}`",
            human_bytes(uss_per_second.max(0.0) as u64)
        ),
        Finding::NoGrowth { kernel_outstanding } => format!(
            "no growth: the kernel's allocations and every process's memory are flat \
             ({} of kernel memory outstanding)",
            human_bytes(*kernel_outstanding)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(symbol: Option<&str>, inlined: bool) -> Frame {
        Frame {
            address: 0x1234,
            symbol: symbol.map(String::from),
            offset: Some(0x1d),
            file: Some("app.c".into()),
            line: Some(12),
            module: Some("/usr/bin/app".into()),
            inlined,
            mangled: None,
        }
    }

    /// Check the frame line shapes: known, inlined and unknown.
    #[test]
    fn frame_lines() {
        assert_eq!(frame_line(&frame(Some("leak"), false)), "leak+0x1d (app.c:12) [app]");
        assert_eq!(frame_line(&frame(Some("helper"), true)), "helper [inlined] (app.c:12)");
        assert_eq!(frame_line(&frame(None, false)), "[app]+0x1d");
    }

    /// Check the verdict's sentences, one finding at a time and together.
    #[test]
    fn verdict_sentences() {
        let leak =
            Finding::Leak { sites: 2, bytes_per_second: 10240.0, top: "fib (app.c:12)".into() };
        assert_eq!(
            verdict_text(std::slice::from_ref(&leak)),
            "leak: 2 call sites growing, 10.0 KiB/s in total, top: fib (app.c:12)"
        );
        let threads = Finding::ThreadLeak {
            unjoined: Some(ThreadFinding {
                threads: 12,
                site: "spawn_worker (server.c:88)".into(),
                stack_bytes: 96 << 20,
            }),
            piling_up: Some(ThreadFinding { threads: 5, site: "t".into(), stack_bytes: 40 << 20 }),
        };
        let text = verdict_text(&[leak, threads]);
        assert!(
            text.contains("; thread leak: 12 threads exited but never joined, created at spawn_worker (server.c:88), 96.0 MiB"),
            "{text}"
        );
        assert!(
            text.ends_with(", and 5 threads alive and piling up, created at t, 40.0 MiB of stacks"),
            "{text}"
        );
        let retention = Finding::Retention { live_bytes: 2 << 20, heap_rss: 180 << 20 };
        assert!(verdict_text(&[retention])
            .starts_with("allocator retention: 2.0 MiB live in malloc, 180.0 MiB heap RSS"),);
        assert_eq!(
            verdict_text(&[Finding::NoLeak { outstanding: 4096 }]),
            "no leak: live memory flat (4.0 KiB outstanding)"
        );
        assert!(verdict_text(&[Finding::NoLeakYet { outstanding: 4096, reports_needed: 3 }])
            .starts_with("no leak seen yet"));
    }
}
