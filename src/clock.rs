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

/// The calendar date (year, month, day) of a UTC day counted from
/// 1970-01-01, after Howard Hinnant's civil-from-days.
pub fn date_of_day(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The UTC day (counted from 1970-01-01) of `YYYY-MM-DD`, or `None` for
/// anything else (days-from-civil, the inverse of [`date_of_day`]).
pub fn day_of_date(date: &str) -> Option<i64> {
    let mut parts = date.splitn(3, '-');
    let mut num = |len: usize| {
        let p = parts
            .next()
            .filter(|p| p.len() == len && p.bytes().all(|b| b.is_ascii_digit()))?;
        p.parse::<i64>().ok()
    };
    let (y, m, d) = (num(4)?, num(2)?, num(2)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let day = era * 146_097 + doe - 719_468;
    // 2026-02-31 is no date: it must come back as itself.
    (date_of_day(day) == (y + i64::from(m <= 2), m, d)).then_some(day)
}

/// `YYYY-MM-DD` for a UTC day counted from 1970-01-01.
pub fn date(days: i64) -> String {
    let (y, m, d) = date_of_day(days);
    format!("{y:04}-{m:02}-{d:02}")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_dates_round_trip() {
        assert_eq!(day_of_date("1970-01-01"), Some(0));
        assert_eq!(day_of_date("2024-11-22"), Some(20_049));
        assert_eq!(date(20_049), "2024-11-22");
        for day in [-1000, 0, 59, 60, 11_016, 20_454, 30_000] {
            assert_eq!(day_of_date(&date(day)), Some(day), "{}", date(day));
        }
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "26-01-01",
            "2026-1-01",
            "",
            "x",
            "2026-01-01x",
        ] {
            assert_eq!(day_of_date(bad), None, "{bad}");
        }
    }
}
