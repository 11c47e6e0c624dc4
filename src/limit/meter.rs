//! Rate measurement without allocation.
//!
//! A [`RateMeter`] is a ring of per-second slots: recording an event touches
//! one slot, and an idle gap is skipped by clearing at most every slot once,
//! so its cost never grows with traffic or with time. [`Strikes`] answers
//! "N events within a window?" exactly, for small N.

use std::time::Instant;

/// Counts events in the last `SLOTS` seconds, one slot per second.
#[derive(Debug, Clone)]
pub struct RateMeter<const SLOTS: usize> {
    slots: [u32; SLOTS],
    /// The instant second 0 started at.
    epoch: Instant,
    /// The second (since `epoch`) that the newest slot counts.
    head: u64,
}

impl<const SLOTS: usize> RateMeter<SLOTS> {
    pub fn new(now: Instant) -> Self {
        RateMeter {
            slots: [0; SLOTS],
            epoch: now,
            head: 0,
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Moves the ring forward to `now`, clearing the seconds that passed.
    fn advance(&mut self, now: Instant) {
        let sec = self.second(now);
        if sec <= self.head {
            return;
        }
        let gap = sec - self.head;
        if gap >= SLOTS as u64 {
            self.slots = [0; SLOTS];
        } else {
            for s in self.head + 1..=sec {
                self.slots[(s % SLOTS as u64) as usize] = 0;
            }
        }
        self.head = sec;
    }

    pub fn record(&mut self, now: Instant) {
        self.record_n(now, 1);
    }

    pub fn record_n(&mut self, now: Instant, n: u32) {
        self.advance(now);
        let slot = &mut self.slots[(self.head % SLOTS as u64) as usize];
        *slot = slot.saturating_add(n);
    }

    /// Events in the last `seconds` seconds, the current one included.
    pub fn count(&mut self, now: Instant, seconds: usize) -> u64 {
        self.advance(now);
        let seconds = seconds.clamp(1, SLOTS) as u64;
        (0..seconds)
            .map(|back| {
                let s = self.head.wrapping_sub(back) % SLOTS as u64;
                // Seconds before the meter existed hold nothing.
                if back > self.head {
                    0
                } else {
                    self.slots[s as usize] as u64
                }
            })
            .sum()
    }

    /// Events per second over the last `seconds` *complete* seconds (the
    /// second in progress is left out, so a scrape early in a second does
    /// not read low). At most `SLOTS - 1` seconds.
    pub fn rate(&mut self, now: Instant, seconds: usize) -> f64 {
        self.advance(now);
        let seconds = seconds.clamp(1, SLOTS - 1) as u64;
        let sum: u64 = (1..=seconds)
            .filter(|back| *back <= self.head)
            .map(|back| self.slots[((self.head - back) % SLOTS as u64) as usize] as u64)
            .sum();
        sum as f64 / seconds as f64
    }

    /// Events in each of the last `SLOTS - 1` complete seconds, oldest
    /// first: a sparkline's points.
    pub fn seconds(&mut self, now: Instant) -> impl Iterator<Item = u32> + '_ {
        self.advance(now);
        let head = self.head;
        (1..SLOTS as u64).rev().map(move |back| {
            if back > head {
                0
            } else {
                self.slots[((head - back) % SLOTS as u64) as usize]
            }
        })
    }
}

/// Remembers the times of the last `N` events, to answer exactly "have
/// there been `N` within this window?" in a few dozen bytes.
#[derive(Debug, Clone)]
pub struct Strikes<const N: usize> {
    /// Seconds since `epoch`, plus one (0 means "no event").
    times: [u32; N],
    next: usize,
    epoch: Instant,
}

impl<const N: usize> Strikes<N> {
    pub fn new(now: Instant) -> Self {
        Strikes {
            times: [0; N],
            next: 0,
            epoch: now,
        }
    }

    /// Records an event; true when it is the `N`th within `window_secs`.
    pub fn record(&mut self, now: Instant, window_secs: u32) -> bool {
        let t = now.saturating_duration_since(self.epoch).as_secs();
        let t = u32::try_from(t).unwrap_or(u32::MAX - 1) + 1;
        self.times[self.next] = t;
        self.next = (self.next + 1) % N;
        // The oldest remembered event is the one about to be overwritten.
        let oldest = self.times[self.next];
        oldest != 0 && t - oldest < window_secs
    }
}

/// Counts events in fixed windows of time, in 8 bytes: enough to catch a
/// flood (many times the limit), where a sliding [`RateMeter`] would cost
/// 64 bytes on every connection. The caller keeps the epoch, and says how
/// many seconds have passed since it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    window: u32,
    count: u32,
}

