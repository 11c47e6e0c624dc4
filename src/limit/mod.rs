//! Rate limits and rate meters.
//!
//! Every request frame passes three token buckets before it costs
//! anything: the gateway's, its client IP's, its user's, in that order.
//! When a later level refuses, the tokens taken by the earlier ones are
//! given back, so a refused request is free. New connections have a bucket
//! per IP of their own. Per-key buckets live in bounded tables
//! ([`KeyedBuckets`]); rates are measured with allocation-free rings
//! ([`RateMeter`]). Time is always a parameter.

mod bucket;
mod meter;
mod table;

pub use bucket::{BucketParams, TokenBucket};
pub use meter::{RateMeter, Strikes, Tally};
pub use table::KeyedBuckets;

use crate::ops::metrics::{counter, counter_with, gauge_with};
use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A place among things in flight (requests of a connection, tool calls):
/// taking one counts it, and dropping it gives it back, on every path out.
pub struct InFlight(Rc<Cell<u32>>);

impl InFlight {
    /// Counts one in `counter`, if it holds fewer than `max`.
    pub fn try_take(counter: &Rc<Cell<u32>>, max: u32) -> Option<InFlight> {
        (counter.get() < max).then(|| InFlight::take(counter))
    }

    /// Counts one in `counter`, whatever it holds.
    pub fn take(counter: &Rc<Cell<u32>>) -> InFlight {
        counter.set(counter.get() + 1);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// The level that refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Global,
    Ip,
    User,
}

impl Level {
    const ALL: [Level; 3] = [Level::Global, Level::Ip, Level::User];

