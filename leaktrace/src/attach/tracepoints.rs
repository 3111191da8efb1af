//! The kernel tracepoints the thread bookkeeping needs, and tracefs, where
//! their record layouts are read from.

use std::path::Path;

use anyhow::{anyhow, Context as _};
use aya::{programs::TracePoint, Ebpf};

use super::Links;

/// Kernel tracepoints: (program, category, name).
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("kernel_sched_process_fork", "sched", "sched_process_fork"),
    ("kernel_sched_process_exit", "sched", "sched_process_exit"),
    ("kernel_sched_process_exec", "sched", "sched_process_exec"),
];

const TRACEFS: &str = "/sys/kernel/tracing";

pub fn tracepoint<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut TracePoint> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    program.try_into().with_context(|| format!("program {name} is not a tracepoint"))
}

/// Attach the thread tracepoints. They fire for every process; the
/// programs keep only the target's events.
pub fn attach_tracepoints(ebpf: &mut Ebpf, links: &mut Links) -> anyhow::Result<()> {
    for (name, category, event) in TRACEPOINTS {
        attach_tracepoint(ebpf, name, category, event, links)?;
    }
    Ok(())
}

/// Attach program `name` to tracepoint `category:event`, its link kept in
/// `links`.
pub fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &str,
    category: &str,
    event: &str,
    links: &mut Links,
) -> anyhow::Result<()> {
    let program = tracepoint(ebpf, name)?;
    let id = program
        .attach(category, event)
        .with_context(|| format!("failed to attach to tracepoint {category}:{event}"))?;
    links.add_tracepoint(program.take_link(id)?);
    Ok(())
}

/// Where sched_process_fork puts `child_pid`, from the tracepoint's format
/// file: the record layout changed between kernels.
pub fn fork_child_pid_offset() -> anyhow::Result<u32> {
    let format = format_of("sched", "sched_process_fork")?;
    parse_field_offset(&format, "child_pid")
        .ok_or_else(|| anyhow!("no child_pid field in sched:sched_process_fork's format"))
}

/// The format file of tracepoint `category:event`.
pub fn format_of(category: &str, event: &str) -> anyhow::Result<String> {
    mount_tracefs()?;
    let path = format!("{TRACEFS}/events/{category}/{event}/format");
    std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))
}

/// The offset of `field` in a tracepoint format file.
pub fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
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
    // mount(2) itself, not the mount program: leaktrace copied into a bare
    // container has no other program to run.
    let _ = std::fs::create_dir_all(TRACEFS);
    let (source, target, kind) = (c"tracefs", c"/sys/kernel/tracing", c"tracefs");
    // SAFETY: NUL-terminated strings that live across the call, no data.
    let status = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), 0, std::ptr::null())
    };
    if status != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!("tracefs is not mounted at {TRACEFS} and mounting it failed")
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
