//! Every link leaktrace makes (uprobes, tracepoints), owned here rather
//! than by the programs: detached in one place, before the programs and
//! maps go, and timed.
//!
//! Uprobes go through `uprobe_multi` links where the kernel makes them
//! ([`super::multi`]): one link a program and file, closed all at once so
//! that the kernel's grace periods overlap. Older kernels get aya's
//! perf-event uprobes, one a function, each waiting out its own grace
//! period as it goes (~80 ms here, serialized by the kernel even when
//! dropped from many threads).

use std::{collections::BTreeMap, os::fd::OwnedFd, path::Path};

use anyhow::{anyhow, Context as _};
use aya::{
    programs::{
        trace_point::TracePointLink,
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeScope},
    },
    Ebpf,
};

use super::{multi, uprobes::program};

/// One program at one place of a file, at entry or at return.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Probe {
    pub program: &'static str,
    pub offset: u64,
    pub at_return: bool,
}

#[derive(Default)]
pub struct Links {
    /// The uprobe programs, when the kernel makes multi links.
    multi: Option<multi::MultiPrograms>,
    multi_links: Vec<OwnedFd>,
    uprobes: Vec<UProbeLink>,
    tracepoints: Vec<TracePointLink>,
}

impl Links {
    /// Links whose uprobes run `programs` through multi links.
    pub fn with_multi(programs: multi::MultiPrograms) -> Self {
        let mut links = Self::default();
        links.multi = Some(programs);
        links
    }

    /// Attach `probes` in the file `path` for process `pid` only: the
    /// return probes first, so that a call entered between the two
    /// attaches leaves no entry record that no return takes.
    pub fn attach_uprobes(
        &mut self,
        ebpf: &mut Ebpf,
        path: &Path,
        pid: u32,
        probes: &[Probe],
    ) -> anyhow::Result<()> {
        let mut groups: BTreeMap<(bool, &str), Vec<u64>> = BTreeMap::new();
        for probe in probes {
            groups.entry((!probe.at_return, probe.program)).or_default().push(probe.offset);
        }
        for ((at_entry, name), offsets) in groups {
            let at_return = !at_entry;
            let failed = || format!("failed to attach {name} in {}", path.display());
            match &mut self.multi {
                Some(programs) => {
                    let fd = programs.fd(name)?;
                    let link =
                        multi::attach(fd, path, &offsets, at_return, pid).with_context(failed)?;
                    self.multi_links.push(link);
                }
                None => {
                    let scope = UProbeScope::OneProcess(
                        std::num::NonZeroU32::new(pid)
                            .ok_or_else(|| anyhow!("PID 0 cannot be traced"))?,
                    );
                    let uprobe = program(ebpf, name)?;
                    // Programs no probe needed at start (an exec's new objects).
                    if uprobe.fd().is_err() {
                        uprobe.load().with_context(|| format!("failed to load program {name}"))?;
                    }
                    for offset in offsets {
                        let location = UProbeAttachLocation::AbsoluteOffset(offset);
                        let id = uprobe.attach(location, path, scope).with_context(failed)?;
                        self.uprobes.push(uprobe.take_link(id)?);
                    }
                }
            }
        }
        Ok(())
    }

    pub fn add_tracepoint(&mut self, link: TracePointLink) {
        self.tracepoints.push(link);
    }

    /// The uprobe programs' runs and total time, for those loaded here.
    pub fn program_stats(&self) -> Vec<(&str, u64, u64)> {
        self.multi.as_ref().map(|programs| programs.stats()).unwrap_or_default()
    }

    /// Detach every link; returns once all are gone. The multi links are
    /// closed from a thread each, so that their grace periods overlap.
    pub fn detach_all(&mut self) {
        let closing = std::mem::take(&mut self.multi_links);
        std::thread::scope(|scope| {
            for link in closing {
                let builder = std::thread::Builder::new().name("leaktrace-detach".into());
                // Without a thread, the link goes here, its wait not shared.
                let _ = builder.spawn_scoped(scope, move || drop(link));
            }
            self.uprobes.clear();
            self.tracepoints.clear();
        });
    }

    pub fn len(&self) -> usize {
        self.multi_links.len() + self.uprobes.len() + self.tracepoints.len()
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.detach_all();
    }
}
