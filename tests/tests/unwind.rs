//! Stacks of programs built without frame pointers (C and C++ at -O2
//! -fomit-frame-pointer, Rust at opt-level 2), walked from their DWARF
//! call-frame information: every frame from the allocator's caller up to
//! main is reported, in order, also through code in libc, libstdc++ and
//! Rust's standard library, through a library dlopen()ed after the tracer
//! attached and in a non-PIE executable; a frame with no call-frame
//! information ends the stack cleanly and is counted as lost.

use leaktrace_tests::*;
use std::{ops::Range, path::Path, process::Command};

/// How a frame's symbol is matched: C names exactly, demangled C++ and Rust
/// names (with parameters, generics, crate paths or hashes) by a part.
#[derive(Clone, Copy, Debug)]
enum Name {
    Is(&'static str),
    Has(&'static str),
}

impl Name {
    fn matches(self, symbol: Option<&str>) -> bool {
        match (self, symbol) {
            (Name::Is(name), Some(symbol)) => symbol == name,
            (Name::Has(part), Some(symbol)) => symbol.contains(part),
            (_, None) => false,
        }
    }
}

/// A stack's frames that are calls of their own, innermost first. Inlined
/// frames share the address of the frame after them (a return address in a
/// caller may fall in code inlined there, e.g. black_box), so they are left out.
fn calls(frames: &[Frame]) -> Vec<&Frame> {
    frames.iter().filter(|frame| !frame.inlined).collect()
}

/// The symbols of a stack's calls, "?" for a frame without one, for messages.
fn call_names(frames: &[Frame]) -> Vec<&str> {
    calls(frames).into_iter().map(|frame| frame.symbol.as_deref().unwrap_or("?")).collect()
}

/// Where `chain` (innermost first) begins in the stack's calls: the first
/// call matching chain[0], followed at once by calls matching the rest, in order.
fn chain_start(frames: &[Frame], chain: &[Name]) -> Result<usize, String> {
    let calls = calls(frames);
    let start = calls
        .iter()
        .position(|frame| chain[0].matches(frame.symbol.as_deref()))
        .ok_or_else(|| format!("no frame {:?}", chain[0]))?;
    for (i, name) in chain.iter().enumerate().skip(1) {
        if !calls.get(start + i).is_some_and(|frame| name.matches(frame.symbol.as_deref())) {
            return Err(format!("frame {} after {:?} is not {name:?}", start + i, chain[0]));
        }
    }
    Ok(start)
}

/// Every stack of the report that calls through `chain[0]`, each asserted to
/// show the whole chain as consecutive calls, with their (bytes, allocations)
/// total. Returns the stacks and where the chain begins in each.
fn chain_stacks<'a>(
    report: &'a Report,
    chain: &[Name],
) -> (Vec<(&'a StackReport, usize)>, (u64, u64)) {
    let through: Vec<&StackReport> = report
        .stacks
        .iter()
        .filter(|stack| {
            calls(&stack.frames).iter().any(|frame| chain[0].matches(frame.symbol.as_deref()))
        })
        .collect();
    assert!(!through.is_empty(), "no stack has a frame {:?}: {}", chain[0], json(report));
    let mut found = Vec::new();
    for stack in through {
        match chain_start(&stack.frames, chain) {
            Ok(start) => found.push((stack, start)),
            Err(why) => panic!(
                "a stack through {:?} lacks the chain {chain:?} ({why}); its calls are {:?}: {}",
                chain[0],
                call_names(&stack.frames),
                json(report)
            ),
        }
    }
    let total = totals(found.iter().map(|&(stack, _)| stack));
    (found, total)
}

/// Asserts that every call before `start` (the frames the chain's first
/// function called into) lies in a module whose path contains `library`, that
/// there is at least one, and that one's symbol contains `name`.
fn assert_called_into(
    report: &Report,
    stack: &StackReport,
    start: usize,
    library: &str,
    name: &str,
) {
    let inside = &calls(&stack.frames)[..start];
    assert!(
        !inside.is_empty(),
        "the stack has no {library} frame before its first own frame; calls {:?}: {}",
        call_names(&stack.frames),
        json(report)
    );
    for frame in inside {
        assert!(
            frame.module.as_deref().is_some_and(|module| module.contains(library)),
            "frame {frame:?} before the program's own frames is not in {library}; calls {:?}: {}",
            call_names(&stack.frames),
            json(report)
        );
    }
    assert!(
        inside.iter().filter_map(|frame| frame.symbol.as_deref()).any(|sym| sym.contains(name)),
        "no {library} frame names {name}; calls {:?}: {}",
        call_names(&stack.frames),
        json(report)
    );
}

/// Asserts that `report`, of a build of unwind_chain.c, shows its leak as
/// leak_leaf -> leak_middle -> leak_outer -> main, walked to the outermost
/// frame, with its exact bytes.
fn assert_leak_chain(report: &Report) {
    let chain =
        [Name::Is("leak_leaf"), Name::Is("leak_middle"), Name::Is("leak_outer"), Name::Is("main")];
    let (found, total) = chain_stacks(report, &chain);
    for (stack, start) in found {
        assert_eq!(
            start,
            0,
            "leak_leaf is not the first frame (malloc's caller); calls {:?}: {}",
            call_names(&stack.frames),
            json(report)
        );
        assert_eq!(
            stack.stack_end,
            StackEnd::Complete,
            "a stack walked up to _start should say it is complete: {}",
            json(report)
        );
    }
    assert_eq!(total, (43210, 10), "leak_leaf should hold 10 x 4321 bytes: {}", json(report));
}

/// Check that a C leak made two calls below main in -O2 code without frame
/// pointers is reported as leak_leaf -> leak_middle -> leak_outer -> main, with
/// its exact bytes.
#[test]
fn c_leak_without_frame_pointers_unwound_to_main() {
    assert_leak_chain(&trace_fixture("unwind_chain", &[], &[]));
}

/// Check that a C++ leak through operator new from a template method in -O2
/// code without frame pointers is reported as [operator new ->]
/// Pool<Block>::grow -> fill_pool -> main, with its exact bytes.
#[test]
fn cpp_template_leak_without_frame_pointers_unwound_to_main() {
    let report = trace_fixture("unwind_cpp", &[], &[]);
    let chain = [Name::Has("Pool<Block>::grow"), Name::Has("fill_pool"), Name::Is("main")];
    let (found, total) = chain_stacks(&report, &chain);
    for (stack, start) in found {
        assert!(
            first_user_symbol(stack).is_some_and(|sym| sym.contains("Pool<Block>::grow")),
            "the first frame outside operator new is not Pool<Block>::grow; calls {:?}: {}",
            call_names(&stack.frames),
            json(&report)
        );
        // Stacks are taken at operator new's return (so it is not a frame) or
        // inside it, in libstdc++; nothing else may come before grow.
        for frame in &calls(&stack.frames)[..start] {
            assert!(
                frame.module.as_deref().is_some_and(|module| module.contains("libstdc++")),
                "frame {frame:?} before Pool<Block>::grow is not operator new in libstdc++: {}",
                json(&report)
            );
        }
    }
    assert_eq!(
        total,
        (6400, 20),
        "Pool<Block>::grow should hold 20 x 320 bytes: {}",
        json(&report)
    );
}

/// Check that blocks allocated inside libc, by strdup and by asprintf, called
/// from -O2 code without frame pointers, are reported through their libc
/// frames as ... -> leak_dup -> main and ... -> leak_fmt -> main, with exact bytes.
#[test]
fn libc_allocations_unwound_through_libc_to_main() {
    let report = trace_fixture("unwind_libc", &[], &[]);

    let (found, total) = chain_stacks(&report, &[Name::Is("leak_dup"), Name::Is("main")]);
    for (stack, start) in found {
        assert_called_into(&report, stack, start, "libc.so", "strdup");
    }
    assert_eq!(
        total,
        (640, 10),
        "leak_dup should hold 10 strdup'ed 64-byte strings: {}",
        json(&report)
    );

    let (found, total) = chain_stacks(&report, &[Name::Is("leak_fmt"), Name::Is("main")]);
    for (stack, start) in found {
        assert_called_into(&report, stack, start, "libc.so", "asprintf");
    }
    assert_eq!(
        total,
        (280, 10),
        "leak_fmt should hold 10 asprintf'ed 28-byte strings: {}",
        json(&report)
    );
}

/// Check that Rust leaks at opt-level 2 without frame pointers, through Vec
/// growth and through Box::leak, are reported as leak_vec -> vec_caller ->
/// main and leak_box -> box_caller -> main, with exact bytes.
#[test]
fn rust_leaks_without_frame_pointers_unwound_to_main() {
    let report = trace_fixture("rust_unwind", &[], &[]);
    let cases = [
        ("leak_vec", "rust_unwind::leak_vec", "rust_unwind::vec_caller", (8192, 1)),
        ("leak_box", "rust_unwind::leak_box", "rust_unwind::box_caller", (30000, 10)),
    ];
    for (function, leaking, caller, expected) in cases {
        let chain = [Name::Has(leaking), Name::Has(caller), Name::Has("rust_unwind::main")];
        let (found, total) = chain_stacks(&report, &chain);
        for (stack, _) in found {
            assert!(
                first_user_symbol(stack).is_some_and(|sym| sym.contains(leaking)),
                "the first frame outside the standard library is not {leaking}; calls {:?}: {}",
                call_names(&stack.frames),
                json(&report)
            );
        }
        assert_eq!(
            total,
            expected,
            "{function} should hold {} bytes in {} allocations: {}",
            expected.0,
            expected.1,
            json(&report)
        );
    }
}

/// Check that a pthread_create call site in -O2 code without frame pointers
/// is reported as spawn_thread -> start_threads -> main.
#[test]
fn thread_site_without_frame_pointers_unwound_to_main() {
    let report = trace_fixture("unwind_thread", &[], &[]);
    let site = thread_site_through(&report, "spawn_thread")
        .unwrap_or_else(|| panic!("no thread site through spawn_thread: {}", json(&report)));
    let chain = [Name::Is("spawn_thread"), Name::Is("start_threads"), Name::Is("main")];
    match chain_start(&site.frames, &chain) {
        Ok(0) => {}
        Ok(start) => panic!(
            "spawn_thread is frame {start}, not the first (pthread_create's caller); calls {:?}: {}",
            call_names(&site.frames), json(&report)
        ),
        Err(why) => panic!(
            "the spawn_thread site lacks the chain {chain:?} ({why}); its calls are {:?}: {}",
            call_names(&site.frames), json(&report)
        ),
    }
    assert_eq!(site.counts.created, 3, "spawn_thread creates 3 threads: {}", json(&report));
}

/// The address ranges of the FDEs in `binary`'s .eh_frame and .debug_frame.
fn fde_ranges(binary: &Path) -> Vec<Range<u64>> {
    let output = Command::new("readelf")
        .args(["-W", "--debug-dump=frames"])
        .arg(binary)
        .output()
        .expect("failed to run readelf");
    assert!(output.status.success(), "readelf failed on {}", binary.display());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(" FDE "))
        .filter_map(|line| {
            let (start, end) = line.split("pc=").nth(1)?.split_once("..")?;
            let start = u64::from_str_radix(start.trim(), 16).ok()?;
            let end = u64::from_str_radix(end.trim(), 16).ok()?;
            Some(start..end)
        })
        .collect()
}

/// The address range of function `name` in `binary`'s symbol table.
fn function_range(binary: &Path, name: &str) -> Range<u64> {
    let output = Command::new("nm").arg("-S").arg(binary).output().expect("failed to run nm");
    assert!(output.status.success(), "nm failed on {}", binary.display());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [start, size, _, symbol] = fields[..] else { return None };
            let start = u64::from_str_radix(start, 16).ok()?;
            let size = u64::from_str_radix(size, 16).ok()?;
            (symbol == name).then_some(start..start + size)
        })
        .unwrap_or_else(|| panic!("{name} not in the symbol table of {}", binary.display()))
}

