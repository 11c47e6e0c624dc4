//! The OpenAI-compatible endpoint (`/v1/chat/completions`, `/v1/models`),
//! driven by the official `openai` Python SDK (`tests/openai/client.py`,
//! installed by `.ci/mcp-setup` into target/mcp-venv beside the MCP SDK):
//! create, stream with usage, models, function calls both ways, errors
//! with their status (401, 429 with Retry-After, 400), and a client that
//! closes its stream cancelling the upstream call. Then, without the SDK,
//! the shapes a hand-written client meets: the error JSON on every
//! refusal, the access rules, a hang-up on a whole answer.

mod common;
use common::fake_openai::{counting_transcript, ok_stream, transcript, Behaviour, FakeOpenAi};
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/mcp-venv/bin/python");
    assert!(py.exists(), "target/mcp-venv is missing: run .ci/mcp-setup");
    py
}

/// Runs one scenario of client.py; its JSON report.
fn sdk(gw: &Gateway, key: &str, scenario: &str) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai/client.py");
    let out = Command::new(python())
        .arg(script)
        .args([&format!("http://{}/v1", gw.addr), key, scenario])
        .output()
        .expect("run the openai client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client.py {scenario} failed:\n{}\n{stdout}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    serde_json::from_str(stdout.trim()).expect("the client prints JSON")
}

const TOKENS: &str = "[auth]\ntokens = [\"ada:tok-ada\"]\n";

fn gateway(fake: &FakeOpenAi, extra: &str) -> Gateway {
    Gateway::start(
        &format!(
            "{extra}\n[provider.p]\nbase_url = \"{}\"\nmodel = \"m\"\n",
            fake.base_url()
        ),
        &[],
    )
}

/// A POST to the endpoint, answered whole (on a connection of its own:
/// the response is read to the end of the connection).
fn post(gw: &Gateway, token: Option<&str>, path: &str, body: &str) -> HttpResponse {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    http_request(
        gw.addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// An error answer's status and `error.code`, checking OpenAI's shape.
fn api_error(r: &HttpResponse) -> (u16, String) {
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json"),
        "{}",
        r.body
    );
    let e = &r.json()["error"];
    assert!(
        e["message"].is_string() && e["type"].is_string() && e["param"].is_null(),
        "{}",
        r.body
    );
    (r.status, e["code"].as_str().unwrap_or_default().to_string())
}

#[test]
#[cfg_attr(
    missing_mcp_python,
    ignore = "the Python SDKs are missing: run .ci/mcp-setup"
)]
fn the_sdk_creates_streams_and_lists_models() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&fake, TOKENS);
    let hello = "Hello, wörld \"quoted\"\n";
    let r = sdk(&gw, "tok-ada", "create");
    assert_eq!(r["text"], hello, "{r}");
    assert_eq!(r["finish_reason"], "stop");
    assert_eq!(r["model"], "p/moonshot-v1-8k");
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens":3,"completion_tokens":5,"total_tokens":8,
               "completion_tokens_details":null,"prompt_tokens_details":null})
    );
    let r = sdk(&gw, "tok-ada", "stream");
    assert_eq!(r["text"], hello, "{r}");
    assert_eq!(r["usage"]["total_tokens"], 8, "{r}");
    assert_eq!(r["finish_reason"], "stop");
    assert_eq!(r["models"], json!(["p", "p/moonshot-v1-8k"]));
    let r = sdk(&gw, "tok-ada", "models");
    assert_eq!(r["ids"], json!(["auto", "p", "p/m"]));
    // The provider was asked with its configured model, streamed.
    let asked: Value = serde_json::from_str(&fake.requests()[0].body).unwrap();
    assert_eq!(
        (asked["model"].as_str(), asked["stream"].as_bool()),
        (Some("m"), Some(true))
    );
    assert_eq!(gw.metric("hivegate_openai_requests_total"), 3.0);
    assert_eq!(
        gw.metric("hivegate_llm_tokens_total{provider=\"p\",direction=\"prompt\"}"),
        6.0
    );
}

