//! One frame of a symbolized stack, and which frames belong to the language
//! runtime's allocation path rather than to the code that asked for memory.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One frame of a symbolized stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// The return address (the instruction after the call), as "0x...".
    #[serde(serialize_with = "hex", deserialize_with = "from_hex")]
    pub address: u64,
    pub symbol: Option<String>,
    /// Offset of the address from the symbol's start (not for inlined frames).
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    /// A call that the compiler inlined into the next frame.
    pub inlined: bool,
    /// The symbol as the object file names it, when that differs from
    /// `symbol` (a mangled C++ or Rust name): pprof's `system_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mangled: Option<String>,
}

impl Frame {
    /// The function's name, or `[module]+0xoffset`, or the bare address.
    pub fn name(&self) -> String {
        match (&self.symbol, self.module.as_deref(), self.offset) {
            (Some(symbol), _, _) => symbol.clone(),
            (None, Some(module), Some(offset)) => format!("[{}]+{offset:#x}", short_module(module)),
            (None, _, _) => format!("{:#x}", self.address),
        }
    }

    /// "function (file.c:12)": how one-line statements name a call site.
    pub fn label(&self) -> String {
        let name = self.name();
        match (&self.file, self.line) {
            (Some(file), Some(line)) => format!("{name} ({}:{line})", short_module(file)),
            _ => name,
        }
    }
}

/// The last component of a path.
pub fn short_module(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Frames of the language runtime between an allocator and the code that
/// asked for memory: Rust's alloc/core/std helpers (real frames in debug
/// builds) and C++ operator new.
const RUNTIME_PREFIXES: [&str; 8] =
    ["alloc::", "core::", "std::", "<alloc::", "<core::", "<std::", "__rust", "operator new"];

/// Libraries whose frames sit between the allocator and the code that asked
/// (strdup and asprintf in libc, operator new in libstdc++), by file name.
const RUNTIME_LIBRARIES: [&str; 8] = [
    "libc.so",
    "libstdc++.so",
    "libgcc_s.so",
    "ld-linux",
    "libc.musl",
    "libjemalloc.so",
    "libtcmalloc",
    "libmimalloc.so",
];

/// Whether a frame belongs to the language runtime's allocation path.
pub fn is_runtime_frame(frame: &Frame) -> bool {
    is_runtime_symbol(frame) || is_runtime_library(frame)
}

/// Whether a frame's symbol is a Rust or C++ runtime helper.
pub fn is_runtime_symbol(frame: &Frame) -> bool {
    frame
        .symbol
        .as_deref()
        .is_some_and(|symbol| RUNTIME_PREFIXES.iter().any(|prefix| symbol.starts_with(prefix)))
}

fn is_runtime_library(frame: &Frame) -> bool {
    frame.module.as_deref().is_some_and(|module| {
        let name = short_module(module);
        RUNTIME_LIBRARIES.iter().any(|library| name.starts_with(library))
    })
}

/// "function (file:line)" for a stack's first frame outside the language
/// runtime and the C library (its first frame if all are), for one-line
/// statements.
pub fn site_label(frames: &[Frame]) -> String {
    match frames.iter().find(|f| !is_runtime_frame(f)).or(frames.first()) {
        Some(frame) => frame.label(),
        None => "an unknown stack".to_string(),
    }
}

/// Addresses are "0x..." strings in JSON: scripts read them without 64-bit
/// integer trouble.
pub(crate) fn hex<S: Serializer>(address: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{address:#x}"))
}

pub(crate) fn from_hex<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let text = String::deserialize(deserializer)?;
    let digits = text.strip_prefix("0x").unwrap_or(&text);
    u64::from_str_radix(digits, 16)
        .map_err(|_| serde::de::Error::custom(format!("'{text}' is not a hex address")))
}
