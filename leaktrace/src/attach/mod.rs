//! Loading the kernel programs configured for one target, and attaching
//! them: uprobes on the allocator API of the objects the target maps
//! ([`uprobes`], from the tables in [`probes`]) and the thread tracepoints
//! ([`tracepoints`]).

pub mod kmem;
mod links;
mod multi;
mod probes;
mod tracepoints;
mod uprobes;

use std::collections::HashSet;

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, HashMap as AyaHashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::Program,
    Ebpf, EbpfLoader, Pod,
};
use leaktrace_common::{
    AllocBucket, AllocInfo, Config, KmemConfig, Lost, Pending, PendingSlot, StackSlot, StackStats,
    ThreadInfo, ThreadSiteStats, BUCKET_SLOTS, CONFIG_GLIBC_CHUNKS, CONFIG_GLIBC_PTHREAD,
    CONFIG_HOLD, CONFIG_PIDNS, CONFIG_TRACE, CONFIG_WINDOWS, GLOBAL_CONFIG, GLOBAL_KMEM,
    MAP_ALLOCS, MAP_ALLOC_TABLE, MAP_KERNEL_ALLOCS, MAP_KERNEL_CACHES, MAP_KERNEL_COUNTS,
    MAP_KERNEL_STACKS, MAP_LOST, MAP_MMAPS, MAP_PENDING, MAP_PENDING_SLOTS, MAP_PTHREADS,
    MAP_STACKS, MAP_STACK_SLOTS, MAP_STACK_STATS, MAP_THREADS, MAP_THREAD_SITES, MAP_TRACE_EVENTS,
    MAP_UNWIND_ROWS, MAX_TABLE_BITS, MIN_TABLE_BITS, PENDING_SLOT_COUNT, STACK_SLOT_COUNT,
    TRACE_EVENTS_BYTES, UNWIND_CHUNK_ROWS,
};

pub use links::Links;
pub use tracepoints::attach_tracepoints;
use tracepoints::{fork_child_pid_offset, TRACEPOINTS};
pub use uprobes::{attach_all, plan, plan_new, AttachOptions};

/// What the programs are told at load time.
pub struct LoadOptions {
    pub tgid: u32,
    pub epoch_ns: u64,
    pub min_size: u64,
    pub max_size: u64,
    pub max_allocations: u32,
    /// log2 of `ALLOC_TABLE`'s buckets, 0 for none ([`table_bits`]).
    pub table_bits: u32,
    pub max_stacks: u32,
    pub sample_rate: u64,
    /// `-s N` samples the heap by time windows (when the kernel makes
    /// multi links; by address otherwise).
    pub windows: bool,
    /// Capacity of the unwind tables, in rows.
    pub unwind_rows: u64,
    /// The one allocator is glibc's (see `uprobes::Plan::glibc_allocator`).
    pub glibc_allocator: bool,
    /// pthread_create is glibc's (see `uprobes::Plan::glibc_pthread`).
    pub glibc_pthread: bool,
    /// Stop the target where its mappings change until they are published
    /// (a `-c` target only: see `CONFIG_HOLD`).
    pub hold: bool,
    /// leaktrace's own PID namespace (device, inode of /proc/self/ns/pid)
    /// when it is not the kernel's first: PIDs are numbered there.
    pub pid_namespace: Option<(u64, u64)>,
    /// Whether the programs log their rare paths (-vv). Off, the verifier
    /// prunes the log calls: they cost nothing.
    pub kernel_log: bool,
    /// `-t`: every allocation and free goes to the trace ring buffer.
    pub trace: bool,
    /// A target's allocator is traced (not the system mode): its thread
    /// tracepoints are loaded, and `programs`.
    pub user: bool,
    /// The uprobe programs the plan's probes run (others load on demand).
    pub programs: HashSet<&'static str>,
    /// Kernel allocations are traced (`--kernel`, the system mode).
    pub kernel: Option<KernelLoad>,
}

/// How the kernel-allocation programs are loaded.
pub struct KernelLoad {
    pub config: KmemConfig,
    /// Their names, those this kernel has events for.
    pub programs: Vec<&'static str>,
    pub max_allocations: u32,
    pub max_stacks: u32,
}

/// The object the kernel programs are built into.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace"));

