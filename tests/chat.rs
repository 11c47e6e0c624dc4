//! Chat rooms over real sockets: ordering, acks, presence, history after a
//! reconnect, reactions and their limits, bounds, a full pool.

mod common;
use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

/// Reads frames until one with `op`, returning it (others are skipped).
fn until_op(ws: &mut Ws, op: &str) -> Value {
    loop {
        let v = recv_json(ws);
        if v["op"] == op {
            return v;
        }
    }
}

/// Reads frames until the answer to `request_id`.
fn answer(ws: &mut Ws, request_id: &str) -> Value {
    loop {
        let v = recv_json(ws);
        if v["request_id"] == request_id {
            return v;
        }
    }
}

fn join(ws: &mut Ws, room: &str, history: u64) -> Value {
    let rid = format!("join-{room}");
    send_json(
        ws,
        &json!({"op":"join","room":room,"history":history,"request_id":rid}),
    );
    answer(ws, &rid)
}

fn publish(ws: &mut Ws, room: &str, text: &str, rid: &str) -> Value {
    send_json(
        ws,
        &json!({"op":"publish","room":room,"text":text,"request_id":rid}),
    );
    answer(ws, rid)
}

#[test]
fn members_see_the_same_messages_in_the_same_order() {
    let gw = Gateway::start("", &[]);
    let (mut a, ack_a) = gw.session(None);
    let (mut b, _) = gw.session(None);
    assert_eq!(join(&mut a, "general", 0)["op"], "joined");
    let joined = join(&mut b, "general", 0);
    assert_eq!(joined["members"].as_array().unwrap().len(), 2);
    // Both publish, interleaved.
    for i in 0..5 {
        send_json(
            &mut a,
            &json!({"op":"publish","room":"general","text":format!("a{i}"),"request_id":format!("a{i}")}),
        );
        send_json(
            &mut b,
            &json!({"op":"publish","room":"general","text":format!("b{i}"),"request_id":format!("b{i}")}),
        );
    }
    let read = |ws: &mut Ws| -> (Vec<(u64, String)>, usize) {
        let (mut msgs, mut acks) = (Vec::new(), 0);
        while msgs.len() < 10 {
            let v = recv_json(ws);
            match v["op"].as_str() {
                Some("message") => msgs.push((
                    v["seq"].as_u64().unwrap(),
                    v["text"].as_str().unwrap().to_string(),
                )),
                Some("ack") => {
                    assert_eq!(v["id"].as_str().unwrap().len(), 26);
                    acks += 1
                }
                _ => {}
            }
        }
        (msgs, acks)
    };
    let (seen_a, _) = read(&mut a);
    let (seen_b, _) = read(&mut b);
    assert_eq!(seen_a, seen_b, "same messages, same order");
    let seqs: Vec<u64> = seen_a.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    // The sender is named by its session, not by anything it sent.
    send_json(
        &mut a,
        &json!({"op":"publish","room":"general","text":"who","from":"mallory"}),
    );
    let m = until_op(&mut b, "message");
    assert_eq!(m["from"], ack_a["user"]);
}

