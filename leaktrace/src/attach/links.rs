//! Every link leaktrace makes (uprobes, tracepoints), owned here rather
//! than by the programs: detached in one place, before the programs and
//! maps go, and timed. The kernel waits out a grace period as each
//! perf-event uprobe goes (about 80 ms here): ~40 take 3 s. Dropping them
//! from a thread each does not help (measured: 3.2 s either way): the
//! kernel serializes the waits. Only a multi-uprobe link, one detach for
//! all, would.

use aya::programs::{trace_point::TracePointLink, uprobe::UProbeLink};

#[derive(Default)]
pub struct Links {
    uprobes: Vec<UProbeLink>,
    tracepoints: Vec<TracePointLink>,
}

impl Links {
    pub fn add_uprobe(&mut self, link: UProbeLink) {
        self.uprobes.push(link);
    }

    pub fn add_tracepoint(&mut self, link: TracePointLink) {
        self.tracepoints.push(link);
    }

    /// Detach every link; returns once all are gone.
    pub fn detach_all(&mut self) {
        self.uprobes.clear();
        self.tracepoints.clear();
    }

    pub fn len(&self) -> usize {
        self.uprobes.len() + self.tracepoints.len()
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.detach_all();
    }
}
