//! `leaktrace diff BEFORE.json AFTER.json`: two runs' final reports
//! compared stack by stack. Stacks are matched by their symbolized frames
//! (function, file, line, module, inlined), never by address, so that runs
//! with different address-space layouts match; each gets the bytes and
//! allocations it added or removed, and the greatest growth comes first.

use std::collections::HashMap;

use leaktrace_report::{
    short_module, DiffInputs, Frame, KernelKind, RecordKind, Report, StackDelta, StackReport,
    SCHEMA,
};

/// What makes two stacks the same across runs.
type StackKey =
    (Option<KernelKind>, Option<String>, Vec<(String, Option<String>, Option<u32>, String, bool)>);

fn key(stack: &StackReport) -> StackKey {
    let frames = stack
        .frames
        .iter()
        .map(|frame: &Frame| {
            // An unnamed frame is named by its module and offset, which
            // stay put across runs.
            (
                frame.name(),
                frame.file.clone(),
                frame.line,
                frame.module.as_deref().map(short_module).unwrap_or_default().to_string(),
                frame.inlined,
            )
        })
        .collect();
    (stack.kind, stack.cache.clone(), frames)
}

/// The comparison of `before`'s and `after`'s stacks (`names`: the two
/// files), as a report of `"type": "diff"`: each stack's bytes and
/// allocations are `after`'s, its `delta` the change.
pub fn diff(before: &Report, after: &Report, names: (&str, &str)) -> Report {
    let mut earlier: HashMap<StackKey, &StackReport> =
        before.stacks.iter().map(|stack| (key(stack), stack)).collect();
    let mut stacks: Vec<StackReport> = after
        .stacks
        .iter()
        .map(|stack| {
            let (bytes_before, allocations_before) =
                earlier.remove(&key(stack)).map_or((0, 0), |old| (old.bytes, old.allocations));
            with_delta(stack.clone(), bytes_before, allocations_before)
        })
        .collect();
    // Stacks that held memory before and none after.
    let mut gone: Vec<&StackReport> = earlier.into_values().collect();
    gone.sort_by_key(|stack| std::cmp::Reverse(stack.bytes));
    stacks.extend(gone.into_iter().map(|stack| {
        let emptied = StackReport { bytes: 0, allocations: 0, growth: None, ..stack.clone() };
        with_delta(emptied, stack.bytes, stack.allocations)
    }));
    stacks.sort_by_key(|stack| std::cmp::Reverse(stack.delta.map_or(0, |delta| delta.bytes)));
    Report {
        kind: RecordKind::Diff,
        schema: SCHEMA,
        is_final: true,
        time: after.time.clone(),
        pid: after.pid,
        older_ms: after.older_ms,
        totals: after.totals,
        stack_count: stacks.len(),
        stacks,
        lost: after.lost.clone(),
        sample_rate: after.sample_rate,
        diff: Some(DiffInputs {
            before: names.0.to_string(),
            after: names.1.to_string(),
            before_time: before.time.clone(),
            after_time: after.time.clone(),
        }),
        ..Report::default()
    }
}

fn with_delta(mut stack: StackReport, bytes_before: u64, allocations_before: u64) -> StackReport {
    stack.delta = Some(StackDelta {
        bytes_before,
        allocations_before,
        bytes: stack.bytes as i64 - bytes_before as i64,
        allocations: stack.allocations as i64 - allocations_before as i64,
    });
    stack.allocs.clear();
    stack
}

#[cfg(test)]
mod tests {
    use leaktrace_report::StackEnd;

    use super::*;

    fn stack(symbol: &str, address: u64, bytes: u64) -> StackReport {
        StackReport {
            bytes,
            allocations: bytes / 16,
            frames: vec![Frame {
                address,
                symbol: Some(symbol.to_string()),
                offset: Some(0x10),
                file: Some("app.c".to_string()),
                line: Some(7),
                module: Some("/usr/bin/app".to_string()),
                inlined: false,
                mangled: None,
            }],
            stack_end: StackEnd::Complete,
            growth: None,
            kind: None,
            cache: None,
            processes: Vec::new(),
            allocs: Vec::new(),
            delta: None,
            api: None,
            replacing: None,
        }
    }

    /// Check that stacks match across addresses, growth comes first, and
    /// a stack gone from the second run shows what it gave back.
    #[test]
    fn matched_by_frames() {
        let before = Report {
            stacks: vec![
                stack("leak", 0x5555_0000_1000, 1600),
                stack("cache", 0x5555_0000_2000, 800),
            ],
            ..Report::default()
        };
        let after = Report {
            stacks: vec![
                stack("leak", 0x7777_0000_1000, 4800),
                stack("new", 0x7777_0000_3000, 160),
            ],
            ..Report::default()
        };
        let diff = diff(&before, &after, ("a.json", "b.json"));
        let deltas: Vec<(&str, i64)> = diff
            .stacks
            .iter()
            .map(|s| (s.frames[0].symbol.as_deref().unwrap(), s.delta.unwrap().bytes))
            .collect();
        assert_eq!(deltas, [("leak", 3200), ("new", 160), ("cache", -800)]);
        assert_eq!(diff.kind, RecordKind::Diff);
    }
}
