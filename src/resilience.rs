//! Failing well: a circuit breaker per upstream, and retries with jittered
//! exponential backoff. Time is a parameter, so tests drive both without
//! sleeping.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];
}

/// A state change, for the caller to log and count.
pub type Transition = (BreakerState, BreakerState);

/// Closed → open after `fail_max` consecutive counted failures → half-open
/// after `reset_timeout` → one trial call at a time; a success closes it,
/// a failure opens it again. While open, [`Breaker::allow`] refuses in
/// nanoseconds, so a dead upstream costs nothing per call.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: BreakerState,
    failures: u32,
    fail_max: u32,
    reset_timeout: Duration,
    opened_at: Instant,
    trial_in_flight: bool,
    pub failures_total: u64,
    /// Transitions counted by [from][to], indexed like [`BreakerState::ALL`].
    pub transitions: [[u64; 3]; 3],
}

impl Breaker {
    pub fn new(fail_max: u32, reset_timeout: Duration, now: Instant) -> Breaker {
        Breaker {
            state: BreakerState::Closed,
            failures: 0,
            fail_max: fail_max.max(1),
            reset_timeout,
            opened_at: now,
            trial_in_flight: false,
            failures_total: 0,
            transitions: [[0; 3]; 3],
        }
    }

    /// The state at `now` (an open breaker whose timeout has passed reads
    /// as half-open, though it changes only when a call is allowed).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            BreakerState::Open if now >= self.opened_at + self.reset_timeout => {
                BreakerState::HalfOpen
            }
            s => s,
        }
    }

    fn go(&mut self, to: BreakerState) -> Option<Transition> {
        let from = self.state;
        if from == to {
            return None;
        }
        self.state = to;
        let i = |s: BreakerState| BreakerState::ALL.iter().position(|x| *x == s).unwrap_or(0);
        self.transitions[i(from)][i(to)] += 1;
        Some((from, to))
    }

    /// May a call go out now? `Err(at)` says when to ask again.
    pub fn allow(&mut self, now: Instant) -> Result<Option<Transition>, Instant> {
        match self.state {
            BreakerState::Closed => Ok(None),
            BreakerState::Open => {
                let at = self.opened_at + self.reset_timeout;
                if now < at {
                    return Err(at);
                }
                self.trial_in_flight = true;
                Ok(self.go(BreakerState::HalfOpen))
            }
            BreakerState::HalfOpen => {
                if self.trial_in_flight {
                    // One trial at a time; ask again shortly.
                    Err(now + Duration::from_millis(100))
                } else {
                    self.trial_in_flight = true;
                    Ok(None)
                }
            }
        }
    }

    pub fn success(&mut self) -> Option<Transition> {
        self.failures = 0;
        self.trial_in_flight = false;
        self.go(BreakerState::Closed)
    }

    /// A counted failure (connect error, timeout, 5xx, malformed answer).
    pub fn failure(&mut self, now: Instant) -> Option<Transition> {
        self.failures_total += 1;
        self.trial_in_flight = false;
        match self.state {
            BreakerState::HalfOpen => {
                self.opened_at = now;
                self.go(BreakerState::Open)
            }
            BreakerState::Closed => {
                self.failures += 1;
                if self.failures >= self.fail_max {
                    self.opened_at = now;
                    self.go(BreakerState::Open)
                } else {
                    None
                }
            }
            BreakerState::Open => None,
        }
    }

    /// A call that ended without a verdict on the upstream (a 4xx, a
    /// cancel): frees the half-open trial slot, changes nothing else.
    pub fn release(&mut self) {
        self.trial_in_flight = false;
    }
}

