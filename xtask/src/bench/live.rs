//! The live-set part of the benchmark: what holding a million allocations
//! costs leaktrace (loss, report time, its RSS and idle CPU), read from /proc.

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use leaktrace_report::Report;

use super::*;

/// What leaktrace did with a large live set in an idle target.
pub(super) struct LiveSet {
    pub(super) live: u64,
    /// `totals.allocations` of the final report.
    pub(super) tracked: u64,
    /// The sum of the final report's `lost` counters.
    pub(super) lost: u64,
    /// From SIGINT to the final report's line on stdout.
    pub(super) final_report: Duration,
    /// VmHWM just before SIGINT, and just after the final report (None if
    /// leaktrace was gone by then).
    pub(super) peak_rss_before: u64,
    pub(super) peak_rss_after: Option<u64>,
    /// Kernel memory charged to leaktrace's BPF maps, which RSS does not show.
    pub(super) map_memory: u64,
    /// leaktrace's user+system CPU over the idle window, per wall second.
    pub(super) idle_cpu: f64,
}

impl LiveSet {
    pub(super) fn print(&self) {
        let peak = self.peak_rss_after.unwrap_or(self.peak_rss_before);
        println!(
            "{} live allocations: tracked {} (lost {}), final report in {} ms, leaktrace peak RSS {:.1} MB, idle CPU {:.1}% of a core",
            grouped(self.live),
            grouped(self.tracked),
            grouped(self.lost),
            self.final_report.as_millis(),
            mb(peak),
            self.idle_cpu * 100.0
        );
        let when = match self.peak_rss_after {
            Some(_) => "just after the final report",
            None => "before SIGINT (leaktrace was gone by the final report)",
        };
        println!(
            "  peak RSS: VmHWM read {when} ({:.1} MB before SIGINT); its BPF maps hold another {:.1} MB of kernel memory",
            mb(self.peak_rss_before),
            mb(self.map_memory)
        );
        println!(
            "  final report: SIGINT to its line on stdout, including leaktrace's signal check (every 100 ms); idle CPU: {} s window, a report every {LIVE_INTERVAL} s",
            IDLE_WINDOW.as_secs()
        );
        let off_by = self.tracked.abs_diff(self.live);
        if self.lost > 0 || off_by * 100 > self.live {
            println!(
                "  WARNING: leaktrace lost {} events and tracked {} of {} live allocations",
                grouped(self.lost),
                grouped(self.tracked),
                grouped(self.live)
            );
        }
    }
}

/// Traces live_set under leaktrace: it allocates `live` blocks, keeps them
/// and idles, while leaktrace reports every second.
pub(super) fn measure_live_set(leaktrace: &Path, live: u64) -> anyhow::Result<LiveSet> {
    let source = workspace_root().join("xtask/bench/live_set.c");
    let workload = compile_c(&source, "live_set", &C_FLAGS)?;
    let mut run = Workload::start(&workload, &[live.to_string()])?;
    let mut tracer = Tracer::leaktrace(leaktrace, run.pid, LIVE_INTERVAL, &["--json"])?;
    let pid = tracer.child.0.id();
    run.go()?;
    run.read_value("READY")?;
    eprintln!(
        "xtask: live set: {} blocks allocated; waiting for leaktrace to count them",
        grouped(live)
    );

    // Allocations younger than --older are left out of a report, so wait
    // until two reports in a row count the same: all are counted then (or
    // lost, which the final report says).
    let mut last = None;
    tracer.wait_for("two reports counting the same live set", LIVE_SETTLE_TIMEOUT, |line| {
        if !line.from_stdout {
            return false;
        }
        let Some(count) = report_of(&line.text).map(|report| report.totals.allocations) else {
            return false;
        };
        let steady = count > 0 && last == Some(count);
        last = Some(count);
        steady
    })?;

    eprintln!(
        "xtask: live set: measuring leaktrace's CPU over {} s of idling",
        IDLE_WINDOW.as_secs()
    );
    let cpu_start = (Instant::now(), cpu_ticks(pid)?);
    thread::sleep(IDLE_WINDOW);
    let cpu_end = (Instant::now(), cpu_ticks(pid)?);
    let idle_cpu = (cpu_end.1 - cpu_start.1) as f64
        / clock_ticks_per_second()?
        / (cpu_end.0 - cpu_start.0).as_secs_f64();

    let peak_rss_before = peak_rss(pid)?;
    let map_memory = bpf_map_memory(pid)?;
    let interrupted = tracer.interrupt()?;
    let last_report = tracer.wait_for("its final report", STOP_TIMEOUT, |line| {
        line.from_stdout && report_of(&line.text).is_some_and(|report| report.is_final)
    })?;
    let peak_rss_after = peak_rss(pid).ok();
    let final_report = last_report.at.saturating_duration_since(interrupted);
    tracer.finish()?;
    run.wait()?;

    let text = &last_report.text;
    let report = report_of(text)
        .with_context(|| format!("leaktrace's final report does not read back: {text}"))?;
    let tracked = report.totals.allocations;
    let lost = report.lost.values().sum();
    Ok(LiveSet {
        live,
        tracked,
        lost,
        final_report,
        peak_rss_before,
        peak_rss_after,
        map_memory,
        idle_cpu,
    })
}

