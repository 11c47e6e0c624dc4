//! The memory sentinel: it compares the process's resident memory with the
//! limit (the configured one, or 90% of systemd's `MemoryMax=`). Over it,
//! new connections are refused and `/readyz` is 503 (open connections are
//! still served); below 90% of it, all is normal again. Each change is
//! logged once.
//!
//! What it decides matters only when a client knocks, so it reads at
//! admission (and `/readyz`) whenever its last reading is older than
//! [`FRESH`], and on its own only every [`FRESH`] while connections are
//! open, every [`IDLE_PERIOD`] otherwise: an idle box is not woken twice
//! a second for nothing.

use super::log::Logger;
use std::cell::Cell;
use std::time::{Duration, Instant};

/// A reading older than this is taken again before it is used.
pub const FRESH: Duration = Duration::from_millis(500);
/// The period of the readings (for `/metrics`) with no connection open.
pub const IDLE_PERIOD: Duration = Duration::from_secs(30);

pub struct MemorySentinel {
    limit: Cell<Option<u64>>,
    rss: Cell<u64>,
    read_at: Cell<Option<Instant>>,
    shedding: Cell<bool>,
    log: Logger,
}

impl MemorySentinel {
    /// `configured`: `server.memory_limit_bytes` (0: from the cgroup).
    pub fn new(configured: u64, log: Logger) -> MemorySentinel {
        MemorySentinel {
            limit: Cell::new(effective_limit(configured)),
            rss: Cell::new(0),
            read_at: Cell::new(None),
            shedding: Cell::new(false),
            log,
        }
    }

    /// Whether new connections are refused for memory.
    pub fn shedding(&self) -> bool {
        self.shedding.get()
    }

    /// The limit in force, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit.get()
    }

    /// The last reading of resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        self.rss.get()
    }

    /// A reload's new `server.memory_limit_bytes`; the next admission
    /// reads memory afresh against it.
    pub fn set_limit(&self, configured: u64) {
        self.limit.set(effective_limit(configured));
        self.read_at.set(None);
    }

    /// Whether to refuse a new connection now, from a fresh reading.
    pub fn shedding_now(&self, now: Instant) -> bool {
        let stale = self
            .read_at
            .get()
            .is_none_or(|at| now.saturating_duration_since(at) >= FRESH);
        if stale {
            self.read(now);
        }
        self.shedding.get()
    }

    fn read(&self, now: Instant) {
        self.read_at.set(Some(now));
        if let Some(rss) = rss_bytes() {
            self.note(rss);
        }
    }

    /// Runs for the life of the gateway; `busy` says whether connections
    /// are open.
    pub async fn run(&self, busy: impl Fn() -> bool) {
        loop {
            let period = if busy() { FRESH } else { IDLE_PERIOD };
            async_io::Timer::after(period).await;
            self.read(Instant::now());
        }
    }

    /// One reading.
    fn note(&self, rss: u64) {
        self.rss.set(rss);
        let Some(limit) = self.limit.get() else {
            return;
        };
        let shedding = self.shedding.get();
        let now = if shedding {
            rss >= limit / 10 * 9
        } else {
            rss > limit
        };
        if now == shedding {
            return;
        }
        self.shedding.set(now);
        if now {
            self.log.warn(
                "shedding load: memory is over its limit; new connections are refused",
                &[("rss", &rss), ("limit", &limit)],
            );
        } else {
            self.log.info(
                "memory back under its limit; new connections are accepted",
                &[("rss", &rss)],
            );
        }
    }

    pub fn render(&self, out: &mut String) {
        use super::metrics::gauge;
        gauge(
            out,
            "hivegate_memory_limit_bytes",
            "Memory limit in force (0: none).",
            self.limit.get().unwrap_or(0),
        );
        gauge(
            out,
            "hivegate_shedding",
            "1 while new connections are refused for memory.",
            u64::from(self.shedding()),
        );
    }
}

/// Resident set size in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|p| *p > 0)?)
}

/// The cgroup v2 `memory.max` of this process, if one is set.
pub fn cgroup_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2: a single line "0::/system.slice/hivegate.service".
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim())).ok()?;
    parse_memory_max(&max)
}

fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The limit in force: the configured one, or with 0 ("automatic") 90% of
/// the cgroup's limit, leaving room to shed load before the kernel kills.
pub fn effective_limit(configured: u64) -> Option<u64> {
    if configured > 0 {
        Some(configured)
    } else {
        cgroup_limit().map(|max| max / 10 * 9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let rss = rss_bytes().unwrap();
        assert!(rss > 100 * 1024, "{rss}");
    }

    #[test]
    fn sheds_over_the_limit_and_recovers_below_ninety_percent() {
        let m = MemorySentinel::new(1000, Logger::new(Default::default(), Default::default()));
        m.note(1000);
        assert!(!m.shedding());
        m.note(1001);
        assert!(m.shedding());
        m.note(950);
        assert!(m.shedding(), "no flapping between 90% and 100%");
        m.note(899);
        assert!(!m.shedding());
        assert_eq!(m.rss(), 899);
    }

    #[test]
    fn parses_cgroup_limits() {
        assert_eq!(parse_memory_max("268435456\n"), Some(268_435_456));
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(effective_limit(1000), Some(1000));
    }
}
