//! leaktrace's report model: one report as plain data, `Serialize` and
//! `Deserialize`, so that what leaktrace writes (`--json`) its tests, its
//! bench and a diff of two runs read back as the same types.
//!
//! The JSON field names are a contract for scripts (see the README): fields
//! are added, never renamed. `schema` changes when a field changes meaning.
//! Nothing here renders prose: leaktrace's `report::text` does that.

mod frame;
mod memory;
pub mod pprof;
mod system;
mod verdict;

use std::{collections::BTreeMap, io::BufRead};

pub use frame::{is_runtime_frame, is_runtime_symbol, short_module, site_label, Frame};
pub use leaktrace_common::{KernelKind, Lost, StackEnd};
pub use memory::{MemoryDelta, MemoryPicture, MemoryReport, Usage};
use serde::{Deserialize, Serialize};
pub use system::{FdReport, KernelSummary, ProcessReport, ProcessShare, SlabReport, SystemReport};
pub use verdict::{
    Finding, ReplacingSite, ThreadFinding, Verdict, VerdictKind, KERNEL_LEAK_MIN_SHARE,
};

/// The version of this model that a report was written with.
pub const SCHEMA: u32 = 1;

/// What a JSON line holds (its `type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    #[default]
    Report,
    /// `leaktrace diff`: two runs' final reports compared.
    Diff,
}

/// One report: what the target holds now, and why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    #[serde(rename = "type")]
    pub kind: RecordKind,
    /// [`SCHEMA`] when written.
    #[serde(default)]
    pub schema: u32,
    #[serde(rename = "final")]
    pub is_final: bool,
    /// RFC 3339, to the second.
    pub time: String,
    pub pid: u32,
    /// The target's PID inside its own PID namespace (a container's), when
    /// that is not leaktrace's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_in_namespace: Option<u32>,
    /// The target exited during tracing.
    pub exited: bool,
    /// The target exec'd a program since attach: what its old image held
    /// was dropped, and this is what the new one holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecEvent>,
    /// How a `-c` program ended (leaktrace is its parent and reaps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Ended>,
    /// Allocations younger than this are left out.
    pub older_ms: u64,
    pub totals: Totals,
    /// Stacks holding memory in all, of which `stacks` shows the top ones.
    pub stack_count: usize,
    pub stacks: Vec<StackReport>,
    /// Every way an event can be lost, with its count.
    pub lost: BTreeMap<Lost, u64>,
    /// Threads created since attach, per creating call site.
    #[serde(default)]
    pub threads: Option<ThreadsReport>,
    /// The process's memory from /proc; absent once it has exited.
    #[serde(default)]
    pub memory: Option<MemoryReport>,
    #[serde(default)]
    pub verdict: Option<Verdict>,
    /// Frees since attach of memory allocated before it.
    #[serde(default)]
    pub freed_before_attach: Option<PreattachFrees>,
    /// What was probed in which object.
    #[serde(default)]
    pub probed: Vec<ProbedObject>,
    /// The target's executable mappings of files, for profiles that
    /// symbolize on a server from the build id (pprof's Mappings).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mappings: Vec<MappingReport>,
    /// One heap allocation in this many was tracked; heap figures are scaled.
    #[serde(default = "one")]
    pub sample_rate: u64,
    /// How the heap was sampled, when it was (`sample_rate` > 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
    /// The system mode (no `-p`): the machine's memory picture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemReport>,
    /// Kernel allocations traced (`--kernel`, the system mode); their stacks
    /// are in `stacks`, each with its `kind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelSummary>,
    /// The target's open file descriptors (`--kernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fds: Option<FdReport>,
    /// Pushes to a profiling backend so far (`--push`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushCounts>,
    /// A diff's two inputs (`"type": "diff"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<DiffInputs>,
}

/// Pushes made to a profiling backend, one per report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushCounts {
    pub sent: u64,
    pub failed: u64,
}

/// What `leaktrace diff` compared: each file's final report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiffInputs {
    pub before: String,
    pub after: String,
    /// Seconds traced in each (from their first to their last report).
    pub before_time: String,
    pub after_time: String,
}

