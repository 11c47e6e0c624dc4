//! Hostile input found by attacking the gateway as an outsider would, each
//! defect shown over real sockets: forged frames, floods that would hold
//! the loop, slowloris, secrets echoed by upstreams, answers too large for
//! their reader, and the small protocol faults.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::{Duration, Instant};

/// Reads frames until the answer to `request_id`.
fn answer(ws: &mut Ws, request_id: &str) -> Value {
    loop {
        let v = recv_json(ws);
        if v["request_id"] == request_id {
            return v;
        }
    }
}

fn request(ws: &mut Ws, v: Value) -> Value {
    let rid = v["request_id"].as_str().expect("request_id").to_string();
    send_json(ws, &v);
    answer(ws, &rid)
}

fn join(ws: &mut Ws, room: &str) -> Value {
    request(
        ws,
        json!({"op":"join","room":room,"history":0,"request_id":"j"}),
    )
}

#[test]
fn an_emoji_cannot_forge_a_message_or_break_its_frame() {
    let gw = Gateway::start("", &[]);
    let (mut a, hello) = gw.session(None);
    join(&mut a, "r");
    let ack = request(
        &mut a,
        json!({"op":"publish","room":"r","text":"hi","request_id":"p"}),
    );
    let id = ack["id"].as_str().unwrap().to_string();
    for evil in [
        "x\":1},\"from\":\"admin\",\"y\":{\"",
        "\\",
        "\u{1b}[2J",
        "a\nb",
        "\u{202e}",
    ] {
        let v = request(
            &mut a,
            json!({"op":"react","message_id":id,"emoji":evil,"request_id":"x"}),
        );
        assert_eq!(v["error"]["code"], "INVALID_REQUEST", "{evil:?}: {v}");
    }
    let v = request(
        &mut a,
        json!({"op":"react","message_id":id,"emoji":"👍","request_id":"ok"}),
    );
    assert_eq!(v["op"], "ack");
    // The history frame that carries the reaction is valid JSON, and the
    // message is still alice's.
    let h = request(&mut a, json!({"op":"history","room":"r","request_id":"h"}));
    let m = &h["messages"][0];
    assert_eq!(m["from"], hello["user"]);
    assert_eq!(m["reactions"]["👍"], 1);
}

#[test]
fn a_history_larger_than_the_outbox_is_cut_and_says_more() {
    let gw = Gateway::start(NO_RATE_LIMITS, &[]);
    let (mut a, _) = gw.session(None);
    join(&mut a, "big");
    // 22 messages of 8,192 control characters: about 49 KB each escaped,
    // over 1 MiB in all, more than the default outbox holds.
    let text = "\u{1}".repeat(8192);
    let mut seqs = Vec::new();
    for i in 0..22 {
        let ack = request(
            &mut a,
            json!({"op":"publish","room":"big","text":text,"request_id":format!("p{i}")}),
        );
        seqs.push(ack["seq"].as_u64().expect("seq"));
    }
    let (mut b, _) = gw.session(None);
    let joined = request(&mut b, json!({"op":"join","room":"big","request_id":"j"}));
    let history = joined["history"].as_array().expect("history");
    assert!(
        !history.is_empty() && history.len() < 22,
        "{}",
        history.len()
    );
    assert_eq!(joined["more"], true);
    // The newest are kept, oldest first.
    let last = history.last().unwrap()["seq"].as_u64().unwrap();
    assert_eq!(last, *seqs.last().unwrap());
    // Paging back with before_seq and forward with after_seq reaches every
    // message, and the reader is never closed.
    let mut seen: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    let mut before = seen[0];
    loop {
        let h = request(
            &mut b,
            json!({"op":"history","room":"big","before_seq":before,"request_id":"h"}),
        );
        let page = h["messages"].as_array().unwrap();
        if page.is_empty() {
            break;
        }
        before = page[0]["seq"].as_u64().unwrap();
        seen.extend(page.iter().map(|m| m["seq"].as_u64().unwrap()));
    }
    seen.sort_unstable();
    assert_eq!(seen, seqs);
    let h = request(
        &mut b,
        json!({"op":"history","room":"big","after_seq":0,"limit":200,"request_id":"f"}),
    );
    let page = h["messages"].as_array().unwrap();
    assert_eq!(h["more"], true);
    assert_eq!(
        page[0]["seq"].as_u64(),
        Some(seqs[0]),
        "after_seq keeps the oldest"
    );
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"4008\"}"),
        0.0
    );
    assert!(gw.metric("hivegate_answers_cut_total") >= 2.0);
}

