//! Kernel frames, named from kallsyms with blazesym. When `kptr_restrict`
//! hides the addresses (every one reads as 0), the frames stay addresses
//! and the report says why.

use std::{collections::HashMap, path::PathBuf};

use anyhow::Context as _;
use blazesym::{
    symbolize::{
        source::{Kernel, Source},
        Input, Symbolized, Symbolizer as Blazesym,
    },
    MaybeDefault,
};
use leaktrace_report::Frame;

/// The module kernel frames carry.
pub const KERNEL_MODULE: &str = "[kernel]";

pub struct KernelSymbolizer {
    blazesym: Blazesym,
    kallsyms: PathBuf,
    /// kallsyms lists addresses (not all zero): frames can be named.
    pub named: bool,
    cache: HashMap<u64, Frame>,
}

impl KernelSymbolizer {
    /// Check that `kallsyms` can be read; `named` says whether its
    /// addresses are visible.
    pub fn new(kallsyms: PathBuf) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(&kallsyms)
            .with_context(|| format!("cannot read kernel symbols from {}", kallsyms.display()))?;
        anyhow::ensure!(
            text.lines().next().is_some(),
            "no kernel symbols in {}: kernel frames cannot be named",
            kallsyms.display()
        );
        let named = text.lines().take(1000).any(|line| {
            line.split_whitespace()
                .next()
                .and_then(|address| u64::from_str_radix(address, 16).ok())
                .is_some_and(|address| address != 0)
        });
        if !named {
            log::warn!(
                "{} lists every address as 0 (kernel.kptr_restrict hides them): kernel frames are shown as addresses",
                kallsyms.display()
            );
        }
        Ok(Self { blazesym: Blazesym::new(), kallsyms, named, cache: HashMap::new() })
    }

    /// The frames of kernel return addresses, innermost first.
    pub fn frames(&mut self, ips: &[u64]) -> Vec<Frame> {
        let new: Vec<u64> = ips.iter().copied().filter(|ip| !self.cache.contains_key(ip)).collect();
        if !new.is_empty() {
            let found = if self.named { self.symbolize(&new) } else { Vec::new() };
            for (index, &ip) in new.iter().enumerate() {
                let frame = found.get(index).cloned().flatten().unwrap_or_else(|| unknown(ip));
                self.cache.insert(ip, frame);
            }
        }
        ips.iter().filter_map(|ip| self.cache.get(ip).cloned()).collect()
    }

    fn symbolize(&self, ips: &[u64]) -> Vec<Option<Frame>> {
        let source = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Some(self.kallsyms.clone()),
            vmlinux: MaybeDefault::None,
            ..Kernel::default()
        });
        // One byte back, inside the call (see `call_site` of user frames).
        let calls: Vec<u64> = ips.iter().map(|ip| ip.saturating_sub(1)).collect();
        match self.blazesym.symbolize(&source, Input::AbsAddr(&calls)) {
            Ok(symbolized) => ips
                .iter()
                .zip(symbolized)
                .map(|(&ip, symbolized)| match symbolized {
                    Symbolized::Sym(sym) => Some(Frame {
                        address: ip,
                        symbol: Some(sym.name.to_string()),
                        offset: Some(sym.offset as u64 + 1),
                        file: None,
                        line: None,
                        module: Some(KERNEL_MODULE.to_string()),
                        inlined: false,
                        mangled: None,
                    }),
                    Symbolized::Unknown(_) => None,
                })
                .collect(),
            Err(err) => {
                log::debug!("kernel symbolization failed: {err:#}");
                Vec::new()
            }
        }
    }
}

fn unknown(ip: u64) -> Frame {
    Frame {
        address: ip,
        symbol: None,
        offset: None,
        file: None,
        line: None,
        module: Some(KERNEL_MODULE.to_string()),
        inlined: false,
        mangled: None,
    }
}
