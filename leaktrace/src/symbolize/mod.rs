//! Turns stack addresses into frames (function+offset, file:line, module,
//! inlined calls, demangled names) with blazesym. Stacks are symbolized once
//! and cached: a stack id always names the same stack. A target that has
//! exited is symbolized from its last known mappings and the files on disk.

pub mod kernel;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use blazesym::{
    symbolize::{
        source::{Elf, Process, Source},
        CodeInfo, Input, Symbolized, Symbolizer as Blazesym,
    },
    Pid,
};

use leaktrace_report::Frame;

use crate::{
    elf::ElfFile,
    proc::{shown_path, through_root, ExecMapping},
};

pub struct Symbolizer {
    blazesym: Blazesym,
    /// Where separate debug info is looked for.
    debug_dirs: Vec<PathBuf>,
    /// Per module: its debug file found by build-id alone, if any.
    build_id_files: HashMap<PathBuf, Option<PathBuf>>,
    pid: u32,
    cache: HashMap<u32, Vec<Frame>>,
    modules: Vec<ExecMapping>,
    /// Copies of the target's files, for when its own are out of reach.
    sysroot: Option<PathBuf>,
    /// The objects' files as opened by the unwinder, by (device, inode).
    files: HashMap<(u64, u64), PathBuf>,
    /// Modules named from their symbol tables, their debug info unreadable.
    unreadable_debug_info: HashSet<PathBuf>,
}

/// Where blazesym looks for separate debug info by default; `--debug-dir`
/// adds to these.
const DEFAULT_DEBUG_DIRS: [&str; 2] = ["/usr/lib/debug", "/lib/debug"];

impl Symbolizer {
    pub fn new(pid: u32, debug_dirs: &[PathBuf], sysroot: Option<PathBuf>) -> Self {
        let dirs: Vec<PathBuf> = debug_dirs
            .iter()
            .cloned()
            .chain(DEFAULT_DEBUG_DIRS.iter().map(PathBuf::from))
            .collect();
        Self {
            // Names are demangled here (`demangle`): blazesym runs a name
            // of unknown language through the C++ demangler, which takes a
            // C function `f` for the type code of `float`.
            blazesym: Blazesym::builder()
                .set_debug_dirs(Some(dirs.clone()))
                .enable_demangling(false)
                .build(),
            debug_dirs: dirs,
            build_id_files: HashMap::new(),
            pid,
            cache: HashMap::new(),
            modules: Vec::new(),
            sysroot,
            files: HashMap::new(),
            unreadable_debug_info: HashSet::new(),
        }
    }

    /// Take the target's executable mappings as the unwinder last
    /// published them (libraries loaded since); once the target is gone,
    /// its last ones stay.
    /// `files` names each object's file as this process can open it, by
    /// (device, inode).
    pub fn set_mappings(&mut self, mappings: &[ExecMapping], files: HashMap<(u64, u64), PathBuf>) {
        if !mappings.is_empty() {
            self.modules = mappings.to_vec();
        }
        self.files.extend(files);
    }

    /// The target's executable mappings, as last taken.
    pub fn modules(&self) -> &[ExecMapping] {
        &self.modules
    }

