//! A relay that never drops its own answer: every call, on every surface,
//! ends with a last answer its client can read (the result, or an error
//! that says why), whether the answer grew past `llm.max_response_bytes`,
//! its MCP session was deleted while it ran, or a fast provider streamed
//! faster than the client reads; and a client that hangs up on an MCP
//! request cancels the upstream call.

mod common;
use common::fake_openai::{counting_transcript, ok_stream, Behaviour, FakeOpenAi};
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Duration;

const AUTH: &str = "Authorization: Bearer tok-ada\r\n";

fn gateway(fake: &FakeOpenAi, extra: &str) -> Gateway {
    Gateway::start(
        &format!(
            "{extra}\n[auth]\ntokens = [\"ada:tok-ada\"]\n[provider.p]\nbase_url = \"{}\"\nmodel = \"m\"\n",
            fake.base_url()
        ),
        &[],
    )
}

/// A raw HTTP request with a body.
fn request(path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{AUTH}{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// An MCP session's id, from a fresh `initialize`.
fn mcp_session(gw: &Gateway) -> String {
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let r = http_request(
        gw.addr,
        &request(
            "/mcp",
            "Accept: application/json, text/event-stream\r\n",
            init,
        ),
    );
    r.header("mcp-session-id").expect("a session id")
}

/// A `tools/call` of `chat` on session `sid`; `accept` decides JSON or
/// SSE, `token` asks for progress.
fn mcp_call(sid: &str, accept: &str, token: bool) -> String {
    let meta = if token {
        r#","_meta":{"progressToken":"t1"}"#
    } else {
        ""
    };
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"chat","arguments":{{"messages":[{{"role":"user","content":"hi"}}]}}{meta}}}}}"#
    );
    request(
        "/mcp",
        &format!("Accept: {accept}\r\nMcp-Session-Id: {sid}\r\n"),
        &body,
    )
}

/// The JSON-RPC messages of an SSE answer, in order.
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

