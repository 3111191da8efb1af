//! Loads the kernel programs configured for one target and attaches them to
//! the allocator functions of the object that provides them, scoped to the
//! target's process.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeScope},
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use leaktrace_common::{
    Config, Lost, GLOBAL_CONFIG, MAP_ALLOCS, MAP_LOST, MAP_STACKS, MAP_STACK_STATS,
    MAP_UNWIND_ROWS, UNWIND_CHUNK_ROWS,
};
use serde::Serialize;

use crate::{
    elf::{ElfFile, Function},
    placement::entry_probe_offset,
};

/// One allocator function and the programs that trace it.
struct ProbeSpec {
    symbol: &'static str,
    enter: &'static str,
    /// The return probe, for functions whose result is recorded.
    exit: Option<&'static str>,
}

const fn probe(symbol: &'static str, enter: &'static str, exit: Option<&'static str>) -> ProbeSpec {
    ProbeSpec { symbol, enter, exit }
}

/// The C allocator API. Programs are shared by functions of one prototype.
const ALLOCATOR_PROBES: &[ProbeSpec] = &[
    probe("malloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("calloc", "alloc_enter_calloc", Some("alloc_exit_malloc")),
    probe("realloc", "alloc_enter_realloc", Some("alloc_exit_realloc")),
    probe("reallocarray", "alloc_enter_reallocarray", Some("alloc_exit_realloc")),
    probe("posix_memalign", "alloc_enter_posix_memalign", Some("alloc_exit_posix_memalign")),
    probe("aligned_alloc", "alloc_enter_memalign", Some("alloc_exit_malloc")),
    probe("memalign", "alloc_enter_memalign", Some("alloc_exit_malloc")),
    probe("valloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("pvalloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("free", "alloc_enter_free", None),
    probe("mmap", "mmap_enter_mmap", Some("mmap_exit_mmap")),
    probe("munmap", "mmap_enter_munmap", None),
    probe("mremap", "mmap_enter_mremap", Some("mmap_exit_mremap")),
    // jemalloc's non-standard API.
    probe("mallocx", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("rallocx", "alloc_enter_realloc", Some("alloc_exit_realloc")),
    probe("dallocx", "alloc_enter_free", None),
    probe("sdallocx", "alloc_enter_free", None),
];

/// mimalloc's own API, which Rust's mimalloc crate calls directly (its
/// GlobalAlloc is inlined into the program, past `__rust_alloc`).
const MIMALLOC_PROBES: &[ProbeSpec] = &[
    probe("mi_malloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("mi_zalloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("mi_calloc", "alloc_enter_calloc", Some("alloc_exit_malloc")),
    probe("mi_malloc_aligned", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("mi_zalloc_aligned", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("mi_realloc", "alloc_enter_realloc", Some("alloc_exit_realloc")),
    probe("mi_realloc_aligned", "alloc_enter_realloc", Some("alloc_exit_realloc")),
    probe("mi_free", "alloc_enter_free", None),
];

/// operator delete of allocators whose delete does not call free
/// (jemalloc, tcmalloc, mimalloc). libstdc++'s calls free: not probed.
const CXX_DELETE_PROBES: &[ProbeSpec] = &[
    probe("_ZdlPv", "alloc_enter_free", None),
    probe("_ZdlPvm", "alloc_enter_free", None),
    probe("_ZdaPv", "alloc_enter_free", None),
    probe("_ZdaPvm", "alloc_enter_free", None),
    probe("_ZdlPvRKSt9nothrow_t", "alloc_enter_free", None),
    probe("_ZdaPvRKSt9nothrow_t", "alloc_enter_free", None),
    probe("_ZdlPvSt11align_val_t", "alloc_enter_free", None),
    probe("_ZdlPvmSt11align_val_t", "alloc_enter_free", None),
    probe("_ZdaPvSt11align_val_t", "alloc_enter_free", None),
    probe("_ZdaPvmSt11align_val_t", "alloc_enter_free", None),
];

/// Rust's allocator shims, which every Box, Vec and String goes through,
/// whatever the #[global_allocator]. Rust's standard library has no frame
/// pointers, so a stack taken in malloc can lose the allocating function.
/// rustc 1.95 mangles them (`..._7___rustc12___rust_alloc`).
const RUST_PROBES: &[ProbeSpec] = &[
    probe("__rust_alloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("__rust_alloc_zeroed", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("__rust_realloc", "alloc_enter_rust_realloc", Some("alloc_exit_realloc")),
    probe("__rust_dealloc", "alloc_enter_free", None),
];

/// C++ operator new in all its forms (the size is always the first
/// argument). libstdc++ builds them without frame pointers, so a stack taken
/// in malloc loses the caller of new; their own return probe sees it, and
/// the malloc they call is a nested call, not counted twice. operator
/// delete needs no probe: it calls free.
const CXX_NEW_PROBES: &[ProbeSpec] = &[
    probe("_Znwm", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_Znam", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnwmRKSt9nothrow_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnamRKSt9nothrow_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnwmSt11align_val_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnamSt11align_val_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnwmSt11align_val_tRKSt9nothrow_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnamSt11align_val_tRKSt9nothrow_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
];

/// The pthread API, in the C library (or libpthread before glibc 2.34).
const THREAD_PROBES: &[ProbeSpec] = &[
    probe("pthread_attr_setdetachstate", "thread_enter_pthread_attr_setdetachstate", None),
    probe("pthread_create", "thread_enter_pthread_create", Some("thread_exit_pthread_create")),
    probe("pthread_join", "thread_enter_pthread_join", Some("thread_exit_pthread_join")),
    probe("pthread_tryjoin_np", "thread_enter_pthread_join", Some("thread_exit_pthread_join")),
    probe("pthread_timedjoin_np", "thread_enter_pthread_join", Some("thread_exit_pthread_join")),
    probe("pthread_clockjoin_np", "thread_enter_pthread_join", Some("thread_exit_pthread_join")),
    probe("pthread_detach", "thread_enter_pthread_detach", Some("thread_exit_pthread_detach")),
];

/// The dynamic linker's hook for debuggers, called after every change to
/// the loaded objects: the unwind tables of a dlopen()ed library are loaded
/// at once instead of at the next poll of /proc/PID/maps.
const LINKER_PROBES: &[ProbeSpec] =
    &[probe("_dl_debug_state", "linker_enter_dl_debug_state", None)];

const ALL_SETS: [&[ProbeSpec]; 7] = [
    ALLOCATOR_PROBES,
    MIMALLOC_PROBES,
    CXX_NEW_PROBES,
    CXX_DELETE_PROBES,
    RUST_PROBES,
    THREAD_PROBES,
    LINKER_PROBES,
];

/// Prefixes allocators are built with: jemalloc's `je_`, and `_rjem_` of
/// the jemalloc that Rust's tikv-jemallocator links in.
const KNOWN_PREFIXES: [&str; 2] = ["je_", "_rjem_"];

/// Kernel tracepoints: (program, category, name).
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("kernel_sched_process_fork", "sched", "sched_process_fork"),
    ("kernel_sched_process_exit", "sched", "sched_process_exit"),
];

const TRACEFS: &str = "/sys/kernel/tracing";

/// What the programs are told at load time.
pub struct LoadOptions {
    pub tgid: u32,
    pub epoch_ns: u64,
    pub min_size: u64,
    pub max_size: u64,
    pub max_allocations: u32,
    pub max_stacks: u32,
    pub sample_rate: u64,
    /// Capacity of the unwind tables, in rows.
    pub unwind_rows: u64,
}

/// Load every program, configured for one target.
pub fn load(options: &LoadOptions) -> anyhow::Result<Ebpf> {
    let config = Config {
        tgid: options.tgid,
        _pad: 0,
        epoch_ns: options.epoch_ns,
        min_size: options.min_size,
        max_size: options.max_size,
        fork_child_pid_offset: fork_child_pid_offset()?,
        _pad2: 0,
        sample_rate: options.sample_rate,
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_CONFIG, &config, true)
        .map_max_entries(MAP_ALLOCS, options.max_allocations)
        .map_max_entries(MAP_STACKS, options.max_stacks)
        .map_max_entries(MAP_STACK_STATS, options.max_stacks)
        .map_max_entries(
            MAP_UNWIND_ROWS,
            options.unwind_rows.div_ceil(UNWIND_CHUNK_ROWS as u64) as u32,
        )
        .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace")))
        .context("failed to load the eBPF programs")?;
    let mut names: Vec<&str> = ALL_SETS
        .iter()
        .flat_map(|set| set.iter())
        .flat_map(|p| [Some(p.enter), p.exit])
        .flatten()
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        program(&mut ebpf, name)?
            .load()
            .with_context(|| format!("failed to load program {name}"))?;
    }
    for (name, _, _) in TRACEPOINTS {
        tracepoint(&mut ebpf, name)?
            .load()
            .with_context(|| format!("failed to load program {name}"))?;
    }
    Ok(ebpf)
}

fn tracepoint<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut TracePoint> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    program.try_into().with_context(|| format!("program {name} is not a tracepoint"))
}

/// Attach the thread tracepoints. They fire for every process; the
/// programs keep only the target's events.
pub fn attach_tracepoints(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for (name, category, event) in TRACEPOINTS {
        tracepoint(ebpf, name)?
            .attach(category, event)
            .with_context(|| format!("failed to attach to tracepoint {category}:{event}"))?;
    }
    Ok(())
}

/// Where sched_process_fork puts `child_pid`, from the tracepoint's format
/// file: the record layout changed between kernels.
fn fork_child_pid_offset() -> anyhow::Result<u32> {
    mount_tracefs()?;
    let path = format!("{TRACEFS}/events/sched/sched_process_fork/format");
    let format =
        std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    parse_field_offset(&format, "child_pid").ok_or_else(|| anyhow!("no child_pid field in {path}"))
}

/// The offset of `field` in a tracepoint format file.
fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';');
        let declaration = parts.next()?;
        if !declaration.ends_with(&format!(" {field}")) {
            return None;
        }
        parts
            .find_map(|part| part.trim().strip_prefix("offset:"))
            .and_then(|offset| offset.trim().parse().ok())
    })
}

/// Tracepoints are found through tracefs; mount it where the kernel
/// documents it if nobody has.
fn mount_tracefs() -> anyhow::Result<()> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", TRACEFS])
        .status()
        .context("failed to run mount")?;
    anyhow::ensure!(status.success(), "tracefs is not mounted at {TRACEFS} and mounting it failed");
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    program.try_into().with_context(|| format!("program {name} is not a uprobe"))
}

