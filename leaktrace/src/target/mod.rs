//! The traced process: checking a PID, starting a command held at the door
//! until the probes are in, watching for its exit, and finding the objects
//! whose functions may be probed ([`objects`]).

mod objects;

pub use objects::{objects_to_probe, Object};

use std::{
    ffi::CString,
    fs::File,
    io::{Read as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _},
    path::{Path, PathBuf},
};

use leaktrace_report::Ended;

use crate::proc::{self, process};
use anyhow::{anyhow, bail, Context as _};

/// How long a `-c` program has to exit on SIGTERM before SIGKILL.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The kernel sets this in a task's flags for kernel threads.
const PF_KTHREAD: u32 = 0x0020_0000;

pub struct Target {
    pub pid: u32,
    /// Set when leaktrace started the target with `-c`.
    child: Option<Child>,
    exit_status: Option<String>,
    /// How a `-c` child ended, once reaped.
    ended: Option<Ended>,
}

/// A `-c` child: forked, and held before exec until the probes are in.
struct Child {
    /// Writing to (or closing) this lets the child go on to exec.
    gate: Option<File>,
    /// Carries errno from a failed exec; closed (on exec) when it worked.
    exec_error: Option<File>,
    program: PathBuf,
    name: String,
    reaped: bool,
    /// leaktrace's end of the watchdog's pipe: a byte written says it
    /// ended in order; closed without one (leaktrace killed), the watchdog
    /// acts (see [`watchdog`]).
    watchdog: Option<File>,
}

impl Target {
    /// A running process given with `-p`. A thread id is taken as its process.
    pub fn existing(pid: u32) -> anyhow::Result<Self> {
        let process = process(pid).map_err(|_| anyhow!("no process with PID {pid}"))?;
        let stat = process.stat().map_err(|_| anyhow!("no process with PID {pid}"))?;
        if stat.flags & PF_KTHREAD != 0 {
            bail!(
                "PID {pid} ({}) is a kernel thread: it has no user-space allocator to trace",
                stat.comm
            );
        }
        // Read through a live thread (`proc::process`): the main thread may
        // have called pthread_exit while the others run on, and allocate.
        if matches!(stat.state, 'Z' | 'X') {
            bail!("process {pid} ({}) has already exited", stat.comm);
        }
        if proc::reader(pid) != pid {
            log::info!(
                "process {pid} ({}): its main thread has exited; its other threads are traced",
                stat.comm
            );
        }
        let tgid = process.status().map(|status| status.tgid as u32).unwrap_or(pid);
        if tgid != pid {
            log::info!("PID {pid} is a thread of process {tgid}: tracing the process");
        }
        Ok(Self { pid: tgid, child: None, exit_status: None, ended: None })
    }

