//! How much a box answers sync requests: a request is a hundred bytes and
//! its answer up to a whole batch of events, so without bounds a few
//! kilobytes of requests make a box publish megabytes (a 200x
//! amplification, found from outside).
//!
//! Three bounds: an answer holds at most [`MAX_ANSWER_BYTES`]; the same
//! request (asker, room and the point it asks from) is answered once per
//! heartbeat, since a real box asks again only with more applied; and all
//! answers together publish at most `cluster.replay_bytes_per_s`, bytes
//! beyond it waiting (requests beyond the queue are dropped, counted). A
//! box that really is behind asks from further on each time and is served
//! at that rate.

use crate::limit::{BucketParams, TokenBucket};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Most bytes of events in one answer; the asker asks again for the rest.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Requests remembered for the repeat check.
const MAX_REMEMBERED: usize = 4096;

pub struct ReplayBudget {
    params: BucketParams,
    bytes: TokenBucket,
    /// (asker, room) → (the point it asked from, when it was answered).
    answered: HashMap<(String, String), (i64, Instant)>,
    repeat: Duration,
}

impl ReplayBudget {
    pub fn new(bytes_per_s: usize, repeat: Duration, now: Instant) -> ReplayBudget {
        let params = BucketParams {
            capacity: bytes_per_s as f64,
            refill_per_s: bytes_per_s as f64,
        };
        ReplayBudget {
            params,
            bytes: TokenBucket::new(&params, now),
            answered: HashMap::new(),
            repeat,
        }
    }

    /// Whether this request repeats one answered within the repeat time.
    pub fn is_repeat(&mut self, asker: &str, room: &str, after: i64, now: Instant) -> bool {
        let key = (asker.to_string(), room.to_string());
        if let Some((had, at)) = self.answered.get(&key) {
            if *had == after && now.saturating_duration_since(*at) < self.repeat {
                return true;
            }
        }
        if self.answered.len() >= MAX_REMEMBERED {
            let repeat = self.repeat;
            self.answered
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < repeat);
            if self.answered.len() >= MAX_REMEMBERED {
                self.answered.clear();
            }
        }
        self.answered.insert(key, (after, now));
        false
    }

    /// How long until an answer may go out (zero: now).
    pub fn wait(&mut self, now: Instant) -> Duration {
        match self.bytes.take(&self.params, now) {
            Ok(()) => {
                self.bytes.refund(&self.params);
                Duration::ZERO
            }
            Err(wait) => wait,
        }
    }

    /// Counts an answer's bytes (the bucket may go into debt: the next
    /// answer waits for it).
    pub fn spend(&mut self, bytes: usize, now: Instant) {
        self.bytes.spend(&self.params, bytes as f64, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_paid_for_in_bytes_and_repeats_are_answered_once() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut b = ReplayBudget::new(100_000, Duration::from_secs(1), t0);
        assert_eq!(b.wait(t0), Duration::ZERO);
        b.spend(250_000, t0);
        // 150 KB in debt at 100 KB/s: 1.5 s until the next answer.
        let w = b.wait(t0);
        assert!(
            w > Duration::from_millis(1400) && w <= Duration::from_millis(1510),
            "{w:?}"
        );
        assert_eq!(b.wait(ms(1510)), Duration::ZERO);
        // The same request within a second is a repeat; from further on,
        // or later, it is not.
        assert!(!b.is_repeat("a", "r", 10, t0));
        assert!(b.is_repeat("a", "r", 10, ms(500)));
        assert!(!b.is_repeat("a", "r", 11, ms(600)));
        assert!(!b.is_repeat("b", "r", 11, ms(600)));
        assert!(!b.is_repeat("a", "r", 11, ms(1700)));
    }
}
