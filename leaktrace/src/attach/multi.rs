//! Uprobes through `uprobe_multi` links (kernel 6.6+): one link holds one
//! program at every offset of one file it runs at, for one process.
//!
//! Why not aya's uprobes: each is a perf event, and the kernel waits out a
//! grace period as each one goes, one after another (~80 ms each here:
//! ~40 probes took 3-4 s to detach). A multi link waits too (~50 ms), but
//! links closed at once share the wait: 38 closed from a thread each took
//! 77 ms here, against 1.9 s closed in turn. That is what lets leaktrace
//! exit at once and `-s N` attach and detach its allocation probes for
//! each sampling window.
//!
//! aya 0.14 cannot make these links: the kernel takes a program for one
//! only if it was loaded with the `uprobe_multi` attach type, which aya
//! does not set for uprobes. So the uprobe programs are loaded here, with
//! the `bpf()` syscall, from the same object relocated by aya-obj (aya's
//! own parser) against the maps aya created: both sides share every map.

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::Path,
};

use anyhow::{anyhow, Context as _};
use aya::Ebpf;
use aya_obj::generated::{bpf_insn, bpf_prog_info};

use crate::bpf::{bpf, bpf_fd, map_fd};

/// `enum bpf_attach_type`'s BPF_TRACE_UPROBE_MULTI (kernel 6.6).
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
/// `BPF_F_UPROBE_MULTI_RETURN`: the link's program runs at return.
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// The verifier's log level for its statistics alone.
const BPF_LOG_STATS: u32 = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `union bpf_attr` for BPF_PROG_LOAD, up to `line_info_cnt` (the kernel
/// reads the fields past a shorter size as zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_BTF_LOAD.
#[repr(C)]
#[derive(Default)]
struct BtfLoadAttr {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE with its `uprobe_multi` part.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

const _: () = assert!(std::mem::size_of::<ProgLoadAttr>() == 112);
const _: () = assert!(std::mem::offset_of!(ProgLoadAttr, line_info_cnt) == 104);
const _: () = assert!(std::mem::size_of::<LinkCreateAttr>() == 64);

/// One program's code, relocated, with its BTF records.
struct Code {
    insns: Vec<bpf_insn>,
    license: CString,
    /// `bpf_func_info` records, their size and count.
    func_info: (Vec<u8>, u32, u32),
    /// `bpf_line_info` records, their size and count.
    line_info: (Vec<u8>, u32, u32),
}

/// Load `code` as a uprobe program for multi links, its BTF records
/// against `btf` (the kernel wants them for the subprograms the stack walk
/// passes to `bpf_loop`); with the verifier's log in the error when it
/// refuses.
fn load(name: &str, code: &Code, btf: Option<BorrowedFd<'_>>) -> anyhow::Result<OwnedFd> {
    let Code { insns, license, func_info, line_info } = code;
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_TRACE_UPROBE_MULTI,
        ..Default::default()
    };
    if let Some(btf) = btf {
        attr.prog_btf_fd = btf.as_raw_fd() as u32;
        if func_info.1 > 0 {
            attr.func_info = func_info.0.as_ptr() as u64;
            (attr.func_info_rec_size, attr.func_info_cnt) = (func_info.1, func_info.2);
        }
        if line_info.1 > 0 {
            attr.line_info = line_info.0.as_ptr() as u64;
            (attr.line_info_rec_size, attr.line_info_cnt) = (line_info.1, line_info.2);
        }
    }
    // The kernel's names hold 15 bytes and a NUL.
    let len = name.len().min(15);
    attr.prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    // With -vv, the verifier's statistics (BPF_LOG_STATS: a few lines at
    // the end, no trace): the instructions it processed are what the
    // start-up pays for each program.
    let mut stats = vec![0u8; 1024];
    if log::log_enabled!(log::Level::Debug) {
        attr.log_level = BPF_LOG_STATS;
        attr.log_size = stats.len() as u32;
        attr.log_buf = stats.as_mut_ptr() as u64;
    }
    let loaded = bpf_fd(BPF_PROG_LOAD, &mut attr);
    if attr.log_level == BPF_LOG_STATS {
        let text = String::from_utf8_lossy(&stats);
        if let Some(line) = text.lines().find(|line| line.starts_with("processed")) {
            log::debug!("program {name}: the verifier {line}");
        }
    }
    match loaded {
        Ok(fd) => Ok(fd),
        Err(first) => {
            // Again with the log, to say why.
            let mut log = vec![0u8; 1 << 20];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let again = bpf_fd(BPF_PROG_LOAD, &mut attr);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            match again {
                Ok(fd) => Ok(fd),
                Err(_) => Err(anyhow!("{first}; the verifier's log ends:\n{}", tail.join("\n"))),
            }
        }
    }
}

/// Whether this kernel makes multi links (a program loads with their
/// attach type; before 6.6 the kernel refuses it).
pub fn supported() -> bool {
    // SAFETY: plain integers and a bitfield: all zeros is an instruction.
    let mut insns: [bpf_insn; 2] = unsafe { std::mem::zeroed() };
    insns[0].code = 0xb7; // r0 = 0
    insns[1].code = 0x95; // exit
    let code = Code {
        insns: insns.to_vec(),
        license: CString::from(c"GPL"),
        func_info: (Vec::new(), 0, 0),
        line_info: (Vec::new(), 0, 0),
    };
    load("leaktrace_probe", &code, None).is_ok()
}

/// The uprobe programs, relocated against aya's maps, each loaded once
/// when first wanted.
pub struct MultiPrograms {
    code: HashMap<String, Code>,
    /// The object's BTF, loaded: the programs' records point into it.
    btf: Option<OwnedFd>,
    loaded: HashMap<String, OwnedFd>,
}

/// Load BTF into the kernel.
fn load_btf(bytes: &[u8]) -> io::Result<OwnedFd> {
    let mut attr = BtfLoadAttr {
        btf: bytes.as_ptr() as u64,
        btf_size: bytes.len() as u32,
        ..Default::default()
    };
    bpf_fd(BPF_BTF_LOAD, &mut attr)
}

impl MultiPrograms {
    /// The programs of `object` whose section says uprobe or uretprobe, their map
    /// references pointing at the maps `ebpf` (loaded from the same object)
    /// created.
    pub fn new(object: &[u8], ebpf: &Ebpf) -> anyhow::Result<Self> {
        let mut obj = aya_obj::Object::parse(object).context("failed to parse the eBPF object")?;
        // As aya does: the object's BTF, made fit for this kernel.
        let btf = match aya::features().btf() {
            Some(features) => obj
                .fixup_and_sanitize_btf(features)
                .context("failed to prepare the eBPF object's BTF")?
                .map(|btf| load_btf(&btf.to_bytes()))
                .transpose()
                .context("failed to load the eBPF object's BTF")?,
            None => None,
        };
        let maps = obj
            .maps
            .iter()
            .map(|(name, map)| {
                let fd = ebpf
                    .map(name)
                    .map(map_fd)
                    .ok_or_else(|| anyhow!("map {name} missing from the loaded programs"))?;
                Ok((name.clone(), fd, map.clone()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let text_sections = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(
            maps.iter().map(|(name, fd, map)| (name.as_str(), *fd, map)),
            &text_sections,
        )
        .context("failed to relocate the uprobe programs' maps")?;
        obj.relocate_calls(&text_sections)
            .context("failed to relocate the uprobe programs' calls")?;
        obj.sanitize_functions(aya::features());
        let code = obj
            .programs
            .iter()
            .filter(|(_, program)| {
                matches!(
                    program.section,
                    aya_obj::ProgramSection::UProbe { .. }
                        | aya_obj::ProgramSection::URetProbe { .. }
                )
            })
            .filter_map(|(name, program)| {
                let function = obj.functions.get(&program.function_key())?;
                let code = Code {
                    insns: function.instructions.clone(),
                    license: program.license.clone(),
                    func_info: (
                        function.func_info.func_info_bytes(),
                        function.func_info_rec_size as u32,
                        function.func_info.len() as u32,
                    ),
                    line_info: (
                        function.line_info.line_info_bytes(),
                        function.line_info_rec_size as u32,
                        function.line_info.len() as u32,
                    ),
                };
                Some((name.clone(), code))
            })
            .collect();
        Ok(Self { code, btf, loaded: HashMap::new() })
    }

    /// Load `names` (those not loaded yet), in parallel.
    pub fn load(&mut self, names: &[&str]) -> anyhow::Result<()> {
        let mut wanted = Vec::new();
        for name in names {
            if self.loaded.contains_key(*name) {
                continue;
            }
            let code = self
                .code
                .get(*name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
            wanted.push((*name, code));
        }
        wanted.sort_by_key(|(name, _)| super::verify_order(name));
        let btf = self.btf.as_ref().map(|fd| fd.as_fd());
        let loaded = super::in_parallel(wanted, |(name, code)| {
            let started = std::time::Instant::now();
            let fd =
                load(name, code, btf).with_context(|| format!("failed to load program {name}"))?;
            log::debug!("program {name} loaded in {:?}", started.elapsed());
            Ok((name.to_string(), fd))
        })?;
        self.loaded.extend(loaded);
        Ok(())
    }

    /// Program `name`, loaded now if it was not.
    pub fn fd(&mut self, name: &str) -> anyhow::Result<BorrowedFd<'_>> {
        if !self.loaded.contains_key(name) {
            self.load(&[name])?;
        }
        let fd = self.loaded.get(name).ok_or_else(|| anyhow!("program {name} not loaded"))?;
        Ok(fd.as_fd())
    }

    /// Each loaded program's runs and total run time (`--program-stats`).
    pub fn stats(&self) -> Vec<(&str, u64, u64)> {
        self.loaded
            .iter()
            .filter_map(|(name, fd)| {
                // SAFETY: plain integers and arrays: all zeros is a value.
                let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
                let mut attr = InfoAttr {
                    bpf_fd: fd.as_raw_fd() as u32,
                    info_len: std::mem::size_of::<bpf_prog_info>() as u32,
                    info: &mut info as *mut bpf_prog_info as u64,
                };
                bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
                Some((name.as_str(), info.run_cnt, info.run_time_ns))
            })
            .collect()
    }
}

/// Attach `program` at `offsets` of the file `path` (file offsets), at
/// entry or at return, for process `pid` only.
pub fn attach(
    program: BorrowedFd<'_>,
    path: &Path,
    offsets: &[u64],
    at_return: bool,
    pid: u32,
) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        attach_type: BPF_TRACE_UPROBE_MULTI,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        cnt: offsets.len() as u32,
        multi_flags: if at_return { BPF_F_UPROBE_MULTI_RETURN } else { 0 },
        pid,
        ..Default::default()
    };
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}
