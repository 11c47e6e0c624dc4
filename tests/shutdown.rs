//! Graceful shutdown: SIGTERM closes every client with 1001, turns /readyz
//! to 503 while draining, and exits 0; a second signal exits at once.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn sigterm_closes_everyone_with_1001_and_exits_0() {
    let mut gw = Gateway::start("", &[]);
    let mut clients: Vec<_> = (0..5).map(|_| gw.session(None).0).collect();
    gw.signal(libc::SIGTERM);
    for ws in &mut clients {
        assert_eq!(expect_close(ws), Some(1001));
    }
    drop(clients);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    let log = gw.log_text();
    assert!(log.contains("shutting down signal=SIGTERM"), "{log}");
    assert!(log.contains("stopped exit=0"), "{log}");
}

#[test]
fn readyz_turns_503_and_upgrades_are_refused_while_draining() {
    let mut gw = Gateway::start("[server]\ndrain_timeout_ms = 3000\n", &[]);
    // A client that never reads keeps its slot for the close grace period.
    let (lingering, _) = gw.session(None);
    gw.signal(libc::SIGTERM);
    gw.wait_until("the drain", || gw.get("/readyz").status == 503);
    let r = gw.get("/readyz");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("\"status\":\"draining\""));
    assert_eq!(gw.ws_from(None, &[]).unwrap_err().status, 503);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    drop(lingering);
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut gw = Gateway::start("[server]\ndrain_timeout_ms = 60000\n", &[]);
    let (_lingering, _) = gw.session(None);
    gw.signal(libc::SIGINT);
    gw.wait_log("shutting down", 1);
    gw.signal(libc::SIGINT);
    assert_eq!(gw.wait_exit(Duration::from_secs(5)), Some(130));
}

#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let path_text = path.display().to_string();
    let mut gw = Gateway::start(
        "",
        &[("NOTIFY_SOCKET", &path_text), ("WATCHDOG_USEC", "200000")],
    );
    let mut heard = Vec::new();
    let mut buf = [0u8; 256];
    let mut next = |heard: &mut Vec<String>| {
        let n = sock.recv(&mut buf).expect("a notification");
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    };
    while !heard.iter().any(|h| h == "READY=1") || !heard.iter().any(|h| h == "WATCHDOG=1") {
        next(&mut heard);
    }
    while !heard
        .iter()
        .any(|h| h.starts_with("STATUS=") && h.contains("connections, online"))
    {
        next(&mut heard);
    }
    gw.signal(libc::SIGTERM);
    while !heard.iter().any(|h| h == "STOPPING=1") {
        next(&mut heard);
    }
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_tool_call_in_flight_is_answered_before_the_close() {
    use common::fake_openai::{Behaviour, FakeOpenAi};
    use serde_json::json;
    let fake = FakeOpenAi::start(Behaviour::Stall);
    let cfg = format!(
        "[provider.kimi]\nbase_url = \"{}\"\nmodel = \"m\"\n",
        fake.base_url()
    );
    let mut gw = Gateway::start(&cfg, &[]);
    let (mut ws, _) = gw.session(None);
    let call = json!({"op":"call_tool","request_id":"c1","name":"chat",
        "arguments":{"messages":[{"role":"user","content":"hi"}]}});
    send_json(&mut ws, &call);
    while recv_json(&mut ws)["op"] != "call_tool_ack" {}
    // The same over MCP on the WebSocket: a tools/call in flight.
    let mut mcp = gw
        .ws_from(None, &[("Sec-WebSocket-Protocol", "mcp")])
        .expect("mcp upgrade");
    let mcp_call = json!({"jsonrpc":"2.0","id":7,"method":"tools/call",
        "params":{"name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]}}});
    send_json(&mut mcp, &mcp_call);
    gw.wait_until("the upstream to hold both calls", || {
        fake.requests().len() >= 2
    });
    assert_eq!(fake.requests().len(), 2, "a call was sent upstream twice");
    gw.signal(libc::SIGTERM);
    let answer = recv_json(&mut mcp);
    assert_eq!(answer["id"], 7, "{answer}");
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    let text = answer["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("OVER_CAPACITY") && text.contains("shutting down"),
        "{answer}"
    );
    assert_eq!(expect_close(&mut mcp), Some(1001));
    // The upstream never answers: the drain does not wait for it, and the
    // caller hears why its call ends.
    let last = loop {
        let v = recv_json(&mut ws);
        if v["request_id"] == "c1" {
            break v;
        }
    };
    assert_eq!(last["op"], "error", "{last}");
    assert_eq!(last["error"]["code"], "OVER_CAPACITY", "{last}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{last}"
    );
    assert_eq!(expect_close(&mut ws), Some(1001));
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}
