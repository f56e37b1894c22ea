//! A lock-free latency histogram: per-connection p50/p99 for the admin service, and the
//! histograms on `/metrics`.
//!
//! Hand-written rather than `hdrhistogram`: the reader task records every answer, and
//! `hdrhistogram::Histogram::record` needs `&mut self`, i.e. a lock on that path. Buckets are
//! log-linear (8 per power of two of microseconds), so a percentile is reported as its bucket's
//! upper bound, at most 12.5% above the true value.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Covers up to 2^40 µs (about 12.7 days); larger values land in the last bucket.
const BUCKETS: usize = (40 - SUB_BITS as usize + 1) * SUB + SUB;

/// Prometheus `le` bounds are bucket upper bounds of the form 2^k - 1 µs, for k in this range
/// (127 µs .. about 16.8 s): each is exactly the upper bound of one fine bucket, so the coarse
/// cumulative counts are exact, not interpolated.
const PROMETHEUS_POWERS: std::ops::RangeInclusive<u32> = 7..=24;

/// Counts of durations in log-linear buckets.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    /// Sum of recorded durations, in microseconds (Prometheus' `_sum`).
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }
}

fn index(micros: u64) -> usize {
    if micros < SUB as u64 {
        return micros as usize;
    }
    let exp = 63 - micros.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = ((micros >> shift) as usize) & (SUB - 1);
    ((shift as usize + 1) * SUB + sub).min(BUCKETS - 1)
}

/// Largest value (µs) that falls into bucket `i`.
fn upper(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let shift = (i / SUB - 1) as u32;
    let sub = (i % SUB) as u64;
    (((SUB as u64 + sub) + 1) << shift) - 1
}

impl Histogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[index(micros)].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Sum of the recorded durations.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_micros.load(Ordering::Relaxed))
    }

    /// Adds every count and the sum of `other` into `self` (to merge per-connection
    /// histograms into one per broker).
    pub fn add(&self, other: &Histogram) {
        for (a, b) in self.buckets.iter().zip(other.buckets.iter()) {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(other.sum_micros.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Coarse buckets for Prometheus: `(upper bound in seconds, count in the bucket)`, not
    /// cumulative, the last bound `+Inf`. See [`PROMETHEUS_POWERS`].
    pub fn prometheus_buckets(&self) -> Vec<(f64, u64)> {
        let mut out: Vec<(f64, u64)> = PROMETHEUS_POWERS
            .map(|k| (((1u64 << k) - 1) as f64 / 1e6, 0))
            .collect();
        out.push((f64::INFINITY, 0));
        let mut coarse = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            let up = upper(i) as f64 / 1e6;
            while coarse < out.len() - 1 && up > out[coarse].0 {
                coarse += 1;
            }
            out[coarse].1 += n;
        }
        out
    }

    /// Number of recorded durations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q`-quantile (0.0..=1.0), or zero when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_micros(upper(i));
            }
        }
        Duration::from_micros(upper(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values_within_an_eighth() {
        for v in [0u64, 1, 7, 8, 9, 15, 16, 100, 1_000, 50_000, 123_456_789] {
            let i = index(v);
            assert!(upper(i) >= v, "{v}");
            assert!(
                upper(i) as f64 <= (v as f64) * 1.125 + 1.0,
                "{v} -> {}",
                upper(i)
            );
            if i > 0 {
                assert!(upper(i - 1) < v, "{v}");
            }
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn prometheus_buckets_are_exact_at_their_bounds() {
        for k in PROMETHEUS_POWERS {
            // A power-of-two-minus-one bound is the last value of a fine bucket.
            let b = (1u64 << k) - 1;
            assert_eq!(upper(index(b)), b, "2^{k}-1");
            assert_eq!(index(b + 1), index(b) + 1, "2^{k}");
        }
        let h = Histogram::default();
        for micros in [0u64, 127, 128, 1_000, 1_023, 1_024, 20_000_000] {
            h.record(Duration::from_micros(micros));
        }
        let b = h.prometheus_buckets();
        assert_eq!(b[0], (0.000127, 2), "0 and 127 µs are <= 127 µs");
        assert_eq!(b[1], (0.000255, 1), "128 µs");
        assert_eq!(b[3].1, 2, "1000 and 1023 µs are <= 1023 µs");
        assert_eq!(b[4].1, 1, "1024 µs");
        assert_eq!(*b.last().unwrap(), (f64::INFINITY, 1), "20 s");
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 7);
        assert_eq!(h.sum(), Duration::from_micros(20_003_302));
        let merged = Histogram::default();
        merged.add(&h);
        merged.add(&h);
        assert_eq!(merged.count(), 14);
        assert_eq!(merged.sum(), h.sum() * 2);
    }

    #[test]
    fn quantiles_follow_the_recorded_values() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), Duration::ZERO);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 100);
        let p50 = h.quantile(0.5).as_micros() as f64;
        let p99 = h.quantile(0.99).as_micros() as f64;
        assert!((50_000.0..=56_250.0).contains(&p50), "{p50}");
        assert!((99_000.0..=111_375.0).contains(&p99), "{p99}");
    }
}
