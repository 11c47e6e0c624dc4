//! The Model Context Protocol, the part hivegate serves: JSON-RPC 2.0
//! messages, `initialize` with version negotiation, `tools/list` (the
//! `chat` tool) and `tools/call` answered through the LLM relay, with
//! `notifications/progress` while it streams. Transport-free: the HTTP
//! transport (`server::mcp_http`) reads and writes what this module parses
//! and renders.
//!
//! The relay speaks the gateway's own frames (`stream_chunk`, `progress`,
//! `call_tool_res`, `error`); [`Translator`] turns them into MCP messages,
//! so one relay serves both protocols.

use crate::json::JsonOut;
pub use crate::llm::Cancel;
use crate::protocol::{Request, ToolCall};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Protocol versions spoken, newest first. A client asking for another
/// one is answered with the newest (the spec's negotiation).
pub const VERSIONS: [&str; 3] = ["2025-06-18", "2025-03-26", "2024-11-05"];

/// JSON-RPC error codes.
pub mod code {
    pub const PARSE: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    /// Refused by a rate limit or a cap: `data` says which and when.
    pub const LIMITED: i64 = -32000;
}

/// One JSON-RPC message from a client.
#[derive(Debug, PartialEq)]
pub enum Message {
    /// `id` is kept as JSON text (a string or a number), to be echoed.
    Request {
        id: String,
        method: String,
        params: Value,
    },
    Notification {
        method: String,
        params: Value,
    },
    /// A response to something the server asked; hivegate asks nothing.
    Response,
}

/// A message that is not one: the error to answer with, and the id when
/// it could be read.
#[derive(Debug, PartialEq)]
pub struct Invalid {
    pub id: Option<String>,
    pub code: i64,
    pub message: String,
}

/// Reads one JSON-RPC message (batches are not accepted: the 2025-06-18
/// revision dropped them).
pub fn parse(text: &str) -> Result<Message, Invalid> {
    if text.trim_start().starts_with('[') {
        return Err(Invalid {
            id: None,
            code: code::INVALID_REQUEST,
            message: "batches are not accepted: send one message per request".into(),
        });
    }
    let value: Value = crate::json::from_json(text).map_err(|e| Invalid {
        id: None,
        code: if e.malformed {
            code::PARSE
        } else {
            code::INVALID_REQUEST
        },
        message: e.message,
    })?;
    let invalid = |id: Option<String>, message: &str| Invalid {
        id,
        code: code::INVALID_REQUEST,
        message: message.to_string(),
    };
    let Value::Object(mut obj) = value else {
        return Err(invalid(
            None,
            "a JSON-RPC message is an object (batches are not accepted)",
        ));
    };
    let id = match obj.remove("id") {
        None => None,
        Some(v @ (Value::String(_) | Value::Number(_))) if v.to_string().len() <= 128 => {
            Some(v.to_string())
        }
        Some(_) => {
            return Err(invalid(
                None,
                "id must be a string or a number of at most 128 characters",
            ))
        }
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(id, "jsonrpc must be \"2.0\""));
    }
    if obj.contains_key("result") || obj.contains_key("error") {
        return Ok(Message::Response);
    }
    let Some(Value::String(method)) = obj.remove("method") else {
        return Err(invalid(id, "missing \"method\""));
    };
    let params = obj.remove("params").unwrap_or(Value::Null);
    Ok(match id {
        Some(id) => Message::Request { id, method, params },
        None => Message::Notification { method, params },
    })
}

/// A result message.
pub fn result(id: &str, result: &str) -> String {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{result}}}")
}

/// An error message (`id` `null` when the request's could not be read).
pub fn error(id: Option<&str>, code: i64, message: &str, data: Option<&str>) -> String {
    let mut err = JsonOut::new()
        .raw("code", &code.to_string())
        .str("message", message);
    if let Some(d) = data {
        err = err.raw("data", d);
    }
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{},\"error\":{}}}",
        id.unwrap_or("null"),
        err.finish()
    )
}

/// The `initialize` result, with the version negotiated from `params`.
pub fn initialize(params: &Value) -> (String, &'static str) {
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    let version = VERSIONS
        .iter()
        .find(|v| Some(**v) == asked)
        .copied()
        .unwrap_or(VERSIONS[0]);
    let info = JsonOut::new()
        .str("name", "hivegate")
        .str("version", env!("CARGO_PKG_VERSION"))
        .finish();
    let body = JsonOut::new()
        .str("protocolVersion", version)
        .raw("capabilities", "{\"tools\":{\"listChanged\":false}}")
        .raw("serverInfo", &info)
        .str(
            "instructions",
            "The chat tool answers with an LLM behind the gateway's fallback chain of providers.",
        )
        .finish();
    (body, version)
}

