//! The LLM tool relay over real sockets, against a fake OpenAI-compatible
//! server: streaming, the breaker, retries and fallback, cancel, shared
//! calls, progress, timeouts, and an API key that never leaks.

mod common;
use common::fake_openai::{counting_transcript, ok_stream, transcript, Behaviour, FakeOpenAi};
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const KEY: &str = "sk-test-key-7f3a9c";

/// A gateway with the given providers (name, fake) and extra TOML; keys
/// the extra gives under `[provider.NAME]` join that provider's section
/// (TOML allows a section once).
fn gateway(providers: &[(&str, &FakeOpenAi)], extra: &str) -> Gateway {
    let mut extra = extra.to_string();
    let mut sections = String::new();
    for (name, fake) in providers {
        let header = format!("[provider.{name}]\n");
        let mut own = String::new();
        if let Some(at) = extra.find(&header) {
            let body = at + header.len();
            let end = extra[body..]
                .find("\n[")
                .map_or(extra.len(), |e| body + e + 1);
            own = extra[body..end].to_string();
            extra.replace_range(at..end, "");
        }
        sections.push_str(&format!(
            "{header}base_url = \"{}\"\nmodel = \"fake-model\"\napi_key_env = \"FAKE_KEY\"\n{own}",
            fake.base_url()
        ));
    }
    let cfg = format!("{NO_RATE_LIMITS}{extra}\n{sections}");
    Gateway::start(&cfg, &[("FAKE_KEY", KEY)])
}

fn call(ws: &mut Ws, rid: &str, extra: Value) {
    let mut args = json!({"messages":[{"role":"user","content":"hi"}],"provider":"auto","model":null,"stream":true});
    if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            a.insert(k.clone(), v.clone());
        }
    }
    send_json(
        ws,
        &json!({"op":"call_tool","request_id":rid,"name":"chat","arguments":args}),
    );
}

/// Every frame for `rid` until its last one (call_tool_res or error).
fn frames_until_end(ws: &mut Ws, rid: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let v = recv_json(ws);
        if v["request_id"] != rid {
            continue;
        }
        let end = v["op"] == "call_tool_res" || v["op"] == "error";
        out.push(v);
        if end {
            return out;
        }
    }
}

fn last(frames: &[Value]) -> &Value {
    frames.last().unwrap()
}

