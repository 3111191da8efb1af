//! leaktrace: find the call sites that leak memory in a running process.

mod cli;
mod collector;
mod elf;
mod growth;
mod loader;
mod memory;
mod placement;
mod report;
mod reporter;
mod session;
mod symbolizer;
mod target;
mod unwind;
mod verdict;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let level = match args.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new().filter_level(level).format_timestamp(None).init();
    match session::run(args) {
        Ok(()) => ExitCode::SUCCESS,
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
