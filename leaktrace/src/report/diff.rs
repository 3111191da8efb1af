//! `leaktrace diff` in text: each stack's change between two runs.

use std::io::{self, Write};

use leaktrace_report::{DiffInputs, Report};

use super::{text::frame_line, units::human_bytes_signed};

/// `leaktrace diff`: each stack's change, the greatest growth first.
pub fn write_diff(report: &Report, diff: &DiffInputs, out: &mut impl Write) -> io::Result<()> {
    let (bytes, allocations) = report
        .stacks
        .iter()
        .filter_map(|stack| stack.delta)
        .fold((0i64, 0i64), |(bytes, allocations), delta| {
            (bytes + delta.bytes, allocations + delta.allocations)
        });
    writeln!(
        out,
        "Diff of {} ({}) and {} ({}): {} stacks shown, {} ({allocations:+} allocations) in all",
        diff.before,
        diff.before_time,
        diff.after,
        diff.after_time,
        report.stacks.len(),
        human_bytes_signed(bytes),
    )?;
    for stack in &report.stacks {
        let Some(delta) = stack.delta else { continue };
        writeln!(
            out,
            "\t{:+} bytes ({:+} allocations): {} -> {} bytes from {}",
            delta.bytes,
            delta.allocations,
            delta.bytes_before,
            stack.bytes,
            if stack.kind.is_some() { "kernel stack" } else { "stack" }
        )?;
        for frame in &stack.frames {
            writeln!(out, "\t\t{}", frame_line(frame))?;
        }
    }
    writeln!(out)?;
    out.flush()
}
