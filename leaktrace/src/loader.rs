//! Loads the kernel programs configured for one target and attaches them to
//! the allocator functions of the object that provides them, scoped to the
//! target's process.

use std::{collections::HashMap, num::NonZeroU32, path::Path};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuValues},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};
use leaktrace_common::{
    Config, GLOBAL_CONFIG, Lost, MAP_ALLOCS, MAP_LOST, MAP_STACK_STATS, MAP_STACKS,
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

use crate::placement::entry_probe_offset;

/// One allocator function and the programs that trace it.
struct ProbeSpec {
    symbol: &'static str,
    enter: &'static str,
    /// The return probe, for functions whose result is recorded.
    exit: Option<&'static str>,
}

const fn probe(symbol: &'static str, enter: &'static str, exit: Option<&'static str>) -> ProbeSpec {
    ProbeSpec {
        symbol,
        enter,
        exit,
    }
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
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_CONFIG, &config, true)
        .map_max_entries(MAP_ALLOCS, options.max_allocations)
        .map_max_entries(MAP_STACKS, options.max_stacks)
        .map_max_entries(MAP_STACK_STATS, options.max_stacks)
        .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace")))
        .context("failed to load the eBPF programs")?;
    let mut names: Vec<&str> = ALLOCATOR_PROBES
        .iter()
        .chain(THREAD_PROBES).flat_map(|p| [Some(p.enter), p.exit]).flatten().collect();
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
    program
        .try_into()
        .with_context(|| format!("program {name} is not a tracepoint"))
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

/// Attach the pthread programs to the object at `path`, if it defines
/// pthread_create.
pub fn attach_threads(ebpf: &mut Ebpf, path: &Path, pid: u32) -> anyhow::Result<Vec<Probe>> {
    let functions = find_functions(path, THREAD_PROBES)?;
    if !functions.contains_key("pthread_create") {
        return Ok(Vec::new());
    }
    attach_set(ebpf, path, pid, THREAD_PROBES, &functions)
}

/// Where sched_process_fork puts `child_pid`, from the tracepoint's format
/// file: the record layout changed between kernels.
fn fork_child_pid_offset() -> anyhow::Result<u32> {
    mount_tracefs()?;
    let path = format!("{TRACEFS}/events/sched/sched_process_fork/format");
    let format = std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    parse_field_offset(&format, "child_pid")
        .ok_or_else(|| anyhow!("no child_pid field in {path}"))
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
    program
        .try_into()
        .with_context(|| format!("program {name} is not a uprobe"))
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

/// Attach the C allocator API's programs to the object at `path`.
pub fn attach_allocator(ebpf: &mut Ebpf, path: &Path, pid: u32) -> anyhow::Result<Vec<Probe>> {
    let functions = find_functions(path, ALLOCATOR_PROBES)?;
    if !functions.contains_key("malloc") || !functions.contains_key("free") {
        bail!("no allocator found: {} defines no malloc and free", path.display());
    }
    attach_set(ebpf, path, pid, ALLOCATOR_PROBES, &functions)
}

/// Attach the operator new programs to the object at `path`, if it defines
/// any (libstdc++, or a static C++ program).
pub fn attach_cxx_new(ebpf: &mut Ebpf, path: &Path, pid: u32) -> anyhow::Result<Vec<Probe>> {
    let functions = find_functions(path, CXX_NEW_PROBES)?;
    attach_set(ebpf, path, pid, CXX_NEW_PROBES, &functions)
}

/// Attach each function of `set` found in `functions`, for process `pid`
/// only: a uprobe belongs to the file, and without the process filter every
/// process mapping the library would trap.
fn attach_set(
    ebpf: &mut Ebpf,
    path: &Path,
    pid: u32,
    set: &[ProbeSpec],
    functions: &HashMap<&'static str, Function>,
) -> anyhow::Result<Vec<Probe>> {
    let scope = UProbeScope::OneProcess(
        NonZeroU32::new(pid).ok_or_else(|| anyhow!("PID 0 cannot be traced"))?,
    );
    let mut probes: Vec<Probe> = Vec::new();
    for spec in set {
        let Some(function) = functions.get(spec.symbol) else {
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
        probes.push(Probe {
            symbol: spec.symbol,
            offset,
            skipped,
            alias_of: None,
        });
    }
    Ok(probes)
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

/// A function's file offset and first bytes.
struct Function {
    offset: u64,
    code: Vec<u8>,
}

/// Find the functions of `set` defined in the ELF file at `path`.
fn find_functions(
    path: &Path,
    set: &[ProbeSpec],
) -> anyhow::Result<HashMap<&'static str, Function>> {
    let data = std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{} is not an ELF file", path.display()))?;
    let mut found = HashMap::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        if symbol.kind() != SymbolKind::Text || !symbol.is_definition() {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        let Some(spec) = set.iter().find(|spec| spec.symbol == name) else {
            continue;
        };
        if found.contains_key(spec.symbol) {
            continue;
        }
        let Some(section) = symbol.section_index().and_then(|i| file.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((section_offset, _)) = section.file_range() else {
            continue;
        };
        let Some(offset) = (symbol.address().checked_sub(section.address()))
            .map(|relative| relative + section_offset)
        else {
            continue;
        };
        let start = offset as usize;
        let code = data.get(start..start + 16).unwrap_or_default().to_vec();
        found.insert(spec.symbol, Function { offset, code });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that libstdc++ yields operator new and new[].
    #[test]
    fn finds_operator_new() {
        let libstdcxx = Path::new("/usr/lib/x86_64-linux-gnu/libstdc++.so.6");
        let functions = find_functions(libstdcxx, CXX_NEW_PROBES).unwrap();
        assert!(functions.contains_key("_Znwm"));
        assert!(functions.contains_key("_Znam"));
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

    /// Check that this machine's libc yields malloc and free with their code.
    #[test]
    fn finds_libc_functions() {
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let functions = find_functions(libc, ALLOCATOR_PROBES).unwrap();
        assert!(functions.contains_key("malloc"));
        assert!(functions.contains_key("free"));
        assert_eq!(functions["malloc"].code.len(), 16);
    }
}
