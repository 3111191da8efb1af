//! Rendering a [`Report`] (the model, `leaktrace-report`): the text shape
//! bcc memleak users know ([`text`]), and JSON Lines for scripts.

mod diff;
mod flamegraph;
mod folded;
mod memory;
pub mod outputs;
mod pprof;
mod push;
mod system;
pub mod text;
pub mod units;

pub use push::Pusher;

use std::io::{self, Write};

use bytes::{BufMut as _, BytesMut};
use leaktrace_report::Report;

/// Write the verdict's sentence into the model, so that the JSON carries
/// it too.
pub fn finish(report: &mut Report) {
    if let Some(verdict) = &mut report.verdict {
        verdict.text = text::verdict_text(&verdict.findings);
    }
}

/// One JSON line, written whole: a reader never sees half a report.
pub fn write_json(report: &Report, out: &mut impl Write) -> io::Result<()> {
    let mut line = BytesMut::with_capacity(4096).writer();
    serde_json::to_writer(&mut line, report)?;
    line.write_all(b"\n")?;
    out.write_all(&line.into_inner())?;
    out.flush()
}

pub use text::write_text;

/// Print a report on stdout, as text or as one JSON line.
pub fn print(report: &Report, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        write_json(report, &mut out)?;
    } else {
        write_text(report, &mut out)?;
    }
    out.flush()
}
