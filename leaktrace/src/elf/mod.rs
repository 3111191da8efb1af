//! What an ELF object defines and needs: the file offset and first bytes of
//! the functions leaktrace probes, the libraries it links, whether it is
//! dynamic, its executable segments. Files are mapped, not read: a process
//! can map libraries of hundreds of megabytes. Every stage that reads an
//! object (attach, unwind, symbolize) maps and parses it here, once.

pub mod placement;

use std::{
    collections::HashMap,
    fs::File,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use memmap2::Mmap;

use object::{
    elf::{FileHeader64, DT_NEEDED, PF_X},
    read::elf::{Dyn as _, FileHeader as _},
    Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _, SegmentFlags,
    SymbolKind,
};

use placement::CODE_BYTES;

/// A function's file offset and first bytes.
#[derive(Clone, Debug)]
pub struct Function {
    pub offset: u64,
    pub code: Vec<u8>,
}

/// An object file, mapped.
pub struct ElfFile {
    data: Mmap,
}

impl ElfFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file =
            File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
        Self::from_file(&file, path)
    }

    /// Map an open file; `path` names it in errors.
    pub fn from_file(file: &File, path: &Path) -> anyhow::Result<Self> {
        // SAFETY: the mapping is read-only; a file changed under it (a
        // library upgraded in place) could give wrong bytes, never UB in
        // safe code here, as object validates what it parses.
        let data = unsafe { Mmap::map(file) }
            .with_context(|| format!("failed to map {}", path.display()))?;
        object::File::parse(&*data)
            .with_context(|| format!("{} is not an ELF file", path.display()))?;
        Ok(Self { data })
    }

    /// The parsed object.
    pub fn parse(&self) -> object::File<'_> {
        // Checked in `open`.
        object::File::parse(&*self.data).expect("parsed when opened")
    }

    /// The defined functions whose names `wanted` maps to a key, from the
    /// dynamic and the static symbol table. The first definition wins.
    pub fn functions<F>(&self, wanted: F) -> HashMap<String, Function>
    where
        F: Fn(&str) -> Option<String>,
    {
        let file = self.parse();
        let mut found = HashMap::new();
        for symbol in file.dynamic_symbols().chain(file.symbols()) {
            if symbol.kind() != SymbolKind::Text || !symbol.is_definition() {
                continue;
            }
            let Some(key) = symbol.name().ok().and_then(&wanted) else {
                continue;
            };
            if found.contains_key(&key) {
                continue;
            }
            let Some(offset) = file_offset(&file, &symbol) else {
                continue;
            };
            let start = (offset as usize).min(self.data.len());
            let end = (start + CODE_BYTES).min(self.data.len());
            let code = self.data[start..end].to_vec();
            found.insert(key, Function { offset, code });
        }
        found
    }

    /// The executable PT_LOAD segments: (file offset, file size, link-time address).
    pub fn exec_segments(&self) -> Vec<(u64, u64, u64)> {
        self.parse()
            .segments()
            .filter(|segment| {
                matches!(segment.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0)
            })
            .map(|segment| {
                let (offset, size) = segment.file_range();
                (offset, size, segment.address())
            })
            .collect()
    }

    /// The GNU build-id, hex-encoded.
    pub fn build_id(&self) -> Option<String> {
        let id = self.parse().build_id().ok()??;
        Some(id.iter().map(|byte| format!("{byte:02x}")).collect())
    }

    /// The virtual address that a file offset is loaded at.
    pub fn virtual_address(&self, file_offset: u64) -> Option<u64> {
        self.parse().segments().find_map(|segment| {
            let (start, size) = segment.file_range();
            (start <= file_offset && file_offset < start + size)
                .then(|| segment.address() + (file_offset - start))
        })
    }

    /// Whether the object is dynamically linked (has an interpreter).
    pub fn is_dynamic(&self) -> bool {
        self.parse().section_by_name(".interp").is_some()
    }

    /// The program interpreter (the dynamic linker) a dynamic executable names.
    pub fn interpreter(&self) -> Option<PathBuf> {
        let data = self.parse().section_by_name(".interp")?.data().ok()?;
        let path = data.split(|&byte| byte == 0).next().filter(|path| !path.is_empty())?;
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(path)))
    }

    /// The sonames in DT_NEEDED.
    pub fn needed(&self) -> anyhow::Result<Vec<String>> {
        let data = &*self.data;
        let header = FileHeader64::<object::Endianness>::parse(data)
            .map_err(|err| anyhow!("not a 64-bit ELF file: {err}"))?;
        let endian = header.endian()?;
        let sections = header.sections(endian, data)?;
        // The index returned is that of the linked string table.
        let Some((entries, strings_index)) = sections.dynamic(endian, data)? else {
            return Ok(Vec::new());
        };
        let strings = sections.strings(endian, data, strings_index)?;
        Ok(entries
            .iter()
            .filter(|entry| entry.tag32(endian) == Some(DT_NEEDED))
            .filter_map(|entry| entry.string(endian, strings).ok())
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect())
    }
}

fn file_offset(file: &object::File<'_>, symbol: &object::Symbol<'_, '_>) -> Option<u64> {
    let section = file.section_by_index(symbol.section_index()?).ok()?;
    let (section_offset, _) = section.file_range()?;
    let relative = symbol.address().checked_sub(section.address())?;
    Some(relative + section_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that libc's malloc is found with its code, and nothing unwanted.
    #[test]
    fn finds_wanted_functions() {
        let libc = ElfFile::open(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
        let found = libc.functions(|name| (name == "malloc").then(|| name.to_string()));
        assert_eq!(found.len(), 1);
        assert_eq!(found["malloc"].code.len(), CODE_BYTES);
    }

    /// Check that a dynamic executable is told from a static one.
    #[test]
    fn dynamic_or_static() {
        assert!(ElfFile::open(Path::new("/bin/sh")).unwrap().is_dynamic());
        let linker = ElfFile::open(Path::new("/lib64/ld-linux-x86-64.so.2")).unwrap();
        assert!(!linker.is_dynamic());
        assert_eq!(
            ElfFile::open(Path::new("/bin/sh")).unwrap().interpreter(),
            Some(PathBuf::from("/lib64/ld-linux-x86-64.so.2"))
        );
        assert_eq!(linker.interpreter(), None);
    }

    /// Check that DT_NEEDED names are read.
    #[test]
    fn needed_libraries() {
        let libstdcxx =
            ElfFile::open(Path::new("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")).unwrap();
        let needed = libstdcxx.needed().unwrap();
        assert!(needed.iter().any(|name| name == "libc.so.6"), "{needed:?}");
    }

    /// Check that libc's build-id is read and an offset maps into its text.
    #[test]
    fn build_id_and_addresses() {
        let libc = ElfFile::open(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
        assert_eq!(libc.build_id().map(|id| id.len()), Some(40));
        let malloc = libc.functions(|name| (name == "malloc").then(|| name.to_string()));
        let offset = malloc["malloc"].offset;
        assert!(libc.virtual_address(offset).is_some());
    }

    /// Check that a file that is not ELF is refused.
    #[test]
    fn not_elf() {
        assert!(ElfFile::open(Path::new("/etc/hostname")).is_err());
    }
}
