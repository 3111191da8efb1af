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

use crate::collect::monotonic_ns;

/// The thread keeping `EPOCH`; stopped when dropped.
pub struct EpochClock {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EpochClock {
    /// Write the epoch now, and start the thread that moves it on. Takes
    /// the map out of `ebpf`: nothing else writes it. `epoch_ns` 0 (no
    /// ages kept) needs no clock.
    pub fn start(ebpf: &mut Ebpf, epoch_ns: u64) -> anyhow::Result<Self> {
        if epoch_ns == 0 {
            return Ok(Self { stop: None, thread: None });
        }
        let map = ebpf.take_map(MAP_EPOCH).ok_or_else(|| anyhow!("map {MAP_EPOCH} missing"))?;
        let mut epoch: Array<MapData, u32> = Array::try_from(map).context("map EPOCH")?;
        let now = monotonic_ns();
        epoch.set(0, (now / epoch_ns) as u32, 0).context("failed to set the age epoch")?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("epochs".into())
            .spawn(move || loop {
                let now = monotonic_ns();
                let next = now / epoch_ns + 1;
                let wait = Duration::from_nanos(next * epoch_ns - now);
                match stopped.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                // The wait may end a little early: the epoch is the clock's.
                if let Err(err) = epoch.set(0, (monotonic_ns() / epoch_ns) as u32, 0) {
                    log::warn!("failed to move the age epoch on: {err}");
                }
            })
            .context("failed to start the epoch thread")?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for EpochClock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
