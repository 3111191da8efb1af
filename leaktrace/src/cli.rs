//! Command-line arguments. Flags that bcc memleak users know keep their
//! meaning there.

use std::path::PathBuf;

use clap::Parser;
use leaktrace_common::{
    DEFAULT_MAX_ALLOCATIONS, DEFAULT_MAX_KERNEL_ALLOCATIONS, DEFAULT_MAX_STACKS, UNWIND_CHUNK_ROWS,
};

#[derive(Debug, Parser)]
#[command(
    name = "leaktrace",
    version,
    about = "Trace outstanding memory allocations of a running process (without -p: of the kernel, with the machine's memory picture) and report the call sites that leak",
    after_help = "Examples:\n  \
        sudo leaktrace -p 1234            report every 5 s until Ctrl-C\n  \
        sudo leaktrace -p 1234 10 3       three reports, 10 s apart\n  \
        sudo leaktrace -c './server --port 8080' --json\n  \
        sudo leaktrace -p 1234 -o 5000 -z 1024   only blocks of 1 KiB or more, older than 5 s\n  \
        sudo leaktrace -p 1234 --kernel   also kernel memory it causes (fds, sockets), at its call sites\n  \
        sudo leaktrace                    the whole machine: meminfo, slabs, growing processes, kernel allocations"
)]
pub struct Args {
    /// Trace the process with this PID. Without -p or -c, leaktrace shows
    /// where the machine's memory goes and traces the kernel's allocations.
    #[arg(short, long, value_name = "PID", conflicts_with = "command")]
    pub pid: Option<u32>,

    /// Start this command (with its arguments, found on PATH) and trace it
    /// from its first allocation.
    #[arg(short, long, value_name = "CMD ARGS")]
    pub command: Option<String>,

    /// With -c: leave the program running when leaktrace stops (Ctrl-C,
    /// SIGTERM, --duration or COUNT) instead of ending it.
    #[arg(long, requires = "command")]
    pub keep_running: bool,

    /// With -c: exit with this status when the program leaked (a leak
    /// called, or memory in use when it exited, glibc's stdio buffers
    /// aside), as valgrind's --error-exitcode; else the program's own.
    #[arg(long, value_name = "N", requires = "command", value_parser = clap::value_parser!(u8).range(1..))]
    pub error_exitcode: Option<u8>,

    /// Seconds between reports.
    #[arg(value_name = "INTERVAL", default_value_t = 5.0, value_parser = positive_seconds)]
    pub interval: f64,

    /// Number of reports before exiting (default: until Ctrl-C or the target exits).
    #[arg(value_name = "COUNT", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Show the N stacks holding the most memory.
    #[arg(short = 'T', long = "top", value_name = "N", default_value_t = 10, value_parser = at_least_one)]
    pub top: usize,

    /// Leave out allocations younger than this many milliseconds.
    #[arg(short, long, value_name = "MS", default_value_t = 500)]
    pub older: u64,

    /// Ignore allocations smaller than this many bytes.
    #[arg(short = 'z', long, value_name = "BYTES")]
    pub min_size: Option<u64>,

    /// Ignore allocations larger than this many bytes.
    #[arg(short = 'Z', long, value_name = "BYTES")]
    pub max_size: Option<u64>,

    /// Track about one allocation in N, and scale bytes and counts by N in
    /// the report. Heap: the allocating functions' probes are attached one
    /// window of time in N, so the target takes no trap on them between
    /// windows (frees stay traced); see --sampling. Kernel allocations: one
    /// in N by address.
    #[arg(short = 's', long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub sample_rate: u64,

    /// How -s chooses heap allocations: `windows` (time windows, which skip
    /// the traps; a burst between windows is missed) or `address` (one
    /// allocation in N by address, bcc memleak's way: exact for bursts, but
    /// every call still traps).
    #[arg(long, value_name = "HOW", value_enum, default_value_t = SampleBy::Windows)]
    pub sampling: SampleBy,

