//! Remote sync and fallback mode, against a fake PostgREST server: rows
//! arrive, an outage is survived locally, every row arrives exactly once
//! afterwards (also across SIGKILL), a poison row is parked, and a full
//! disk refuses publishes until space returns.

mod common;
use common::fake_postgrest::{FakePostgrest, Mode};
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const KEY: &str = "service-role-key-5e1d";

fn gateway(fake: &FakePostgrest, extra: &str) -> Gateway {
    let cfg = format!(
        "{NO_RATE_LIMITS}{extra}\n[remote]\nurl = \"{}\"\napi_key_env = \"SUPABASE_KEY\"\ninterval_ms = 50\nfail_max = 3\nreset_timeout_ms = 300\ntimeout_ms = 2000\n",
        fake.url()
    );
    Gateway::start(&cfg, &[("SUPABASE_KEY", fake.key())])
}

fn answer(ws: &mut Ws, rid: &str) -> Value {
    loop {
        let v = recv_json(ws);
        if v["request_id"] == rid {
            return v;
        }
    }
}

/// Joins `room` and publishes `texts`; returns the acked ids.
fn publish_all(ws: &mut Ws, room: &str, texts: &[String]) -> Vec<String> {
    send_json(
        ws,
        &json!({"op":"join","room":room,"history":0,"request_id":"j"}),
    );
    answer(ws, "j");
    texts
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let rid = format!("p{i}");
            send_json(
                ws,
                &json!({"op":"publish","room":room,"text":t,"request_id":rid}),
            );
            let a = answer(ws, &rid);
            a["id"].as_str().map(String::from)
        })
        .collect()
}

