//! `docs/PROTOCOL.md` is the contract a client is written from, so every
//! example frame in it is read here: each is JSON; each one a client sends
//! is accepted by the server's parser as written; and the frames the
//! server sends have, op by op, exactly the members a real session gets
//! from the real binary (no documented member it never sends, none it
//! sends undocumented, each of the documented JSON type).

mod common;
use common::fake_openai::{transcript, Behaviour, FakeOpenAi};
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The ops a client sends; every other op in the document is the server's.
const CLIENT_OPS: &[&str] = &[
    "hello",
    "ping",
    "join",
    "leave",
    "publish",
    "react",
    "history",
    "list_tools",
    "call_tool",
    "cancel",
];

fn document() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/PROTOCOL.md");
    std::fs::read_to_string(path).expect("docs/PROTOCOL.md")
}

/// Every inline code span of the document that holds a frame (`{"op"...`),
/// with its line, parsed. A span that is not JSON fails here.
fn example_frames() -> Vec<(usize, Value)> {
    let doc = document();
    let mut out = Vec::new();
    for (n, line) in doc.lines().enumerate() {
        for (i, span) in line.split('`').enumerate() {
            // Odd pieces are inside backticks.
            if i % 2 == 1 && span.starts_with("{\"op\"") {
                let v: Value = serde_json::from_str(span).unwrap_or_else(|e| {
                    panic!("docs/PROTOCOL.md:{}: not JSON ({e}): {span}", n + 1)
                });
                out.push((n + 1, v));
            }
        }
    }
    out
}

fn op(v: &Value) -> &str {
    v["op"].as_str().unwrap_or("")
}

#[test]
fn every_client_frame_in_the_document_is_accepted_as_written() {
    let frames = example_frames();
    assert!(frames.len() > 30, "only {} frames found", frames.len());
    let mut ops = BTreeSet::new();
    for (line, v) in frames.iter().filter(|(_, v)| CLIENT_OPS.contains(&op(v))) {
        let text = v.to_string();
        if let Err(e) = hivegate::protocol::parse(&text) {
            panic!("docs/PROTOCOL.md:{line}: the server refuses {text}: {e}");
        }
        ops.insert(op(v));
    }
    // And every request the server reads has an example.
    let all: BTreeSet<&str> = CLIENT_OPS.iter().copied().collect();
    assert_eq!(ops, all, "a request without an example");
}

/// Op by op, each member's JSON type, over every frame given (messages
/// inside `history` and `messages` count as `message` frames).
type Shapes = BTreeMap<String, BTreeMap<String, &'static str>>;

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn add_shape(shapes: &mut Shapes, v: &Value) {
    let Some(obj) = v.as_object() else { return };
    let entry = shapes.entry(op(v).to_string()).or_default();
    for (k, val) in obj {
        let seen = entry.insert(k.clone(), kind(val));
        assert!(
            seen.is_none_or(|s| s == kind(val)),
            "{}'s {k} is sometimes {} and sometimes {}",
            op(v),
            seen.unwrap_or(""),
            kind(val)
        );
    }
    for list in ["history", "messages"] {
        for m in obj
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            add_shape(shapes, m);
        }
    }
}

/// A session that keeps every frame it reads.
struct Client {
    ws: Ws,
    seen: Vec<Value>,
}

