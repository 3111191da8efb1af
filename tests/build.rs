//! Compiles the C/C++/Rust fixture programs into OUT_DIR/fixtures with debug
//! info and frame pointers (the unwind_* and rust_unwind fixtures: optimized,
//! without frame pointers), and exposes that directory to the tests as
//! FIXTURE_DIR (and OUT_DIR/debug, a --debug-dir, as FIXTURE_DEBUG_DIR).
//!
//! Fixtures that need an optional package (an allocator library, musl) do not
//! fail the build when it is missing: build.rs writes NAME.missing next to
//! where NAME would be, naming the package, and the tests that need NAME fail
//! with that message while the others run.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

/// Flags most fixtures share: -O0 keeps each named function a real frame, and
/// frame pointers put them on the tracer's fast path (objects built with frame
/// pointers skip the unwind-table search); the unwind fixtures are -O2 without.
const COMMON_FLAGS: &[&str] =
    &["-g", "-O0", "-fno-omit-frame-pointer", "-pthread", "-Wall", "-Wextra"];

/// Standalone programs: (source file, output name).
const PROGRAMS: &[(&str, &str)] = &[
    ("leak_calloc.c", "leak_calloc"),
    ("all_apis.c", "all_apis"),
    ("realloc_chain.c", "realloc_chain"),
    ("big_malloc.c", "big_malloc"),
    ("cpp_leak.cpp", "cpp_leak"),
    ("exits_midway.c", "exits_midway"),
    ("args_leak.c", "args_leak"),
    ("ns_leak.c", "ns_leak"),
    ("preattach_free.c", "preattach_free"),
    ("threads_unjoined.c", "threads_unjoined"),
    ("threads_blocked.c", "threads_blocked"),
    ("thread_churn.c", "thread_churn"),
    ("cache_plateau.c", "cache_plateau"),
    ("arena_retention.c", "arena_retention"),
    ("steady_leak.c", "steady_leak"),
    ("steady_realloc.c", "steady_realloc"),
    ("window_edges.c", "window_edges"),
    ("many_blocks.c", "many_blocks"),
    ("stable.c", "stable"),
    ("mntns_leak.c", "mntns_leak"),
    ("sysroot_leak.c", "sysroot_leak"),
    ("ring_replaced.c", "ring_replaced"),
    ("threads_attrs.c", "threads_attrs"),
    ("late_leak.c", "late_leak"),
    ("thread_pool.c", "thread_pool"),
    ("ends.c", "ends"),
    ("exec_old.c", "exec_old"),
    ("exec_new.c", "exec_new"),
    ("kernel_leak.c", "kernel_leak"),
    ("sort_leak.c", "sort_leak"),
    ("leader_exits.c", "leader_exits"),
    ("many_maps.c", "many_maps"),
    ("trace_flood.c", "trace_flood"),
    ("big_heap_replaced.c", "big_heap_replaced"),
    ("ring_same_class.c", "ring_same_class"),
    ("short_threads.c", "short_threads"),
    ("c_short_names.c", "c_short_names"),
    ("cpp_template.cpp", "cpp_template"),
    ("four_threads.c", "four_threads"),
];

/// Flags of the unwinding fixtures: optimized code without frame pointers,
/// whose stacks only DWARF call-frame information (.eh_frame) can walk. The
/// sources keep each function a real frame themselves (noinline, noclone, and
/// no call in tail position, so no call becomes a jmp).
const UNWIND_FLAGS: &[&str] =
    &["-g", "-O2", "-fomit-frame-pointer", "-pthread", "-Wall", "-Wextra"];

/// Flags of the one unwinding fixture file with no unwind information at all:
/// no .eh_frame, and no -g, with which GCC would write the CFI to .debug_frame.
const NO_CFI_FLAGS: &[&str] = &[
    "-O2",
    "-fomit-frame-pointer",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-Wall",
    "-Wextra",
];

/// Unwinding fixtures, built with UNWIND_FLAGS: (source file, output name).
const UNWIND_PROGRAMS: &[(&str, &str)] = &[
    ("unwind_chain.c", "unwind_chain"),
    ("unwind_cpp.cpp", "unwind_cpp"),
    ("unwind_libc.c", "unwind_libc"),
    ("unwind_thread.c", "unwind_thread"),
    ("unwind_inlined.c", "unwind_inlined"),
    ("unwind_first.c", "unwind_first"),
];

