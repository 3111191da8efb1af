//! Reads the kernel maps into a snapshot: outstanding bytes and allocations
//! per stack, older than `--older`, the lost-event counters, the threads per
//! creating site, and the addresses of a stack.

pub mod kernel;

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap},
    Ebpf,
};
use leaktrace_common::{
    AllocBucket, AllocInfo, Lost, StackEnd, StackSlot, StackStats, ThreadInfo, ThreadSiteStats,
    UserStack, MAP_ALLOCS, MAP_ALLOC_TABLE, MAP_LOST, MAP_MMAPS, MAP_PREATTACH_FREES,
    MAP_PREATTACH_STACKS, MAP_STACKS, MAP_STACK_SLOTS, MAP_STACK_STATS, MAP_THREADS,
    MAP_THREAD_SITES, PREATTACH_BYTES, PREATTACH_CLASSES, PREATTACH_COUNT, PREATTACH_INTERNAL,
    SIZE_CLASSES, SLOT_CLAIMED, THREAD_DETACHED, THREAD_EXITED, THREAD_REGISTERED, YOUNG_EPOCHS,
};
use leaktrace_report::{AllocReport, ThreadCounts};

/// Outstanding memory of one stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackUsage {
    pub stack_id: u32,
    pub bytes: u64,
    pub allocations: u64,
    /// Some of it was mapped by mmap (or mremap), not allocated by the
    /// malloc family.
    pub mapped: bool,
}

/// One reading of the kernel maps.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Stacks holding memory, most bytes first.
    pub stacks: Vec<StackUsage>,
    /// Lost-event counters, in `Lost::ALL` order.
    pub lost: Vec<(Lost, u64)>,
    /// Frees since attach of blocks allocated before it: (count, bytes),
    /// scaled like the heap figures.
    pub preattach_frees: (u64, u64),
    /// Frees of unknown blocks the allocator made itself (glibc's thread
    /// cache at a thread's exit): not pre-attach memory replaced.
    pub allocator_frees: u64,
    /// The pre-attach frees per size class (`leaktrace_common::size_class`),
    /// where the chunk header tells it.
    pub preattach_classes: Vec<u64>,
    /// A sample of the pre-attach frees' stacks: (stack id, frees seen).
    pub preattach_stacks: Vec<(u32, u64)>,
}

impl Snapshot {
    pub fn total_bytes(&self) -> u64 {
        self.stacks.iter().map(|s| s.bytes).sum()
    }

    pub fn total_allocations(&self) -> u64 {
        self.stacks.iter().map(|s| s.allocations).sum()
    }
}

/// How to read the maps: which allocations count as young.
pub struct Collector {
    /// Length of an age epoch in ns, 0 when every allocation is reported.
    pub epoch_ns: u64,
    /// One heap allocation in this many is tracked: heap figures are scaled.
    pub sample_rate: u64,
}

