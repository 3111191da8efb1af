//! Uprobes on the target's objects: every object is probed for what it
//! defines (the allocator API, operator new and delete, Rust's shims, the
//! pthread API, the dynamic linker's hook), never twice at one address, and
//! only for the target's process.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use anyhow::{anyhow, bail, Context as _};
use aya::{programs::UProbe, Ebpf};
use leaktrace_report::{ProbePlacement, ProbedObject};

use super::probes::*;
use super::{links::Probe, Links};
use crate::{
    elf::{
        placement::{call_probe_offset, entry_probe_offset},
        ElfFile, Function,
    },
    proc::file_key,
    target::Object,
};

/// How to choose what to probe where.
pub struct AttachOptions<'a> {
    pub pid: u32,
    /// Allocator functions are named with this prefix (`je_`).
    pub symbol_prefix: Option<&'a str>,
    /// Probe the allocator API in this object only (`--obj`).
    pub allocator: Option<&'a Path>,
}

/// What to probe in one object.
pub struct ObjectPlan {
    object: Object,
    functions: HashMap<String, Function>,
    /// Each probe set with the prefix its symbols carry.
    sets: Vec<(&'static [ProbeSpec], String)>,
}

/// What to probe where, decided from the objects alone, before the programs
/// are loaded (their configuration depends on it).
pub struct Plan {
    pub pid: u32,
    pub objects: Vec<ObjectPlan>,
    /// The one allocator is glibc's: its chunk headers give block sizes.
    pub glibc_allocator: bool,
    /// pthread_create is glibc's: its attributes can be read.
    pub glibc_pthread: bool,
    /// The file (device, inode) of glibc's shared libc when it is the one
    /// allocator: frees called from its code are the allocator's own.
    pub glibc_libc: Option<(u64, u64)>,
}

/// Look at every object for what it defines: the C allocator API where
/// malloc and free are (the executable of a static program, libc, jemalloc,
/// tcmalloc, mimalloc), operator new where it is, operator delete in
/// allocators, Rust's allocator shims, and the pthread API once.
pub fn plan(objects: &[Object], options: &AttachOptions<'_>) -> anyhow::Result<Plan> {
    plan_objects(objects, options, true)
}

/// The plan for the objects among `objects` not probed yet (`probed`, by
/// device and inode): after an exec, the new image's. No allocator among
/// them is no error: the old one's may serve the new image too.
pub fn plan_new(
    objects: &[Object],
    options: &AttachOptions<'_>,
    probed: &HashSet<(u64, u64)>,
) -> anyhow::Result<Plan> {
    let new: Vec<Object> = objects
        .iter()
        .filter(|object| file_key(&object.open).map_or(true, |key| !probed.contains(&key)))
        .cloned()
        .collect();
    plan_objects(&new, options, false)
}

impl Plan {
    /// The programs the planned probes run.
    pub fn programs(&self) -> HashSet<&'static str> {
        self.objects
            .iter()
            .flat_map(|object| object.sets.iter())
            .flat_map(|(set, _)| set.iter())
            .flat_map(|spec| [Some(spec.enter), spec.exit])
            .flatten()
            .collect()
    }

    /// The planned objects' files, by device and inode.
    pub fn files(&self) -> HashSet<(u64, u64)> {
        self.objects.iter().filter_map(|object| file_key(&object.object.open).ok()).collect()
    }
}

