//! Outstanding memory per call site across intervals: its recent rate and
//! its trend, growing (a leak), plateau (a cache or pool that reached its
//! size), flat, or shrinking.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
};

use leaktrace_report::{Growth, Trend};

/// Samples (3 intervals) that decide the recent rate and trend: a cache that
/// has been flat this long is no longer called a leak.
const WINDOW: usize = 4;
/// Samples kept per key.
const KEEP: usize = 32;

/// Values per key over time. A key missing from a sample counts as 0 there.
pub struct History<K> {
    samples: HashMap<K, VecDeque<(f64, f64)>>,
    /// Changes smaller than this (or 2% of the value) are noise.
    min_tolerance: f64,
}

impl<K: Hash + Eq + Copy> History<K> {
    pub fn new(min_tolerance: f64) -> Self {
        Self { samples: HashMap::new(), min_tolerance }
    }

    /// Add the values seen at time `t` (seconds).
    pub fn record(&mut self, t: f64, values: impl IntoIterator<Item = (K, f64)>) {
        let mut seen: HashMap<K, f64> = values.into_iter().collect();
        // Keys gone from this sample and zero all along are forgotten.
        self.samples.retain(|key, samples| {
            seen.contains_key(key) || samples.iter().any(|&(_, v)| v != 0.0)
        });
        for (key, samples) in &mut self.samples {
            samples.push_back((t, seen.remove(key).unwrap_or(0.0)));
            if samples.len() > KEEP {
                samples.pop_front();
            }
        }
        for (key, value) in seen {
            self.samples.insert(key, VecDeque::from([(t, value)]));
        }
    }

    /// The change of `key` from the sample before its last to its last.
    pub fn last_step(&self, key: K) -> Option<f64> {
        let samples = self.samples.get(&key)?;
        let last = samples.back()?.1;
        let before = samples.get(samples.len().checked_sub(2)?)?.1;
        Some(last - before)
    }

    /// The growth of `key`, or `None` if it was never seen.
    pub fn growth(&self, key: K) -> Option<Growth> {
        let samples: Vec<(f64, f64)> = self.samples.get(&key)?.iter().copied().collect();
        Some(classify(&samples, self.min_tolerance))
    }
}

/// Flat means every sample of the window within the tolerance of the others;
/// a plateau is flat after being lower; growing is a net rise over the window.
fn classify(samples: &[(f64, f64)], min_tolerance: f64) -> Growth {
    let recent = &samples[samples.len().saturating_sub(WINDOW)..];
    let bytes_per_second = slope(recent);
    if samples.len() < 3 {
        return Growth { bytes_per_second, trend: Trend::New };
    }
    let peak = recent.iter().map(|&(_, v)| v).fold(f64::MIN, f64::max);
    let low = recent.iter().map(|&(_, v)| v).fold(f64::MAX, f64::min);
    let tolerance = min_tolerance.max(0.02 * peak);
    let first = recent[0].1;
    let last = recent[recent.len() - 1].1;
    let trend = if peak - low <= tolerance {
        let earlier = &samples[..samples.len() - recent.len()];
        if earlier.iter().any(|&(_, v)| last - v > tolerance) {
            Trend::Plateau
        } else {
            Trend::Flat
        }
    } else if last - first > tolerance && steady(recent, tolerance, 1.0) {
        Trend::Growing
    } else if first - last > tolerance && steady(recent, tolerance, -1.0) {
        Trend::Shrinking
    } else if last - first > tolerance && settled(recent, tolerance) {
        // Rose early in the window, flat since.
        Trend::Plateau
    } else {
        Trend::Flat
    };
    Growth { bytes_per_second, trend }
}

/// Whether the window moves one way (`direction` 1 up, -1 down): no step
/// back by more than half the tolerance, and most steps clearly forward.
/// A stable value that wobbles (allocations in flight come and go) is not
/// a leak because its last sample happens to sit high.
fn steady(recent: &[(f64, f64)], tolerance: f64, direction: f64) -> bool {
    let steps: Vec<f64> = recent.windows(2).map(|w| direction * (w[1].1 - w[0].1)).collect();
    let forward = steps.iter().filter(|&&step| step > tolerance / 4.0).count();
    steps.iter().all(|&step| step >= -tolerance / 2.0) && 2 * forward >= steps.len()
}

/// Whether the last two steps of the window are flat.
fn settled(recent: &[(f64, f64)], tolerance: f64) -> bool {
    let steps: Vec<f64> = recent.windows(2).map(|w| w[1].1 - w[0].1).collect();
    steps.len() >= 2 && steps[steps.len() - 2..].iter().all(|step| step.abs() <= tolerance / 2.0)
}

/// Least-squares slope of value over time.
fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_v = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, v) in samples {
        num += (t - mean_t) * (v - mean_v);
        den += (t - mean_t) * (t - mean_t);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(values: &[f64]) -> Growth {
        let mut history = History::new(256.0);
        for (i, &v) in values.iter().enumerate() {
            history.record(i as f64, [(1u32, v)]);
        }
        history.growth(1).unwrap()
    }

    /// Check that a steady leak is growing at its true rate.
    #[test]
    fn steady_leak_grows() {
        let growth = history(&[10240.0, 20480.0, 30720.0, 40960.0, 51200.0]);
        assert_eq!(growth.trend, Trend::Growing);
        assert!((growth.bytes_per_second - 10240.0).abs() < 1.0, "{growth:?}");
    }

    /// Check that a cache that filled and stopped is a plateau, not a leak.
    #[test]
    fn filled_cache_is_plateau() {
        let growth = history(&[300_000.0, 1_048_576.0, 1_048_576.0, 1_048_576.0, 1_048_576.0]);
        assert_eq!(growth.trend, Trend::Plateau);
    }

    /// Check that a cache still filling is growing, and settling is a plateau.
    #[test]
    fn cache_filling_then_settling() {
        let growth = history(&[100_000.0, 500_000.0, 1_000_000.0, 1_000_000.0]);
        assert_eq!(growth.trend, Trend::Growing);
        let growth = history(&[300_000.0, 1_000_000.0, 1_000_000.0, 1_000_000.0]);
        assert_eq!(growth.trend, Trend::Plateau);
    }

    /// Check that a stable value wobbling around its mean is not growing.
    #[test]
    fn wobble_is_flat() {
        let growth = history(&[940_000.0, 928_000.0, 952_000.0, 929_000.0, 951_000.0]);
        assert_eq!(growth.trend, Trend::Flat);
    }

    /// Check the other trends: flat, shrinking and too early to say.
    #[test]
    fn flat_shrinking_new() {
        assert_eq!(history(&[4096.0, 4096.0, 4100.0, 4096.0]).trend, Trend::Flat);
        assert_eq!(history(&[90_000.0, 60_000.0, 30_000.0, 10_000.0]).trend, Trend::Shrinking);
        assert_eq!(history(&[1.0, 2.0]).trend, Trend::New);
    }

    /// Check that a value recorded as zero every time still has a trend.
    #[test]
    fn always_zero_is_flat() {
        assert_eq!(history(&[0.0, 0.0, 0.0, 0.0]).trend, Trend::Flat);
    }

    /// Check that a key gone from later samples counts as zero.
    #[test]
    fn vanished_key() {
        let mut history = History::new(0.5);
        history.record(0.0, [(1u32, 5.0)]);
        history.record(1.0, []);
        assert_eq!(history.growth(1).unwrap().bytes_per_second, -5.0);
        history.record(2.0, []);
        assert!(history.growth(1).is_some());
    }
}
