//! Session start, heartbeats, size limits and invalid input, over real
//! sockets.

mod common;
use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;
use tungstenite::Message;

const TOKENS: &str = "[auth]\ntokens = [\"alice:tok-alice-123\", \"bob:tok-bob-456\"]\n";

#[test]
fn hello_with_a_token_names_the_user() {
    let gw = Gateway::start(TOKENS, &[]);
    let (_ws, ack) = gw.session(Some("tok-alice-123"));
    assert_eq!(ack["op"], "hello_ack");
    assert_eq!(ack["ok"], true);
    assert_eq!(ack["user"], "alice");
    assert!(ack["session_id"].as_str().unwrap().len() >= 16);
    assert!(ack["server"].as_str().unwrap().starts_with("hivegate/"));
    assert_eq!(ack["limits"]["max_message_bytes"], 65536);
}

#[test]
fn a_wrong_or_missing_token_gets_4003() {
    let gw = Gateway::start(TOKENS, &[]);
    for token in [Some("nope"), None] {
        let (mut ws, ack) = gw.session(token);
        assert_eq!(
            ack,
            json!({"op":"hello_ack","ok":false,"error":"unauthorized"})
        );
        assert_eq!(expect_close(&mut ws), Some(4003));
    }
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"4003\"}"),
        2.0
    );
}

#[test]
fn a_bearer_token_at_upgrade_time_is_checked() {
    let gw = Gateway::start(TOKENS, &[]);
    let err = gw
        .ws_from(None, &[("Authorization", "Bearer wrong")])
        .unwrap_err();
    assert_eq!(err.status, 401);
    let mut ws = gw
        .ws_from(None, &[("Authorization", "Bearer tok-bob-456")])
        .unwrap();
    send_json(&mut ws, &json!({"op":"hello"}));
    let ack = recv_json(&mut ws);
    assert_eq!(ack["user"], "bob");
    assert_eq!(
        gw.metric("hivegate_connections_refused_total{reason=\"unauthorized\"}"),
        1.0
    );
}

#[test]
fn open_mode_generates_names() {
    let gw = Gateway::start("", &[]);
    let (_a, ack_a) = gw.session(None);
    let (_b, ack_b) = gw.session(None);
    let (a, b) = (
        ack_a["user"].as_str().unwrap(),
        ack_b["user"].as_str().unwrap(),
    );
    assert!(a.starts_with("guest-") && b.starts_with("guest-") && a != b);
    assert!(gw.log_text().contains("open mode"));
    assert!(ack_a.get("notice").is_none());
    // A token that signs nobody in (the protocol document's example has
    // one) makes a guest too, told so, and is no failed sign-in: six of
    // them do not lock the address out.
    for _ in 0..6 {
        let (_ws, ack) = gw.session(Some("..."));
        assert_eq!(ack["ok"], true, "{ack}");
        assert!(ack["user"].as_str().unwrap().starts_with("guest-"));
        assert!(ack["notice"].as_str().unwrap().contains("guest"), "{ack}");
    }
}

#[test]
fn no_hello_in_time_gets_4002() {
    let gw = Gateway::start("[server]\nhello_timeout_ms = 300\n", &[]);
    let mut ws = gw.ws();
    assert_eq!(expect_close(&mut ws), Some(4002));
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"4002\"}"),
        1.0
    );
}

#[test]
fn another_op_before_hello_gets_4001() {
    let gw = Gateway::start("", &[]);
    let mut ws = gw.ws();
    send_json(&mut ws, &json!({"op":"ping"}));
    assert_eq!(expect_close(&mut ws), Some(4001));
}

#[test]
fn application_ping_gets_pong_with_the_request_id() {
    let gw = Gateway::start("", &[]);
    let (mut ws, _) = gw.session(None);
    send_json(&mut ws, &json!({"op":"ping","request_id":"p1"}));
    assert_eq!(recv_json(&mut ws), json!({"op":"pong","request_id":"p1"}));
    assert!(gw.metric("hivegate_frames_received_total") >= 2.0);
    assert!(gw.metric("hivegate_frames_sent_total") >= 2.0);
}

#[test]
fn a_client_that_never_answers_pings_gets_4009() {
    let gw = Gateway::start(
        "[server]\nping_interval_ms = 100\npong_timeout_ms = 200\n",
        &[],
    );
    let (mut ws, _) = gw.session(None);
    // tungstenite answers pings only while reading: read nothing until the
    // gateway has given up on the pong.
    let closed = "hivegate_connections_closed_total{code=\"4009\"}";
    assert_eq!(gw.wait_metric(closed, 1.0, Duration::from_secs(10)), 1.0);
    assert_eq!(expect_close(&mut ws), Some(4009));
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"4009\"}"),
        1.0
    );
}

