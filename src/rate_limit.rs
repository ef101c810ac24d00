//! The token bucket, and the login cool-down arithmetic.
//!
//! A bucket holds up to `capacity` tokens and refills continuously at `capacity` per
//! `period`; each request takes one. Time is in milliseconds from the server's clock; a
//! clock that goes backwards refills nothing (and never un-spends a token). The same
//! arithmetic runs in Redis as a Lua script (`store::limits`) so every instance shares
//! one budget; this Rust version is the in-process store's and the one the unit tests pin.

use crate::config::Rate;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub updated_ms: i64,
}

/// What a take decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Denied; the next token arrives in this many milliseconds.
    Denied {
        retry_after_ms: u64,
    },
}

impl Decision {
    /// Whole seconds for `Retry-After`, rounded up, at least 1.
    pub fn retry_after_secs(self) -> Option<u64> {
        match self {
            Decision::Allowed => None,
            Decision::Denied { retry_after_ms } => Some(retry_after_ms.div_ceil(1000).max(1)),
        }
    }
}

pub fn period_ms(rate: Rate) -> i64 {
    i64::try_from(rate.period.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl Bucket {
    pub fn full(rate: Rate, now_ms: i64) -> Self {
        Self { tokens: f64::from(rate.capacity), updated_ms: now_ms }
    }

    /// The tokens there at `now_ms` (refilled for the time elapsed, at most `capacity`).
    pub fn tokens_at(&self, rate: Rate, now_ms: i64) -> f64 {
        let capacity = f64::from(rate.capacity);
        let elapsed = (now_ms - self.updated_ms).max(0) as f64;
        (self.tokens + elapsed * capacity / period_ms(rate) as f64).min(capacity)
    }

    /// Refills for the time elapsed since the last update, then takes one token if a
    /// whole one is there.
    pub fn take(&mut self, rate: Rate, now_ms: i64) -> Decision {
        self.tokens = self.tokens_at(rate, now_ms);
        self.updated_ms = self.updated_ms.max(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Decision::Allowed
        } else {
            Decision::Denied { retry_after_ms: self.wait_ms(rate) }
        }
    }

    /// What a take would decide, taking nothing.
    pub fn peek(&self, rate: Rate, now_ms: i64) -> Decision {
        let mut copy = *self;
        copy.take(rate, now_ms)
    }

    /// Milliseconds until a whole token is there (0 when one is).
    fn wait_ms(&self, rate: Rate) -> u64 {
        let missing = (1.0 - self.tokens).max(0.0);
        (missing * period_ms(rate) as f64 / f64::from(rate.capacity)).ceil() as u64
    }

    /// An untouched bucket is full again after one period: forgetting it changes nothing.
    pub fn is_idle(&self, rate: Rate, now_ms: i64) -> bool {
        now_ms - self.updated_ms >= period_ms(rate)
    }
}

/// The brute-force cool-down: after `threshold` consecutive failures on one account, it
/// is refused for `base`, doubling with each further failure, never longer than `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CooldownPolicy {
    pub threshold: u32,
    pub base_ms: u64,
    pub max_ms: u64,
}

impl CooldownPolicy {
    /// The cool-down after the `failures`-th consecutive failure (0 below the threshold).
    pub fn cooldown_ms(&self, failures: u32) -> u64 {
        if failures < self.threshold {
            return 0;
        }
        let doublings = (failures - self.threshold).min(40);
        self.base_ms.saturating_mul(1u64 << doublings).min(self.max_ms)
    }

    /// How long consecutive failures are remembered without a new one.
    pub fn memory_ms(&self) -> u64 {
        self.max_ms.max(15 * 60 * 1000)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rate(capacity: u32, secs: u64) -> Rate {
        Rate { capacity, period: Duration::from_secs(secs) }
    }

    #[test]
    fn a_full_bucket_allows_a_burst_of_capacity_then_denies() {
        let r = rate(3, 60);
        let mut b = Bucket::full(r, 0);
        for _ in 0..3 {
            assert_eq!(b.take(r, 0), Decision::Allowed);
        }
        assert_eq!(b.take(r, 0), Decision::Denied { retry_after_ms: 20_000 });
    }

    #[test]
    fn refills_continuously_at_capacity_per_period() {
        let r = rate(3, 60);
        let mut b = Bucket::full(r, 0);
        for _ in 0..3 {
            b.take(r, 0);
        }
        // One token takes 20 s to come back.
        assert_eq!(b.take(r, 19_999), Decision::Denied { retry_after_ms: 1 });
        assert_eq!(b.take(r, 20_000), Decision::Allowed);
        assert_eq!(b.take(r, 20_000).retry_after_secs(), Some(20));
    }

    #[test]
    fn refill_is_capped_at_capacity() {
        let r = rate(2, 1);
        let mut b = Bucket::full(r, 0);
        b.take(r, 0);
        // A day idle still gives only `capacity` tokens.
        let later = 86_400_000;
        assert_eq!(b.take(r, later), Decision::Allowed);
        assert_eq!(b.take(r, later), Decision::Allowed);
        assert!(matches!(b.take(r, later), Decision::Denied { .. }));
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        let r = rate(1, 60);
        let mut b = Bucket::full(r, 100_000);
        assert_eq!(b.take(r, 100_000), Decision::Allowed);
        assert!(matches!(b.take(r, 40_000), Decision::Denied { .. }), "going back must not refill");
        assert_eq!(b.updated_ms, 100_000, "nor move the bucket's time back");
        assert_eq!(b.take(r, 160_000), Decision::Allowed);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(Decision::Denied { retry_after_ms: 1 }.retry_after_secs(), Some(1));
        assert_eq!(Decision::Denied { retry_after_ms: 1001 }.retry_after_secs(), Some(2));
        assert_eq!(Decision::Allowed.retry_after_secs(), None);
    }

    #[test]
    fn peek_tells_what_a_take_would_decide_and_takes_nothing() {
        let r = rate(2, 60);
        let mut b = Bucket::full(r, 0);
        assert_eq!(b.peek(r, 0), Decision::Allowed);
        b.take(r, 0);
        b.take(r, 0);
        let before = b;
        assert_eq!(b.peek(r, 0), Decision::Denied { retry_after_ms: 30_000 });
        assert_eq!(b, before);
        assert_eq!(b.peek(r, 30_000), Decision::Allowed);
        assert!((b.tokens_at(r, 45_000) - 1.5).abs() < 1e-9);
        assert!((b.tokens_at(r, 600_000) - 2.0).abs() < 1e-9, "capped at capacity");
    }

    #[test]
    fn idle_buckets_are_full_again() {
        let r = rate(5, 10);
        let mut b = Bucket::full(r, 0);
        b.take(r, 0);
        assert!(!b.is_idle(r, 9_999));
        assert!(b.is_idle(r, 10_000));
    }

    #[test]
    fn cooldown_grows_exponentially_and_is_capped() {
        let p = CooldownPolicy { threshold: 5, base_ms: 1_000, max_ms: 300_000 };
        assert_eq!(p.cooldown_ms(4), 0);
        assert_eq!(p.cooldown_ms(5), 1_000);
        assert_eq!(p.cooldown_ms(6), 2_000);
        assert_eq!(p.cooldown_ms(10), 32_000);
        assert_eq!(p.cooldown_ms(14), 300_000);
        assert_eq!(p.cooldown_ms(u32::MAX), 300_000);
    }
}
