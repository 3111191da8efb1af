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

use crate::proc::{self, process};
use anyhow::{anyhow, bail, Context as _};

/// The kernel sets this in a task's flags for kernel threads.
const PF_KTHREAD: u32 = 0x0020_0000;

pub struct Target {
    pub pid: u32,
    /// Set when leaktrace started the target with `-c`.
    child: Option<Child>,
    exit_status: Option<String>,
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
        if matches!(stat.state, 'Z' | 'X') {
            bail!("process {pid} ({}) has already exited", stat.comm);
        }
        let tgid = process.status().map(|status| status.tgid as u32).unwrap_or(pid);
        if tgid != pid {
            log::info!("PID {pid} is a thread of process {tgid}: tracing the process");
        }
        Ok(Self { pid: tgid, child: None, exit_status: None })
    }

    /// Fork `command` and hold the child before exec, so the probes are in
    /// place before its first allocation. [`Target::release`] lets it go.
    ///
    /// std's `Command::spawn` cannot do this: it waits for the exec.
    pub fn spawn(command: &str) -> anyhow::Result<Self> {
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
        // SAFETY: leaktrace is single-threaded here, and the child only
        // makes async-signal-safe calls (read, write, execvp, _exit) on
        // memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("failed to fork");
        }
        if pid == 0 {
            // SAFETY: see above; the descriptors are open in the child.
            unsafe {
                let mut byte = 0u8;
                libc::read(gate_read.as_raw_fd(), (&raw mut byte).cast(), 1);
                libc::execvp(argv_ptrs[0], argv_ptrs.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(error_write.as_raw_fd(), (&raw const errno).cast(), 4);
                libc::_exit(127);
            }
        }
        drop((gate_read, error_write));
        Ok(Self {
            pid: pid as u32,
            child: Some(Child {
                gate: Some(gate_write),
                exec_error: Some(error_read),
                program,
                name,
                reaped: false,
            }),
            exit_status: None,
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
                self.exit_status = Some(describe_wait_status(status));
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

    /// Stop a `-c` child that leaktrace started and is giving up on.
    pub fn kill_child(&mut self) {
        if let Some(child) = &mut self.child {
            if !child.reaped {
                // SAFETY: plain syscalls on our own child's PID.
                unsafe {
                    libc::kill(self.pid as i32, libc::SIGKILL);
                    libc::waitpid(self.pid as i32, std::ptr::null_mut(), 0);
                }
                child.reaped = true;
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // A child still at the gate would otherwise wait forever.
        if let Some(child) = &mut self.child {
            child.gate.take();
        }
    }
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

fn describe_wait_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("was killed by signal {}", libc::WTERMSIG(status))
    } else {
        "exited".to_string()
    }
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