/// The breaker metrics of every service, as one family each (Prometheus
/// wants a family in one place).
pub fn render_breakers(out: &mut String, breakers: &[(String, Breaker)], now: Instant) {
    use std::fmt::Write as _;
    let family = |out: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        out,
        "hivegate_breaker_state",
        "1 for the state each circuit breaker is in (closed, open, half_open), 0 for the others.",
        "gauge",
    );
    for (s, b) in breakers {
        let current = b.state(now);
        for state in BreakerState::ALL {
            let _ = writeln!(
                out,
                "hivegate_breaker_state{{service=\"{s}\",state=\"{}\"}} {}",
                state.label(),
                u8::from(state == current)
            );
        }
    }
    family(
        out,
        "hivegate_breaker_failures_total",
        "Failures counted by each breaker.",
        "counter",
    );
    for (s, b) in breakers {
        let _ = writeln!(
            out,
            "hivegate_breaker_failures_total{{service=\"{s}\"}} {}",
            b.failures_total
        );
    }
    family(
        out,
        "hivegate_breaker_transitions_total",
        "Breaker state changes.",
        "counter",
    );
    for (s, b) in breakers {
        for (i, from) in BreakerState::ALL.iter().enumerate() {
            for (j, to) in BreakerState::ALL.iter().enumerate() {
                if i != j {
                    let _ = writeln!(
                        out,
                        "hivegate_breaker_transitions_total{{service=\"{s}\",from=\"{}\",to=\"{}\"}} {}",
                        from.label(),
                        to.label(),
                        b.transitions[i][j]
                    );
                }
            }
        }
    }
}

/// Full-jitter exponential backoff: a random wait between zero and
/// `min(cap, base * 2^attempt)`. `unit` is a random number in [0, 1).
pub fn backoff(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(cap);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

/// A random number from the standard library's per-process keys: for
/// seeds and ids that must differ between runs, never for secrets.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A small random source for jitter (not for secrets).
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    /// A number in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESET: Duration = Duration::from_secs(120);

    #[test]
    fn opens_after_fail_max_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = Breaker::new(4, RESET, t0);
        for _ in 0..3 {
            assert_eq!(b.allow(t0), Ok(None));
            assert_eq!(b.failure(t0), None);
        }
        // A success in between starts the count again.
        b.success();
        for _ in 0..3 {
            b.failure(t0);
        }
        assert_eq!(
            b.failure(t0),
            Some((BreakerState::Closed, BreakerState::Open))
        );
        assert_eq!(b.allow(t0 + Duration::from_secs(1)), Err(t0 + RESET));
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.failures_total, 7);
    }

    #[test]
    fn half_open_admits_one_trial_then_closes_or_reopens() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, RESET, t0);
        b.failure(t0);
        let t1 = t0 + RESET;
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert_eq!(
            b.allow(t1),
            Ok(Some((BreakerState::Open, BreakerState::HalfOpen)))
        );
        assert!(b.allow(t1).is_err(), "only one trial at a time");
        // The trial fails: open again, for a whole reset timeout.
        assert_eq!(
            b.failure(t1),
            Some((BreakerState::HalfOpen, BreakerState::Open))
        );
        assert_eq!(b.allow(t1 + Duration::from_secs(1)), Err(t1 + RESET));
        let t2 = t1 + RESET;
        b.allow(t2).unwrap();
        assert_eq!(
            b.success(),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
        assert_eq!(b.allow(t2), Ok(None));
        assert_eq!(b.transitions[0][1], 1);
        assert_eq!(b.transitions[1][2], 2);
        assert_eq!(b.transitions[2][1], 1);
        assert_eq!(b.transitions[2][0], 1);
    }

    #[test]
    fn a_released_trial_frees_the_slot() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, RESET, t0);
        b.failure(t0);
        b.allow(t0 + RESET).unwrap();
        b.release();
        assert!(b.allow(t0 + RESET).is_ok());
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let base = Duration::from_millis(250);
        let cap = Duration::from_secs(5);
        assert_eq!(backoff(0, base, cap, 0.999_999).as_millis(), 249);
        assert_eq!(backoff(1, base, cap, 0.5), Duration::from_millis(250));
        assert_eq!(backoff(2, base, cap, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(10, base, cap, 1.0), cap);
        assert_eq!(backoff(63, base, cap, 1.0), cap);
        assert_eq!(backoff(3, base, cap, 0.0), Duration::ZERO);
        let mut j = Jitter::new(7);
        for _ in 0..1000 {
            let u = j.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