#[test]
#[cfg_attr(
    missing_mcp_python,
    ignore = "the Python SDKs are missing: run .ci/mcp-setup"
)]
fn function_calls_pass_through_both_ways() {
    let fake = FakeOpenAi::start(ok_stream(transcript("tool_calls.txt")));
    let gw = gateway(&fake, TOKENS);
    let r = sdk(&gw, "tok-ada", "tools");
    assert_eq!(r["finish_reason"], "tool_calls", "{r}");
    let call = json!({"id":"call_w1","name":"weather","arguments":"{\"city\":\"Oslo\"}"});
    assert_eq!(r["calls"], json!([call]));
    assert_eq!(r["streamed"], json!([call]));
    let asked: Value = serde_json::from_str(&fake.requests()[0].body).unwrap();
    assert_eq!(asked["tools"][0]["function"]["name"], "weather");
    assert_eq!(asked["tool_choice"], "auto");
    // The answer to the call goes back with the call it answers.
    let body = json!({"model":"p","messages":[
        {"role":"user","content":"weather?"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"call_w1","type":"function","function":{"name":"weather","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"call_w1","content":"sunny"}]});
    fake.set(ok_stream(transcript("hello.txt")));
    let r = post(
        &gw,
        Some("tok-ada"),
        "/v1/chat/completions",
        &body.to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let asked: Value = serde_json::from_str(&fake.requests().last().unwrap().body).unwrap();
    assert_eq!(asked["messages"][1]["tool_calls"][0]["id"], "call_w1");
    assert_eq!(asked["messages"][2]["tool_call_id"], "call_w1");
}

#[test]
#[cfg_attr(
    missing_mcp_python,
    ignore = "the Python SDKs are missing: run .ci/mcp-setup"
)]
fn the_sdk_hears_refusals_with_their_status() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(
        &fake,
        &format!("{TOKENS}[limits]\nuser_capacity = 1\nuser_refill_per_s = 0.01\n"),
    );
    let r = sdk(&gw, "wrong", "bad_key");
    assert_eq!(
        (r["error"].as_str(), r["status"].as_u64()),
        (Some("AuthenticationError"), Some(401)),
        "{r}"
    );
    let r = sdk(&gw, "tok-ada", "limited");
    assert_eq!(
        (r["error"].as_str(), r["status"].as_u64()),
        (Some("RateLimitError"), Some(429)),
        "{r}"
    );
    assert_eq!(r["code"], "rate_limited");
    let wait: u64 = r["retry_after"].as_str().unwrap().parse().unwrap();
    assert!((1..=100).contains(&wait), "{r}");
    let gw = gateway(&fake, TOKENS);
    let r = sdk(&gw, "tok-ada", "n2");
    assert_eq!(
        (r["error"].as_str(), r["status"].as_u64()),
        (Some("BadRequestError"), Some(400)),
        "{r}"
    );
    assert!(
        r["message"].as_str().unwrap().contains("n must be 1"),
        "{r}"
    );
}

#[test]
#[cfg_attr(
    missing_mcp_python,
    ignore = "the Python SDKs are missing: run .ci/mcp-setup"
)]
fn closing_the_stream_cancels_the_upstream_call() {
    let fake = FakeOpenAi::start(Behaviour::Stream {
        transcript: counting_transcript(2000),
        delay: Duration::from_millis(10),
        first_byte: Duration::ZERO,
    });
    let gw = gateway(&fake, TOKENS);
    let r = sdk(&gw, "tok-ada", "cancel");
    assert_eq!(r["first"], "c0 ", "{r}");
    gw.wait_until("the provider sees the hang-up", || fake.hung_up() == 1);
    gw.wait_until("the slot is free", || {
        gw.metric("hivegate_llm_calls_in_flight") == 0.0
    });
}

#[test]
fn refusals_are_openai_errors_with_the_right_status() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&fake, TOKENS);
    let call = r#"{"model":"auto","messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(&gw, None, "/v1/chat/completions", call);
    assert_eq!(api_error(&r), (401, "unauthorized".into()));
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
    let r = post(&gw, Some("tok-ada"), "/v1/chat/completions", "{\"model\":");
    assert_eq!(api_error(&r), (400, "invalid_request".into()));
    let r = post(
        &gw,
        Some("tok-ada"),
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[]}"#,
    );
    assert_eq!(api_error(&r), (404, "model_not_found".into()));
    let r = post(&gw, Some("tok-ada"), "/v1/embeddings", "{}");
    assert_eq!(api_error(&r).0, 404);
    let r = http_request(
        gw.addr,
        "GET /v1/chat/completions HTTP/1.1\r\nConnection: close\r\nAuthorization: Bearer tok-ada\r\n\r\n",
    );
    assert_eq!(api_error(&r).0, 405);
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
    // An upstream that refuses the request: its words, its 400, no retry.
    fake.push(Behaviour::Status {
        status: 400,
        retry_after: None,
        body: r#"{"error":{"message":"context too long"}}"#.into(),
    });
    let r = post(&gw, Some("tok-ada"), "/v1/chat/completions", call);
    assert_eq!(api_error(&r), (400, "upstream_rejected".into()));
    assert!(r.body.contains("context too long"), "{}", r.body);
    assert!(r.header("retry-after").is_none());
    // Nothing could answer for now: 503 with the time to wait, also for
    // a stream that had not started.
    fake.set(Behaviour::Status {
        status: 503,
        retry_after: Some(7),
        body: "busy".into(),
    });
    let streamed = r#"{"model":"p","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(&gw, Some("tok-ada"), "/v1/chat/completions", streamed);
    assert_eq!(
        api_error(&r),
        (503, "provider_unavailable".into()),
        "{}",
        r.body
    );
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=7).contains(&wait), "{wait}");
}

