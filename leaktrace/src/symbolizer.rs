//! Turns stack addresses into frames (function+offset, file:line, module,
//! inlined calls, demangled names) with blazesym. Stacks are symbolized once
//! and cached: a stack id always names the same stack. A target that has
//! exited is symbolized from its last known mappings and the files on disk.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use blazesym::{
    symbolize::{
        source::{Elf, Process, Source},
        CodeInfo, Input, Symbolized, Symbolizer as Blazesym,
    },
    Pid,
};
use serde::{Serialize, Serializer};

use crate::elf::ElfFile;

/// One frame of a symbolized stack, as reports show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frame {
    #[serde(serialize_with = "hex")]
    pub address: u64,
    pub symbol: Option<String>,
    /// Offset of the address from the symbol's start (not for inlined frames).
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    /// A call that the compiler inlined into the next frame.
    pub inlined: bool,
}

/// An executable mapping of the target, for frames blazesym cannot resolve
/// and for symbolizing after the target exited. The unwinder keeps the list
/// (it reads /proc/PID/maps on every change); the symbolizer reads it.
#[derive(Clone, Debug)]
pub struct Module {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub path: PathBuf,
}

/// The target's executable mappings as the unwinder last published them: it
/// follows every change, so the libraries of a target that exits before the
/// first report are known too.
pub type SharedModules = Arc<Mutex<Vec<Module>>>;

pub struct Symbolizer {
    blazesym: Blazesym,
    /// Where separate debug info is looked for.
    debug_dirs: Vec<PathBuf>,
    /// Per module: its debug file found by build-id alone, if any.
    build_id_files: HashMap<PathBuf, Option<PathBuf>>,
    pid: u32,
    cache: HashMap<u32, Vec<Frame>>,
    modules: Vec<Module>,
    /// Copies of the target's files, for when its own are out of reach.
    sysroot: Option<PathBuf>,
    followed: SharedModules,
}

/// Where blazesym looks for separate debug info by default; `--debug-dir`
/// adds to these.
const DEFAULT_DEBUG_DIRS: [&str; 2] = ["/usr/lib/debug", "/lib/debug"];

impl Symbolizer {
    pub fn new(
        pid: u32,
        debug_dirs: &[PathBuf],
        sysroot: Option<PathBuf>,
        followed: SharedModules,
    ) -> Self {
        let dirs: Vec<PathBuf> = debug_dirs
            .iter()
            .cloned()
            .chain(DEFAULT_DEBUG_DIRS.iter().map(PathBuf::from))
            .collect();
        let mut symbolizer = Self {
            blazesym: Blazesym::builder().set_debug_dirs(Some(dirs.clone())).build(),
            debug_dirs: dirs,
            build_id_files: HashMap::new(),
            pid,
            cache: HashMap::new(),
            modules: Vec::new(),
            sysroot,
            followed,
        };
        symbolizer.refresh_modules();
        symbolizer
    }

    /// Take the unwinder's current view of the target's executable mappings
    /// (libraries loaded since); once the target is gone, its last one.
    pub fn refresh_modules(&mut self) {
        if let Ok(followed) = self.followed.lock() {
            if !followed.is_empty() {
                self.modules.clone_from(&followed);
            }
        }
    }

    /// The frames of a stack, innermost first. A live target is symbolized
    /// through /proc (its own files, in any mount namespace); one that has
    /// exited, or any target when `--sysroot` is given, from the files.
    pub fn frames(&mut self, stack_id: u32, ips: &[u64], alive: bool) -> Vec<Frame> {
        if let Some(frames) = self.cache.get(&stack_id) {
            return frames.clone();
        }
        let mut frames = if alive && self.sysroot.is_none() {
            self.symbolize_live(ips)
        } else {
            self.symbolize_from_files(ips)
        };
        for frame in &mut frames {
            if frame.symbol.is_none() {
                if let Some(found) = self.symbolize_by_build_id(frame.address) {
                    *frame = found;
                }
            }
        }
        self.cache.insert(stack_id, frames.clone());
        frames
    }

    fn symbolize_live(&self, ips: &[u64]) -> Vec<Frame> {
        let source = Source::Process(Process::new(Pid::from(self.pid)));
        match self.blazesym.symbolize(&source, Input::AbsAddr(ips)) {
            Ok(symbolized) => {
                ips.iter().zip(symbolized).flat_map(|(&ip, sym)| self.to_frames(ip, sym)).collect()
            }
            Err(err) => {
                log::debug!("symbolization failed: {err:#}");
                self.symbolize_from_files(ips)
            }
        }
    }

