//! The files and the backend each report also goes to: collapsed stacks
//! (`--folded`), a flame graph (`--svg`), a pprof profile (`--pprof`), a
//! push to Pyroscope (`--push`). Each file is replaced at every report (a
//! new file renamed over the old, so a reader never sees half of one).
//!
//! leaktrace runs as root, often in a directory someone else can write
//! (`sudo leaktrace --svg ./leak.svg` in a user's project). So it never
//! opens a path that could have been planted there: the directory is
//! opened once, at start, and every write goes through that descriptor
//! (`/proc/self/fd/N/...`, so a directory swapped for a link later is not
//! followed); each report is written to a new file of a random name,
//! created with `O_CREAT|O_EXCL` (the `tempfile` crate: it neither follows
//! a link nor opens a FIFO), then renamed over PATH, which replaces
//! whatever entry is there without opening it. A PATH that is a link, a
//! FIFO, a device or a directory at start is refused, and so is a path
//! through a link root does not own (`open_directory`).

use std::{
    fs,
    io::{self, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use leaktrace_report::Report;

use super::{
    flamegraph::write_svg,
    folded::folded,
    pprof::{gzipped, profile, BuildIds},
    push::Pusher,
};

#[derive(Default)]
pub struct Outputs {
    pub folded: Option<OutputFile>,
    pub svg: Option<OutputFile>,
    pub pprof: Option<OutputFile>,
    pub push: Option<Pusher>,
    build_ids: BuildIds,
}

/// A file leaktrace replaces at each report: its directory, held open,
/// and its name there.
pub struct OutputFile {
    /// The path as given, for messages.
    shown: PathBuf,
    /// The directory, open since the start.
    dir: fs::File,
    name: std::ffi::OsString,
}

impl OutputFile {
    /// Check that `path` (given with `flag`) is absent or a regular file,
    /// and that its directory takes a new file; hold the directory open.
    pub fn new(path: &Path, flag: &str) -> anyhow::Result<Self> {
        let shown = path.display();
        let Some(name) = path.file_name() else {
            bail!("{flag} {shown}: give a file name, not a directory");
        };
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let dir = open_directory(parent)
            .with_context(|| format!("{flag} {shown}: cannot open its directory"))?;
        let inside = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        match fs::symlink_metadata(&inside) {
            Ok(metadata) => {
                let kind = metadata.file_type();
                let what = if kind.is_symlink() {
                    "a symbolic link (leaktrace runs as root and does not write through links)"
                } else if kind.is_dir() {
                    "a directory"
                } else if kind.is_fifo() {
                    "a FIFO"
                } else if kind.is_socket() {
                    "a socket"
                } else if kind.is_block_device() || kind.is_char_device() {
                    "a device"
                } else {
                    ""
                };
                if !what.is_empty() {
                    bail!("{flag} {shown}: is {what}: give the path of a regular file or of none");
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => bail!("{flag} {shown}: cannot check it: {err}"),
        }
        let file = Self { shown: path.to_path_buf(), dir, name: name.to_owned() };
        // A file is created there and removed: the directory takes writes.
        file.temporary().with_context(|| format!("{flag} {shown}: cannot write there"))?;
        Ok(file)
    }

    /// The held directory, as a path this process can open.
    fn dir_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
    }

    /// A new file of a random name beside PATH, removed when dropped.
    fn temporary(&self) -> io::Result<tempfile::NamedTempFile> {
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(&self.name);
        prefix.push(".");
        tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            // As File::create would, less the umask: the user who ran sudo
            // can read what was written for them.
            .permissions(fs::Permissions::from_mode(0o644))
            .tempfile_in(self.dir_path())
    }

    /// Write a new file and rename it over PATH. When anything fails, the
    /// new file is removed.
    fn replace(
        &self,
        write: impl FnOnce(&mut io::BufWriter<&fs::File>) -> io::Result<()>,
    ) -> io::Result<()> {
        let temporary = self.temporary()?;
        let mut out = io::BufWriter::new(temporary.as_file());
        write(&mut out)?;
        out.flush()?;
        drop(out);
        temporary.persist(self.dir_path().join(&self.name)).map_err(|err| err.error)?;
        Ok(())
    }

    /// Replace the file, saying on stderr when that failed.
    fn write(&self, write: impl FnOnce(&mut io::BufWriter<&fs::File>) -> io::Result<()>) {
        if let Err(err) = self.replace(write) {
            eprintln!("leaktrace: cannot write {}: {err}", self.shown.display());
        }
    }
}

/// Open the directory `path` one component at a time, following a
/// symbolic link only when root owns it (`/var/run`, distributions'
/// links): a user who owns a directory on the way (their project) cannot
/// send root's files elsewhere through a link, now or by swapping one in
/// between a check and the open.
fn open_directory(path: &Path) -> io::Result<fs::File> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};
    let start = if path.is_absolute() { "/" } else { "." };
    let start = CString::new(start).expect("no NUL");
    // SAFETY: a valid C string; the descriptor is checked and then owned.
    let mut fd =
        unsafe { libc::open(start.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open and ours.
    let mut dir = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    for component in path.components() {
        let name = match component {
            std::path::Component::RootDir | std::path::Component::CurDir => continue,
            other => other.as_os_str(),
        };
        let name =
            CString::new(name.as_bytes()).map_err(|_| io::Error::other("a NUL in the path"))?;
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        // SAFETY: an open directory and a valid C string.
        fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_NOFOLLOW) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            // A link (ELOOP with O_PATH|O_NOFOLLOW|O_DIRECTORY: ENOTDIR):
            // followed only if root owns it.
            // SAFETY: `stat` is plain data, all zeros a valid value.
            let mut stat: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above; `stat` is a valid buffer.
            let is_link = unsafe {
                libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW)
            } == 0
                && stat.st_mode & libc::S_IFMT == libc::S_IFLNK;
            if !is_link {
                return Err(err);
            }
            if stat.st_uid != 0 {
                return Err(io::Error::other(format!(
                    "{} is a symbolic link owned by uid {}: leaktrace runs as root and follows none but root's",
                    name.to_string_lossy(),
                    stat.st_uid
                )));
            }
            // SAFETY: as above.
            fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `fd` is open and ours.
        dir = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    }
    // A descriptor that reads, for what is made through /proc/self/fd/N.
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

impl Outputs {
    /// Check that each file can be written, before tracing starts.
    pub fn new(
        folded: Option<PathBuf>,
        svg: Option<PathBuf>,
        pprof: Option<PathBuf>,
        push: Option<Pusher>,
    ) -> anyhow::Result<Self> {
        let open = |path: Option<PathBuf>, flag: &str| {
            path.map(|path| OutputFile::new(&path, flag)).transpose()
        };
        Ok(Self {
            folded: open(folded, "--folded")?,
            svg: open(svg, "--svg")?,
            pprof: open(pprof, "--pprof")?,
            push,
            build_ids: BuildIds::default(),
        })
    }

    /// Write this report everywhere asked; failures are said on stderr and
    /// tracing goes on. The push counts go into the report.
    pub fn write(&mut self, report: &mut Report) {
        if let Some(file) = &self.folded {
            file.write(|out| out.write_all(folded(report).as_bytes()));
        }
        if let Some(file) = &self.svg {
            file.write(|out| write_svg(report, out));
        }
        if self.pprof.is_none() && self.push.is_none() {
            return;
        }
        let bytes = match gzipped(&profile(report, &mut self.build_ids)) {
            Ok(bytes) => bytes,
            Err(err) => {
                eprintln!("leaktrace: cannot encode the pprof profile: {err}");
                return;
            }
        };
        if let Some(file) = &self.pprof {
            file.write(|out| out.write_all(&bytes));
        }
        if let Some(pusher) = &mut self.push {
            pusher.push(&bytes);
            report.push = Some(pusher.counts);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().expect("a scratch directory")
    }

    /// Check that a link, a FIFO and a directory at PATH are refused with
    /// one line, and nothing is created where the link points.
    #[test]
    fn refuses_what_is_not_a_file() {
        let dir = scratch();
        let elsewhere = dir.path().join("elsewhere");
        symlink(&elsewhere, dir.path().join("link.svg")).unwrap();
        let err = OutputFile::new(&dir.path().join("link.svg"), "--svg").err().unwrap();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        assert!(!elsewhere.exists());
        let fifo = dir.path().join("fifo.svg");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        let err = OutputFile::new(&fifo, "--svg").err().unwrap();
        assert!(format!("{err:#}").contains("a FIFO"), "{err:#}");
        let err = OutputFile::new(dir.path(), "--svg").err().unwrap();
        assert!(format!("{err:#}").contains("directory"), "{err:#}");
    }

    /// Check that a write replaces PATH (a link planted there since the
    /// start is replaced, not followed), leaves no temporary file, and
    /// that a failed write leaves none either.
    #[test]
    fn replaces_and_cleans_up() {
        let dir = scratch();
        let path = dir.path().join("out.folded");
        let file = OutputFile::new(&path, "--folded").unwrap();
        let target = dir.path().join("precious");
        fs::write(&target, "keep").unwrap();
        symlink(&target, &path).unwrap();
        file.replace(|out| out.write_all(b"a;b 1\n")).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(fs::read_to_string(&path).unwrap(), "a;b 1\n");
        assert!(!fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        let failed = file.replace(|_| Err(io::Error::other("disk full")));
        assert!(failed.is_err());
        let names: Vec<_> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "a temporary file was left: {names:?}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "a;b 1\n");
    }
}
