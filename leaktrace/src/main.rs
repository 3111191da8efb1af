//! leaktrace: find the call sites that leak memory in a running process.
//!
//! Data flows one way, and the folders are its stages:
//!
//! ```text
//! target -> attach -> (kernel maps) -> collect -> symbolize -> analyze -> report
//! ```
//!
//! `target` checks a PID or starts a `-c` command and names the objects to
//! probe; `attach` loads the kernel programs and puts uprobes and
//! tracepoints in; `unwind` keeps the unwind tables the programs walk
//! current; `collect` reads the kernel maps into a snapshot; `symbolize`
//! names the frames; `analyze` follows growth and weighs the verdict into a
//! report (the model, in the `leaktrace-report` crate); `report` renders it.
//! `proc` (the one reader of /proc) and `elf` (the one parser of objects)
//! serve every stage. `session` runs the loop; no stage imports from a
//! stage after it.

mod analyze;
mod attach;
mod bpf;
mod cli;
mod collect;
mod elf;
mod proc;
mod report;
mod session;
mod symbolize;
mod target;
mod unwind;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // `leaktrace diff A B` compares two saved runs; anything else traces.
    let mut argv = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|word| word == "diff") {
        let program = argv.next();
        let args = cli::DiffArgs::parse_from(program.into_iter().chain(argv.skip(1)));
        return match session::diff(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("leaktrace: error: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = cli::Args::parse();
    let level = match args.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new().filter_level(level).format_timestamp(None).init();
    match session::run(args) {
        Ok(code) => ExitCode::from(code),
        // The report was piped to a reader that has gone (`| head`).
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("leaktrace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
