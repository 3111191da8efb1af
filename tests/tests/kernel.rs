//! Kernel memory: the system mode (no -p) shows the machine's growing slab
//! caches and processes and traces the kernel's allocations; `-p --kernel`
//! names the user call sites that leak kernel memory (fds, pipes, sockets).
//! These tests watch the whole machine, so they run one at a time.

use std::sync::Mutex;

use leaktrace_tests::*;

/// One machine-wide test at a time: another test's fixture would be part of
/// what the next one sees.
static MACHINE: Mutex<()> = Mutex::new(());

/// The functions of kernel_leak.c that leave fds open.
const LEAKERS: [&str; 3] = ["leak_eventfd", "leak_pipe", "leak_socketpair"];

fn machine() -> std::sync::MutexGuard<'static, ()> {
    MACHINE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Trace the machine with `leaktrace --json 1 COUNT` while fixture
/// `kernel_leak` runs with `args`; every report.
fn system_reports(args: &[&str], count: u32) -> (Vec<Report>, u32) {
    require_root();
    let mut fixture = Fixture::start("kernel_leak", args);
    let count = count.to_string();
    let mut tracer = Tracer::start(&["--json", "--top", "50", "1", &count]);
    tracer.wait_stderr("attached to the kernel's allocation events");
    fixture.go();
    fixture.wait_ready();
    let pid = fixture.pid();
    let reports = tracer.finish().reports();
    (reports, pid)
}

/// Trace fixture `kernel_leak` with `-p PID --kernel --json 1 COUNT`.
fn kernel_reports(args: &[&str], count: u32) -> Vec<Report> {
    require_root();
    let mut fixture = Fixture::start("kernel_leak", args);
    let mut tracer = Tracer::trace_pid(fixture.pid(), 1, count, &["--kernel", "--top", "50"]);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    tracer.finish().reports()
}

fn kernel_stacks(report: &Report) -> impl Iterator<Item = &StackReport> {
    report.stacks.iter().filter(|stack| stack.kind.is_some())
}

/// Check that the system mode shows filp among the growing slab caches, the
/// fixture as a growing process holding kernel memory, kernel stacks with
/// kernel frames and the fixture among their processes, and a kernel-leak
/// verdict that names the fixture.
#[test]
fn system_mode_finds_growing_caches_and_process() {
    let _machine = machine();
    let (reports, pid) = system_reports(&[], 8);
    let report = final_report(&reports);
    let system = report.system.as_ref().unwrap_or_else(|| panic!("no system: {}", json(report)));
    for name in ["mem_available", "slab_unreclaimable", "anon_pages"] {
        assert!(system.meminfo.contains_key(name), "meminfo lacks {name}: {}", json(report));
        let delta = format!("{name}_delta");
        assert!(system.meminfo.contains_key(&delta), "meminfo lacks {delta}: {}", json(report));
    }
    let filp = system.slabs.iter().find(|slab| slab.name == "filp");
    assert!(
        filp.is_some_and(|slab| slab.trend == Trend::Growing && slab.delta > 0),
        "filp is not a growing slab cache: {}",
        json(report)
    );
    let process = system.processes.iter().find(|process| process.pid == pid);
    assert!(
        process.is_some_and(|p| p.trend == Trend::Growing && p.kernel_bytes > 0),
        "the fixture (pid {pid}) is not a growing process holding kernel memory: {}",
        json(report)
    );
    let stack = kernel_stacks(report)
        .find(|stack| stack.processes.iter().any(|process| process.pid == pid))
        .unwrap_or_else(|| panic!("no kernel stack charged to pid {pid}: {}", json(report)));
    assert!(
        stack.frames.iter().all(|frame| frame.module.as_deref() == Some("[kernel]")),
        "a system-mode stack has frames outside the kernel: {}",
        json(report)
    );
    assert!(stack.frames.iter().any(|frame| frame.symbol.is_some()), "unnamed kernel frames");
    let verdict = verdict(report);
    assert!(verdict.has(VerdictKind::KernelLeak), "no kernel verdict: {}", json(report));
    let named = verdict
        .findings
        .iter()
        .any(|finding| matches!(finding, Finding::KernelLeak { pid: Some(p), .. } if *p == pid));
    assert!(named, "the kernel verdict does not name pid {pid}: {}", json(report));
    assert!(verdict.text.contains("kernel:"), "{}", verdict.text);
}

