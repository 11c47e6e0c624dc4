//! The memory sentinel's readings: the process's resident memory, and the
//! limit systemd set on its cgroup (`MemoryMax=`), if any.

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
    fn parses_cgroup_limits() {
        assert_eq!(parse_memory_max("268435456\n"), Some(268_435_456));
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(effective_limit(1000), Some(1000));
    }
}