fn main() {
    let src = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("fixtures");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("fixtures");
    std::fs::create_dir_all(&out).unwrap();
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-env-changed=CXX");

    for (source, name) in PROGRAMS {
        compile(&src.join(source), &out.join(name), &[]);
    }

    // A leak inside a shared library, called from a program that finds the
    // library next to itself through its rpath.
    compile(&src.join("leaky_lib.c"), &out.join("libleaky.so"), &["-shared", "-fPIC"]);
    compile(
        &src.join("uses_lib.c"),
        &out.join("uses_lib"),
        &["-L", out.to_str().unwrap(), "-lleaky", "-Wl,-rpath,$ORIGIN"],
    );

    build_unwind_fixtures(&src, &out);

    let debug_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("debug");
    build_allocator_fixtures(&src, &out);
    build_debug_info_fixtures(&src, &out, &debug_dir);
    build_rust_fixtures(&src, &out);

    println!("cargo:rustc-env=FIXTURE_DIR={}", out.display());
    println!("cargo:rustc-env=FIXTURE_DEBUG_DIR={}", debug_dir.display());
}

/// Optimized programs without frame pointers, for the tracer's DWARF
/// unwinder; unwind_nocfi links in nocfi_caller, a function with no unwind
/// information, from an object built with NO_CFI_FLAGS; unwind_dlopen loads
/// libdlopen_plugin.so (not linked in: the test passes its path) with
/// dlopen; unwind_nopie is unwind_chain as a non-PIE executable.
fn build_unwind_fixtures(src: &Path, out: &Path) {
    for (source, name) in UNWIND_PROGRAMS {
        compile_with(UNWIND_FLAGS, &[&src.join(source)], &out.join(name), &[])
            .unwrap_or_else(|err| panic!("{err}"));
    }
    let object = out.join("unwind_nocfi_caller.o");
    compile_with(NO_CFI_FLAGS, &[&src.join("unwind_nocfi_caller.c")], &object, &["-c"])
        .unwrap_or_else(|err| panic!("{err}"));
    compile_with(
        UNWIND_FLAGS,
        &[&src.join("unwind_nocfi.c"), &object],
        &out.join("unwind_nocfi"),
        &[],
    )
    .unwrap_or_else(|err| panic!("{err}"));
    compile_with(
        UNWIND_FLAGS,
        &[&src.join("unwind_dlopen_plugin.c")],
        &out.join("libdlopen_plugin.so"),
        &["-shared", "-fPIC"],
    )
    .unwrap_or_else(|err| panic!("{err}"));
    compile_with(
        UNWIND_FLAGS,
        &[&src.join("unwind_dlopen.c")],
        &out.join("unwind_dlopen"),
        &["-ldl"],
    )
    .unwrap_or_else(|err| panic!("{err}"));
    compile_with(UNWIND_FLAGS, &[&src.join("dlopen_loop.c")], &out.join("dlopen_loop"), &["-ldl"])
        .unwrap_or_else(|err| panic!("{err}"));
    // unwind_chain again, compiled -fno-pie and linked -no-pie: an ET_EXEC
    // at fixed addresses.
    compile_with(
        &[UNWIND_FLAGS, &["-fno-pie", "-no-pie"]].concat(),
        &[&src.join("unwind_chain.c")],
        &out.join("unwind_nopie"),
        &[],
    )
    .unwrap_or_else(|err| panic!("{err}"));
}

