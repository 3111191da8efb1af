//! The reports: the text shape bcc memleak users know, and JSON Lines for
//! scripts. The JSON field names are a contract: add fields, never rename.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    time::SystemTime,
};

use serde::Serialize;

use crate::{collector::Snapshot, symbolizer::Frame};

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
    pub frames: Vec<FrameReport>,
}

#[derive(Debug, Serialize)]
pub struct FrameReport {
    pub address: String,
    pub symbol: Option<String>,
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub inlined: bool,
}

impl From<&Frame> for FrameReport {
    fn from(frame: &Frame) -> Self {
        Self {
            address: format!("{:#x}", frame.address),
            symbol: frame.symbol.clone(),
            offset: frame.offset,
            file: frame.file.clone(),
            line: frame.line,
            module: frame.module.clone(),
            inlined: frame.inlined,
        }
    }
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
            lost: snapshot
                .lost
                .iter()
                .map(|&(reason, count)| (reason.name(), count))
                .collect(),
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
        for stack in &self.stacks {
            writeln!(
                out,
                "\t{} bytes in {} allocations from stack",
                stack.bytes, stack.allocations
            )?;
            for frame in &stack.frames {
                writeln!(out, "\t\t{}", frame_line(frame))?;
            }
        }
        let lost: u64 = self.lost.values().sum();
        if lost == 0 {
            writeln!(out, "\tNo events lost.")?;
        } else {
            let reasons: Vec<String> = self
                .lost
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(name, n)| format!("{name}: {n}"))
                .collect();
            writeln!(
                out,
                "\tWARNING: {lost} events lost ({}); the figures above may be off (see --max-allocations, --max-stacks).",
                reasons.join(", ")
            )?;
        }
        if self.exited {
            writeln!(out, "\tThe target (pid {}) exited; this is the final report.", self.pid)?;
        }
        writeln!(out)?;
        out.flush()
    }
}

/// `func+0x1d (file.c:12) [module]`, or `[module]+0x1234` when unknown.
fn frame_line(frame: &FrameReport) -> String {
    let module = frame.module.as_deref().map(short_module);
    let mut line = match (&frame.symbol, frame.inlined) {
        (Some(symbol), true) => format!("{symbol} [inlined]"),
        (Some(symbol), false) => match frame.offset {
            Some(offset) => format!("{symbol}+{offset:#x}"),
            None => symbol.clone(),
        },
        (None, _) => match (module, frame.offset) {
            (Some(module), Some(offset)) => return format!("[{module}]+{offset:#x}"),
            _ => return frame.address.clone(),
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

/// Bytes with a binary unit: "12.0 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(symbol: Option<&str>, inlined: bool) -> FrameReport {
        FrameReport {
            address: "0x1234".into(),
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

    /// Check byte formatting.
    #[test]
    fn bytes() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(12 * 1024), "12.0 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
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