/// Check that `-p --kernel` puts each leaking function (eventfd, pipe,
/// socketpair) above the kernel frames of a growing kernel stack, never
/// churn_fds (which closes what it opens), and that the fd count grows.
#[test]
fn kernel_flag_names_leaking_user_functions() {
    let _machine = machine();
    let reports = kernel_reports(&[], 6);
    let report = final_report(&reports);
    for leaker in LEAKERS {
        let stack = kernel_stacks(report)
            .filter(|stack| has_symbol(&stack.frames, leaker))
            .find(|stack| stack.growth.is_some_and(|growth| growth.trend == Trend::Growing))
            .unwrap_or_else(|| panic!("no growing kernel stack under {leaker}: {}", json(report)));
        let first_user = stack
            .frames
            .iter()
            .position(|frame| frame.module.as_deref() != Some("[kernel]"))
            .unwrap_or_else(|| panic!("{leaker}'s stack has no user frames: {}", json(report)));
        assert!(first_user > 0, "{leaker}'s stack starts with a user frame: {}", json(report));
        assert!(
            stack.frames[first_user..].iter().all(|f| f.module.as_deref() != Some("[kernel]")),
            "kernel frames below the user frames: {}",
            json(report)
        );
    }
    // Pages a slab took while churn_fds ran hold the leakers' objects: only
    // stacks of objects must never name it.
    let churned = kernel_stacks(report)
        .filter(|stack| stack.kind != Some(KernelKind::Page))
        .filter(|stack| has_symbol(&stack.frames, "churn_fds"))
        .find(|stack| stack.growth.is_some_and(|growth| growth.trend == Trend::Growing));
    assert!(churned.is_none(), "churn_fds named as growing: {}", json(report));
    let fds = report.fds.as_ref().unwrap_or_else(|| panic!("no fd count: {}", json(report)));
    assert_eq!(fds.trend, Trend::Growing, "fd count not growing: {}", json(report));
    assert!(fds.delta > 0, "{}", json(report));
    let verdict = verdict(report);
    assert!(verdict.has(VerdictKind::KernelLeak), "no kernel verdict: {}", json(report));
    let user_site = verdict.findings.iter().find_map(|finding| match finding {
        Finding::KernelLeak { user_site, .. } => user_site.clone(),
        _ => None,
    });
    assert!(
        user_site.is_some_and(|site| LEAKERS.iter().any(|leaker| site.starts_with(leaker))),
        "the kernel verdict does not name a leaking function: {}",
        json(report)
    );
}

/// Check that a machine at rest gives no kernel verdict over 10 reports.
#[test]
fn steady_machine_no_kernel_verdict() {
    let _machine = machine();
    require_root();
    let finished = run_tracer(&["--json", "1", "10"]);
    let reports = finished.reports();
    assert_eq!(reports.len(), 10);
    for report in &reports {
        let verdict = verdict(report);
        assert!(!verdict.has(VerdictKind::KernelLeak), "kernel verdict at rest: {}", json(report));
        assert!(report.system.is_some() && report.kernel.is_some(), "{}", json(report));
    }
}

/// Check that the system mode under `-s N` says that its "no growth" is a
/// sample's, as `-p` does.
#[test]
fn sampled_machine_says_so() {
    let _machine = machine();
    require_root();
    let finished = run_tracer(&["-s", "10", "--json", "1", "3"]);
    let reports = finished.reports();
    assert_eq!(reports.len(), 3);
    for report in &reports {
        let verdict = verdict(report);
        assert!(
            verdict.has(VerdictKind::KernelLeak) || verdict.has(VerdictKind::Sampled),
            "a sampled machine's verdict does not say it is sampled: {}",
            json(report)
        );
        assert_eq!(report.sample_rate, 10, "{}", json(report));
    }
}