impl Client {
    fn new(ws: Ws) -> Client {
        Client {
            ws,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, v: Value) {
        send_json(&mut self.ws, &v);
    }

    /// Reads until a frame satisfies `done`; returns it.
    fn until(&mut self, mut done: impl FnMut(&Value) -> bool) -> Value {
        loop {
            let v = recv_json(&mut self.ws);
            self.seen.push(v.clone());
            if done(&v) {
                return v;
            }
        }
    }

    /// Sends `v` and reads until a frame with its request_id and `op`.
    fn ask(&mut self, v: Value, answer: &str) -> Value {
        let rid = v["request_id"].clone();
        self.send(v);
        self.until(|f| f["request_id"] == rid && (op(f) == answer || op(f) == "error"))
    }
}

const REASONING: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"The user greets me.\"}}]}\n\n";

/// Runs what the document describes against the real binary and returns
/// the frames the server sent.
fn a_real_session() -> Vec<Value> {
    // A provider slow to start (so `progress` is sent) that reasons first.
    let fake = FakeOpenAi::start(Behaviour::Stream {
        transcript: format!("{REASONING}{}", transcript("hello.txt")),
        delay: Duration::from_millis(20),
        first_byte: Duration::from_millis(300),
    });
    let cfg = format!(
        "[server]\noutbox_bytes = 8192\n[chat]\nmax_text_bytes = 256\n[llm]\nprogress_interval_ms = 50\n\
         [provider.kimi]\nbase_url = \"{}\"\nmodel = \"moonshot-v1-8k\"\napi_key_env = \"FAKE_KEY\"\n",
        fake.base_url()
    );
    let gw = Gateway::start(&cfg, &[("FAKE_KEY", "sk-doc-test")]);
    let mut a = Client::new(gw.ws());
    a.ask(
        json!({"op":"hello","client":"web/1.0","client_id":"k3J9xQ2mP7vL"}),
        "hello_ack",
    );
    // Open mode: a token that signs nobody in makes a guest, told so.
    let mut stray = Client::new(gw.ws());
    let ack = stray.ask(json!({"op":"hello","token":"tk_nobody"}), "hello_ack");
    assert!(ack["notice"].is_string(), "{ack}");
    a.ask(json!({"op":"ping","request_id":"p1"}), "pong");

    a.ask(
        json!({"op":"join","request_id":"j1","room":"general","history":50}),
        "joined",
    );
    a.until(|f| op(f) == "presence");
    let (mut b, _) = gw.session(None);
    send_json(&mut b, &json!({"op":"join","room":"general"}));
    a.until(|f| op(f) == "presence" && f["joined"].is_array());
    let ack = a.ask(
        json!({"op":"publish","request_id":"r1","room":"general","text":"hi"}),
        "ack",
    );
    a.until(|f| op(f) == "message");
    let id = ack["id"].clone();
    for rid in ["r2", "r2b"] {
        // On, then off again: `added` true, then false with count 0.
        a.ask(
            json!({"op":"react","request_id":rid,"message_id":id,"emoji":"👍"}),
            "ack",
        );
        a.until(|f| op(f) == "reaction");
    }
    a.ask(
        json!({"op":"history","request_id":"r3","room":"general","before_seq":42,"limit":50}),
        "history_res",
    );
    // Messages larger than half the outbox: the answer is cut, "more".
    for i in 0..16 {
        a.ask(
            json!({"op":"publish","request_id":format!("big{i}"),"room":"general","text":"x".repeat(250)}),
            "ack",
        );
    }
    let cut = a.ask(
        json!({"op":"history","request_id":"r4","room":"general","after_seq":0}),
        "history_res",
    );
    assert_eq!(cut["more"], true, "{cut}");
    send_json(
        &mut b,
        &json!({"op":"leave","request_id":"l1","room":"general"}),
    );
    a.until(|f| op(f) == "presence" && f["left"].is_array());
    a.ask(
        json!({"op":"leave","request_id":"l1","room":"general"}),
        "left",
    );
    let no = a.ask(
        json!({"op":"publish","request_id":"r5","room":"general","text":"hi"}),
        "ack",
    );
    assert_eq!(no["error"]["code"], "UNAUTHORIZED");

    a.ask(
        json!({"op":"list_tools","request_id":"t1"}),
        "list_tools_res",
    );
    // The same call twice: the second shares the first's answer.
    let call = json!({"op":"call_tool","request_id":"t2","name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}],"provider":"auto","model":null,"stream":true}});
    a.send(call.clone());
    a.send(call);
    let mut results = 0;
    a.until(|f| {
        results += usize::from(op(f) == "call_tool_res");
        results == 2
    });
    for kind in ["progress", "stream_chunk"] {
        assert!(a.seen.iter().any(|f| op(f) == kind), "no {kind}");
    }
    assert!(a.seen.iter().any(|f| f["reasoning"].is_string()));
    fake.push(Behaviour::Stall);
    a.ask(
        json!({"op":"call_tool","request_id":"t3","name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]}}),
        "call_tool_ack",
    );
    a.ask(json!({"op":"cancel","request_id":"t3"}), "cancelled");
    // A burst past the user's bucket: RATE_LIMITED with retry_after_ms.
    for i in 0.. {
        let pong = a.ask(json!({"op":"ping","request_id":format!("q{i}")}), "pong");
        if op(&pong) == "error" {
            assert_eq!(pong["error"]["code"], "RATE_LIMITED");
            break;
        }
        assert!(i < 100, "never rate limited");
    }
    let mut seen = a.seen;
    seen.extend(stray.seen);
    seen.extend(signed_in_session());
    seen
}

/// Token mode: a refused `hello`, and a reload that narrows the rules.
fn signed_in_session() -> Vec<Value> {
    let rules = "[auth]\nmode = \"token\"\ntokens = [\"alice:tk_alice_4f9c:staff\"]\n\
        [[access]]\nroles = [\"staff\"]\nrooms = [\"lobby\", \"team-*\"]\ncan = [\"join\", \"publish\"]\n";
    let gw = Gateway::start(&format!("{NO_RATE_LIMITS}{rules}"), &[]);
    let mut refused = Client::new(gw.ws());
    let no = refused.ask(json!({"op":"hello","token":"tk_wrong"}), "hello_ack");
    assert_eq!(no["ok"], false);
    assert_eq!(expect_close(&mut refused.ws), Some(4003));
    let mut alice = Client::new(gw.ws());
    alice.ask(
        json!({"op":"hello","token":"tk_alice_4f9c","client":"kiosk/1.2"}),
        "hello_ack",
    );
    alice.ask(
        json!({"op":"join","request_id":"j","room":"team-red"}),
        "joined",
    );
    let path = gw.dir.path().join("hivegate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace(", \"team-*\"", "")).unwrap();
    gw.signal(libc::SIGHUP);
    alice.until(|f| op(f) == "left" && f["reason"] == "forbidden");
    let mut seen = refused.seen;
    seen.extend(alice.seen);
    seen
}

#[test]
fn the_server_frames_in_the_document_are_the_ones_a_real_session_gets() {
    let mut documented = Shapes::new();
    for (_, v) in example_frames() {
        if !CLIENT_OPS.contains(&op(&v)) {
            add_shape(&mut documented, &v);
        }
    }
    let mut real = Shapes::new();
    for v in a_real_session() {
        add_shape(&mut real, &v);
    }
    for (op, members) in &real {
        let Some(doc) = documented.get(op) else {
            panic!("the server sends {op:?}, which docs/PROTOCOL.md has no example of");
        };
        for (member, kind) in members {
            assert_eq!(
                doc.get(member),
                Some(kind),
                "{op}'s member {member:?} ({kind}) is sent but not documented so"
            );
        }
    }
    for (op, members) in &documented {
        let Some(sent) = real.get(op) else {
            panic!("docs/PROTOCOL.md shows {op:?}, which the session never got");
        };
        for member in members.keys() {
            assert!(
                sent.contains_key(member),
                "docs/PROTOCOL.md shows {op}'s member {member:?}, which the session never got"
            );
        }
    }
}