/// Load every program, configured for one target; the links to come hold
/// the uprobe programs when they are loaded for multi links.
pub fn load(options: &LoadOptions) -> anyhow::Result<(Ebpf, Links)> {
    // A uprobe_multi link installs its probes in the mm of the process's
    // main thread: one whose main thread has exited (pthread_exit) while
    // others run gets perf-event uprobes, which go through a live thread.
    let leader_gone = crate::proc::reader(options.tgid) != options.tgid;
    if options.user && leader_gone {
        log::info!(
            "the main thread of {} has exited: its probes go through thread {}",
            options.tgid,
            crate::proc::reader(options.tgid)
        );
    }
    let multi = options.user && multi::supported() && !leader_gone;
    if options.user && !multi && !leader_gone {
        log::info!("this kernel makes no uprobe_multi links: perf-event uprobes instead");
    }
    let windows = multi && options.windows && options.sample_rate > 1;
    let config = Config {
        tgid: options.tgid,
        flags: if options.glibc_allocator { CONFIG_GLIBC_CHUNKS } else { 0 }
            | if options.glibc_pthread { CONFIG_GLIBC_PTHREAD } else { 0 }
            | if options.hold { CONFIG_HOLD } else { 0 }
            | if options.pid_namespace.is_some() { CONFIG_PIDNS } else { 0 }
            | if options.trace { CONFIG_TRACE } else { 0 }
            | if windows { CONFIG_WINDOWS } else { 0 },
        epoch_ns: options.epoch_ns,
        min_size: options.min_size,
        max_size: options.max_size,
        fork_child_pid_offset: fork_child_pid_offset()?,
        table_bits: options.table_bits,
        // In a window, every allocation is kept.
        sample_rate: if windows { 1 } else { options.sample_rate },
        pidns_dev: options.pid_namespace.map_or(0, |(dev, _)| dev),
        pidns_ino: options.pid_namespace.map_or(0, |(_, ino)| ino),
    };
    let kmem = options.kernel.as_ref().map_or_else(KmemConfig::default, |kernel| kernel.config);
    // Maps of a side not traced hold one entry: their memory is not spent.
    let kernel_allocations = options.kernel.as_ref().map_or(1, |kernel| kernel.max_allocations);
    let kernel_stacks = options.kernel.as_ref().map_or(1, |kernel| kernel.max_stacks);
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_CONFIG, &config, true)
        .override_global(GLOBAL_KMEM, &kmem, true)
        .override_global(aya_log::LEVEL, &kernel_log_level(options.kernel_log), false)
        .map_max_entries(MAP_TRACE_EVENTS, if options.trace { TRACE_EVENTS_BYTES } else { 4096 })
        .map_max_entries(MAP_KERNEL_ALLOCS, kernel_allocations)
        .map_max_entries(MAP_KERNEL_STACKS, kernel_stacks)
        .map_max_entries(MAP_KERNEL_CACHES, kernel_stacks)
        .map_max_entries(MAP_KERNEL_COUNTS, kernel_stacks)
        .map_max_entries(MAP_ALLOCS, if options.user { options.max_allocations } else { 1 })
        .map_max_entries(MAP_ALLOC_TABLE, 1 << options.table_bits)
        // The programs fall back on the hash maps past an array's end.
        .map_max_entries(MAP_PENDING_SLOTS, if options.user { PENDING_SLOT_COUNT } else { 1 })
        .map_max_entries(MAP_STACK_SLOTS, if options.user { STACK_SLOT_COUNT } else { 1 })
        .map_max_entries(MAP_STACKS, options.max_stacks)
        // One more than the stacks: allocations whose stack could not be
        // kept (the stack map full) still count, under NO_STACK, and are
        // lost once (as a stack), not twice.
        .map_max_entries(MAP_STACK_STATS, options.max_stacks.saturating_add(1))
        .map_max_entries(
            MAP_UNWIND_ROWS,
            options.unwind_rows.div_ceil(UNWIND_CHUNK_ROWS as u64) as u32,
        )
        .load(OBJECT)
        .context("failed to load the eBPF programs")?;
    // The uprobe programs go with the links that run them when loaded for
    // multi links, else with aya's others.
    let mut names: HashSet<&str> = HashSet::new();
    let links = if multi {
        let mut programs = multi::MultiPrograms::new(OBJECT, &ebpf)?;
        let uprobes: Vec<&str> = options.programs.iter().copied().collect();
        programs.load(&uprobes)?;
        Links::with_multi(programs, windows, &mut ebpf)?
    } else {
        names.extend(options.programs.iter().copied().filter(|_| options.user));
        Links::default()
    };
    if options.user {
        names.extend(TRACEPOINTS.iter().map(|(name, ..)| *name));
    }
    if let Some(kernel) = &options.kernel {
        names.extend(kernel.programs.iter().copied());
    }
    load_programs(&mut ebpf, &names)?;
    Ok((ebpf, links))
}

