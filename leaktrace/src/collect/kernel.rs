//! Kernel allocations outstanding (`--kernel`, the system mode), read from
//! the kernel maps and grouped by kernel stack, user stack and kind, with
//! the bytes each process holds.

use std::collections::HashMap;

use anyhow::Context as _;
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap, StackTraceMap},
    Ebpf,
};
use leaktrace_common::{
    CacheName, KernelAlloc, KernelKind, MAP_KERNEL_ALLOCS, MAP_KERNEL_CACHES, MAP_KERNEL_COUNTS,
    MAP_KERNEL_STACKS,
};

use super::{map, monotonic_ns};

/// Allocations with one kernel stack, one user stack and one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelUsage {
    pub kernel_stack: i32,
    pub user_stack: u32,
    pub kind: KernelKind,
    pub bytes: u64,
    pub allocations: u64,
    /// Bytes per process (tgid) in whose context they were allocated.
    pub processes: HashMap<u32, u64>,
}

impl KernelUsage {
    /// What its growth is followed by.
    pub fn key(&self) -> (i32, u32, u32) {
        (self.kernel_stack, self.user_stack, self.kind as u32)
    }
}

/// Outstanding kernel allocations older than `older_ns`, most bytes first;
/// figures scaled by `sample_rate`.
pub fn collect_kernel(
    ebpf: &Ebpf,
    older_ns: u64,
    sample_rate: u64,
) -> anyhow::Result<Vec<KernelUsage>> {
    let allocs: BpfHashMap<&MapData, u64, KernelAlloc> =
        BpfHashMap::try_from(map(ebpf, MAP_KERNEL_ALLOCS)?)?;
    let cutoff = monotonic_ns().saturating_sub(older_ns);
    let mut groups: HashMap<(i32, u32, u32), KernelUsage> = HashMap::new();
    for entry in allocs.iter() {
        // An entry freed while the map is walked is skipped, not an error.
        let Ok((_, alloc)) = entry else { continue };
        if alloc.time_ns > cutoff {
            continue;
        }
        let Some(kind) = KernelKind::from_u32(alloc.kind) else { continue };
        let usage = groups.entry((alloc.kernel_stack, alloc.user_stack, alloc.kind)).or_insert(
            KernelUsage {
                kernel_stack: alloc.kernel_stack,
                user_stack: alloc.user_stack,
                kind,
                bytes: 0,
                allocations: 0,
                processes: HashMap::new(),
            },
        );
        let bytes = alloc.size * sample_rate;
        usage.bytes += bytes;
        usage.allocations += sample_rate;
        *usage.processes.entry(alloc.tgid).or_default() += bytes;
    }
    let mut usages: Vec<KernelUsage> = groups.into_values().collect();
    usages.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.key().cmp(&b.key())));
    Ok(usages)
}

/// The return addresses of kernel stack `id`, innermost first.
pub fn kernel_stack(ebpf: &Ebpf, id: i32) -> anyhow::Result<Vec<u64>> {
    let stacks: StackTraceMap<&MapData> = StackTraceMap::try_from(map(ebpf, MAP_KERNEL_STACKS)?)?;
    let id = u32::try_from(id).context("no kernel stack")?;
    let stack = stacks.get(&id, 0).with_context(|| format!("failed to read kernel stack {id}"))?;
    Ok(stack.frames().iter().map(|frame| frame.ip).collect())
}

/// Allocations made at each kernel stack since attach, all CPUs, scaled by
/// `sample_rate`.
pub fn kernel_counts(ebpf: &Ebpf, sample_rate: u64) -> anyhow::Result<HashMap<i32, u64>> {
    let counts: PerCpuHashMap<&MapData, i32, u64> =
        PerCpuHashMap::try_from(map(ebpf, MAP_KERNEL_COUNTS)?)?;
    let mut totals = HashMap::new();
    for entry in counts.iter() {
        let (stack, per_cpu) = entry.context("failed to read the kernel stacks' counts")?;
        totals.insert(stack, per_cpu.iter().sum::<u64>() * sample_rate);
    }
    Ok(totals)
}

/// The slab cache kernel stack `id` allocates from, if it is a slab's.
pub fn cache_name(ebpf: &Ebpf, id: i32) -> Option<String> {
    let caches: BpfHashMap<&MapData, i32, CacheName> =
        BpfHashMap::try_from(map(ebpf, MAP_KERNEL_CACHES).ok()?).ok()?;
    caches.get(&id, 0).ok()?.as_str().map(str::to_string)
}