/// Check that a walk from leak_leaf (with call-frame information) into
/// nocfi_caller (without any) stops there: the stack is exactly leak_leaf,
/// nocfi_caller, with nothing made up after it (main is unreachable without
/// frame pointers), its bytes are exact, and the cut is counted in lost.unwind_no_info.
#[test]
fn frame_without_unwind_info_ends_stack_cleanly() {
    let binary = fixture_path("unwind_nocfi");
    let fdes = fde_ranges(&binary);
    let caller = function_range(&binary, "nocfi_caller");
    assert!(
        !fdes.iter().any(|fde| fde.start < caller.end && caller.start < fde.end),
        "fixture unwind_nocfi is wrong: nocfi_caller {caller:x?} has call-frame information ({fdes:x?})"
    );
    let leaf = function_range(&binary, "leak_leaf");
    assert!(
        fdes.iter().any(|fde| fde.start <= leaf.start && leaf.end <= fde.end),
        "fixture unwind_nocfi is wrong: leak_leaf {leaf:x?} has no FDE ({fdes:x?})"
    );

    let report = trace_fixture("unwind_nocfi", &[], &[]);
    let through: Vec<&StackReport> =
        report.stacks.iter().filter(|stack| has_symbol(&stack.frames, "leak_leaf")).collect();
    assert!(!through.is_empty(), "no stack through leak_leaf: {}", json(&report));
    for stack in &through {
        let names: Vec<Option<&str>> =
            stack.frames.iter().map(|frame| frame.symbol.as_deref()).collect();
        assert_eq!(
            names,
            [Some("leak_leaf"), Some("nocfi_caller")],
            "the stack through leak_leaf should be exactly leak_leaf, nocfi_caller \
             (nocfi_caller has no call-frame information): {}",
            json(&report)
        );
        assert_eq!(
            stack.stack_end,
            StackEnd::NoInfo,
            "the stack cut at nocfi_caller should say why: {}",
            json(&report)
        );
    }
    let total = totals(through.iter().copied());
    assert_eq!(total, (23450, 10), "leak_leaf should hold 10 x 2345 bytes: {}", json(&report));
    let no_info = report.lost.get(&Lost::UnwindNoInfo).copied();
    assert!(
        no_info.is_some_and(|count| count > 0),
        "lost.unwind_no_info is {no_info:?}, expected a count above 0 for the stacks cut at \
         nocfi_caller: {}",
        json(&report)
    );
}