/// The `tools/list` result: the one tool, `chat`.
pub fn tools_list() -> String {
    concat!(
        "{\"tools\":[{\"name\":\"chat\",",
        "\"description\":\"Ask an LLM. The gateway tries its providers in order (fallback chain, circuit breakers, retries) and streams the answer as progress notifications when a progressToken is given.\",",
        "\"inputSchema\":{\"type\":\"object\",\"properties\":{",
        "\"messages\":{\"type\":\"array\",\"description\":\"The conversation, oldest first.\",\"items\":{\"type\":\"object\",\"properties\":{",
        "\"role\":{\"type\":\"string\",\"enum\":[\"system\",\"user\",\"assistant\",\"tool\"]},",
        "\"content\":{\"type\":\"string\"},\"tool_call_id\":{\"type\":\"string\"}},",
        "\"required\":[\"role\",\"content\"]}},",
        "\"provider\":{\"type\":\"string\",\"description\":\"A provider's name, or auto for the chain.\"},",
        "\"model\":{\"type\":\"string\",\"description\":\"Overrides the provider's model.\"}},",
        "\"required\":[\"messages\"]}}]}"
    )
    .to_string()
}

/// A `tools/call`'s tool name, call and progress token, checked as the
/// gateway's own `call_tool` is (the same rules, the same messages).
pub fn tool_call(params: &Value) -> Result<(String, ToolCall, Option<String>), String> {
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .ok_or("params.name must be a string")?;
    let args = params.get("arguments").cloned().unwrap_or(Value::Null);
    let token = params
        .get("_meta")
        .and_then(|m| m.get("progressToken"))
        .filter(|t| t.is_string() || t.is_number())
        .map(Value::to_string)
        .filter(|t| t.len() <= 128);
    let frame = serde_json::json!({
        "op": "call_tool", "request_id": "mcp", "name": name, "arguments": args,
    });
    match crate::protocol::parse(&frame.to_string()) {
        Ok(env) => match env.request {
            Request::CallTool { name, call } => Ok((name, call, token)),
            _ => Err("not a tool call".into()),
        },
        Err(e) => Err(e.message),
    }
}

/// What a relay frame becomes in MCP.
#[derive(Debug, PartialEq)]
pub enum Out {
    /// A notification to send now (progress).
    Notify(String),
    /// The call's result (a tool error is a result with `isError`).
    Done(String),
    /// Nothing (streamed text without a progress token).
    Nothing,
}

/// Turns one call's relay frames into MCP messages.
pub struct Translator {
    pub id: String,
    pub token: Option<String>,
    progress: u64,
}

impl Translator {
    pub fn new(id: String, token: Option<String>) -> Translator {
        Translator {
            id,
            token,
            progress: 0,
        }
    }

    pub fn translate(&mut self, frame: &str) -> Out {
        // The relay's own output: well-formed, bounded.
        let Ok(v) = serde_json::from_str::<Value>(frame) else {
            return Out::Nothing;
        };
        let text = |k: &str| v.get(k).and_then(Value::as_str);
        match text("op") {
            Some("stream_chunk") | Some("progress") => {
                let Some(token) = &self.token else {
                    return Out::Nothing;
                };
                self.progress += 1;
                let message = text("delta")
                    .or(text("chunk"))
                    .or(text("reasoning"))
                    .or(text("message"))
                    .unwrap_or("");
                let params = JsonOut::new()
                    .raw("progressToken", token)
                    .num("progress", self.progress)
                    .str("message", message)
                    .finish();
                Out::Notify(format!(
                    "{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{params}}}"
                ))
            }
            Some("call_tool_res") => {
                let answer: String = v["outputs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o.get("text").and_then(Value::as_str))
                    .collect();
                let content = JsonOut::new()
                    .str("type", "text")
                    .str("text", &answer)
                    .finish();
                let structured = JsonOut::new()
                    .str("text", &answer)
                    .str("provider", text("provider").unwrap_or(""))
                    .str("model", text("model").unwrap_or(""))
                    .raw(
                        "usage",
                        &v.get("usage").map_or("{}".into(), Value::to_string),
                    )
                    .finish();
                let body = JsonOut::new()
                    .raw("content", &format!("[{content}]"))
                    .raw("structuredContent", &structured)
                    .bool("isError", false)
                    .finish();
                Out::Done(result(&self.id, &body))
            }
            Some("error") => {
                let e = &v["error"];
                let code = e
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("INTERNAL_ERROR");
                let message = e.get("message").and_then(Value::as_str).unwrap_or("");
                let retry = e.get("retry_after_ms").and_then(Value::as_u64);
                Out::Done(result(&self.id, &tool_error(code, message, retry)))
            }
            _ => Out::Nothing,
        }
    }
}

/// A tool error: an `isError` result (the model reading it can react),
/// with the gateway's code and `retry_after_ms` in text and structure.
pub fn tool_error(code: &str, message: &str, retry_after_ms: Option<u64>) -> String {
    let text = match retry_after_ms {
        Some(ms) => format!("{code}: {message} (retry after {ms} ms)"),
        None => format!("{code}: {message}"),
    };
    let content = JsonOut::new()
        .str("type", "text")
        .str("text", &text)
        .finish();
    let mut structured = JsonOut::new().str("code", code).str("message", message);
    if let Some(ms) = retry_after_ms {
        structured = structured.num("retry_after_ms", ms);
    }
    JsonOut::new()
        .raw("content", &format!("[{content}]"))
        .raw("structuredContent", &structured.finish())
        .bool("isError", true)
        .finish()
}

/// Where a tool call's relay frames go on either transport: translated,
/// then handed to `deliver` (the message, and whether it is the result).
pub struct Sink<D: Fn(String, bool)> {
    translator: RefCell<Translator>,
    pub cancel: Rc<Cancel>,
    deliver: D,
}

impl<D: Fn(String, bool)> Sink<D> {
    pub fn new(translator: Translator, cancel: Rc<Cancel>, deliver: D) -> Sink<D> {
        Sink {
            translator: RefCell::new(translator),
            cancel,
            deliver,
        }
    }
}

impl<D: Fn(String, bool)> crate::llm::Output for Sink<D> {
    fn rid(&self) -> Option<&str> {
        Some("mcp")
    }