#[test]
fn the_access_rules_decide_which_models_a_caller_sees_and_uses() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let mut cfg = String::from("[auth]\ntokens = [\"ada:tok-ada:staff\", \"olga:tok-olga:ops\"]\n");
    for name in ["cheap", "expensive"] {
        cfg.push_str(&format!(
            "[provider.{name}]\nbase_url = \"{}\"\nmodel = \"m\"\n",
            fake.base_url()
        ));
    }
    cfg.push_str("[llm]\nchain = [\"expensive\", \"cheap\"]\n");
    cfg.push_str("[[access]]\nroles = [\"ops\"]\nproviders = [\"*\"]\n\n[[access]]\nroles = [\"staff\"]\nproviders = [\"cheap\"]\n");
    let gw = Gateway::start(&cfg, &[]);
    let models = |token: &str| {
        let r = http_request(
            gw.addr,
            &format!("GET /v1/models HTTP/1.1\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"),
        );
        let ids: Vec<String> = r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        ids
    };
    assert_eq!(models("tok-ada"), ["auto", "cheap", "cheap/m"]);
    assert_eq!(models("tok-olga").len(), 5);
    let call = |token: &str, model: &str| {
        let body = json!({"model":model,"messages":[{"role":"user","content":"hi"}]});
        post(&gw, Some(token), "/v1/chat/completions", &body.to_string())
    };
    assert_eq!(
        api_error(&call("tok-ada", "expensive")),
        (403, "forbidden".into())
    );
    let r = call("tok-ada", "auto");
    assert_eq!(r.json()["model"], "cheap/moonshot-v1-8k", "{}", r.body);
    assert_eq!(call("tok-olga", "expensive").status, 200);
}

#[test]
fn a_client_that_hangs_up_on_a_whole_answer_cancels_the_call() {
    let fake = FakeOpenAi::start(Behaviour::Stream {
        transcript: counting_transcript(2000),
        delay: Duration::from_millis(10),
        first_byte: Duration::ZERO,
    });
    let gw = gateway(&fake, TOKENS);
    let body = r#"{"model":"p","messages":[{"role":"user","content":"hi"}]}"#;
    let mut s = connect_from(gw.addr, None);
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer tok-ada\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    gw.wait_until("the call is in flight", || {
        gw.metric("hivegate_llm_calls_in_flight") == 1.0
    });
    drop(s);
    gw.wait_until("the provider sees the hang-up", || fake.hung_up() == 1);
    gw.wait_until("the slot is free", || {
        gw.metric("hivegate_llm_calls_in_flight") == 0.0
    });
    // A streamed answer is read to its end by a client that stays.
    fake.set(ok_stream(transcript("hello.txt")));
    let mut s = connect_from(gw.addr, None);
    let body = r#"{"model":"p","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\nAuthorization: Bearer tok-ada\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains("\"usage\":{\"prompt_tokens\":3"), "{text}");
}

#[test]
fn a_long_conversation_reaches_the_provider_whole() {
    // Larger than a call's 16 KiB write buffer, within llm.max_prompt_bytes.
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&fake, TOKENS);
    let long = "é".repeat(14_000);
    let body = json!({"model":"p","messages":[{"role":"user","content":long}]});
    let r = post(
        &gw,
        Some("tok-ada"),
        "/v1/chat/completions",
        &body.to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let asked: Value = serde_json::from_str(&fake.requests()[0].body).unwrap();
    assert_eq!(asked["messages"][0]["content"], long.as_str());
}