impl Collector {
    /// Read the maps. `mapped` is the target's current address ranges, to
    /// clip mappings it unmapped in part; `None` once it has exited.
    pub fn collect(&self, ebpf: &Ebpf, mapped: Option<&[(u64, u64)]>) -> anyhow::Result<Snapshot> {
        let now_epoch = self.now_epoch();
        // Once the target has exited, all it still held is outstanding,
        // however young: a short program's leaks are its last allocations.
        let young = |epoch: u32| mapped.is_some() && self.is_young(epoch, now_epoch);
        let mut per_stack: HashMap<u32, StackUsage> = HashMap::new();

        for (stack_id, per_cpu) in stack_totals(ebpf)? {
            let (mut bytes, mut allocations) = (0i64, 0i64);
            for stats in per_cpu.iter() {
                bytes += stats.bytes;
                allocations += stats.allocs;
                for slot in &stats.young {
                    if young(slot.epoch) {
                        bytes -= slot.bytes;
                        allocations -= slot.allocs;
                    }
                }
            }
            if bytes > 0 && allocations > 0 {
                let usage = per_stack
                    .entry(stack_id)
                    .or_insert(StackUsage { stack_id, ..StackUsage::default() });
                usage.bytes += bytes as u64 * self.sample_rate;
                usage.allocations += allocations as u64 * self.sample_rate;
            }
        }

        let mmaps: BpfHashMap<&MapData, u64, AllocInfo> =
            BpfHashMap::try_from(map(ebpf, MAP_MMAPS)?)?;
        for entry in mmaps.iter() {
            let (start, info) = entry.context("failed to read the mappings")?;
            if young(info.epoch) {
                continue;
            }
            let bytes = match mapped {
                Some(ranges) => mapped_bytes(start, start.saturating_add(info.size), ranges),
                None => info.size,
            };
            if bytes == 0 {
                continue;
            }
            let usage = per_stack
                .entry(info.stack_id)
                .or_insert(StackUsage { stack_id: info.stack_id, ..StackUsage::default() });
            usage.bytes += bytes;
            usage.allocations += 1;
            usage.mapped = true;
        }

        let mut stacks: Vec<StackUsage> = per_stack.into_values().collect();
        stacks.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.stack_id.cmp(&b.stack_id)));

        let lost = read_lost(ebpf)?;
        let preattach: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map(ebpf, MAP_PREATTACH_FREES)?)?;
        let slot = |index: u32| -> u64 {
            preattach.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
        };
        let preattach_frees =
            (slot(PREATTACH_COUNT) * self.sample_rate, slot(PREATTACH_BYTES) * self.sample_rate);
        let preattach_classes = (0..SIZE_CLASSES)
            .map(|class| slot(PREATTACH_CLASSES + class) * self.sample_rate)
            .collect();
        let free_stacks: PerCpuHashMap<&MapData, u32, u64> =
            PerCpuHashMap::try_from(map(ebpf, MAP_PREATTACH_STACKS)?)?;
        let preattach_stacks = free_stacks
            .iter()
            .filter_map(Result::ok)
            .map(|(stack, per_cpu)| (stack, per_cpu.iter().sum()))
            .collect();
        Ok(Snapshot {
            stacks,
            lost,
            preattach_frees,
            allocator_frees: slot(PREATTACH_INTERNAL) * self.sample_rate,
            preattach_classes,
            preattach_stacks,
        })
    }

    /// The outstanding allocations of the stacks `wanted`, at most `cap` a
    /// stack, the oldest first, with their age (to an epoch).
    pub fn collect_allocs(
        &self,
        ebpf: &Ebpf,
        wanted: &HashSet<u32>,
        cap: usize,
    ) -> anyhow::Result<HashMap<u32, Vec<AllocReport>>> {
        let now_epoch = self.now_epoch();
        let mut per_stack: HashMap<u32, Vec<(u32, u64, u64)>> = HashMap::new();
        let table = crate::bpf::map_entries::<u32, AllocBucket>(map(ebpf, MAP_ALLOC_TABLE)?)
            .with_context(|| format!("failed to read {MAP_ALLOC_TABLE}"))?;
        let in_table = table.iter().flat_map(|(_, bucket)| {
            bucket.keys.iter().zip(bucket.infos).filter(|(key, _)| **key > SLOT_CLAIMED)
        });
        let mut allocs: Vec<(u64, AllocInfo)> =
            in_table.map(|(address, info)| (*address, info)).collect();
        for name in [MAP_ALLOCS, MAP_MMAPS] {
            allocs.extend(
                crate::bpf::map_entries::<u64, AllocInfo>(map(ebpf, name)?)
                    .with_context(|| format!("failed to read {name}"))?,
            );
        }
        for (address, info) in allocs {
            if !wanted.contains(&info.stack_id) || self.is_young(info.epoch, now_epoch) {
                continue;
            }
            let list = per_stack.entry(info.stack_id).or_default();
            list.push((info.epoch, address, info.size));
            // Keep the oldest `cap`, trimmed now and then, not per entry.
            if list.len() >= cap * 8 {
                list.sort_unstable();
                list.truncate(cap);
            }
        }
        let epoch_ms = self.epoch_ns / 1_000_000;
        Ok(per_stack
            .into_iter()
            .map(|(stack_id, mut list)| {
                list.sort_unstable();
                list.truncate(cap);
                let allocs = list
                    .into_iter()
                    .map(|(epoch, address, size)| AllocReport {
                        address,
                        size,
                        age_ms: u64::from(now_epoch.wrapping_sub(epoch)) * epoch_ms,
                    })
                    .collect();
                (stack_id, allocs)
            })
            .collect())
    }

    fn now_epoch(&self) -> u32 {
        epoch_now(self.epoch_ns)
    }

    fn is_young(&self, epoch: u32, now_epoch: u32) -> bool {
        self.epoch_ns != 0 && now_epoch.wrapping_sub(epoch) <= YOUNG_EPOCHS
    }
}