fn react(ws: &mut Ws, id: &str, emoji: &str, rid: &str) {
    send_json(
        ws,
        &json!({"op":"react","message_id":id,"emoji":emoji,"request_id":rid}),
    );
    assert_eq!(answer(ws, rid)["op"], "ack");
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn texts(n: usize, tag: &str) -> Vec<String> {
    (0..n).map(|i| format!("{tag} {i}")).collect()
}

#[test]
fn rows_reach_the_remote_with_the_right_headers() {
    let fake = FakePostgrest::start(KEY);
    let gw = gateway(&fake, "");
    let (mut ws, _) = gw.session(None);
    let ids = publish_all(&mut ws, "r", &texts(5, "hello"));
    react(&mut ws, &ids[0], "👍", "x");
    wait_for("rows remotely", Duration::from_secs(10), || {
        fake.rows("messages").len() == 5 && fake.rows("reactions").len() == 1
    });
    assert!(
        fake.header_errors().is_empty(),
        "{:?}",
        fake.header_errors()
    );
    let m = &fake.rows("messages")[&ids[1]];
    assert_eq!(
        (m["room"].clone(), m["seq"].clone(), m["text"].clone()),
        (json!("r"), json!(2), json!("hello 1"))
    );
    let r = fake.rows("reactions").into_values().next().unwrap();
    assert_eq!(
        (r["emoji"].clone(), r["removed"].clone()),
        (json!("👍"), json!(false))
    );
    wait_for("the backlog to empty", Duration::from_secs(10), || {
        gw.metric("hivegate_sync_backlog_rows") == 0.0
    });
    assert!(gw.metric("hivegate_sync_rows_shipped_total") >= 6.0);
    assert_eq!(gw.metric("hivegate_mode"), 0.0);
    assert!(!gw.log_text().contains(KEY));
}

#[test]
fn an_outage_is_survived_in_fallback_mode_and_everything_arrives_once() {
    let fake = FakePostgrest::start(KEY);
    let gw = gateway(&fake, "");
    fake.set_mode(Mode::Unavailable);
    let (mut ws, _) = gw.session(None);
    // Chat goes on: every publish is acknowledged.
    let ids = publish_all(&mut ws, "r", &texts(20, "during"));
    assert_eq!(ids.len(), 20);
    react(&mut ws, &ids[0], "👍", "a");
    react(&mut ws, &ids[1], "🎉", "b");
    react(&mut ws, &ids[1], "🎉", "c"); // toggled back off
    wait_for("fallback mode", Duration::from_secs(10), || {
        gw.metric("hivegate_mode") == 1.0
    });
    let ready: Value = serde_json::from_str(&gw.get("/readyz").body).unwrap();
    assert_eq!(gw.get("/readyz").status, 200);
    assert_eq!(ready["mode"], "fallback");
    assert_ne!(ready["breakers"]["remote"], "closed");
    assert!(gw.metric("hivegate_sync_batches_failed_total") >= 3.0);
    assert!(gw.metric("hivegate_sync_backlog_rows") >= 22.0);
    // Refused connections and a hanging remote are outages too.
    fake.set_mode(Mode::Refuse);
    let more = publish_all(&mut ws, "r", &texts(3, "refused"));
    fake.set_mode(Mode::Hang);
    let hung = publish_all(&mut ws, "r", &texts(2, "hung"));
    std::thread::sleep(Duration::from_millis(300));
    fake.set_mode(Mode::Up);
    wait_for("everything to arrive", Duration::from_secs(20), || {
        gw.metric("hivegate_sync_backlog_rows") == 0.0
    });
    let remote: HashSet<String> = fake.rows("messages").into_keys().collect();
    let local: HashSet<String> = ids.iter().chain(&more).chain(&hung).cloned().collect();
    assert_eq!(
        remote, local,
        "exactly the acknowledged messages, once each"
    );
    let reactions = fake.rows("reactions");
    assert_eq!(reactions.len(), 2);
    assert!(reactions
        .values()
        .any(|r| r["emoji"] == "🎉" && r["removed"] == true));
    assert!(reactions
        .values()
        .any(|r| r["emoji"] == "👍" && r["removed"] == false));
    wait_for("online mode", Duration::from_secs(5), || {
        gw.metric("hivegate_mode") == 0.0
    });
    let log = gw.log_text();
    assert_eq!(
        log.matches("fallback mode:").count(),
        1,
        "logged once, not per attempt:\n{log}"
    );
}

#[test]
fn the_backlog_survives_sigkill_during_an_outage() {
    let fake = FakePostgrest::start(KEY);
    let mut gw = gateway(&fake, "");
    fake.set_mode(Mode::Unavailable);
    let (mut ws, _) = gw.session(None);
    let before = publish_all(&mut ws, "k", &texts(15, "before kill"));
    drop(ws);
    gw.signal(libc::SIGKILL);
    gw.restart();
    let (mut ws, _) = gw.session(None);
    let after = publish_all(&mut ws, "k", &texts(5, "after restart"));
    fake.set_mode(Mode::Up);
    wait_for("the backlog to ship", Duration::from_secs(20), || {
        gw.metric("hivegate_sync_backlog_rows") == 0.0
    });
    let remote: HashSet<String> = fake.rows("messages").into_keys().collect();
    let local: HashSet<String> = before.iter().chain(&after).cloned().collect();
    assert_eq!(remote, local);
    // In the order they were stored: seq 1..=20 in room k.
    let mut seqs: Vec<u64> = fake
        .rows("messages")
        .values()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
}

#[test]
fn a_poison_row_is_parked_and_the_rest_arrives() {
    let fake = FakePostgrest::start(KEY);
    fake.set_poison("POISON");
    let gw = gateway(&fake, "");
    let (mut ws, _) = gw.session(None);
    let mut t = texts(9, "fine");
    t.insert(4, "POISON".to_string());
    let ids = publish_all(&mut ws, "r", &t);
    wait_for("the dead letter", Duration::from_secs(10), || {
        gw.metric("hivegate_sync_dead_letters_total") == 1.0
    });
    wait_for("the rest", Duration::from_secs(10), || {
        fake.rows("messages").len() == 9
    });
    assert!(!fake.rows("messages").contains_key(&ids[4]));
    wait_for("an empty backlog", Duration::from_secs(5), || {
        gw.metric("hivegate_sync_backlog_rows") == 0.0
    });
    assert_eq!(
        gw.metric("hivegate_mode"),
        0.0,
        "a refused row is no outage"
    );
    let db = rusqlite::Connection::open(gw.dir.path().join("data/hivegate.db")).unwrap();
    let (key, error): (String, String) = db
        .query_row("SELECT row_key, error FROM dead_letters", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(key, ids[4]);
    assert!(
        error.contains("HTTP 400") && error.contains("no_poison"),
        "{error}"
    );
}

#[test]
fn storage_full_refuses_publishes_and_recovers_when_space_returns() {
    let fake = FakePostgrest::start(KEY);
    fake.set_mode(Mode::Unavailable);
    let gw = gateway(
        &fake,
        "[store]\nmax_db_bytes = 131072\ncheck_interval_ms = 50\n",
    );
    let (mut ws, _) = gw.session(None);
    send_json(
        &mut ws,
        &json!({"op":"join","room":"big","history":0,"request_id":"j"}),
    );
    answer(&mut ws, "j");
    let text = "x".repeat(2000);
    let mut refused = None;
    let mut acked = 0;
    for i in 0..2000 {
        let rid = format!("b{i}");
        send_json(
            &mut ws,
            &json!({"op":"publish","room":"big","text":text,"request_id":rid}),
        );
        let a = answer(&mut ws, &rid);
        if a["op"] == "error" {
            refused = Some(a);
            break;
        }
        acked += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let refused = refused.expect("publishes were never refused");
    assert_eq!(refused["error"]["code"], "OVER_CAPACITY");
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("storage full"));
    let ready: Value = serde_json::from_str(&gw.get("/readyz").body).unwrap();
    assert_eq!(ready["storage"], "full");
    // Nothing unshipped was deleted to make room: every acknowledged
    // message is still there. (The backlog gauge is only as fresh as the
    // last sync round, which an open breaker holds back.)
    assert!(acked > 10, "{acked}");
    send_json(
        &mut ws,
        &json!({"op":"history","room":"big","limit":200,"request_id":"h"}),
    );
    let kept = answer(&mut ws, "h")["messages"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(kept, acked);
    // The remote returns: rows ship, shipped rows make room, publishes resume.
    fake.set_mode(Mode::Up);
    wait_for("space to return", Duration::from_secs(20), || {
        serde_json::from_str::<Value>(&gw.get("/readyz").body).unwrap()["storage"] == "ok"
    });
    send_json(
        &mut ws,
        &json!({"op":"publish","room":"big","text":"room again","request_id":"again"}),
    );
    assert_eq!(answer(&mut ws, "again")["op"], "ack");
    assert!(fake.rows("messages").len() >= acked);
}
