//! OpenAI's chat completions, the dialect Kimi, GLM, DeepSeek, vLLM,
//! LiteLLM and most others speak: `POST {base_url}/chat/completions` with
//! a Bearer key, `data:` chunks of `choices[0].delta`, and `[DONE]` at
//! the end.

use super::dialect::{CallError, Chunk, Dialect, Streamed, Usage, Whole};
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

    fn body(&self, model: &str, messages: &[Turn]) -> String {
        request_body(model, messages)
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
        /// Moonshot puts the usage of a stream in its last choice.
        pub usage: Option<Usage>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub struct Content {
        pub content: Option<String>,
        pub reasoning_content: Option<String>,
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

/// One streamed event's data.
fn parse_chunk(data: &str) -> Result<Chunk, CallError> {
    let a = decode(data)?;
    if let Some(e) = &a.error {
        return Err(CallError::Malformed(format!(
            "error in the stream: {}",
            e.message.as_deref().unwrap_or("(no message)")
        )));
    }
    let content = a
        .choices
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|c| c.delta.as_ref().or(c.message.as_ref()));
    let delta = content.and_then(|d| d.content.clone());
    let reasoning = content.and_then(|d| d.reasoning_content.clone());
    Ok(Chunk {
        usage: usage_of(&a),
        model: a.model,
        delta,
        reasoning,
    })
}

/// A whole (non-streamed) answer.
fn parse_answer(body: &str) -> Result<Whole, CallError> {
    let a = decode(body)?;
    let text = a
        .choices
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|c| c.message.as_ref().or(c.delta.as_ref()))
        .and_then(|m| m.content.clone())
        .ok_or_else(|| CallError::Malformed("no choices[0].message.content".into()))?;
    Ok(Whole {
        usage: usage_of(&a),
        model: a.model,
        text,
    })
}

/// The `error.message` of an error body, or the start of the body.
fn error_message(body: &str) -> String {
    let from_json = decode(body).ok().and_then(|a| a.error?.message);
    // Cut here, cleaned (secrets, controls, length) before it leaves the
    // pool thread: see `run`.
    from_json.unwrap_or_else(|| body.trim().to_string())
}

/// The request body: the model, the messages, `stream: true`.
fn request_body(model: &str, messages: &[Turn]) -> String {
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
        escape_into(&mut out, &turn.content);
        if let Some(id) = &turn.tool_call_id {
            out.push_str(",\"tool_call_id\":");
            escape_into(&mut out, id);
        }
        out.push('}');
    }
    out.push_str("]}");
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
        let Whole { text, model, usage } = parse_answer(
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
        };
        let body = request_body("m\"1", &[turn("user", "hi\n", None)]);
        assert_eq!(
            body,
            r#"{"model":"m\"1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi\n"}]}"#
        );
        assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
        let body = request_body("m", &[turn("tool", "42", Some("call_1"))]);
        assert!(
            body.ends_with(r#"[{"role":"tool","content":"42","tool_call_id":"call_1"}]}"#),
            "{body}"
        );
    }
}
