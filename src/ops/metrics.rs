//! The gateway's counters, rendered in the Prometheus text format (0.0.4).
//!
//! Plain `Cell`s on the one event-loop thread: counting costs an add, and a
//! scrape renders a few dozen lines.

use crate::protocol::Close;
use std::cell::Cell;
use std::fmt::Write as _;

/// Why a client was turned away before it had a connection slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    GlobalCap,
    IpCap,
    IpRate,
    HandshakeTimeout,
    /// The handshake table was full: the oldest pending one was dropped.
    HandshakeEvicted,
    HandshakeIpCap,
    BadRequest,
    Unauthorized,
    Origin,
    Draining,
    Memory,
    HelloCooldown,
    TlsHandshake,
    /// A `Host` this box does not answer to (DNS rebinding).
    Host,
}

impl Refusal {
    const ALL: [Refusal; 14] = [
        Refusal::GlobalCap,
        Refusal::IpCap,
        Refusal::IpRate,
        Refusal::HandshakeTimeout,
        Refusal::HandshakeEvicted,
        Refusal::HandshakeIpCap,
        Refusal::BadRequest,
        Refusal::Unauthorized,
        Refusal::Origin,
        Refusal::Draining,
        Refusal::Memory,
        Refusal::HelloCooldown,
        Refusal::TlsHandshake,
        Refusal::Host,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::GlobalCap => "global_cap",
            Refusal::IpCap => "ip_cap",
            Refusal::IpRate => "ip_rate",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::HandshakeEvicted => "handshake_evicted",
            Refusal::HandshakeIpCap => "handshake_ip_cap",
            Refusal::BadRequest => "bad_request",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Origin => "origin",
            Refusal::Draining => "draining",
            Refusal::Memory => "memory",
            Refusal::HelloCooldown => "hello_cooldown",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::Host => "host",
        }
    }
}

/// Why the access rules refused a signed-in session something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Join,
    Read,
    Publish,
    React,
    /// A provider (or any provider) of the `chat` tool.
    Provider,
    /// The daily LLM token budget is spent.
    Budget,
    /// A reload took a session out of a room it may no longer be in.
    Revoked,
}

impl Denial {
    const ALL: [Denial; 7] = [
        Denial::Join,
        Denial::Read,
        Denial::Publish,
        Denial::React,
        Denial::Provider,
        Denial::Budget,
        Denial::Revoked,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Denial::Join => "join",
            Denial::Read => "read",
            Denial::Publish => "publish",
            Denial::React => "react",
            Denial::Provider => "provider",
            Denial::Budget => "budget",
            Denial::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    denied: [Cell<u64>; Denial::ALL.len()],
    pub accepted: Cell<u64>,
    refused: [Cell<u64>; Refusal::ALL.len()],
    closed: [Cell<u64>; Close::ALL.len()],
    /// Closes with a code the gateway does not know: a client's own.
    closed_other: Cell<u64>,
    pub frames_in: Cell<u64>,
    pub frames_out: Cell<u64>,
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
    pub slow_consumers: Cell<u64>,
    pub invalid_requests: Cell<u64>,
    pub abuse_closes: Cell<u64>,
    pub deliveries: Cell<u64>,
    pub fanout_slow: Cell<u64>,
    pub http_requests: Cell<u64>,
    /// SIGHUP reloads applied, and refused (the old settings kept).
    pub reloads: Cell<u64>,
    pub reloads_failed: Cell<u64>,
    /// Requests on MCP's HTTP transport.
    pub mcp_requests: Cell<u64>,
    /// Messages of MCP WebSocket sessions.
    pub mcp_requests_ws: Cell<u64>,
    /// Requests to the OpenAI-compatible endpoint.
    pub openai_requests: Cell<u64>,
    /// From accept to the upgrade's answer (or an API request admitted).
    pub handshake: super::histogram::Histogram,
}

pub fn inc(c: &Cell<u64>) {
    add(c, 1);
}

pub fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}

/// Values that live elsewhere and are read at scrape time.
pub struct Gauges {
    pub connections_open: usize,
    pub table_capacity: usize,
    pub handshakes_pending: usize,
    pub draining: bool,
    /// The relay's access refusals (it counts its own).
    pub denied_provider: u64,
    pub denied_budget: u64,
}

