//! OpenAI's chat completions, the dialect Kimi, GLM, DeepSeek, vLLM,
//! LiteLLM and most others speak: `POST {base_url}/chat/completions` with
//! a Bearer key, `data:` chunks of `choices[0].delta`, and `[DONE]` at
//! the end.

use super::dialect::{
    CallError, Chunk, Dialect, Streamed, ToolCallDelta, Usage, Whole, MAX_TOOL_CALLS,
};
use crate::auth::Secret;
use crate::protocol::Turn;

pub struct OpenAi;

impl Dialect for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn url(&self, base_url: &str) -> String {
        format!("{}/chat/completions", base_url.trim_end_matches('/'))
    }

    fn headers(&self, key: Option<&Secret>) -> Vec<(&'static str, String)> {
        key.map(|k| ("Authorization", format!("Bearer {}", k.expose())))
            .into_iter()
            .collect()
    }

    fn body(&self, model: &str, messages: &[Turn], options: Option<&str>) -> String {
        request_body(model, messages, options)
    }

    fn event(&self, data: &str) -> Result<Streamed, CallError> {
        if data.trim() == "[DONE]" {
            return Ok(Streamed::End);
        }
        parse_chunk(data).map(Streamed::Chunk)
    }

    fn answer(&self, body: &str) -> Result<Whole, CallError> {
        parse_answer(body)
    }

    fn error_message(&self, body: &str) -> String {
        error_message(body)
    }
}