    /// Stop after this many seconds, with a final report.
    #[arg(long, value_name = "SECS", value_parser = positive_seconds)]
    pub duration: Option<f64>,

    /// Print reports as JSON Lines, one object per report.
    #[arg(long)]
    pub json: bool,

    /// Probe the allocator in this object instead of the one found in the
    /// target's mappings (a path as the target sees it).
    #[arg(short = 'O', long = "obj", value_name = "PATH")]
    pub obj: Option<PathBuf>,

    /// The allocator's functions carry this prefix (`je_malloc`: `je_`).
    #[arg(short = 'S', long, value_name = "PREFIX")]
    pub symbol_prefix: Option<String>,

    /// Show each stack's outstanding allocations (address, size, age), at
    /// most 10 a stack, as memleak -a does.
    #[arg(short = 'a', long)]
    pub show_allocs: bool,

    /// Print every allocation and free of the target on stderr (costly: for
    /// short runs), at most 1000 lines a second; the rest are counted.
    #[arg(short = 't', long)]
    pub trace: bool,

    /// Order the stacks by outstanding bytes (size) or allocations (count).
    #[arg(long, value_enum, value_name = "KEY", default_value = "size")]
    pub sort: SortKey,

    /// Also write collapsed stacks (flamegraph.pl, inferno) here at every
    /// report, replacing the file.
    #[arg(long, value_name = "PATH")]
    pub folded: Option<PathBuf>,

    /// Also write a flame graph of outstanding bytes (SVG) here at every
    /// report, replacing the file.
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,

    /// Also write a gzipped pprof profile (go tool pprof) here at every
    /// report, replacing the file.
    #[arg(long, value_name = "PATH")]
    pub pprof: Option<PathBuf>,

    /// Push each report's pprof profile to this Pyroscope server
    /// (http://host:4040); a failed push is said on stderr and tracing goes on.
    #[arg(long, value_name = "URL")]
    pub push: Option<String>,

    /// Also look for separate debug info here (by .gnu_debuglink and by
    /// build-id under DIR/.build-id); repeatable.
    #[arg(long = "debug-dir", value_name = "DIR")]
    pub debug_dirs: Vec<PathBuf>,

    /// Symbolize from copies of the target's binaries under DIR (DIR/usr/lib/...),
    /// for a target that has exited or binaries copied out of a container.
    #[arg(long, value_name = "DIR")]
    pub sysroot: Option<PathBuf>,

    /// Live allocations that can be tracked at once [default: 1048576, divided by N with -s N]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_allocations: Option<u32>,

    /// Distinct call stacks that can be told apart.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_STACKS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_stacks: u32,

    /// Rows of call-frame information the kernel unwinder can hold, for all
    /// the target's objects together (12 bytes each; libc has ~28,000)
    /// [default: twice what the target's objects need, at least 262,144]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(UNWIND_CHUNK_ROWS as u64..=1 << 28))]
    pub unwind_rows: Option<u64>,

    /// With -p or -c: also trace the kernel allocations made in the
    /// target's threads (fds, sockets, pipes, ...), each under the user call
    /// stack that entered the kernel.
    #[arg(long)]
    pub kernel: bool,

    /// Without -p: also trace percpu allocations.
    #[arg(long)]
    pub percpu: bool,

    /// Name kernel frames from this kallsyms file.
    #[arg(long, value_name = "PATH", default_value = "/proc/kallsyms")]
    pub kallsyms: PathBuf,

    /// Outstanding kernel allocations that can be tracked at once
    /// (--kernel, and without -p).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_KERNEL_ALLOCATIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_kernel_allocations: u32,

    /// Benchmark aid: attach every probe but let the programs return at
    /// once, to measure what the probes alone cost.
    #[arg(long, hide = true)]
    pub floor: bool,