    /// Fork `command` and hold the child before exec, so the probes are in
    /// place before its first allocation. [`Target::release`] lets it go.
    ///
    /// std's `Command::spawn` cannot do this: it waits for the exec.
    /// With `stdout_to_stderr` (`--json`), the program writes its standard
    /// output to leaktrace's standard error: stdout is the reports' alone.
    ///
    /// However leaktrace ends, SIGKILL included, the program is not left
    /// stopped (at the gate, or held where its mappings changed): the
    /// kernel sends it SIGKILL when leaktrace dies (`PR_SET_PDEATHSIG`),
    /// and so does the watchdog, which with `keep_running` sends SIGCONT
    /// instead, letting a held program go on.
    /// leaktrace forks from its main thread, which lives as long as it
    /// does (the signal follows the thread that forked).
    pub fn spawn(
        command: &str,
        stdout_to_stderr: bool,
        keep_running: bool,
    ) -> anyhow::Result<Self> {
        let words = shlex::split(command)
            .filter(|words| !words.is_empty())
            .ok_or_else(|| anyhow!("cannot parse --command '{command}'"))?;
        let name = words[0].clone();
        let program = find_program(&name)
            .ok_or_else(|| anyhow!("failed to start '{name}': not found on PATH"))?;
        let argv: Vec<CString> = words
            .iter()
            .map(|word| CString::new(word.as_bytes()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("--command '{command}' contains a NUL byte"))?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let (gate_read, gate_write) = pipe()?;
        let (error_read, error_write) = pipe()?;
        let on_our_death = if keep_running { libc::SIGCONT } else { libc::SIGKILL };
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: leaktrace is single-threaded here, and the child only
        // makes async-signal-safe calls (close, signal, prctl, getppid,
        // read, dup2, write, execvp, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("failed to fork");
        }
        if pid == 0 {
            // SAFETY: see above; the descriptors are open in the child.
            unsafe {
                // leaktrace's ends of the pipes: the gate must read EOF
                // once leaktrace is gone.
                libc::close(gate_write.as_raw_fd());
                libc::close(error_read.as_raw_fd());
                // std ignores SIGPIPE, and an ignored signal survives exec.
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                // With --keep-running the watchdog alone continues it: a
                // SIGCONT at every normal exit would continue a program
                // its user stopped.
                if !keep_running {
                    libc::prctl(libc::PR_SET_PDEATHSIG, on_our_death as libc::c_ulong, 0, 0, 0);
                    // leaktrace died before the line above: no signal comes.
                    if libc::getppid() != parent {
                        libc::_exit(127);
                    }
                }
                let mut byte = 0u8;
                // EOF (leaktrace gone, with --keep-running) goes on too.
                libc::read(gate_read.as_raw_fd(), (&raw mut byte).cast(), 1);
                if stdout_to_stderr {
                    libc::dup2(2, 1);
                }
                libc::execvp(argv_ptrs[0], argv_ptrs.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(error_write.as_raw_fd(), (&raw const errno).cast(), 4);
                libc::_exit(127);
            }
        }
        drop((gate_read, error_write));
        let watchdog =
            watchdog(pid, keep_running, &[&gate_write, &error_read]).inspect_err(|_| {
                // SAFETY: our own child, never reaped yet.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            })?;
        Ok(Self {
            pid: pid as u32,
            child: Some(Child {
                gate: Some(gate_write),
                exec_error: Some(error_read),
                program,
                name,
                reaped: false,
                watchdog: Some(watchdog),
            }),
            exit_status: None,
            ended: None,
        })
    }

    /// Let a `-c` child exec its program, and report whether exec failed.
    pub fn release(&mut self) -> anyhow::Result<()> {
        let Some(child) = &mut self.child else {
            return Ok(());
        };
        if let Some(mut gate) = child.gate.take() {
            let _ = gate.write_all(b"g");
        }
        if let Some(mut errors) = child.exec_error.take() {
            let mut errno = [0u8; 4];
            if errors.read_exact(&mut errno).is_ok() {
                let err = std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
                bail!("failed to start '{}': {err}", child.name);
            }
        }
        Ok(())
    }

    /// The program a `-c` child runs once released.
    pub fn program(&self) -> Option<&Path> {
        self.child.as_ref().map(|child| child.program.as_path())
    }

    /// Whether the target has ended (a zombie counts as ended).
    pub fn has_exited(&mut self) -> bool {
        if self.exit_status.is_some() {
            return true;
        }
        if let Some(child) = &mut self.child {
            let mut status = 0;
            // SAFETY: `status` is a valid int for waitpid to fill.
            let ret = unsafe { libc::waitpid(self.pid as i32, &mut status, libc::WNOHANG) };
            if ret == self.pid as i32 {
                child.reaped = true;
                let ended = ended_of(status);
                self.exit_status = Some(describe(&ended));
                self.ended = Some(ended);
                return true;
            }
            return false;
        }
        let exited = proc::has_exited(self.pid);
        if exited {
            self.exit_status = Some("exited".to_string());
        }
        exited
    }

    /// How the target ended, once it has.
    pub fn exit_status(&self) -> Option<&str> {
        self.exit_status.as_deref()
    }

    /// How a `-c` child ended, once it has and was reaped.
    pub fn ended(&self) -> Option<&Ended> {
        self.ended.as_ref()
    }

    /// End a `-c` child still running as leaktrace stops: SIGTERM, and
    /// SIGKILL if it is still there after [`STOP_GRACE`]. How it ended is
    /// kept (see [`Target::ended`]).
    pub fn stop_child(&mut self) {
        if self.child.as_ref().is_none_or(|child| child.reaped) || self.has_exited() {
            return;
        }
        // SAFETY: a plain syscall on our own, unreaped child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while std::time::Instant::now() < deadline {
            if self.has_exited() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.kill_child();
    }

    /// Stop a `-c` child that leaktrace started and is giving up on.
    pub fn kill_child(&mut self) {
        if let Some(child) = &mut self.child {
            if !child.reaped {
                let mut status = 0;
                // SAFETY: plain syscalls on our own child's PID; `status` is
                // a valid int for waitpid to fill.
                let reaped = unsafe {
                    libc::kill(self.pid as i32, libc::SIGKILL);
                    libc::waitpid(self.pid as i32, &mut status, 0)
                };
                child.reaped = true;
                if reaped == self.pid as i32 {
                    let ended = ended_of(status);
                    self.exit_status = Some(describe(&ended));
                    self.ended = Some(ended);
                }
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // A child still at the gate would otherwise wait forever.
        if let Some(child) = &mut self.child {
            child.gate.take();
            // leaktrace ends in order: the watchdog leaves the program be.
            if let Some(mut watchdog) = child.watchdog.take() {
                let _ = watchdog.write_all(b"q");
            }
        }
    }
}

/// How long the watchdog keeps signalling a `-c` program once leaktrace
/// is gone: the kernel releases the probes a moment after leaktrace's
/// descriptors close, and a hold in that moment stops the program again.
const WATCHDOG_SPAN: libc::c_long = 2_000_000_000;
const WATCHDOG_STEP: libc::c_long = 10_000_000;

/// Start a process that watches leaktrace for the `-c` program `pid`.
/// `PR_SET_PDEATHSIG` alone is not enough: with `--keep-running` its
/// SIGCONT can come before a last hold (the probes outlive leaktrace for
/// a moment) and the program stays stopped. The watchdog waits on a pipe;
/// closed without a byte (leaktrace killed), it sends the program SIGKILL,
/// or SIGCONT every 10 ms for 2 s with `keep_running`, through a pidfd (no
/// PID reused since can be hit). `close` are leaktrace's descriptors it
/// must not hold (the child's gate). Returns leaktrace's end of the pipe.
fn watchdog(pid: libc::pid_t, keep_running: bool, close: &[&File]) -> anyhow::Result<File> {
    // SAFETY: a plain syscall; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error()).context("failed to open a pidfd");
    }
    let (watch_read, watch_write) = match pipe() {
        Ok(ends) => ends,
        Err(err) => {
            // SAFETY: our own descriptor.
            unsafe { libc::close(pidfd) };
            return Err(err);
        }
    };
    let closing: Vec<libc::c_int> = close.iter().map(|file| file.as_raw_fd()).collect();
    let signal = if keep_running { libc::SIGCONT } else { libc::SIGKILL };
    // SAFETY: the watchdog only makes async-signal-safe calls (close,
    // read, syscall, nanosleep, _exit) on memory prepared before the fork.
    let watcher = unsafe { libc::fork() };
    if watcher < 0 {
        // SAFETY: our own descriptor.
        unsafe { libc::close(pidfd) };
        return Err(std::io::Error::last_os_error()).context("failed to fork the watchdog");
    }
    if watcher == 0 {
        // SAFETY: see above.
        unsafe {
            for fd in closing.iter().copied().chain([0, 1, 2, watch_write.as_raw_fd()]) {
                libc::close(fd);
            }
            // Out of the terminal's process group and deaf to its signals:
            // a Ctrl-C meant for leaktrace must not end its watchdog.
            libc::setpgid(0, 0);
            for terminal in
                [libc::SIGINT, libc::SIGHUP, libc::SIGTERM, libc::SIGTSTP, libc::SIGQUIT]
            {
                libc::signal(terminal, libc::SIG_IGN);
            }
            let mut byte = 0u8;
            let read = loop {
                let read = libc::read(watch_read.as_raw_fd(), (&raw mut byte).cast(), 1);
                if read >= 0 || *libc::__errno_location() != libc::EINTR {
                    break read;
                }
            };
            if read == 1 {
                libc::_exit(0);
            }
            let step = libc::timespec { tv_sec: 0, tv_nsec: WATCHDOG_STEP };
            for _ in 0..WATCHDOG_SPAN / WATCHDOG_STEP {
                let sent = libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd,
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
                if sent != 0 || signal == libc::SIGKILL {
                    break;
                }
                libc::nanosleep(&step, std::ptr::null_mut());
            }
            libc::_exit(0);
        }
    }
    // SAFETY: our own descriptor; the watchdog has its copy.
    unsafe { libc::close(pidfd) };
    drop(watch_read);
    Ok(watch_write)
}

fn pipe() -> anyhow::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("failed to create a pipe");
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn ended_of(status: i32) -> Ended {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        Ended::Killed { signal, name: signal_name(signal), core_dumped: libc::WCOREDUMP(status) }
    } else {
        Ended::Exited { code: libc::WEXITSTATUS(status) }
    }
}

/// "exited with status 3", "was killed by signal 11 (SIGSEGV)".
pub fn describe(ended: &Ended) -> String {
    match ended {
        Ended::Exited { code } => format!("exited with status {code}"),
        Ended::Killed { signal, name, core_dumped } => format!(
            "was killed by signal {signal} ({name}){}",
            if *core_dumped { ", core dumped" } else { "" }
        ),
    }
}

/// A signal's name, as `kill -l` gives it.
fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

/// Where `program` is found, the way execvp searches PATH.
fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that PID 2 is refused as a kernel thread.
    #[test]
    fn kernel_thread_refused() {
        let err = Target::existing(2).err().expect("kthreadd accepted");
        assert!(err.to_string().contains("kernel thread"), "{err}");
    }

    /// Check that a PID that does not exist is refused.
    #[test]
    fn missing_pid_refused() {
        let err = Target::existing(u32::MAX - 1).err().expect("bogus PID accepted");
        assert!(err.to_string().contains("no process"), "{err}");
    }
}
