//! The kernel-allocation tracepoints (kmem, percpu): where each record
//! keeps the fields the programs read, from the tracepoints' format files
//! (layouts differ across kernels), and attaching them. An event this kernel
//! lacks is skipped with a warning.

use aya::Ebpf;
use leaktrace_common::{KmemConfig, KmemField, NO_FIELD};

use super::{
    tracepoints::{attach_tracepoint, format_of, parse_field_offset},
    Links,
};

/// One kernel-allocation tracepoint: its program, event, and the fields
/// read from its record.
struct KmemEvent {
    program: &'static str,
    category: &'static str,
    event: &'static str,
    fields: &'static [(KmemField, &'static str)],
    /// Traced only with `--percpu`.
    percpu: bool,
}

const EVENTS: &[KmemEvent] = &[
    KmemEvent {
        program: "kmem_kmalloc",
        category: "kmem",
        event: "kmalloc",
        fields: &[(KmemField::KmallocPtr, "ptr"), (KmemField::KmallocBytes, "bytes_alloc")],
        percpu: false,
    },
    KmemEvent {
        program: "kmem_cache_alloc",
        category: "kmem",
        event: "kmem_cache_alloc",
        fields: &[
            (KmemField::CacheAllocPtr, "ptr"),
            (KmemField::CacheAllocBytes, "bytes_alloc"),
            (KmemField::CacheAllocName, "name"),
        ],
        percpu: false,
    },
    KmemEvent {
        program: "kmem_kfree",
        category: "kmem",
        event: "kfree",
        fields: &[(KmemField::KfreePtr, "ptr")],
        percpu: false,
    },
    KmemEvent {
        program: "kmem_cache_free",
        category: "kmem",
        event: "kmem_cache_free",
        fields: &[(KmemField::CacheFreePtr, "ptr")],
        percpu: false,
    },
    KmemEvent {
        program: "kmem_mm_page_alloc",
        category: "kmem",
        event: "mm_page_alloc",
        fields: &[
            (KmemField::PageAllocPfn, "pfn"),
            (KmemField::PageAllocOrder, "order"),
            (KmemField::PageAllocMigratetype, "migratetype"),
        ],
        percpu: false,
    },
    KmemEvent {
        program: "kmem_mm_page_free",
        category: "kmem",
        event: "mm_page_free",
        fields: &[(KmemField::PageFreePfn, "pfn"), (KmemField::PageFreeOrder, "order")],
        percpu: false,
    },
    KmemEvent {
        program: "kmem_mm_page_free_batched",
        category: "kmem",
        event: "mm_page_free_batched",
        fields: &[(KmemField::PageFreeBatchedPfn, "pfn")],
        percpu: false,
    },
    KmemEvent {
        program: "kmem_percpu_alloc",
        category: "percpu",
        event: "percpu_alloc_percpu",
        fields: &[(KmemField::PercpuAllocPtr, "ptr"), (KmemField::PercpuAllocBytes, "bytes_alloc")],
        percpu: true,
    },
    KmemEvent {
        program: "kmem_percpu_free",
        category: "percpu",
        event: "percpu_free_percpu",
        fields: &[(KmemField::PercpuFreePtr, "ptr")],
        percpu: true,
    },
];

/// The kernel-allocation events this kernel has, with the offsets of their
/// fields filled into `config`. Events missing, or missing a field, are
/// left out with a warning.
pub struct KmemPlan {
    pub config: KmemConfig,
    /// The programs to load and attach: (program, category, event).
    pub events: Vec<(&'static str, &'static str, &'static str)>,
    /// "category:event" of the events left out.
    pub missing: Vec<String>,
}

/// Read the format files of the events wanted.
pub fn plan(percpu: bool) -> anyhow::Result<KmemPlan> {
    let mut config = KmemConfig::default();
    let mut events = Vec::new();
    let mut missing = Vec::new();
    for event in EVENTS.iter().filter(|event| percpu || !event.percpu) {
        let name = format!("{}:{}", event.category, event.event);
        let Ok(format) = format_of(event.category, event.event) else {
            log::warn!("kernel event {name} not found: its allocations are not traced");
            missing.push(name);
            continue;
        };
        let offsets: Option<Vec<(KmemField, u16)>> = event
            .fields
            .iter()
            .map(|&(field, field_name)| {
                let offset = parse_field_offset(&format, field_name)?;
                u16::try_from(offset).ok().filter(|&o| o != NO_FIELD).map(|o| (field, o))
            })
            .collect();
        let Some(offsets) = offsets else {
            log::warn!("kernel event {name} lacks a field leaktrace reads: it is not traced");
            missing.push(name);
            continue;
        };
        for (field, offset) in offsets {
            config.offsets[field as usize] = offset;
        }
        events.push((event.program, event.category, event.event));
    }
    anyhow::ensure!(
        events.iter().any(|(program, ..)| *program == "kmem_kmalloc"),
        "this kernel has no kmem:kmalloc tracepoint: kernel allocations cannot be traced"
    );
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    config.page_size = u64::try_from(page_size).unwrap_or(4096);
    Ok(KmemPlan { config, events, missing })
}

/// Every kernel-allocation program's name, for loading.
pub fn programs(plan: &KmemPlan) -> impl Iterator<Item = &'static str> + '_ {
    plan.events.iter().map(|(program, ..)| *program)
}

/// Attach the planned events. They fire machine-wide; the programs keep
/// what the configuration asks for.
pub fn attach(ebpf: &mut Ebpf, plan: &KmemPlan, links: &mut Links) -> anyhow::Result<()> {
    for (program, category, event) in &plan.events {
        attach_tracepoint(ebpf, program, category, event, links)?;
    }
    Ok(())
}