impl Tally {
    /// Records an event `secs` after the epoch; returns the events counted
    /// in its window of `window_secs` (this one included).
    pub fn record(&mut self, secs: u64, window_secs: u64) -> u32 {
        let window = u32::try_from(secs / window_secs.max(1)).unwrap_or(u32::MAX);
        if window != self.window {
            self.window = window;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_the_complete_ones_oldest_first() {
        let t0 = Instant::now();
        let mut m: RateMeter<4> = RateMeter::new(t0);
        m.record_n(t0, 5);
        m.record_n(t0 + Duration::from_secs(2), 7);
        m.record(t0 + Duration::from_millis(3500));
        let now = t0 + Duration::from_millis(3600);
        // Seconds 0, 1, 2; second 3 is in progress and left out.
        assert_eq!(m.seconds(now).collect::<Vec<_>>(), [5, 0, 7]);
        // Before the meter existed: nothing.
        let mut young: RateMeter<4> = RateMeter::new(t0);
        young.record(t0 + Duration::from_millis(1500));
        let seen: Vec<u32> = young.seconds(t0 + Duration::from_millis(2100)).collect();
        assert_eq!(seen, [0, 0, 1]);
    }
    use std::cell::Cell;
    use std::time::Duration;

    /// A clock that moves only when told to.
    struct ManualClock(Cell<Instant>);

    impl ManualClock {
        fn new() -> Self {
            ManualClock(Cell::new(Instant::now()))
        }
        fn now(&self) -> Instant {
            self.0.get()
        }
        fn advance(&self, by: Duration) {
            self.0.set(self.0.get() + by);
        }
    }

    #[test]
    fn a_young_meter_does_not_count_seconds_before_it_existed() {
        let clock = ManualClock::new();
        let mut m = RateMeter::<60>::new(clock.now());
        m.record_n(clock.now(), 10);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(m.rate(clock.now(), 1), 10.0);
        assert_eq!(m.rate(clock.now(), 10), 1.0);
    }

    #[test]
    fn counts_within_the_window_and_forgets_after() {
        let clock = ManualClock::new();
        let mut m = RateMeter::<60>::new(clock.now());
        for _ in 0..10 {
            m.record(clock.now());
            clock.advance(Duration::from_millis(500));
        }
        // 10 events over 5 s.
        assert_eq!(m.count(clock.now(), 60), 10);
        assert_eq!(m.count(clock.now(), 1), 0);
        assert_eq!(m.count(clock.now(), 2), 2);
        // At 63 s the window holds seconds 4..=63: the events at 4.0 and 4.5.
        clock.advance(Duration::from_secs(58));
        assert_eq!(m.count(clock.now(), 60), 2);
        clock.advance(Duration::from_secs(10));
        assert_eq!(m.count(clock.now(), 60), 0);
    }

    #[test]
    fn wraps_around_the_ring_many_times() {
        let clock = ManualClock::new();
        let mut m = RateMeter::<60>::new(clock.now());
        for _ in 0..200 {
            m.record_n(clock.now(), 3);
            clock.advance(Duration::from_secs(1));
        }
        assert_eq!(m.count(clock.now(), 60), 3 * 59);
        // Complete seconds only: the ten before the current one held 3 each.
        assert_eq!(m.rate(clock.now(), 10), 3.0);
        assert_eq!(m.rate(clock.now(), 59), 3.0);
        clock.advance(Duration::from_secs(5));
        assert_eq!(m.rate(clock.now(), 10), 1.5);
    }

    #[test]
    fn strikes_fire_on_the_nth_event_within_the_window() {
        let clock = ManualClock::new();
        let mut s = Strikes::<3>::new(clock.now());
        assert!(!s.record(clock.now(), 60));
        clock.advance(Duration::from_secs(30));
        assert!(!s.record(clock.now(), 60));
        clock.advance(Duration::from_secs(31));
        // The first is now 61 s old: only two within the minute.
        assert!(!s.record(clock.now(), 60));
        assert!(s.record(clock.now(), 60));
    }

    #[test]
    fn a_long_idle_gap_clears_everything() {
        let clock = ManualClock::new();
        let mut m = RateMeter::<60>::new(clock.now());
        m.record_n(clock.now(), 100);
        clock.advance(Duration::from_secs(3600 * 24 * 365));
        assert_eq!(m.count(clock.now(), 60), 0);
        assert_eq!(m.rate(clock.now(), 59), 0.0);
        m.record(clock.now());
        assert_eq!(m.count(clock.now(), 60), 1);
    }

    #[test]
    fn a_tally_counts_within_its_window_and_starts_again_in_the_next() {
        let mut t = Tally::default();
        assert_eq!(t.record(0, 10), 1);
        assert_eq!(t.record(9, 10), 2);
        assert_eq!(t.record(10, 10), 1);
        assert_eq!(t.record(u64::MAX, 10), 1);
        assert_eq!(t.record(u64::MAX, 0), 2);
    }
}
