//! Collapsed stacks (`--folded`), the input of flamegraph.pl and inferno:
//! one line per stack, its frames outermost first joined by `;`, then its
//! outstanding bytes. Inlined frames are frames of their own (`_[i]`, as
//! perf's stackcollapse marks them), kernel frames carry `_[k]`.

use leaktrace_report::{Frame, Report, StackReport};

/// The collapsed lines of every stack in the report.
pub fn folded_lines(report: &Report) -> Vec<String> {
    report.stacks.iter().filter(|stack| stack.bytes > 0).map(folded_line).collect()
}

pub fn folded(report: &Report) -> String {
    let mut text = folded_lines(report).join("\n");
    text.push('\n');
    text
}

fn folded_line(stack: &StackReport) -> String {
    let mut names: Vec<String> = stack.frames.iter().rev().map(frame_name).collect();
    if names.is_empty() {
        names.push("[unknown]".to_string());
    }
    format!("{} {}", names.join(";"), stack.bytes)
}

/// A frame's name as a collapsed stack holds it.
pub fn frame_name(frame: &Frame) -> String {
    let mut name = escape(&frame.name());
    if frame.module.as_deref() == Some("[kernel]") {
        name.push_str("_[k]");
    } else if frame.inlined {
        name.push_str("_[i]");
    }
    name
}

/// `;` separates frames and whitespace ends the stack: both are written as
/// %-escapes (and `%` itself), so that every line parses.
fn escape(name: &str) -> String {
    let mut escaped = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' => escaped.push_str("%25"),
            ';' => escaped.push_str("%3B"),
            c if c.is_whitespace() => escaped.push_str(&format!("%{:02X}", c as u32 & 0xff)),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(symbol: &str, inlined: bool, module: &str) -> Frame {
        Frame {
            address: 0x1000,
            symbol: Some(symbol.to_string()),
            offset: None,
            file: None,
            line: None,
            module: Some(module.to_string()),
            inlined,
            mangled: None,
        }
    }

    /// Check the order (outermost first), the markers and the escapes.
    #[test]
    fn lines() {
        let stack = StackReport {
            bytes: 4096,
            allocations: 2,
            frames: vec![
                frame("operator new(unsigned long)", false, "/lib/libstdc++.so.6"),
                frame("helper", true, "/bin/app"),
                frame("a;b", false, "/bin/app"),
                frame("do_syscall_64", false, "[kernel]"),
            ],
            stack_end: leaktrace_report::StackEnd::Complete,
            growth: None,
            kind: None,
            cache: None,
            processes: Vec::new(),
            allocs: Vec::new(),
            delta: None,
            api: None,
            replacing: None,
        };
        assert_eq!(
            folded_line(&stack),
            "do_syscall_64_[k];a%3Bb;helper_[i];operator%20new(unsigned%20long) 4096"
        );
    }
}