/// One outstanding allocation (`-a`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocReport {
    #[serde(serialize_with = "frame::hex", deserialize_with = "frame::from_hex")]
    pub address: u64,
    pub size: u64,
    /// How long it has been outstanding, to a quarter of `older_ms`.
    pub age_ms: u64,
}

/// A stack's change between two runs (`leaktrace diff`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackDelta {
    pub bytes_before: u64,
    pub allocations_before: u64,
    /// After less before.
    pub bytes: i64,
    pub allocations: i64,
}

fn one() -> u64 {
    1
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub bytes: u64,
    pub allocations: u64,
}

/// The target's last exec since attach.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecEvent {
    /// The program it runs now.
    pub program: String,
    /// Seconds after attach.
    pub after_seconds: f64,
    /// Execs since attach.
    pub count: u32,
}

/// How a process leaktrace started ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum Ended {
    /// It exited with this status.
    Exited { code: i32 },
    /// A signal killed it (a crash: SIGSEGV, SIGABRT, ...).
    Killed { signal: i32, name: String, core_dumped: bool },
}

impl Ended {
    /// The exit code of a shell, `time` or `timeout` for this ending:
    /// the status, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match self {
            Ended::Exited { code } => *code,
            Ended::Killed { signal, .. } => 128 + signal,
        }
    }
}

/// An executable mapping of a file in the target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingReport {
    /// The file, as the target names it.
    pub path: String,
    #[serde(serialize_with = "frame::hex", deserialize_with = "frame::from_hex")]
    pub start: u64,
    #[serde(serialize_with = "frame::hex", deserialize_with = "frame::from_hex")]
    pub end: u64,
    /// Offset in the file of the mapping's first byte.
    pub offset: u64,
}

/// Outstanding memory of one call stack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StackReport {
    pub bytes: u64,
    pub allocations: u64,
    /// Innermost first; inlined calls are frames of their own.
    pub frames: Vec<Frame>,
    pub stack_end: StackEnd,
    #[serde(default)]
    pub growth: Option<Growth>,
    /// Kernel memory: its kind (absent for the heap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<KernelKind>,
    /// The slab cache, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// Kernel memory: the processes in whose context it was allocated, most
    /// bytes first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessShare>,
    /// Its outstanding allocations, the oldest first, at most 10 (`-a`);
    /// `allocations` is how many there are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocs: Vec<AllocReport>,
    /// Its change from the first run to the second (`leaktrace diff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<StackDelta>,
    /// Heap memory: which API it came from, the malloc family or mmap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<HeapApi>,
    /// Why its growth is taken for replacement of memory from before
    /// attach, not a leak (its trend is then `replacing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacing: Option<ReplacementEvidence>,
}

/// The API a stack's heap memory came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeapApi {
    /// malloc, calloc, realloc, the aligned ones, operator new, Rust's
    /// allocator, and the allocators' own APIs.
    Malloc,
    /// Anonymous mmap (and mremap) called by the program.
    Mmap,
}

impl HeapApi {
    pub fn as_str(self) -> &'static str {
        match self {
            HeapApi::Malloc => "malloc",
            HeapApi::Mmap => "mmap",
        }
    }
}

/// What ties a growing call site to frees of memory allocated before
/// attach. A site is `replacing` only with evidence about itself: the
/// blocks freed are of its size class (where the allocator's chunk header
/// tells sizes: glibc), and a sample of those frees' stacks passes through
/// a function of its own stack.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplacementEvidence {
    /// Frees a second of pre-attach blocks of this site's size class;
    /// absent where sizes are unknown.
    #[serde(default)]
    pub same_size_frees_per_second: Option<f64>,
    /// The function both this site's stack and the sampled frees' stacks
    /// pass through.
    #[serde(default)]
    pub freed_in: Option<String>,
    /// The sampled frees through that function.
    #[serde(default)]
    pub sampled_frees: u64,
}

