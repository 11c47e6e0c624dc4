use super::*;
use crate::llm::{LlmConfig, ProviderConfig};
use serde_json::{json, Value};

fn llm() -> Llm {
    let provider = |name: &str| ProviderConfig {
        name: name.into(),
        base_url: "http://127.0.0.1:9/v1".into(),
        model: format!("{name}-model"),
        ..ProviderConfig::default()
    };
    let cfg = LlmConfig {
        chain: vec!["kimi".into()],
        providers: vec![provider("kimi"), provider("glm")],
        ..LlmConfig::default()
    };
    let log = crate::ops::log::Logger::new(Default::default(), Default::default());
    Llm::new(&cfg, log, Default::default(), &crate::ca::no_roots()).unwrap()
}

fn read_ok(body: Value) -> Completion {
    read(&body.to_string(), &llm()).unwrap()
}

fn read_err(body: &str) -> ApiError {
    read(body, &llm()).unwrap_err()
}

#[test]
fn a_model_names_the_chain_a_provider_or_a_providers_model() {
    let c = read_ok(json!({"model":"auto","messages":[{"role":"user","content":"hi"}]}));
    assert_eq!((c.call.provider, c.call.model), (None, None));
    assert!(!c.call.stream, "not streamed unless asked");
    let c = read_ok(json!({"model":"glm","messages":[]}));
    assert_eq!(
        (c.call.provider.as_deref(), c.call.model),
        (Some("glm"), None)
    );
    let c = read_ok(json!({"model":"glm/org/big-1","messages":[]}));
    assert_eq!(c.call.model.as_deref(), Some("org/big-1"));
    let e = read_err(r#"{"model":"gpt-4o","messages":[]}"#);
    assert_eq!((e.status, e.code.as_str()), (404, "model_not_found"));
    assert!(e.message.contains("/v1/models"), "{}", e.message);
    assert_eq!(read_err(r#"{"messages":[]}"#).status, 400);
}

#[test]
fn options_pass_through_and_n_other_than_one_is_refused() {
    let c = read_ok(json!({
        "model": "kimi",
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": 0.2,
        "tools": [{"type":"function","function":{"name":"f","parameters":{}}}],
        "tool_choice": "auto",
        "logprobs": true,
        "messages": [
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"42"}
        ]
    }));
    assert!(c.call.stream && c.include_usage);
    let options: Value =
        serde_json::from_str(&format!("{{{}}}", c.call.options.as_deref().unwrap())).unwrap();
    assert_eq!(options["temperature"], 0.2);
    assert_eq!(options["tool_choice"], "auto");
    assert_eq!(options["tools"][0]["function"]["name"], "f");
    assert!(options.get("logprobs").is_none(), "only known options pass");
    assert_eq!(c.call.messages[0].content, "ab");
    assert!(c.call.messages[1]
        .tool_calls
        .as_deref()
        .unwrap()
        .contains("c1"));
    assert_eq!(c.call.messages[2].tool_call_id.as_deref(), Some("c1"));

    let e = read_err(r#"{"model":"kimi","n":2,"messages":[]}"#);
    assert_eq!(e.status, 400);
    assert!(e.message.contains("n must be 1"), "{}", e.message);
    let e = read_err(
        r#"{"model":"kimi","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
    );
    assert!(e.message.contains("image_url"), "{}", e.message);
    for bad in [
        "",
        "{",
        "[]",
        r#"{"model":5}"#,
        r#"{"model":"kimi","messages":[{"content":"x"}]}"#,
        r#"{"model":"kimi","tools":{},"messages":[]}"#,
    ] {
        assert_eq!(read_err(bad).status, 400, "{bad}");
    }
}

#[test]
fn errors_have_openais_shape_and_status() {
    let e = ApiError::from_code(ErrorCode::RateLimited, "slow \"down\"", Some(1500));
    assert_eq!(e.status, 429);
    let v: Value = serde_json::from_str(&e.body()).unwrap();
    assert_eq!(
        v,
        json!({"error":{"message":"slow \"down\"","type":"rate_limit_error","param":null,"code":"rate_limited"}})
    );
    let status = |code, retry| ApiError::from_code(code, "", retry).status;
    assert_eq!(status(ErrorCode::ProviderUnavailable, Some(1)), 503);
    assert_eq!(status(ErrorCode::ProviderUnavailable, None), 502);
    assert_eq!(status(ErrorCode::UpstreamRejected, None), 400);
    assert_eq!(status(ErrorCode::Forbidden, None), 403);
    assert_eq!(status(ErrorCode::Timeout, None), 504);
}

#[test]
fn models_lists_what_the_caller_may_use() {
    let llm = llm();
    let all: Value =
        serde_json::from_str(&models(&llm, &crate::llm::Caller::unrestricted("a"))).unwrap();
    let ids: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["auto", "kimi", "kimi/kimi-model", "glm", "glm/glm-model"]
    );
    let mut only_glm = crate::llm::Caller::unrestricted("b");
    if let Ok(g) = &mut only_glm.grant {
        g.providers = Some(vec!["glm".into()]);
    }
    let some: Value = serde_json::from_str(&models(&llm, &only_glm)).unwrap();
    assert_eq!(some["data"].as_array().unwrap().len(), 2, "{some}");
}

fn answer<'a>(text: &'a str, calls: &'a [ToolCallDelta]) -> Answer<'a> {
    Answer {
        text,
        tool_calls: calls,
        finish_reason: None,
        provider: "kimi",
        model: "k2",
        usage: Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
        },
    }
}

/// The JSON of each `data:` line of an event stream (`[DONE]` as a string).
fn datas(sse: &str) -> Vec<Value> {
    sse.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.into())))
        .collect()
}