/// Check that a library dlopen()ed only after the tracer attached, built -O2
/// without frame pointers, is unwound from its own .eh_frame: its leak, in a
/// first round right after the load (once the tracer has polled the new
/// mapping) and a second round later, is reported as plugin_leaf ->
/// plugin_middle -> plugin_leak -> load_plugin -> main, with the library's
/// frames in its module, and with its exact bytes.
#[test]
fn dlopen_library_loaded_after_attach_unwound() {
    let plugin = fixture_path("libdlopen_plugin.so");
    let mut fixture = Fixture::start("unwind_dlopen", &[plugin.to_str().unwrap()]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", fixture.pid()))
        .expect("failed to read the fixture's /proc/PID/maps");
    assert!(
        !maps.contains("libdlopen_plugin.so"),
        "fixture unwind_dlopen is wrong: libdlopen_plugin.so is mapped before the go line:\n{maps}"
    );

    let report = trace_started(&mut fixture, &[]);
    let chain = [
        Name::Is("plugin_leaf"),
        Name::Is("plugin_middle"),
        Name::Is("plugin_leak"),
        Name::Is("load_plugin"),
        Name::Is("main"),
    ];
    let (found, total) = chain_stacks(&report, &chain);
    for (stack, start) in found {
        assert_eq!(
            start,
            0,
            "plugin_leaf is not the first frame (malloc's caller); calls {:?}: {}",
            call_names(&stack.frames),
            json(&report)
        );
        for frame in &calls(&stack.frames)[..3] {
            assert!(
                frame
                    .module
                    .as_deref()
                    .is_some_and(|module| module.ends_with("libdlopen_plugin.so")),
                "frame {frame:?} does not name libdlopen_plugin.so as its module: {}",
                json(&report)
            );
        }
    }
    assert_eq!(
        total,
        (64200, 20),
        "plugin_leaf should hold 2 rounds of 10 x 3210 bytes: {}",
        json(&report)
    );
}

/// The ELF file type of `binary` ("EXEC", "DYN", ...), from `readelf -h`.
fn elf_type(binary: &Path) -> String {
    let output =
        Command::new("readelf").arg("-h").arg(binary).output().expect("failed to run readelf");
    assert!(output.status.success(), "readelf failed on {}", binary.display());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.trim().strip_prefix("Type:"))
        .and_then(|kind| kind.split_whitespace().next())
        .unwrap_or_else(|| panic!("no ELF type in readelf -h of {}", binary.display()))
        .to_owned()
}

