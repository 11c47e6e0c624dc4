//! Who may enter, and where, over real sockets: roles on tokens, the
//! `[[access]]` rules for rooms and providers, daily LLM budgets across a
//! restart, reloads that shrink rights or would change the sign-in mode,
//! and the sign-in holes found from outside.

mod common;
use common::fake_openai::{ok_stream, transcript, FakeOpenAi};
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Sends a request and reads frames until its answer.
fn ask(ws: &mut Ws, v: Value) -> Value {
    let rid = v["request_id"].as_str().expect("request_id").to_string();
    send_json(ws, &v);
    loop {
        let a = recv_json(ws);
        if a["request_id"] == rid && a["op"] != "call_tool_ack" && a["op"] != "stream_chunk" {
            return a;
        }
    }
}

fn join(ws: &mut Ws, room: &str) -> Value {
    ask(
        ws,
        json!({"op":"join","room":room,"request_id":format!("j-{room}")}),
    )
}

fn publish(ws: &mut Ws, room: &str, rid: &str) -> Value {
    ask(
        ws,
        json!({"op":"publish","room":room,"text":"hi","request_id":rid}),
    )
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn wait_log(gw: &Gateway, needle: &str, count: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while gw.log_text().matches(needle).count() < count {
        assert!(Instant::now() < end, "no {needle:?} in:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

const TOKENS: &str = "[auth]\nmode = \"token\"\ntokens = [\"alice:tok-alice:staff\", \
    \"kiosk1:tok-kiosk:kiosk\", \"olga:tok-olga:ops\", \"zed:tok-zed\"]\n";

/// The README's worked example, less the providers.
const RULES: &str = "
[[access]]
roles = [\"ops\"]
rooms = [\"*\"]
can = [\"join\", \"publish\", \"react\"]

[[access]]
roles = [\"staff\"]
rooms = [\"lobby\", \"team-*\", \"dm-{user}-*\", \"dm-*-{user}\"]
can = [\"join\", \"publish\", \"react\"]

[[access]]
roles = [\"kiosk\", \"guest\"]
rooms = [\"lobby\"]
can = [\"join\", \"react\"]

[[access]]
roles = [\"*\"]
rooms = [\"announcements\"]
can = [\"read\"]
";

#[test]
fn rules_decide_who_may_join_read_publish_and_react() {
    let gw = Gateway::start(&format!("{NO_RATE_LIMITS}{TOKENS}{RULES}"), &[]);
    let (mut alice, ack) = gw.session(Some("tok-alice"));
    assert_eq!(ack["ok"], true);
    assert_eq!(join(&mut alice, "lobby")["op"], "joined");
    let msg = publish(&mut alice, "lobby", "p1");
    assert_eq!(msg["op"], "ack", "{msg}");
    let id = msg["id"].as_str().unwrap().to_string();
    assert_eq!(join(&mut alice, "team-red")["op"], "joined");
    assert_eq!(join(&mut alice, "dm-alice-bob")["op"], "joined");
    assert_eq!(join(&mut alice, "dm-bob-alice")["op"], "joined");
    for room in ["dm-bob-carol", "secret"] {
        let r = join(&mut alice, room);
        assert_eq!(code(&r), "FORBIDDEN", "{room}: {r}");
    }

    // A kiosk joins the lobby and reacts, but may not publish; retries
    // are refused each time and logged once.
    let (mut kiosk, _) = gw.session(Some("tok-kiosk"));
    assert_eq!(join(&mut kiosk, "lobby")["op"], "joined");
    let r = ask(
        &mut kiosk,
        json!({"op":"react","message_id":id,"emoji":"👍","request_id":"r1"}),
    );
    assert_eq!(r["op"], "ack", "{r}");
    for i in 0..5 {
        let r = publish(&mut kiosk, "lobby", &format!("k{i}"));
        assert_eq!(code(&r), "FORBIDDEN", "{r}");
        assert!(r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("access rule 3"));
    }
    assert_eq!(
        gw.metric("hivegate_access_denied_total{reason=\"publish\"}"),
        5.0
    );
    // Anyone may read the announcements without joining, and no more.
    let (mut zed, _) = gw.session(Some("tok-zed"));
    // Log lines come in order: once zed's hello is there, so are all the
    // kiosk's refusals.
    wait_log(&gw, "user=zed", 1);
    let denied = gw
        .log_text()
        .lines()
        .filter(|l| l.contains("access denied") && l.contains("kiosk1"))
        .count();
    assert_eq!(denied, 1, "{}", gw.log_text());
    assert_eq!(code(&join(&mut zed, "lobby")), "FORBIDDEN");
    let h = ask(
        &mut zed,
        json!({"op":"history","room":"announcements","request_id":"h1"}),
    );
    assert_eq!(h["op"], "history_res", "{h}");
    assert_eq!(code(&join(&mut zed, "announcements")), "FORBIDDEN");
    let h = ask(
        &mut zed,
        json!({"op":"history","room":"lobby","request_id":"h2"}),
    );
    assert_eq!(code(&h), "FORBIDDEN");
    // Ops go everywhere.
    let (mut olga, _) = gw.session(Some("tok-olga"));
    assert_eq!(join(&mut olga, "secret")["op"], "joined");
    assert_eq!(publish(&mut olga, "secret", "o1")["op"], "ack");
}

#[test]
fn open_mode_guests_are_distinct_and_have_the_guest_role() {
    let gw = Gateway::start(
        &format!("{NO_RATE_LIMITS}[auth]\nmode = \"open\"\n{RULES}"),
        &[],
    );
    let (mut a, ack_a) = gw.session(None);
    let (_b, ack_b) = gw.session(None);
    let (ua, ub) = (
        ack_a["user"].as_str().unwrap(),
        ack_b["user"].as_str().unwrap(),
    );
    assert!(ua.starts_with("guest-") && ub.starts_with("guest-"));
    assert_ne!(ua, ub);
    // Not numbered per box: two boxes would both hand out guest-1.
    assert!(ua.len() > "guest-1".len());
    assert_eq!(join(&mut a, "lobby")["op"], "joined");
    assert_eq!(code(&publish(&mut a, "lobby", "g1")), "FORBIDDEN");
}

#[test]
fn a_reload_that_shrinks_rights_takes_sessions_out_of_rooms() {
    let gw = Gateway::start(&format!("{NO_RATE_LIMITS}{TOKENS}{RULES}"), &[]);
    let (mut alice, _) = gw.session(Some("tok-alice"));
    assert_eq!(join(&mut alice, "lobby")["op"], "joined");
    assert_eq!(join(&mut alice, "team-red")["op"], "joined");
    let path = gw.dir.path().join("hivegate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"team-*\", ", "")).unwrap();
    gw.signal(libc::SIGHUP);
    // Out of team-red, told why, and still connected and in the lobby.
    let left = recv_json(&mut alice);
    assert_eq!(
        left,
        json!({"op":"left","room":"team-red","reason":"forbidden"})
    );
    let err = recv_json(&mut alice);
    assert_eq!(code(&err), "FORBIDDEN", "{err}");
    assert_eq!(
        ask(&mut alice, json!({"op":"ping","request_id":"p"}))["op"],
        "pong"
    );
    assert_eq!(publish(&mut alice, "lobby", "p2")["op"], "ack");
    assert_eq!(code(&join(&mut alice, "team-red")), "FORBIDDEN");
    assert_eq!(
        gw.metric("hivegate_access_denied_total{reason=\"revoked\"}"),
        1.0
    );
}

#[test]
fn a_reload_never_changes_an_inferred_sign_in_mode() {
    // A token gateway on loopback; the reload reads a file without
    // [auth], which alone would infer open mode.
    let gw = Gateway::start(
        &format!("{NO_RATE_LIMITS}[auth]\ntokens = [\"alice:tok-a\"]\n"),
        &[],
    );
    let path = gw.dir.path().join("hivegate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("[auth]\ntokens = [\"alice:tok-a\"]\n", ""),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    wait_log(&gw, "reload refused", 1);
    assert!(gw.log_text().contains("auth.mode"), "{}", gw.log_text());
    assert_eq!(gw.session(None).1["ok"], false);
    assert_eq!(gw.session(Some("tok-a")).1["ok"], true);
    assert_eq!(mcp_post(gw.addr, "", "{}").status, 401);
    assert_eq!(
        gw.metric("hivegate_config_reloads_total{result=\"failed\"}"),
        1.0
    );
    // Said out loud, the change is applied.
    std::fs::write(
        &path,
        text.replace("tokens = [\"alice:tok-a\"]\n", "mode = \"open\"\n"),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    wait_log(&gw, "configuration reloaded", 1);
    assert_eq!(gw.session(None).1["ok"], true);
}

/// A gateway with two providers on one fake, and rules for them.
fn llm_gateway(fake: &FakeOpenAi, budget: u64) -> Gateway {
    let mut cfg = format!("{NO_RATE_LIMITS}{TOKENS}");
    for name in ["cheap", "expensive"] {
        cfg.push_str(&format!(
            "[provider.{name}]\nbase_url = \"{}\"\nmodel = \"m\"\n",
            fake.base_url()
        ));
    }
    cfg.push_str("[llm]\nchain = [\"expensive\", \"cheap\"]\n");
    cfg.push_str(&format!(
        "[[access]]\nroles = [\"ops\"]\nproviders = [\"*\"]\n\n\
         [[access]]\nroles = [\"staff\", \"user\"]\nproviders = [\"cheap\"]\nllm_tokens_per_day = {budget}\n"
    ));
    Gateway::start(&cfg, &[])
}

fn chat(ws: &mut Ws, rid: &str, provider: &str) -> Value {
    ask(
        ws,
        json!({"op":"call_tool","request_id":rid,"name":"chat",
               "arguments":{"messages":[{"role":"user","content":"hi"}],"provider":provider}}),
    )
}

#[test]
fn providers_follow_the_rules_and_budgets_survive_a_restart() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    // hello.txt reports 8 tokens a call: the second call spends the 10.
    let mut gw = llm_gateway(&fake, 10);
    let (mut alice, _) = gw.session(Some("tok-alice"));
    let r = chat(&mut alice, "e1", "expensive");
    assert_eq!(code(&r), "FORBIDDEN", "{r}");
    let r = chat(&mut alice, "c1", "cheap");
    assert_eq!(r["op"], "call_tool_res", "{r}");
    // `auto` keeps to the providers she may use.
    let r = chat(&mut alice, "a1", "auto");
    assert_eq!(r["provider"], "cheap", "{r}");
    let r = chat(&mut alice, "c2", "cheap");
    assert_eq!(code(&r), "BUDGET_EXCEEDED", "{r}");
    let ms = r["error"]["retry_after_ms"].as_u64().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert_eq!(
        (now_ms + ms) % 86_400_000 / 1000,
        0,
        "retry at midnight UTC"
    );
    // Ops are not budgeted, and guests (no rule) may not call at all.
    let (mut olga, _) = gw.session(Some("tok-olga"));
    assert_eq!(chat(&mut olga, "o1", "expensive")["op"], "call_tool_res");
    let (mut kiosk, _) = gw.session(Some("tok-kiosk"));
    assert_eq!(code(&chat(&mut kiosk, "k1", "cheap")), "FORBIDDEN");
    assert_eq!(
        gw.metric("hivegate_access_denied_total{reason=\"budget\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("hivegate_access_denied_total{reason=\"provider\"}"),
        2.0
    );
    drop((alice, olga, kiosk));
    // The spending is on disk: a restart does not renew the budget.
    gw.restart();
    let (mut alice, _) = gw.session(Some("tok-alice"));
    let r = chat(&mut alice, "c3", "cheap");
    assert_eq!(code(&r), "BUDGET_EXCEEDED", "{r}");
}

#[test]
fn metrics_and_details_are_on_the_operator_port_only() {
    let gw = Gateway::start(NO_RATE_LIMITS, &[]);
    let public = gw.get_public("/metrics");
    assert_eq!(public.status, 404);
    assert!(public.body.contains("admin_listen"));
    let ready = gw.get_public("/readyz");
    assert_eq!(ready.status, 200);
    let keys: Vec<String> = ready.json().as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        ["mode", "status"],
        "nothing but the status and the mode"
    );
    let admin = gw.get("/readyz").json();
    assert!(admin["breakers"].is_object() && admin["rss_bytes"].is_number());
    assert!(gw.get("/metrics").body.contains("hivegate_build_info"));
    // The operator port answers only to this box's names too.
    let r = http_request(
        gw.admin.unwrap(),
        "GET /metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    );
    assert_eq!(r.status, 421);
}

#[test]
fn a_rebound_host_name_is_refused_everywhere() {
    let gw = Gateway::start(&format!("{NO_RATE_LIMITS}[auth]\nmode = \"open\"\n"), &[]);
    let post = |host: &str, origin: &str| {
        http_request(
            gw.addr,
            &format!(
                "POST /mcp HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: application/json\r\n\
                 Accept: application/json\r\nContent-Length: {}\r\n\r\n{MCP_INIT}",
                MCP_INIT.len()
            ),
        )
    };
    // After a rebinding, Host and Origin both name the attacker's domain.
    assert_eq!(
        post("evil.example:8080", "Origin: http://evil.example:8080\r\n").status,
        421
    );
    assert_eq!(
        post("127.0.0.1", "Origin: http://evil.example\r\n").status,
        403
    );
    assert_eq!(post("127.0.0.1", "").status, 200);
    assert_eq!(
        post("localhost:1", "Origin: http://localhost:1\r\n").status,
        200
    );
    let ws = gw.ws_from(None, &[("Host", "evil.example")]);
    assert_eq!(ws.err().map(|r| r.status), Some(421));
    let ws = gw.ws_from(None, &[("Origin", "http://evil.example")]);
    assert_eq!(ws.err().map(|r| r.status), Some(403));
    assert!(gw.metric("hivegate_connections_refused_total{reason=\"host\"}") >= 2.0);
}

#[test]
fn failed_sign_ins_on_every_surface_lead_to_429() {
    let gw = Gateway::start(
        &format!("{NO_RATE_LIMITS}[auth]\ntokens = [\"alice:tok-a\"]\n"),
        &[],
    );
    let mcp = |token: &str| mcp_post(gw.addr, &format!("Authorization: Bearer {token}\r\n"), "{}");
    // Three wrong tokens on /mcp and two on the upgrade: the five a
    // minute allowed (limits.failed_hellos_per_minute) are spent.
    for i in 0..3 {
        assert_eq!(mcp(&format!("guess-{i}")).status, 401);
    }
    for i in 0..2 {
        let bad = format!("Bearer guess-ws-{i}");
        let r = gw.ws_from(None, &[("Authorization", &bad)]);
        assert_eq!(r.err().map(|r| r.status), Some(401));
    }
    let r = mcp("tok-a");
    assert_eq!(r.status, 429, "even a right token waits: {}", r.body);
    assert!(r.header("Retry-After").is_some());
    let r = gw.ws_from(None, &[]);
    assert_eq!(r.err().map(|r| r.status), Some(429));
}

#[test]
fn a_token_in_the_subprotocol_signs_in_without_being_echoed() {
    let gw = Gateway::start(
        &format!("{NO_RATE_LIMITS}[auth]\ntokens = [\"alice:tok-a\"]\n"),
        &[],
    );
    let upgrade = |protocols: &str| {
        let mut s = connect_from(gw.addr, None);
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {protocols}\r\n\r\n"
        )
        .unwrap();
        read_head(&mut s)
    };
    let ok = upgrade("hivegate, bearer.tok-a");
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    assert!(ok.contains("Sec-WebSocket-Protocol: hivegate\r\n"), "{ok}");
    assert!(!ok.contains("tok-a"));
    let mcp = upgrade("mcp, bearer.tok-a");
    assert!(mcp.contains("Sec-WebSocket-Protocol: mcp\r\n"), "{mcp}");
    assert!(upgrade("bearer.tok-a").starts_with("HTTP/1.1 400"));
    assert!(upgrade("mcp, bearer.wrong").starts_with("HTTP/1.1 401"));
    // The hello needs no token then.
    let mut ws = gw
        .ws_from(
            None,
            &[("Sec-WebSocket-Protocol", "hivegate, bearer.tok-a")],
        )
        .expect("upgrade");
    send_json(&mut ws, &json!({"op":"hello"}));
    let ack = recv_json(&mut ws);
    assert_eq!(
        (ack["ok"].clone(), ack["user"].clone()),
        (json!(true), json!("alice"))
    );
}

#[test]
fn mcp_sessions_of_one_user_cannot_evict_another_users() {
    let gw = Gateway::start(
        &format!("{NO_RATE_LIMITS}[auth]\ntokens = [\"alice:tok-a\", \"mallory:tok-m\"]\n"),
        &[],
    );
    let open = |token: &str| {
        let r = mcp_post(
            gw.addr,
            &format!("Authorization: Bearer {token}\r\n"),
            MCP_INIT,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.header("Mcp-Session-Id").unwrap()
    };
    let alice = open("tok-a");
    for _ in 0..300 {
        open("tok-m");
    }
    let r = mcp_post(
        gw.addr,
        &format!("Authorization: Bearer tok-a\r\nMcp-Session-Id: {alice}\r\n"),
        r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#,
    );
    assert_eq!(r.status, 200, "alice's session survives: {}", r.body);
    assert!(gw.metric("hivegate_mcp_sessions") <= 9.0);
}

#[test]
fn the_mcp_session_table_is_sized_by_its_settings() {
    let gw = Gateway::start(
        &format!(
            "{NO_RATE_LIMITS}[auth]\ntokens = [\"alice:tok-a\"]\n[mcp]\nmax_sessions_per_owner = 2\n"
        ),
        &[],
    );
    let auth = "Authorization: Bearer tok-a\r\n";
    let sids: Vec<String> = (0..3)
        .map(|_| {
            mcp_post(gw.addr, auth, MCP_INIT)
                .header("Mcp-Session-Id")
                .unwrap()
        })
        .collect();
    let ping = |sid: &str| {
        let headers = format!("{auth}Mcp-Session-Id: {sid}\r\n");
        mcp_post(
            gw.addr,
            &headers,
            r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#,
        )
        .status
    };
    // The third session took the place of alice's oldest.
    assert_eq!(ping(&sids[0]), 404);
    assert_eq!((ping(&sids[1]), ping(&sids[2])), (200, 200));
    assert_eq!(gw.metric("hivegate_mcp_sessions"), 2.0);
}

#[test]
fn mcp_streams_count_against_the_connection_caps() {
    let gw = Gateway::start(
        &format!(
            "[server]\nmax_connections_per_ip = 3\n{NO_RATE_LIMITS}[auth]\ntokens = [\"alice:tok-a\"]\n"
        ),
        &[],
    );
    let mut streams = Vec::new();
    for _ in 0..3 {
        let r = mcp_post(gw.addr, "Authorization: Bearer tok-a\r\n", MCP_INIT);
        let sid = r.header("Mcp-Session-Id").unwrap();
        let mut s = connect_from(gw.addr, None);
        write!(
            s,
            "GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer tok-a\r\n\
             Accept: text/event-stream\r\nMcp-Session-Id: {sid}\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        streams.push(s);
    }
    // Three streams hold the address's three places.
    let r = gw.ws_from(None, &[]);
    assert_eq!(r.err().map(|r| r.status), Some(429));
    drop(streams);
    let end = Instant::now() + Duration::from_secs(10);
    while gw.ws_from(None, &[]).is_err() {
        assert!(Instant::now() < end, "the places were never given back");
        std::thread::sleep(Duration::from_millis(20));
    }
}