#[test]
fn a_stream_coalesces_pieces_and_ends_with_usage_and_done() {
    let c = read_ok(
        json!({"model":"auto","stream":true,"stream_options":{"include_usage":true},"messages":[]}),
    );
    let mut w = Writer::new(&c);
    let x = Exchange::default();
    x.say(Said::Piece {
        field: "chunk",
        text: "Hel",
    });
    x.say(Said::Piece {
        field: "chunk",
        text: "lo",
    });
    let first = datas(&w.events(x.take()));
    assert_eq!(first.len(), 1, "two pieces pending become one chunk");
    assert_eq!(first[0]["object"], "chat.completion.chunk");
    assert_eq!(first[0]["model"], "auto");
    assert_eq!(
        first[0]["choices"][0]["delta"],
        json!({"role":"assistant","content":"Hello"})
    );
    let piece = |i, id: Option<&str>, args: &str| ToolCallDelta {
        index: i,
        id: id.map(String::from),
        name: id.map(|_| "f".to_string()),
        arguments: args.into(),
    };
    x.say(Said::ToolCalls(&[piece(0, Some("c1"), "{\"a\"")]));
    x.say(Said::ToolCalls(&[piece(0, None, ":1}")]));
    let joined = [piece(0, Some("c1"), "{\"a\":1}")];
    x.answer(&answer("Hello", &joined));
    let rest = datas(&w.events(x.take()));
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert_eq!(
        rest[0]["choices"][0]["delta"]["tool_calls"],
        json!([{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}])
    );
    assert!(rest[0]["choices"][0]["delta"].get("role").is_none());
    assert_eq!(rest[1]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(rest[1]["model"], "kimi/k2");
    assert_eq!(rest[2]["choices"], json!([]));
    assert_eq!(rest[2]["usage"]["total_tokens"], 7);
    assert_eq!(rest[3], "[DONE]");
    assert_eq!(rest[0]["id"], first[0]["id"], "one id for every chunk");
}

#[test]
fn a_whole_answer_and_an_error_in_a_stream() {
    let c = read_ok(json!({"model":"kimi","messages":[]}));
    let w = Writer::new(&c);
    let calls = [ToolCallDelta {
        index: 0,
        id: Some("c1".into()),
        name: Some("f".into()),
        arguments: "{}".into(),
    }];
    let v: Value = serde_json::from_str(&w.whole(&Finished::of(&answer("", &calls)))).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "f"
    );
    assert!(v["choices"][0]["message"]["tool_calls"][0]
        .get("index")
        .is_none());
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    let plain: Value = serde_json::from_str(&w.whole(&Finished::of(&answer("Hi", &[])))).unwrap();
    assert_eq!(plain["choices"][0]["message"]["content"], "Hi");
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");

    let mut w = Writer::new(&c);
    let x = Exchange::default();
    x.say(Said::Waiting("waiting for kimi\r\ndata: x"));
    assert_eq!(w.events(x.take()), ": waiting for kimi  data: x\n\n");
    x.fail(ErrorCode::Timeout, "too slow", None);
    let e = datas(&w.events(x.take()));
    assert_eq!(e[0]["error"]["code"], "timeout");
    x.cancel.cancel();
    x.say(Said::Piece {
        field: "chunk",
        text: "late",
    });
    assert!(!x.take().has_piece(), "a cancelled call says nothing more");
}