/// The threads created at one pthread_create call site since attach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadSite {
    /// Stack id of the pthread_create call.
    pub site: u32,
    pub counts: ThreadCounts,
    /// The kernel ids of its threads alive now.
    pub alive: Vec<u32>,
    /// The kernel ids of its threads exited and not joined.
    pub unjoined: Vec<u32>,
}

/// Read the thread maps, per creating site, most stack bytes first.
/// `default_stack` stands for threads that got a cached stack from glibc.
pub fn collect_threads(ebpf: &Ebpf, default_stack: u64) -> anyhow::Result<Vec<ThreadSite>> {
    let mut sites: HashMap<u32, ThreadSite> = HashMap::new();
    let site_entry = |sites: &mut HashMap<u32, ThreadSite>, site: u32| {
        sites.remove(&site).unwrap_or(ThreadSite { site, ..ThreadSite::default() })
    };
    let counters: PerCpuHashMap<&MapData, u32, ThreadSiteStats> =
        PerCpuHashMap::try_from(map(ebpf, MAP_THREAD_SITES)?)?;
    for entry in counters.iter() {
        let (site, per_cpu) = entry.context("failed to read the thread sites")?;
        let mut totals = site_entry(&mut sites, site);
        for stats in per_cpu.iter() {
            totals.counts.created += stats.created;
            totals.counts.joined += stats.joined;
            totals.counts.detached += stats.detached_exited;
        }
        sites.insert(site, totals);
    }
    let threads: BpfHashMap<&MapData, u32, ThreadInfo> =
        BpfHashMap::try_from(map(ebpf, MAP_THREADS)?)?;
    for entry in threads.iter() {
        let (tid, info) = entry.context("failed to read the threads")?;
        if info.state & THREAD_REGISTERED == 0 {
            continue; // pthread_create still under way
        }
        let mut totals = site_entry(&mut sites, info.site);
        let exited = info.state & THREAD_EXITED != 0;
        let detached = info.state & THREAD_DETACHED != 0;
        if detached {
            totals.counts.detached += 1;
        }
        if !exited {
            totals.counts.alive += 1;
            totals.alive.push(tid);
        } else if !detached {
            totals.counts.exited_unjoined += 1;
            totals.unjoined.push(tid);
        }
        if !exited || !detached {
            totals.counts.stack_bytes +=
                if info.stack_size == 0 { default_stack } else { info.stack_size };
        }
        sites.insert(info.site, totals);
    }
    let mut sites: Vec<ThreadSite> = sites.into_values().collect();
    sites.sort_by(|a, b| {
        b.counts
            .stack_bytes
            .cmp(&a.counts.stack_bytes)
            .then(b.counts.created.cmp(&a.counts.created))
    });
    Ok(sites)
}

/// The kernel ids of the threads the programs know of: created since
/// attach through pthread_create (or being created).
pub fn known_threads(ebpf: &Ebpf) -> anyhow::Result<HashSet<u32>> {
    let threads: BpfHashMap<&MapData, u32, ThreadInfo> =
        BpfHashMap::try_from(map(ebpf, MAP_THREADS)?)?;
    threads.keys().map(|key| key.context("failed to read the threads")).collect()
}

/// The instruction pointers of a stack, innermost first, and why it ends.
pub fn user_stack(ebpf: &Ebpf, stack_id: u32) -> anyhow::Result<(Vec<u64>, StackEnd)> {
    let stacks: BpfHashMap<&MapData, u32, UserStack> =
        BpfHashMap::try_from(map(ebpf, MAP_STACKS)?)?;
    let stack =
        stacks.get(&stack_id, 0).with_context(|| format!("failed to read stack {stack_id}"))?;
    let len = (stack.len as usize).min(stack.ips.len());
    Ok((stack.ips[..len].to_vec(), StackEnd::from_u32(stack.end)))
}

