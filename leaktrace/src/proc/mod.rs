//! The one reader of a process's /proc files: its mappings (maps), its
//! memory (smaps and statm, in [`memory`]), its tasks, and its limits.
//! Every stage that needs the target's mappings reads them here, through
//! procfs, as [`MemoryMap`]s or the views below.

mod classify;
pub mod memory;
pub mod system;

/// The memory picture of a real glibc process, for tests of later stages.
#[cfg(test)]
pub fn sample_picture() -> leaktrace_report::MemoryPicture {
    classify::classify(&classify::tests::sample())
}

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use procfs::process::{LimitValue, MMPermissions, MMapPath, MemoryMap, Process};

/// The process `pid`, or an error naming its /proc path. Read through a
/// live thread when its main thread has exited (see [`reader`]).
pub fn process(pid: u32) -> Result<Process> {
    let reader = reader(pid);
    let raw_pid = i32::try_from(reader).with_context(|| format!("pid {pid} is out of range"))?;
    Process::new(raw_pid).with_context(|| format!("failed to read /proc/{pid}"))
}

/// Whether a task's state letter is a zombie's or a dead one's.
fn ended_state(state: char) -> bool {
    matches!(state, 'Z' | 'X')
}

/// The task's state letter (/proc/ID/stat), if it can be read: `ID` may be
/// any thread's id.
fn task_state(id: u32) -> std::io::Result<char> {
    let stat = std::fs::read_to_string(format!("/proc/{id}/stat"))?;
    // "pid (comm) S ...": comm may hold spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .ok_or_else(|| std::io::Error::other("unexpected /proc stat line"))
}

/// A thread of process `pid` that has not exited, if any: the main thread
/// unless it has (a program whose main thread called `pthread_exit` runs
/// on in its other threads, while the main thread is a zombie). The
/// kernel answers /proc/TID/ for any thread: `maps`, `map_files`, `exe`,
/// `root` and `statm` of a zombie main thread are empty or refused, those
/// of a live thread are the process's.
pub fn live_thread(pid: u32) -> Option<u32> {
    if task_state(pid).is_ok_and(|state| !ended_state(state)) {
        return Some(pid);
    }
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&tid| tid != pid && task_state(tid).is_ok_and(|state| !ended_state(state)))
}

/// The id under which to read process `pid` in /proc: its main thread, or
/// a live thread once the main thread has exited.
pub fn reader(pid: u32) -> u32 {
    live_thread(pid).unwrap_or(pid)
}

/// Whether `pid` is gone (or a zombie, every thread of it). An error other
/// than the process being gone (out of file descriptors, say) is not an
/// exit.
pub fn has_exited(pid: u32) -> bool {
    match task_state(pid) {
        Ok(state) if !ended_state(state) => false,
        Ok(_) => live_thread(pid).is_none(),
        Err(err) => matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)),
    }
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

/// A file mapped into a process: its path as the process names it, and one
/// of its mappings, through which it can be opened whatever the path says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedFile {
    pub path: PathBuf,
    pub start: u64,
    pub end: u64,
}

/// The files mapped into `pid`, its executable first, each once, in
/// mapping order.
pub fn mapped_files(pid: u32) -> Result<Vec<MappedFile>> {
    let maps = maps(pid)?;
    let mut files: Vec<MappedFile> = Vec::new();
    for map in &maps {
        if let MMapPath::Path(path) = &map.pathname {
            if !files.iter().any(|file| &file.path == path) {
                let (start, end) = map.address;
                files.push(MappedFile { path: path.clone(), start, end });
            }
        }
    }
    // The executable: the file of the same inode as /proc/PID/exe.
    let exe_inode = std::fs::metadata(format!("/proc/{}/exe", reader(pid))).map(|exe| exe.ino());
    let exe_path = maps.iter().find_map(|map| match &map.pathname {
        MMapPath::Path(path) if exe_inode.as_ref().is_ok_and(|&inode| inode == map.inode) => {
            Some(path)
        }
        _ => None,
    });
    if let Some(at) = files.iter().position(|file| Some(&file.path) == exe_path) {
        let exe = files.remove(at);
        files.insert(0, exe);
    }
    Ok(files)
}

/// The path of a mapped file as the target names it, without the
/// " (deleted)" the kernel appends to a file removed since it was mapped.
pub fn shown_path(path: &Path) -> PathBuf {
    let text = path.as_os_str().to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(kept) => PathBuf::from(kept),
        None => path.to_path_buf(),
    }
}

