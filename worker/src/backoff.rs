//! Jittered delays: exponential backoff for retries and a spread-out poll interval, so that
//! many workers restarted together do not hit the coordinator in lockstep.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with "equal jitter": the n-th delay is drawn uniformly from
/// `[d/2, d]` where `d = min(base · 2ⁿ, max)`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: 0,
        }
    }

    /// The delay before the next attempt; each call doubles the ceiling up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    /// Consecutive failures since the last [`Backoff::reset`].
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Starts over after a success.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `d` scaled by a uniform factor in `[1 - spread, 1 + spread]`.
pub(crate) fn jitter(d: Duration, spread: f64) -> Duration {
    let spread = spread.clamp(0.0, 1.0);
    d.mul_f64(rand::rng().random_range(1.0 - spread..=1.0 + spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.next_delay());
        }
        // Each delay lies in [ceiling/2, ceiling].
        let expected = [100u64, 200, 400, 800, 1600, 2000, 2000, 2000, 2000, 2000];
        for (d, c) in ceilings.iter().zip(expected) {
            let ms = d.as_millis() as u64;
            assert!(ms >= c / 2 && ms <= c, "{ms} not in [{}, {c}]", c / 2);
        }
        assert_eq!(b.failures(), 10);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(10), 0.2);
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
    }
}
