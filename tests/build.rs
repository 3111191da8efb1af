//! Compiles the C/C++ fixture programs into OUT_DIR/fixtures with debug info and
//! frame pointers, and exposes that directory to the tests as FIXTURE_DIR.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Flags every fixture shares: -O0 keeps each named function a real frame, and
/// frame pointers let the tracer's stack walk reach the leaking call site.
const COMMON_FLAGS: &[&str] = &["-g", "-O0", "-fno-omit-frame-pointer", "-pthread", "-Wall", "-Wextra"];

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
    ("cache_plateau.c", "cache_plateau"),
    ("arena_retention.c", "arena_retention"),
    ("steady_leak.c", "steady_leak"),
    ("stable.c", "stable"),
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
    compile(
        &src.join("leaky_lib.c"),
        &out.join("libleaky.so"),
        &["-shared", "-fPIC"],
    );
    compile(
        &src.join("uses_lib.c"),
        &out.join("uses_lib"),
        &[
            "-L",
            out.to_str().unwrap(),
            "-lleaky",
            "-Wl,-rpath,$ORIGIN",
        ],
    );

    println!("cargo:rustc-env=FIXTURE_DIR={}", out.display());
}

/// Compiles one source file with gcc (C) or g++ (C++); `extra` goes after the
/// source so that libraries given with -l resolve.
fn compile(source: &Path, output: &Path, extra: &[&str]) {
    let cpp = source.extension().is_some_and(|ext| ext == "cpp");
    let compiler = if cpp {
        env::var("CXX").unwrap_or_else(|_| "g++".into())
    } else {
        env::var("CC").unwrap_or_else(|_| "gcc".into())
    };
    let result = Command::new(&compiler)
        .args(COMMON_FLAGS)
        .arg("-I")
        .arg(source.parent().unwrap())
        .arg("-o")
        .arg(output)
        .arg(source)
        .args(extra)
        .output()
        .unwrap_or_else(|err| panic!("failed to run {compiler}: {err}"));
    if !result.status.success() {
        panic!(
            "{compiler} failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    for line in String::from_utf8_lossy(&result.stderr).lines() {
        println!("cargo:warning={}: {line}", source.display());
    }
}
