//! The system mode (no `-p`): where the machine's memory goes (meminfo, the
//! slab caches, the processes that grow) and the kernel's allocations
//! outstanding by stack, weighed into one verdict for the machine.

use std::{collections::HashMap, time::Instant};

use aya::Ebpf;
use leaktrace_report::{
    Finding, ProcessReport, RecordKind, Report, SlabReport, SystemReport, Totals, Trend, Verdict,
    VerdictKind, SCHEMA,
};

use super::{
    growth::History,
    kernel::{kernel_losses, KernelAnalyzer},
    verdict::REPORTS_FOR_TREND,
};
use crate::{
    collect::read_lost,
    proc::system::{meminfo, processes, slab_reclaimable, slabinfo},
};

/// Changes below these are noise: meminfo figures and slab caches (a page
/// or two of objects), and a process's memory.
const MEMINFO_TOLERANCE: f64 = (256 << 10) as f64;
const SLAB_TOLERANCE: f64 = 8192.0;
const PROCESS_TOLERANCE: f64 = (64 << 10) as f64;
/// A process growing slower than this is not named in the verdict.
const MIN_PROCESS_RATE: f64 = (32 << 10) as f64;
/// Slab caches and processes shown.
const SHOWN: usize = 10;
/// Processes the verdict names at most.
const NAMED_PROCESSES: usize = 3;

pub struct SystemAnalyzer {
    kernel: KernelAnalyzer,
    started: Instant,
    reports: usize,
    own_pid: u32,
    older_ms: u64,
    sample_rate: u64,
    meminfo_start: HashMap<&'static str, u64>,
    meminfo: History<&'static str>,
    slab_ids: HashMap<String, u32>,
    slab_start: HashMap<u32, u64>,
    slabs: History<u32>,
    process_start: HashMap<u32, (u64, u64)>,
    processes: History<u32>,
}

impl SystemAnalyzer {
    pub fn new(kernel: KernelAnalyzer, older_ms: u64, sample_rate: u64) -> Self {
        Self {
            kernel,
            started: Instant::now(),
            reports: 0,
            own_pid: std::process::id(),
            older_ms,
            sample_rate,
            meminfo_start: HashMap::new(),
            meminfo: History::new(MEMINFO_TOLERANCE),
            slab_ids: HashMap::new(),
            slab_start: HashMap::new(),
            slabs: History::new(SLAB_TOLERANCE),
            process_start: HashMap::new(),
            processes: History::new(PROCESS_TOLERANCE),
        }
    }

    /// Take the starting picture (the deltas are since now).
    pub fn baseline(&mut self) -> anyhow::Result<()> {
        self.picture(0.0).map(|_| ())
    }

    pub fn report(&mut self, ebpf: &Ebpf, is_final: bool) -> anyhow::Result<Report> {
        self.reports += 1;
        let t = self.started.elapsed().as_secs_f64();
        let mut system = self.picture(t)?;
        let kernel = self.kernel.analyze(ebpf, t, None, true)?;
        let kernel_bytes: HashMap<u32, u64> = kernel.per_process.iter().copied().collect();
        for process in &mut system.processes {
            process.kernel_bytes = kernel_bytes.get(&process.pid).copied().unwrap_or(0);
        }
        let lost = read_lost(ebpf)?;

        let mut findings = Vec::new();
        findings.extend(kernel.finding.clone());
        let mut growing: Vec<&ProcessReport> = system
            .processes
            .iter()
            .filter(|p| p.trend == Trend::Growing && p.uss_per_second >= MIN_PROCESS_RATE)
            .collect();
        growing.sort_by(|a, b| b.uss_per_second.total_cmp(&a.uss_per_second));
        findings.extend(growing.iter().take(NAMED_PROCESSES).map(|p| Finding::ProcessGrowth {
            pid: p.pid,
            comm: p.comm.clone(),
            uss_per_second: p.uss_per_second,
        }));
        let dropped = kernel_losses(&lost);
        if dropped > 0 {
            findings.push(Finding::Incomplete { lost: dropped });
        } else if findings.is_empty() {
            let outstanding = kernel.summary.bytes;
            findings.push(if self.reports < REPORTS_FOR_TREND {
                Finding::NoLeakYet { outstanding, reports_needed: REPORTS_FOR_TREND }
            } else {
                Finding::NoGrowth { kernel_outstanding: outstanding }
            });
        }
        // A sample that shows no kernel leak is not the whole story, as in
        // -p: a leak of a few objects a report may fall between samples.
        if self.sample_rate > 1 && !findings.iter().any(|f| f.kind() == VerdictKind::KernelLeak) {
            findings.push(Finding::Sampled { rate: self.sample_rate });
        }
        Ok(Report {
            kind: RecordKind::Report,
            schema: SCHEMA,
            is_final,
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            pid: 0,
            pid_in_namespace: None,
            exited: false,
            exec: None,
            ended: None,
            older_ms: self.older_ms,
            totals: Totals { bytes: kernel.summary.bytes, allocations: kernel.summary.allocations },
            stack_count: kernel.summary.stack_count,
            stacks: kernel.stacks,
            lost: lost.into_iter().collect(),
            threads: None,
            memory: None,
            verdict: Some(Verdict::new(findings)),
            freed_before_attach: None,
            probed: Vec::new(),
            mappings: Vec::new(),
            sample_rate: self.sample_rate,
            sampling: None,
            system: Some(system),
            kernel: Some(kernel.summary),
            fds: None,
            push: None,
            diff: None,
        })
    }