    fn send(&self, frame: String) {
        if self.cancelled() {
            return;
        }
        if let Out::Notify(n) = self.translator.borrow_mut().translate(&frame) {
            (self.deliver)(n, false);
        }
    }

    fn finish(&self, frame: String) {
        if self.cancelled() {
            return;
        }
        if let Out::Done(d) = self.translator.borrow_mut().translate(&frame) {
            (self.deliver)(d, true);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.cancelled()
    }

    fn cancel_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.cancel.flag.clone()
    }

    fn until_cancelled(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(self.cancel.until())
    }
}

/// One MCP session (`Mcp-Session-Id`).
pub struct Session {
    pub user: Rc<str>,
    pub version: &'static str,
    last_used: Instant,
    /// Tool calls in flight, by request id.
    pub calls: HashMap<String, Rc<Cancel>>,
    /// Whether a `GET` stream is open (at most one per session).
    pub streaming: bool,
    /// Notified when the session ends, for its `GET` stream.
    pub ended: Rc<event_listener::Event>,
}

/// The sessions, bounded: past `max`, the one idle longest goes; one idle
/// past `idle_timeout` is gone when next looked up. No timer runs.
pub struct Sessions {
    by_id: HashMap<String, Session>,
    max: usize,
    idle_timeout: Duration,
    pub evicted: u64,
}

impl Sessions {
    pub fn new(max: usize, idle_timeout: Duration) -> Sessions {
        Sessions {
            by_id: HashMap::new(),
            max: max.max(1),
            idle_timeout,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// A new session; returns its id.
    pub fn open(&mut self, user: Rc<str>, version: &'static str, now: Instant) -> String {
        self.by_id
            .retain(|_, s| now.saturating_duration_since(s.last_used) < self.idle_timeout);
        if self.by_id.len() >= self.max {
            let oldest = self
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                self.close(&id);
                self.evicted += 1;
            }
        }
        let id = format!(
            "{:016x}{:016x}",
            crate::resilience::random_u64(),
            crate::resilience::random_u64()
        );
        self.by_id.insert(
            id.clone(),
            Session {
                user,
                version,
                last_used: now,
                calls: HashMap::new(),
                streaming: false,
                ended: Rc::new(event_listener::Event::new()),
            },
        );
        id
    }

    /// The session `id` for a request by `user`, if it is live.
    pub fn touch(&mut self, id: &str, user: &str, now: Instant) -> Option<&mut Session> {
        let live = self.by_id.get(id).is_some_and(|s| {
            now.saturating_duration_since(s.last_used) < self.idle_timeout && &*s.user == user
        });
        if !live {
            if self.by_id.get(id).is_some_and(|s| &*s.user == user) {
                self.close(id);
            }
            return None;
        }
        let s = self.by_id.get_mut(id)?;
        s.last_used = now;
        Some(s)
    }

    /// A live session, whoever asks (the caller checked the user).
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Session> {
        self.by_id.get_mut(id)
    }

    /// Ends a session and cancels its calls.
    pub fn close(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(s) => {
                for call in s.calls.values() {
                    call.cancel();
                }
                s.ended.notify(usize::MAX);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_requests_notifications_and_refuses_the_rest() {
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#).unwrap(),
            Message::Request {
                id: "7".into(),
                method: "ping".into(),
                params: Value::Null
            }
        );
        assert!(matches!(
            parse(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap(),
            Message::Notification { .. }
        ));
        assert_eq!(parse("{").unwrap_err().code, code::PARSE);
        assert_eq!(parse("[]").unwrap_err().code, code::INVALID_REQUEST);
        let e = parse(r#"{"jsonrpc":"1.0","id":"a","method":"x"}"#).unwrap_err();
        assert_eq!(
            (e.id.as_deref(), e.code),
            (Some("\"a\""), code::INVALID_REQUEST)
        );
        assert!(parse(r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#).is_err());
        // Ids are echoed as they came, escaped by serde_json.
        let Message::Request { id, .. } =
            parse(r#"{"jsonrpc":"2.0","id":"a\"b","method":"x"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            result(&id, "{}"),
            r#"{"jsonrpc":"2.0","id":"a\"b","result":{}}"#
        );
    }

    #[test]
    fn negotiates_the_version_and_checks_tool_calls() {
        let (body, v) = initialize(&serde_json::json!({"protocolVersion":"2025-03-26"}));
        assert_eq!(v, "2025-03-26");
        assert!(body.contains("\"tools\""));
        assert_eq!(
            initialize(&serde_json::json!({"protocolVersion":"1999"})).1,
            VERSIONS[0]
        );
        let ok = tool_call(&serde_json::json!({"name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]},"_meta":{"progressToken":5}})).unwrap();
        assert_eq!((ok.0.as_str(), ok.2.as_deref()), ("chat", Some("5")));
        assert!(
            tool_call(&serde_json::json!({"name":"chat","arguments":{}}))
                .unwrap_err()
                .contains("messages")
        );
        serde_json::from_str::<Value>(&tools_list()).unwrap();
    }

    #[test]
    fn relay_frames_become_progress_and_results() {
        let mut t = Translator::new("3".into(), Some("\"tok\"".into()));
        let Out::Notify(n) = t.translate(r#"{"op":"stream_chunk","request_id":"x","delta":"Hel"}"#)
        else {
            panic!()
        };
        assert!(
            n.contains(r#""progressToken":"tok","progress":1,"message":"Hel""#),
            "{n}"
        );
        let Out::Done(d) = t.translate(r#"{"op":"call_tool_res","outputs":[{"type":"text","text":"Hello"}],"provider":"p","model":"m","usage":{}}"#) else {
            panic!()
        };
        assert!(
            d.starts_with(
                r#"{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"Hello"}]"#
            ),
            "{d}"
        );
        let Out::Done(e) = t.translate(r#"{"op":"error","error":{"code":"RATE_LIMITED","message":"slow down","retry_after_ms":250}}"#) else {
            panic!()
        };
        assert!(
            e.contains(r#""isError":true"#) && e.contains(r#""retry_after_ms":250"#),
            "{e}"
        );
        let mut silent = Translator::new("4".into(), None);
        assert_eq!(
            silent.translate(r#"{"op":"stream_chunk","delta":"x"}"#),
            Out::Nothing
        );
    }

    #[test]
    fn sessions_are_bounded_and_expire_without_a_timer() {
        let t0 = Instant::now();
        let mut s = Sessions::new(2, Duration::from_secs(60));
        let a = s.open(Rc::from("u"), VERSIONS[0], t0);
        let b = s.open(Rc::from("u"), VERSIONS[0], t0 + Duration::from_secs(1));
        assert!(s.touch(&a, "u", t0 + Duration::from_secs(2)).is_some());
        // Full: b, idle longest, goes.
        let c = s.open(Rc::from("u"), VERSIONS[0], t0 + Duration::from_secs(3));
        assert!(s.touch(&b, "u", t0 + Duration::from_secs(3)).is_none());
        assert_eq!(s.evicted, 1);
        // Another user's token cannot use a session.
        assert!(s
            .touch(&c, "mallory", t0 + Duration::from_secs(4))
            .is_none());
        assert!(s.touch(&c, "u", t0 + Duration::from_secs(4)).is_some());
        // Idle past the timeout: gone.
        assert!(s.touch(&a, "u", t0 + Duration::from_secs(100)).is_none());
        assert!(s.close(&c));
        assert!(s.is_empty());
    }
}