    /// Forget the frames found so far: the target exec'd, and a stack id
    /// may now name code of another program at the same addresses.
    pub fn forget_stacks(&mut self) {
        self.cache.clear();
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
                } else if let Some(found) = self.symbolize_from_symbols(frame.address) {
                    *frame = found;
                }
            }
        }
        self.cache.insert(stack_id, frames.clone());
        frames
    }

    fn symbolize_live(&self, ips: &[u64]) -> Vec<Frame> {
        let source = Source::Process(Process::new(Pid::from(crate::proc::reader(self.pid))));
        let calls: Vec<u64> = ips.iter().map(|&ip| call_site(ip)).collect();
        match self.blazesym.symbolize(&source, Input::AbsAddr(&calls)) {
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
                let source = Source::Elf(Elf::new(self.readable_path(module)));
                let file_offset = call_site(ip) - module.start + module.offset;
                let mut frames =
                    match self.blazesym.symbolize_single(&source, Input::FileOffset(file_offset)) {
                        Ok(sym) => self.to_frames(ip, sym),
                        Err(_) => vec![self.unknown(ip)],
                    };
                // Named as the target names it, not by the file opened here
                // (a copy under --sysroot, or /proc/self/fd/N).
                let name = shown_path(&module.path).display().to_string();
                for frame in &mut frames {
                    frame.module = Some(name.clone());
                }
                frames
            })
            .collect()
    }

    /// blazesym follows a build-id only from a .gnu_debuglink; a stripped
    /// binary with neither symbols nor a link is looked up here, as
    /// DIR/.build-id/xx/rest.debug in each debug directory.
    fn symbolize_by_build_id(&mut self, ip: u64) -> Option<Frame> {
        let module = self.module_of(ip)?.clone();
        let path = self.readable_path(&module);
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
        let address = ElfFile::open(&path)
            .ok()?
            .virtual_address(call_site(ip) - module.start + module.offset)?;
        let symbolized = self
            .blazesym
            .symbolize_single(&Source::Elf(Elf::new(debug_file)), Input::VirtOffset(address))
            .ok()?;
        let mut frames = self.to_frames(ip, symbolized);
        let frame = frames.pop()?;
        frame.symbol.is_some().then(|| Frame {
            module: Some(shown_path(&module.path).display().to_string()),
            ..frame
        })
    }

    /// The name of `ip` from its module's symbol tables alone, when its
    /// debug info could not be read (corrupt, or of a format blazesym
    /// refuses): a name without file:line beats none. Said once a module.
    fn symbolize_from_symbols(&mut self, ip: u64) -> Option<Frame> {
        let module = self.module_of(ip)?.clone();
        let mut elf = Elf::new(self.readable_path(&module));
        elf.debug_syms = false;
        let file_offset = call_site(ip) - module.start + module.offset;
        let symbolized = self
            .blazesym
            .symbolize_single(&Source::Elf(elf), Input::FileOffset(file_offset))
            .ok()?;
        let mut frame = self.to_frames(ip, symbolized).pop()?;
        frame.symbol.as_ref()?;
        let shown = shown_path(&module.path);
        if self.unreadable_debug_info.insert(shown.clone()) {
            eprintln!(
                "leaktrace: warning: the debug info of {} is unreadable: its functions are named from its symbol table, without file:line",
                shown.display()
            );
        }
        frame.module = Some(shown.display().to_string());
        Some(frame)
    }

    /// A module's file as leaktrace can open it: under --sysroot, the file
    /// the unwinder holds open, through /proc/PID/root while the target
    /// lives, or as named.
    fn readable_path(&self, module: &ExecMapping) -> PathBuf {
        let path = shown_path(&module.path);
        let path = path.as_path();
        if let Some(root) = &self.sysroot {
            return root.join(path.strip_prefix("/").unwrap_or(path));
        }
        match self.files.get(&module.file) {
            Some(open) => open.clone(),
            None => {
                let through_root = through_root(self.pid, path);
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
                let (symbol, mangled) = names(&inlined.name);
                Frame {
                    address: ip,
                    symbol: Some(symbol),
                    offset: None,
                    file,
                    line,
                    module: module.clone(),
                    inlined: true,
                    mangled,
                }
            })
            .collect();
        let (symbol, mangled) = names(&sym.name);
        frames.push(Frame {
            address: ip,
            symbol: Some(symbol),
            // From the symbol to the return address shown, not to the call.
            offset: Some(sym.offset as u64 + (ip - call_site(ip))),
            file,
            line,
            module,
            inlined: false,
            mangled,
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
            module: module.map(|m| shown_path(&m.path).display().to_string()),
            inlined: false,
            mangled: None,
        }
    }

    fn module_of(&self, ip: u64) -> Option<&ExecMapping> {
        self.modules.iter().find(|m| m.start <= ip && ip < m.end)
    }
}

/// A symbol's name as its source wrote it: a mangled C++ (`_Z`) or Rust
/// (`_R`, and legacy `_ZN...17h<hash>E`) name demangled, any other name
/// as it is. Only a name with a mangling prefix is demangled: a C
/// function is called `f`, `i` or `d`, which the C++ demangler would read
/// as the types float, int and double.
pub fn demangle(name: &str) -> String {
    // "__Z": the extra underscore of some platforms' C++ names.
    let mangled = if name.starts_with("__Z") { &name[1..] } else { name };
    if !(name.starts_with("_R") || mangled.starts_with("_Z")) {
        return name.to_string();
    }
    if let Ok(rust) = rustc_demangle::try_demangle(name) {
        return format!("{rust:#}");
    }
    cpp_demangle::Symbol::new(mangled)
        .ok()
        .and_then(|symbol| symbol.demangle().ok())
        .unwrap_or_else(|| name.to_string())
}

/// A symbol's name as shown (demangled), and as the object names it when
/// that differs.
fn names(name: &str) -> (String, Option<String>) {
    let shown = demangle(name);
    let mangled = (shown != name).then(|| name.to_string());
    (shown, mangled)
}

/// The address looked up for a frame whose address is a return address
/// (every frame here: the stack is taken as the allocator returns): one
/// byte back, inside the call instruction, as perf, gdb and libunwind do.
/// The return address itself can lie past the end of the calling function
/// (a call to a function that never returns), or in the code of the line
/// after the call, and past the end of an inlined function whose last
/// instruction is the call, which would then vanish from the stack.
fn call_site(ip: u64) -> u64 {
    ip.saturating_sub(1)
}

fn code_location(info: Option<&CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match info {
        Some(info) => (Some(info.to_path().display().to_string()), info.line),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that C names are left as written and mangled names are
    /// demangled, template arguments included.
    #[test]
    fn only_mangled_names_demangled() {
        for c_name in
            ["f", "i", "d", "v", "c", "x", "main", "leak_step", "_start", "__libc_start_main"]
        {
            assert_eq!(demangle(c_name), c_name);
        }
        assert_eq!(demangle("_ZN6LedgerIiE6appendEi"), "Ledger<int>::append(int)");
        assert_eq!(
            demangle("_ZN11rust_system8box_leak17h0123456789abcdefE"),
            "rust_system::box_leak"
        );
        assert_eq!(demangle("_RNvCs1234_11rust_system8box_leak"), "rust_system::box_leak");
        assert_eq!(demangle("_Znot_really_mangled"), "_Znot_really_mangled");
    }
}
