//! Time as a parameter: components that depend on time take an `Instant`
//! from a [`Clock`], so tests drive them with a [`ManualClock`] instead of
//! sleeping.

use std::cell::Cell;
use std::time::{Duration, Instant};

pub trait Clock {
    fn now(&self) -> Instant;
}

/// The monotonic clock of the machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Cell<Instant>);

impl ManualClock {
    pub fn new() -> ManualClock {
        ManualClock(Cell::new(Instant::now()))
    }

    pub fn advance(&self, by: Duration) {
        self.0.set(self.0.get() + by);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.0.get()
    }
}
