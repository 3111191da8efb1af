//! The files and the backend each report also goes to: collapsed stacks
//! (`--folded`), a flame graph (`--svg`), a pprof profile (`--pprof`), a
//! push to Pyroscope (`--push`). Each file is replaced at every report (a
//! new file renamed over the old, so a reader never sees half of one).

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use leaktrace_report::Report;

use super::{
    flamegraph::write_svg,
    folded::folded,
    pprof::{gzipped, profile, BuildIds},
    push::Pusher,
};

#[derive(Default)]
pub struct Outputs {
    pub folded: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    pub pprof: Option<PathBuf>,
    pub push: Option<Pusher>,
    build_ids: BuildIds,
}

impl Outputs {
    /// Check that each file can be written, before tracing starts.
    pub fn new(
        folded: Option<PathBuf>,
        svg: Option<PathBuf>,
        pprof: Option<PathBuf>,
        push: Option<Pusher>,
    ) -> anyhow::Result<Self> {
        for (path, flag) in [(&folded, "--folded"), (&svg, "--svg"), (&pprof, "--pprof")] {
            if let Some(path) = path {
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("{flag} {}: cannot write there", path.display()))?;
            }
        }
        Ok(Self { folded, svg, pprof, push, build_ids: BuildIds::default() })
    }

    /// Write this report everywhere asked; failures are said on stderr and
    /// tracing goes on. The push counts go into the report.
    pub fn write(&mut self, report: &mut Report) {
        if let Some(path) = &self.folded {
            warn_on(path, replace(path, |out| out.write_all(folded(report).as_bytes())));
        }
        if let Some(path) = &self.svg {
            warn_on(path, replace(path, |out| write_svg(report, out)));
        }
        if self.pprof.is_none() && self.push.is_none() {
            return;
        }
        let bytes = match gzipped(&profile(report, &mut self.build_ids)) {
            Ok(bytes) => bytes,
            Err(err) => {
                eprintln!("leaktrace: cannot encode the pprof profile: {err}");
                return;
            }
        };
        if let Some(path) = &self.pprof {
            warn_on(path, replace(path, |out| out.write_all(&bytes)));
        }
        if let Some(pusher) = &mut self.push {
            pusher.push(&bytes);
            report.push = Some(pusher.counts);
        }
    }
}

/// Write a new `path` through a temporary file renamed over it.
fn replace(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut out = io::BufWriter::new(fs::File::create(&temporary)?);
    write(&mut out)?;
    out.flush()?;
    drop(out);
    fs::rename(&temporary, path)
}

fn warn_on(path: &Path, result: io::Result<()>) {
    if let Err(err) = result {
        eprintln!("leaktrace: cannot write {}: {err}", path.display());
    }
}
