//! The objects whose functions may be probed: what a running target maps,
//! or for a `-c` child that has not run its program yet, the program and the
//! libraries it needs as the loader would find them.

use std::path::{Path, PathBuf};

use crate::{
    elf::ElfFile,
    proc::{map_file, mapped_files, shown_path, through_root},
};

use super::Target;

/// An object to probe: its path as the target names it (for the user) and
/// the path to open it by from here.
#[derive(Clone, Debug)]
pub struct Object {
    pub shown: PathBuf,
    pub open: PathBuf,
}

/// The objects whose functions may be probed, executable first: what the
/// target maps, or for a `-c` child that has not run its program yet, the
/// program and the libraries it needs as the loader would find them.
pub fn objects_to_probe(target: &Target, obj: Option<&Path>) -> anyhow::Result<Vec<Object>> {
    let local = |path: PathBuf| Object { shown: path.clone(), open: path };
    let mut objects: Vec<Object> = match target.program() {
        Some(program) => {
            let mut objects = vec![local(program.to_path_buf())];
            let elf = ElfFile::open(program)?;
            if elf.is_dynamic() {
                for soname in elf.needed()? {
                    if let Some(path) = find_library(&soname) {
                        objects.push(local(path));
                    }
                }
                // The dynamic linker, whose debugger hook says when a
                // library is loaded.
                objects.extend(elf.interpreter().map(local));
                // The C library and libstdc++ ours would load, whatever
                // the program names directly.
                let ours: Vec<PathBuf> =
                    mapped_files(std::process::id())?.into_iter().map(|file| file.path).collect();
                objects.extend(find_libc(&ours).map(local));
                objects.extend(system_cxx_runtime().map(local));
            }
            objects
        }
        // Opened through the mapping itself: the very file mapped, in any
        // mount namespace, whatever its path says (a chroot, a container's
        // root, a file deleted or replaced since).
        None => mapped_files(target.pid)?
            .into_iter()
            .map(|file| Object {
                open: map_file(target.pid, file.start, file.end),
                shown: shown_path(&file.path),
            })
            .collect(),
    };
    if let Some(obj) = obj {
        if !objects.iter().any(|object| object.shown == obj) {
            let object = if target.program().is_some() {
                local(obj.to_path_buf())
            } else {
                Object { open: through_root(target.pid, obj), shown: obj.to_path_buf() }
            };
            anyhow::ensure!(object.open.exists(), "--obj {} does not exist", obj.display());
            objects.push(object);
        }
    }
    let mut seen = std::collections::HashSet::new();
    objects.retain(|object| seen.insert(object.shown.clone()));
    Ok(objects)
}

/// Whether a mapped file is a C library.
fn is_libc(name: &str) -> bool {
    name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("ld-musl")
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The C library among `objects`.
fn find_libc(objects: &[PathBuf]) -> Option<PathBuf> {
    objects.iter().find(|path| is_libc(&file_name(path))).cloned()
}

/// Library directories the dynamic loader searches by default here.
const LIBRARY_DIRS: [&str; 5] =
    ["/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib"];

/// Where the dynamic loader would find `soname` for a program that has not
/// started yet (the default directories; not RUNPATH or LD_LIBRARY_PATH).
pub fn find_library(soname: &str) -> Option<PathBuf> {
    LIBRARY_DIRS.iter().map(|dir| Path::new(dir).join(soname)).find(|path| path.exists())
}

/// Where the dynamic loader would find libstdc++.
fn system_cxx_runtime() -> Option<PathBuf> {
    find_library("libstdc++.so.6")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that the C library is picked out of the mapped objects.
    #[test]
    fn libc_found() {
        let objects: Vec<PathBuf> =
            ["/usr/bin/app", "/usr/lib/libz.so.1", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
                .iter()
                .map(PathBuf::from)
                .collect();
        assert_eq!(find_libc(&objects), Some(objects[2].clone()));
        assert_eq!(find_libc(&objects[..2]), None);
    }

    /// Check that a library is found where the loader looks by default.
    #[test]
    fn library_lookup() {
        assert!(find_library("libc.so.6").is_some());
        assert!(find_library("libnothing-here.so.9").is_none());
    }
}