/// How `-s N` chose the heap allocations it tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// The allocating functions' probes were attached one window of time
    /// in N (the target took no trap on them between windows); every free
    /// was seen.
    Windows,
    /// One allocation in N, chosen by address; every call trapped.
    Address,
}

/// How a value moved over the last reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trend {
    /// Fewer than 3 samples: too early to say.
    New,
    /// Still rising over the last intervals.
    Growing,
    /// Rose earlier, unchanged for the last intervals.
    Plateau,
    /// Never changed.
    Flat,
    /// Falling.
    Shrinking,
    /// Rising as fast as memory from before attach of its kind is freed:
    /// a structure filled before attach being replaced
    /// ([`StackReport::replacing`] says on what evidence).
    Replacing,
}

impl Trend {
    /// The name used in text and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Trend::New => "new",
            Trend::Growing => "growing",
            Trend::Plateau => "plateau",
            Trend::Flat => "flat",
            Trend::Shrinking => "shrinking",
            Trend::Replacing => "replacing",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Growth {
    /// Recent rate: least-squares slope over the last samples, per second.
    pub bytes_per_second: f64,
    pub trend: Trend,
}

/// Frees since attach of blocks allocated before it: a structure filled
/// before attach (a ring, a pool, an LRU) being replaced. Its new members
/// pile up in the books while these free its old ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PreattachFrees {
    /// Blocks freed since attach that were allocated before it.
    pub count: u64,
    /// Their bytes, when the allocator tells them (glibc's chunk headers).
    pub bytes: Option<u64>,
    /// The recent rate of such frees.
    pub count_per_second: f64,
    pub bytes_per_second: Option<f64>,
    /// Blocks never seen allocated that the allocator freed itself (glibc
    /// empties a thread's cache as it exits): not counted above.
    #[serde(default)]
    pub allocator_frees: u64,
}

/// Threads in the process and where they were created.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadsReport {
    /// Threads in the process now.
    pub live: u64,
    pub sites: Vec<ThreadSiteReport>,
    /// Threads alive now that were not created through pthread_create
    /// since attach (before it, mostly), besides the main thread.
    #[serde(default)]
    pub before_attach: ThreadsBeforeAttach,
}

/// Threads whose creating site is unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadsBeforeAttach {
    pub alive: u64,
    /// Their stacks' size, guard included: the mapping around each one's
    /// stack pointer, or the default stack size for a thread caught running.
    pub stack_bytes: u64,
}

/// The threads created at one pthread_create call site since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadCounts {
    pub created: u64,
    pub alive: u64,
    /// Exited, not joined, not detached: the stack stays mapped.
    pub exited_unjoined: u64,
    pub joined: u64,
    pub detached: u64,
    /// Stack bytes held by the alive and the unjoined.
    pub stack_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThreadSiteReport {
    pub frames: Vec<Frame>,
    pub stack_end: StackEnd,
    #[serde(flatten)]
    pub counts: ThreadCounts,
    /// Trend of the threads alive or unjoined.
    pub trend: Trend,
}

/// What was probed in one object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbedObject {
    /// The object's path as the target names it.
    pub object: String,
    pub functions: Vec<String>,
    /// Where each function's entry probe went.
    #[serde(default)]
    pub probes: Vec<ProbePlacement>,
}

/// Where one function's entry probe sits in its object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbePlacement {
    pub symbol: String,
    /// File offset of the entry probe.
    pub offset: u64,
    /// Bytes past the function's start, over instructions the kernel would
    /// single-step.
    pub skipped: u64,
    /// Another function at the same address, whose probes these are.
    #[serde(default)]
    pub alias_of: Option<String>,
}

impl Report {
    /// The stacks whose innermost frame is the function `name`.
    pub fn stacks_by_first_frame<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a StackReport> {
        self.stacks.iter().filter(move |stack| stack.first_symbol() == Some(name))
    }