/// Load the programs `names`, in parallel.
fn load_programs(ebpf: &mut Ebpf, names: &HashSet<&str>) -> anyhow::Result<()> {
    let mut programs: Vec<(&str, &mut Program)> =
        ebpf.programs_mut().filter(|(name, _)| names.contains(name)).collect();
    for wanted in names {
        anyhow::ensure!(
            programs.iter().any(|(name, _)| name == wanted),
            "program {wanted} missing from the eBPF object"
        );
    }
    programs.sort_by_key(|(name, _)| verify_order(name));
    in_parallel(programs, |(name, program)| {
        let loaded = match program {
            Program::UProbe(program) => program.load(),
            Program::TracePoint(program) => program.load(),
            _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
        };
        loaded.with_context(|| format!("failed to load program {name}"))
    })?;
    Ok(())
}

/// The order programs are verified in: the return probes and the kernel
/// allocation programs walk stacks, the slow ones to verify, taken first.
fn verify_order(name: &str) -> (bool, &str) {
    (!name.contains("exit") && !name.starts_with("kmem"), name)
}

/// `work` on each of `items`, on as many threads as there are CPUs (at
/// most 4), each thread taking the next item as it is done with one, in
/// order: the verifier takes most of the start-up time (~0.12-0.3 s for
/// each program that walks a stack), and programs verify independently.
fn in_parallel<T: Send, R: Send>(
    items: Vec<T>,
    work: impl Fn(T) -> anyhow::Result<R> + Sync,
) -> anyhow::Result<Vec<R>> {
    let queue = std::sync::Mutex::new(std::collections::VecDeque::from(items));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<Vec<R>> {
                    let mut done = Vec::new();
                    loop {
                        // The lock is held for the pop alone.
                        let next = queue
                            .lock()
                            .map_err(|_| anyhow!("a thread loading programs failed"))?
                            .pop_front();
                        let Some(item) = next else {
                            return Ok(done);
                        };
                        done.push(work(item)?);
                    }
                })
            })
            .collect();
        handles.into_iter().try_fold(Vec::new(), |mut all, handle| {
            all.extend(handle.join().map_err(|_| anyhow!("a thread loading programs panicked"))??);
            Ok(all)
        })
    })
}

/// aya-log-ebpf's level: calls at or below it are kept (log's order, Error
/// 1 to Trace 5); 0 keeps none.
fn kernel_log_level(on: bool) -> u8 {
    if on {
        log::Level::Debug as u8
    } else {
        0
    }
}

/// Zero the lost-event counters once every probe is in: calls already under
/// way while the probes went in are not events leaktrace lost.
pub fn reset_lost(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(MAP_LOST)
        .ok_or_else(|| anyhow!("map {MAP_LOST} missing from the eBPF object"))?;
    let mut counters: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(map)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, err)| err).context("failed to count CPUs")?;
    for index in 0..Lost::COUNT {
        counters.set(index, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
    }
    Ok(())
}

/// Forget every allocation, mapping, per-stack total, thread and call in
/// flight: the target exec'd, and what its old image held went with its
/// address space. (Stacks stay: an id names the same addresses.)
pub fn forget_image(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    // The table first: a block spilled in between would keep its record
    // in ALLOCS, its bucket's count of spilled blocks zeroed.
    zero::<AllocBucket>(ebpf, MAP_ALLOC_TABLE)?;
    clear::<u64, AllocInfo>(ebpf, MAP_ALLOCS)?;
    clear::<u64, AllocInfo>(ebpf, MAP_MMAPS)?;
    clear::<u32, Pending>(ebpf, MAP_PENDING)?;
    zero::<PendingSlot>(ebpf, MAP_PENDING_SLOTS)?;
    clear::<u32, ThreadInfo>(ebpf, MAP_THREADS)?;
    clear::<u64, u32>(ebpf, MAP_PTHREADS)?;
    clear_per_cpu::<StackStats>(ebpf, MAP_STACK_STATS)?;
    zero_per_cpu::<StackSlot>(ebpf, MAP_STACK_SLOTS)?;
    clear_per_cpu::<ThreadSiteStats>(ebpf, MAP_THREAD_SITES)?;
    Ok(())
}

/// Set every entry of the array `name` to its default (zeros).
fn zero<V: Pod + Default>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let map = ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing"))?;
    let mut array: Array<&mut MapData, V> =
        Array::try_from(map).with_context(|| format!("map {name}"))?;
    for index in 0..array.len() {
        array.set(index, V::default(), 0)?;
    }
    Ok(())
}

