//! Project tasks a build script cannot do: set-up, demo, test and bench.
//!
//! `cargo xtask demo` and `cargo xtask test` are the README's two commands;
//! `.ci/run` runs `cargo xtask test`.

mod bench;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, Subcommand};

/// The bpf-linker release that works with rustc's own LLVM 22 here; newer
/// ones need a system LLVM 23.
const BPF_LINKER_VERSION: &str = "0.10.3";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF programs needs, if missing.
    Setup,
    /// Set up, build, and trace a bundled leaking demo server for a few seconds.
    Demo {
        /// Report in JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set up, build, and run every test: unit and integration (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Set up and build one statically linked leaktrace, to copy into a
    /// container or onto a board; print its path and size.
    Dist,
    /// Set up, build, and measure the cost per malloc/free pair (untraced, traced,
    /// under a bpftrace memleak script) and the cost of a large live set.
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup(),
        Task::Demo { json } => {
            setup()?;
            let leaktrace = build_leaktrace()?;
            demo(&leaktrace, json)
        }
        Task::Test { cargo_args } => {
            setup()?;
            require_root("the integration tests load eBPF programs")?;
            install_packages(&TEST_PACKAGES)?;
            lint()?;
            // The tests run the static binary, the one `dist` ships: one
            // release build of leaktrace, not two (~1.5 min here).
            let static_leaktrace = build_static()?;
            let leaktrace = static_leaktrace.clone();
            let mut cmd = cargo();
            // Every crate but the eBPF one, which only builds for the BPF
            // target; the integration tests are not a default member. No
            // doc tests: there are none.
            cmd.args(["test", "--release", "--workspace", "--exclude", "leaktrace-ebpf"])
                .args(["--lib", "--bins", "--tests"])
                .env("LEAKTRACE_BIN", &leaktrace)
                .env("LEAKTRACE_STATIC_BIN", &static_leaktrace);
            if !cargo_args.is_empty() {
                cmd.arg("--").args(&cargo_args);
            }
            run_tests(&mut cmd)
        }
        Task::Dist => {
            setup()?;
            let path = build_static()?;
            let size = std::fs::metadata(&path)?.len();
            println!("{} ({:.1} MiB, statically linked)", path.display(), size as f64 / 1048576.0);
            Ok(())
        }
        Task::Bench(args) => {
            setup()?;
            require_root("the benchmark loads eBPF programs")?;
            let leaktrace = build_leaktrace()?;
            bench::run(&leaktrace, &args)
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("failed to run {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// Run `cargo test`, passing its output through, and close with the totals
/// over every test binary.
fn run_tests(cmd: &mut Command) -> anyhow::Result<()> {
    let mut child =
        cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("failed to run {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout from cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count_before(result, " passed");
            failed += count_before(result, " failed");
        }
    }
    let status = child.wait()?;
    println!("leaktrace: {passed} passed, {failed} failed");
    ensure!(status.success() && failed == 0, "tests failed: {status}");
    ensure!(passed > 0, "no test ran");
    Ok(())
}

/// The number just before `label` in a cargo test summary line.
fn count_before(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| part.trim().strip_suffix(label.trim_start()))
        .and_then(|part| part.trim().rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn output_of(cmd: &mut Command) -> Option<String> {
    let output = cmd.stderr(Stdio::null()).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run this as root: {why} (e.g. sudo -E cargo xtask ...)");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Debian packages the tests need: the allocators leaktrace must find
/// (jemalloc, tcmalloc, mimalloc), musl for a static musl program, and Go
/// for `go tool pprof`, which reads the pprof output back.
const TEST_PACKAGES: [&str; 5] =
    ["libjemalloc-dev", "libgoogle-perftools-dev", "libmimalloc-dev", "musl-tools", "golang-go"];

/// Install the Debian packages in `packages` that are missing.
fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            output_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run_cmd(Command::new("apt-get").arg("update").arg("-qq"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Install the nightly rust-src component, clippy and rustfmt, and
/// bpf-linker when missing.
fn setup() -> anyhow::Result<()> {
    let has_rust_src = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|list| list.lines().any(|line| line.starts_with("rust-src")));
    if !has_rust_src {
        eprintln!("xtask: installing rust-src for the nightly toolchain");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    for (component, tool) in [("clippy", "clippy"), ("rustfmt", "fmt")] {
        if output_of(cargo().args([tool, "--version"])).is_none() {
            eprintln!("xtask: installing {component}");
            run_cmd(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    let linker = output_of(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
        run_cmd(cargo().args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))?;
    }
    Ok(())
}

/// Fail on unformatted code and on clippy's warnings, in every crate the
/// host builds (the eBPF crate builds only for the BPF target).
fn lint() -> anyhow::Result<()> {
    run_cmd(cargo().args(["fmt", "--all", "--check"]))
        .context("the tree is not formatted: run `cargo fmt --all`")?;
    run_cmd(
        cargo().args(["clippy", "--release", "--workspace", "--exclude", "leaktrace-ebpf"]).args([
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )
    .context("clippy found warnings")
}

/// Build the release binary and return its path.
fn build_leaktrace() -> anyhow::Result<PathBuf> {
    run_cmd(cargo().args(["build", "--release", "--package", "leaktrace"]))?;
    let path = workspace_root().join("target/release/leaktrace");
    ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}

/// The host's target triple, spelled out so that RUSTFLAGS reach only the
/// leaktrace binary, not build scripts or proc macros.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Build leaktrace linked statically (glibc's crt-static): it runs in a
/// root holding nothing else. Returns its path.
fn build_static() -> anyhow::Result<PathBuf> {
    run_cmd(
        cargo()
            .args(["build", "--release", "--package", "leaktrace", "--target", STATIC_TARGET])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let path = workspace_root().join("target").join(STATIC_TARGET).join("release/leaktrace");
    let elf = std::fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
    ensure!(!has_interpreter(&elf), "{} is not statically linked", path.display());
    Ok(path)
}

/// Whether a 64-bit little-endian ELF file names a program interpreter
/// (PT_INTERP): a dynamically linked program.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let read = |at: usize, len: usize| elf.get(at..at + len);
    let u64_at = |at| read(at, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    let u16_at = |at| read(at, 2).map(|b| u16::from_le_bytes(b.try_into().unwrap()));
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..usize::from(count)).any(|i| {
        let at = phoff as usize + i * usize::from(size);
        read(at, 4).is_some_and(|b| u32::from_le_bytes(b.try_into().unwrap()) == PT_INTERP)
    })
}

/// Compile a C program from the repo into target/xtask.
pub fn compile_c(source: &Path, name: &str, flags: &[&str]) -> anyhow::Result<PathBuf> {
    let out_dir = workspace_root().join("target/xtask");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(name);
    run_cmd(Command::new("cc").args(flags).arg("-o").arg(&out).arg(source).arg("-pthread"))?;
    Ok(out)
}

/// Kills a child process when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where `cargo xtask demo` writes its flame graph (the README shows it).
const DEMO_FLAME_GRAPH: &str = "docs/demo-flamegraph.svg";

fn demo(leaktrace: &Path, json: bool) -> anyhow::Result<()> {
    let source = workspace_root().join("xtask/demo/leaky_server.c");
    let server = compile_c(&source, "leaky_server", &["-g", "-O1", "-fno-omit-frame-pointer"])?;
    let child = Command::new(&server)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("failed to start {}", server.display()))?;
    let demo = KillOnDrop(child);
    let pid = demo.0.id();
    // Let it get going: its leaks should be older than --older by the first report.
    std::thread::sleep(Duration::from_millis(300));
    // The flame graph of its last report, shown in the README.
    let svg = workspace_root().join(DEMO_FLAME_GRAPH);
    eprintln!(
        "xtask: tracing the demo server (pid {pid}): 4 reports, 2 s apart; flame graph in {}\n",
        svg.display()
    );
    let mut cmd = Command::new(leaktrace);
    cmd.args(["-p", &pid.to_string(), "2", "4", "--top", "5"]).arg("--svg").arg(&svg);
    if json {
        cmd.arg("--json");
    }
    run_cmd(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that a dynamic program is told from a static one.
    #[test]
    fn interpreter() {
        assert!(has_interpreter(&std::fs::read("/bin/sh").unwrap()));
        assert!(!has_interpreter(b"not an ELF file"));
    }

    /// Check that counts are read from a cargo test summary line.
    #[test]
    fn summary_counts() {
        let line =
            "ok. 19 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(count_before(line, " passed"), 19);
        assert_eq!(count_before(line, " failed"), 2);
    }
}
