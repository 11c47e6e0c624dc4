//! The standard `process_*` metrics (the names every Prometheus client
//! library uses, so existing dashboards work): CPU time, memory, threads,
//! file descriptors and start time, read from `/proc/self` at scrape time.
//! Off Linux, or when `/proc` is not mounted, they are simply left out.

use super::metrics::{counter_f, gauge, gauge_f};

/// What `/proc/self/stat` says, in the metrics' units.
#[derive(Debug, Default, PartialEq)]
pub struct Stat {
    pub cpu_seconds: f64,
    pub threads: u64,
    pub start_time_seconds: f64,
    pub virtual_bytes: u64,
    pub resident_bytes: u64,
}

/// Parses `/proc/self/stat`. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str, ticks_per_s: f64, page: u64, boot_time_s: f64) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest starts at field 3 (state); field N is at index N - 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(Stat {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks_per_s,
        threads: num(20)?,
        start_time_seconds: boot_time_s + num(22)? as f64 / ticks_per_s,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)?.saturating_mul(page),
    })
}

/// When the machine booted, in Unix seconds: the wall clock less the time
/// since boot. Not from `/proc/stat`, which a unit with `ProcSubset=pid`
/// does not show.
fn boot_time_s() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    let since_boot = ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    // Whole seconds, as the kernel's btime: the start time stays put.
    Some((now - since_boot).round())
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn max_fds() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    // rlim_t is 32 bits on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    (rc == 0).then_some(u64::from(lim.rlim_cur))
}

pub fn render(out: &mut String) {
    // SAFETY: sysconf only reads system constants.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| {
            parse_stat(
                &t,
                ticks.max(1) as f64,
                page.max(1) as u64,
                boot_time_s().unwrap_or(0.0),
            )
        });
    if let Some(s) = stat {
        counter_f(
            out,
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            s.cpu_seconds,
        );
        gauge(
            out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            s.resident_bytes,
        );
        gauge(
            out,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            s.virtual_bytes,
        );
        gauge(out, "process_threads", "Number of OS threads.", s.threads);
        gauge_f(
            out,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds.",
            s.start_time_seconds,
        );
    }
    if let Some(n) = open_fds() {
        gauge(
            out,
            "process_open_fds",
            "Number of open file descriptors.",
            n,
        );
    }
    if let Some(n) = max_fds() {
        gauge(
            out,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            n,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stat_past_a_name_with_spaces_and_parentheses() {
        let line = "4242 (hive gate) (x)) S 1 4242 4242 0 -1 4194560 300 0 0 0 \
                    150 50 0 0 20 0 3 0 1000 8392704 512 18446744073709551615";
        let s = parse_stat(line, 100.0, 4096, 1_700_000_000.0).unwrap();
        assert_eq!(
            s,
            Stat {
                cpu_seconds: 2.0,
                threads: 3,
                start_time_seconds: 1_700_000_010.0,
                virtual_bytes: 8_392_704,
                resident_bytes: 512 * 4096,
            }
        );
        assert_eq!(parse_stat("garbage", 100.0, 4096, 0.0), None);
        assert_eq!(parse_stat("1 (x) S 1 2", 100.0, 4096, 0.0), None);
    }
}