/// An allocator fixture: (source, output, compiler (None: gcc/g++), extra
/// flags, the package it needs).
type AllocatorFixture =
    (&'static str, &'static str, Option<&'static str>, &'static [&'static str], &'static str);

/// Programs whose allocator is not glibc's shared malloc: static glibc, static
/// musl, and programs linked against jemalloc, tcmalloc and mimalloc.
fn build_allocator_fixtures(src: &Path, out: &Path) {
    let fixtures: &[AllocatorFixture] = &[
        ("static_glibc.c", "static_glibc", None, &["-static"], "libc6-dev (static libc.a)"),
        ("static_musl.c", "static_musl", Some("musl-gcc"), &["-static"], "musl-tools"),
        ("jemalloc_new.cpp", "jemalloc_new", None, &["-ljemalloc"], "libjemalloc-dev"),
        ("tcmalloc_leak.c", "tcmalloc_leak", None, &["-ltcmalloc"], "libgoogle-perftools-dev"),
        ("mimalloc_leak.c", "mimalloc_leak", None, &["-lmimalloc"], "libmimalloc-dev"),
        (
            "tcmalloc_sized_delete.cpp",
            "tcmalloc_sized_delete",
            None,
            &["-O2", "-fsized-deallocation", "-ltcmalloc"],
            "libgoogle-perftools-dev",
        ),
    ];
    for &(source, name, compiler, extra, package) in fixtures {
        let output = out.join(name);
        let result = try_compile(compiler, &src.join(source), &output, extra);
        optional(&output, package, result);
    }
}

/// Stripped programs whose symbols must come from elsewhere: separate debug
/// files found by .gnu_debuglink or by build ID, .dynsym only, or nothing.
fn build_debug_info_fixtures(src: &Path, out: &Path, debug_dir: &Path) {
    let pie: &[&str] = &["-pie", "-fPIE"];

    // Debug info in debuglink_leak.debug next to the binary, named by
    // .gnu_debuglink (the way distributions ship -dbg packages).
    let binary = out.join("debuglink_leak");
    compile(&src.join("debuglink_leak.c"), &binary, pie);
    let debug = out.join("debuglink_leak.debug");
    run(Command::new("objcopy").arg("--only-keep-debug").arg(&binary).arg(&debug));
    run(Command::new("strip").arg("--strip-all").arg(&binary));
    // objcopy resolves the debuglink name relative to its working directory
    // and stores only the file name (plus the file's CRC).
    run(Command::new("objcopy")
        .current_dir(out)
        .arg("--add-gnu-debuglink=debuglink_leak.debug")
        .arg(&binary));

    // Debug info only under DEBUG_DIR/.build-id/xx/rest.debug; no debuglink,
    // so only a lookup by build ID (with --debug-dir) finds it.
    let binary = out.join("buildid_leak");
    let mut flags = pie.to_vec();
    flags.push("-Wl,--build-id=sha1");
    compile(&src.join("buildid_leak.c"), &binary, &flags);
    let build_id = build_id(&binary);
    let debug =
        debug_dir.join(".build-id").join(&build_id[..2]).join(format!("{}.debug", &build_id[2..]));
    fs::create_dir_all(debug.parent().unwrap()).unwrap();
    run(Command::new("objcopy").arg("--only-keep-debug").arg(&binary).arg(&debug));
    run(Command::new("strip").arg("--strip-all").arg(&binary));

    // No symbols at all: frames can only be given as module + offset.
    let binary = out.join("nosyms_leak");
    compile(&src.join("nosyms_leak.c"), &binary, pie);
    run(Command::new("strip").arg("--strip-all").arg(&binary));

    // steady_leak with its .debug_info replaced by 256 KiB of noise: its
    // symbol table is intact.
    let binary = out.join("corrupt_dwarf");
    compile(&src.join("steady_leak.c"), &binary, pie);
    let noise = out.join("noise.bin");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..256 << 10)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    fs::write(&noise, bytes).unwrap();
    run(Command::new("objcopy")
        .arg(format!("--update-section=.debug_info={}", noise.display()))
        .arg(&binary));

    // -rdynamic puts every global function in .dynsym, which strip keeps.
    let binary = out.join("dynsym_leak");
    let mut flags = pie.to_vec();
    flags.push("-rdynamic");
    compile(&src.join("dynsym_leak.c"), &binary, &flags);
    run(Command::new("strip").arg("--strip-all").arg(&binary));
}

/// The hex build ID of an ELF file, from `readelf -n`.
fn build_id(binary: &Path) -> String {
    let notes = run(Command::new("readelf").arg("-n").arg(binary));
    notes
        .lines()
        .find_map(|line| line.trim().strip_prefix("Build ID: "))
        .map(|id| id.trim().to_owned())
        .filter(|id| id.len() > 2)
        .unwrap_or_else(|| panic!("no build ID in {}:\n{notes}", binary.display()))
}