/// The resident memory of `pid` in bytes (/proc/PID/statm).
pub fn resident_bytes(pid: u32) -> Result<u64> {
    let statm =
        process(pid)?.statm().with_context(|| format!("failed to read /proc/{pid}/statm"))?;
    Ok(statm.resident * procfs::page_size())
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

/// `pid` as the process's own PID namespace numbers it, when that is not
/// the caller's (a container's): the last of NSpid in /proc/PID/status.
pub fn pid_in_namespace(pid: u32) -> Option<u32> {
    let nspid = process(pid).ok()?.status().ok()?.nspid?;
    let inner = *nspid.last()?;
    (nspid.len() > 1).then_some(inner as u32)
}

/// A file's (device, inode), the device packed as /proc/PID/maps gives it
/// (`major << 32 | minor`): one identity for a file, mapped or opened.
pub fn file_key(path: &Path) -> std::io::Result<(u64, u64)> {
    let metadata = std::fs::metadata(path)?;
    let device = metadata.dev();
    Ok((u64::from(libc::major(device)) << 32 | u64::from(libc::minor(device)), metadata.ino()))
}

/// The inode of the kernel's first PID namespace (PROC_PID_INIT_INO).
const INIT_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// This process's PID namespace, as the device and inode of
/// /proc/self/ns/pid, when it is not the kernel's first (leaktrace runs in
/// a container): the PIDs it reads and is given are numbered there.
pub fn own_pid_namespace() -> Option<(u64, u64)> {
    let ns = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (ns.ino() != INIT_PID_NAMESPACE).then_some((ns.dev(), ns.ino()))
}

/// The kernel ids of `pid`'s threads.
pub fn task_ids(pid: u32) -> Result<Vec<u32>> {
    let tasks =
        process(pid)?.tasks().with_context(|| format!("failed to list /proc/{pid}/task"))?;
    Ok(tasks.filter_map(|task| task.ok()).map(|task| task.tid as u32).collect())
}

/// The size of the stack thread `tid` of `pid` runs on, its guard page
/// included: the mapping around its stack pointer, read from
/// /proc/PID/task/TID/syscall while the thread is blocked (`None` while it
/// runs, or on the main thread's `[stack]`).
pub fn thread_stack_size(pid: u32, tid: u32, maps: &[MemoryMap]) -> Option<u64> {
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    let sp = stack_pointer_of(&syscall)?;
    let at = maps.iter().position(|map| map.address.0 <= sp && sp < map.address.1)?;
    let map = &maps[at];
    if map.pathname == MMapPath::Stack {
        return None;
    }
    let mut size = map.address.1 - map.address.0;
    // glibc and musl keep a PROT_NONE guard just below.
    if let Some(guard) = at.checked_sub(1).map(|below| &maps[below]) {
        if guard.address.1 == map.address.0 && guard.perms == MMPermissions::PRIVATE {
            size += guard.address.1 - guard.address.0;
        }
    }
    Some(size)
}

/// The stack pointer in a /proc/PID/task/TID/syscall line: "NR args... SP
/// PC", or "-1 SP PC" when blocked outside a system call, or "running".
fn stack_pointer_of(syscall: &str) -> Option<u64> {
    let fields: Vec<&str> = syscall.split_whitespace().collect();
    if fields.len() < 3 {
        return None;
    }
    let sp = fields[fields.len() - 2];
    u64::from_str_radix(sp.strip_prefix("0x").unwrap_or(sp), 16).ok()
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
        Ok(relative) => PathBuf::from(format!("/proc/{}/root", reader(pid))).join(relative),
        Err(_) => path.to_path_buf(),
    }
}

/// The file mapped at `[start, end)` in `pid`, whatever its path says: the
/// very file mapped, in any mount namespace, deleted or replaced since.
pub fn map_file(pid: u32, start: u64, end: u64) -> PathBuf {
    PathBuf::from(format!("/proc/{}/map_files/{start:x}-{end:x}", reader(pid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that the stack pointer is read from each shape of a syscall line.
    #[test]
    fn syscall_stack_pointer() {
        let blocked = "202 0x7f0 0x80 0x0 0x0 0x0 0x0 0x7f1234567e40 0x7f12345abcd0\n";
        assert_eq!(stack_pointer_of(blocked), Some(0x7f12_3456_7e40));
        assert_eq!(stack_pointer_of("-1 0x7ffd0000f000 0x401000\n"), Some(0x7ffd_0000_f000));
        assert_eq!(stack_pointer_of("running\n"), None);
    }

    /// Check that a thread of this test process, blocked, is found on a
    /// stack of the size it asked for, guard included.
    #[test]
    fn blocked_thread_stack() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
                let _ = rx.recv();
            })
            .unwrap();
        let tid = tid_rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let pid = std::process::id();
        let size = thread_stack_size(pid, tid, &maps(pid).unwrap());
        drop(tx);
        thread.join().unwrap();
        // Rust adds glibc's guard and rounds to pages.
        let size = size.expect("a blocked thread's stack is found");
        assert!((1 << 20..=(1 << 20) + (64 << 10)).contains(&size), "{size}");
    }
}
