//! A small process under leaktrace: the demo server (`xtask/demo/
//! leaky_server.c`), timed from leaktrace's start to its `attached` line,
//! its maps' kernel memory read, then from SIGINT to the final report and
//! to leaktrace's exit. The targets: 0.3 s, 32 MiB, 0.5 s.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{live::*, process::*, Summary, ATTACH_TIMEOUT, STOP_TIMEOUT};
use crate::{compile_c, workspace_root, KillOnDrop};

pub(super) fn measure_small_process(leaktrace: &Path, rounds: u32) -> anyhow::Result<()> {
    let source = workspace_root().join("xtask/demo/leaky_server.c");
    let server = compile_c(&source, "leaky_server", &["-g", "-O1", "-fno-omit-frame-pointer"])?;
    let (mut attach, mut memory, mut stop) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let demo = KillOnDrop(
            Command::new(&server)
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("failed to start {}", server.display()))?,
        );
        thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let mut cmd = Command::new(leaktrace);
        cmd.args(["-p", &demo.0.id().to_string(), "3600"]);
        let mut tracer = Tracer::spawn("leaktrace", &mut cmd)?;
        tracer.wait_for("`attached to pid`", ATTACH_TIMEOUT, |line| {
            !line.from_stdout && line.text.contains("attached to pid")
        })?;
        attach.push(started.elapsed().as_secs_f64());
        memory.push(bpf_map_memory(tracer.child.0.id())? as f64);
        let interrupted = tracer.interrupt()?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while tracer.child.0.try_wait()?.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "leaktrace did not exit after SIGINT");
            thread::sleep(Duration::from_millis(10));
        }
        stop.push(interrupted.elapsed().as_secs_f64());
        drop(demo);
    }
    let (attach, memory, stop) =
        (Summary::of(&mut attach), Summary::of(&mut memory), Summary::of(&mut stop));
    println!();
    println!(
        "small process (the demo server), {rounds} runs, median (min-max): attached in {:.2} s ({:.2}-{:.2}), maps {:.1} MiB of kernel memory, exited {:.2} s ({:.2}-{:.2}) after SIGINT",
        attach.median,
        attach.min,
        attach.max,
        memory.median / f64::from(1 << 20),
        stop.median,
        stop.min,
        stop.max
    );
    Ok(())
}