#[test]
fn a_provider_that_echoes_the_key_does_not_leak_it() {
    use common::fake_openai::{Behaviour, FakeOpenAi};
    const KEY: &str = "sk-live-echoed-4242";
    let fake = FakeOpenAi::start(Behaviour::Status {
        status: 401,
        retry_after: None,
        body: format!(
            "{{\"error\":{{\"message\":\"Incorrect API key provided: {KEY}\\u001b[31m{}\"}}}}",
            "x".repeat(2000)
        ),
    });
    let gw = Gateway::start(
        &format!(
            "{NO_RATE_LIMITS}[llm]\nmax_retries = 0\n[provider.kimi]\nbase_url = \"{}\"\nmodel = \"m\"\napi_key_env = \"FAKE_KEY\"\n",
            fake.base_url()
        ),
        &[("FAKE_KEY", KEY)],
    );
    let (mut ws, _) = gw.session(None);
    send_json(
        &mut ws,
        &json!({"op":"call_tool","request_id":"t","name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]}}),
    );
    let end = loop {
        let v = answer(&mut ws, "t");
        if v["op"] == "error" || v["op"] == "call_tool_res" {
            break v;
        }
    };
    let message = end["error"]["message"].as_str().expect("an error message");
    assert!(message.contains("HTTP 401"), "{message}");
    assert!(message.contains("[redacted]"), "{message}");
    assert!(
        !message.contains(KEY) && !message.contains('\u{1b}'),
        "{message}"
    );
    assert!(message.len() < 600, "capped: {} bytes", message.len());
    // The line that would hold the key is there before it is searched.
    gw.wait_log("llm call failed", 1);
    let log = gw.log_text();
    assert!(!log.contains(KEY), "the key reached the log:\n{log}");
    assert!(!log.contains('\u{1b}'));
}

#[test]
fn a_remote_that_echoes_the_key_does_not_leak_it_into_logs_or_dead_letters() {
    use common::fake_postgrest::FakePostgrest;
    const KEY: &str = "service-role-key-echoed-77";
    let fake = FakePostgrest::start(KEY);
    fake.set_poison("POISON");
    let gw = Gateway::start(
        &format!(
            "{NO_RATE_LIMITS}[remote]\nurl = \"{}\"\napi_key_env = \"SUPABASE_KEY\"\ninterval_ms = 50\n",
            fake.url()
        ),
        &[("SUPABASE_KEY", KEY)],
    );
    let (mut ws, _) = gw.session(None);
    join(&mut ws, "r");
    request(
        &mut ws,
        json!({"op":"publish","room":"r","text":"POISON","request_id":"p"}),
    );
    // The counter moves before the row is committed: wait for the row.
    let db = rusqlite::Connection::open(gw.dir.path().join("data/hivegate.db")).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let error: String = loop {
        match db.query_row("SELECT error FROM dead_letters", [], |r| r.get(0)) {
            Ok(e) => break e,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("no dead letter: {e}"),
        }
    };
    assert!(
        error.contains("no_poison") && error.contains("[redacted]"),
        "{error}"
    );
    assert!(!error.contains(KEY) && !error.contains('\u{1b}'), "{error}");
    let log = gw.log_text();
    assert!(log.contains("dead_letters"), "{log}");
    assert!(!log.contains(KEY), "the key reached the log:\n{log}");
}

#[test]
fn repeats_of_a_call_in_flight_are_bounded() {
    use common::fake_openai::{Behaviour, FakeOpenAi};
    let fake = FakeOpenAi::start(Behaviour::Stall);
    let gw = Gateway::start(
        &format!(
            "{NO_RATE_LIMITS}[provider.kimi]\nbase_url = \"{}\"\nmodel = \"m\"\n",
            fake.base_url()
        ),
        &[],
    );
    let (mut ws, _) = gw.session(None);
    let call = json!({"op":"call_tool","request_id":"same","name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]}});
    let mut shared = 0;
    for _ in 0..20 {
        let v = request(&mut ws, call.clone());
        match v["op"].as_str() {
            Some("call_tool_ack") if v["from_inflight"] == true => shared += 1,
            Some("call_tool_ack") => {}
            _ => {
                assert_eq!(v["error"]["code"], "LIMIT_EXCEEDED", "{v}");
            }
        }
    }
    assert_eq!(shared, 8);
}

#[test]
fn a_client_that_hangs_up_without_a_close_frame_is_counted_1006() {
    let gw = Gateway::start("", &[]);
    let (ws, _) = gw.session(None);
    let stream = ws.into_inner();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while gw.metric("hivegate_connections_open") > 0.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"1006\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"1002\"}"),
        0.0
    );
}

#[test]
fn control_bytes_from_clients_are_escaped_in_text_logs() {
    let gw = Gateway::start("[log]\nformat = \"text\"\n", &[]);
    let mut ws = gw.ws();
    send_json(
        &mut ws,
        &json!({"op":"hello","client":"evil\r\u{1b}[2J\u{0}fake line"}),
    );
    recv_json(&mut ws);
    gw.wait_log(" hello ", 1);
    let log = gw.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(" hello "))
        .expect("a hello line");
    assert!(
        line.contains(r#"client="evil\r\u{1b}[2J\0fake line""#),
        "{line:?}"
    );
    assert!(!log.contains(['\r', '\u{1b}', '\0']), "{log:?}");
}

#[test]
fn a_head_with_bare_line_feeds_gets_400_at_once() {
    let gw = Gateway::start("", &[]);
    let started = Instant::now();
    let r = http_request(gw.addr, "GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n");
    assert_eq!(r.status, 400);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered at the handshake timeout, not at once"
    );
}

#[test]
fn head_leftovers_get_400_at_once() {
    // A handshake deadline far away: an answer comes from the head itself,
    // or not before the test's own read timeout.
    let gw = Gateway::start("[server]\nhandshake_timeout_ms = 600000\n", &[]);
    for head in [
        "GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\r\n".to_string(),
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: +40\r\n\r\n".to_string(),
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}"
            .to_string(),
    ] {
        let mut s = connect_from(gw.addr, None);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let answer = String::from_utf8_lossy(&out);
        assert!(answer.starts_with("HTTP/1.1 400"), "{head:?}: {answer:?}");
    }
    assert_eq!(
        gw.metric("hivegate_connections_refused_total{reason=\"handshake_timeout\"}"),
        0.0
    );
}