/// utime + stime of process `pid`, in clock ticks, from /proc/PID/stat.
pub(super) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("no utime and stime in {path}: {stat:?}"))
}

/// utime + stime from the text of /proc/PID/stat.
pub(super) fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name in field 2 may hold spaces and parentheses; the
    // fields after its closing parenthesis start with field 3, state.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

pub(super) fn clock_ticks_per_second() -> anyhow::Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc_sysconf(SC_CLK_TCK) };
    ensure!(ticks > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(ticks as f64)
}

/// Peak resident set size of process `pid` in bytes (VmHWM).
pub(super) fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("no VmHWM in {path} (has the process exited?)"))
}

/// Kernel memory charged to the BPF maps process `pid` holds open: the
/// `memlock` of every map in /proc/PID/fdinfo.
pub(super) fn bpf_map_memory(pid: u32) -> anyhow::Result<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut total = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("failed to list {dir}"))? {
        let path = entry.with_context(|| format!("failed to list {dir}"))?.path();
        // An fd closed since the listing is no loss: it was no map we count.
        let Ok(info) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += parse_map_memlock(&info).unwrap_or(0);
    }
    Ok(total)
}

/// The `memlock` bytes of an fdinfo text that describes a BPF map.
pub(super) fn parse_map_memlock(fdinfo: &str) -> Option<u64> {
    let field = |name: &str| {
        fdinfo.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
    };
    field("map_id")?;
    field("memlock")?.parse().ok()
}

/// A line of leaktrace's `--json` output read back as the report model.
fn report_of(line: &str) -> Option<Report> {
    line.starts_with('{').then(|| serde_json::from_str(line).ok()).flatten()
}

/// `n` with thousands separators: 1,000,000.
pub(super) fn grouped(mut n: u64) -> String {
    let mut groups = Vec::new();
    while n >= 1000 {
        groups.push(format!("{:03}", n % 1000));
        n /= 1000;
    }
    groups.push(n.to_string());
    groups.reverse();
    groups.join(",")
}

pub(super) fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The running kernel's release, as `uname -r` prints it.
pub(super) fn kernel_release() -> String {
    output_of(Command::new("uname").arg("-r"))
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that a report line reads back as the model, and other lines do not.
    #[test]
    fn report_lines() {
        let line = r#"{"type":"report","final":true,"time":"2026-11-22T06:40:03Z","pid":7,"exited":false,"older_ms":500,"totals":{"bytes":136000000,"allocations":1000000},"stack_count":0,"stacks":[],"lost":{"alloc_map_full":3,"stack_map_full_or_collision":1}}"#;
        let report = report_of(line).expect("a report");
        assert_eq!(report.totals.allocations, 1_000_000);
        assert!(report.is_final);
        assert_eq!(report.lost.values().sum::<u64>(), 4);
        assert!(report_of("leaktrace: attached to pid 7").is_none());
    }

    /// Check that utime and stime are found even when the name holds ") ".
    #[test]
    fn stat_ticks() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 3 0 123 4096 200\n";
        assert_eq!(parse_cpu_ticks(stat), Some(280));
    }

    /// Check that only BPF maps count towards map memory.
    #[test]
    fn map_memlock() {
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nmax_entries:\t1000000\nmemlock:\t88002560\nmap_id:\t42\n";
        let prog = "pos:\t0\nprog_type:\t2\nmemlock:\t4096\nprog_id:\t7\n";
        assert_eq!(parse_map_memlock(map), Some(88_002_560));
        assert_eq!(parse_map_memlock(prog), None);
        assert_eq!(parse_map_memlock("pos:\t0\nflags:\t0100002\n"), None);
    }

    /// Check that large counts get thousands separators.
    #[test]
    fn grouping() {
        assert_eq!(grouped(7), "7");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_000_000), "1,000,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }
}
