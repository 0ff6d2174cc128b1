//! A compact log-linear histogram of millisecond values (exact below 128 ms, within 1/64 above).

use serde::Serialize;

const LINEAR: u64 = 128;
const SUB_BITS: u32 = 6;

/// Counts of values in log-linear buckets, with exact count, sum and maximum.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum: u128,
    max: u64,
}

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros(); // >= 7
    let shift = msb - SUB_BITS;
    let sub = (v >> shift) & ((1 << SUB_BITS) - 1);
    (LINEAR + u64::from(msb - 7) * (1 << SUB_BITS) + sub) as usize
}

/// The smallest value that falls in bucket `b` and the width of the bucket.
fn bucket_range(b: usize) -> (u64, u64) {
    let b = b as u64;
    if b < LINEAR {
        return (b, 1);
    }
    let k = b - LINEAR;
    let msb = 7 + k / (1 << SUB_BITS);
    let sub = k % (1 << SUB_BITS);
    let shift = msb - u64::from(SUB_BITS);
    ((1u64 << msb) + (sub << shift), 1u64 << shift)
}

/// Summary statistics of a histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Median (ms).
    pub p50_ms: u64,
    /// 95th percentile (ms).
    pub p95_ms: u64,
    /// 99th percentile (ms).
    pub p99_ms: u64,
    /// Maximum (ms, exact).
    pub max_ms: u64,
    /// Mean (ms, rounded down).
    pub mean_ms: u64,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }
    /// Add one sample.
    pub fn record(&mut self, v: u64) {
        let b = bucket_of(v);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
    }
    /// Add every sample of another histogram.
    pub fn merge(&mut self, other: &Histogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }
    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// The value at quantile `q` in [0, 1] (upper edge of its bucket, capped at the maximum).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (lo, width) = bucket_range(b);
                return (lo + width - 1).min(self.max);
            }
        }
        self.max
    }
    /// p50/p95/p99/max/mean.
    pub fn percentiles(&self) -> Percentiles {
        Percentiles {
            count: self.count,
            p50_ms: self.quantile(0.50),
            p95_ms: self.quantile(0.95),
            p99_ms: self.quantile(0.99),
            max_ms: self.max,
            mean_ms: if self.count == 0 {
                0
            } else {
                (self.sum / u128::from(self.count)) as u64
            },
        }
    }
    /// Non-empty buckets as (lowest value, width, count), in increasing order.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(b, n)| {
                let (lo, w) = bucket_range(b);
                (lo, w, *n)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip() {
        for v in [
            0u64,
            1,
            127,
            128,
            129,
            200,
            1000,
            65_535,
            1 << 40,
            u64::MAX / 3,
        ] {
            let (lo, w) = bucket_range(bucket_of(v));
            assert!(lo <= v && v < lo.saturating_add(w), "{v}: {lo} {w}");
            assert!(w <= 1 || (w as f64) / (lo as f64) <= 1.0 / 64.0 + 1e-9);
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 50);
        assert_eq!(h.quantile(0.99), 99);
        assert_eq!(h.percentiles().max_ms, 100);
        let mut big = Histogram::new();
        for v in 0..10_000u64 {
            big.record(v * 10);
        }
        let p95 = big.quantile(0.95) as f64;
        assert!((p95 - 95_000.0).abs() / 95_000.0 < 0.02, "{p95}");
    }
}
