//! The reports: the text shape bcc memleak users know, and JSON Lines for
//! scripts. The JSON field names are a contract: add fields, never rename.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    time::SystemTime,
};

use leaktrace_common::StackEnd;
use serde::Serialize;

use crate::{
    collector::{Snapshot, ThreadSite},
    growth::{Growth, Trend},
    memory::{MemoryDelta, MemoryPicture},
    symbolizer::Frame,
    verdict::Verdict,
};

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub time: String,
    pub pid: u32,
    /// The target exited during tracing.
    pub exited: bool,
    /// Allocations younger than this are left out.
    pub older_ms: u64,
    pub totals: Totals,
    /// Stacks holding memory in all, of which `stacks` shows the top ones.
    pub stack_count: usize,
    pub stacks: Vec<StackReport>,
    pub lost: BTreeMap<&'static str, u64>,
    /// Threads created since attach, per creating call site.
    pub threads: Option<ThreadsReport>,
    /// The process's memory from /proc; absent once it has exited.
    pub memory: Option<MemoryReport>,
    pub verdict: Option<Verdict>,
    /// What was probed in which object.
    pub probed: Vec<ProbedObject>,
    /// One heap allocation in this many was tracked; heap figures are scaled.
    pub sample_rate: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbedObject {
    pub object: String,
    pub functions: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct ThreadsReport {
    /// Threads in the process now.
    pub live: u64,
    pub sites: Vec<ThreadSiteReport>,
}

#[derive(Debug, Serialize)]
pub struct ThreadSiteReport {
    pub frames: Vec<Frame>,
    #[serde(serialize_with = "stack_end_name")]
    pub stack_end: StackEnd,
    #[serde(flatten)]
    pub counts: ThreadSite,
    /// Trend of the threads alive or unjoined.
    pub trend: Trend,
}

#[derive(Debug, Serialize)]
pub struct MemoryReport {
    #[serde(flatten)]
    pub picture: MemoryPicture,
    pub since_attach: MemoryDelta,
}

#[derive(Debug, Serialize)]
pub struct Totals {
    pub bytes: u64,
    pub allocations: u64,
}

#[derive(Debug, Serialize)]
pub struct StackReport {
    pub bytes: u64,
    pub allocations: u64,
    pub frames: Vec<Frame>,
    #[serde(serialize_with = "stack_end_name")]
    pub stack_end: StackEnd,
    pub growth: Option<Growth>,
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

fn stack_end_name<S: serde::Serializer>(end: &StackEnd, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(end.name())
}

impl Report {
    /// A report of `snapshot`, with the frames of its top stacks.
    pub fn new(
        snapshot: &Snapshot,
        stacks: Vec<StackReport>,
        pid: u32,
        older_ms: u64,
        is_final: bool,
        exited: bool,
    ) -> Self {
        Self {
            kind: "report",
            is_final,
            time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            pid,
            exited,
            older_ms,
            totals: Totals {
                bytes: snapshot.total_bytes(),
                allocations: snapshot.total_allocations(),
            },
            stack_count: snapshot.stacks.len(),
            stacks,
            lost: snapshot.lost.iter().map(|&(reason, count)| (reason.name(), count)).collect(),
            threads: None,
            memory: None,
            verdict: None,
            probed: Vec::new(),
            sample_rate: 1,
        }
    }

    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        serde_json::to_writer(&mut *out, self)?;
        writeln!(out)?;
        out.flush()
    }

    pub fn write_text(&self, out: &mut impl Write) -> io::Result<()> {
        // "2026-11-22T06:41:02Z" -> "06:41:02"
        let clock = self.time.get(11..19).unwrap_or(&self.time);
        writeln!(
            out,
            "[{clock}] Top {} of {} stacks with outstanding allocations older than {} ms in pid {}: {} in {} allocations",
            self.stacks.len(),
            self.stack_count,
            self.older_ms,
            self.pid,
            human_bytes(self.totals.bytes),
            self.totals.allocations,
        )?;
        if self.sample_rate > 1 {
            writeln!(
                out,
                "\tSampled: 1 heap allocation in {} tracked; bytes and counts are scaled estimates.",
                self.sample_rate
            )?;
        }
        for stack in &self.stacks {
            let growth = match stack.growth {
                Some(Growth { trend: Trend::New, .. }) | None => String::new(),
                Some(Growth { trend: Trend::Growing, bytes_per_second }) => {
                    format!(" (growing, +{}/s)", human_bytes(bytes_per_second.max(0.0) as u64))
                }
                Some(growth) => format!(" ({})", growth.trend.as_str()),
            };
            writeln!(
                out,
                "\t{} bytes in {} allocations from stack{growth}",
                stack.bytes, stack.allocations
            )?;
            for frame in &stack.frames {
                writeln!(out, "\t\t{}", frame_line(frame))?;
            }
            if let Some(note) = stack_end_note(stack.stack_end) {
                writeln!(out, "\t\t{note}")?;
            }
        }
        if let Some(threads) = &self.threads {
            self.write_threads(threads, out)?;
        }
        if let Some(memory) = &self.memory {
            memory.picture.write_text(&memory.since_attach, out)?;
        }
        // Stacks cut short lose frames, not bytes: said apart.
        let is_cut = |name: &str| name.starts_with("unwind_");
        let counts = |cut: bool| -> (u64, String) {
            let counted: Vec<(&&str, &u64)> =
                self.lost.iter().filter(|(name, n)| is_cut(name) == cut && **n > 0).collect();
            let total = counted.iter().map(|(_, n)| **n).sum();
            let reasons: Vec<String> =
                counted.iter().map(|(name, n)| format!("{name}: {n}")).collect();
            (total, reasons.join(", "))
        };
        let (lost, reasons) = counts(false);
        if lost == 0 {
            writeln!(out, "\tNo events lost.")?;
        } else {
            writeln!(
                out,
                "\tWARNING: {lost} events lost ({reasons}); the figures above may be off (see --max-allocations, --max-stacks)."
            )?;
        }
        let (cut, reasons) = counts(true);
        if cut > 0 {
            writeln!(
                out,
                "\t{cut} stack walks were cut short ({reasons}): their bytes are counted, the frames past the cut are missing."
            )?;
        }
        if self.exited {
            writeln!(out, "\tThe target (pid {}) exited; this is the final report.", self.pid)?;
        }
        if let Some(verdict) = &self.verdict {
            writeln!(out, "\tVerdict: {}", verdict.text)?;
        }
        writeln!(out)?;
        out.flush()
    }

    fn write_threads(&self, threads: &ThreadsReport, out: &mut impl Write) -> io::Result<()> {
        if threads.sites.is_empty() {
            return writeln!(out, "\tThreads: {} live, none created since attach.", threads.live);
        }
        writeln!(
            out,
            "\tThreads: {} live; created since attach at {} call sites:",
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
}

/// `func+0x1d (file.c:12) [module]`, or `[module]+0x1234` when unknown.
fn frame_line(frame: &Frame) -> String {
    let module = frame.module.as_deref().map(short_module);
    let mut line = match (&frame.symbol, frame.inlined) {
        (Some(symbol), true) => format!("{symbol} [inlined]"),
        (Some(symbol), false) => match frame.offset {
            Some(offset) => format!("{symbol}+{offset:#x}"),
            None => symbol.clone(),
        },
        (None, _) => match (module, frame.offset) {
            (Some(module), Some(offset)) => return format!("[{module}]+{offset:#x}"),
            _ => return format!("{:#x}", frame.address),
        },
    };
    if let Some(file) = &frame.file {
        match frame.line {
            Some(n) => line.push_str(&format!(" ({file}:{n})")),
            None => line.push_str(&format!(" ({file})")),
        }
    }
    if let (Some(module), false) = (module, frame.inlined) {
        line.push_str(&format!(" [{module}]"));
    }
    line
}

fn short_module(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

pub use crate::memory::human_bytes;

/// Frames of the language runtime between an allocator and the code that
/// asked for memory: Rust's alloc/core/std helpers (real frames in debug
/// builds) and C++ operator new.
const RUNTIME_PREFIXES: [&str; 8] =
    ["alloc::", "core::", "std::", "<alloc::", "<core::", "<std::", "__rust", "operator new"];

/// Libraries whose frames sit between the allocator and the code that asked
/// (strdup and asprintf in libc, operator new in libstdc++), by file name.
const RUNTIME_LIBRARIES: [&str; 8] = [
    "libc.so",
    "libstdc++.so",
    "libgcc_s.so",
    "ld-linux",
    "libc.musl",
    "libjemalloc.so",
    "libtcmalloc",
    "libmimalloc.so",
];

/// Whether a frame belongs to the language runtime's allocation path.
pub fn is_runtime_frame(frame: &Frame) -> bool {
    let runtime_symbol = frame
        .symbol
        .as_deref()
        .is_some_and(|symbol| RUNTIME_PREFIXES.iter().any(|prefix| symbol.starts_with(prefix)));
    let runtime_library = frame.module.as_deref().is_some_and(|module| {
        let name = short_module(module);
        RUNTIME_LIBRARIES.iter().any(|library| name.starts_with(library))
    });
    runtime_symbol || runtime_library
}

/// "function (file:line)" for a stack's first frame outside the language
/// runtime and the C library (its first frame if all are), for one-line
/// statements.
pub fn frame_label(frames: &[Frame]) -> String {
    let Some(frame) = frames.iter().find(|f| !is_runtime_frame(f)).or(frames.first()) else {
        return "an unknown stack".to_string();
    };
    let name = match &frame.symbol {
        Some(symbol) => symbol.clone(),
        None => frame_line(frame),
    };
    match (&frame.file, frame.line) {
        (Some(file), Some(line)) => format!("{name} ({}:{line})", short_module(file)),
        _ => name,
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
        }
    }

    /// Check the frame line shapes: known, inlined and unknown.
    #[test]
    fn frame_lines() {
        assert_eq!(frame_line(&frame(Some("leak"), false)), "leak+0x1d (app.c:12) [app]");
        assert_eq!(frame_line(&frame(Some("helper"), true)), "helper [inlined] (app.c:12)");
        assert_eq!(frame_line(&frame(None, false)), "[app]+0x1d");
    }

    /// Check the one-line label of a stack.
    #[test]
    fn label() {
        assert_eq!(frame_label(&[frame(Some("leak"), false)]), "leak (app.c:12)");
        assert_eq!(frame_label(&[]), "an unknown stack");
        let runtime = Frame {
            symbol: Some("<alloc::raw_vec::RawVecInner>::finish_grow".into()),
            ..frame(None, false)
        };
        assert_eq!(frame_label(&[runtime, frame(Some("leak"), false)]), "leak (app.c:12)");
        let libc = Frame {
            symbol: Some("__strdup".into()),
            module: Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into()),
            ..frame(None, false)
        };
        assert_eq!(
            frame_label(&[libc.clone(), frame(Some("dup_name"), false)]),
            "dup_name (app.c:12)"
        );
        assert_eq!(frame_label(&[libc]), "__strdup (app.c:12)");
    }

    /// Check that the JSON contract's field names are there.
    #[test]
    fn json_field_names() {
        let report = Report::new(&Snapshot::default(), Vec::new(), 7, 500, true, false);
        let mut out = Vec::new();
        report.write_json(&mut out).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for key in ["type", "final", "time", "pid", "totals", "stacks", "lost"] {
            assert!(value.get(key).is_some(), "{key} missing from {value}");
        }
        assert_eq!(value["type"], "report");
        assert_eq!(value["final"], true);
        assert_eq!(value["totals"]["bytes"], 0);
    }
}
