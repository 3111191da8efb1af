//! The age epoch the programs stamp allocations with (`EPOCH`), kept by a
//! thread of its own: CLOCK_MONOTONIC / `epoch_ns`, written as each epoch
//! begins. Reading the clock in the programs (the helper and a 64-bit
//! division) cost ~25 ns an allocation; an array lookup costs a few.
//! The collector ages allocations against the same clock
//! ([`crate::collect::monotonic_ns`]); a write a moment late only makes
//! the first allocations of an epoch look one epoch older.

use std::{
    sync::mpsc::{self, RecvTimeoutError, Sender},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, MapData},
    Ebpf,
};
use leaktrace_common::MAP_EPOCH;

use crate::collect::{epoch_now, monotonic_ns};

/// The thread keeping `EPOCH` (none when no ages are kept); stopped when
/// dropped.
pub struct EpochClock(Option<(Sender<()>, JoinHandle<()>)>);

impl EpochClock {
    /// Write the epoch now, and start the thread that moves it on. Takes
    /// the map out of `ebpf`: nothing else writes it. `epoch_ns` 0 (no
    /// ages kept) needs no clock.
    pub fn start(ebpf: &mut Ebpf, epoch_ns: u64) -> anyhow::Result<Self> {
        if epoch_ns == 0 {
            return Ok(Self(None));
        }
        let map = ebpf.take_map(MAP_EPOCH).ok_or_else(|| anyhow!("map {MAP_EPOCH} missing"))?;
        let mut epoch: Array<MapData, u32> = Array::try_from(map).context("map EPOCH")?;
        epoch.set(0, epoch_now(epoch_ns), 0).context("failed to set the age epoch")?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("epochs".into())
            .spawn(move || loop {
                let now = monotonic_ns();
                let wait = Duration::from_nanos(epoch_ns - now % epoch_ns);
                match stopped.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                // The wait may end a little early: the epoch is the clock's.
                if let Err(err) = epoch.set(0, epoch_now(epoch_ns), 0) {
                    log::warn!("failed to move the age epoch on: {err}");
                }
            })
            .context("failed to start the epoch thread")?;
        Ok(Self(Some((stop, thread))))
    }
}

impl Drop for EpochClock {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.0.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}
