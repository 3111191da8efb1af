//! leaktrace as a root tool in a hostile place: output files an
//! unprivileged user planted links and FIFOs for, a `-c` program when
//! leaktrace is killed at a hold, thousands of mapped files under a low
//! file limit, a process whose main thread has exited, corrupt debug info,
//! a stderr nobody reads, and `diff` input that is endless or impossible.

use std::{
    fs,
    io::Read as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use leaktrace_tests::*;

/// The unprivileged user who plants things.
const NOBODY: u32 = 65534;

/// Run `args` as user nobody, as an unprivileged user on the machine would.
fn as_nobody(args: &[&str]) {
    let id = NOBODY.to_string();
    let status = Command::new("setpriv")
        .args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
        .args(args)
        .status()
        .expect("setpriv runs");
    assert!(status.success(), "{args:?} as nobody failed: {status}");
}

/// A directory user nobody owns (where someone runs `sudo leaktrace --svg
/// ./leak.svg`), and one only root can enter, holding root's files.
struct Planted {
    user: ScratchDir,
    root: ScratchDir,
}

impl Planted {
    fn new(tag: &str) -> Self {
        let user = ScratchDir::new(&format!("{tag}-user"));
        let root = ScratchDir::new(&format!("{tag}-root"));
        std::os::unix::fs::chown(&user.0, Some(NOBODY), Some(NOBODY)).unwrap();
        fs::set_permissions(&user.0, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&root.0, fs::Permissions::from_mode(0o700)).unwrap();
        Self { user, root }
    }

    fn user(&self, name: &str) -> String {
        self.user.0.join(name).to_str().unwrap().to_string()
    }

    fn root(&self, name: &str) -> String {
        self.root.0.join(name).to_str().unwrap().to_string()
    }
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Check that links planted at the old temporary names (`PATH.tmp`) to
/// root's 0600 files are not written through: root's files keep their
/// bytes, the outputs are regular files with the report, and no
/// temporary file is left.
#[test]
fn outputs_not_written_through_planted_links() {
    let dir = Planted::new("planted-tmp");
    let outputs = ["leak.svg", "leak.folded", "leak.pb.gz"];
    for name in outputs {
        let secret = dir.root(&format!("secret-{name}"));
        fs::write(&secret, "root only\n").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        as_nobody(&["ln", "-s", &secret, &dir.user(&format!("{name}.tmp"))]);
    }
    let (svg, folded, pprof) =
        (dir.user("leak.svg"), dir.user("leak.folded"), dir.user("leak.pb.gz"));
    let reports = trace_over_time_with(
        "steady_leak",
        2,
        &["--svg", &svg, "--folded", &folded, "--pprof", &pprof],
    );
    let report = final_report(&reports);
    for name in outputs {
        let secret = fs::read_to_string(dir.root(&format!("secret-{name}"))).unwrap();
        assert_eq!(secret, "root only\n", "root's file behind {name}.tmp was written");
        let metadata = fs::symlink_metadata(dir.user(name)).unwrap();
        assert!(metadata.is_file(), "{name} is not a regular file");
        assert_eq!(metadata.mode() & 0o777, 0o644, "{name}: mode {:o}", metadata.mode());
    }
    let folded_text = fs::read_to_string(&folded).unwrap();
    assert!(folded_text.contains("steady_leak_step"), "{folded_text}\n{}", json(report));
    assert!(fs::read_to_string(&svg).unwrap().contains("<svg"));
    assert_eq!(&fs::read(&pprof).unwrap()[..2], &[0x1f, 0x8b], "pprof is not gzip");
    let mut expected: Vec<String> =
        outputs.iter().flat_map(|name| [name.to_string(), format!("{name}.tmp")]).collect();
    expected.sort();
    assert_eq!(names_in(&dir.user.0), expected, "a temporary file was left behind");
}

/// Check that a link at PATH itself, to a file that does not exist in a
/// directory nobody can write, is refused with one line before tracing,
/// and creates nothing there.
#[test]
fn link_at_output_path_refused() {
    let dir = Planted::new("planted-path");
    let created = dir.root("created.svg");
    as_nobody(&["ln", "-s", &created, &dir.user("leak.svg")]);
    let fixture = Fixture::start("steady_leak", &[]);
    let pid = fixture.pid().to_string();
    let finished = run_tracer(&["-p", &pid, "--svg", &dir.user("leak.svg"), "1", "1"]);
    assert_clean_error(&finished, "symbolic link");
    assert!(!Path::new(&created).exists(), "root created the file the link names");
}

/// Check that a directory on the way that nobody made a link (their
/// `out`, pointing at a directory of root's) is not followed: refused
/// with one line, nothing written where it points.
#[test]
fn link_in_output_directory_refused() {
    let dir = Planted::new("planted-dir");
    as_nobody(&["ln", "-s", &dir.root(""), &dir.user("out")]);
    let fixture = Fixture::start("steady_leak", &[]);
    let pid = fixture.pid().to_string();
    let svg = format!("{}/leak.svg", dir.user("out"));
    let finished = run_tracer(&["-p", &pid, "--svg", &svg, "1", "1"]);
    assert_clean_error(&finished, "symbolic link owned by uid 65534");
    assert_eq!(names_in(&dir.root.0), Vec::<String>::new(), "root's directory written");
}

/// Check that a FIFO at PATH is refused with one line (it would block the
/// tracer for good), and that one at the old temporary name is ignored:
/// the run ends and writes its file.
#[test]
fn fifos_do_not_hang_outputs() {
    let dir = Planted::new("planted-fifo");
    as_nobody(&["mkfifo", &dir.user("leak.folded")]);
    let fixture = Fixture::start("steady_leak", &[]);
    let pid = fixture.pid().to_string();
    let finished = run_tracer(&["-p", &pid, "--folded", &dir.user("leak.folded"), "1", "1"]);
    assert_clean_error(&finished, "a fifo");
    drop(fixture);

    as_nobody(&["mkfifo", &dir.user("out.folded.tmp")]);
    let out = dir.user("out.folded");
    trace_over_time_with("steady_leak", 2, &["--folded", &out]);
    let text = fs::read_to_string(&out).unwrap();
    assert!(text.contains("steady_leak_step"), "{text}");
}

/// A task's state letter, None once it is gone.
fn state_of(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Start `-c dlopen_loop` (held at each dlopen until its tables are
/// published), wait until the program is stopped at a hold, and SIGKILL
/// leaktrace there. Returns the program's PID.
fn kill_tracer_at_hold(keep_running: bool) -> u32 {
    let command = format!(
        "{} {}",
        fixture_path("dlopen_loop").display(),
        fixture_path("libdlopen_plugin.so").display()
    );
    let mut args = vec!["-c", &command, "--json"];
    if keep_running {
        args.push("--keep-running");
    }
    args.push("1");
    let mut tracer = Tracer::start(&args);
    tracer.wait_attached();
    let tracer_pid = tracer.pid();
    let children = fs::read_to_string(format!("/proc/{tracer_pid}/task/{tracer_pid}/children"))
        .expect("leaktrace's children");
    let program: u32 = children.split_whitespace().next().expect("a -c program").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_of(program) != Some('T') {
        assert!(Instant::now() < deadline, "the program was never held; {}", tracer.stderr_text());
    }
    tracer.signal(libc::SIGKILL);
    let finished = tracer.finish();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&finished.status),
        Some(libc::SIGKILL)
    );
    program
}

/// Wait until `pid` is in no state of `states`, for up to 10 s; its state
/// then.
fn wait_state_leaves(pid: u32, states: &[char]) -> Option<char> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = state_of(pid);
        if state.is_none_or(|state| !states.contains(&state)) || Instant::now() > deadline {
            return state;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Check that a `-c` program held (stopped) at a dlopen when leaktrace is
/// SIGKILLed dies with leaktrace: it is not left stopped, orphaned.
#[test]
fn killed_tracer_leaves_no_program_stopped() {
    let program = kill_tracer_at_hold(false);
    let state = wait_state_leaves(program, &['T', 't', 'S', 'R', 'D']);
    assert!(matches!(state, None | Some('Z' | 'X')), "program {program} left in state {state:?}");
}

/// Check that with --keep-running a program held when leaktrace is
/// SIGKILLed is continued: it runs on, untraced.
#[test]
fn killed_tracer_continues_kept_program() {
    let program = kill_tracer_at_hold(true);
    let state = wait_state_leaves(program, &['T', 't']);
    // SAFETY: a plain signal to the orphaned program, alive until now.
    unsafe { libc::kill(program as i32, libc::SIGKILL) };
    assert!(matches!(state, Some('S' | 'R')), "kept program {program} in state {state:?}");
}

/// Trace the started `fixture` through `prefix` with `-p PID --json 1
/// COUNT`, let it go once attached, and return how leaktrace ended.
fn trace_through(prefix: &[&str], fixture: &mut Fixture, count: u32) -> Finished {
    let pid = fixture.pid().to_string();
    let count = count.to_string();
    let mut tracer =
        Tracer::start_through(prefix, &["-p", &pid, "--json", "--top", "1000", "1", &count]);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    tracer.finish()
}

/// Check that a process mapping 3,000 files is traced by a leaktrace
/// started with the usual soft limit of 1024 open files (and a hard limit
/// of 4096, under which it cannot keep one open for each): the leak is
/// reported, not a false "exited while attaching".
#[test]
fn thousands_of_mapped_files_under_fd_limit() {
    let copies = ScratchDir::new("many-maps");
    let library = fixture_path("libleaky.so");
    for index in 0..3000 {
        fs::copy(&library, copies.0.join(format!("lib{index}.so"))).unwrap();
    }
    let mut fixture = Fixture::start("many_maps", &[copies.0.to_str().unwrap()]);
    let finished = trace_through(&["prlimit", "--nofile=1024:4096", "--"], &mut fixture, 2);
    let reports = finished.reports();
    let report = final_report(&reports);
    let stack = stack_by_first_frame(report, "leak_after_maps").unwrap_or_else(|| {
        panic!("no leak_after_maps stack: {}\n{}", json(report), finished.stderr)
    });
    assert_eq!((stack.bytes, stack.allocations), (64 * 4096, 64), "{}", json(report));
}

/// Check that a process whose main thread called pthread_exit (a zombie)
/// while another thread leaks is traced, not refused as exited, and its
/// leak found with exact blocks.
#[test]
fn main_thread_exited_process_traced() {
    let mut fixture = Fixture::start("leader_exits", &[]);
    let pid = fixture.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(pid) != Some('Z') {
        assert!(Instant::now() < deadline, "the main thread of {pid} did not exit");
        thread::sleep(Duration::from_millis(10));
    }
    let finished = trace_through(&[], &mut fixture, 2);
    let reports = finished.reports();
    let report = final_report(&reports);
    let stack = stack_by_first_frame(report, "worker_leak")
        .unwrap_or_else(|| panic!("no worker_leak stack: {}\n{}", json(report), finished.stderr));
    assert!(stack.allocations >= 50, "{}", json(report));
    assert_eq!(stack.bytes, stack.allocations * 1024, "{}", json(report));
}

/// Check that a program whose .debug_info is noise, with its symbol table
/// intact, is still named from its symbols, and that leaktrace says the
/// debug info was unreadable.
#[test]
fn corrupt_debug_info_falls_back_to_symbols() {
    let mut fixture = Fixture::start("corrupt_dwarf", &[]);
    let finished = run_over_time(&mut fixture, 3, &["--top", "1000"]);
    let reports = finished.reports();
    let report = final_report(&reports);
    let stack = stack_by_first_frame(report, "steady_leak_step").unwrap_or_else(|| {
        panic!("steady_leak_step not named: {}\n{}", json(report), finished.stderr)
    });
    assert_eq!(stack.bytes % 1024, 0, "{}", json(report));
    assert!(
        finished.stderr.contains("debug info of") && finished.stderr.contains("corrupt_dwarf"),
        "no word of the unreadable debug info:\n{}",
        finished.stderr
    );
}

/// Check that `-t` with stderr a pipe nobody reads does not keep leaktrace
/// from its final report: once the pipe is full, SIGINT still ends it.
#[test]
fn trace_to_unread_pipe_still_stops() {
    require_root();
    let mut fixture = Fixture::start("trace_flood", &[]);
    let pid = fixture.pid().to_string();
    let mut child = Command::new(tracer_bin())
        .args(["-p", &pid, "-t", "--json", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    // Held, never read.
    let stderr = child.stderr.take().unwrap();
    fixture.go();
    fixture.wait_ready();
    let full = Instant::now() + Duration::from_secs(30);
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD fills an int with the bytes in the pipe.
        unsafe {
            libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&stderr), libc::FIONREAD, &mut queued)
        };
        if queued >= 60 << 10 {
            break;
        }
        assert!(Instant::now() < full, "the stderr pipe never filled ({queued} bytes)");
        thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a plain signal to our own, unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("leaktrace -t did not stop on SIGINT with its stderr full");
        }
        thread::sleep(Duration::from_millis(20));
    };
    drop(stderr);
    assert!(status.success(), "{status}");
    let reports = reports(&reader.join().unwrap());
    let report = final_report(&reports);
    assert!(stack_by_first_frame(report, "flood_step").is_some(), "{}", json(report));
}

/// A report as JSON, with `edit` applied to it.
fn report_file(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut value = serde_json::to_value(Report { is_final: true, ..Report::default() }).unwrap();
    edit(&mut value);
    let path = dir.join(name);
    fs::write(&path, format!("{value}\n")).unwrap();
    path
}

/// Check that `diff` refuses an endless line (/dev/zero) and a count no
/// process can hold with one line each, and reads a long log as a stream
/// (its peak memory far below the log's size).
#[test]
fn diff_input_bounded_and_checked() {
    let dir = ScratchDir::new("diff-input");
    let good = report_file(&dir.0, "good.json", |_| {});
    let good = good.to_str().unwrap();
    let finished = run_tracer(&["diff", good, "/dev/zero"]);
    assert_clean_error(&finished, "longer than");

    let huge = report_file(&dir.0, "huge.json", |value| {
        value["totals"]["bytes"] = serde_json::json!(u64::MAX - 7);
    });
    let finished = run_tracer(&["diff", good, huge.to_str().unwrap()]);
    assert_clean_error(&finished, "more than any process can hold");

    // 100 MB of reports, each about 1 KiB.
    let line = fs::read_to_string(good).unwrap();
    let long = dir.0.join("long.json");
    fs::write(&long, line.repeat((100 << 20) / line.len())).unwrap();
    let output = Command::new("/usr/bin/time")
        .args(["-f", "maxrss %M"])
        .arg(tracer_bin())
        .args(["diff", good, long.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let kib: u64 = stderr
        .lines()
        .find_map(|line| line.strip_prefix("maxrss "))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or_else(|| panic!("no maxrss in {stderr}"));
    assert!(kib < 50 << 10, "diff of a 100 MB log peaked at {kib} KiB");
}