#[test]
fn an_empty_or_malformed_websocket_key_gets_400() {
    let gw = Gateway::start("", &[]);
    assert!(gw.ws_from(None, &[]).is_ok(), "a good key upgrades");
    for key in [
        "",
        "abc",
        "dGhlIHNhbXBsZSBub25jZQ",
        "!!!!!!!!!!!!!!!!!!!!!!==",
    ] {
        let raw = format!(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        assert_eq!(http_request(gw.addr, &raw).status, 400, "{key:?}");
    }
}

/// Opens `n` sockets from `source` that send half a request head and stop.
fn slowloris(addr: std::net::SocketAddr, source: IpAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut s = connect_from(addr, Some(source));
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .ok()?;
            Some(s)
        })
        .collect()
}

#[test]
fn slowloris_from_one_address_does_not_lock_out_the_others() {
    raise_fd_limit();
    let gw = Gateway::start("[server]\nhandshake_timeout_ms = 20000\n", &[]);
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let held = slowloris(gw.addr, attacker, 500);
    let capped = "hivegate_connections_refused_total{reason=\"handshake_ip_cap\"}";
    assert!(gw.wait_metric(capped, 484.0, Duration::from_secs(10)) >= 484.0);
    // Health, metrics and a new WebSocket client from another address are
    // all served while the 500 sockets hang.
    assert_eq!(gw.get("/healthz").status, 200);
    assert!(gw.metric("hivegate_handshakes_pending") <= 16.0);
    let (mut ws, ack) = gw.session(None);
    assert_eq!(ack["ok"], true);
    send_json(&mut ws, &json!({"op":"ping","request_id":"p"}));
    assert_eq!(answer(&mut ws, "p")["op"], "pong");
    drop(held);
}