/// Heap allocations tracked now, and the stacks holding them (young ones
/// too): for the status line before the first report.
pub fn tracked(ebpf: &Ebpf) -> anyhow::Result<(u64, u64)> {
    let (mut allocations, mut stacks) = (0u64, 0u64);
    for per_cpu in stack_totals(ebpf)?.into_values() {
        let held: i64 = per_cpu.iter().map(|stats| stats.allocs).sum();
        if held > 0 {
            allocations += held as u64;
            stacks += 1;
        }
    }
    Ok((allocations, stacks))
}

/// Every stack's totals, per CPU and place: its slots of `STACK_SLOTS` on
/// the CPUs where it holds one, and its `STACK_STATS` entry. They add up
/// (a block allocated on one CPU may be freed on another).
fn stack_totals(ebpf: &Ebpf) -> anyhow::Result<HashMap<u32, Vec<StackStats>>> {
    let mut totals: HashMap<u32, Vec<StackStats>> = HashMap::new();
    let slots: PerCpuArray<&MapData, StackSlot> =
        PerCpuArray::try_from(map(ebpf, MAP_STACK_SLOTS)?)?;
    for index in 0..slots.len() {
        let per_cpu = slots.get(&index, 0).context("failed to read the per-stack totals")?;
        for slot in per_cpu.iter().filter(|slot| slot.tag != 0) {
            totals.entry((slot.tag - 1) as u32).or_default().push(slot.stats);
        }
    }
    let stats: PerCpuHashMap<&MapData, u32, StackStats> =
        PerCpuHashMap::try_from(map(ebpf, MAP_STACK_STATS)?)?;
    for entry in stats.iter() {
        let (stack_id, per_cpu) = entry.context("failed to read the per-stack totals")?;
        totals.entry(stack_id).or_default().extend(per_cpu.iter().copied());
    }
    Ok(totals)
}

/// The lost-event counters, in `Lost::ALL` order.
pub fn read_lost(ebpf: &Ebpf) -> anyhow::Result<Vec<(Lost, u64)>> {
    let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map(ebpf, MAP_LOST)?)?;
    Ok(Lost::ALL
        .iter()
        .map(|&reason| {
            let count =
                counters.get(&(reason as u32), 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0);
            (reason, count)
        })
        .collect())
}

fn map<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a Map> {
    ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The age epoch now, as the programs stamp allocations (`EPOCH`, kept by
/// the session's epoch thread from this): CLOCK_MONOTONIC / `epoch_ns`; 0
/// when no ages are kept.
pub fn epoch_now(epoch_ns: u64) -> u32 {
    if epoch_ns == 0 {
        return 0;
    }
    (monotonic_ns() / epoch_ns) as u32
}

/// Bytes of `[start, end)` still covered by the sorted `ranges`.
fn mapped_bytes(start: u64, end: u64, ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|&(lo, hi)| hi.min(end).saturating_sub(lo.max(start))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that a mapping unmapped in its middle or tail is clipped.
    #[test]
    fn partial_unmap_clips() {
        let ranges = [(0x1000, 0x3000), (0x4000, 0x5000)];
        assert_eq!(mapped_bytes(0x1000, 0x5000, &ranges), 0x3000);
        assert_eq!(mapped_bytes(0x6000, 0x7000, &ranges), 0);
        assert_eq!(mapped_bytes(0x2000, 0x4800, &ranges), 0x1800);
    }

    /// Check the age rule: the last YOUNG_EPOCHS epochs are young.
    #[test]
    fn young_epochs() {
        let collector = Collector { epoch_ns: 1, sample_rate: 1 };
        assert!(collector.is_young(100, 100));
        assert!(collector.is_young(96, 100));
        assert!(!collector.is_young(95, 100));
        let everything = Collector { epoch_ns: 0, sample_rate: 1 };
        assert!(!everything.is_young(100, 100));
    }
}
