//! The connection table's bounds: global cap, per-IP cap, slot reuse, and
//! the bounded outbox that turns a client who never reads into a counted
//! 4008 instead of unbounded memory.

mod common;
use common::*;
use serde_json::json;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tungstenite::Message;

#[test]
fn the_1001st_connection_gets_503_and_freed_slots_are_reused() {
    raise_fd_limit();
    // Per-IP cap and connection rate out of the way: this test is about
    // the global cap.
    let gw = Gateway::start(
        "[server]\nmax_connections_per_ip = 2000\n[limits]\nip_connect_capacity = 5000\n",
        &[],
    );
    let mut open = Vec::new();
    for _ in 0..1000 {
        open.push(gw.ws());
    }
    let err = gw.ws_from(None, &[]).unwrap_err();
    assert_eq!(err.status, 503);
    assert_eq!(err.header("retry-after").as_deref(), Some("5"));
    assert_eq!(gw.metric("hivegate_connections_open"), 1000.0);
    assert_eq!(
        gw.metric("hivegate_connections_refused_total{reason=\"global_cap\"}"),
        1.0
    );
    // /healthz still answers when the table is full.
    assert_eq!(gw.get("/healthz").status, 200);

    // Free ten slots; ten new clients get them.
    for mut ws in open.drain(..10) {
        ws.close(None).unwrap();
        let _ = expect_close(&mut ws);
    }
    let end = Instant::now() + Duration::from_secs(10);
    while gw.metric("hivegate_connections_open") > 990.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..10 {
        open.push(gw.ws());
    }
    assert_eq!(gw.ws_from(None, &[]).unwrap_err().status, 503);
}

#[test]
fn the_11th_connection_from_one_ip_gets_429() {
    let gw = Gateway::start("", &[]);
    let a: IpAddr = "127.0.0.2".parse().unwrap();
    let b: IpAddr = "127.0.0.3".parse().unwrap();
    let mut from_a: Vec<_> = (0..10).map(|_| gw.ws_from(Some(a), &[]).unwrap()).collect();
    let err = gw.ws_from(Some(a), &[]).unwrap_err();
    assert_eq!(err.status, 429);
    assert_eq!(err.header("retry-after").as_deref(), Some("5"));
    // Another address is not affected.
    let _other = gw.ws_from(Some(b), &[]).unwrap();
    assert_eq!(
        gw.metric("hivegate_connections_refused_total{reason=\"ip_cap\"}"),
        1.0
    );

    // The share is released on every way out: a clean close, a vanished
    // client, a hello timeout.
    let mut clean = from_a.pop().unwrap();
    clean.close(None).unwrap();
    let _ = expect_close(&mut clean);
    drop(from_a.pop());
    let end = Instant::now() + Duration::from_secs(10);
    while gw.metric("hivegate_connections_open") > 9.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _x = gw.ws_from(Some(a), &[]).unwrap();
    let _y = gw.ws_from(Some(a), &[]).unwrap();
    assert_eq!(gw.ws_from(Some(a), &[]).unwrap_err().status, 429);
}

#[test]
fn the_per_ip_share_is_released_after_a_timeout_close() {
    let gw = Gateway::start(
        "[server]\nmax_connections_per_ip = 1\nhello_timeout_ms = 200\n",
        &[],
    );
    let ip: IpAddr = "127.0.0.9".parse().unwrap();
    let mut ws = gw.ws_from(Some(ip), &[]).unwrap();
    assert_eq!(gw.ws_from(Some(ip), &[]).unwrap_err().status, 429);
    assert_eq!(expect_close(&mut ws), Some(4002));
    drop(ws);
    let end = Instant::now() + Duration::from_secs(10);
    while gw.metric("hivegate_connections_open") > 0.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gw.ws_from(Some(ip), &[]).is_ok());
}

#[test]
fn a_client_that_never_reads_is_closed_4008_while_others_are_served() {
    // Rate limits out of the way: this test floods on purpose.
    let gw = Gateway::start(
        &format!("[server]\noutbox_frames = 8\noutbox_bytes = 4096\n[chat]\nmax_text_bytes = 128\n{NO_RATE_LIMITS}"),
        &[],
    );
    let (mut polite, _) = gw.session(None);
    let (slow, _) = gw.session(None);
    let mut stream = slow.into_inner();
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    // Ask for answers and never read them, until the gateway hangs up.
    let ping = json!({"op":"ping","request_id":"x".repeat(64)}).to_string();
    let frame = raw_frame(0x1, ping.as_bytes());
    let burst: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 1000)
        .collect();
    let end = Instant::now() + Duration::from_secs(30);
    let mut served = 0;
    while Instant::now() < end {
        if stream.write_all(&burst).is_err() {
            break;
        }
        // The polite client keeps getting answers meanwhile.
        send_json(&mut polite, &json!({"op":"ping","request_id":"p"}));
        assert_eq!(recv_json(&mut polite)["request_id"], "p");
        served += 1;
        if gw.metric("hivegate_slow_consumer_closes_total") >= 1.0 {
            break;
        }
    }
    assert!(served > 0);
    assert_eq!(
        gw.wait_metric(
            "hivegate_slow_consumer_closes_total",
            1.0,
            Duration::from_secs(10)
        ),
        1.0
    );
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"4008\"}"),
        1.0
    );
    // Its slot is freed.
    let end = Instant::now() + Duration::from_secs(10);
    while gw.metric("hivegate_connections_open") > 1.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(gw.metric("hivegate_connections_open"), 1.0);
    send_json(&mut polite, &json!({"op":"ping"}));
    assert_eq!(recv_json(&mut polite)["op"], "pong");
    let _ = polite.send(Message::Close(None));
}

#[test]
fn over_the_memory_limit_new_connections_are_shed_and_open_ones_served() {
    // A connection is opened under a generous limit; then a reload sets
    // one the gateway is over (its RSS is several MiB).
    let gw = Gateway::start("[server]\nmemory_limit_bytes = 1073741824\n", &[]);
    let (mut open, _) = gw.session(None);
    let path = gw.dir.path().join("hivegate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("1073741824", "1048576")).unwrap();
    gw.signal(libc::SIGHUP);
    let end = Instant::now() + Duration::from_secs(5);
    while gw.metric("hivegate_shedding") == 0.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready = gw.get("/readyz");
    assert_eq!(ready.status, 503);
    assert!(
        ready.body.contains("\"status\":\"shedding\""),
        "{}",
        ready.body
    );
    let refused = gw.ws_from(None, &[]).unwrap_err();
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        gw.metric("hivegate_connections_refused_total{reason=\"memory\"}"),
        1.0
    );
    // The connection already open keeps being served.
    send_json(&mut open, &json!({"op":"ping"}));
    assert_eq!(recv_json(&mut open)["op"], "pong");
    assert!(gw.metric("process_resident_memory_bytes") > 1048576.0);
}