    /// Benchmark aid: have the kernel time every program run
    /// (BPF_ENABLE_STATS) and print each program's runs and mean time on
    /// stderr at exit.
    #[arg(long, hide = true)]
    pub program_stats: bool,

    /// More logging on stderr (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// `leaktrace diff BEFORE AFTER`: two runs compared.
#[derive(Debug, Parser)]
#[command(
    name = "leaktrace diff",
    about = "Compare the final reports of two saved `leaktrace --json` outputs, stack by stack (matched by their frames, not addresses)"
)]
pub struct DiffArgs {
    /// The earlier run's --json output.
    pub before: PathBuf,
    /// The later run's --json output.
    pub after: PathBuf,
    /// Print the comparison as JSON (one object, "type": "diff").
    #[arg(long)]
    pub json: bool,
    /// Show the N stacks that changed most.
    #[arg(short = 'T', long = "top", value_name = "N", default_value_t = 10, value_parser = at_least_one)]
    pub top: usize,
}

/// What the stacks are ordered by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Outstanding bytes.
    Size,
    /// Outstanding allocations.
    Count,
}

/// How `-s N` chooses heap allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SampleBy {
    /// Allocation probes attached one window of time in N.
    Windows,
    /// One allocation in N by address; every call traps.
    Address,
}

/// The longest INTERVAL or --duration: a year. Longer ones would overflow
/// the clock's arithmetic (1e300, 2^64-1) long before they mean anything.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

