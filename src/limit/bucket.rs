//! A token bucket refilled lazily from elapsed time: no timer per bucket,
//! and an idle bucket costs nothing until it is used again.

use std::time::{Duration, Instant};

/// The shape shared by every bucket of one level.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BucketParams {
    pub capacity: f64,
    pub refill_per_s: f64,
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(p: &BucketParams, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: p.capacity,
            last: now,
        }
    }

    fn refill(&mut self, p: &BucketParams, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * p.refill_per_s).min(p.capacity);
        self.last = self.last.max(now);
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, p: &BucketParams, now: Instant) -> Result<(), Duration> {
        self.refill(p, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait_for_one(p))
        }
    }

    /// Takes `n` tokens at once, into debt if need be: for a cost known
    /// only once it is spent (bytes sent). Until the debt is paid back,
    /// [`TokenBucket::take`] refuses.
    pub fn spend(&mut self, p: &BucketParams, n: f64, now: Instant) {
        self.refill(p, now);
        self.tokens -= n;
    }

    /// Gives back a token taken by a request that a later level refused.
    pub fn refund(&mut self, p: &BucketParams) {
        self.tokens = (self.tokens + 1.0).min(p.capacity);
    }

    /// Time until this bucket holds a whole token (zero if it does).
    pub fn wait_for_one(&self, p: &BucketParams) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / p.refill_per_s)
        }
    }

    /// Whether the bucket has refilled completely by `now`.
    pub fn is_full(&self, p: &BucketParams, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * p.refill_per_s >= p.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: BucketParams = BucketParams {
        capacity: 50.0,
        refill_per_s: 5.0,
    };

    #[test]
    fn bursts_to_capacity_then_refuses_with_the_exact_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&P, t0);
        for _ in 0..50 {
            assert!(b.take(&P, t0).is_ok());
        }
        assert_eq!(b.take(&P, t0), Err(Duration::from_millis(200)));
        // 100 ms later half a token has come back: 100 ms to go.
        let wait = b.take(&P, t0 + Duration::from_millis(100)).unwrap_err();
        assert_eq!(wait.as_millis(), 100);
        assert!(b.take(&P, t0 + Duration::from_millis(200)).is_ok());
    }

    #[test]
    fn refills_from_elapsed_time_up_to_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&P, t0);
        for _ in 0..50 {
            b.take(&P, t0).unwrap();
        }
        let t1 = t0 + Duration::from_secs(2);
        for _ in 0..10 {
            assert!(b.take(&P, t1).is_ok());
        }
        assert!(b.take(&P, t1).is_err());
        assert!(!b.is_full(&P, t1 + Duration::from_secs(9)));
        // An emptied bucket is full again after capacity / refill = 10 s.
        assert!(b.is_full(&P, t1 + Duration::from_secs(10)));
        let mut later = b.clone();
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..50 {
            assert!(later.take(&P, t2).is_ok());
        }
        assert!(later.take(&P, t2).is_err(), "never more than capacity");
    }

    #[test]
    fn a_refund_gives_the_token_back() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&P, t0);
        for _ in 0..50 {
            b.take(&P, t0).unwrap();
        }
        b.refund(&P);
        assert!(b.take(&P, t0).is_ok());
        assert!(b.take(&P, t0).is_err());
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(&P, t0);
        assert!(b.take(&P, t0 - Duration::from_secs(5)).is_ok());
    }
}
