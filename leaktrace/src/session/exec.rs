//! The target exec'd another program: what the old image held is gone with
//! its address space, so its books are dropped, and the new image's objects
//! that were not probed yet are (its unwind tables follow with the mappings).

use std::{collections::HashSet, path::PathBuf};

use aya::Ebpf;

use crate::{
    attach::{self, AttachOptions, Links},
    target::{objects_to_probe, Target},
};

/// Drop the old image's books and probe the new image's new objects;
/// returns the program the target runs now.
pub fn forget_image(
    ebpf: &mut Ebpf,
    target: &Target,
    symbol_prefix: Option<&str>,
    probed_files: &mut HashSet<(u64, u64)>,
    links: &mut Links,
) -> anyhow::Result<PathBuf> {
    let pid = target.pid;
    let program =
        std::fs::read_link(format!("/proc/{}/exe", crate::proc::reader(pid))).unwrap_or_default();
    log::info!("pid {pid} exec'd {}: the old image's books are dropped", program.display());
    attach::forget_image(ebpf)?;
    let objects = objects_to_probe(target, None)?;
    let options = AttachOptions { pid, symbol_prefix, allocator: None };
    let plan = attach::plan_new(&objects, &options, probed_files)?;
    let probed = attach::attach_all(ebpf, &plan, links)?;
    for object in &probed {
        log::info!("after exec: {} functions probed in {}", object.functions.len(), object.object);
    }
    probed_files.extend(plan.files());
    Ok(program)
}