#[test]
fn the_ack_names_the_committed_message() {
    let gw = Gateway::start("", &[]);
    let (mut a, _) = gw.session(None);
    join(&mut a, "r", 0);
    let ack = publish(&mut a, "r", "hello", "p1");
    assert_eq!(ack["op"], "ack");
    assert_eq!(ack["seq"], 1);
    let m = until_op(&mut a, "message");
    assert_eq!(
        (m["id"].clone(), m["seq"].clone(), m["text"].clone()),
        (ack["id"].clone(), json!(1), json!("hello"))
    );
    assert!(m["ts"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(m["reactions"], json!({}));
}

#[test]
fn a_reconnecting_client_recovers_exactly_what_it_missed() {
    let gw = Gateway::start("", &[]);
    let (mut a, _) = gw.session(None);
    let (mut b, _) = gw.session(None);
    join(&mut a, "r", 0);
    join(&mut b, "r", 0);
    for i in 0..3 {
        publish(&mut a, "r", &format!("before{i}"), &format!("x{i}"));
    }
    let mut last_seen = 0;
    while last_seen < 3 {
        last_seen = until_op(&mut b, "message")["seq"].as_u64().unwrap();
    }
    drop(b);
    for i in 0..5 {
        publish(&mut a, "r", &format!("missed{i}"), &format!("y{i}"));
    }
    let (mut b, _) = gw.session(None);
    join(&mut b, "r", 0);
    send_json(
        &mut b,
        &json!({"op":"history","room":"r","after_seq":last_seen,"request_id":"h"}),
    );
    let h = answer(&mut b, "h");
    assert_eq!(h["op"], "history_res");
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["missed0", "missed1", "missed2", "missed3", "missed4"]
    );
    // And join with history returns the newest, oldest first.
    let (mut c, _) = gw.session(None);
    let joined = join(&mut c, "r", 2);
    let seqs: Vec<u64> = joined["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [7, 8]);
    send_json(
        &mut c,
        &json!({"op":"history","room":"r","before_seq":3,"limit":5,"request_id":"old"}),
    );
    let old = answer(&mut c, "old");
    let seqs: Vec<u64> = old["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2]);
}

#[test]
fn presence_tells_members_who_came_and_went() {
    let gw = Gateway::start("", &[]);
    let (mut a, ack_a) = gw.session(None);
    let (mut b, ack_b) = gw.session(None);
    join(&mut a, "r", 0);
    // The first presence of a new room names the joiner itself.
    let p = until_op(&mut a, "presence");
    assert_eq!(p["joined"], json!([ack_a["user"]]));
    join(&mut b, "r", 0);
    let p = until_op(&mut a, "presence");
    assert_eq!(p["joined"], json!([ack_b["user"]]));
    // Leaving by closing the connection.
    drop(b);
    let p = until_op(&mut a, "presence");
    assert_eq!(p["left"], json!([ack_b["user"]]));
    send_json(&mut a, &json!({"op":"leave","room":"r","request_id":"l"}));
    assert_eq!(
        answer(&mut a, "l"),
        json!({"op":"left","request_id":"l","room":"r"})
    );
}

#[test]
fn reactions_toggle_and_reach_members() {
    let gw = Gateway::start("", &[]);
    let (mut a, _) = gw.session(None);
    let (mut b, ack_b) = gw.session(None);
    join(&mut a, "r", 0);
    join(&mut b, "r", 0);
    let ack = publish(&mut a, "r", "react to me", "p");
    let id = ack["id"].as_str().unwrap().to_string();
    send_json(
        &mut b,
        &json!({"op":"react","message_id":id,"emoji":"👍","request_id":"r1"}),
    );
    assert_eq!(answer(&mut b, "r1"), json!({"op":"ack","request_id":"r1"}));
    let ev = until_op(&mut a, "reaction");
    assert_eq!(
        ev,
        json!({"op":"reaction","room":"r","message_id":id,"emoji":"👍","count":1,"by":ack_b["user"],"added":true})
    );
    send_json(
        &mut b,
        &json!({"op":"react","message_id":id,"emoji":"👍","request_id":"r2"}),
    );
    answer(&mut b, "r2");
    let ev = until_op(&mut a, "reaction");
    assert_eq!(
        (ev["count"].clone(), ev["added"].clone()),
        (json!(0), json!(false))
    );
    // History carries the counts.
    send_json(
        &mut a,
        &json!({"op":"react","message_id":id,"emoji":"🎉","request_id":"r3"}),
    );
    answer(&mut a, "r3");
    send_json(&mut a, &json!({"op":"history","room":"r","request_id":"h"}));
    let h = answer(&mut a, "h");
    assert_eq!(h["messages"][0]["reactions"], json!({"🎉":1}));
    // A message that does not exist, or is in a room one is not in.
    send_json(
        &mut a,
        &json!({"op":"react","message_id":"nope","emoji":"👍","request_id":"r4"}),
    );
    assert_eq!(answer(&mut a, "r4")["error"]["code"], "NOT_FOUND");
    let (mut c, _) = gw.session(None);
    send_json(
        &mut c,
        &json!({"op":"react","message_id":id,"emoji":"👍","request_id":"r5"}),
    );
    assert_eq!(answer(&mut c, "r5")["error"]["code"], "NOT_FOUND");
}

#[test]
fn reaction_limits_refuse_and_change_nothing() {
    let gw = Gateway::start(
        &format!("[server]\nmax_connections_per_ip = 200\n{NO_RATE_LIMITS}"),
        &[],
    );
    let (mut a, _) = gw.session(None);
    join(&mut a, "r", 0);
    let id = publish(&mut a, "r", "popular", "p")["id"]
        .as_str()
        .unwrap()
        .to_string();
    // 49 distinct emoji from one user...
    for i in 0..49 {
        send_json(
            &mut a,
            &json!({"op":"react","message_id":id,"emoji":format!("e{i}"),"request_id":format!("e{i}")}),
        );
        assert_eq!(answer(&mut a, &format!("e{i}"))["op"], "ack");
    }
    // ...and a 50th, from 100 users.
    let mut others = Vec::new();
    for i in 0..100 {
        let (mut ws, _) = gw.session(None);
        join(&mut ws, "r", 0);
        send_json(
            &mut ws,
            &json!({"op":"react","message_id":id,"emoji":"👍","request_id":"u"}),
        );
        assert_eq!(answer(&mut ws, "u")["op"], "ack", "user {i}");
        others.push(ws);
    }
    // The 51st distinct emoji and the 101st user are refused.
    send_json(
        &mut a,
        &json!({"op":"react","message_id":id,"emoji":"one-too-many","request_id":"x"}),
    );
    assert_eq!(answer(&mut a, "x")["error"]["code"], "LIMIT_EXCEEDED");
    send_json(
        &mut a,
        &json!({"op":"react","message_id":id,"emoji":"👍","request_id":"y"}),
    );
    assert_eq!(answer(&mut a, "y")["error"]["code"], "LIMIT_EXCEEDED");
    send_json(&mut a, &json!({"op":"history","room":"r","request_id":"h"}));
    let h = answer(&mut a, "h");
    let reactions = &h["messages"][0]["reactions"];
    // Nothing changed: still 50 emoji, 100 users on 👍.
    assert_eq!(reactions["👍"], 100);
    assert_eq!(reactions.as_object().unwrap().len(), 50);
}

#[test]
fn room_and_text_bounds_give_documented_errors() {
    let gw = Gateway::start(
        "[chat]\nmembers_per_room = 2\nrooms_per_session = 3\nmax_text_bytes = 100\n",
        &[],
    );
    let (mut a, _) = gw.session(None);
    let code = |ws: &mut Ws, req: Value| -> String {
        let mut req = req;
        req["request_id"] = json!("q");
        send_json(ws, &req);
        let v = answer(ws, "q");
        v["error"]["code"]
            .as_str()
            .unwrap_or(v["op"].as_str().unwrap())
            .to_string()
    };
    assert_eq!(
        code(&mut a, json!({"op":"join","room":"bad room"})),
        "INVALID_REQUEST"
    );
    assert_eq!(
        code(&mut a, json!({"op":"join","room":"x".repeat(65)})),
        "INVALID_REQUEST"
    );
    assert_eq!(
        code(&mut a, json!({"op":"join","room":"r","history":201})),
        "INVALID_REQUEST"
    );
    assert_eq!(
        code(
            &mut a,
            json!({"op":"publish","room":"r","text":"not a member"})
        ),
        "UNAUTHORIZED"
    );
    assert_eq!(
        code(&mut a, json!({"op":"history","room":"r"})),
        "UNAUTHORIZED"
    );
    for room in ["r", "s", "t"] {
        assert_eq!(code(&mut a, json!({"op":"join","room":room})), "joined");
    }
    assert_eq!(
        code(&mut a, json!({"op":"join","room":"u"})),
        "LIMIT_EXCEEDED"
    );
    assert_eq!(
        code(&mut a, json!({"op":"publish","room":"r","text":""})),
        "INVALID_REQUEST"
    );
    assert_eq!(
        code(
            &mut a,
            json!({"op":"publish","room":"r","text":"x".repeat(101)})
        ),
        "INVALID_REQUEST"
    );
    assert_eq!(
        code(
            &mut a,
            json!({"op":"publish","room":"r","text":"x".repeat(100)})
        ),
        "ack"
    );
    let (mut b, _) = gw.session(None);
    let (mut c, _) = gw.session(None);
    assert_eq!(code(&mut b, json!({"op":"join","room":"r"})), "joined");
    assert_eq!(
        code(&mut c, json!({"op":"join","room":"r"})),
        "LIMIT_EXCEEDED"
    );
}

#[test]
fn a_full_pool_queue_answers_over_capacity() {
    let gw = Gateway::start(
        &format!("[pool]\nthreads = 1\nqueue = 1\n{NO_RATE_LIMITS}"),
        &[],
    );
    let (mut a, _) = gw.session(None);
    join(&mut a, "r", 0);
    for i in 0..20 {
        publish(&mut a, "r", &format!("m{i}"), &format!("p{i}"));
    }
    // Twenty history reads at once against one thread and one queue slot.
    for i in 0..20 {
        let req = json!({"op":"history","room":"r","limit":200,"request_id":format!("h{i}")});
        a.write(Message::text(req.to_string())).unwrap();
    }
    a.flush().unwrap();
    let (mut ok, mut busy) = (0, 0);
    while ok + busy < 20 {
        let v = recv_json(&mut a);
        match (v["op"].as_str(), v["error"]["code"].as_str()) {
            (Some("history_res"), _) => ok += 1,
            (Some("error"), Some("OVER_CAPACITY")) => {
                assert!(v["error"]["retry_after_ms"].as_u64().unwrap() > 0);
                busy += 1
            }
            _ => {}
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok {ok}, busy {busy}");
    assert!(gw.metric("hivegate_pool_jobs_rejected_total") >= 1.0);
    // Once the burst is over, reads work again.
    gw.wait_until("the pool's queue to empty", || {
        gw.metric("hivegate_pool_queue_depth") == 0.0
    });
    send_json(
        &mut a,
        &json!({"op":"history","room":"r","request_id":"later"}),
    );
    assert_eq!(answer(&mut a, "later")["op"], "history_res");
}