    /// Symbolize each address from the file its mapping came from.
    fn symbolize_from_files(&self, ips: &[u64]) -> Vec<Frame> {
        ips.iter()
            .flat_map(|&ip| {
                let Some(module) = self.module_of(ip) else {
                    return vec![self.unknown(ip)];
                };
                let source = Source::Elf(Elf::new(self.readable_path(&module.path)));
                let file_offset = ip - module.start + module.offset;
                match self.blazesym.symbolize_single(&source, Input::FileOffset(file_offset)) {
                    Ok(sym) => self.to_frames(ip, sym),
                    Err(_) => vec![self.unknown(ip)],
                }
            })
            .collect()
    }

    /// blazesym follows a build-id only from a .gnu_debuglink; a stripped
    /// binary with neither symbols nor a link is looked up here, as
    /// DIR/.build-id/xx/rest.debug in each debug directory.
    fn symbolize_by_build_id(&mut self, ip: u64) -> Option<Frame> {
        let module = self.module_of(ip)?.clone();
        let path = self.readable_path(&module.path);
        let debug_file = match self.build_id_files.get(&path) {
            Some(found) => found.clone()?,
            None => {
                let found =
                    ElfFile::open(&path).ok().and_then(|elf| elf.build_id()).and_then(|id| {
                        let (dir, rest) = id.split_at(2);
                        self.debug_dirs
                            .iter()
                            .map(|debug| {
                                debug.join(".build-id").join(dir).join(format!("{rest}.debug"))
                            })
                            .find(|candidate| candidate.exists())
                    });
                self.build_id_files.insert(path.clone(), found.clone());
                found?
            }
        };
        let address =
            ElfFile::open(&path).ok()?.virtual_address(ip - module.start + module.offset)?;
        let symbolized = self
            .blazesym
            .symbolize_single(&Source::Elf(Elf::new(debug_file)), Input::VirtOffset(address))
            .ok()?;
        let mut frames = self.to_frames(ip, symbolized);
        let frame = frames.pop()?;
        frame
            .symbol
            .is_some()
            .then(|| Frame { module: Some(module.path.display().to_string()), ..frame })
    }

    /// A module's file as leaktrace can open it: under --sysroot, through
    /// /proc/PID/root while the target lives, or as named.
    fn readable_path(&self, path: &std::path::Path) -> PathBuf {
        let relative = path.strip_prefix("/").unwrap_or(path);
        match &self.sysroot {
            Some(root) => root.join(relative),
            None => {
                let through_root = PathBuf::from(format!("/proc/{}/root", self.pid)).join(relative);
                if through_root.exists() {
                    through_root
                } else {
                    path.to_path_buf()
                }
            }
        }
    }

    fn to_frames(&self, ip: u64, symbolized: Symbolized<'_>) -> Vec<Frame> {
        let sym = match symbolized {
            Symbolized::Sym(sym) => sym,
            Symbolized::Unknown(_) => return vec![self.unknown(ip)],
        };
        let module = sym
            .module
            .as_ref()
            .map(|m| m.to_string_lossy().into_owned())
            .or_else(|| self.module_of(ip).map(|m| m.path.display().to_string()));
        let (file, line) = code_location(sym.code_info.as_deref());
        let mut frames: Vec<Frame> = sym
            .inlined
            .iter()
            .rev()
            .map(|inlined| {
                let (file, line) = code_location(inlined.code_info.as_ref());
                Frame {
                    address: ip,
                    symbol: Some(inlined.name.to_string()),
                    offset: None,
                    file,
                    line,
                    module: module.clone(),
                    inlined: true,
                }
            })
            .collect();
        frames.push(Frame {
            address: ip,
            symbol: Some(sym.name.to_string()),
            offset: Some(sym.offset as u64),
            file,
            line,
            module,
            inlined: false,
        });
        frames
    }

    /// A frame no symbol covers still names its module and offset.
    fn unknown(&self, ip: u64) -> Frame {
        let module = self.module_of(ip);
        Frame {
            address: ip,
            symbol: None,
            offset: module.map(|m| ip - m.start + m.offset),
            file: None,
            line: None,
            module: module.map(|m| m.path.display().to_string()),
            inlined: false,
        }
    }

    fn module_of(&self, ip: u64) -> Option<&Module> {
        self.modules.iter().find(|m| m.start <= ip && ip < m.end)
    }
}

/// Addresses are "0x..." strings in JSON: scripts read them without 64-bit
/// integer trouble.
fn hex<S: Serializer>(address: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{address:#x}"))
}

fn code_location(info: Option<&CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match info {
        Some(info) => (Some(info.to_path().display().to_string()), info.line),
        None => (None, None),
    }
}