#[test]
fn usage_is_recorded_per_user_provider_and_day_and_reported() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(
        &fake,
        "[auth]\ntokens = [\"ada:tok-ada\", \"bob:tok-bob\"]\n",
    );
    let call = r#"{"model":"p","messages":[{"role":"user","content":"twelve bytes"}]}"#;
    for token in ["tok-ada", "tok-ada", "tok-bob"] {
        assert_eq!(
            post(&gw, Some(token), "/v1/chat/completions", call).status,
            200
        );
    }
    // A provider that reports no usage: about a token per 4 bytes.
    fake.set(ok_stream(counting_transcript(4)));
    let r = post(&gw, Some("tok-ada"), "/v1/chat/completions", call);
    assert_eq!(
        r.json()["usage"]["total_tokens"],
        0,
        "the client hears what was reported"
    );
    let tokens = |direction: &str| {
        gw.metric(&format!(
            "hivegate_llm_tokens_total{{provider=\"p\",direction=\"{direction}\"}}"
        ))
    };
    // 3 + 5 reported per call; "twelve bytes" is 3, "c0 c1 c2 c3 " 3.
    assert_eq!((tokens("prompt"), tokens("completion")), (12.0, 18.0));
    assert_eq!(
        gw.metric("hivegate_llm_estimated_calls_total{provider=\"p\"}"),
        1.0
    );
    let usage = |args: &[&str]| {
        let config = gw.dir.path().join("hivegate.toml");
        let out = Command::new(env!("CARGO_BIN_EXE_hivegate"))
            .arg("usage")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (
            out.status.code(),
            text,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    gw.wait_until("the writes are in the database", || {
        usage(&[])
            .1
            .lines()
            .last()
            .is_some_and(|l| l.split_whitespace().nth(3) == Some("4"))
    });
    let (code, table, _) = usage(&["--user", "ada"]);
    assert_eq!(code, Some(0));
    let today = table
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "day",
            "user",
            "provider",
            "prompt",
            "completion",
            "calls",
            "estimated"
        ]
    );
    assert_eq!(
        rows[1],
        [today.as_str(), "ada", "p", "9", "13", "3", "1"],
        "{table}"
    );
    assert_eq!(rows[2], ["total", "9", "13", "3", "1"], "{table}");
    let (_, table, _) = usage(&["--since", &today]);
    assert!(
        table.contains(" bob ") && table.lines().count() == 4,
        "{table}"
    );
    let (_, table, _) = usage(&["--since", "2999-01-01"]);
    assert_eq!(table.lines().count(), 2, "{table}");
    let (code, _, err) = usage(&["--since", "yesterday"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("YYYY-MM-DD"), "{err}");
}

#[test]
fn a_connection_carries_request_after_request_as_an_sdks_pool_expects() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&fake, TOKENS);
    let mut s = connect_from(gw.addr, None);
    let call = r#"{"model":"p","messages":[{"role":"user","content":"hi"}]}"#;
    let read_one = |s: &mut std::net::TcpStream| {
        let head = read_head(s);
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        (head, String::from_utf8(body).unwrap())
    };
    for _ in 0..3 {
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer tok-ada\r\nContent-Length: {}\r\n\r\n{call}",
            call.len()
        )
        .unwrap();
        let (head, body) = read_one(&mut s);
        assert!(head.contains("Connection: keep-alive"), "{head}");
        assert!(body.contains("Hello"), "{body}");
    }
    write!(
        s,
        "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer tok-ada\r\n\r\n"
    )
    .unwrap();
    assert!(read_one(&mut s).1.contains("\"auto\""));
    // A stream goes in HTTP chunks, and the connection carries on.
    let streamed = r#"{"model":"p","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer tok-ada\r\nContent-Length: {}\r\n\r\n{streamed}",
        streamed.len()
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
    let mut events = String::new();
    loop {
        let size_line = read_line(&mut s);
        let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
        let mut chunk = vec![0u8; size + 2];
        s.read_exact(&mut chunk).unwrap();
        if size == 0 {
            break;
        }
        events.push_str(std::str::from_utf8(&chunk[..size]).unwrap());
    }
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    assert!(events.contains("Hel"), "{events}");
    // Anything but the API on it, or a client that asks to close, ends it.
    write!(s, "GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let r = post(&gw, Some("tok-ada"), "/v1/models", "");
    assert_eq!(
        (r.status, r.header("connection").as_deref()),
        (405, Some("close"))
    );
    assert_eq!(gw.metric("hivegate_openai_requests_total"), 5.0);
}

/// One line, its CRLF included.
fn read_line(s: &mut std::net::TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "the connection ended");
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}
