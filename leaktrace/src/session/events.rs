//! The event sources of the session's loop besides its timers: the
//! signals that end it, the programs' records of changed mappings (with a
//! held `-c` target let go once they are published), and the programs' log.

use std::{
    io,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use aya::maps::{MapData, RingBuf};
use aya_log::EbpfLogger;
use bytes::Buf as _;
use leaktrace_common::{MappingsChanged, TraceEvent, CHANGE_EXEC, TRACE_ALLOC, TRACE_FREE};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    time::{interval, sleep_until, Interval, MissedTickBehavior},
};

use crate::{collect::monotonic_ns, unwind::Unwinder};

/// The signals that end a session with a final report.
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> anyhow::Result<Self> {
        let install = |kind: SignalKind| signal(kind).context("failed to install a signal handler");
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            // A closed terminal: the report still gets written where it can.
            hangup: install(SignalKind::hangup())?,
        })
    }

    pub async fn any(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = self.hangup.recv() => {}
        }
    }
}

/// The programs' log records, read as they come.
pub type Logger = EbpfLogger<&'static dyn log::Log>;

/// Wake the loop when `inner`'s descriptor has something to read.
pub fn watch<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor (a ring buffer map's), which stays
    // open and the same for as long as the AsyncFd, which owns `inner`.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|err| err.into_parts().1)
}

pub fn poll_every(period: Duration) -> Interval {
    let mut poll = interval(period);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    poll
}

/// Resolves at `deadline`, or never.
pub async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the target's mappings changed (an exec, or the dynamic
/// linker's hook: start-up, dlopen, dlclose), with what the programs said.
pub async fn mappings_changed(changes: &mut AsyncFd<RingBuf<MapData>>) -> Vec<Change> {
    let Ok(mut guard) = changes.readable_mut().await else {
        return std::future::pending().await;
    };
    let mut records = Vec::new();
    while let Some(item) = guard.get_inner_mut().next() {
        records.extend(Change::parse(&item));
    }
    guard.clear_ready();
    records
}

/// One record of the programs' `MappingsChanged`.
pub struct Change {
    pub cause: u32,
    pub held: bool,
    pub time_ns: u64,
}

impl Change {
    /// The record's fields, in the order and sizes of `MappingsChanged`.
    fn parse(mut record: &[u8]) -> Option<Self> {
        if record.remaining() < std::mem::size_of::<MappingsChanged>() {
            return None;
        }
        let cause = record.get_u32_le();
        let held = record.get_u32_le() != 0;
        let time_ns = record.get_u64_le();
        Some(Self { cause, held, time_ns })
    }
}

/// Publish the new mappings, then let a held target go, saying how long
/// it waited.
pub fn after_change(changes: &[Change], unwinder: &mut Unwinder, unwinding: &mut bool) {
    if *unwinding {
        *unwinding = keep_unwinding(unwinder);
    }
    let Some(first) = changes.iter().filter(|change| change.held).min_by_key(|c| c.time_ns) else {
        return;
    };
    resume(unwinder.pid());
    let waited = monotonic_ns().saturating_sub(first.time_ns);
    let cause = if first.cause == CHANGE_EXEC { "exec" } else { "the dynamic linker's hook" };
    log::info!(
        "held pid {} for {:.2} ms at {cause}, until its mappings were published",
        unwinder.pid(),
        waited as f64 / 1e6
    );
}

/// SIGCONT: a target held where its mappings changed goes on.
pub fn resume(pid: u32) {
    // SAFETY: a plain syscall; the target is our own `-c` child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
}

/// Publish the target's mappings if they changed. Returns whether to go on:
/// not once the target is gone, or after an error, which is said once.
pub fn keep_unwinding(unwinder: &mut Unwinder) -> bool {
    match unwinder.refresh() {
        Ok(_) => true,
        Err(err) => {
            if !crate::proc::has_exited(unwinder.pid()) {
                eprintln!("leaktrace: warning: unwind tables no longer kept current: {err:#}");
            }
            false
        }
    }
}