impl Metrics {
    pub fn refused(&self, why: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|r| *r == why) {
            inc(&self.refused[i]);
        }
    }

    pub fn denied(&self, why: Denial) {
        if let Some(i) = Denial::ALL.iter().position(|d| *d == why) {
            inc(&self.denied[i]);
        }
    }

    /// Counts a close by its code: the gateway's own come from [`Close`],
    /// and any other is a client's, counted as `other`.
    pub fn closed(&self, code: u16) {
        match Close::ALL.iter().position(|c| c.code() == code) {
            Some(i) => inc(&self.closed[i]),
            None => inc(&self.closed_other),
        }
    }

    pub fn render(&self, g: &Gauges, out: &mut String) {
        let name = "hivegate_handshake_seconds";
        super::histogram::family(
            out,
            name,
            "From accept to the WebSocket upgrade's answer or an HTTP API request admitted (TLS and the request head included).",
        );
        self.handshake.write(out, name, "");
        gauge(
            out,
            "hivegate_connections_open",
            "Open WebSocket connections.",
            g.connections_open as u64,
        );
        gauge(
            out,
            "hivegate_connection_table_capacity",
            "Slots in the connection table.",
            g.table_capacity as u64,
        );
        gauge(
            out,
            "hivegate_handshakes_pending",
            "Sockets still in their HTTP handshake.",
            g.handshakes_pending as u64,
        );
        gauge(
            out,
            "hivegate_draining",
            "1 while shutting down.",
            u64::from(g.draining),
        );
        counter(
            out,
            "hivegate_connections_accepted_total",
            "WebSocket connections admitted.",
            self.accepted.get(),
        );
        header(
            out,
            "hivegate_connections_refused_total",
            "Clients refused before the upgrade, by reason.",
            "counter",
        );
        for (r, c) in Refusal::ALL.iter().zip(&self.refused) {
            let _ = writeln!(
                out,
                "hivegate_connections_refused_total{{reason=\"{}\"}} {}",
                r.label(),
                c.get()
            );
        }
        header(
            out,
            "hivegate_connections_closed_total",
            "WebSocket connections closed, by close code (1006: no close frame).",
            "counter",
        );
        for (close, c) in Close::ALL.iter().zip(&self.closed) {
            let _ = writeln!(
                out,
                "hivegate_connections_closed_total{{code=\"{}\"}} {}",
                close.code(),
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "hivegate_connections_closed_total{{code=\"other\"}} {}",
            self.closed_other.get()
        );
        counter(
            out,
            "hivegate_frames_received_total",
            "WebSocket data frames received.",
            self.frames_in.get(),
        );
        counter(
            out,
            "hivegate_frames_sent_total",
            "WebSocket data frames sent.",
            self.frames_out.get(),
        );
        counter(
            out,
            "hivegate_received_bytes_total",
            "Payload bytes received.",
            self.bytes_in.get(),
        );
        counter(
            out,
            "hivegate_sent_bytes_total",
            "Payload bytes sent.",
            self.bytes_out.get(),
        );
        counter(
            out,
            "hivegate_slow_consumer_closes_total",
            "Connections closed because their outbound queue was full.",
            self.slow_consumers.get(),
        );
        counter(
            out,
            "hivegate_invalid_requests_total",
            "Frames answered with INVALID_REQUEST.",
            self.invalid_requests.get(),
        );
        counter(
            out,
            "hivegate_deliveries_total",
            "Room frames queued for members (messages, reactions, presence).",
            self.deliveries.get(),
        );
        counter(
            out,
            "hivegate_fanout_slow_consumers_total",
            "Fan-outs that found a member's outbox full.",
            self.fanout_slow.get(),
        );
        counter(
            out,
            "hivegate_abuse_closes_total",
            "Connections closed with 1008 for abuse: repeated rate-limit refusals, ping or pong floods, endless fragments.",
            self.abuse_closes.get(),
        );
        counter(
            out,
            "hivegate_http_requests_total",
            "Plain HTTP requests answered.",
            self.http_requests.get(),
        );
        let denied: Vec<(&str, u64)> = Denial::ALL
            .iter()
            .zip(&self.denied)
            .map(|(d, c)| {
                let relay = match d {
                    Denial::Provider => g.denied_provider,
                    Denial::Budget => g.denied_budget,
                    _ => 0,
                };
                (d.label(), c.get() + relay)
            })
            .collect();
        counter_with(
            out,
            "hivegate_access_denied_total",
            "Requests of signed-in sessions the access rules refused, by what was asked (revoked: taken out of a room by a reload).",
            "reason",
            &denied,
        );
        counter_with(
            out,
            "hivegate_config_reloads_total",
            "SIGHUP reloads: applied, or failed (the configuration was invalid and the old one stays).",
            "result",
            &[
                ("applied", self.reloads.get()),
                ("failed", self.reloads_failed.get()),
            ],
        );
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {v}");
}

pub fn counter_f(out: &mut String, name: &str, help: &str, v: f64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {v}");
}

pub fn gauge_f(out: &mut String, name: &str, help: &str, v: f64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {v}");
}

pub fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {v}");
}

/// A counter with one label, a line per value.
pub fn counter_with(out: &mut String, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
    header(out, name, help, "counter");
    for (l, v) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{l}\"}} {v}");
    }
}

/// A gauge with one label, a line per value.
pub fn gauge_with(out: &mut String, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
    header(out, name, help, "gauge");
    for (l, v) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{l}\"}} {v}");
    }
}

/// A fractional gauge with one label.
pub fn gauge_f64_with(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, f64)],
) {
    header(out, name, help, "gauge");
    for (l, v) in values {
        let _ = writeln!(
            out,
            "{name}{{{label}=\"{l}\"}} {}",
            crate::json::fmt_f64(*v)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_counters() {
        let m = Metrics::default();
        m.refused(Refusal::IpCap);
        m.refused(Refusal::IpCap);
        m.closed(4008);
        m.closed(4242);
        let mut out = String::new();
        m.render(
            &Gauges {
                connections_open: 3,
                table_capacity: 10,
                handshakes_pending: 0,
                draining: false,
                denied_provider: 0,
                denied_budget: 0,
            },
            &mut out,
        );
        assert!(out.contains("hivegate_connections_refused_total{reason=\"ip_cap\"} 2\n"));
        assert!(out.contains("hivegate_connections_closed_total{code=\"4008\"} 1\n"));
        // A client's own code is not taken for one of the gateway's.
        assert!(out.contains("hivegate_connections_closed_total{code=\"1011\"} 0\n"));
        assert!(out.contains("hivegate_connections_closed_total{code=\"other\"} 1\n"));
        assert!(
            out.contains("# TYPE hivegate_connections_open gauge\nhivegate_connections_open 3\n")
        );
    }
}
