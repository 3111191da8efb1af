//! Builds the kernel programs (leaktrace-ebpf) for the BPF target with the
//! nightly toolchain, so that `cargo build` of the CLI is all it takes.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root above {manifest_dir}"))?
        .join("leaktrace-ebpf");
    let root_dir = root_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {root_dir:?}"))?;
    aya_build::build_ebpf(
        [Package { name: "leaktrace-ebpf", root_dir, ..Default::default() }],
        Toolchain::default(),
    )
}
