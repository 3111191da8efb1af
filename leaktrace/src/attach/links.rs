//! Every link leaktrace makes (uprobes, tracepoints), owned here rather
//! than by the programs: detached in one place, before the programs and
//! maps go, and timed.
//!
//! Uprobes go through `uprobe_multi` links where the kernel makes them
//! ([`super::multi`]): one link a program and file, closed all at once so
//! that the kernel's grace periods overlap. Older kernels get aya's
//! perf-event uprobes, one a function, each waiting out its own grace
//! period as it goes (~80 ms here, serialized by the kernel even when
//! dropped from many threads).
//!
//! With `-s N` and multi links, the probes of functions that only allocate
//! ([`super::probes::allocates_only`]) are attached for one sampling window
//! in N and detached between windows ([`Links::open_window`],
//! [`Links::close_window`]): the target takes no trap on them outside a
//! window. The probes that free stay on, so that a block tracked in a
//! window is forgotten when it is freed, whenever that is.

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    thread::JoinHandle,
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, MapData},
    programs::{
        trace_point::TracePointLink,
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeScope},
    },
    Ebpf,
};

use leaktrace_common::{window_is_open, MAP_WINDOW};

use super::{multi, probes::allocates_only, uprobes::program};

/// One program at one place of a file, at entry or at return.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Probe {
    pub program: &'static str,
    pub offset: u64,
    pub at_return: bool,
}

/// One multi link's worth of probes: a program at offsets of one file.
struct Group {
    program: &'static str,
    /// The file, held open: the path leaktrace found it under
    /// (`/proc/PID/map_files/...`) goes with the mapping, at an exec or an
    /// unmap, but the file is probed through `/proc/self/fd/N` for as long
    /// as leaktrace runs.
    file: Arc<File>,
    /// Where it was found, for messages.
    shown: PathBuf,
    offsets: Vec<u64>,
    at_return: bool,
    pid: u32,
}

impl Group {
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

#[derive(Default)]
pub struct Links {
    /// The uprobe programs, when the kernel makes multi links.
    multi: Option<multi::MultiPrograms>,
    multi_links: Vec<OwnedFd>,
    uprobes: Vec<UProbeLink>,
    tracepoints: Vec<TracePointLink>,
    /// `-s N` by windows (multi links only).
    windows: bool,
    /// The groups attached for sampling windows only, ...
    windowed: Vec<Group>,
    /// ... their links while a window is open, ...
    window_links: Vec<OwnedFd>,
    /// The window's number, as the programs see it in `WINDOW`: odd while
    /// a window is open, even between windows.
    window: u32,
    /// ... and the threads closing the links of windows past.
    closing: Vec<JoinHandle<()>>,
}

impl Links {
    /// Links whose uprobes run `programs` through multi links; with
    /// `windows`, the allocating ones for sampling windows only (the first
    /// window open from the start, and so numbered in `ebpf`).
    pub fn with_multi(
        programs: multi::MultiPrograms,
        windows: bool,
        ebpf: &mut Ebpf,
    ) -> anyhow::Result<Self> {
        let mut links = Self::default();
        links.multi = Some(programs);
        (links.windows, links.window) = (windows, 1);
        if windows {
            set_window(ebpf, links.window)?;
        }
        Ok(links)
    }

    /// Whether allocation probes come and go with sampling windows.
    pub fn windows(&self) -> bool {
        self.windows
    }

    /// Whether a sampling window is open: its number is odd.
    pub fn window_open(&self) -> bool {
        window_is_open(self.window)
    }