/// One function probed in the allocator object.
#[derive(Debug)]
pub struct Probe {
    pub symbol: &'static str,
    /// File offset of the entry probe.
    pub offset: u64,
    /// Bytes the entry probe sits past the function's start.
    pub skipped: u64,
    /// Another symbol at this address whose probes these are.
    pub alias_of: Option<&'static str>,
}

/// An object to probe: its path as the target names it (for the user) and
/// the path to open it by from here.
#[derive(Clone, Debug)]
pub struct Object {
    pub shown: PathBuf,
    pub open: PathBuf,
}

/// What was probed in one object.
#[derive(Debug, Serialize)]
pub struct Probed {
    pub object: PathBuf,
    pub functions: Vec<&'static str>,
    #[serde(skip)]
    pub probes: Vec<Probe>,
}

/// How to choose what to probe where.
pub struct AttachOptions<'a> {
    pub pid: u32,
    /// Allocator functions are named with this prefix (`je_`).
    pub symbol_prefix: Option<&'a str>,
    /// Probe the allocator API in this object only (`--obj`).
    pub allocator: Option<&'a Path>,
}

/// Probe every object for what it defines: the C allocator API where
/// malloc and free are (the executable of a static program, libc, jemalloc,
/// tcmalloc, mimalloc), operator new where it is, operator delete in
/// allocators, Rust's allocator shims, and the pthread API once.
pub fn attach_all(
    ebpf: &mut Ebpf,
    objects: &[Object],
    options: &AttachOptions<'_>,
) -> anyhow::Result<Vec<Probed>> {
    let mut probed = Vec::new();
    let mut threads_done = false;
    let mut linker_done = false;
    let mut allocators = 0;
    for object in objects {
        let elf = match ElfFile::open(&object.open) {
            Ok(elf) => elf,
            Err(err) => {
                log::debug!("skipping {}: {err:#}", object.shown.display());
                continue;
            }
        };
        let user_prefix = options.symbol_prefix.unwrap_or("");
        let functions = elf.functions(|name| wanted(name, user_prefix));
        let defines = |name: &str| functions.contains_key(name);
        // A static program that never frees has no free linked in.
        let allocator_prefix = [user_prefix, ""]
            .into_iter()
            .chain(KNOWN_PREFIXES)
            .find(|prefix| defines(&format!("{prefix}malloc")));
        let is_allocator = match options.allocator {
            Some(path) => path == object.shown,
            None => allocator_prefix.is_some(),
        };
        let name =
            object.shown.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut sets: Vec<(&[ProbeSpec], &str)> = Vec::new();
        if is_allocator {
            let prefix = allocator_prefix.unwrap_or(user_prefix);
            if !defines(&format!("{prefix}malloc")) {
                bail!("no allocator found: {} defines no {prefix}malloc", object.shown.display());
            }
            allocators += 1;
            sets.push((ALLOCATOR_PROBES, prefix));
            if !name.starts_with("libstdc++") {
                sets.push((CXX_DELETE_PROBES, ""));
            }
        }
        // The linker keeps only the mimalloc functions a program calls.
        let mimalloc = MIMALLOC_PROBES.iter().any(|spec| defines(spec.symbol));
        if mimalloc && options.allocator.is_none() {
            allocators += 1;
            sets.push((MIMALLOC_PROBES, ""));
        }
        sets.push((CXX_NEW_PROBES, ""));
        sets.push((RUST_PROBES, ""));
        if !threads_done && defines("pthread_create") && !name.starts_with("ld-") {
            threads_done = true;
            sets.push((THREAD_PROBES, ""));
        }
        if !linker_done && defines("_dl_debug_state") {
            linker_done = true;
            sets.push((LINKER_PROBES, ""));
        }
        let mut probes = Vec::new();
        for (set, prefix) in sets {
            attach_set(ebpf, &object.open, options.pid, set, &functions, prefix, &mut probes)?;
        }
        if !probes.is_empty() {
            probed.push(Probed {
                object: object.shown.clone(),
                functions: probes.iter().map(|p| p.symbol).collect(),
                probes,
            });
        }
    }
    if allocators == 0 {
        bail!(
            "no allocator found in process {}: no mapped object defines malloc (use --obj PATH or --symbol-prefix)",
            options.pid
        );
    }
    Ok(probed)
}