#[test]
fn streamed_chunks_arrive_in_order_and_join_to_the_final_text() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&[("kimi", &fake)], "");
    let (mut ws, _) = gw.session(None);
    call(&mut ws, "t1", json!({}));
    let frames = frames_until_end(&mut ws, "t1");
    assert_eq!(frames[0], json!({"op":"call_tool_ack","request_id":"t1"}));
    let chunks: Vec<&str> = frames
        .iter()
        .filter(|f| f["op"] == "stream_chunk")
        .map(|f| f["chunk"].as_str().unwrap())
        .collect();
    assert_eq!(chunks, ["Hel", "lo, ", "wörld \"quoted\"\n"]);
    let res = last(&frames);
    assert_eq!(res["op"], "call_tool_res");
    assert_eq!(
        res["outputs"],
        json!([{"type":"text","text":"Hello, wörld \"quoted\"\n"}])
    );
    assert_eq!(res["provider"], "kimi");
    assert_eq!(res["model"], "moonshot-v1-8k");
    assert_eq!(
        res["usage"],
        json!({"prompt_tokens":3,"completion_tokens":5})
    );
    // What went upstream.
    let req = &fake.requests()[0];
    assert!(
        req.head.starts_with("POST /v1/chat/completions "),
        "{}",
        req.head
    );
    assert!(req.head.contains(&format!("Bearer {KEY}")));
    let body: Value = serde_json::from_str(&req.body).unwrap();
    assert_eq!(
        body,
        json!({"model":"fake-model","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]})
    );
    // Without stream, only the result.
    call(&mut ws, "t2", json!({"stream": false}));
    let frames = frames_until_end(&mut ws, "t2");
    assert!(frames.iter().all(|f| f["op"] != "stream_chunk"));
    assert_eq!(
        last(&frames)["outputs"][0]["text"],
        "Hello, wörld \"quoted\"\n"
    );
    assert_eq!(
        gw.metric("hivegate_llm_tokens_total{provider=\"kimi\",direction=\"completion\"}"),
        10.0
    );
}

#[test]
fn a_provider_that_does_not_stream_is_relayed_too() {
    let fake = FakeOpenAi::start(Behaviour::Json(
        r#"{"model":"glm-4","choices":[{"index":0,"message":{"role":"assistant","content":"whole answer"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#.into(),
    ));
    let gw = gateway(&[("glm", &fake)], "");
    let (mut ws, _) = gw.session(None);
    call(&mut ws, "j", json!({}));
    let frames = frames_until_end(&mut ws, "j");
    assert_eq!(last(&frames)["outputs"][0]["text"], "whole answer");
    assert_eq!(last(&frames)["model"], "glm-4");
}

#[test]
fn the_breaker_opens_after_four_failures_and_a_trial_closes_it() {
    let fake = FakeOpenAi::start(Behaviour::Status {
        status: 500,
        retry_after: None,
        body: "{\"error\":{\"message\":\"boom\"}}".into(),
    });
    let gw = gateway(
        &[("kimi", &fake)],
        "[llm]\nmax_retries = 0\n[provider.kimi]\nfail_max = 4\nreset_timeout_ms = 700\n",
    );
    let (mut ws, _) = gw.session(None);
    for i in 0..4 {
        call(&mut ws, &format!("f{i}"), json!({}));
        let end = last(&frames_until_end(&mut ws, &format!("f{i}"))).clone();
        assert_eq!(end["error"]["code"], "PROVIDER_UNAVAILABLE", "{end}");
        assert!(
            end["error"]["message"]
                .as_str()
                .unwrap()
                .contains("HTTP 500: boom"),
            "{end}"
        );
    }
    assert_eq!(fake.requests().len(), 4);
    assert_eq!(
        gw.metric("hivegate_breaker_state{service=\"kimi\",state=\"open\"}"),
        1.0
    );
    // The fifth call fails fast, without a request reaching the fake.
    let started = Instant::now();
    call(&mut ws, "f5", json!({}));
    let end = last(&frames_until_end(&mut ws, "f5")).clone();
    assert_eq!(end["error"]["code"], "PROVIDER_UNAVAILABLE");
    let retry = end["error"]["retry_after_ms"].as_u64().unwrap();
    assert!(retry > 0 && retry <= 700, "{end}");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(fake.requests().len(), 4);
    let ready: Value = serde_json::from_str(&gw.get("/readyz").body).unwrap();
    assert_eq!(ready["breakers"]["kimi"], "open");
    // After reset_timeout one trial goes through and, succeeding, closes it.
    fake.set(ok_stream(transcript("hello.txt")));
    std::thread::sleep(Duration::from_millis(retry + 50));
    call(&mut ws, "trial", json!({}));
    assert_eq!(
        last(&frames_until_end(&mut ws, "trial"))["op"],
        "call_tool_res"
    );
    assert_eq!(fake.requests().len(), 5);
    assert_eq!(
        gw.metric("hivegate_breaker_state{service=\"kimi\",state=\"closed\"}"),
        1.0
    );
    assert_eq!(
        gw.metric(
            "hivegate_breaker_transitions_total{service=\"kimi\",from=\"closed\",to=\"open\"}"
        ),
        1.0
    );
    assert_eq!(
        gw.metric(
            "hivegate_breaker_transitions_total{service=\"kimi\",from=\"half_open\",to=\"closed\"}"
        ),
        1.0
    );
    let log = gw.log_text();
    assert!(
        log.contains("circuit breaker service=kimi from=closed to=open"),
        "{log}"
    );
}

#[test]
fn a_failing_first_provider_falls_back_to_the_second_after_its_retries() {
    let bad = FakeOpenAi::start(Behaviour::Status {
        status: 503,
        retry_after: None,
        body: String::new(),
    });
    let good = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(
        &[("kimi", &bad), ("glm", &good)],
        "[llm]\nmax_retries = 2\nbackoff_base_ms = 10\n",
    );
    let (mut ws, _) = gw.session(None);
    call(&mut ws, "fb", json!({}));
    let frames = frames_until_end(&mut ws, "fb");
    assert_eq!(last(&frames)["provider"], "glm");
    assert_eq!(bad.requests().len(), 3, "one call and two retries");
    assert_eq!(good.requests().len(), 1);
    // A named provider is used alone.
    call(&mut ws, "named", json!({"provider":"kimi"}));
    assert_eq!(
        last(&frames_until_end(&mut ws, "named"))["error"]["code"],
        "PROVIDER_UNAVAILABLE"
    );
}

#[test]
fn a_failure_after_streaming_began_is_not_retried() {
    let fake = FakeOpenAi::start(Behaviour::CloseAfter {
        transcript: transcript("hello.txt"),
        events: 4,
    });
    let gw = gateway(
        &[("kimi", &fake)],
        "[llm]\nmax_retries = 2\nbackoff_base_ms = 10\n",
    );
    let (mut ws, _) = gw.session(None);
    call(&mut ws, "mid", json!({}));
    let frames = frames_until_end(&mut ws, "mid");
    let chunks: Vec<&Value> = frames
        .iter()
        .filter(|f| f["op"] == "stream_chunk")
        .collect();
    assert_eq!(chunks.len(), 2);
    let end = last(&frames);
    assert_eq!(end["op"], "error");
    let msg = end["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("after 2 chunks (7 bytes) had been delivered"),
        "{msg}"
    );
    assert_eq!(fake.requests().len(), 1);
}

#[test]
fn a_429_is_retried_after_its_retry_after_without_opening_the_breaker() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    fake.push(Behaviour::Status {
        status: 429,
        retry_after: Some(1),
        body: String::new(),
    });
    let gw = gateway(&[("kimi", &fake)], "[provider.kimi]\nfail_max = 1\n");
    let (mut ws, _) = gw.session(None);
    let started = Instant::now();
    call(&mut ws, "q", json!({}));
    assert_eq!(last(&frames_until_end(&mut ws, "q"))["op"], "call_tool_res");
    assert!(started.elapsed() >= Duration::from_millis(1000));
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(
        gw.metric("hivegate_breaker_state{service=\"kimi\",state=\"closed\"}"),
        1.0
    );
}