#[test]
fn an_answer_past_its_bound_ends_with_an_error_on_every_surface() {
    let fake = FakeOpenAi::start(ok_stream(counting_transcript(2000)));
    let gw = gateway(&fake, "[llm]\nmax_response_bytes = 1024\n");
    let bounded = |text: &str| text.contains("llm.max_response_bytes");
    // The op protocol.
    let (mut ws, _) = gw.session(Some("tok-ada"));
    send_json(
        &mut ws,
        &json!({"op":"call_tool","request_id":"r1","name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}],"stream":false}}),
    );
    assert_eq!(recv_json(&mut ws)["op"], "call_tool_ack");
    let frame = recv_json(&mut ws);
    assert_eq!(frame["op"], "error", "{frame}");
    assert!(
        bounded(frame["error"]["message"].as_str().unwrap()),
        "{frame}"
    );
    // MCP over HTTP: JSON, SSE without and with a progress token.
    let sid = mcp_session(&gw);
    let r = http_request(gw.addr, &mcp_call(&sid, "application/json", false));
    let v = r.json();
    assert_eq!(v["result"]["isError"], true, "{}", r.body);
    assert!(
        bounded(&v["result"]["content"][0]["text"].to_string()),
        "{v}"
    );
    for token in [false, true] {
        let r = http_request(gw.addr, &mcp_call(&sid, "text/event-stream", token));
        let all = events(&r.body);
        let last = all.last().unwrap_or_else(|| panic!("no event: {}", r.body));
        assert_eq!(last["id"], 7, "the result comes last: {}", r.body);
        assert_eq!(last["result"]["isError"], true, "{last}");
        if token {
            assert!(all.len() > 1, "progress came first");
        }
    }
    // The OpenAI-compatible endpoint, whole and streamed.
    let call = |stream: bool| {
        let body = json!({"model":"p","stream":stream,"messages":[{"role":"user","content":"hi"}]});
        http_request(
            gw.addr,
            &request("/v1/chat/completions", "", &body.to_string()),
        )
    };
    let r = call(false);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(bounded(&r.body), "{}", r.body);
    let r = call(true);
    assert_eq!(r.status, 200);
    let all = events(&r.body);
    assert!(
        bounded(&all.last().unwrap()["error"]["message"].to_string()),
        "{}",
        r.body
    );
}

#[test]
fn an_mcp_call_whose_session_is_deleted_still_gets_an_answer() {
    let fake = FakeOpenAi::start(Behaviour::Stream {
        transcript: counting_transcript(500),
        delay: Duration::from_millis(10),
        first_byte: Duration::ZERO,
    });
    let gw = gateway(&fake, "");
    for accept in ["application/json", "text/event-stream"] {
        let sid = mcp_session(&gw);
        let mut s = connect_from(gw.addr, None);
        s.write_all(mcp_call(&sid, accept, false).as_bytes())
            .unwrap();
        gw.wait_until("the call is in flight", || {
            gw.metric("hivegate_llm_calls_in_flight") == 1.0
        });
        let ended = http_request(
            gw.addr,
            &format!(
                "DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n{AUTH}Mcp-Session-Id: {sid}\r\n\r\n"
            ),
        );
        assert_eq!(ended.status, 200);
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let answer = parse_response(&text);
        let last = match accept {
            "application/json" => answer.json(),
            _ => events(&answer.body).pop().expect("an event"),
        };
        assert_eq!(
            (last["id"].as_i64(), last["error"]["code"].as_i64()),
            (Some(7), Some(-32800)),
            "{text}"
        );
        gw.wait_until("the slot is free", || {
            gw.metric("hivegate_llm_calls_in_flight") == 0.0
        });
    }
    an_mcp_client_that_hangs_up_cancels_its_call(&gw, &fake);
}

/// A client that hangs up on a JSON `tools/call` cancels it.
fn an_mcp_client_that_hangs_up_cancels_its_call(gw: &Gateway, fake: &FakeOpenAi) {
    let sid = mcp_session(gw);
    let before = fake.hung_up();
    let mut s = connect_from(gw.addr, None);
    s.write_all(mcp_call(&sid, "application/json", false).as_bytes())
        .unwrap();
    gw.wait_until("the call is in flight", || {
        gw.metric("hivegate_llm_calls_in_flight") == 1.0
    });
    drop(s);
    gw.wait_until("the provider sees the hang-up", || fake.hung_up() > before);
    gw.wait_until("the slot is free", || {
        gw.metric("hivegate_llm_calls_in_flight") == 0.0
    });
}

/// The whole answer of `counting_transcript(n)`.
fn counted(n: usize) -> String {
    (0..n).map(|i| format!("c{i} ")).collect()
}

#[test]
fn a_fast_provider_never_makes_the_gateways_own_client_a_slow_consumer() {
    let fake = FakeOpenAi::start(ok_stream(counting_transcript(2000)));
    let gw = gateway(&fake, "[server]\noutbox_frames = 16\n");
    // The op protocol: pieces join while the outbox is past half full.
    let (mut ws, _) = gw.session(Some("tok-ada"));
    send_json(
        &mut ws,
        &json!({"op":"call_tool","request_id":"r1","name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]}}),
    );
    let (mut streamed, mut frames) = (String::new(), 0);
    let result = loop {
        let f = recv_json(&mut ws);
        match f["op"].as_str() {
            Some("stream_chunk") => {
                streamed.push_str(f["chunk"].as_str().unwrap());
                frames += 1;
            }
            Some("call_tool_res") => break f,
            Some("call_tool_ack") | Some("progress") => {}
            _ => panic!("{f}"),
        }
    };
    assert_eq!(result["outputs"][0]["text"], counted(2000));
    assert!(
        counted(2000).starts_with(&streamed),
        "pieces in order, none lost in between"
    );
    assert!(frames < 2000, "pieces were joined: {frames} frames");
    // MCP over the WebSocket: progress gives way, the result comes.
    let mut ws = gw
        .ws_from(
            None,
            &[
                ("Authorization", "Bearer tok-ada"),
                ("Sec-WebSocket-Protocol", "mcp"),
            ],
        )
        .unwrap();
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    send_json(&mut ws, &serde_json::from_str(init).unwrap());
    assert_eq!(recv_json(&mut ws)["id"], 1);
    send_json(
        &mut ws,
        &json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]},"_meta":{"progressToken":"p"}}}),
    );
    let result = loop {
        let m = recv_json(&mut ws);
        if m["id"] == 2 {
            break m;
        }
    };
    assert_eq!(
        result["result"]["structuredContent"]["text"],
        counted(2000),
        "{result}"
    );
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"4008\"}"),
        0.0
    );
}
