//! What leaktrace probes: each allocator function with the programs that
//! trace it, grouped by the API they belong to, and which symbol names of
//! an object are kept for probing.

/// One allocator function and the programs that trace it.
pub struct ProbeSpec {
    pub symbol: &'static str,
    pub enter: &'static str,
    /// The return probe, for functions whose result is recorded.
    pub exit: Option<&'static str>,
}

const fn probe(symbol: &'static str, enter: &'static str, exit: Option<&'static str>) -> ProbeSpec {
    ProbeSpec { symbol, enter, exit }
}

/// How many leading argument registers an entry program reads (all six
/// for one not listed): where its probe may go depends on it.
pub fn arguments_read(program: &str) -> usize {
    match program {
        "alloc_enter_malloc" | "thread_enter_pthread_join" | "thread_enter_pthread_detach" => 1,
        "alloc_enter_calloc" | "alloc_enter_memalign" | "alloc_enter_realloc" => 2,
        "thread_enter_pthread_create" => 2,
        "alloc_enter_reallocarray" | "alloc_enter_posix_memalign" | "mmap_enter_mremap" => 3,
        "alloc_enter_rust_realloc" | "mmap_enter_mmap" => 4,
        _ => 6,
    }
}

/// Whether `program` runs only where memory is allocated, never where it
/// is freed: `-s N` attaches these for one sampling window in N (see
/// [`super::Links`]); the rest stay on, so that every free of a tracked
/// block is seen (realloc frees too). The kernel side names the same set
/// by the calls these programs record (`CallKind::windowed`).
pub fn allocates_only(program: &str) -> bool {
    matches!(
        program,
        "alloc_enter_malloc"
            | "alloc_enter_calloc"
            | "alloc_enter_memalign"
            | "alloc_enter_posix_memalign"
            | "alloc_exit_malloc"
            | "alloc_exit_posix_memalign"
            | "mmap_enter_mmap"
            | "mmap_exit_mmap"
    )
}