/// Rust programs: one with the system allocator, built by rustc with legacy
/// and with v0 symbol mangling, and a cargo project whose global allocator is
/// the mimalloc crate.
fn build_rust_fixtures(src: &Path, out: &Path) {
    // Cargo tells build scripts which rustc it uses.
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    // Legacy mangling (_ZN...17h<hash>E) is the default, and stable rustc
    // only accepts -C symbol-mangling-version=v0 (legacy needs -Z).
    // Churn beside a leak: every free is seen at __rust_dealloc and free.
    let mut command = Command::new(&rustc);
    command
        .args(["-g", "-C", "opt-level=1", "-C", "force-frame-pointers=yes"])
        .arg("-o")
        .arg(out.join("rust_churn"))
        .arg(src.join("rust_churn.rs"));
    run(&mut command);

    for (name, mangling) in
        [("rust_system", &[][..]), ("rust_system_v0", &["-C", "symbol-mangling-version=v0"][..])]
    {
        let mut command = Command::new(&rustc);
        command
            .args(["-g", "-C", "opt-level=0", "-C", "force-frame-pointers=yes"])
            .args(mangling)
            .arg("-o")
            .arg(out.join(name))
            .arg(src.join("rust_system.rs"));
        run(&mut command);
    }

    // Optimized, without frame pointers: only .eh_frame walks its stacks.
    let mut command = Command::new(&rustc);
    command
        .args(["-g", "-C", "opt-level=2", "-C", "force-frame-pointers=no"])
        .arg("-o")
        .arg(out.join("rust_unwind"))
        .arg(src.join("rust_unwind.rs"));
    run(&mut command);

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("rust_global");
    let mut command = Command::new(&cargo);
    command
        .args(["build", "--release", "--locked", "--manifest-path"])
        .arg(src.join("rust_global/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Cargo hands this build script the outer build's flags and target
        // settings; the nested build must use its own.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", "-C force-frame-pointers=yes -g");
    let output = out.join("rust_global");
    let result = try_run(&mut command).and_then(|_| {
        fs::copy(target_dir.join("release/rust_global"), &output)
            .map(drop)
            .map_err(|err| format!("failed to copy rust_global: {err}"))
    });
    optional(&output, "the mimalloc crate from crates.io (network access for cargo)", result);
}

/// Records the outcome of building an optional fixture: on failure, writes
/// OUTPUT.missing with the package to install and the compiler's complaint.
fn optional(output: &Path, package: &str, result: Result<(), String>) {
    let marker = output.with_extension("missing");
    let _ = fs::remove_file(&marker);
    if let Err(err) = result {
        let _ = fs::remove_file(output);
        println!(
            "cargo:warning={} not built (install {package}): {}",
            output.display(),
            err.lines().next().unwrap_or("")
        );
        fs::write(&marker, format!("install {package} (`cargo xtask setup`):\n{err}")).unwrap();
    }
}

/// Runs a tool to completion, panicking with its stderr if it fails, and
/// returns its stdout.
fn run(command: &mut Command) -> String {
    try_run(command).unwrap_or_else(|err| panic!("{err}"))
}

/// Like [`run`], returning what went wrong instead of panicking.
fn try_run(command: &mut Command) -> Result<String, String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let result = command.output().map_err(|err| format!("failed to run {program}: {err}"))?;
    if !result.status.success() {
        return Err(format!(
            "{program} failed ({}): {command:?}\n{}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&result.stdout).into_owned())
}

/// Compiles one source file with gcc (C) or g++ (C++); `extra` goes after the
/// source so that libraries given with -l resolve.
fn compile(source: &Path, output: &Path, extra: &[&str]) {
    if let Err(err) = try_compile(None, source, output, extra) {
        panic!("{err}");
    }
}

/// Like [`compile`] with an optional compiler in place of gcc/g++ (e.g.
/// musl-gcc), returning what went wrong instead of panicking.
fn try_compile(
    compiler: Option<&str>,
    source: &Path,
    output: &Path,
    extra: &[&str],
) -> Result<(), String> {
    compile_by(compiler, COMMON_FLAGS, &[source], output, extra)
}

/// Compiles and links `inputs` (or, with "-c" in `extra`, compiles one into
/// an object) with `flags` in place of COMMON_FLAGS, with gcc, or g++ if the
/// first input is C++.
fn compile_with(
    flags: &[&str],
    inputs: &[&Path],
    output: &Path,
    extra: &[&str],
) -> Result<(), String> {
    compile_by(None, flags, inputs, output, extra)
}

/// Runs `compiler` (None: gcc, or g++ if the first input is C++) with
/// `flags`, the fixtures directory as an include path, `inputs` (sources and
/// objects) and then `extra`.
fn compile_by(
    compiler: Option<&str>,
    flags: &[&str],
    inputs: &[&Path],
    output: &Path,
    extra: &[&str],
) -> Result<(), String> {
    let source = inputs[0];
    let cpp = source.extension().is_some_and(|ext| ext == "cpp");
    let compiler = match compiler {
        Some(compiler) => compiler.to_owned(),
        None if cpp => env::var("CXX").unwrap_or_else(|_| "g++".into()),
        None => env::var("CC").unwrap_or_else(|_| "gcc".into()),
    };
    let result = Command::new(&compiler)
        .args(flags)
        .arg("-I")
        .arg(source.parent().unwrap())
        .arg("-o")
        .arg(output)
        .args(inputs)
        .args(extra)
        .output()
        .map_err(|err| format!("failed to run {compiler}: {err}"))?;
    if !result.status.success() {
        return Err(format!(
            "{compiler} failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    for line in String::from_utf8_lossy(&result.stderr).lines() {
        println!("cargo:warning={}: {line}", source.display());
    }
    Ok(())
}
