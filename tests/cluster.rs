//! Rooms across gateways: a real `nats-server` (Debian's package, started
//! here on a free loopback port and stopped by its PID) and two or three
//! gateways sharing rooms through it. Without the server the tests are
//! ignored (build.rs), and cargo's summary says so; with `REQUIRE_NATS=1`
//! (CI) they run, and fail.

mod common;

use common::{fixture, recv_json, send_json, write_secret, Gateway, Ws, NO_RATE_LIMITS};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A NATS server on a loopback port, killed by its PID when dropped.
struct Nats {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
}

impl Nats {
    fn start() -> Nats {
        Nats::start_with(&[])
    }

    fn start_with(args: &[&str]) -> Nats {
        let found = Command::new("nats-server")
            .arg("--version")
            .output()
            .is_ok();
        assert!(
            found,
            "nats-server is not installed (apt install nats-server)"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut n = Nats {
            child: None,
            port,
            args,
        };
        n.up();
        n
    }

    fn up(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < end, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.down();
    }
}

const TOKENS: &str = "[auth]\ntokens = [\"alice:tok-alice\", \"bob:tok-bob\", \"carol:tok-carol\", \"dave:tok-dave\"]\n";

fn start_box(nats: &Nats, node: &str) -> Gateway {
    start_box_with(nats, node, "")
}

fn start_box_with(nats: &Nats, node: &str, more: &str) -> Gateway {
    Gateway::start(
        &format!(
            "{TOKENS}{NO_RATE_LIMITS}[cluster]\nnats_url = [\"{}\"]\nnode_id = \"{node}\"\nheartbeat_ms = 300\n{more}",
            nats.url()
        ),
        &[],
    )
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn on_bus(gw: &Gateway) -> bool {
    gw.metric("hivegate_cluster_connected") == 1.0
}

fn member(gw: &Gateway, token: &str, room: &str) -> Ws {
    let (mut ws, ack) = gw.session(Some(token));
    assert_eq!(ack["ok"], true, "{ack}");
    send_json(&mut ws, &json!({"op":"join","room":room}));
    loop {
        let f = recv_json(&mut ws);
        if f["op"] == "joined" {
            return ws;
        }
    }
}

/// Frames until `done` says enough (or the read times out: a failure).
fn collect(ws: &mut Ws, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    while !done(&seen) {
        seen.push(recv_json(ws));
    }
    seen
}

/// Whether a `presence` frame among `frames` has `user` in `list`.
fn presence(frames: &[Value], list: &str, user: &str) -> bool {
    frames.iter().any(|x| {
        x["op"] == "presence" && x[list].as_array().is_some_and(|l| l.contains(&json!(user)))
    })
}

fn texts(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["op"] == "message")
        .map(|f| f["text"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Publishes in windows of 10 (within a session's requests in flight),
/// each acknowledged; returns the ids.
fn publish_acked(ws: &mut Ws, room: &str, texts: &[String]) -> Vec<String> {
    let mut ids = Vec::new();
    for window in texts.chunks(10) {
        for t in window {
            send_json(
                ws,
                &json!({"op":"publish","request_id":"p","room":room,"text":t}),
            );
        }
        let frames = collect(ws, |f| {
            assert!(f.iter().all(|x| x["op"] != "error"), "{f:?}");
            f.iter().filter(|x| x["op"] == "ack").count() == window.len()
        });
        let acks = frames.iter().filter(|x| x["op"] == "ack");
        ids.extend(acks.map(|x| x["id"].as_str().unwrap_or("").to_string()));
    }
    ids
}

/// Every message of `room` on `gw`, oldest first, through `history`.
fn history(gw: &Gateway, room: &str) -> Vec<Value> {
    let mut ws = member(gw, "tok-dave", room);
    let mut all: Vec<Value> = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut req = json!({"op":"history","request_id":"h","room":room,"limit":200});
        if let Some(b) = before {
            req["before_seq"] = json!(b);
        }
        send_json(&mut ws, &req);
        let res = collect(&mut ws, |f| {
            f.last().is_some_and(|x| x["op"] == "history_res")
        });
        let page = res
            .last()
            .and_then(|r| r["messages"].as_array().cloned())
            .unwrap_or_default();
        if page.is_empty() {
            break;
        }
        before = page.first().and_then(|m| m["seq"].as_i64());
        let mut page = page;
        page.extend(all);
        all = page;
        if before.is_none_or(|b| b <= 1) {
            break;
        }
    }
    all
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn a_message_on_one_box_reaches_the_others_in_order_with_reactions_and_presence() {
    let nats = Nats::start();
    let (a, b, c) = (
        start_box(&nats, "box-a"),
        start_box(&nats, "box-b"),
        start_box(&nats, "box-c"),
    );
    for gw in [&a, &b, &c] {
        wait_for("the bus", Duration::from_secs(10), || on_bus(gw));
        assert_eq!(gw.get("/readyz").json()["mode"], "online");
    }
    let mut alice = member(&a, "tok-alice", "general");
    let mut bob = member(&b, "tok-bob", "general");
    // Presence is merged: alice on box A sees bob join on box B.
    collect(&mut alice, |f| presence(f, "joined", "bob"));
    let mut carol = member(&c, "tok-carol", "general");
    collect(&mut alice, |f| presence(f, "joined", "carol"));
    // A joiner on C sees members of every box (once their beats came).
    wait_for("members of every box", Duration::from_secs(5), || {
        let mut ws = c.session(Some("tok-dave")).0;
        send_json(&mut ws, &json!({"op":"join","room":"general"}));
        let joined = collect(&mut ws, |f| f.iter().any(|x| x["op"] == "joined"));
        let members = &joined.iter().find(|x| x["op"] == "joined").unwrap()["members"];
        *members == json!(["alice", "bob", "carol", "dave"])
    });

    let sent: Vec<String> = (0..50).map(|i| format!("a{i}")).collect();
    let ids = publish_acked(&mut alice, "general", &sent);
    for ws in [&mut bob, &mut carol] {
        let got = collect(ws, |f| texts(f).len() == 50);
        assert_eq!(texts(&got), sent, "in the order box A committed them");
        let seqs: Vec<i64> = got
            .iter()
            .filter(|f| f["op"] == "message")
            .map(|f| f["seq"].as_i64().unwrap())
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[1] > w[0]),
            "each box's own seq, increasing: {seqs:?}"
        );
    }
    // A reaction on B reaches A and C.
    send_json(
        &mut bob,
        &json!({"op":"react","request_id":"r","message_id":ids[3],"emoji":"👍"}),
    );
    for ws in [&mut alice, &mut carol] {
        let got = collect(ws, |f| f.iter().any(|x| x["op"] == "reaction"));
        let r = got.iter().find(|x| x["op"] == "reaction").unwrap();
        assert_eq!(
            (
                r["message_id"].as_str(),
                r["by"].as_str(),
                r["count"].as_i64()
            ),
            (Some(ids[3].as_str()), Some("bob"), Some(1))
        );
    }
    // History on B holds A's messages, with the reaction.
    let h = history(&b, "general");
    let on_b: Vec<&str> = h.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(on_b, sent.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(h[3]["reactions"]["👍"], 1);
    // Carol's box goes: after three silent heartbeats she leaves A's presence.
    drop(carol);
    drop(c);
    collect(&mut alice, |f| presence(f, "left", "carol"));
    assert!(a.metric("hivegate_cluster_events_total{direction=\"out\"}") >= 50.0);
    assert!(b.metric("hivegate_cluster_events_total{direction=\"applied\"}") >= 50.0);
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn boxes_serve_alone_without_the_bus_and_lose_nothing_when_it_returns() {
    let mut nats = Nats::start();
    let (mut a, b) = (start_box(&nats, "box-a"), start_box(&nats, "box-b"));
    for gw in [&a, &b] {
        wait_for("the bus", Duration::from_secs(10), || on_bus(gw));
    }
    let mut alice = member(&a, "tok-alice", "ops");
    let mut bob = member(&b, "tok-bob", "ops");
    collect(&mut alice, |f| presence(f, "joined", "bob"));
    let before: Vec<String> = (0..5).map(|i| format!("before {i}")).collect();
    publish_acked(&mut alice, "ops", &before);
    collect(&mut bob, |f| texts(f).len() == 5);

    // The bus goes down: each box keeps accepting, storing and acking.
    nats.down();
    for gw in [&a, &b] {
        wait_for("isolated mode", Duration::from_secs(10), || {
            gw.get("/readyz").json()["mode"] == "isolated"
        });
        assert_eq!(gw.get("/readyz").status, 200, "isolated is still ready");
    }
    let from_a: Vec<String> = (0..20).map(|i| format!("a while down {i}")).collect();
    let from_b: Vec<String> = (0..20).map(|i| format!("b while down {i}")).collect();
    publish_acked(&mut alice, "ops", &from_a[..10]);
    publish_acked(&mut bob, "ops", &from_b);
    // Box A is killed with acknowledged messages not yet on the bus, and
    // comes back on the same data; its member reconnects there.
    a.signal(9);
    a.restart();
    let mut alice = member(&a, "tok-alice", "ops");
    publish_acked(&mut alice, "ops", &from_a[10..]);
    assert!(a.metric("hivegate_cluster_outbox") >= 0.0);

    // The bus returns: every acknowledged message reaches every box once.
    nats.up();
    let mut want: Vec<String> = before.clone();
    want.extend(from_a.iter().cloned());
    want.extend(from_b.iter().cloned());
    let want: HashSet<String> = want.into_iter().collect();
    for gw in [&a, &b] {
        wait_for(
            "every message on every box",
            Duration::from_secs(30),
            || {
                let h = history(gw, "ops");
                let got: HashSet<String> = h
                    .iter()
                    .map(|m| m["text"].as_str().unwrap_or("").to_string())
                    .collect();
                got == want
            },
        );
        let h = history(gw, "ops");
        assert_eq!(h.len(), want.len(), "each message once");
        let ids: HashSet<&str> = h.iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), h.len());
        // Per origin, in commit order.
        let order = |prefix: &str| -> Vec<String> {
            h.iter()
                .map(|m| m["text"].as_str().unwrap().to_string())
                .filter(|t| t.starts_with(prefix))
                .collect()
        };
        assert_eq!(order("a while"), from_a);
        assert_eq!(order("b while"), from_b);
    }
    // Presence came back with the bus: a joiner on A sees bob on B again.
    wait_for("bob in A's member list", Duration::from_secs(10), || {
        let mut ws = a.session(Some("tok-dave")).0;
        send_json(&mut ws, &json!({"op":"join","room":"ops"}));
        let joined = collect(&mut ws, |f| f.iter().any(|x| x["op"] == "joined"));
        let members = &joined.iter().find(|x| x["op"] == "joined").unwrap()["members"];
        members
            .as_array()
            .is_some_and(|m| m.contains(&json!("bob")))
    });
    // Live members got the other box's messages, each once.
    let to_bob = collect(&mut bob, |f| {
        texts(f).iter().filter(|t| t.starts_with("a while")).count() >= 20
    });
    let mut counts: HashMap<String, u32> = HashMap::new();
    for t in texts(&to_bob) {
        *counts.entry(t).or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    assert!(b.metric("hivegate_cluster_connects_total") >= 2.0);
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn a_box_that_joins_a_room_later_fetches_what_it_missed_and_drops_what_is_not_an_event() {
    let nats = Nats::start();
    let (a, b) = (start_box(&nats, "box-a"), start_box(&nats, "box-b"));
    for gw in [&a, &b] {
        wait_for("the bus", Duration::from_secs(10), || on_bus(gw));
    }
    // 1,100 messages (more than one replay batch) while B has nobody there.
    let mut alice = member(&a, "tok-alice", "late");
    let sent: Vec<String> = (0..1100).map(|i| format!("m{i}")).collect();
    publish_acked(&mut alice, "late", &sent);
    wait_for("A's outbox to empty", Duration::from_secs(10), || {
        a.metric("hivegate_cluster_outbox") == 0.0
            && a.metric("hivegate_cluster_events_total{direction=\"out\"}") >= 1100.0
    });
    let _bob = member(&b, "tok-bob", "late");
    wait_for(
        "B to catch up from A's log",
        Duration::from_secs(20),
        || history(&b, "late").len() == sent.len(),
    );
    let got: Vec<String> = history(&b, "late")
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, sent, "in A's order");
    assert!(a.metric("hivegate_cluster_replayed_total") >= 1100.0);
    assert!(b.metric("hivegate_cluster_sync_requests_total") >= 2.0);

    // Whatever else turns up on the room's subject is counted and dropped.
    let before = b.metric("hivegate_cluster_dropped_total{reason=\"malformed\"}");
    let mut raw = TcpStream::connect(("127.0.0.1", nats.port)).unwrap();
    let junk = [
        "not json".to_string(),
        r#"{"t":"msg","node":"evil box","room":"late","oseq":1,"id":"x","from":"m","text":"t"}"#
            .into(),
        r#"{"t":"msg","node":"mallory","room":"late","oseq":1}"#.into(),
        r#"{"t":"msg","node":"mallory","room":"../x","oseq":1,"id":"x","from":"m","text":"t"}"#
            .into(),
        format!(
            r#"{{"t":"beat","node":"mallory","room":"late","members":[{}]}}"#,
            "[".repeat(100)
        ),
        // Well formed, but past what a local client may send.
        format!(
            r#"{{"t":"msg","node":"mallory","room":"late","oseq":1,"id":"x","from":"m","text":"{}"}}"#,
            "x".repeat(9000)
        ),
        r#"{"t":"react","node":"mallory","room":"late","oseq":1,"message_id":"x","emoji":"","by":"m","added":true}"#
            .into(),
        // Emoji a local client may not send: a quote, a control character.
        r#"{"t":"react","node":"mallory","room":"late","oseq":1,"message_id":"x","emoji":"a\"b","by":"m","added":true}"#
            .into(),
        r#"{"t":"react","node":"mallory","room":"late","oseq":1,"message_id":"x","emoji":"\u0001","by":"m","added":true}"#
            .into(),
    ];
    let mut wire = String::from("CONNECT {\"verbose\":false}\r\n");
    for j in &junk {
        wire.push_str(&format!("PUB hivegate.room.late {}\r\n{j}\r\n", j.len()));
    }
    wire.push_str("PING\r\n");
    std::io::Write::write_all(&mut raw, wire.as_bytes()).unwrap();
    let dropped = b.wait_metric(
        "hivegate_cluster_dropped_total{reason=\"malformed\"}",
        before + junk.len() as f64,
        Duration::from_secs(5),
    );
    assert_eq!(dropped, before + junk.len() as f64);
    // Still serving, still on the bus.
    publish_acked(&mut alice, "late", &["after".to_string()]);
    wait_for("the next message", Duration::from_secs(5), || {
        history(&b, "late").len() == 1101
    });

    // 60 distinct emoji on one message from the bus, in order: the local
    // bound of 50 holds on B, and the other 10 are counted.
    let id = history(&b, "late").last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = b.metric("hivegate_cluster_dropped_total{reason=\"malformed\"}");
    let mut wire = String::new();
    for i in 1..=60 {
        let ev = format!(
            r#"{{"t":"react","node":"mallory","room":"late","oseq":{i},"message_id":"{id}","emoji":"e{i}","by":"m","added":true}}"#
        );
        wire.push_str(&format!("PUB hivegate.room.late {}\r\n{ev}\r\n", ev.len()));
    }
    wire.push_str("PING\r\n");
    std::io::Write::write_all(&mut raw, wire.as_bytes()).unwrap();
    let dropped = b.wait_metric(
        "hivegate_cluster_dropped_total{reason=\"malformed\"}",
        before + 10.0,
        Duration::from_secs(5),
    );
    assert_eq!(dropped, before + 10.0);
    let last = history(&b, "late").pop().unwrap();
    assert_eq!(last["reactions"].as_object().unwrap().len(), 50, "{last}");
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn the_bus_login_comes_from_a_credentials_file_and_a_wrong_one_leaves_the_box_alone() {
    let nats = Nats::start_with(&["--user", "hg", "--pass", "s3cret-bus"]);
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("good"), dir.path().join("bad"));
    write_secret(&good, "hg:s3cret-bus\n");
    write_secret(&bad, "hg:wrong-pass\n");
    let a = start_box_with(&nats, "box-a", &format!("credentials_file = {good:?}\n"));
    let b = start_box_with(&nats, "box-b", &format!("credentials_file = {bad:?}\n"));
    wait_for("the bus", Duration::from_secs(10), || on_bus(&a));
    b.wait_metric(
        "hivegate_cluster_connect_failures_total",
        2.0,
        Duration::from_secs(10),
    );
    assert_eq!(b.get("/readyz").json()["mode"], "isolated");
    assert!(
        b.log_text().contains("Authorization Violation"),
        "{}",
        b.log_text()
    );
    // Alone, B still serves.
    let mut bob = member(&b, "tok-bob", "r");
    publish_acked(&mut bob, "r", &["alone".to_string()]);
    for gw in [&a, &b] {
        assert!(!gw.log_text().contains("s3cret-bus") && !gw.log_text().contains("wrong-pass"));
        assert!(!gw.get("/metrics").body.contains("s3cret-bus"));
    }
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn a_burst_waits_at_the_bus_rather_than_being_dropped() {
    let nats = Nats::start();
    let a = start_box(&nats, "box-a");
    // B holds at most 16 events at a time: the rest waits in the socket
    // and at the server.
    let b = start_box_with(&nats, "box-b", "max_inbound = 16\n");
    for gw in [&a, &b] {
        wait_for("the bus", Duration::from_secs(10), || on_bus(gw));
    }
    let _bob = member(&b, "tok-bob", "burst");
    let mut alice = member(&a, "tok-alice", "burst");
    let sent: Vec<String> = (0..600).map(|i| format!("b{i}")).collect();
    publish_acked(&mut alice, "burst", &sent);
    wait_for("the burst on B", Duration::from_secs(20), || {
        history(&b, "burst").len() == sent.len()
    });
    let got: Vec<String> = history(&b, "burst")
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, sent);
    assert_eq!(
        b.metric("hivegate_cluster_dropped_total{reason=\"inbound_full\"}"),
        0.0
    );
    // (Gaps may be seen: the replay B asked for when bob joined can race
    // the live events; they are fetched again, never lost.)
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn presence_beats_at_the_documented_maxima_leave_the_box_serving() {
    let nats = Nats::start();
    let mut a = start_box(&nats, "box-a");
    wait_for("the bus", Duration::from_secs(10), || on_bus(&a));
    let mut alice = member(&a, "tok-alice", "big");
    // Eight boxes of 10,000 names each, twice: 2.4 MB of beats, every one
    // within the bounds a box documents.
    let mut raw = subscribed_to_room(&nats, "big");
    let mut wire = String::new();
    for _round in 0..2 {
        for b in 0..8 {
            let names: Vec<String> = (0..10_000).map(|u| format!("\"b{b}-user{u}\"")).collect();
            let beat = format!(
                r#"{{"t":"beat","node":"fake-{b}","room":"big","members":[{}],"head":0}}"#,
                names.join(",")
            );
            wire.push_str(&format!(
                "PUB hivegate.room.big {}\r\n{beat}\r\n",
                beat.len()
            ));
        }
    }
    wire.push_str("PING\r\n");
    std::io::Write::write_all(&mut raw, wire.as_bytes()).unwrap();
    // The room holds 10,000 remote names in all (chat.members_per_room):
    // the first box's; the other seven lists are left out, and counted.
    let over = "hivegate_cluster_dropped_total{reason=\"names_over_bound\"}";
    assert_eq!(
        a.wait_metric(over, 140_000.0, Duration::from_secs(30)),
        140_000.0
    );
    // Alice hears the 10,000 once, and the box serves her on.
    // (Her own join may be news of its own, before the beats'.)
    let frames = collect(&mut alice, |f| presence(f, "joined", "b0-user0"));
    let joined: Vec<&str> = frames.last().unwrap()["joined"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        joined.iter().filter(|u| u.starts_with("b0-")).count(),
        10_000
    );
    assert!(!joined.iter().any(|u| u.starts_with("b1-")));
    send_json(&mut alice, &json!({"op":"ping","request_id":"p"}));
    let pong = collect(&mut alice, |f| f.iter().any(|v| v["op"] == "pong"));
    assert_eq!(pong.last().unwrap()["request_id"], "p");
    let (_bob, ack) = a.session(Some("tok-bob"));
    assert_eq!(ack["ok"], true);
    // And it drains on SIGTERM within server.drain_timeout_ms.
    a.signal(libc::SIGTERM);
    assert_eq!(a.wait_exit(Duration::from_secs(15)), Some(0));
}

/// `hivegate genkey NODE`: the key file's path and its trusted_keys line.
fn genkey(dir: &std::path::Path, node: &str) -> (std::path::PathBuf, String) {
    let path = dir.join(format!("{node}.key"));
    let out = Command::new(env!("CARGO_BIN_EXE_hivegate"))
        .args(["genkey", node, "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        path,
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn with_keys_nobody_else_can_speak_for_a_box() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let (a_key, a_line) = genkey(dir.path(), "box-a");
    let (b_key, b_line) = genkey(dir.path(), "box-b");
    let keys = |path: &std::path::Path| {
        format!("signing_key_file = {path:?}\ntrusted_keys = [{a_line}, {b_line}]\n")
    };
    let a = start_box_with(&nats, "box-a", &keys(&a_key));
    let b = start_box_with(&nats, "box-b", &keys(&b_key));
    for gw in [&a, &b] {
        wait_for("the bus", Duration::from_secs(10), || on_bus(gw));
    }
    let mut alice = member(&a, "tok-alice", "r");
    let mut bob = member(&b, "tok-bob", "r");
    publish_acked(&mut alice, "r", &["m1".to_string()]);
    wait_for("m1 on B", Duration::from_secs(10), || {
        history(&b, "r").len() == 1
    });

    // As box-a, with A's next oseq: unsigned, and signed by a key B does
    // not trust for box-a; a skip far ahead; a beat with a made-up member.
    let mallory = {
        let (private, _) = hivegate::cluster::sign::generate().unwrap();
        let cfg = hivegate::cluster::sign::SigningConfig::read("mallory", &private, &[]).unwrap();
        hivegate::cluster::sign::Signer::new(&cfg).unwrap()
    };
    let forged = [
        r#"{"t":"msg","node":"box-a","room":"r","oseq":2,"id":"forged-1","from":"alice","text":"forged"}"#,
        r#"{"t":"skip","node":"box-a","room":"r","oseq":1000000000000}"#,
        r#"{"t":"beat","node":"box-a","room":"r","members":["mallory"],"head":0}"#,
    ];
    let mut payloads: Vec<Vec<u8>> = forged.iter().map(|f| f.as_bytes().to_vec()).collect();
    payloads.extend(forged.iter().map(|f| mallory.sign(f)));
    let mut raw = TcpStream::connect(("127.0.0.1", nats.port)).unwrap();
    let mut wire = b"CONNECT {\"verbose\":false}\r\n".to_vec();
    for p in &payloads {
        wire.extend(format!("PUB hivegate.room.r {}\r\n", p.len()).as_bytes());
        wire.extend(p);
        wire.extend(b"\r\n");
    }
    wire.extend(b"PING\r\n");
    std::io::Write::write_all(&mut raw, &wire).unwrap();
    let unsigned = "hivegate_cluster_dropped_total{reason=\"unsigned\"}";
    assert_eq!(b.wait_metric(unsigned, 6.0, Duration::from_secs(10)), 6.0);

    // A's real messages, with the oseqs the forgeries claimed and past
    // the forged skip, all arrive on B, once and in order.
    let sent: Vec<String> = (2..=6).map(|i| format!("m{i}")).collect();
    publish_acked(&mut alice, "r", &sent);
    wait_for("m2..m6 on B", Duration::from_secs(10), || {
        history(&b, "r").len() == 6
    });
    let texts: Vec<String> = history(&b, "r")
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, ["m1", "m2", "m3", "m4", "m5", "m6"]);
    // Bob never heard of mallory as a member.
    let frames = collect(&mut bob, |f| {
        f.iter().filter(|v| v["op"] == "message").count() >= 6
    });
    assert!(!frames
        .iter()
        .any(|f| presence(std::slice::from_ref(f), "joined", "mallory")));
    assert_eq!(a.metric(unsigned), 0.0, "the boxes' own messages all count");
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn a_flood_of_sync_requests_costs_a_bounded_rate() {
    let nats = Nats::start();
    let a = start_box_with(&nats, "box-a", "replay_bytes_per_s = 65536\n");
    wait_for("the bus", Duration::from_secs(10), || on_bus(&a));
    let mut alice = member(&a, "tok-alice", "amp");
    let sent: Vec<String> = (0..1000)
        .map(|i| format!("{i:04} {}", "x".repeat(100)))
        .collect();
    publish_acked(&mut alice, "amp", &sent);
    // 100 requests of about 70 bytes, from 50 made-up boxes, each twice,
    // all for the whole log (about 250 KB).
    let started = Instant::now();
    let mut raw = TcpStream::connect(("127.0.0.1", nats.port)).unwrap();
    let mut wire = String::from("CONNECT {\"verbose\":false}\r\n");
    for _ in 0..2 {
        for n in 0..50 {
            let req = format!(r#"{{"t":"sync","node":"fake-{n}","room":"amp","have":{{}}}}"#);
            wire.push_str(&format!("PUB hivegate.sync {}\r\n{req}\r\n", req.len()));
        }
    }
    wire.push_str("PING\r\n");
    std::io::Write::write_all(&mut raw, wire.as_bytes()).unwrap();
    // Past the queue's 64 (and the one being answered), requests are
    // dropped (the rest wait for the
    // budget; a repeat within a heartbeat of its answer is dropped too).
    wait_for("requests dropped", Duration::from_secs(20), || {
        a.metric("hivegate_cluster_dropped_total{reason=\"replay_repeated\"}")
            + a.metric("hivegate_cluster_dropped_total{reason=\"replays_full\"}")
            >= 35.0
    });
    // Two whole answers out: whatever the box published is within its
    // rate, one answer of at most 256 KiB at once, then 64 KiB a second.
    wait_for("two answers", Duration::from_secs(20), || {
        a.metric("hivegate_cluster_replayed_total") >= 2000.0
    });
    let bytes = a.metric("hivegate_cluster_replayed_bytes_total");
    let allowed = 256.0 * 1024.0 + 65536.0 * (started.elapsed().as_secs_f64() + 1.0);
    assert!(
        bytes > 0.0 && bytes <= allowed,
        "{bytes} bytes replayed, {allowed} allowed"
    );
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn boxes_reach_a_tls_server_with_a_client_certificate() {
    let tls = |name: &str| fixture(&format!("tls/{name}")).display().to_string();
    let nats = Nats::start_with(&[
        "--tlsverify",
        "--tlscert",
        &tls("server1.pem"),
        "--tlskey",
        &tls("server1.key"),
        "--tlscacert",
        &tls("client-ca.pem"),
    ]);
    let config = |node: &str, url: &str, cert: bool| {
        let client = if cert {
            format!(
                "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
                tls("box.pem"),
                hivegate::testkit::secret_fixture("tls/box.key")
                    .display()
                    .to_string()
            )
        } else {
            String::new()
        };
        format!(
            "{TOKENS}{NO_RATE_LIMITS}[cluster]\nnats_url = [\"{url}\"]\nnode_id = \"{node}\"\n\
             heartbeat_ms = 300\ntls_ca_file = {:?}\n{client}",
            tls("ca.pem")
        )
    };
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let a = Gateway::start(&config("box-a", &url, true), &[]);
    let b = Gateway::start(&config("box-b", &url, true), &[]);
    for gw in [&a, &b] {
        wait_for("the bus over TLS", Duration::from_secs(10), || on_bus(gw));
    }
    let mut alice = member(&a, "tok-alice", "t");
    let _bob = member(&b, "tok-bob", "t");
    let sent: Vec<String> = (0..20).map(|i| format!("over tls {i}")).collect();
    publish_acked(&mut alice, "t", &sent);
    wait_for("the messages on B", Duration::from_secs(10), || {
        history(&b, "t").len() == 20
    });
    // A plain URL, or TLS without the client certificate the server asks
    // for, leaves a box serving alone, and its log says why.
    let plain = Gateway::start(&config("box-c", &nats.url(), false), &[]);
    let no_cert = Gateway::start(&config("box-d", &url, false), &[]);
    wait_for("the reasons in the logs", Duration::from_secs(10), || {
        plain.log_text().contains("requires TLS")
            && no_cert.metric("hivegate_cluster_connect_failures_total") >= 1.0
    });
    assert!(!on_bus(&plain) && !on_bus(&no_cert));
}

/// A TCP forwarder from a loopback port to the NATS server: cutting it
/// takes one box off the bus while the others stay on.
struct Cable {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Cable {
    fn to(nats: &Nats) -> Cable {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, target) = (cut.clone(), nats.port);
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if flag.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = std::io::Read::read(&mut from, &mut buf) {
                            if n == 0 || flag.load(Ordering::SeqCst) {
                                break;
                            }
                            if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Cable { port, cut }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Every message of `room` on `gw` as (text, id), checked to be each once.
fn texts_once(gw: &Gateway, room: &str) -> Vec<String> {
    let h = history(gw, room);
    let ids: HashSet<&str> = h.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), h.len(), "a message twice on a box");
    h.iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
#[cfg_attr(
    missing_nats,
    ignore = "nats-server is not installed (apt install nats-server)"
)]
fn three_boxes_survive_a_partition_and_a_rolling_restart_under_traffic() {
    let nats = Nats::start();
    let cable = Cable::to(&nats);
    let box_at = |node: &str, url: &str| {
        Gateway::start(
            &format!(
                "{TOKENS}{NO_RATE_LIMITS}[cluster]\nnats_url = [\"{url}\"]\nnode_id = \"{node}\"\nheartbeat_ms = 300\n"
            ),
            &[],
        )
    };
    let mut boxes = [
        box_at("box-a", &nats.url()),
        box_at("box-b", &nats.url()),
        box_at("box-c", &cable.url()),
    ];
    for gw in &boxes {
        wait_for("the bus", Duration::from_secs(10), || on_bus(gw));
    }
    let users = ["alice", "bob", "carol"];
    let mut sent: Vec<Vec<String>> = vec![Vec::new(); 3];
    let mut say = |boxes: &[Gateway], i: usize, what: &str, n: usize| {
        let mut ws = member(&boxes[i], &format!("tok-{}", users[i]), "ops");
        let texts: Vec<String> = (0..n).map(|k| format!("{} {what} {k}", users[i])).collect();
        publish_acked(&mut ws, "ops", &texts);
        sent[i].extend(texts);
    };

    // C is cut off: A and B go on together, C alone; all keep acking.
    cable.set_cut(true);
    wait_for("C isolated", Duration::from_secs(10), || !on_bus(&boxes[2]));
    for i in 0..3 {
        say(&boxes, i, "during the partition", 15);
    }
    cable.set_cut(false);

    // Then each box in turn is restarted while the other two take traffic.
    for down in 0..3 {
        boxes[down].signal(9);
        for i in (0..3).filter(|i| *i != down) {
            say(&boxes, i, &format!("while {down} restarts"), 10);
        }
        boxes[down].restart();
        wait_for("back on the bus", Duration::from_secs(10), || {
            on_bus(&boxes[down])
        });
    }

    // Every acknowledged message on every box, once, each origin's in its
    // order.
    let total: usize = sent.iter().map(Vec::len).sum();
    for gw in &boxes {
        let end = Instant::now() + Duration::from_secs(60);
        while history(gw, "ops").len() < total {
            if Instant::now() > end {
                let have: HashSet<String> = texts_once(gw, "ops").into_iter().collect();
                let missing: Vec<&String> = sent
                    .iter()
                    .flatten()
                    .filter(|t| !have.contains(*t))
                    .collect();
                panic!(
                    "{} of {total} messages; missing {missing:?}\nlog:\n{}",
                    have.len(),
                    gw.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let got = texts_once(gw, "ops");
        assert_eq!(got.len(), total);
        for (i, mine) in sent.iter().enumerate() {
            let order: Vec<&String> = got.iter().filter(|t| t.starts_with(users[i])).collect();
            assert_eq!(
                order,
                mine.iter().collect::<Vec<_>>(),
                "{}'s messages",
                users[i]
            );
        }
    }

    // Presence converges: a member on each box, and every box's list
    // names all three within a few heartbeats.
    let _members: Vec<Ws> = (0..3)
        .map(|i| member(&boxes[i], &format!("tok-{}", users[i]), "live"))
        .collect();
    for gw in &boxes {
        wait_for(
            "all three members everywhere",
            Duration::from_secs(10),
            || {
                let mut ws = gw.session(Some("tok-dave")).0;
                send_json(&mut ws, &json!({"op":"join","room":"live"}));
                let joined = collect(&mut ws, |f| f.iter().any(|x| x["op"] == "joined"));
                let members = &joined.iter().find(|x| x["op"] == "joined").unwrap()["members"];
                users
                    .iter()
                    .all(|u| members.as_array().is_some_and(|m| m.contains(&json!(u))))
            },
        );
    }
}

/// A raw client of the server, once the boxes in `room` subscribed to it:
/// it has heard a box's beat there (a box subscribes before it beats, on
/// one connection), so what it publishes there reaches them.
fn subscribed_to_room(nats: &Nats, room: &str) -> TcpStream {
    let mut raw = TcpStream::connect(("127.0.0.1", nats.port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = format!("CONNECT {{\"verbose\":false}}\r\nSUB hivegate.room.{room} 1\r\n");
    std::io::Write::write_all(&mut raw, hello.as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"t\":\"beat\"") {
        let n = std::io::Read::read(&mut raw, &mut buf).expect("a box's beat within 10 s");
        assert!(n > 0, "the server closed");
        seen.extend_from_slice(&buf[..n]);
    }
    std::io::Write::write_all(&mut raw, b"UNSUB 1\r\n").unwrap();
    raw
}
