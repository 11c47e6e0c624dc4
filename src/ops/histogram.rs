//! Latency histograms for `/metrics`, in Prometheus' cumulative-bucket
//! form: a few fixed bounds, so each costs a handful of counters and
//! `histogram_quantile()` does the rest. The event loop's own are cells;
//! the pool's threads keep atomics and write theirs with [`write`].

use std::cell::Cell;
use std::fmt::Write as _;
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: 1 ms to 10 s (+Inf after).
pub const BOUNDS: [f64; 7] = [0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0];

/// Counts per bucket (not cumulative; the last is +Inf) and the sum.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [Cell<u64>; BOUNDS.len() + 1],
    sum_us: Cell<u64>,
}

/// The bucket `d` falls in: an index into the counts ([`BOUNDS`], then +Inf).
pub fn bucket(d: Duration) -> usize {
    let s = d.as_secs_f64();
    BOUNDS.iter().position(|b| s <= *b).unwrap_or(BOUNDS.len())
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let i = bucket(d);
        self.counts[i].set(self.counts[i].get() + 1);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.set(self.sum_us.get().saturating_add(us));
    }

    /// Its series, with `labels` (`provider="kimi"`, or empty).
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let counts: Vec<u64> = self.counts.iter().map(Cell::get).collect();
        write(out, name, labels, &counts, self.sum_us.get());
    }
}

/// `# HELP` and `# TYPE` of a histogram family, once before its series.
pub fn family(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
}

/// One series: `counts` per bucket of [`BOUNDS`] and +Inf, not
/// cumulative; `sum_us` in microseconds.
pub fn write(out: &mut String, name: &str, labels: &str, counts: &[u64], sum_us: u64) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, n) in counts.iter().enumerate() {
        cumulative += n;
        let le = BOUNDS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let sum = sum_us as f64 / 1e6;
    let _ = writeln!(
        out,
        "{name}_sum{braces} {sum}\n{name}_count{braces} {cumulative}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_labelled() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(30));
        let mut out = String::new();
        family(&mut out, "x_seconds", "X.");
        h.write(&mut out, "x_seconds", "provider=\"kimi\"");
        assert!(
            out.contains("x_seconds_bucket{provider=\"kimi\",le=\"0.001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{provider=\"kimi\",le=\"0.025\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{provider=\"kimi\",le=\"10\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{provider=\"kimi\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_sum{provider=\"kimi\"} 30.0205\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_count{provider=\"kimi\"} 3\n"),
            "{out}"
        );
        let mut bare = String::new();
        Histogram::default().write(&mut bare, "y_seconds", "");
        assert!(
            bare.contains("y_seconds_bucket{le=\"+Inf\"} 0\ny_seconds_sum 0\ny_seconds_count 0\n"),
            "{bare}"
        );
    }
}
