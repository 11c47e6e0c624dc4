//! Wall-clock time, for what is stored and shown: message timestamps,
//! retention cut-offs, backlog ages. (Deadlines, buckets, meters and
//! breakers use the monotonic `Instant`, passed in as a parameter.)

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since 1970 (0 if the clock is before it).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd wants it with
/// `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}
