//! The memory sentinel: twice a second it compares the process's resident
//! memory with the limit (the configured one, or 90% of systemd's
//! `MemoryMax=`). Over it, new connections are refused and `/readyz` is 503
//! (open connections are still served); below 90% of it, all is normal
//! again. Each change is logged once.

use super::log::Logger;
use std::cell::Cell;
use std::time::Duration;

pub struct MemorySentinel {
    limit: Option<u64>,
    rss: Cell<u64>,
    shedding: Cell<bool>,
    log: Logger,
}

impl MemorySentinel {
    /// `configured`: `server.memory_limit_bytes` (0: from the cgroup).
    pub fn new(configured: u64, log: Logger) -> MemorySentinel {
        MemorySentinel {
            limit: effective_limit(configured),
            rss: Cell::new(0),
            shedding: Cell::new(false),
            log,
        }
    }

    /// Whether new connections are refused for memory.
    pub fn shedding(&self) -> bool {
        self.shedding.get()
    }

    /// The last reading of resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        self.rss.get()
    }

    /// Runs for the life of the gateway.
    pub async fn run(&self) {
        loop {
            async_io::Timer::after(Duration::from_millis(500)).await;
            if let Some(rss) = rss_bytes() {
                self.note(rss);
            }
        }
    }

    /// One reading.
    fn note(&self, rss: u64) {
        self.rss.set(rss);
        let Some(limit) = self.limit else {
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
            "hivegate_memory_rss_bytes",
            "Resident memory at the last check.",
            self.rss(),
        );
        gauge(
            out,
            "hivegate_memory_limit_bytes",
            "Memory limit in force (0: none).",
            self.limit.unwrap_or(0),
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
