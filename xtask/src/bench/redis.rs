//! A real service: Debian's redis-server (which links jemalloc) under
//! `redis-benchmark -n 100000 -c 20 -d 256`, its requests a second
//! untraced, under `leaktrace -p`, and under `leaktrace -p -s 10`, round
//! by round; and what leaktrace's last report says of redis at rest after
//! the load (it holds flat memory: no leak is the right answer).

use std::{
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{process::*, Summary, ATTACH_TIMEOUT, REPORT_TIMEOUT};
use crate::{install_packages, KillOnDrop};

/// The port the bench's redis listens on (not the packaged service's).
const PORT: &str = "6399";
/// The commands timed.
const COMMANDS: [&str; 4] = ["SET", "GET", "LPUSH", "LPOP"];

#[derive(Clone, Copy)]
enum RedisMode {
    Untraced,
    Traced,
    Sampled,
}

const MODES: [(RedisMode, &str); 3] = [
    (RedisMode::Untraced, "untraced"),
    (RedisMode::Traced, "leaktrace -p"),
    (RedisMode::Sampled, "leaktrace -p -s 10"),
];

pub(super) fn measure_redis(leaktrace: &Path, rounds: u32) -> anyhow::Result<()> {
    install_packages(&["redis-server", "redis-tools"])
        .context("failed to install redis-server and redis-tools for the service bench")?;
    // samples[mode][command]
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); COMMANDS.len()]; MODES.len()];
    let mut verdict = String::new();
    for round in 1..=rounds {
        eprintln!("xtask: redis round {round}/{rounds}");
        for (index, &(mode, _)) in MODES.iter().enumerate() {
            let (rates, said) = redis_run(leaktrace, mode)?;
            for (command, rate) in rates.into_iter().enumerate() {
                samples[index][command].push(rate);
            }
            if let Some(said) = said {
                verdict = said;
            }
        }
    }
    println!();
    println!(
        "redis-server (jemalloc) under redis-benchmark -n 100000 -c 20 -d 256, {rounds} rounds, median requests/s (share of untraced)"
    );
    print!("{:<20}", "mode");
    for command in COMMANDS {
        print!(" {command:>16}");
    }
    println!();
    let untraced: Vec<f64> = samples[0].iter_mut().map(|runs| Summary::of(runs).median).collect();
    for (index, (_, name)) in MODES.iter().enumerate() {
        print!("{name:<20}");
        for (command, runs) in samples[index].iter_mut().enumerate() {
            let median = Summary::of(runs).median;
            print!(" {:>8.0} ({:>3.0}%)", median, 100.0 * median / untraced[command]);
        }
        println!();
    }
    println!("leaktrace's last report on redis after the load: {verdict}");
    Ok(())
}

/// One redis-server, benchmarked once in `mode`: requests a second per
/// command, and with leaktrace the verdict of a report taken at rest.
fn redis_run(leaktrace: &Path, mode: RedisMode) -> anyhow::Result<(Vec<f64>, Option<String>)> {
    let server = KillOnDrop(
        Command::new("redis-server")
            .args(["--port", PORT, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .spawn()
            .context("failed to start redis-server")?,
    );
    wait_listening()?;
    let pid = server.0.id();
    let mut tracer = match mode {
        RedisMode::Untraced => None,
        RedisMode::Traced => Some(Tracer::leaktrace(leaktrace, pid, "2", &["--json"])?),
        RedisMode::Sampled => {
            Some(Tracer::leaktrace(leaktrace, pid, "2", &["--json", "-s", "10"])?)
        }
    };
    let output = Command::new("redis-benchmark")
        .args(["-p", PORT, "-n", "100000", "-c", "20", "-d", "256", "-q", "--csv"])
        .args(["-t", "set,get,lpush,lpop"])
        .output()
        .context("failed to run redis-benchmark")?;
    ensure_success(&output.status, "redis-benchmark")?;
    let rates = parse_csv(&String::from_utf8_lossy(&output.stdout))?;
    // At rest after the load, the next reports: redis holds flat memory.
    let said = match tracer.as_mut() {
        Some(tracer) => {
            let mut last = None;
            let mut seen = 0;
            tracer.wait_for(
                "three reports at rest",
                REPORT_TIMEOUT * 3 + ATTACH_TIMEOUT,
                |line| {
                    if !line.from_stdout {
                        return false;
                    }
                    if let Ok(report) = serde_json::from_str::<leaktrace_report::Report>(&line.text)
                    {
                        last = report.verdict.map(|verdict| verdict.text);
                        seen += 1;
                    }
                    seen >= 5
                },
            )?;
            last
        }
        None => None,
    };
    if let Some(tracer) = tracer {
        tracer.stop()?;
    }
    drop(server);
    Ok((rates, said))
}

fn ensure_success(status: &std::process::ExitStatus, what: &str) -> anyhow::Result<()> {
    if !status.success() {
        bail!("{what} failed: {status}");
    }
    Ok(())
}

/// Waits until redis accepts connections on [`PORT`].
fn wait_listening() -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(format!("127.0.0.1:{PORT}")).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("redis-server did not listen on port {PORT} within 10 s")
}

/// `"SET","90252.71",...` lines: requests a second per command, in
/// [`COMMANDS`] order.
fn parse_csv(text: &str) -> anyhow::Result<Vec<f64>> {
    COMMANDS
        .iter()
        .map(|command| {
            text.lines()
                .find_map(|line| {
                    let mut fields = line.split(',').map(|field| field.trim_matches('"'));
                    let name = fields.next()?;
                    let rate = fields.next()?.parse::<f64>().ok()?;
                    (name == *command).then_some(rate)
                })
                .with_context(|| format!("no {command} in redis-benchmark's output:\n{text}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that redis-benchmark's CSV is read (it quotes every field).
    #[test]
    fn csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"90252.71\",\"0.150\"\n\
            \"GET\",\"90497.73\",\"0.140\"\n\"LPUSH\",\"90579.71\",\"0.150\"\n\"LPOP\",\"92592.59\",\"0.140\"\n";
        assert_eq!(parse_csv(text).unwrap(), [90252.71, 90497.73, 90579.71, 92592.59]);
    }
}