/// The key under which a symbol is kept, if leaktrace may probe it.
fn wanted(name: &str, user_prefix: &str) -> Option<String> {
    let known =
        |name: &str| ALL_SETS.iter().flat_map(|set| set.iter()).any(|spec| spec.symbol == name);
    if known(name) {
        return Some(name.to_string());
    }
    for spec in RUST_PROBES {
        // v0 mangling ends with the length-prefixed identifier; one that
        // starts with `_` gets a `_` separator.
        if name.ends_with(&format!("{}_{}", spec.symbol.len(), spec.symbol)) {
            return Some(spec.symbol.to_string());
        }
    }
    for prefix in std::iter::once(user_prefix).chain(KNOWN_PREFIXES) {
        if prefix.is_empty() {
            continue;
        }
        if let Some(rest) = name.strip_prefix(prefix) {
            if ALLOCATOR_PROBES.iter().any(|spec| spec.symbol == rest) {
                return Some(name.to_string());
            }
        }
    }
    None
}

/// Attach each function of `set` found in `functions`, for process `pid`
/// only: a uprobe belongs to the file, and without the process filter every
/// process mapping the library would trap.
fn attach_set(
    ebpf: &mut Ebpf,
    path: &Path,
    pid: u32,
    set: &[ProbeSpec],
    functions: &HashMap<String, Function>,
    prefix: &str,
    probes: &mut Vec<Probe>,
) -> anyhow::Result<()> {
    let scope = UProbeScope::OneProcess(
        NonZeroU32::new(pid).ok_or_else(|| anyhow!("PID 0 cannot be traced"))?,
    );
    for spec in set {
        let Some(function) = functions.get(&format!("{prefix}{}", spec.symbol)) else {
            log::debug!("{} has no {}: not probed", path.display(), spec.symbol);
            continue;
        };
        // glibc 2.36 gives aligned_alloc and memalign one address: probing
        // it twice would count each allocation twice.
        if let Some(first) = probes.iter().find(|p| p.offset - p.skipped == function.offset) {
            probes.push(Probe {
                symbol: spec.symbol,
                offset: first.offset,
                skipped: first.skipped,
                alias_of: Some(first.symbol),
            });
            continue;
        }
        let skipped = match spec.exit {
            Some(_) => 0,
            None => entry_probe_offset(&function.code),
        };
        let offset = function.offset + skipped;
        let mut attach_one = |name: &str, at: u64| -> anyhow::Result<()> {
            program(ebpf, name)?
                .attach(UProbeAttachLocation::AbsoluteOffset(at), path, scope)
                .with_context(|| {
                    format!("failed to attach {name} to {} in {}", spec.symbol, path.display())
                })?;
            Ok(())
        };
        // Return probe first: a call entered between the two attaches would
        // otherwise leave an entry record that no return ever takes.
        if let Some(exit) = spec.exit {
            attach_one(exit, function.offset)?;
        }
        attach_one(spec.enter, offset)?;
        probes.push(Probe { symbol: spec.symbol, offset, skipped, alias_of: None });
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Check which symbol names are kept: probed names, Rust's mangled
    /// shims under their plain name, and prefixed allocator functions.
    #[test]
    fn wanted_names() {
        assert_eq!(wanted("malloc", ""), Some("malloc".into()));
        assert_eq!(wanted("_Znwm", ""), Some("_Znwm".into()));
        assert_eq!(
            wanted("_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc", ""),
            Some("__rust_alloc".into())
        );
        assert_eq!(
            wanted("_RNvCsfLfy6EI15iL_7___rustc14___rust_dealloc", ""),
            Some("__rust_dealloc".into())
        );
        assert_eq!(wanted("je_malloc", ""), Some("je_malloc".into()));
        assert_eq!(wanted("my_free", "my_"), Some("my_free".into()));
        assert_eq!(wanted("my_strlen", "my_"), None);
        assert_eq!(wanted("strlen", ""), None);
    }

    /// Check that child_pid's offset is read from a format file.
    #[test]
    fn fork_format_offset() {
        let format = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
            \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
            \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(format, "child_pid"), Some(20));
        assert_eq!(parse_field_offset(format, "parent_pid"), Some(12));
        assert_eq!(parse_field_offset(format, "pid"), None);
    }
}