    /// Attach `probes` in the file `path` for process `pid` only: the
    /// return probes first, so that a call entered between the two
    /// attaches leaves no entry record that no return takes.
    pub fn attach_uprobes(
        &mut self,
        ebpf: &mut Ebpf,
        path: &Path,
        pid: u32,
        probes: &[Probe],
    ) -> anyhow::Result<()> {
        let mut groups: BTreeMap<(bool, &'static str), Vec<u64>> = BTreeMap::new();
        for probe in probes {
            groups.entry((!probe.at_return, probe.program)).or_default().push(probe.offset);
        }
        // The file, opened for the windowed groups.
        let mut held: Option<Arc<File>> = None;
        let window_open = self.window_open();
        for ((at_entry, name), offsets) in groups {
            let at_return = !at_entry;
            let failed = || format!("failed to attach {name} in {}", path.display());
            match &mut self.multi {
                Some(programs) => {
                    let fd = programs.fd(name)?;
                    let windowed = self.windows && allocates_only(name);
                    if !windowed {
                        let link = multi::attach(fd, path, &offsets, at_return, pid)
                            .with_context(failed)?;
                        self.multi_links.push(link);
                        continue;
                    }
                    let file = match &held {
                        Some(file) => Arc::clone(file),
                        None => {
                            let opened =
                                Arc::new(File::open(path).with_context(|| {
                                    format!("failed to open {}", path.display())
                                })?);
                            held = Some(Arc::clone(&opened));
                            opened
                        }
                    };
                    let shown = path.to_path_buf();
                    let group = Group { program: name, file, shown, offsets, at_return, pid };
                    // Else attached when the next window opens.
                    if window_open {
                        let link = multi::attach(fd, &group.path(), &group.offsets, at_return, pid)
                            .with_context(failed)?;
                        self.window_links.push(link);
                    }
                    self.windowed.push(group);
                }
                None => {
                    // A live thread of the process: a perf event's uprobes
                    // go in the mm of the task it names, which a main
                    // thread that has exited no longer has.
                    let scope = UProbeScope::OneProcess(
                        std::num::NonZeroU32::new(crate::proc::reader(pid))
                            .ok_or_else(|| anyhow!("PID 0 cannot be traced"))?,
                    );
                    let uprobe = program(ebpf, name)?;
                    // Programs no probe needed at start (an exec's new objects).
                    if uprobe.fd().is_err() {
                        uprobe.load().with_context(|| format!("failed to load program {name}"))?;
                    }
                    for offset in offsets {
                        let location = UProbeAttachLocation::AbsoluteOffset(offset);
                        let id = uprobe.attach(location, path, scope).with_context(failed)?;
                        self.uprobes.push(uprobe.take_link(id)?);
                    }
                }
            }
        }
        Ok(())
    }

    pub fn add_tracepoint(&mut self, link: TracePointLink) {
        self.tracepoints.push(link);
    }

    /// The uprobe programs' runs and total time, for those loaded here.
    pub fn program_stats(&self) -> Vec<(&str, u64, u64)> {
        self.multi.as_ref().map(|programs| programs.stats()).unwrap_or_default()
    }

    /// Open a sampling window: raise the window's number to the next odd one
    /// (records of calls from earlier windows become stale), then attach
    /// the windowed groups again, return probes first. A group that fails is left out of this
    /// window, with a warning.
    pub fn open_window(&mut self, ebpf: &mut Ebpf) {
        if self.window_open() {
            return;
        }
        let Some(programs) = &mut self.multi else {
            return;
        };
        self.window = self.window.wrapping_add(1);
        if let Err(err) = set_window(ebpf, self.window) {
            log::warn!("sampling window: {err:#}");
        }
        self.windowed.sort_by_key(|group| !group.at_return);
        for group in &self.windowed {
            let attached = programs.fd(group.program).and_then(|fd| {
                let Group { offsets, at_return, pid, .. } = group;
                Ok(multi::attach(fd, &group.path(), offsets, *at_return, *pid)?)
            });
            match attached {
                Ok(link) => self.window_links.push(link),
                Err(err) => log::warn!(
                    "sampling window: {} in {} not attached: {err:#}",
                    group.program,
                    group.shown.display()
                ),
            }
        }
    }

    /// Close the sampling window: its links go on a thread of their own,
    /// where the kernel's grace periods are waited out, all at once (an
    /// entry left without its return probe for a moment leaves a record
    /// the next window's number marks stale).
    pub fn close_window(&mut self, ebpf: &mut Ebpf) {
        if !self.window_open() {
            return;
        }
        // Even: realloc's return keeps new blocks of untracked ones no more.
        self.window = self.window.wrapping_add(1);
        if let Err(err) = set_window(ebpf, self.window) {
            log::warn!("sampling window: {err:#}");
        }
        self.closing.retain(|thread| !thread.is_finished());
        let links = std::mem::take(&mut self.window_links);
        let closer = std::thread::Builder::new()
            .name("leaktrace-window".into())
            .spawn(move || close_together(links));
        match closer {
            Ok(thread) => self.closing.push(thread),
            Err(err) => log::warn!("sampling window: no thread to detach on: {err}"),
        }
    }

    /// Detach every link; returns once all are gone. The multi links are
    /// closed from a thread each, so that their grace periods overlap.
    pub fn detach_all(&mut self) {
        let mut links = std::mem::take(&mut self.window_links);
        links.append(&mut self.multi_links);
        close_together(links);
        self.uprobes.clear();
        self.tracepoints.clear();
        for thread in self.closing.drain(..) {
            let _ = thread.join();
        }
    }

    pub fn len(&self) -> usize {
        self.multi_links.len()
            + self.window_links.len()
            + self.uprobes.len()
            + self.tracepoints.len()
    }
}

/// Tell the programs the sampling window's number.
fn set_window(ebpf: &mut Ebpf, window: u32) -> anyhow::Result<()> {
    let map = ebpf.map_mut(MAP_WINDOW).ok_or_else(|| anyhow!("map {MAP_WINDOW} missing"))?;
    let mut numbers: Array<&mut MapData, u32> = Array::try_from(map)?;
    numbers.set(0, window, 0).context("failed to set the sampling window's number")?;
    Ok(())
}

/// Close `links` from a thread each, so that the kernel's grace periods
/// overlap (38 closed in turn took 1.9 s here, closed at once 77 ms).
fn close_together(links: Vec<OwnedFd>) {
    std::thread::scope(|scope| {
        for link in links {
            let builder = std::thread::Builder::new().name("leaktrace-detach".into());
            // Without a thread, the link goes here, its wait not shared.
            let _ = builder.spawn_scoped(scope, move || drop(link));
        }
    });
}

impl Drop for Links {
    fn drop(&mut self) {
        self.detach_all();
    }
}