/// Check that a storm of fds created and closed as fast as possible gives
/// no kernel leak, and that the kernel losses are counted (and, if any,
/// make the verdict incomplete).
#[test]
fn fd_storm_no_false_leak() {
    let _machine = machine();
    let reports = kernel_reports(&["storm"], 6);
    for report in &reports {
        let verdict = verdict(report);
        assert!(!verdict.has(VerdictKind::KernelLeak), "false kernel leak: {}", json(report));
        let lost = report.lost.get(&Lost::KernelAllocMapFull).copied();
        assert!(lost.is_some(), "kernel losses not counted: {}", json(report));
        if lost > Some(0) {
            assert!(verdict.has(VerdictKind::Incomplete), "{}", json(report));
        }
    }
    let report = final_report(&reports);
    assert!(report.kernel.is_some(), "no kernel summary: {}", json(report));
}

/// Check the bad inputs: --kernel without a target, --percpu with one, and
/// an unreadable kallsyms each give one clear line and a non-zero exit.
#[test]
fn kernel_bad_inputs() {
    require_root();
    assert_clean_error(&run_tracer(&["--kernel"]), "--kernel needs a target");
    assert_clean_error(&run_tracer(&["-p", "1", "--percpu"]), "--percpu is for the system mode");
    assert_clean_error(
        &run_tracer(&["--kallsyms", "/nonexistent/kallsyms", "1", "1"]),
        "cannot read kernel symbols",
    );
    assert_clean_error(
        &run_tracer(&["-p", "1", "--kernel", "--kallsyms", "/nonexistent/kallsyms", "1", "1"]),
        "cannot read kernel symbols",
    );
}

/// Check that a kallsyms whose addresses are hidden (kernel.kptr_restrict:
/// every address 0) is said so, on stderr and in the report, and that the
/// kernel frames are left as addresses rather than misnamed.
#[test]
fn hidden_kernel_addresses_said() {
    let _machine = machine();
    require_root();
    let dir = ScratchDir::new("kallsyms");
    let kallsyms = dir.0.join("kallsyms");
    std::fs::write(&kallsyms, "0000000000000000 T _text\n0000000000000000 T do_syscall_64\n")
        .unwrap();
    let finished = run_tracer(&["--json", "--kallsyms", kallsyms.to_str().unwrap(), "1", "2"]);
    assert!(finished.stderr.contains("kptr_restrict"), "not said on stderr:\n{}", finished.stderr);
    let reports = finished.reports();
    let report = final_report(&reports);
    let kernel = report.kernel.as_ref().unwrap_or_else(|| panic!("{}", json(report)));
    assert!(kernel.symbols.contains("kptr_restrict"), "not said in the report: {}", json(report));
    for stack in kernel_stacks(report) {
        assert!(stack.frames.iter().all(|frame| frame.symbol.is_none()), "{}", json(report));
    }
}

/// Check that ordinary work on a busy machine is no kernel leak: short
/// processes coming and going, files written, read and removed (page
/// cache, dentries, inodes), directories listed on a cold cache, as a
/// build does, for the whole of a system-mode run.
#[test]
fn busy_machine_no_kernel_leak() {
    let _machine = machine();
    require_root();
    let dir = ScratchDir::new("busy-machine");
    // A cold page cache, as on a fresh CI machine: `ls -R` then fills it.
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("caches dropped");
    let script = "while :; do for i in 1 2 3 4 5 6 7 8 9 10; do \
                  head -c 65536 /dev/urandom > f$i; cat f$i > /dev/null; sh -c true; done; \
                  rm -f f*; ls -R /usr/include > /dev/null; done";
    let mut busy = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(&dir.0)
        .spawn()
        .expect("sh runs");
    let mut tracer = Tracer::start(&["--json", "--top", "50", "1", "8"]);
    tracer.wait_stderr("attached to the kernel's allocation events");
    let finished = tracer.finish();
    let _ = busy.kill();
    let _ = busy.wait();
    let reports = finished.reports();
    assert_eq!(reports.len(), 8);
    for report in &reports {
        let verdict = verdict(report);
        assert!(
            !verdict.has(VerdictKind::KernelLeak),
            "busy machine, kernel leak: {}",
            json(report)
        );
    }
}