/// Resolves once the programs' log records that arrived are written out.
pub async fn flush_log(logger: &mut Option<AsyncFd<Logger>>) {
    let Some(logger) = logger else {
        return std::future::pending().await;
    };
    match logger.readable_mut().await {
        Ok(mut guard) => {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
        Err(_) => std::future::pending().await,
    }
}

pub fn flush_now(logger: &mut Option<AsyncFd<Logger>>) {
    if let Some(logger) = logger {
        logger.get_mut().flush();
    }
}

/// `-t`: the trace events printed on stderr, at most [`TRACE_LINES_PER_SECOND`]
/// lines a second; the others are counted and the count said.
///
/// The lines are written by a thread of their own, through a queue of
/// [`TRACE_QUEUE`] lines: stderr may be a pipe nobody reads, and a write
/// to a full pipe blocks. The loop never waits on it (it must still see
/// SIGINT, and the target pays for every moment the probes stay): a line
/// that finds the queue full is dropped and counted. The thread writes
/// to the descriptor itself, not through std's locked stderr, so that
/// leaktrace's other messages never queue behind a blocked write.
#[derive(Default)]
pub struct TraceLines {
    window: Option<Instant>,
    printed: u64,
    dropped: u64,
    dropped_total: u64,
    /// Lines the writer had no room for.
    unwritten: u64,
    writer: Option<std::sync::mpsc::SyncSender<String>>,
    written: Option<std::thread::JoinHandle<()>>,
}

/// The most `-t` lines printed in a second.
const TRACE_LINES_PER_SECOND: u64 = 1000;
/// Lines waiting for the writer before more are dropped.
const TRACE_QUEUE: usize = 4096;

impl TraceLines {
    /// Queue a line for stderr; false when the queue is full (or the
    /// writer gone).
    fn send(&mut self, line: String) -> bool {
        let written = &mut self.written;
        let writer = self.writer.get_or_insert_with(|| {
            let (sender, receiver) = std::sync::mpsc::sync_channel::<String>(TRACE_QUEUE);
            *written = Some(std::thread::spawn(move || {
                for mut line in receiver {
                    line.push('\n');
                    write_stderr(line.as_bytes());
                }
            }));
            sender
        });
        writer.try_send(line).is_ok()
    }

    /// Resolves once the events that arrived are queued (or counted).
    pub async fn print(&mut self, events: &mut Option<AsyncFd<RingBuf<MapData>>>) {
        let Some(events) = events else {
            return std::future::pending().await;
        };
        let Ok(mut guard) = events.readable_mut().await else {
            return std::future::pending().await;
        };
        while let Some(item) = guard.get_inner_mut().next() {
            let Some(line) = trace_line(&item) else { continue };
            let now = Instant::now();
            if self.window.is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1)) {
                if self.dropped > 0 {
                    let count = format!("leaktrace: trace: {} lines not shown (over {TRACE_LINES_PER_SECOND} a second)", self.dropped);
                    if !self.send(count) {
                        self.unwritten += 1;
                    }
                }
                self.window = Some(now);
                self.printed = 0;
                self.dropped = 0;
            }
            if self.printed < TRACE_LINES_PER_SECOND {
                self.printed += 1;
                if !self.send(line) {
                    self.unwritten += 1;
                }
            } else {
                self.dropped += 1;
                self.dropped_total += 1;
            }
        }
        guard.clear_ready();
    }

    /// Say how many lines were not shown in all: queued, never waited for.
    pub fn finish(&mut self) {
        if self.dropped_total > 0 {
            let count = format!(
                "leaktrace: trace: {} lines not shown in all (over {TRACE_LINES_PER_SECOND} a second)",
                self.dropped_total
            );
            self.send(count);
        }
        if self.unwritten > 0 {
            let count = format!(
                "leaktrace: trace: {} lines dropped: standard error did not take them",
                self.unwritten
            );
            self.send(count);
        }
        // What is queued goes out, unless stderr stays blocked.
        self.writer = None;
        if let Some(written) = self.written.take() {
            let deadline = Instant::now() + TRACE_DRAIN;
            while !written.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// How long the queued `-t` lines may take to be written at the end.
const TRACE_DRAIN: Duration = Duration::from_secs(1);

/// Write `bytes` to file descriptor 2 directly (std's stderr is behind a
/// lock a blocked write would hold); errors end the write, as a closed
/// stderr does.
fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: a valid buffer of `bytes.len()` bytes.
        let written = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        match usize::try_from(written) {
            Ok(0) => return,
            Ok(count) => bytes = &bytes[count..],
            Err(_) if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// One `TraceEvent` as a line: `alloc tid=42 size=64 addr=0x...`.
fn trace_line(mut record: &[u8]) -> Option<String> {
    if record.remaining() < std::mem::size_of::<TraceEvent>() {
        return None;
    }
    let kind = record.get_u32_le();
    let tid = record.get_u32_le();
    let address = record.get_u64_le();
    let size = record.get_u64_le();
    Some(match kind {
        TRACE_ALLOC => format!("trace: alloc tid={tid} size={size} addr={address:#x}"),
        TRACE_FREE => format!("trace: free tid={tid} addr={address:#x}"),
        _ => return None,
    })
}
