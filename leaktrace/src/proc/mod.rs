//! The one reader of a process's /proc files: its mappings (maps), its
//! memory (smaps and statm, in [`memory`]), its tasks, and its limits.
//! Every stage that needs the target's mappings reads them here, through
//! procfs, as [`MemoryMap`]s or the views below.

mod classify;
pub mod memory;

/// The memory picture of a real glibc process, for tests of later stages.
#[cfg(test)]
pub fn sample_picture() -> leaktrace_report::MemoryPicture {
    classify::classify(&classify::tests::sample())
}

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use procfs::process::{LimitValue, MMPermissions, MMapPath, MemoryMap, Process};

/// The process `pid`, or an error naming its /proc path.
pub fn process(pid: u32) -> Result<Process> {
    let raw_pid = i32::try_from(pid).with_context(|| format!("pid {pid} is out of range"))?;
    Process::new(raw_pid).with_context(|| format!("failed to read /proc/{pid}"))
}

/// Whether `pid` is gone (or a zombie).
pub fn has_exited(pid: u32) -> bool {
    !process(pid)
        .and_then(|process| Ok(process.stat()?))
        .is_ok_and(|stat| !matches!(stat.state, 'Z' | 'X'))
}

/// Every mapping of `pid`, in address order.
pub fn maps(pid: u32) -> Result<Vec<MemoryMap>> {
    let process = process(pid)?;
    let maps = process.maps().with_context(|| format!("failed to read /proc/{pid}/maps"))?;
    Ok(maps.0)
}

/// An executable mapping of a file: what the unwinder publishes to the
/// kernel and the symbolizer resolves addresses in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecMapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of the mapping's first byte.
    pub offset: u64,
    /// (device, inode): the same file mapped twice is one object.
    pub file: (u64, u64),
    /// The path as the target names it.
    pub path: PathBuf,
}

/// The file-backed executable mappings among `maps`.
pub fn exec_mappings(maps: &[MemoryMap]) -> Vec<ExecMapping> {
    maps.iter()
        .filter(|map| map.perms.contains(MMPermissions::EXECUTE))
        .filter_map(|map| match &map.pathname {
            MMapPath::Path(path) => Some(ExecMapping {
                start: map.address.0,
                end: map.address.1,
                offset: map.offset,
                file: ((map.dev.0 as u64) << 32 | map.dev.1 as u64, map.inode),
                path: path.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// The address ranges of `maps`, sorted.
pub fn ranges(maps: &[MemoryMap]) -> Vec<(u64, u64)> {
    maps.iter().map(|map| map.address).collect()
}

/// The files mapped into `pid` as the target names them, its executable
/// first, each once, in mapping order.
pub fn mapped_files(pid: u32) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = process(pid)?.exe() {
        files.push(exe);
    }
    for map in maps(pid)? {
        if let MMapPath::Path(path) = map.pathname {
            if !files.contains(&path) {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// The number of threads of `pid` (entries in /proc/PID/task).
pub fn thread_count(pid: u32) -> Result<u64> {
    let tasks =
        process(pid)?.tasks().with_context(|| format!("failed to list /proc/{pid}/task"))?;
    let mut threads = 0;
    for task in tasks {
        // Threads that exit during the listing are skipped by procfs; what is
        // left here is a failure to read the directory itself.
        task.with_context(|| format!("failed to list /proc/{pid}/task"))?;
        threads += 1;
    }
    Ok(threads)
}

/// The soft RLIMIT_STACK of `pid`: glibc's default thread stack size.
pub fn stack_limit(pid: u32) -> Option<u64> {
    let limits = process(pid).ok()?.limits().ok()?;
    match limits.max_stack_size.soft_limit {
        LimitValue::Value(bytes) => Some(bytes),
        LimitValue::Unlimited => None,
    }
}

/// `path` as the target sees it, opened from leaktrace's mount namespace
/// through /proc/PID/root.
pub fn through_root(pid: u32, path: &Path) -> PathBuf {
    match path.strip_prefix("/") {
        Ok(relative) => PathBuf::from(format!("/proc/{pid}/root")).join(relative),
        Err(_) => path.to_path_buf(),
    }
}

/// The file mapped at `[start, end)` in `pid`, whatever its path says: the
/// very file mapped, in any mount namespace, deleted or replaced since.
pub fn map_file(pid: u32, start: u64, end: u64) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"))
}