mod wire {
    //! The parts of OpenAI's answer shapes that are read; anything else in
    //! an answer is ignored.
    use serde::Deserialize;

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Answer {
        pub model: Option<String>,
        pub choices: Option<Vec<Choice>>,
        pub usage: Option<Usage>,
        pub error: Option<ErrorBody>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Choice {
        pub delta: Option<Content>,
        pub message: Option<Content>,
        pub finish_reason: Option<String>,
        /// Moonshot puts the usage of a stream in its last choice.
        pub usage: Option<Usage>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Content {
        pub content: Option<String>,
        pub reasoning_content: Option<String>,
        pub tool_calls: Option<Vec<ToolCall>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct ToolCall {
        /// Absent in a whole answer: the call's place in the list.
        pub index: Option<u32>,
        pub id: Option<String>,
        pub function: Option<Function>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Function {
        pub name: Option<String>,
        pub arguments: Option<String>,
    }

    #[derive(Deserialize, Default, Clone, Copy)]
    #[serde(default)]
    pub struct Usage {
        pub prompt_tokens: Option<u64>,
        pub completion_tokens: Option<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct ErrorBody {
        pub message: Option<String>,
    }
}

fn decode(json: &str) -> Result<wire::Answer, CallError> {
    // The same bounded reader as client frames: an upstream is as
    // untrusted as a client.
    crate::json::from_json(json).map_err(|e| CallError::Malformed(e.message))
}

fn usage_of(a: &wire::Answer) -> Option<Usage> {
    let u = a.usage.or_else(|| a.choices.as_ref()?.first()?.usage)?;
    Some(Usage {
        prompt_tokens: u.prompt_tokens.unwrap_or(0),
        completion_tokens: u.completion_tokens.unwrap_or(0),
    })
}

/// The function calls of a delta or a message, as pieces.
fn tool_calls(content: Option<&wire::Content>) -> Result<Vec<ToolCallDelta>, CallError> {
    let calls = content.and_then(|c| c.tool_calls.as_ref());
    let mut out = Vec::new();
    for (place, call) in calls.into_iter().flatten().enumerate() {
        let index = call.index.unwrap_or(place as u32);
        if index >= MAX_TOOL_CALLS {
            return Err(CallError::Malformed(format!(
                "more than {MAX_TOOL_CALLS} function calls"
            )));
        }
        let function = call.function.as_ref();
        out.push(ToolCallDelta {
            index,
            id: call.id.clone(),
            name: function.and_then(|f| f.name.clone()),
            arguments: function
                .and_then(|f| f.arguments.clone())
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

/// One streamed event's data.
fn parse_chunk(data: &str) -> Result<Chunk, CallError> {
    let a = decode(data)?;
    if let Some(e) = &a.error {
        return Err(CallError::Malformed(format!(
            "error in the stream: {}",
            e.message.as_deref().unwrap_or("(no message)")
        )));
    }
    let choice = a.choices.as_ref().and_then(|c| c.first());
    let content = choice.and_then(|c| c.delta.as_ref().or(c.message.as_ref()));
    let delta = content.and_then(|d| d.content.clone());
    let reasoning = content.and_then(|d| d.reasoning_content.clone());
    Ok(Chunk {
        usage: usage_of(&a),
        tool_calls: tool_calls(content)?,
        finish_reason: choice.and_then(|c| c.finish_reason.clone()),
        model: a.model,
        delta,
        reasoning,
    })
}

/// A whole (non-streamed) answer.
fn parse_answer(body: &str) -> Result<Whole, CallError> {
    let a = decode(body)?;
    let choice = a.choices.as_ref().and_then(|c| c.first());
    let message = choice.and_then(|c| c.message.as_ref().or(c.delta.as_ref()));
    let tool_calls = tool_calls(message)?;
    let text = message.and_then(|m| m.content.clone());
    // A message of function calls may have no text.
    let text = match text {
        Some(t) => t,
        None if !tool_calls.is_empty() => String::new(),
        None => return Err(CallError::Malformed("no choices[0].message.content".into())),
    };
    Ok(Whole {
        usage: usage_of(&a),
        finish_reason: choice.and_then(|c| c.finish_reason.clone()),
        model: a.model,
        text,
        tool_calls,
    })
}

/// The `error.message` of an error body, or the start of the body.
fn error_message(body: &str) -> String {
    let from_json = decode(body).ok().and_then(|a| a.error?.message);
    // Cut here, cleaned (secrets, controls, length) before it leaves the
    // pool thread: see `run`.
    from_json.unwrap_or_else(|| body.trim().to_string())
}

/// The request body: the model, the messages, `stream: true`, and the
/// caller's options (already OpenAI's JSON members, checked).
fn request_body(model: &str, messages: &[Turn], options: Option<&str>) -> String {
    use crate::json::escape_into;
    let mut out = String::with_capacity(128);
    out.push_str("{\"model\":");
    escape_into(&mut out, model);
    // OpenAI and vLLM report token counts in a stream only when asked.
    out.push_str(",\"stream\":true,\"stream_options\":{\"include_usage\":true},\"messages\":[");
    for (i, turn) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"role\":");
        escape_into(&mut out, &turn.role);
        out.push_str(",\"content\":");
        match &turn.tool_calls {
            // An assistant's function calls, as the client sent them back.
            Some(calls) => {
                if turn.content.is_empty() {
                    out.push_str("null");
                } else {
                    escape_into(&mut out, &turn.content);
                }
                out.push_str(",\"tool_calls\":");
                out.push_str(calls);
            }
            None => escape_into(&mut out, &turn.content),
        }
        if let Some(id) = &turn.tool_call_id {
            out.push_str(",\"tool_call_id\":");
            escape_into(&mut out, id);
        }
        out.push('}');
    }
    out.push(']');
    if let Some(options) = options {
        out.push(',');
        out.push_str(options);
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_and_moonshot_chunks() {
        let c = parse_chunk(r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}"#).unwrap();
        assert_eq!(c.delta.as_deref(), Some("Hel"));
        assert_eq!(c.model.as_deref(), Some("m"));
        let c = parse_chunk(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop","usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}]}"#).unwrap();
        assert_eq!(c.delta, None);
        assert_eq!(
            c.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5
            })
        );
        let c = parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#)
            .unwrap();
        assert_eq!(
            c.usage,
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2
            })
        );
    }

    #[test]
    fn reads_reasoning_deltas() {
        let c = parse_chunk(
            r#"{"choices":[{"delta":{"reasoning_content":"thinking","content":null}}]}"#,
        )
        .unwrap();
        assert_eq!((c.reasoning.as_deref(), c.delta), (Some("thinking"), None));
    }

    #[test]
    fn malformed_upstream_answers_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            "{\"choices\":}",
            "{\"choices\":[{\"delta\":{\"content\":5}}]}",
            "[1]",
        ] {
            assert!(
                matches!(parse_chunk(bad), Err(CallError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_chunk(r#"{"error":{"message":"overloaded"}}"#),
            Err(CallError::Malformed(m)) if m.contains("overloaded")
        ));
    }

    #[test]
    fn reads_a_whole_answer_and_error_bodies() {
        let Whole {
            text, model, usage, ..
        } = parse_answer(
            r#"{"model":"glm-4","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there"}}],"usage":{"prompt_tokens":2,"completion_tokens":2}}"#,
        )
        .unwrap();
        assert_eq!(
            (text.as_str(), model.as_deref()),
            ("Hi there", Some("glm-4"))
        );
        assert_eq!(usage.unwrap().completion_tokens, 2);
        assert_eq!(
            error_message(r#"{"error":{"message":"bad model","type":"x"}}"#),
            "bad model"
        );
        assert_eq!(error_message("  upstream down  "), "upstream down");
    }

    #[test]
    fn writes_the_request_body() {
        let turn = |role: &str, content: &str, id: Option<&str>| crate::protocol::Turn {
            role: role.into(),
            content: content.into(),
            tool_call_id: id.map(String::from),
            tool_calls: None,
        };
        let body = request_body("m\"1", &[turn("user", "hi\n", None)], None);
        assert_eq!(
            body,
            r#"{"model":"m\"1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi\n"}]}"#
        );
        assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
        let body = request_body("m", &[turn("tool", "42", Some("call_1"))], None);
        assert!(
            body.ends_with(r#"[{"role":"tool","content":"42","tool_call_id":"call_1"}]}"#),
            "{body}"
        );
    }

    #[test]
    fn reads_and_writes_function_calls() {
        let c = parse_chunk(r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"weather","arguments":"{\"ci"}}]}}]}"#).unwrap();
        assert_eq!(
            c.tool_calls,
            vec![ToolCallDelta {
                index: 0,
                id: Some("call_1".into()),
                name: Some("weather".into()),
                arguments: "{\"ci".into()
            }]
        );
        let c = parse_chunk(r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#).unwrap();
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
        let w = parse_answer(r#"{"choices":[{"message":{"content":null,"tool_calls":[{"id":"a","function":{"name":"f","arguments":"{}"}},{"id":"b","function":{"name":"g","arguments":"[]"}}]},"finish_reason":"tool_calls"}]}"#).unwrap();
        assert_eq!((w.text.as_str(), w.tool_calls.len()), ("", 2));
        assert_eq!(
            w.tool_calls[1].index, 1,
            "a whole answer's calls are numbered by place"
        );
        let many = format!(
            r#"{{"choices":[{{"delta":{{"tool_calls":[{{"index":{MAX_TOOL_CALLS}}}]}}}}]}}"#
        );
        assert!(matches!(parse_chunk(&many), Err(CallError::Malformed(_))));
        let turn = crate::protocol::Turn {
            role: "assistant".into(),
            content: String::new(),
            tool_call_id: None,
            tool_calls: Some(
                r#"[{"id":"a","type":"function","function":{"name":"f","arguments":"{}"}}]"#.into(),
            ),
        };
        let body = request_body("m", &[turn], Some(r#""tools":[],"temperature":0.5"#));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["messages"][0]["content"], serde_json::Value::Null);
        assert_eq!(v["messages"][0]["tool_calls"][0]["id"], "a");
        assert_eq!(v["temperature"], 0.5);
    }
}
