//! `-s N` by time: the allocating functions' probes attached for one
//! window in N ([`crate::attach::Links::open_window`]). A period is a
//! second, or longer when N is large, so that a window lasts at least
//! 10 ms (attaching the probes takes ~0.5 ms a link).

use std::time::{Duration, Instant};

use crate::attach::Links;

const PERIOD: Duration = Duration::from_secs(1);
const SHORTEST_WINDOW: Duration = Duration::from_millis(10);

pub struct Windows {
    on: Duration,
    off: Duration,
    open: bool,
    next: Instant,
}

impl Windows {
    /// Windows of one period in `rate`, the first open now (the probes
    /// went in open).
    pub fn new(rate: u64) -> Self {
        let rate = u32::try_from(rate.max(1)).unwrap_or(u32::MAX);
        let period = PERIOD.max(SHORTEST_WINDOW.saturating_mul(rate));
        let on = period / rate;
        Self { on, off: period - on, open: true, next: Instant::now() + on }
    }

    /// When the window opens or closes next.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// Open the window if it is closed, close it if it is open.
    pub fn toggle(&mut self, links: &mut Links) {
        if self.open {
            links.close_window();
            self.next += self.off;
        } else {
            links.open_window();
            self.next += self.on;
        }
        self.open = !self.open;
        // Behind (a long report): start over from now, not in a burst.
        let now = Instant::now();
        if self.next < now {
            self.next = now + if self.open { self.on } else { self.off };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check the window lengths: a tenth of a second for -s 10, stretched
    /// periods for large N, and a window for -s 1 that never closes.
    #[test]
    fn window_lengths() {
        let ten = Windows::new(10);
        assert_eq!((ten.on, ten.off), (Duration::from_millis(100), Duration::from_millis(900)));
        let thousand = Windows::new(1000);
        assert_eq!(thousand.on, Duration::from_millis(10));
        assert_eq!(thousand.off, Duration::from_millis(9990));
        let one = Windows::new(1);
        assert_eq!((one.on, one.off), (PERIOD, Duration::ZERO));
    }
}
