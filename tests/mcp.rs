//! MCP over Streamable HTTP, driven by the official MCP Python SDK
//! (`tests/mcp/client.py`, installed by `.ci/mcp-setup` into
//! target/mcp-venv): initialize, tools/list, a streamed `chat` call with
//! progress, cancellation reaching the provider, rate limits and an open
//! breaker as tool errors, and the transport's refusals; and the official
//! TypeScript SDK's WebSocket transport signing in with a `bearer.TOKEN`
//! subprotocol (`tests/mcp/ws_client.mjs`, installed by the same script).

mod common;
use common::fake_openai::{ok_stream, transcript, Behaviour, FakeOpenAi};
use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The SDK's Python. The tests that use it are marked ignored when it was
/// missing at build time (build.rs).
fn python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/mcp-venv/bin/python");
    assert!(py.exists(), "target/mcp-venv is missing: run .ci/mcp-setup");
    py
}

/// Runs one scenario of client.py against the gateway over Streamable
/// HTTP; its JSON report.
fn sdk(py: &PathBuf, gw: &Gateway, token: &str, scenario: &str) -> Value {
    sdk_at(py, gw, &format!("http://{}/mcp", gw.addr), token, scenario)
}

fn sdk_at(py: &PathBuf, gw: &Gateway, url: &str, token: &str, scenario: &str) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/client.py");
    client_report(
        Command::new(py).arg(script).args([url, token, scenario]),
        gw,
    )
}

/// Runs an MCP client script to its end; the JSON report it prints. Fails
/// the test with what the client and the gateway said unless it succeeded.
fn client_report(cmd: &mut Command, gw: &Gateway) -> Value {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{stdout}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    serde_json::from_str(stdout.trim()).expect("the client prints JSON")
}

/// The streamed pieces the client heard as progress notifications, joined.
fn progress_text(r: &Value) -> String {
    r["progress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn gateway(fake: &FakeOpenAi, extra: &str) -> Gateway {
    Gateway::start(
        &format!(
            "{extra}\n[provider.p]\nbase_url = \"{}\"\nmodel = \"m\"\nfail_max = 2\nreset_timeout_ms = 60000\n",
            fake.base_url()
        ),
        &[],
    )
}

#[test]
#[cfg_attr(
    missing_mcp_python,
    ignore = "the MCP Python SDK is missing: run .ci/mcp-setup"
)]
fn the_sdk_initializes_lists_and_calls_chat_with_progress() {
    let py = python();
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&fake, "[auth]\ntokens = [\"ada:tok-ada\"]\n");
    let r = sdk(&py, &gw, "tok-ada", "call");
    assert_eq!(r["server"], "hivegate");
    assert_eq!(r["session"], true);
    assert_eq!(r["tools"], serde_json::json!(["chat"]));
    assert_eq!(r["schema_required"], serde_json::json!(["messages"]));
    let call = &r["call"];
    assert_eq!(call["isError"], false, "{r}");
    let text = call["text"].as_str().unwrap();
    assert!(!text.is_empty());
    // The streamed pieces came as progress notifications, in order, and
    // join to the answer.
    assert_eq!(progress_text(&r), text, "{r}");
    assert_eq!(call["structured"]["provider"], "p");
    // Without a progress token: the same answer, as JSON.
    assert_eq!(r["plain"]["text"], text);
    // Invalid arguments are a tool error; an unknown tool is -32602.
    assert_eq!(r["empty"]["isError"], true);
    assert_eq!(r["empty"]["structured"]["code"], "INVALID_REQUEST");
    assert_eq!(r["unknown_tool"], -32602);
    assert!(gw.metric("hivegate_mcp_requests_total{transport=\"http\"}") >= 6.0);
}

