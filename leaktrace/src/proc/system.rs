//! The machine's memory from /proc: meminfo (procfs), slabinfo, and each
//! process's statm (cheap: one small file per process, never a walk of
//! smaps).

use std::{collections::HashMap, path::Path};

use anyhow::Context as _;
use procfs::{Current as _, Meminfo};

/// The meminfo figures the system picture follows, by their JSON name, in
/// bytes.
pub fn meminfo() -> anyhow::Result<Vec<(&'static str, u64)>> {
    let info = Meminfo::current().context("failed to read /proc/meminfo")?;
    let figures = [
        ("mem_total", Some(info.mem_total)),
        ("mem_available", info.mem_available),
        ("anon_pages", info.anon_pages),
        ("shmem", info.shmem),
        ("slab_reclaimable", info.s_reclaimable),
        ("slab_unreclaimable", info.s_unreclaim),
        ("kernel_stack", info.kernel_stack),
        ("page_tables", info.page_tables),
        ("vmalloc_used", Some(info.vmalloc_used)),
        ("percpu", info.per_cpu),
    ];
    Ok(figures.into_iter().filter_map(|(name, value)| Some((name, value?))).collect())
}

/// One line of /proc/slabinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slab {
    pub name: String,
    /// Active objects times the object size.
    pub bytes: u64,
}

/// Every slab cache. /proc/slabinfo is readable by root only.
pub fn slabinfo() -> anyhow::Result<Vec<Slab>> {
    let text =
        std::fs::read_to_string("/proc/slabinfo").context("failed to read /proc/slabinfo")?;
    Ok(parse_slabinfo(&text))
}

/// `name active_objs num_objs objsize ...`, after two header lines.
fn parse_slabinfo(text: &str) -> Vec<Slab> {
    text.lines()
        .filter(|line| !line.starts_with("slabinfo") && !line.starts_with('#'))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?.to_string();
            let active: u64 = words.next()?.parse().ok()?;
            let _total: u64 = words.next()?.parse().ok()?;
            let size: u64 = words.next()?.parse().ok()?;
            Some(Slab { name, bytes: active * size })
        })
        .collect()
}

/// Whether the kernel may reclaim a slab cache's objects under pressure
/// (SLAB_RECLAIM_ACCOUNT: dentries, inodes). Unknown caches are not.
pub fn slab_reclaimable(name: &str) -> bool {
    let path = Path::new("/sys/kernel/slab").join(name).join("reclaim_account");
    std::fs::read_to_string(path).is_ok_and(|text| text.trim() == "1")
}

/// One process's memory, from statm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessMemory {
    pub pid: u32,
    pub comm: String,
    pub rss: u64,
    /// Resident less shared (file-backed and shmem): its anonymous memory.
    pub uss: u64,
}

/// Every process's memory (kernel threads, with none, are left out).
pub fn processes() -> anyhow::Result<Vec<ProcessMemory>> {
    let page_size = procfs::page_size();
    let all = procfs::process::all_processes().context("failed to list /proc")?;
    Ok(all
        .filter_map(Result::ok)
        .filter_map(|process| {
            let statm = process.statm().ok()?;
            if statm.size == 0 {
                return None;
            }
            let pid = u32::try_from(process.pid).ok()?;
            let comm = comm(pid).unwrap_or_default();
            Some(ProcessMemory {
                pid,
                comm,
                rss: statm.resident * page_size,
                uss: statm.resident.saturating_sub(statm.shared) * page_size,
            })
        })
        .collect())
}

/// A process's name, from /proc/PID/comm.
pub fn comm(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(text.trim_end().to_string())
}

/// Names of processes seen, kept once they have exited: kernel memory is
/// often still held by a process that has gone.
#[derive(Default)]
pub struct Comms {
    known: HashMap<u32, String>,
}

impl Comms {
    pub fn get(&mut self, pid: u32) -> String {
        if let Some(comm) = self.known.get(&pid) {
            return comm.clone();
        }
        let comm = comm(pid).unwrap_or_else(|| "?".to_string());
        self.known.insert(pid, comm.clone());
        comm
    }

    pub fn remember(&mut self, pid: u32, comm: &str) {
        self.known.insert(pid, comm.to_string());
    }
}

/// The number of open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> anyhow::Result<u64> {
    let entries = std::fs::read_dir(format!("/proc/{}/fd", super::reader(pid)))
        .with_context(|| format!("failed to read /proc/{pid}/fd"))?;
    Ok(entries.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that slabinfo's header is skipped and bytes are active objects
    /// times their size.
    #[test]
    fn slabinfo_lines() {
        let text = "slabinfo - version: 2.1\n\
            # name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables\n\
            filp                 546    546    192   21    1 : tunables    0    0    0 : slabdata     26     26      0\n\
            kmalloc-64          1000   1024     64   64    1 : tunables    0    0    0 : slabdata 16 16 0\n";
        let slabs = parse_slabinfo(text);
        assert_eq!(slabs.len(), 2);
        assert_eq!(slabs[0], Slab { name: "filp".into(), bytes: 546 * 192 });
        assert_eq!(slabs[1].bytes, 64_000);
    }
}