    /// meminfo, the slab caches and the processes at `t`, with their
    /// change since the first picture.
    fn picture(&mut self, t: f64) -> anyhow::Result<SystemReport> {
        let figures = meminfo()?;
        self.meminfo.record(t, figures.iter().map(|&(name, value)| (name, value as f64)));
        let mut system = SystemReport::default();
        for &(name, value) in &figures {
            let start = *self.meminfo_start.entry(name).or_insert(value);
            system.meminfo.insert(name.to_string(), value as i64);
            system.meminfo.insert(format!("{name}_delta"), value as i64 - start as i64);
            let trend = self.meminfo.growth(name).map_or(Trend::New, |growth| growth.trend);
            system.meminfo_trends.insert(name.to_string(), trend);
        }

        let slabs = slabinfo()?;
        let mut ids = Vec::with_capacity(slabs.len());
        for slab in &slabs {
            let next = self.slab_ids.len() as u32;
            let id = *self.slab_ids.entry(slab.name.clone()).or_insert(next);
            self.slab_start.entry(id).or_insert(slab.bytes);
            ids.push(id);
        }
        self.slabs.record(t, ids.iter().zip(&slabs).map(|(&id, slab)| (id, slab.bytes as f64)));
        let mut slab_reports: Vec<SlabReport> = ids
            .iter()
            .zip(&slabs)
            .map(|(&id, slab)| {
                let growth = self.slabs.growth(id);
                SlabReport {
                    name: slab.name.clone(),
                    bytes: slab.bytes,
                    delta: slab.bytes as i64 - self.slab_start[&id] as i64,
                    trend: growth.map_or(Trend::New, |growth| growth.trend),
                    bytes_per_second: growth.map_or(0.0, |growth| growth.bytes_per_second),
                    reclaimable: false,
                }
            })
            .collect();
        slab_reports.sort_by(|a, b| {
            let growing = |slab: &SlabReport| slab.trend == Trend::Growing;
            growing(b).cmp(&growing(a)).then(b.delta.cmp(&a.delta)).then(a.name.cmp(&b.name))
        });
        slab_reports.truncate(SHOWN);
        for slab in &mut slab_reports {
            slab.reclaimable = slab_reclaimable(&slab.name);
        }
        system.slabs = slab_reports;

        let all = processes()?;
        let own = self.own_pid;
        let all: Vec<_> = all.into_iter().filter(|process| process.pid != own).collect();
        for process in &all {
            self.kernel.comms().remember(process.pid, &process.comm);
            self.process_start.entry(process.pid).or_insert((process.rss, process.uss));
        }
        self.processes.record(t, all.iter().map(|process| (process.pid, process.uss as f64)));
        let mut process_reports: Vec<ProcessReport> = all
            .iter()
            .map(|process| {
                let (rss_start, uss_start) = self.process_start[&process.pid];
                let growth = self.processes.growth(process.pid);
                ProcessReport {
                    pid: process.pid,
                    comm: process.comm.clone(),
                    rss: process.rss,
                    uss: process.uss,
                    rss_delta: process.rss as i64 - rss_start as i64,
                    uss_delta: process.uss as i64 - uss_start as i64,
                    trend: growth.map_or(Trend::New, |growth| growth.trend),
                    uss_per_second: growth.map_or(0.0, |growth| growth.bytes_per_second),
                    kernel_bytes: 0,
                }
            })
            .collect();
        process_reports.sort_by(|a, b| {
            let growing = |p: &ProcessReport| p.trend == Trend::Growing;
            growing(b).cmp(&growing(a)).then(b.uss_delta.cmp(&a.uss_delta)).then(a.pid.cmp(&b.pid))
        });
        process_reports.truncate(SHOWN);
        system.processes = process_reports;
        Ok(system)
    }
}