    pub fn label(self) -> &'static str {
        match self {
            Level::Global => "global",
            Level::Ip => "ip",
            Level::User => "user",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub level: Level,
    /// When the request would pass: the longest wait among the levels.
    pub retry_after: Duration,
}

impl Refused {
    pub fn retry_after_ms(&self) -> u64 {
        // Round up: retrying a millisecond early would be refused again.
        self.retry_after.as_nanos().div_ceil(1_000_000) as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LimitParams {
    pub global: BucketParams,
    pub ip: BucketParams,
    pub user: BucketParams,
    pub ip_connect: BucketParams,
    pub table_entries: usize,
    /// Refusals within 10 s that close a connection with 1008.
    pub abuse_threshold: u64,
    /// Refused `hello`s one IP may have in a minute before its upgrades
    /// are refused (429) until the minute has passed.
    pub failed_hellos_per_minute: f64,
}

/// The address a per-address bound counts: IPv4 as it is, IPv6 by its
/// /64 (one subscriber's whole prefix is one address: otherwise a single
/// host with 2^64 addresses would have as many shares).
pub fn ip_group(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

fn failed_hello_params(p: &LimitParams) -> BucketParams {
    BucketParams {
        capacity: p.failed_hellos_per_minute,
        refill_per_s: p.failed_hellos_per_minute / 60.0,
    }
}

pub struct Limits {
    params: LimitParams,
    global_params: BucketParams,
    global: TokenBucket,
    ip: KeyedBuckets<IpAddr>,
    user: KeyedBuckets<Rc<str>>,
    connect: KeyedBuckets<IpAddr>,
    /// Refused hellos per IP.
    failed_hellos: KeyedBuckets<IpAddr>,
    refused: [u64; 3],
    connects_refused: u64,
    hellos_failed: u64,
}

impl Limits {
    pub fn new(p: &LimitParams, now: Instant) -> Limits {
        Limits {
            params: *p,
            global_params: p.global,
            global: TokenBucket::new(&p.global, now),
            ip: KeyedBuckets::new(p.ip, p.table_entries),
            user: KeyedBuckets::new(p.user, p.table_entries),
            connect: KeyedBuckets::new(p.ip_connect, p.table_entries),
            failed_hellos: KeyedBuckets::new(failed_hello_params(p), p.table_entries),
            refused: [0; 3],
            connects_refused: 0,
            hellos_failed: 0,
        }
    }

    /// The limits in force (a reload may have changed them).
    pub fn params(&self) -> &LimitParams {
        &self.params
    }

    /// A reload: new rates from now on, every bucket keeping what it holds
    /// (a client mid-burst is not handed a fresh allowance). The size of
    /// the per-key tables is fixed at start.
    pub fn retune(&mut self, p: &LimitParams) {
        self.params = LimitParams {
            table_entries: self.params.table_entries,
            ..*p
        };
        self.global_params = p.global;
        self.ip.set_params(p.ip);
        self.user.set_params(p.user);
        self.connect.set_params(p.ip_connect);
        self.failed_hellos.set_params(failed_hello_params(p));
    }

    /// Admits one request frame, or says which level refused and when to
    /// retry. A refusal leaves every bucket as it was.
    pub fn check(&mut self, now: Instant, ip: IpAddr, user: &Rc<str>) -> Result<(), Refused> {
        let ip = ip_group(ip);
        let gp = self.global_params;
        let level = if self.global.take(&gp, now).is_err() {
            Level::Global
        } else if self.ip.take(&ip, now).is_err() {
            self.global.refund(&gp);
            Level::Ip
        } else if self.user.take(user, now).is_err() {
            self.global.refund(&gp);
            self.ip.refund(&ip);
            Level::User
        } else {
            return Ok(());
        };
        self.refused[Level::ALL.iter().position(|l| *l == level).unwrap_or(0)] += 1;
        let retry_after = self
            .global
            .wait_for_one(&gp)
            .max(self.ip.wait_for_one(&ip))
            .max(self.user.wait_for_one(user));
        Err(Refused { level, retry_after })
    }

    /// Admits one new connection attempt from `ip`, or says when to retry.
    pub fn check_connect(&mut self, now: Instant, ip: IpAddr) -> Result<(), Duration> {
        let ip = ip_group(ip);
        self.connect.take(&ip, now).inspect_err(|_| {
            self.connects_refused += 1;
        })
    }

    /// Counts a refused `hello` against its IP.
    pub fn note_failed_hello(&mut self, now: Instant, ip: IpAddr) {
        let ip = ip_group(ip);
        self.hellos_failed += 1;
        let _ = self.failed_hellos.take(&ip, now);
    }

    /// Whether `ip` may try to sign in again, or how long until it may.
    pub fn check_failed_hellos(&mut self, now: Instant, ip: IpAddr) -> Result<(), Duration> {
        let ip = ip_group(ip);
        self.failed_hellos.take(&ip, now)?;
        self.failed_hellos.refund(&ip);
        Ok(())
    }

    pub fn render(&self, out: &mut String) {
        let by_level: Vec<(&str, u64)> = Level::ALL
            .iter()
            .zip(self.refused)
            .map(|(l, n)| (l.label(), n))
            .collect();
        counter(
            out,
            "hivegate_hello_failures_total",
            "hello refused for a bad or missing token.",
            self.hellos_failed,
        );
        counter_with(
            out,
            "hivegate_rate_limited_total",
            "Requests refused by a token bucket, by level.",
            "level",
            &by_level,
        );
        let tables = [
            ("ip", self.ip.len() as u64, self.ip.evictions),
            ("user", self.user.len() as u64, self.user.evictions),
            (
                "ip_connect",
                self.connect.len() as u64,
                self.connect.evictions,
            ),
        ];
        let sizes: Vec<(&str, u64)> = tables.iter().map(|(n, s, _)| (*n, *s)).collect();
        let evictions: Vec<(&str, u64)> = tables.iter().map(|(n, _, e)| (*n, *e)).collect();
        gauge_with(
            out,
            "hivegate_rate_table_entries",
            "Buckets held in each keyed table.",
            "table",
            &sizes,
        );
        counter_with(
            out,
            "hivegate_rate_table_evictions_total",
            "Live buckets evicted because a table was full.",
            "table",
            &evictions,
        );
        counter_with(
            out,
            "hivegate_connect_rate_limited_total",
            "New connections refused by the per-IP connection rate.",
            "level",
            &[("ip", self.connects_refused)],
        );
    }
}

/// The gateway-wide rates, 60 complete seconds deep. (The LLM calls'
/// meter is the relay's own: `Llm::calls_meter`.)
pub struct Meters {
    pub messages_in: RateMeter<61>,
    pub messages_out: RateMeter<61>,
    pub refusals: RateMeter<61>,
    /// Connections upgraded to a WebSocket.
    pub connections: RateMeter<61>,
}

/// The windows exported for every meter.
pub const WINDOWS: [(usize, &str); 3] = [(1, "1s"), (10, "10s"), (60, "60s")];

impl Meters {
    pub fn new(now: Instant) -> Meters {
        Meters {
            messages_in: RateMeter::new(now),
            messages_out: RateMeter::new(now),
            refusals: RateMeter::new(now),
            connections: RateMeter::new(now),
        }
    }

    /// `{"messages_in":{"1s":..,"10s":..,"60s":..,"last_60s":[..]},...}`
    /// for `/readyz`, these meters and `more`.
    pub fn json<'a>(
        &'a mut self,
        now: Instant,
        more: impl IntoIterator<Item = (&'static str, &'a mut RateMeter<61>)>,
    ) -> String {
        let mine = [
            ("messages_in", &mut self.messages_in),
            ("messages_out", &mut self.messages_out),
            ("connections", &mut self.connections),
            ("refusals", &mut self.refusals),
        ];
        let mut out = crate::json::JsonOut::new();
        for (name, meter) in mine.into_iter().chain(more) {
            let mut w = crate::json::JsonOut::new();
            for (secs, label) in WINDOWS {
                w = w.float(label, meter.rate(now, secs));
            }
            let series: Vec<String> = meter.seconds(now).map(|n| n.to_string()).collect();
            w = w.raw("last_60s", &format!("[{}]", series.join(",")));
            out = out.raw(name, &w.finish());
        }
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> LimitParams {
        LimitParams {
            global: BucketParams {
                capacity: 1000.0,
                refill_per_s: 100.0,
            },
            ip: BucketParams {
                capacity: 100.0,
                refill_per_s: 10.0,
            },
            user: BucketParams {
                capacity: 50.0,
                refill_per_s: 5.0,
            },
            ip_connect: BucketParams {
                capacity: 20.0,
                refill_per_s: 2.0,
            },
            table_entries: 4096,
            abuse_threshold: 50,
            failed_hellos_per_minute: 5.0,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn the_user_level_refuses_after_its_burst_and_refunds_the_others() {
        let t0 = Instant::now();
        let mut l = Limits::new(&params(), t0);
        let alice: Rc<str> = Rc::from("alice");
        for _ in 0..50 {
            l.check(t0, ip(1), &alice).unwrap();
        }
        let r = l.check(t0, ip(1), &alice).unwrap_err();
        assert_eq!(r.level, Level::User);
        assert_eq!(r.retry_after_ms(), 200);
        // The refusal cost nothing: the IP bucket still has exactly 50.
        let bob: Rc<str> = Rc::from("bob");
        for _ in 0..50 {
            l.check(t0, ip(1), &bob).unwrap();
        }
        let carol: Rc<str> = Rc::from("carol");
        let r = l.check(t0, ip(1), &carol).unwrap_err();
        assert_eq!(r.level, Level::Ip);
        assert_eq!(r.retry_after_ms(), 100);
        assert_eq!(l.refused, [0, 1, 1]);
    }

    #[test]
    fn the_global_level_is_checked_first_and_shared_by_everyone() {
        let mut p = params();
        p.global = BucketParams {
            capacity: 3.0,
            refill_per_s: 1.0,
        };
        let t0 = Instant::now();
        let mut l = Limits::new(&p, t0);
        for n in 1..=3 {
            let u: Rc<str> = Rc::from(format!("u{n}"));
            l.check(t0, ip(n), &u).unwrap();
        }
        let u: Rc<str> = Rc::from("u9");
        let r = l.check(t0, ip(9), &u).unwrap_err();
        assert_eq!(r.level, Level::Global);
        assert_eq!(r.retry_after_ms(), 1000);
        assert!(l.check(t0 + Duration::from_secs(1), ip(9), &u).is_ok());
    }

    #[test]
    fn retry_after_is_the_longest_wait_among_the_levels() {
        let mut p = params();
        p.user = BucketParams {
            capacity: 1.0,
            refill_per_s: 0.5,
        };
        p.ip = BucketParams {
            capacity: 1.0,
            refill_per_s: 4.0,
        };
        let t0 = Instant::now();
        let mut l = Limits::new(&p, t0);
        let a: Rc<str> = Rc::from("a");
        l.check(t0, ip(1), &a).unwrap();
        // Both the IP (250 ms) and the user (2 s) are empty; the IP refuses
        // first, but retrying before 2 s would fail at the user level.
        let r = l.check(t0, ip(1), &a).unwrap_err();
        assert_eq!(r.level, Level::Ip);
        assert_eq!(r.retry_after_ms(), 2000);
        assert!(l.check(t0 + Duration::from_secs(2), ip(1), &a).is_ok());
    }

    #[test]
    fn an_in_flight_place_is_given_back_when_dropped() {
        let n = Rc::new(Cell::new(0));
        let a = InFlight::try_take(&n, 2).unwrap();
        let b = InFlight::try_take(&n, 2).unwrap();
        assert!(InFlight::try_take(&n, 2).is_none());
        drop(a);
        assert_eq!(n.get(), 1);
        let _c = InFlight::take(&n);
        drop(b);
        assert_eq!(n.get(), 1);
    }

    #[test]
    fn connection_attempts_have_their_own_rate() {
        let t0 = Instant::now();
        let mut l = Limits::new(&params(), t0);
        for _ in 0..20 {
            l.check_connect(t0, ip(1)).unwrap();
        }
        assert_eq!(l.check_connect(t0, ip(1)), Err(Duration::from_millis(500)));
        assert!(l.check_connect(t0, ip(2)).is_ok());
        assert!(l
            .check_connect(t0 + Duration::from_millis(500), ip(1))
            .is_ok());
    }

    #[test]
    fn meters_render_windows() {
        let t0 = Instant::now();
        let mut m = Meters::new(t0);
        m.messages_in.record_n(t0, 30);
        let mut calls = RateMeter::new(t0);
        calls.record(t0);
        let t1 = t0 + Duration::from_secs(1);
        let json: serde_json::Value =
            serde_json::from_str(&m.json(t1, [("llm_calls", &mut calls)])).unwrap();
        let names: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(
            names,
            [
                "connections",
                "llm_calls",
                "messages_in",
                "messages_out",
                "refusals"
            ]
        );
        assert_eq!(json["messages_in"]["1s"], 30);
        assert_eq!(json["messages_in"]["10s"], 3);
        assert_eq!(json["messages_in"]["60s"], 0.5);
        // Sixty complete seconds, oldest first: the meter's first is last.
        let series = json["messages_in"]["last_60s"].as_array().unwrap();
        assert_eq!(series.len(), 60);
        assert_eq!(series[59], 30);
        assert!(series[..59].iter().all(|n| n == 0));
        assert_eq!(json["llm_calls"]["last_60s"][59], 1);
    }
}