/// The C allocator API. Programs are shared by functions of one prototype.
pub const ALLOCATOR_PROBES: &[ProbeSpec] = &[
    probe("malloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("calloc", "alloc_enter_calloc", Some("alloc_exit_malloc")),
    probe("realloc", "alloc_enter_realloc", Some("alloc_exit_realloc")),
    probe("reallocarray", "alloc_enter_reallocarray", Some("alloc_exit_realloc")),
    probe("posix_memalign", "alloc_enter_posix_memalign", Some("alloc_exit_posix_memalign")),
    probe("aligned_alloc", "alloc_enter_memalign", Some("alloc_exit_malloc")),
    probe("memalign", "alloc_enter_memalign", Some("alloc_exit_malloc")),
    probe("valloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("pvalloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("free", "alloc_enter_free", None),
    probe("mmap", "mmap_enter_mmap", Some("mmap_exit_mmap")),
    probe("munmap", "mmap_enter_munmap", None),
    probe("mremap", "mmap_enter_mremap", Some("mmap_exit_mremap")),
    // jemalloc's non-standard API.
    probe("mallocx", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("rallocx", "alloc_enter_realloc", Some("alloc_exit_realloc")),
    probe("dallocx", "alloc_enter_free", None),
    probe("sdallocx", "alloc_enter_free", None),
];

/// mimalloc's own API, which Rust's mimalloc crate calls directly (its
/// GlobalAlloc is inlined into the program, past `__rust_alloc`).
pub const MIMALLOC_PROBES: &[ProbeSpec] = &[
    probe("mi_malloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("mi_zalloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("mi_calloc", "alloc_enter_calloc", Some("alloc_exit_malloc")),
    probe("mi_malloc_aligned", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("mi_zalloc_aligned", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("mi_realloc", "alloc_enter_realloc", Some("alloc_exit_realloc")),
    probe("mi_realloc_aligned", "alloc_enter_realloc", Some("alloc_exit_realloc")),
    probe("mi_free", "alloc_enter_free", None),
];

/// operator delete of allocators whose delete does not call free
/// (jemalloc, tcmalloc, mimalloc). libstdc++'s calls free: not probed.
pub const CXX_DELETE_PROBES: &[ProbeSpec] = &[
    probe("_ZdlPv", "alloc_enter_free", None),
    probe("_ZdlPvm", "alloc_enter_free", None),
    probe("_ZdaPv", "alloc_enter_free", None),
    probe("_ZdaPvm", "alloc_enter_free", None),
    probe("_ZdlPvRKSt9nothrow_t", "alloc_enter_free", None),
    probe("_ZdaPvRKSt9nothrow_t", "alloc_enter_free", None),
    probe("_ZdlPvSt11align_val_t", "alloc_enter_free", None),
    probe("_ZdlPvmSt11align_val_t", "alloc_enter_free", None),
    probe("_ZdaPvSt11align_val_t", "alloc_enter_free", None),
    probe("_ZdaPvmSt11align_val_t", "alloc_enter_free", None),
];

/// Rust's allocator shims, which every Box, Vec and String goes through,
/// whatever the #[global_allocator]. Rust's standard library has no frame
/// pointers, so a stack taken in malloc can lose the allocating function.
/// rustc 1.95 mangles them (`..._7___rustc12___rust_alloc`).
pub const RUST_PROBES: &[ProbeSpec] = &[
    probe("__rust_alloc", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("__rust_alloc_zeroed", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("__rust_realloc", "alloc_enter_rust_realloc", Some("alloc_exit_realloc")),
    probe("__rust_dealloc", "alloc_enter_free", None),
];

/// C++ operator new in all its forms (the size is always the first
/// argument). libstdc++ builds them without frame pointers, so a stack taken
/// in malloc loses the caller of new; their own return probe sees it, and
/// the malloc they call is a nested call, not counted twice. operator
/// delete needs no probe: it calls free.
pub const CXX_NEW_PROBES: &[ProbeSpec] = &[
    probe("_Znwm", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_Znam", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnwmRKSt9nothrow_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnamRKSt9nothrow_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnwmSt11align_val_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnamSt11align_val_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnwmSt11align_val_tRKSt9nothrow_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
    probe("_ZnamSt11align_val_tRKSt9nothrow_t", "alloc_enter_malloc", Some("alloc_exit_malloc")),
];

/// The pthread API, in the C library (or libpthread before glibc 2.34).
pub const THREAD_PROBES: &[ProbeSpec] = &[
    probe("pthread_attr_setdetachstate", "thread_enter_pthread_attr_setdetachstate", None),
    probe("pthread_create", "thread_enter_pthread_create", Some("thread_exit_pthread_create")),
    probe("pthread_join", "thread_enter_pthread_join", Some("thread_exit_pthread_join")),
    probe("pthread_tryjoin_np", "thread_enter_pthread_join", Some("thread_exit_pthread_join")),
    probe("pthread_timedjoin_np", "thread_enter_pthread_join", Some("thread_exit_pthread_join")),
    probe("pthread_clockjoin_np", "thread_enter_pthread_join", Some("thread_exit_pthread_join")),
    probe("pthread_detach", "thread_enter_pthread_detach", Some("thread_exit_pthread_detach")),
];

/// The dynamic linker's hook for debuggers, called after every change to
/// the loaded objects: the unwind tables of a dlopen()ed library are loaded
/// at once instead of at the next poll of /proc/PID/maps.
pub const LINKER_PROBES: &[ProbeSpec] =
    &[probe("_dl_debug_state", "linker_enter_dl_debug_state", None)];

pub const ALL_SETS: [&[ProbeSpec]; 7] = [
    ALLOCATOR_PROBES,
    MIMALLOC_PROBES,
    CXX_NEW_PROBES,
    CXX_DELETE_PROBES,
    RUST_PROBES,
    THREAD_PROBES,
    LINKER_PROBES,
];

/// Prefixes allocators are built with: jemalloc's `je_`, and `_rjem_` of
/// the jemalloc that Rust's tikv-jemallocator links in.
pub const KNOWN_PREFIXES: [&str; 2] = ["je_", "_rjem_"];

/// The key under which a symbol is kept, if leaktrace may probe it.
pub fn wanted(name: &str, user_prefix: &str) -> Option<String> {
    let known =
        |name: &str| ALL_SETS.iter().flat_map(|set| set.iter()).any(|spec| spec.symbol == name);
    if known(name) {
        return Some(name.to_string());
    }
    for spec in RUST_PROBES {
        // v0 mangling ends with the length-prefixed identifier; one that
        // starts with `_` gets a `_` separator.
        if name.ends_with(&format!("{}_{}", spec.symbol.len(), spec.symbol)) {
            return Some(spec.symbol.to_string());
        }
    }
    for prefix in std::iter::once(user_prefix).chain(KNOWN_PREFIXES) {
        if prefix.is_empty() {
            continue;
        }
        if let Some(rest) = name.strip_prefix(prefix) {
            if ALLOCATOR_PROBES.iter().any(|spec| spec.symbol == rest) {
                return Some(name.to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check which symbol names are kept: probed names, Rust's mangled
    /// shims under their plain name, and prefixed allocator functions.
    #[test]
    fn wanted_names() {
        assert_eq!(wanted("malloc", ""), Some("malloc".into()));
        assert_eq!(wanted("_Znwm", ""), Some("_Znwm".into()));
        assert_eq!(
            wanted("_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc", ""),
            Some("__rust_alloc".into())
        );
        assert_eq!(
            wanted("_RNvCsfLfy6EI15iL_7___rustc14___rust_dealloc", ""),
            Some("__rust_dealloc".into())
        );
        assert_eq!(wanted("je_malloc", ""), Some("je_malloc".into()));
        assert_eq!(wanted("my_free", "my_"), Some("my_free".into()));
        assert_eq!(wanted("my_strlen", "my_"), None);
        assert_eq!(wanted("strlen", ""), None);
    }
}