#[test]
#[cfg_attr(
    missing_mcp_python,
    ignore = "the MCP Python SDK is missing: run .ci/mcp-setup"
)]
fn cancelling_a_call_abandons_the_upstream_stream() {
    let py = python();
    let fake = FakeOpenAi::start(Behaviour::Stream {
        transcript: common::fake_openai::counting_transcript(200),
        delay: Duration::from_millis(50),
        first_byte: Duration::ZERO,
    });
    let gw = gateway(&fake, "");
    let r = sdk(&py, &gw, "-", "cancel");
    assert_eq!(r["cancelled"], true);
    let end = Instant::now() + Duration::from_secs(10);
    while fake.hung_up() == 0 {
        assert!(Instant::now() < end, "the provider still streams");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(
    missing_mcp_python,
    ignore = "the MCP Python SDK is missing: run .ci/mcp-setup"
)]
fn a_rate_limited_call_is_a_tool_error_with_its_retry_time() {
    let py = python();
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    // initialize, initialized, tools/list, ping and two calls fit; the
    // seventh message is refused.
    let gw = gateway(
        &fake,
        "[limits]\nuser_capacity = 6\nuser_refill_per_s = 0.01\n",
    );
    let r = sdk(&py, &gw, "-", "limited");
    let calls = r["calls"].as_array().unwrap();
    let last = calls.last().unwrap();
    assert_eq!(last["isError"], true, "{r}");
    assert_eq!(last["structured"]["code"], "RATE_LIMITED");
    assert!(last["structured"]["retry_after_ms"].as_u64().unwrap() > 0);
    assert_eq!(calls[0]["isError"], false, "{r}");
}

#[test]
#[cfg_attr(
    missing_mcp_python,
    ignore = "the MCP Python SDK is missing: run .ci/mcp-setup"
)]
fn an_open_breaker_fails_fast_as_a_tool_error() {
    let py = python();
    let fake = FakeOpenAi::start(Behaviour::Status {
        status: 500,
        retry_after: None,
        body: "{\"error\":{\"message\":\"down\"}}".into(),
    });
    let gw = gateway(&fake, "[llm]\nmax_retries = 0\n");
    let r = sdk(&py, &gw, "-", "breaker");
    let calls = r["calls"].as_array().unwrap();
    for c in calls {
        assert_eq!(c["isError"], true, "{r}");
        assert_eq!(c["structured"]["code"], "PROVIDER_UNAVAILABLE");
    }
    // Two failures open the breaker; later calls do not reach the provider.
    assert_eq!(fake.requests().len(), 2, "{r}");
    let last = calls.last().unwrap();
    assert!(
        last["text"].as_str().unwrap().contains("circuit open"),
        "{r}"
    );
    assert!(last["structured"]["retry_after_ms"].as_u64().unwrap() > 1000);
}

