//! The trap floor through other kinds of kernel link: link_floor.c, and
//! where leaktrace's own probes sit, read from its report.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _};
use leaktrace_report::{read_reports, Report};

use super::{
    process::{Tracer, Workload},
    ATTACH_TIMEOUT, C_FLAGS, REPORT_TIMEOUT,
};
use crate::{compile_c, workspace_root};

/// xtask/bench/link_floor.c and where it attaches: the library and file
/// offsets leaktrace probes malloc and free at.
pub(super) struct LinkFloor {
    pub(super) bin: PathBuf,
    pub(super) library: String,
    pub(super) malloc: u64,
    pub(super) free: u64,
}

impl LinkFloor {
    /// Builds link_floor and reads leaktrace's attach points from the first
    /// report of `leaktrace --floor --json` on one run of `workload`.
    pub(super) fn prepare(leaktrace: &Path, workload: &Path) -> anyhow::Result<Self> {
        let source = workspace_root().join("xtask/bench/link_floor.c");
        let bin = compile_c(&source, "link_floor", &C_FLAGS)?;
        let mut run = Workload::start(workload, &["1".to_owned(), "1".to_owned()])?;
        let mut cmd = Command::new(leaktrace);
        // One report, a second after attaching: its `probed` list says where
        // each probe went.
        cmd.args(["-p", &run.pid.to_string(), "--floor", "--json", "1", "1"]);
        let mut tracer = Tracer::spawn("leaktrace", &mut cmd)?;
        let report = tracer.wait_for("a JSON report", ATTACH_TIMEOUT + REPORT_TIMEOUT, |line| {
            line.from_stdout && line.text.starts_with('{')
        })?;
        tracer.stop()?;
        run.go()?;
        run.read_value("ns_per_pair")?;
        run.wait()?;
        let report = read_reports(report.text.as_bytes())
            .context("`leaktrace --floor --json` printed what is not a report")?
            .remove(0);
        let (library, malloc, free) = attach_points(&report)?;
        Ok(Self { bin, library, malloc, free })
    }
}

/// The object and the file offsets of malloc's and free's entry probes in
/// `report`. The object is the path as the target names it: the workload runs
/// in our mount namespace, so link_floor opens the same file by it.
fn attach_points(report: &Report) -> anyhow::Result<(String, u64, u64)> {
    let probe = |symbol: &str| {
        report.probe(symbol).with_context(|| {
            format!("leaktrace's report places no probe on {symbol} (`probed[].probes` is missing or lacks it)")
        })
    };
    let ((object, malloc), (free_object, free)) = (probe("malloc")?, probe("free")?);
    ensure!(
        object.object == free_object.object,
        "malloc is probed in {} but free in {}: link_floor attaches to one library",
        object.object,
        free_object.object
    );
    Ok((object.object.clone(), malloc.offset, free.offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report line as `leaktrace --json` writes it, with `probed` as given.
    fn report_line(probed: &str) -> String {
        format!(
            r#"{{"type":"report","schema":1,"final":true,"time":"2026-11-30T06:00:00Z","pid":7,"exited":false,"older_ms":500,"totals":{{"bytes":0,"allocations":0}},"stack_count":0,"stacks":[],"lost":{{"alloc_map_full":0}},"probed":{probed},"sample_rate":1}}"#
        )
    }

    /// Check that malloc's and free's placement is read from a report's
    /// `probed` list, past objects without them and aliases.
    #[test]
    fn attach_points_from_report() {
        let line = report_line(
            r#"[{"object":"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2","functions":["__tls_get_addr"],"probes":[{"symbol":"__tls_get_addr","offset":4096,"skipped":0}]},
                {"object":"/usr/lib/x86_64-linux-gnu/libc.so.6","functions":["malloc","free","memalign","aligned_alloc"],"probes":[
                    {"symbol":"malloc","offset":624944,"skipped":0},
                    {"symbol":"free","offset":626419,"skipped":3},
                    {"symbol":"memalign","offset":630000,"skipped":0},
                    {"symbol":"aligned_alloc","offset":630000,"skipped":0,"alias_of":"memalign"}]}]"#
                .replace(char::is_whitespace, "")
                .as_str(),
        );
        let report = read_reports(line.as_bytes()).expect("a report").remove(0);
        let (library, malloc, free) = attach_points(&report).expect("malloc and free placed");
        assert_eq!(library, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!((malloc, free), (0x98930, 0x98ef3));
    }

    /// Check that a report without probe placements (a leaktrace that
    /// predates `probed[].probes`) is an error naming what is missing.
    #[test]
    fn attach_points_missing() {
        let line = report_line(
            r#"[{"object":"/usr/lib/x86_64-linux-gnu/libc.so.6","functions":["malloc","free"]}]"#,
        );
        let report = read_reports(line.as_bytes()).expect("a report").remove(0);
        let err = attach_points(&report).expect_err("no placements");
        assert!(err.to_string().contains("malloc"), "{err}");
    }
}