    /// Where the allocator API was probed, and at which offsets.
    pub fn probe(&self, symbol: &str) -> Option<(&ProbedObject, &ProbePlacement)> {
        self.probed.iter().find_map(|object| {
            object
                .probes
                .iter()
                .find(|probe| probe.symbol == symbol && probe.alias_of.is_none())
                .map(|probe| (object, probe))
        })
    }
}

impl StackReport {
    /// The symbol of the innermost frame (the allocator's caller).
    pub fn first_symbol(&self) -> Option<&str> {
        self.frames.first().and_then(|frame| frame.symbol.as_deref())
    }

    /// The first frame outside the language runtime's allocation path (the
    /// innermost one if all are inside).
    pub fn first_user_frame(&self) -> Option<&Frame> {
        self.frames.iter().find(|frame| !is_runtime_frame(frame)).or(self.frames.first())
    }
}

/// Why a text could not be read as leaktrace's JSON output.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("failed to read: {0}")]
    Io(#[from] std::io::Error),
    #[error("line {line} is not a leaktrace report: {source}")]
    NotAReport { line: usize, source: serde_json::Error },
    #[error("line {line} is longer than {} MiB: not leaktrace --json output", MAX_LINE >> 20)]
    LineTooLong { line: usize },
    #[error("line {line}: {what} is {value}, more than any process can hold (2^57 bytes)")]
    Implausible { line: usize, what: &'static str, value: u64 },
    #[error("no leaktrace report in it")]
    Empty,
}

/// The longest line read as a report: a report of 10,000 stacks of 128
/// frames with `-a` is ~30 MiB.
pub const MAX_LINE: usize = 64 << 20;

/// The most bytes (or blocks) a report can truthfully count: a 5-level
/// page table maps 2^57 bytes of user space.
pub const MAX_PLAUSIBLE: u64 = 1 << 57;

/// Every report of a `--json` output. Lines that do not start with `{` are
/// skipped (a `-c` program may share stdout); any other line must be a
/// report.
pub fn read_reports(reader: impl BufRead) -> Result<Vec<Report>, ReadError> {
    let mut reports = Vec::new();
    each_report(reader, |report| reports.push(report))?;
    if reports.is_empty() {
        return Err(ReadError::Empty);
    }
    Ok(reports)
}

/// The report a `--json` output ends with: its last final one, else its
/// last. Read as a stream: one line at a time, of at most [`MAX_LINE`]
/// bytes, keeping one report.
pub fn read_last_report(reader: impl BufRead) -> Result<Report, ReadError> {
    let (mut last, mut last_final) = (None, None);
    each_report(reader, |report| {
        if report.is_final {
            last_final = Some(report);
        } else {
            last = Some(report);
        }
    })?;
    last_final.or(last).ok_or(ReadError::Empty)
}

/// Call `each` with every report of `reader`, in order, each checked to
/// hold only counts that can be real.
fn each_report(mut reader: impl BufRead, mut each: impl FnMut(Report)) -> Result<(), ReadError> {
    use std::io::Read as _;
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let read = (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }
        if line.len() > MAX_LINE {
            return Err(ReadError::LineTooLong { line: number });
        }
        if !line.starts_with(b"{") {
            continue;
        }
        let report: Report = serde_json::from_slice(&line)
            .map_err(|source| ReadError::NotAReport { line: number, source })?;
        if let Some((what, value)) = report.implausible() {
            return Err(ReadError::Implausible { line: number, what, value });
        }
        each(report);
    }
    Ok(())
}

impl Report {
    /// The first count of this report that no process could hold, if any:
    /// a report that says so was not written by leaktrace, and its numbers
    /// would overflow a comparison.
    pub fn implausible(&self) -> Option<(&'static str, u64)> {
        let counts = [
            ("the total of bytes", self.totals.bytes),
            ("the total of blocks", self.totals.allocations),
        ]
        .into_iter()
        .chain(self.stacks.iter().flat_map(|stack| {
            [("a stack's bytes", stack.bytes), ("a stack's blocks", stack.allocations)]
        }));
        counts.into_iter().find(|&(_, value)| value > MAX_PLAUSIBLE)
    }
}

#[cfg(test)]
mod tests;
