//! Behind a real reverse proxy (HAProxy, started here on loopback ports):
//! with `server.trusted_proxies`, each client behind it is itself for the
//! per-address limits and the logs, whether the proxy says so in
//! `X-Forwarded-For` (HTTP mode) or in a PROXY protocol v2 header (TCP
//! mode); what a client claims in its own headers, through the proxy or
//! straight to the gateway, changes nothing.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// HAProxy in the foreground, killed (by its PID) when dropped.
struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// An HTTP front (`X-Forwarded-For`) to `http_gw`, and a TCP front that
/// sends a PROXY v2 header to `tcp_gw`; returns their addresses.
fn haproxy(http_gw: SocketAddr, tcp_gw: SocketAddr) -> (Haproxy, SocketAddr, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let (http_front, tcp_front) = (free_port(), free_port());
    let cfg = format!(
        "global\n  maxconn 200\n\
         defaults\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  timeout tunnel 60s\n\
         frontend web\n  mode http\n  bind {http_front}\n  option forwardfor\n  default_backend gw\n\
         backend gw\n  mode http\n  server g1 {http_gw}\n\
         frontend raw\n  mode tcp\n  bind {tcp_front}\n  default_backend gw2\n\
         backend gw2\n  mode tcp\n  server g2 {tcp_gw} send-proxy-v2\n"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy (apt install haproxy)");
    let proxy = Haproxy { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    for front in [http_front, tcp_front] {
        while TcpStream::connect(front).is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {front}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (proxy, http_front, tcp_front)
}

/// A WebSocket upgrade to `to` from the loopback address `from`, with
/// `extra` bytes before it and `headers` in it: the status, and the socket
/// (kept open by the caller while it counts).
fn upgrade(to: SocketAddr, from: &str, extra: &[u8], headers: &str) -> (u16, TcpStream) {
    let mut s = connect_from(to, Some(from.parse::<IpAddr>().unwrap()));
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    s.write_all(&[extra, request.as_bytes()].concat()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, s)
}

#[test]
#[cfg_attr(
    missing_haproxy,
    ignore = "haproxy is not installed (apt install haproxy)"
)]
fn behind_haproxy_each_client_is_itself_and_a_spoofed_address_changes_nothing() {
    let limits = "trusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_ip = 2\n";
    let by_header = Gateway::start(&format!("[server]\n{limits}"), &[]);
    let by_proxy_protocol =
        Gateway::start(&format!("[server]\n{limits}proxy_protocol = true\n"), &[]);
    let (_haproxy, http_front, tcp_front) = haproxy(by_header.addr, by_proxy_protocol.addr);

    for (front, gw) in [(http_front, &by_header), (tcp_front, &by_proxy_protocol)] {
        // Two clients behind the proxy, each with its own share of two
        // connections, whatever they claim to be.
        let spoof = "X-Forwarded-For: 6.6.6.6\r\n";
        let mut held = Vec::new();
        for _ in 0..2 {
            let (status, s) = upgrade(front, "127.0.0.2", b"", spoof);
            assert_eq!(status, 101, "through {front}");
            held.push(s);
        }
        let (status, _) = upgrade(front, "127.0.0.2", b"", spoof);
        assert_eq!(status, 429, "127.0.0.2's third connection through {front}");
        let (status, s) = upgrade(front, "127.0.0.3", b"", "");
        assert_eq!(status, 101, "127.0.0.3 is another client through {front}");
        held.push(s);
        gw.wait_log(" connected ", 3);
        let log = gw.log_text();
        for client in ["127.0.0.2", "127.0.0.3"] {
            assert!(
                log.contains(&format!("ip={client}")),
                "{client} not in:\n{log}"
            );
        }
        assert!(
            !log.contains("6.6.6.6") && !log.contains("ip=127.0.0.1 "),
            "{log}"
        );
        drop(held);
    }

    // Straight to the gateway from an address it does not trust: the
    // header is ignored and the socket's address counts.
    let mut held = Vec::new();
    for claimed in ["127.0.0.8", "127.0.0.9"] {
        let (status, s) = upgrade(
            by_header.addr,
            "127.0.0.4",
            b"",
            &format!("X-Forwarded-For: {claimed}\r\nForwarded: for={claimed}\r\n"),
        );
        assert_eq!(status, 101);
        held.push(s);
    }
    let (status, _) = upgrade(
        by_header.addr,
        "127.0.0.4",
        b"",
        "X-Forwarded-For: 127.0.0.10\r\n",
    );
    assert_eq!(
        status, 429,
        "the spoofed header made 127.0.0.4 someone else"
    );
    assert!(!by_header.log_text().contains("127.0.0.8"));
    // A PROXY header from an untrusted address is not a header: a
    // malformed request.
    let (status, _) = upgrade(
        by_proxy_protocol.addr,
        "127.0.0.4",
        b"PROXY TCP4 127.0.0.9 127.0.0.1 1 2\r\n",
        "",
    );
    assert_eq!(status, 400);
    // A trusted proxy that does not send the header is refused: a
    // client could otherwise reach the gateway through it unnamed.
    let (status, _) = upgrade(by_proxy_protocol.addr, "127.0.0.1", b"", "");
    assert_eq!(status, 0, "answered without a PROXY header");
}