fn positive_seconds(s: &str) -> Result<f64, String> {
    let value: f64 = s.parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(value.is_finite() && value > 0.0) {
        Err(format!("'{s}' must be a positive number of seconds"))
    } else if value > MAX_SECONDS {
        Err(format!("'{s}' is more than a year ({MAX_SECONDS} seconds)"))
    } else {
        Ok(value)
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

/// The fewest allocation slots `-s` scales the default down to.
const MIN_SAMPLED_ALLOCATIONS: u64 = 4096;

impl Args {
    /// Capacity of the live-allocation map: as given, or the default for
    /// the allocations sampling keeps (one in `sample_rate`), so that
    /// sampling saves kernel memory as well as time.
    pub fn allocation_slots(&self) -> u32 {
        self.max_allocations.unwrap_or_else(|| {
            let sampled = u64::from(DEFAULT_MAX_ALLOCATIONS) / self.sample_rate.max(1);
            sampled.max(MIN_SAMPLED_ALLOCATIONS).min(u64::from(DEFAULT_MAX_ALLOCATIONS)) as u32
        })
    }

    /// No target: the system mode.
    pub fn is_system(&self) -> bool {
        self.pid.is_none() && self.command.is_none()
    }

    /// Checks clap cannot express.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.is_system() {
            anyhow::ensure!(
                !self.kernel,
                "--kernel needs a target (-p PID or -c CMD); without one, leaktrace traces the whole kernel already"
            );
            for (given, flag) in [
                (self.obj.is_some(), "--obj"),
                (self.symbol_prefix.is_some(), "--symbol-prefix"),
                (self.sysroot.is_some(), "--sysroot"),
                (self.floor, "--floor"),
            ] {
                anyhow::ensure!(!given, "{flag} needs a target (-p PID or -c CMD)");
            }
        }
        if self.is_system() || self.kernel {
            // Before a target is touched: the kernel frames need it.
            std::fs::File::open(&self.kallsyms).map_err(|err| {
                anyhow::anyhow!(
                    "cannot read kernel symbols from {}: {err}",
                    self.kallsyms.display()
                )
            })?;
        }
        if !self.is_system() {
            anyhow::ensure!(
                !self.percpu,
                "--percpu is for the system mode (no -p or -c): percpu memory is not charged to one process"
            );
        }
        if let (Some(min), Some(max)) = (self.min_size, self.max_size) {
            anyhow::ensure!(min <= max, "--min-size {min} is larger than --max-size {max}");
        }
        if let Some(sysroot) = &self.sysroot {
            anyhow::ensure!(sysroot.is_dir(), "--sysroot {} is not a directory", sysroot.display());
        }
        for dir in &self.debug_dirs {
            anyhow::ensure!(dir.is_dir(), "--debug-dir {} is not a directory", dir.display());
        }
        if let Some(command) = &self.command {
            anyhow::ensure!(
                shlex::split(command).is_some_and(|words| !words.is_empty()),
                "cannot parse --command '{command}' into a program and arguments"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that the bcc memleak positional form parses.
    #[test]
    fn positional_interval_and_count() {
        let args = Args::try_parse_from(["leaktrace", "-p", "42", "2", "3"]).unwrap();
        assert_eq!(args.pid, Some(42));
        assert_eq!(args.interval, 2.0);
        assert_eq!(args.count, Some(3));
        assert_eq!(args.older, 500);
        assert_eq!(args.top, 10);
    }

    /// Check that nonsense is refused, and that no target is the system mode.
    #[test]
    fn bad_flags_are_errors() {
        assert!(Args::try_parse_from(["leaktrace"]).unwrap().is_system());
        let kernel = Args::try_parse_from(["leaktrace", "--kernel"]).unwrap();
        assert!(kernel.validate().unwrap_err().to_string().contains("--kernel needs a target"));
        let percpu = Args::try_parse_from(["leaktrace", "-p", "1", "--percpu"]).unwrap();
        assert!(percpu.validate().unwrap_err().to_string().contains("--percpu is for the system"));
        assert!(Args::try_parse_from(["leaktrace", "-p", "1", "--top", "banana"]).is_err());
        assert!(Args::try_parse_from(["leaktrace", "-p", "1", "0"]).is_err());
        assert!(Args::try_parse_from(["leaktrace", "-p", "1", "-c", "ls"]).is_err());
    }

    /// Check that sampling shrinks the default allocation map, and that a
    /// size given outright wins.
    #[test]
    fn sampling_shrinks_allocation_map() {
        let slots = |extra: &[&str]| {
            let mut argv = vec!["leaktrace", "-p", "1"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).unwrap().allocation_slots()
        };
        assert_eq!(slots(&[]), 1_048_576);
        assert_eq!(slots(&["-s", "10"]), 104_857);
        assert_eq!(slots(&["-s", "1000000"]), 4096);
        assert_eq!(slots(&["-s", "10", "--max-allocations", "500000"]), 500_000);
    }

    /// Check that a top of 0, and intervals or durations past a year, are
    /// refused at parse time.
    #[test]
    fn out_of_range_values_refused() {
        for argv in [
            &["leaktrace", "-p", "1", "-T", "0"][..],
            &["leaktrace", "-p", "1", "1e300"],
            &["leaktrace", "-p", "1", "18446744073709551615"],
            &["leaktrace", "-p", "1", "--duration", "1e300"],
            &["leaktrace", "-p", "1", "inf"],
        ] {
            assert!(Args::try_parse_from(argv).is_err(), "{argv:?} accepted");
        }
        assert!(Args::try_parse_from(["leaktrace", "-p", "1", "3600", "-T", "1"]).is_ok());
    }

    /// Check that a missing --sysroot or --debug-dir is refused.
    #[test]
    fn missing_directories_refused() {
        let args =
            Args::try_parse_from(["leaktrace", "-p", "1", "--sysroot", "/nonexistent"]).unwrap();
        assert!(args.validate().unwrap_err().to_string().contains("--sysroot /nonexistent"));
        let args =
            Args::try_parse_from(["leaktrace", "-p", "1", "--debug-dir", "/nonexistent"]).unwrap();
        assert!(args.validate().is_err());
    }

    /// Check that an inverted size range is refused.
    #[test]
    fn inverted_size_range() {
        let args = Args::try_parse_from(["leaktrace", "-p", "1", "-z", "10", "-Z", "5"]).unwrap();
        assert!(args.validate().is_err());
    }
}