#[test]
fn the_transport_refuses_what_it_should() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(
        &fake,
        "[auth]\ntokens = [\"ada:tok-ada\"]\n[server]\nallowed_origins = [\"https://ok.example\"]\n",
    );
    let post = |headers: &str, body: &str| {
        http_request(
            gw.addr,
            &format!(
                "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n{headers}Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    // No token, a bad one, a foreign origin.
    assert_eq!(post("", init).status, 401);
    assert_eq!(post("Authorization: Bearer nope\r\n", init).status, 401);
    let auth = "Authorization: Bearer tok-ada\r\n";
    assert_eq!(
        post(&format!("{auth}Origin: https://evil.example\r\n"), init).status,
        403
    );
    // A good initialize names the session and negotiates the version.
    let ok = post(auth, init);
    assert_eq!(ok.status, 200, "{}", ok.body);
    let sid = ok.header("mcp-session-id").expect("a session id");
    let v: Value = serde_json::from_str(&ok.body).unwrap();
    assert_eq!(v["result"]["protocolVersion"], "2025-06-18");
    // Without the session, with an unknown one, with another user's token.
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    assert_eq!(post(auth, list).status, 400);
    assert_eq!(
        post(&format!("{auth}Mcp-Session-Id: 00\r\n"), list).status,
        404
    );
    let with = format!("{auth}Mcp-Session-Id: {sid}\r\n");
    assert_eq!(post(&with, list).status, 200);
    // JSON-RPC errors: parse, invalid request, unknown method.
    let code = |r: common::HttpResponse| -> i64 {
        serde_json::from_str::<Value>(&r.body).unwrap()["error"]["code"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(code(post(&with, "{nope")), -32700);
    assert_eq!(code(post(&with, r#"{"jsonrpc":"2.0","id":3}"#)), -32600);
    assert_eq!(
        code(post(
            &with,
            r#"{"jsonrpc":"2.0","id":4,"method":"resources/list"}"#
        )),
        -32601
    );
    // A body over the message bound is refused.
    let big = "x".repeat(70_000);
    assert_eq!(post(&with, &big).status, 413);
    // GET: the session's stream, which only an event-stream client gets,
    // once per session; DELETE ends the session and with it the stream.
    let get = |headers: &str| {
        http_request(
            gw.addr,
            &format!("GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{headers}\r\n"),
        )
        .status
    };
    assert_eq!(get(&format!("Mcp-Session-Id: {sid}\r\n")), 406);
    assert_eq!(get("Accept: text/event-stream\r\n"), 400);
    let mut events = std::net::TcpStream::connect(gw.addr).unwrap();
    events
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    use std::io::{Read, Write};
    write!(
        events,
        "GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Accept: text/event-stream\r\nMcp-Session-Id: {sid}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 15];
    events.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK");
    let end = Instant::now() + Duration::from_secs(5);
    while get(&format!(
        "Accept: text/event-stream\r\nMcp-Session-Id: {sid}\r\n"
    )) != 409
    {
        assert!(Instant::now() < end, "a second stream was not refused");
    }
    let delete = |sid: &str| {
        http_request(
            gw.addr,
            &format!(
                "DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Mcp-Session-Id: {sid}\r\n\r\n"
            ),
        )
        .status
    };
    assert_eq!(delete(&sid), 200);
    let mut rest = Vec::new();
    let _ = events.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("data:"));
    assert_eq!(delete(&sid), 404);
    assert_eq!(post(&with, list).status, 404);
}

#[test]
#[cfg_attr(
    missing_mcp_python,
    ignore = "the MCP Python SDK is missing: run .ci/mcp-setup"
)]
fn the_sdk_speaks_mcp_over_the_websocket_subprotocol() {
    let py = python();
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&fake, "");
    let ws = format!("ws://{}/ws", gw.addr);
    let r = sdk_at(&py, &gw, &ws, "-", "call");
    assert_eq!(r["server"], "hivegate");
    assert_eq!(r["tools"], serde_json::json!(["chat"]));
    let text = r["call"]["text"].as_str().unwrap();
    assert_eq!(r["call"]["isError"], false, "{r}");
    assert_eq!(progress_text(&r), text, "{r}");
    assert_eq!(r["empty"]["structured"]["code"], "INVALID_REQUEST");
    assert_eq!(r["unknown_tool"], -32602);
    // Cancelling over the WebSocket reaches the provider too.
    let slow = FakeOpenAi::start(Behaviour::Stream {
        transcript: common::fake_openai::counting_transcript(200),
        delay: Duration::from_millis(50),
        first_byte: Duration::ZERO,
    });
    let gw2 = gateway(&slow, "");
    let r = sdk_at(&py, &gw2, &format!("ws://{}/ws", gw2.addr), "-", "cancel");
    assert_eq!(r["cancelled"], true);
    let end = Instant::now() + Duration::from_secs(10);
    while slow.hung_up() == 0 {
        assert!(Instant::now() < end, "the provider still streams");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gw.metric("hivegate_mcp_requests_total{transport=\"ws\"}") >= 5.0);

    // A rate limit and an open breaker are tool errors here too.
    let gw3 = gateway(
        &fake,
        "[limits]\nuser_capacity = 5\nuser_refill_per_s = 0.01\n",
    );
    let r = sdk_at(&py, &gw3, &format!("ws://{}/ws", gw3.addr), "-", "limited");
    let last = r["calls"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["structured"]["code"], "RATE_LIMITED", "{r}");
    assert!(last["structured"]["retry_after_ms"].as_u64().unwrap() > 0);
    let down = FakeOpenAi::start(Behaviour::Status {
        status: 500,
        retry_after: None,
        body: "{}".into(),
    });
    let gw4 = gateway(&down, "[llm]\nmax_retries = 0\n");
    let r = sdk_at(&py, &gw4, &format!("ws://{}/ws", gw4.addr), "-", "breaker");
    let calls = r["calls"].as_array().unwrap();
    assert_eq!(down.requests().len(), 2, "{r}");
    let last = calls.last().unwrap();
    assert_eq!(last["structured"]["code"], "PROVIDER_UNAVAILABLE", "{r}");
    assert!(
        last["text"].as_str().unwrap().contains("circuit open"),
        "{r}"
    );
}

#[test]
fn the_mcp_subprotocol_needs_a_token_at_the_upgrade_in_token_mode() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&fake, "[auth]\ntokens = [\"ada:tok-ada\"]\n");
    let upgrade = |auth: &str| {
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mcp\r\n{auth}\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
            head.push(b[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    };
    assert!(upgrade("").starts_with("HTTP/1.1 401"));
    let ok = upgrade("Authorization: Bearer tok-ada\r\n");
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    assert!(ok.contains("Sec-WebSocket-Protocol: mcp\r\n"), "{ok}");
}

#[test]
#[cfg_attr(
    missing_mcp_typescript,
    ignore = "the MCP TypeScript SDK is missing: run .ci/mcp-setup"
)]
fn the_typescript_sdk_connects_over_the_websocket_with_a_token() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp");
    // Marked ignored when it was missing at build time (build.rs).
    assert!(
        dir.join("node_modules/@modelcontextprotocol/sdk").exists(),
        "tests/mcp/node_modules is missing: run .ci/mcp-setup"
    );
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&fake, "[auth]\ntokens = [\"ada:tok-ada\"]\n");
    let url = format!("ws://{}/ws", gw.addr);
    let client = |token: &str| {
        let mut cmd = Command::new("node");
        cmd.arg("--experimental-websocket")
            .arg(dir.join("ws_client.mjs"))
            .args([url.as_str(), token]);
        cmd
    };
    let r = client_report(&mut client("tok-ada"), &gw);
    assert_eq!(r["tools"], serde_json::json!(["chat"]));
    assert_eq!(r["isError"], false);
    assert!(
        r["text"].as_str().unwrap_or("").starts_with("Hello, wörld"),
        "{r}"
    );
    // A wrong token is refused at the upgrade.
    let refused = client("tok-wrong").output().expect("run node");
    assert!(!refused.status.success());
}
