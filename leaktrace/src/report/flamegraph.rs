//! A flame graph of outstanding bytes (`--svg`), drawn by inferno from the
//! collapsed stacks. Frames of growing stacks carry their rate in their
//! title (the tooltip), and the subtitle names the growing call sites.

use std::io::{self, Write};

use inferno::flamegraph::{color::BasicPalette, FuncFrameAttrsMap, Options, Palette};
use leaktrace_report::{site_label, Report, Trend};

use super::{
    folded::{folded_lines, frame_name},
    units::human_bytes,
};

pub fn write_svg(report: &Report, out: impl Write) -> io::Result<()> {
    let lines = folded_lines(report);
    let who = if report.system.is_some() {
        "the kernel, machine-wide".to_string()
    } else {
        format!("pid {}", report.pid)
    };
    let title = format!(
        "leaktrace: {who} at {}: {} outstanding in {} allocations",
        report.time,
        human_bytes(report.totals.bytes),
        report.totals.allocations
    );
    if lines.is_empty() {
        return write_empty(&title, out);
    }
    let mut attributes = String::new();
    let mut growing = Vec::new();
    for stack in &report.stacks {
        let Some(growth) = stack.growth.filter(|growth| growth.trend == Trend::Growing) else {
            continue;
        };
        let rate = format!("growing, +{}/s", human_bytes(growth.bytes_per_second.max(0.0) as u64));
        if let Some(leaf) = stack.frames.first() {
            let name = frame_name(leaf);
            attributes.push_str(&format!("{name}\ttitle={name}: {rate}\n"));
        }
        growing.push(format!("{} ({rate})", site_label(&stack.frames)));
    }
    let mut options = Options::default();
    options.title = title;
    options.subtitle = Some(if growing.is_empty() {
        "nothing growing".to_string()
    } else {
        format!("growing: {}", growing.join(", "))
    });
    options.count_name = "bytes".to_string();
    options.colors = Palette::Basic(BasicPalette::Mem);
    options.func_frameattrs = FuncFrameAttrsMap::from_reader(attributes.as_bytes())?;
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
}

/// inferno draws nothing from no stacks: say so in a small SVG instead.
fn write_empty(title: &str, mut out: impl Write) -> io::Result<()> {
    let title = title.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    write!(
        out,
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"60\" xmlns=\"http://www.w3.org/2000/svg\">\
         <text x=\"10\" y=\"24\">{title}</text>\
         <text x=\"10\" y=\"48\">no outstanding allocations</text></svg>\n"
    )
}