#[test]
fn slow_heads_from_many_addresses_never_lock_out_a_newcomer() {
    raise_fd_limit();
    let gw = Gateway::start(
        "[server]\nhandshake_timeout_ms = 20000\nmax_handshakes = 64\nmax_handshakes_per_ip = 8\n",
        &[],
    );
    // 500 slow heads from 500 addresses: the table holds 64, and each new
    // socket takes the place of the one that has waited longest.
    let mut held = Vec::new();
    for i in 0..500u32 {
        let source = IpAddr::from([127, 1, (i / 250) as u8, (i % 250) as u8 + 1]);
        held.extend(slowloris(gw.addr, source, 1));
    }
    let evicted = "hivegate_connections_refused_total{reason=\"handshake_evicted\"}";
    assert!(gw.wait_metric(evicted, 436.0, Duration::from_secs(10)) >= 436.0);
    assert!(gw.metric("hivegate_handshakes_pending") <= 64.0);
    // Every fresh client still gets in, and the scrapes above were served
    // by the operator port, which the attack does not reach.
    for i in 0..25u8 {
        let source = IpAddr::from([127, 2, 0, i + 1]);
        let mut ws = gw.ws_from(Some(source), &[]).expect("upgrade");
        send_json(&mut ws, &json!({"op":"hello"}));
        let ack = recv_json(&mut ws);
        assert_eq!(ack["ok"], true, "client {i}");
        send_json(&mut ws, &json!({"op":"ping","request_id":"p"}));
        assert_eq!(answer(&mut ws, "p")["op"], "pong");
    }
    assert_eq!(gw.get("/healthz").status, 200);
    drop(held);
}

/// Sends `unit` again and again from a session's socket for up to `for_`,
/// until the gateway hangs up. Returns the bytes sent.
fn flood(mut stream: TcpStream, first: &[u8], unit: &[u8], for_: Duration) -> usize {
    let burst: Vec<u8> = unit
        .iter()
        .copied()
        .cycle()
        .take(unit.len() * 4096)
        .collect();
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let end = Instant::now() + for_;
    let mut sent = 0;
    if stream.write_all(first).is_err() {
        return 0;
    }
    while Instant::now() < end {
        match stream.write_all(&burst) {
            Ok(()) => sent += burst.len(),
            Err(_) => break,
        }
    }
    // Read what the gateway says until it hangs up.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 65536];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    sent
}

#[test]
fn floods_of_control_frames_and_fragments_are_closed_1008_and_others_stay_served() {
    // Rate limits out of the way: the good client asks often, and the
    // floods must be stopped by the control-frame and fragment bounds.
    let gw = Gateway::start(NO_RATE_LIMITS, &[]);
    let (mut good, _) = gw.session(None);
    let floods: [(&str, Vec<u8>, Vec<u8>); 3] = [
        ("pings", Vec::new(), raw_frame(0x9, &[7u8; 125])),
        ("pongs", Vec::new(), raw_frame(0xA, b"")),
        (
            "empty continuations",
            raw_fragment(false, 0x1, b"{"),
            raw_fragment(false, 0x0, b""),
        ),
    ];
    for (i, (what, first, unit)) in floods.into_iter().enumerate() {
        let (ws, _) = gw.session(None);
        let stream = ws.into_inner();
        let flooder =
            std::thread::spawn(move || flood(stream, &first, &unit, Duration::from_secs(5)));
        // The good client keeps getting answers while the flood lasts.
        let mut worst = Duration::ZERO;
        let mut round_trips = 0;
        while !flooder.is_finished() || round_trips < 20 {
            let started = Instant::now();
            let rid = format!("{i}-{round_trips}");
            send_json(&mut good, &json!({"op":"ping","request_id":rid}));
            assert_eq!(answer(&mut good, &rid)["op"], "pong");
            worst = worst.max(started.elapsed());
            round_trips += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        flooder.join().unwrap();
        assert!(
            worst < Duration::from_secs(1),
            "{what}: a round trip took {worst:?}"
        );
        assert_eq!(
            gw.wait_metric(
                "hivegate_connections_closed_total{code=\"1008\"}",
                (i + 1) as f64,
                Duration::from_secs(5)
            ),
            (i + 1) as f64,
            "{what} closed with 1008"
        );
    }
    assert_eq!(gw.metric("hivegate_abuse_closes_total"), 3.0);
}

#[test]
fn the_echo_endpoint_exists_only_when_switched_on() {
    let gw = Gateway::start("", &[]);
    assert_eq!(gw.get("/ws-echo").status, 404);
    let on = Gateway::start("[server]\necho_endpoint = true\n", &[]);
    let stream = connect_from(on.addr, None);
    let mut ws = tungstenite::client::client(format!("ws://{}/ws-echo", on.addr), stream)
        .expect("upgrade")
        .0;
    ws.send(tungstenite::Message::text("écho")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("écho"));
}