#[test]
fn a_client_that_answers_pings_stays() {
    let gw = Gateway::start(
        "[server]\nping_interval_ms = 100\npong_timeout_ms = 200\n",
        &[],
    );
    let (mut ws, _) = gw.session(None);
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_millis(1000);
    let mut pings = 0;
    while std::time::Instant::now() < end {
        match ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Close(c)) => panic!("closed: {c:?}"),
            _ => {}
        }
        let _ = ws.flush();
    }
    assert!(pings >= 3, "saw {pings} pings");
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    send_json(&mut ws, &json!({"op":"ping"}));
    assert_eq!(recv_json(&mut ws)["op"], "pong");
}

#[test]
fn an_oversized_message_gets_1009() {
    let gw = Gateway::start("[server]\nmax_message_bytes = 1024\n", &[]);
    let (mut ws, _) = gw.session(None);
    let big = json!({"op":"ping","pad":"x".repeat(2000)});
    let _ = ws.send(Message::text(big.to_string()));
    assert_eq!(expect_close(&mut ws), Some(1009));
    // A message just under the limit is fine on another connection.
    let (mut ws, _) = gw.session(None);
    send_json(&mut ws, &json!({"op":"ping","pad":"x".repeat(900)}));
    assert_eq!(recv_json(&mut ws)["op"], "pong");
}

#[test]
fn invalid_requests_get_errors_then_4000() {
    let gw = Gateway::start("", &[]);
    let (mut ws, _) = gw.session(None);
    ws.send(Message::text("{not json")).unwrap();
    let e = recv_json(&mut ws);
    assert_eq!(e["op"], "error");
    assert_eq!(e["error"]["code"], "INVALID_REQUEST");
    send_json(&mut ws, &json!({"op":"teleport","request_id":"t1"}));
    let e = recv_json(&mut ws);
    assert_eq!(e["request_id"], "t1");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown op"));
    for _ in 0..8 {
        ws.send(Message::text("]")).unwrap();
    }
    assert_eq!(expect_close(&mut ws), Some(4000));
}

/// Frames tungstenite would refuse to send, written by hand.
fn raw_session(gw: &Gateway) -> std::net::TcpStream {
    let ws = gw.ws();
    ws.into_inner()
}

fn raw_close_code(mut s: std::net::TcpStream, frame: &[u8]) -> Option<u16> {
    s.write_all(frame).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    // Find the close frame (opcode 0x8) and read its code.
    let pos = out.iter().position(|b| *b == 0x88)?;
    Some(u16::from_be_bytes([out[pos + 2], out[pos + 3]]))
}

#[test]
fn frames_that_break_rfc_6455_get_its_close_codes() {
    let gw = Gateway::start("", &[]);
    assert_eq!(
        raw_close_code(raw_session(&gw), &raw_frame(0x1, b"\xff\xfe")),
        Some(1007)
    );
    assert_eq!(
        raw_close_code(raw_session(&gw), &raw_frame(0x2, b"bin")),
        Some(1003)
    );
    assert_eq!(
        raw_close_code(raw_session(&gw), &raw_frame(0x3, b"x")),
        Some(1002)
    );
    // An unmasked client frame.
    assert_eq!(raw_close_code(raw_session(&gw), b"\x81\x02hi"), Some(1002));
}

#[test]
fn logs_never_contain_a_token() {
    let gw = Gateway::start(TOKENS, &[]);
    let (_ws, ack) = gw.session(Some("tok-alice-123"));
    assert_eq!(ack["ok"], true);
    let (mut ws, _) = gw.session(Some("tok-guess-999"));
    expect_close(&mut ws);
    let _ = gw.ws_from(None, &[("Authorization", "Bearer tok-bearer-777")]);
    // The lines that would hold the tokens are there before the search.
    gw.wait_log("hello refused", 1);
    gw.wait_log("sign-in refused", 1);
    let log = gw.log_text();
    assert!(log.contains("hello"), "{log}");
    for secret in ["tok-alice-123", "tok-guess-999", "tok-bearer-777"] {
        assert!(!log.contains(secret), "log leaked {secret}:\n{log}");
    }
    assert!(!gw.get("/metrics").body.contains("tok-"));
}

#[test]
fn every_log_line_about_a_connection_names_it() {
    let gw = Gateway::start("", &[]);
    let (mut ws, _) = gw.session(None);
    ws.close(None).unwrap();
    let _ = expect_close(&mut ws);
    gw.wait_log(" closed ", 1);
    let log = gw.log_text();
    for event in [" connected ", " hello ", " closed "] {
        let line = log
            .lines()
            .find(|l| l.contains(event))
            .unwrap_or_else(|| panic!("no {event} in {log}"));
        assert!(line.contains("conn=1"), "{line}");
    }
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"1000\"}"),
        1.0
    );
}
