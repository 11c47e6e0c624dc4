//! One call to an OpenAI-compatible `POST /chat/completions`, on a pool
//! thread: ureq sends the request with `stream: true`, the answer is read
//! as it arrives (Server-Sent Events, or a plain JSON answer from a server
//! that does not stream), and every text delta goes back to the event loop
//! through a bounded channel.
//!
//! The job stops reading when the event loop's side of the channel is gone
//! or the cancel flag is set: checked after every read, so within one
//! chunk (or one `idle_timeout` on a stalled upstream, which is ureq's
//! per-read timeout).

use super::sse::SseParser;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Most bytes of an error body kept for the message.
const ERROR_BODY_BYTES: u64 = 2048;
/// Largest non-streamed answer accepted.
const MAX_JSON_ANSWER: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Delta(String),
    /// Reasoning text a model streams before its answer
    /// (`delta.reasoning_content`, as DeepSeek, Kimi and vLLM send it).
    Reasoning(String),
    Done {
        model: Option<String>,
        usage: Option<Usage>,
    },
    Failed(CallError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Could not connect, or the connection broke.
    Transport(String),
    Timeout(&'static str),
    Status {
        code: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    /// The answer was not what an OpenAI-compatible API sends.
    Malformed(String),
}

impl CallError {
    /// Whether the breaker counts it: the upstream's fault, not the
    /// request's (4xx) and not a quota (429).
    pub fn counted(&self) -> bool {
        match self {
            CallError::Status { code, .. } => *code >= 500,
            _ => true,
        }
    }

    /// Whether trying the same provider again may help.
    pub fn retryable(&self) -> bool {
        match self {
            CallError::Status { code, .. } => *code == 429 || *code >= 500,
            _ => true,
        }
    }

    /// The same error with every piece of upstream text cleaned: no
    /// secret, no control character, a bounded length.
    pub fn redacted(self, r: &crate::redact::Redactor) -> CallError {
        match self {
            CallError::Transport(m) => CallError::Transport(r.clean(&m)),
            CallError::Status {
                code,
                retry_after,
                message,
            } => CallError::Status {
                code,
                retry_after,
                message: r.clean(&message),
            },
            CallError::Malformed(m) => CallError::Malformed(r.clean(&m)),
            t @ CallError::Timeout(_) => t,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, CallError::Timeout(_))
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Transport(m) => write!(f, "connection failed: {m}"),
            CallError::Timeout(what) => write!(f, "timed out {what}"),
            CallError::Status { code, message, .. } => write!(f, "HTTP {code}: {message}"),
            CallError::Malformed(m) => write!(f, "malformed answer: {m}"),
        }
    }
}

impl std::error::Error for CallError {}

/// What a call needs, owned so it can move to a pool thread.
pub struct Request {
    pub agent: ureq::Agent,
    pub url: String,
    pub api_key: Option<crate::auth::Secret>,
    pub body: String,
    /// Cleans the upstream's words before they leave this thread.
    pub redact: crate::redact::Redactor,
}

/// An agent with the provider's timeouts. `http_status_as_error` is off so
/// that a 429's `Retry-After` and an error body can be read.
pub fn agent(cfg: &super::ProviderConfig, tls: &ureq::tls::TlsConfig) -> ureq::Agent {
    ureq::Agent::config_builder()
        .tls_config(tls.clone())
        .http_status_as_error(false)
        .timeout_connect(Some(cfg.connect_timeout))
        .timeout_recv_response(Some(cfg.first_byte_timeout))
        .timeout_per_read(Some(cfg.idle_timeout))
        .timeout_global(Some(cfg.total_timeout))
        .user_agent(concat!("hivegate/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Runs the call, sending events; the last one is always `Done` or
/// `Failed` (unless the receiver went away or the call was cancelled).
pub fn run(req: Request, events: &async_channel::Sender<Event>, cancel: &AtomicBool) {
    let outcome = call(&req, events, cancel);
    if cancel.load(Ordering::Relaxed) {
        return;
    }
    let last = match outcome {
        Ok(Some(done)) => done,
        Ok(None) => return,
        Err(e) => Event::Failed(e.redacted(&req.redact)),
    };
    let _ = events.send_blocking(last);
}

fn map_ureq(e: ureq::Error) -> CallError {
    match e {
        ureq::Error::Timeout(t) => CallError::Timeout(match t {
            ureq::Timeout::Connect | ureq::Timeout::Resolve => "connecting",
            ureq::Timeout::RecvResponse | ureq::Timeout::SendRequest | ureq::Timeout::SendBody => {
                "waiting for the first byte"
            }
            ureq::Timeout::Global | ureq::Timeout::PerCall => "after the whole call's time",
            _ => "between chunks",
        }),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            CallError::Timeout("between chunks")
        }
        other => CallError::Transport(other.to_string()),
    }
}

fn map_io(e: std::io::Error) -> CallError {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            CallError::Timeout("between chunks")
        }
        _ => {
            // ureq wraps its own timeouts in io errors while reading a body.
            let text = e.to_string();
            if text.contains("timeout") || text.contains("timed out") {
                CallError::Timeout("between chunks")
            } else {
                CallError::Transport(text)
            }
        }
    }
}

/// `Ok(Some(last event))`, or `Ok(None)` when the receiver is gone.
fn call(
    req: &Request,
    events: &async_channel::Sender<Event>,
    cancel: &AtomicBool,
) -> Result<Option<Event>, CallError> {
    let mut r = req
        .agent
        .post(&req.url)
        .header("Content-Type", "application/json")
        .header("Accept", "text/event-stream");
    if let Some(key) = &req.api_key {
        r = r.header("Authorization", &format!("Bearer {}", key.expose()));
    }
    let response = r.send(req.body.as_str()).map_err(map_ureq)?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut body = String::new();
        let _ = response
            .into_body()
            .into_reader()
            .take(ERROR_BODY_BYTES)
            .read_to_string(&mut body);
        return Err(CallError::Status {
            code: status,
            retry_after,
            message: error_message(&body),
        });
    }
    let streaming = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let mut reader = response.into_body().into_reader();
    if !streaming {
        let mut body = String::new();
        reader
            .take(MAX_JSON_ANSWER)
            .read_to_string(&mut body)
            .map_err(map_io)?;
        let (text, model, usage) = parse_answer(&body)?;
        if !text.is_empty() && events.send_blocking(Event::Delta(text)).is_err() {
            return Ok(None);
        }
        return Ok(Some(Event::Done { model, usage }));
    }
    let mut parser = SseParser::default();
    let mut buf = vec![0u8; 8192];
    let mut datas = Vec::new();
    let (mut model, mut usage) = (None, None);
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = reader.read(&mut buf).map_err(map_io)?;
        if n == 0 {
            parser
                .finish(&mut datas)
                .map_err(|e| CallError::Malformed(format!("{e:?}")))?;
        } else {
            parser
                .feed(&buf[..n], &mut datas)
                .map_err(|e| CallError::Malformed(format!("{e:?}")))?;
        }
        for data in datas.drain(..) {
            if data.trim() == "[DONE]" {
                return Ok(Some(Event::Done { model, usage }));
            }
            let chunk = parse_chunk(&data)?;
            model = chunk.model.or(model);
            usage = chunk.usage.or(usage);
            if let Some(text) = chunk.reasoning.filter(|t| !t.is_empty()) {
                if events.send_blocking(Event::Reasoning(text)).is_err() {
                    return Ok(None);
                }
            }
            if let Some(text) = chunk.delta.filter(|t| !t.is_empty()) {
                if events.send_blocking(Event::Delta(text)).is_err() {
                    return Ok(None);
                }
            }
        }
        if n == 0 {
            return Err(CallError::Transport(
                "the stream ended before [DONE]".into(),
            ));
        }
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

pub struct Chunk {
    pub delta: Option<String>,
    pub reasoning: Option<String>,
    pub model: Option<String>,
    pub usage: Option<Usage>,
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
pub fn parse_chunk(data: &str) -> Result<Chunk, CallError> {
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

/// A whole (non-streamed) answer: text, model, usage.
pub fn parse_answer(body: &str) -> Result<(String, Option<String>, Option<Usage>), CallError> {
    let a = decode(body)?;
    let text = a
        .choices
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|c| c.message.as_ref().or(c.delta.as_ref()))
        .and_then(|m| m.content.clone())
        .ok_or_else(|| CallError::Malformed("no choices[0].message.content".into()))?;
    Ok((text, a.model.clone(), usage_of(&a)))
}

/// The `error.message` of an error body, or the start of the body.
fn error_message(body: &str) -> String {
    let from_json = decode(body).ok().and_then(|a| a.error?.message);
    // Cut here, cleaned (secrets, controls, length) before it leaves the
    // pool thread: see `run`.
    from_json.unwrap_or_else(|| body.trim().to_string())
}

/// The request body: the model, the messages, `stream: true`.
pub fn request_body(model: &str, messages: &[crate::protocol::Turn]) -> String {
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
        let (text, model, usage) = parse_answer(
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

    #[test]
    fn which_failures_count_and_which_retry() {
        let status = |code| CallError::Status {
            code,
            retry_after: None,
            message: String::new(),
        };
        assert!(status(500).counted() && status(500).retryable());
        assert!(!status(429).counted() && status(429).retryable());
        assert!(!status(400).counted() && !status(400).retryable());
        assert!(CallError::Timeout("x").counted());
        assert!(CallError::Malformed("x".into()).counted());
    }
}