fn plan_objects(
    objects: &[Object],
    options: &AttachOptions<'_>,
    require_allocator: bool,
) -> anyhow::Result<Plan> {
    let mut planned = Vec::new();
    let mut threads_done = false;
    let mut linker_done = false;
    let mut allocators = 0;
    let mut glibc_allocators = 0;
    let mut glibc_pthread = false;
    let mut glibc_libc = None;
    for object in objects {
        let elf = match ElfFile::open(&object.open) {
            Ok(elf) => elf,
            Err(err) if options.allocator == Some(object.shown.as_path()) => {
                return Err(err)
                    .with_context(|| format!("--obj {} cannot be probed", object.shown.display()));
            }
            Err(err) => {
                log::debug!("skipping {}: {err:#}", object.shown.display());
                continue;
            }
        };
        let user_prefix = options.symbol_prefix.unwrap_or("");
        let functions =
            elf.functions(|name| wanted(name, user_prefix).or_else(|| is_glibc_malloc(name)));
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
        let mut sets: Vec<(&'static [ProbeSpec], String)> = Vec::new();
        if is_allocator {
            let prefix = allocator_prefix.unwrap_or(user_prefix);
            if !defines(&format!("{prefix}malloc")) {
                bail!("no allocator found: {} defines no {prefix}malloc", object.shown.display());
            }
            allocators += 1;
            if prefix.is_empty() && defines(GLIBC_MALLOC) {
                glibc_allocators += 1;
                if name.starts_with("libc.so") {
                    glibc_libc = file_key(&object.open).ok();
                }
            }
            sets.push((ALLOCATOR_PROBES, prefix.to_string()));
            if !name.starts_with("libstdc++") {
                sets.push((CXX_DELETE_PROBES, String::new()));
            }
        }
        // The linker keeps only the mimalloc functions a program calls.
        let mimalloc = MIMALLOC_PROBES.iter().any(|spec| defines(spec.symbol));
        if mimalloc && options.allocator.is_none() {
            allocators += 1;
            sets.push((MIMALLOC_PROBES, String::new()));
        }
        sets.push((CXX_NEW_PROBES, String::new()));
        sets.push((RUST_PROBES, String::new()));
        if !threads_done && defines("pthread_create") && !name.starts_with("ld-") {
            threads_done = true;
            // glibc before 2.34 kept the pthread API in libpthread.
            glibc_pthread = name.starts_with("libpthread") || defines(GLIBC_MALLOC);
            sets.push((THREAD_PROBES, String::new()));
        }
        if !linker_done && defines("_dl_debug_state") {
            linker_done = true;
            sets.push((LINKER_PROBES, String::new()));
        }
        planned.push(ObjectPlan { object: object.clone(), functions, sets });
    }
    if allocators == 0 && require_allocator {
        match options.allocator {
            Some(path) => bail!(
                "no allocator found: --obj {} defines no malloc (try --symbol-prefix)",
                path.display()
            ),
            None => bail!(
                "no allocator found in process {}: no mapped object defines malloc (use --obj PATH or --symbol-prefix)",
                options.pid
            ),
        }
    }
    let glibc_allocator = allocators == 1 && glibc_allocators == 1;
    Ok(Plan {
        pid: options.pid,
        objects: planned,
        glibc_allocator,
        glibc_pthread,
        glibc_libc: glibc_libc.filter(|_| glibc_allocator),
    })
}

/// glibc's own name for its malloc, in libc.so.6 and in static programs
/// alike; jemalloc, tcmalloc, mimalloc and musl have none.
fn is_glibc_malloc(name: &str) -> Option<String> {
    (name == GLIBC_MALLOC).then(|| name.to_string())
}

const GLIBC_MALLOC: &str = "__libc_malloc";

/// Attach what `plan` says, for its process only.
pub fn attach_all(
    ebpf: &mut Ebpf,
    plan: &Plan,
    links: &mut Links,
) -> anyhow::Result<Vec<ProbedObject>> {
    let mut probed = Vec::new();
    for object in &plan.objects {
        let mut probes = Vec::new();
        for (set, prefix) in &object.sets {
            attach_set(ebpf, object, plan.pid, set, prefix, &mut probes, links)?;
        }
        if !probes.is_empty() {
            probed.push(ProbedObject {
                object: object.object.shown.display().to_string(),
                functions: probes.iter().map(|p| p.symbol.clone()).collect(),
                probes,
            });
        }
    }
    Ok(probed)
}

/// Attach each function of `set` found in `functions`, for process `pid`
/// only: a uprobe belongs to the file, and without the process filter every
/// process mapping the library would trap.
fn attach_set(
    ebpf: &mut Ebpf,
    object: &ObjectPlan,
    pid: u32,
    set: &[ProbeSpec],
    prefix: &str,
    probes: &mut Vec<ProbePlacement>,
    links: &mut Links,
) -> anyhow::Result<()> {
    let (path, functions) = (object.object.open.as_path(), &object.functions);
    let mut planned = Vec::new();
    for spec in set {
        let Some(function) = functions.get(&format!("{prefix}{}", spec.symbol)) else {
            log::debug!("{} has no {}: not probed", path.display(), spec.symbol);
            continue;
        };
        // glibc 2.36 gives aligned_alloc and memalign one address: probing
        // it twice would count each allocation twice.
        if let Some(first) = probes.iter().find(|p| p.offset - p.skipped == function.offset) {
            let alias = ProbePlacement {
                symbol: spec.symbol.to_string(),
                offset: first.offset,
                skipped: first.skipped,
                alias_of: Some(first.symbol.clone()),
            };
            log::info!("{}: same address as {}, probed once", alias.symbol, first.symbol);
            probes.push(alias);
            continue;
        }
        // With a return probe too, both share the one place (see
        // `elf::placement`).
        let skipped = match spec.exit {
            Some(_) => call_probe_offset(&function.code, arguments_read(spec.enter)),
            None => entry_probe_offset(&function.code),
        };
        let offset = function.offset + skipped;
        planned.push(Probe { program: spec.enter, offset, at_return: false });
        if let Some(exit) = spec.exit {
            planned.push(Probe { program: exit, offset, at_return: true });
        }
        match skipped {
            0 => log::info!("{}: probe at entry (file offset {offset:#x})", spec.symbol),
            n => log::info!(
                "{}: probe {n} bytes past entry (file offset {offset:#x}), past an instruction the kernel would single-step",
                spec.symbol
            ),
        }
        probes.push(ProbePlacement {
            symbol: spec.symbol.to_string(),
            offset,
            skipped,
            alias_of: None,
        });
    }
    links.attach_uprobes(ebpf, path, pid, &planned)
}

pub fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    program.try_into().with_context(|| format!("program {name} is not a uprobe"))
}
