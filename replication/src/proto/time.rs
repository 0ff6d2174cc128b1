//! Time as a number the driver passes in, reconnect backoff, and a seeded random source.

use std::ops::{Add, Sub};

/// A point in time or a duration, in milliseconds, on the driver's clock.
///
/// Sessions never read a clock: every `handle_*` call takes `now`. The origin is the driver's
/// choice (a monotonic clock's start, the Unix epoch, a simulator's zero).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Millis(pub u64);

impl Millis {
    /// Zero.
    pub const ZERO: Millis = Millis(0);

    /// `n` seconds.
    pub const fn from_secs(n: u64) -> Millis {
        Millis(n * 1000)
    }

    /// `n` minutes.
    pub const fn from_minutes(n: u64) -> Millis {
        Millis(n * 60_000)
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Millis) -> Millis {
        Millis(self.0.saturating_add(d.0))
    }

    /// `self - d`, or zero.
    pub fn saturating_sub(self, d: Millis) -> Millis {
        Millis(self.0.saturating_sub(d.0))
    }
}

impl Add for Millis {
    type Output = Millis;
    fn add(self, rhs: Millis) -> Millis {
        self.saturating_add(rhs)
    }
}

impl Sub for Millis {
    type Output = Millis;
    fn sub(self, rhs: Millis) -> Millis {
        self.saturating_sub(rhs)
    }
}

/// Exponential reconnect backoff with jitter: attempt `n` waits a random time in
/// `[d/2, d]` where `d = min(max, initial * 2^n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Millis,
    /// Longest delay.
    pub max: Millis,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Millis::from_secs(1),
            max: Millis::from_minutes(5),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based), jittered by `rng`.
    pub(crate) fn delay(&self, attempt: u32, rng: &mut SplitMix64) -> Millis {
        let factor = 1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX);
        let d = self.initial.0.saturating_mul(factor).min(self.max.0).max(1);
        let half = d / 2;
        Millis(half + rng.next_u64() % (d - half + 1))
    }
}

/// A small deterministic random source (SplitMix64), seeded from the config.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jitters_and_caps() {
        let b = Backoff::default();
        let mut rng = SplitMix64::new(7);
        for attempt in 0..40 {
            let d = b.delay(attempt, &mut rng);
            let cap = (1000u64 << attempt.min(20)).min(300_000);
            assert!(
                d.0 >= cap / 2 && d.0 <= cap,
                "attempt {attempt}: {d:?} vs {cap}"
            );
        }
    }
}
