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