/// Check that a leak in a non-PIE executable (unwind_chain.c linked as an
/// ET_EXEC at its link-time addresses) built -O2 without frame pointers is
/// reported as leak_leaf -> leak_middle -> leak_outer -> main, with its exact
/// bytes.
#[test]
fn non_pie_executable_unwound() {
    let binary = fixture_path("unwind_nopie");
    let kind = elf_type(&binary);
    assert_eq!(
        kind, "EXEC",
        "fixture unwind_nopie is wrong: it is an ELF {kind}, not a non-PIE EXEC"
    );
    assert_leak_chain(&trace_fixture("unwind_nopie", &[], &[]));
}

/// Check that a -c program whose first allocations come at the top of main,
/// right after the dynamic linker mapped its libraries, gets whole stacks
/// every time, 20 runs in a row: leaktrace holds it at exec and at the
/// linker's hook until the new mappings are published.
#[test]
fn first_allocations_of_command_whole_every_time() {
    let program = fixture_path("unwind_first");
    let chain = [Name::Is("first_leaf"), Name::Is("first_outer"), Name::Is("main")];
    for run in 1..=20 {
        let finished = run_tracer(&["--json", "-c", program.to_str().unwrap(), "1"]);
        let reports = finished.reports();
        let report = final_report(&reports);
        let (found, total) = chain_stacks(report, &chain);
        for (stack, start) in found {
            assert!(
                start == 0 && stack.stack_end == StackEnd::Complete,
                "run {run}: the stack is not whole from first_leaf; calls {:?}: {}",
                call_names(&stack.frames),
                json(report)
            );
        }
        assert_eq!(total, (8000, 8), "run {run}: 8 x 1000 bytes: {}", json(report));
        assert_eq!(
            report.lost.get(&Lost::UnwindNoInfo).copied().unwrap_or(0),
            0,
            "run {run}: a stack was cut for want of unwind information: {}",
            json(report)
        );
    }
}

/// Check that a library a -c program dlopen()s, and calls into at once, has
/// its first allocations unwound whole, in 5 runs: the program is held at
/// the dynamic linker's hook until the library's table is published.
#[test]
fn dlopen_without_wait_unwound_under_command() {
    let plugin = fixture_path("libdlopen_plugin.so");
    let command =
        format!("{} {} nowait", fixture_path("unwind_dlopen").display(), plugin.display());
    let chain = [
        Name::Is("plugin_leaf"),
        Name::Is("plugin_middle"),
        Name::Is("plugin_leak"),
        Name::Is("load_plugin"),
        Name::Is("main"),
    ];
    for run in 1..=5 {
        let finished = run_tracer(&["--json", "-c", &command, "1"]);
        let reports = finished.reports();
        let report = final_report(&reports);
        let (_, total) = chain_stacks(report, &chain);
        assert_eq!(
            total,
            (64200, 20),
            "run {run}: plugin_leaf should hold 2 rounds of 10 x 3210 bytes, all whole: {}",
            json(report)
        );
    }
}
