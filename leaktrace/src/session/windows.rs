//! `-s N` by time: the allocating functions' probes attached for one
//! window in N ([`crate::attach::Links::open_window`]). A period is a
//! second, or longer when N is large, so that a window lasts at least 10
//! ms. Attaching a window's probes takes 5-9 ms here (glibc's 8 links; the
//! kernel walks every mapping of the file for each): with 10 ms windows
//! every 100 ms, the windows' edges were half of each window and the rates
//! came out twice too high (measured), so windows are long and the attach
//! time is taken out of the time between them.
//!
//! Each window starts at a random place in its period: at a fixed place, a
//! target that allocates on a timer of about the period (a leak every 100
//! ms) fell between the windows for seconds at a time, and its leak looked
//! flat (seen here).

use std::time::{Duration, Instant};

use aya::Ebpf;

use crate::attach::Links;

const PERIOD: Duration = Duration::from_secs(1);
const SHORTEST_WINDOW: Duration = Duration::from_millis(10);

pub struct Windows {
    on: Duration,
    period: Duration,
    /// When the current period began.
    began: Instant,
    /// When the current window opened.
    opened: Instant,
    next: Instant,
    /// xorshift64 state, for each window's place in its period.
    random: u64,
}

impl Windows {
    /// Windows of one period in `rate`, the first open now (the probes
    /// went in open).
    pub fn new(rate: u64) -> Self {
        let rate = u32::try_from(rate.max(1)).unwrap_or(u32::MAX);
        let period = PERIOD.max(SHORTEST_WINDOW.saturating_mul(rate));
        let on = period / rate;
        let now = Instant::now();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |since| since.as_nanos() as u64);
        Self { on, period, began: now, opened: now, next: now + on, random: seed | 1 }
    }

    /// A random time in `0..max`.
    fn random_below(&mut self, max: Duration) -> Duration {
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        let max = max.as_nanos() as u64;
        Duration::from_nanos(if max == 0 { 0 } else { self.random % max })
    }

    /// When the window opens or closes next.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// Open the window if it is closed, close it if it is open (`links`
    /// know which).
    pub fn toggle(&mut self, links: &mut Links, ebpf: &mut Ebpf) {
        let now = Instant::now();
        if links.window_open() {
            links.close_window(ebpf);
            log::debug!("sampling window closed after {:?}", now - self.opened);
            // Behind (a long report): the next period starts from now.
            self.began = (self.began + self.period).max(now);
            self.next = self.began + self.random_below(self.period - self.on);
        } else {
            self.opened = now;
            links.open_window(ebpf);
            // The entry probes go in last: the window counts from halfway
            // through the attach (5-9 ms for glibc's 8 links here).
            let attach = now.elapsed();
            self.next = now + attach / 2 + self.on;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check the window lengths: 100 ms of a second for -s 10 and -s 2's
    /// half, stretched periods for large N, and -s 1's window the whole
    /// period.
    #[test]
    fn window_lengths() {
        let ms = Duration::from_millis;
        let lengths = |rate| {
            let windows = Windows::new(rate);
            (windows.on, windows.period)
        };
        assert_eq!(lengths(10), (ms(100), ms(1000)));
        assert_eq!(lengths(2), (ms(500), ms(1000)));
        assert_eq!(lengths(1000), (ms(10), ms(10_000)));
        assert_eq!(lengths(1), (PERIOD, PERIOD));
    }

    /// Check that windows start anywhere in their period, never so late
    /// that they would run into the next one.
    #[test]
    fn window_places_spread() {
        let mut windows = Windows::new(10);
        let room = windows.period - windows.on;
        let places: Vec<Duration> = (0..1000).map(|_| windows.random_below(room)).collect();
        assert!(places.iter().all(|place| *place < room));
        let early = places.iter().filter(|place| **place < room / 2).count();
        assert!((400..600).contains(&early), "{early} of 1000 in the first half");
    }
}