/// A provider that streams 400 chunks, 20 ms apart: a call still running
/// when the test acts on it.
fn slow_stream() -> FakeOpenAi {
    FakeOpenAi::start(Behaviour::Stream {
        transcript: counting_transcript(400),
        delay: Duration::from_millis(20),
        first_byte: Duration::ZERO,
    })
}

/// Waits until the fake has seen the gateway hang up on a stream.
fn wait_for_hang_up(fake: &FakeOpenAi) {
    let end = Instant::now() + Duration::from_secs(5);
    while fake.hung_up() == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cancel_stops_the_relay_and_the_upstream_read() {
    let fake = slow_stream();
    let gw = gateway(&[("kimi", &fake)], "");
    let (mut ws, _) = gw.session(None);
    call(&mut ws, "c", json!({}));
    while recv_json(&mut ws)["op"] != "stream_chunk" {}
    send_json(&mut ws, &json!({"op":"cancel","request_id":"c"}));
    // Chunks already queued may still arrive before `cancelled`; nothing after.
    loop {
        let v = recv_json(&mut ws);
        if v["op"] == "cancelled" {
            assert_eq!(v["request_id"], "c");
            break;
        }
        assert_eq!(v["op"], "stream_chunk", "{v}");
    }
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    if let Ok(tungstenite::Message::Text(t)) = ws.read() {
        panic!("a frame after cancelled: {t}");
    }
    wait_for_hang_up(&fake);
    assert_eq!(
        fake.hung_up(),
        1,
        "the gateway stopped reading the upstream"
    );
    assert_eq!(gw.metric("hivegate_llm_in_flight{provider=\"kimi\"}"), 0.0);
    assert_eq!(gw.metric("hivegate_llm_calls_in_flight"), 0.0);
}

#[test]
fn a_closed_connection_cancels_its_calls() {
    let fake = slow_stream();
    let gw = gateway(&[("kimi", &fake)], "");
    let (mut ws, _) = gw.session(None);
    call(&mut ws, "d", json!({}));
    while recv_json(&mut ws)["op"] != "stream_chunk" {}
    drop(ws);
    wait_for_hang_up(&fake);
    assert_eq!(fake.hung_up(), 1);
}

#[test]
fn the_same_request_id_in_flight_shares_one_upstream_call() {
    let fake = FakeOpenAi::start(Behaviour::Stream {
        transcript: transcript("hello.txt"),
        delay: Duration::from_millis(50),
        first_byte: Duration::ZERO,
    });
    let gw = gateway(&[("kimi", &fake)], "");
    let (mut ws, _) = gw.session(None);
    call(&mut ws, "s", json!({}));
    call(&mut ws, "s", json!({}));
    let (mut results, mut acks) = (Vec::new(), Vec::new());
    while results.len() < 2 {
        let v = recv_json(&mut ws);
        match v["op"].as_str() {
            Some("call_tool_res") => results.push(v),
            Some("call_tool_ack") => acks.push(v),
            _ => {}
        }
    }
    assert_eq!(acks[1]["from_inflight"], true);
    assert_eq!(
        results
            .iter()
            .filter(|r| r["from_inflight"] == true)
            .count(),
        1
    );
    assert!(results
        .iter()
        .all(|r| r["outputs"][0]["text"] == "Hello, wörld \"quoted\"\n"));
    assert_eq!(fake.requests().len(), 1);
}

#[test]
fn progress_frames_come_while_the_provider_is_silent() {
    let fake = FakeOpenAi::start(Behaviour::Stream {
        transcript: transcript("hello.txt"),
        delay: Duration::ZERO,
        first_byte: Duration::from_millis(900),
    });
    let gw = gateway(&[("kimi", &fake)], "[llm]\nprogress_interval_ms = 200\n");
    let (mut ws, _) = gw.session(None);
    call(&mut ws, "p", json!({}));
    let frames = frames_until_end(&mut ws, "p");
    let progress: Vec<&Value> = frames.iter().filter(|f| f["op"] == "progress").collect();
    assert!(progress.len() >= 2, "{frames:?}");
    assert_eq!(progress[0]["message"], "waiting for kimi");
    assert_eq!(last(&frames)["op"], "call_tool_res");
}

#[test]
fn a_stalled_provider_times_out() {
    let fake = FakeOpenAi::start(Behaviour::Stall);
    let gw = gateway(
        &[("kimi", &fake)],
        "[llm]\nmax_retries = 0\n[provider.kimi]\nfirst_byte_timeout_ms = 300\n",
    );
    let (mut ws, _) = gw.session(None);
    let started = Instant::now();
    call(&mut ws, "st", json!({}));
    let end = last(&frames_until_end(&mut ws, "st")).clone();
    assert_eq!(end["error"]["code"], "PROVIDER_UNAVAILABLE");
    assert!(
        end["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{end}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn requests_are_checked_and_tools_listed() {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(&[("kimi", &fake)], "[llm]\nmax_prompt_bytes = 100\n");
    let (mut ws, _) = gw.session(None);
    send_json(&mut ws, &json!({"op":"list_tools","request_id":"l"}));
    let tools = recv_json(&mut ws);
    assert_eq!(tools["op"], "list_tools_res");
    assert_eq!(tools["tools"][0]["name"], "chat");
    assert_eq!(
        tools["tools"][0]["inputSchema"]["properties"]["provider"]["enum"],
        json!(["auto", "kimi"])
    );
    let code = |ws: &mut Ws, rid: &str, req: Value| -> String {
        send_json(ws, &req);
        loop {
            let v = recv_json(ws);
            if v["request_id"] == rid {
                return v["error"]["code"].as_str().unwrap_or("none").to_string();
            }
        }
    };
    let args = |messages: Value| json!({"messages": messages});
    assert_eq!(
        code(
            &mut ws,
            "a",
            json!({"op":"call_tool","request_id":"a","name":"chat","arguments":args(json!([]))})
        ),
        "INVALID_REQUEST"
    );
    assert_eq!(
        code(
            &mut ws,
            "b",
            json!({"op":"call_tool","request_id":"b","name":"chat","arguments":args(json!([{"role":"wizard","content":"x"}]))})
        ),
        "INVALID_REQUEST"
    );
    assert_eq!(
        code(
            &mut ws,
            "c",
            json!({"op":"call_tool","request_id":"c","name":"chat","arguments":args(json!([{"role":"user","content":"x".repeat(101)}]))})
        ),
        "INVALID_REQUEST"
    );
    assert_eq!(
        code(
            &mut ws,
            "d",
            json!({"op":"call_tool","request_id":"d","name":"draw","arguments":args(json!([{"role":"user","content":"x"}]))})
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        code(
            &mut ws,
            "e",
            json!({"op":"call_tool","request_id":"e","name":"chat","arguments":{"messages":[{"role":"user","content":"x"}],"provider":"nobody"}})
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        code(&mut ws, "f", json!({"op":"cancel","request_id":"f"})),
        "NOT_FOUND"
    );
    assert!(fake.requests().is_empty());
}

#[test]
fn the_api_key_never_appears_in_any_output() {
    let fake = FakeOpenAi::start(Behaviour::Status {
        status: 401,
        retry_after: None,
        body: "{\"error\":{\"message\":\"invalid key\"}}".into(),
    });
    let gw = gateway(&[("kimi", &fake)], "[log]\nlevel = \"debug\"\n");
    let (mut ws, _) = gw.session(None);
    let mut seen = String::new();
    call(&mut ws, "k1", json!({}));
    for f in frames_until_end(&mut ws, "k1") {
        seen.push_str(&f.to_string());
    }
    fake.set(ok_stream(transcript("hello.txt")));
    call(&mut ws, "k2", json!({}));
    for f in frames_until_end(&mut ws, "k2") {
        seen.push_str(&f.to_string());
    }
    seen.push_str(&gw.get("/metrics").body);
    seen.push_str(&gw.get("/readyz").body);
    gw.wait_log("llm call failed", 1);
    seen.push_str(&gw.log_text());
    assert!(
        seen.contains("invalid key"),
        "the upstream's error was relayed"
    );
    assert!(!seen.contains(KEY), "the key leaked");
    // At debug, the HTTP client's own records reach the log too.
    assert!(
        gw.log_text().contains("library target=ureq"),
        "{}",
        gw.log_text()
    );
    assert!(!seen.contains("7f3a9c"), "part of the key leaked");
    // It did go upstream, where it belongs.
    assert!(fake.requests()[0].head.contains(KEY));
}

#[test]
fn the_per_connection_cap_and_the_provider_quota_refuse() {
    let fake = FakeOpenAi::start(Behaviour::Stream {
        transcript: transcript("hello.txt"),
        delay: Duration::from_millis(100),
        first_byte: Duration::ZERO,
    });
    let gw = gateway(
        &[("kimi", &fake)],
        "[llm]\nmax_in_flight_per_session = 1\n[provider.kimi]\nrpm = 2\n",
    );
    let (mut ws, _) = gw.session(None);
    call(&mut ws, "one", json!({}));
    call(&mut ws, "two", json!({}));
    let refused = frames_until_end(&mut ws, "two");
    assert_eq!(last(&refused)["error"]["code"], "OVER_CAPACITY");
    assert!(last(&refused)["error"]["retry_after_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        last(&frames_until_end(&mut ws, "one"))["op"],
        "call_tool_res"
    );
    // Two requests a minute: the second passes, the third is out of quota.
    call(&mut ws, "three", json!({}));
    assert_eq!(
        last(&frames_until_end(&mut ws, "three"))["op"],
        "call_tool_res"
    );
    call(&mut ws, "four", json!({}));
    let end = last(&frames_until_end(&mut ws, "four")).clone();
    assert_eq!(end["error"]["code"], "PROVIDER_UNAVAILABLE");
    assert!(
        end["error"]["message"].as_str().unwrap().contains("quota"),
        "{end}"
    );
    assert!(
        end["error"]["retry_after_ms"].as_u64().unwrap() > 1000,
        "{end}"
    );
    assert_eq!(fake.requests().len(), 2);
}

#[test]
fn reasoning_is_relayed_and_tool_call_ids_reach_the_provider() {
    let transcript =
        "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"let me think\"}}]}\n\n\
                      data: {\"choices\":[{\"delta\":{\"content\":\"42\"}}]}\n\n\
                      data: [DONE]\n\n"
            .to_string();
    let fake = FakeOpenAi::start(ok_stream(transcript));
    let gw = gateway(&[("kimi", &fake)], "");
    let (mut ws, _) = gw.session(None);
    call(
        &mut ws,
        "r1",
        json!({"messages":[
            {"role":"user","content":"what is 6x7?"},
            {"role":"tool","content":"42","tool_call_id":"call_7"}
        ]}),
    );
    let frames = frames_until_end(&mut ws, "r1");
    let chunks: Vec<&Value> = frames
        .iter()
        .filter(|f| f["op"] == "stream_chunk")
        .collect();
    assert_eq!(chunks[0]["reasoning"], "let me think");
    assert!(chunks[0].get("chunk").is_none());
    assert_eq!(chunks[1]["chunk"], "42");
    assert_eq!(
        last(&frames)["outputs"][0]["text"],
        "42",
        "reasoning is not the answer"
    );
    let body: Value = serde_json::from_str(&fake.requests()[0].body).unwrap();
    assert_eq!(body["messages"][1]["tool_call_id"], "call_7");
    assert_eq!(body["stream_options"]["include_usage"], true);
}

/// `sha256:` and the first 8 hex digits, as logs and metrics name a key.
fn key_id(key: &str) -> String {
    let d = hivegate::auth::sha256(key.as_bytes());
    let hex: String = d[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[test]
fn upstream_errors_say_whose_fault_they_were() {
    let status = |status, body: &str| Behaviour::Status {
        status,
        retry_after: None,
        body: body.into(),
    };
    let kimi = FakeOpenAi::start(status(
        400,
        "{\"error\":{\"message\":\"context too long\"}}",
    ));
    let glm = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let gw = gateway(
        &[("kimi", &kimi), ("glm", &glm)],
        "[llm]\nmax_retries = 1\nbackoff_base_ms = 10\n[provider.kimi]\nfail_max = 2\n",
    );
    let (mut ws, _) = gw.session(None);
    // The request's fault: its words, no retry, no fallback, no hint.
    call(&mut ws, "r400", json!({}));
    let end = last(&frames_until_end(&mut ws, "r400")).clone();
    assert_eq!(end["error"]["code"], "UPSTREAM_REJECTED", "{end}");
    assert!(
        end["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context too long"),
        "{end}"
    );
    assert!(end["error"].get("retry_after_ms").is_none(), "{end}");
    assert_eq!((kimi.requests().len(), glm.requests().len()), (1, 0));
    assert_eq!(
        gw.metric("hivegate_breaker_state{service=\"kimi\",state=\"closed\"}"),
        1.0
    );
    // The key's fault: counted against it, and the next provider answers.
    kimi.set(status(401, "{\"error\":{\"message\":\"bad key\"}}"));
    call(&mut ws, "r401", json!({}));
    assert_eq!(last(&frames_until_end(&mut ws, "r401"))["provider"], "glm");
    assert_eq!(kimi.requests().len(), 2, "a refused key is not tried again");
    let refusals = format!(
        "hivegate_upstream_key_refusals_total{{upstream=\"provider.kimi\",key=\"{}\"}}",
        key_id(KEY)
    );
    assert_eq!(gw.metric(&refusals), 1.0);
    // Alone, a refused key gives no hint to retry.
    call(&mut ws, "alone", json!({"provider":"kimi"}));
    let end = last(&frames_until_end(&mut ws, "alone")).clone();
    assert_eq!(end["error"]["code"], "PROVIDER_UNAVAILABLE", "{end}");
    assert!(end["error"].get("retry_after_ms").is_none(), "{end}");
    // Two refusals opened the breaker: the next caller hears why.
    call(&mut ws, "open", json!({"provider":"kimi"}));
    let end = last(&frames_until_end(&mut ws, "open")).clone();
    let msg = end["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("circuit open after HTTP 401: bad key"),
        "{end}"
    );
    assert!(end["error"]["retry_after_ms"].as_u64().is_some(), "{end}");
    // 408 is the upstream's: retried.
    glm.set(status(408, ""));
    call(&mut ws, "r408", json!({"provider":"glm"}));
    assert_eq!(
        last(&frames_until_end(&mut ws, "r408"))["error"]["code"],
        "PROVIDER_UNAVAILABLE"
    );
    assert_eq!(glm.requests().len(), 1 + 2, "one call and one retry");
}
