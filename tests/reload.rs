//! SIGHUP: tokens, origins, limits and API keys change while connections
//! stay open; an invalid configuration is refused and the old one kept;
//! systemd hears RELOADING=1 and READY=1 around it; keys are audited by id.

mod common;
use common::fake_openai::{ok_stream, transcript, FakeOpenAi};
use common::*;
use serde_json::json;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

const OLD_KEY: &str = "sk-old-key-41d2e8";
const NEW_KEY: &str = "sk-new-key-9b7c05";

fn key_id(key: &str) -> String {
    let d = hivegate::auth::sha256(key.as_bytes());
    format!(
        "sha256:{}",
        d[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn wait_log(gw: &Gateway, needle: &str, count: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while gw.log_text().matches(needle).count() < count {
        assert!(Instant::now() < end, "no {needle:?} in:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn chat(ws: &mut Ws, rid: &str) -> serde_json::Value {
    send_json(
        ws,
        &json!({"op":"call_tool","request_id":rid,"name":"chat",
                "arguments":{"messages":[{"role":"user","content":"hi"}]}}),
    );
    loop {
        let v = recv_json(ws);
        if v["request_id"] == rid && (v["op"] == "call_tool_res" || v["op"] == "error") {
            return v;
        }
    }
}

#[test]
fn sighup_rotates_tokens_origins_limits_and_keys_without_dropping_anyone() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("kimi.key");
    write_secret(&key_file, OLD_KEY);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let provider = format!(
        "[provider.kimi]\nbase_url = \"{}\"\nmodel = \"m\"\napi_key_file = {key_file:?}\n",
        fake.base_url()
    );
    let old = format!("[auth]\ntokens = [\"alice:tok-a\"]\n{provider}");
    let gw = Gateway::start(
        &old,
        &[("NOTIFY_SOCKET", &notify_path.display().to_string())],
    );
    let path = gw.dir.path().join("hivegate.toml");
    let start_text = std::fs::read_to_string(&path).unwrap();
    let mut heard = Vec::new();
    let recv_until = |heard: &mut Vec<String>, want: &str| {
        let mut buf = [0u8; 512];
        loop {
            let n = notify.recv(&mut buf).expect("a notification");
            let s = String::from_utf8_lossy(&buf[..n]).into_owned();
            heard.push(s.clone());
            if s.starts_with(want) {
                return;
            }
        }
    };
    recv_until(&mut heard, "READY=1");

    let (mut alice, ack) = gw.session(Some("tok-a"));
    assert_eq!(ack["ok"], true);
    assert_eq!(chat(&mut alice, "c1")["op"], "call_tool_res");
    assert!(fake.requests()[0].head.contains(OLD_KEY));

    // Rotate: a new token replaces alice's, origins are restricted, the
    // user rate is lowered and the key file holds a new key.
    std::fs::write(&key_file, NEW_KEY).unwrap();
    let new = start_text.replace(
        "tokens = [\"alice:tok-a\"]",
        "tokens = [\"bob:tok-b\"]\n[limits]\nuser_capacity = 7\n",
    );
    let new = new.replacen(
        "[server]\n",
        "[server]\nallowed_origins = [\"https://ok.example\"]\n",
        1,
    );
    std::fs::write(&path, &new).unwrap();
    gw.signal(libc::SIGHUP);
    recv_until(&mut heard, "RELOADING=1");
    assert!(
        heard.last().unwrap().contains("\nMONOTONIC_USEC="),
        "{heard:?}"
    );
    recv_until(&mut heard, "READY=1");
    wait_log(&gw, "configuration reloaded", 1);

    // Alice's session is still open and served, with the new key.
    assert_eq!(chat(&mut alice, "c2")["op"], "call_tool_res");
    let last = fake.requests().pop().unwrap();
    assert!(last.head.contains(NEW_KEY), "{}", last.head);
    // Her token no longer signs in; bob's does, with the new limits.
    assert_eq!(gw.session(Some("tok-a")).1["ok"], false);
    let (_bob, ack) = gw.session(Some("tok-b"));
    assert_eq!(ack["ok"], true);
    assert_eq!(ack["limits"]["burst"], 7.0);
    // Origins are checked.
    let Err(refused) = gw.ws_from(None, &[("Origin", "https://evil.example")]) else {
        panic!("a foreign origin is refused");
    };
    assert_eq!(refused.status, 403);
    assert!(gw
        .ws_from(None, &[("Origin", "https://ok.example")])
        .is_ok());

    // The audit trail: one line per key change, by id, never the key;
    // calls counted per key id.
    let (old_id, new_id) = (key_id(OLD_KEY), key_id(NEW_KEY));
    let text = gw.log_text();
    assert!(
        text.contains(&format!("key={new_id} previous={old_id}")),
        "{text}"
    );
    let metric = |id: &str| {
        gw.metric(&format!(
            "hivegate_upstream_key_calls_total{{upstream=\"provider.kimi\",key=\"{id}\"}}"
        ))
    };
    assert_eq!(metric(&old_id), 1.0);
    assert_eq!(metric(&new_id), 1.0);
    assert_eq!(
        gw.metric("hivegate_config_reloads_total{result=\"applied\"}"),
        1.0
    );

    // A change only a restart applies is named, and the rest applies.
    let fixed = new.replace("[limits]\n", "[limits]\ntable_entries = 99\n");
    std::fs::write(&path, &fixed).unwrap();
    gw.signal(libc::SIGHUP);
    wait_log(&gw, "configuration reloaded", 2);
    assert!(gw.log_text().contains("sections=limits"));

    // An invalid file is refused with its errors; bob still signs in.
    std::fs::write(
        &path,
        new.replace("user_capacity = 7", "user_capacity = \"lots\""),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    recv_until(&mut heard, "RELOADING=1");
    recv_until(&mut heard, "READY=1");
    wait_log(&gw, "reload refused", 1);
    assert!(gw.log_text().contains("user_capacity"), "{}", gw.log_text());
    assert_eq!(
        gw.metric("hivegate_config_reloads_total{result=\"failed\"}"),
        1.0
    );
    assert_eq!(gw.session(Some("tok-b")).1["ok"], true);
    assert_eq!(chat(&mut alice, "c3")["op"], "call_tool_res");

    let everything = format!("{}{}", gw.log_text(), gw.get("/metrics").body);
    assert!(!everything.contains(OLD_KEY) && !everything.contains(NEW_KEY));
    assert!(!everything.contains("tok-a") && !everything.contains("tok-b"));
}