/// Set every entry of the per-CPU array `name` to its default on every CPU.
fn zero_per_cpu<V: Pod + Default>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, err)| err).context("failed to count CPUs")?;
    let map = ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing"))?;
    let mut array: PerCpuArray<&mut MapData, V> =
        PerCpuArray::try_from(map).with_context(|| format!("map {name}"))?;
    for index in 0..array.len() {
        let zeros: Vec<V> = (0..cpus).map(|_| V::default()).collect();
        array.set(index, PerCpuValues::try_from(zeros)?, 0)?;
    }
    Ok(())
}

/// log2 of the buckets of `ALLOC_TABLE` (five blocks each) for a target
/// with `resident` bytes in memory: about a slot for every 32 bytes (the
/// buckets rounded down to a power of two), no more slots than
/// `max_allocations`; 0, no table, when `max_allocations` is below the
/// smallest table. The table is memory allocated at once (128 bytes a
/// bucket), unlike `ALLOCS`: sized from the target, a small process costs
/// little (512 KiB-1 MiB), a large one keeps most of its blocks there.
/// `ALLOCS` holds `max_allocations` besides: the two hold up to twice it.
pub fn table_bits(resident: u64, max_allocations: u32) -> u32 {
    let slots_per_bucket = BUCKET_SLOTS as u64;
    if u64::from(max_allocations) < (1 << MIN_TABLE_BITS) * slots_per_bucket {
        return 0;
    }
    let slots = (resident / 32).min(u64::from(max_allocations));
    let buckets = (slots / slots_per_bucket).max(1);
    let bits = 63 - buckets.leading_zeros();
    bits.clamp(MIN_TABLE_BITS, MAX_TABLE_BITS)
}

/// Remove every entry of the per-CPU hash map `name`, keyed by a stack id.
fn clear_per_cpu<V: Pod>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let map = ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing"))?;
    let mut values: PerCpuHashMap<&mut MapData, u32, V> =
        PerCpuHashMap::try_from(map).with_context(|| format!("map {name}"))?;
    let keys: Vec<u32> = values.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = values.remove(&key);
    }
    Ok(())
}

/// Remove every entry of the hash map `name`.
fn clear<K: Pod, V: Pod>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let map = ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing"))?;
    let mut entries: AyaHashMap<&mut MapData, K, V> =
        AyaHashMap::try_from(map).with_context(|| format!("map {name}"))?;
    let keys: Vec<K> = entries.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = entries.remove(&key);
    }
    Ok(())
}

/// `--program-stats`: each program that ran, with its runs and mean time,
/// on stderr; the last line says how many.
pub fn print_program_stats(ebpf: &Ebpf, links: &Links) {
    let aya_loaded = ebpf.programs().filter_map(|(name, program)| {
        let info = program.info().ok()?;
        Some((name, info.run_count(), info.run_time().as_nanos() as u64))
    });
    let mut ran = 0;
    for (name, runs, time_ns) in aya_loaded.chain(links.program_stats()) {
        if runs == 0 {
            continue;
        }
        ran += 1;
        let mean = time_ns / runs;
        eprintln!("leaktrace: program {name}: {runs} runs, {mean} ns mean");
    }
    eprintln!("leaktrace: program stats: {ran} programs ran");
}

#[cfg(test)]
mod tests {
    use leaktrace_common::DEFAULT_MAX_ALLOCATIONS;

    use super::*;

    /// Check the table's size: a slot for each 32 resident bytes, within
    /// its bounds and `--max-allocations`, none below the smallest table.
    #[test]
    fn table_sized_from_the_target() {
        const MIB: u64 = 1 << 20;
        let full = DEFAULT_MAX_ALLOCATIONS;
        // A fresh -c program: the smallest table. The demo (1.5 MiB):
        // 49,152 slots, 8,192 buckets (1 MiB).
        assert_eq!(table_bits(0, full), MIN_TABLE_BITS);
        assert_eq!(table_bits(MIB + MIB / 2, full), 13);
        // 10 MiB: 327,680 slots, 65,536 buckets.
        assert_eq!(table_bits(10 * MIB, full), 16);
        // 1 GiB: no more slots than --max-allocations (1,048,576 / 5
        // buckets, rounded down to a power of two: 131,072).
        assert_eq!(table_bits(1 << 30, full), 17);
        assert_eq!(table_bits(1 << 30, 200_000), 15);
        // --max-allocations below the smallest table: none.
        assert_eq!(table_bits(10 * MIB, 16), 0);
        assert_eq!(table_bits(10 * MIB, 20_479), 0);
    }
}
