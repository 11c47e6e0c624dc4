//! The Model Context Protocol, the part hivegate serves: JSON-RPC 2.0
//! messages, `initialize` with version negotiation, `tools/list` (the
//! `chat` tool) and `tools/call` answered through the LLM relay, with
//! `notifications/progress` while it streams. Transport-free: both
//! transports (`server::mcp_http` and `server::conn::mcp`) hand each
//! message to [`handle`] and carry out what it says ([`Handled`]); a
//! started call runs through the one LLM relay (`relay.rs` turns its
//! events into MCP messages).

use crate::json::JsonOut;
pub use crate::llm::Cancel;
mod relay;
mod sessions;
pub use sessions::{McpConfig, Session, Sessions};

use crate::limit::Refused;
use crate::llm::{Caller, Llm};
use crate::protocol::{ErrorCode, ToolArguments, ToolCall};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::rc::Rc;

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
    /// Refused by the access rules (`FORBIDDEN`) or a spent budget
    /// (`BUDGET_EXCEEDED`): `data` says which, and when to retry.
    pub const DENIED: i64 = -32003;
    /// The answer to a call cancelled while its HTTP request waited (its
    /// session ended, or `notifications/cancelled` named it).
    pub const CANCELLED: i64 = -32800;
}

/// One JSON-RPC message from a client. Ids and parameters are kept as
/// the JSON text they came as: an id is echoed exactly, and parameters
/// are read into the small typed shapes below only by the method that
/// takes them (no generic JSON tree: it costs binary size for nothing).
#[derive(Debug, PartialEq)]
pub enum Message {
    Request {
        id: String,
        method: String,
        params: String,
    },
    Notification {
        method: String,
        params: String,
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

#[derive(Deserialize)]
struct Wire<'a> {
    jsonrpc: Option<String>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    method: Option<String>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

/// A JSON-RPC id or progress token: a string or a number, at most 128
/// characters of JSON.
fn scalar(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    let first = text.bytes().next()?;
    (text.len() <= 128 && (first == b'"' || first == b'-' || first.is_ascii_digit()))
        .then(|| text.to_string())
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
    let wire: Wire = crate::json::from_json(text).map_err(|e| Invalid {
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
    let id = match wire.id {
        None => None,
        Some(raw) => Some(scalar(raw).ok_or_else(|| {
            invalid(
                None,
                "id must be a string or a number of at most 128 characters",
            )
        })?),
    };
    if wire.jsonrpc.as_deref() != Some("2.0") {
        return Err(invalid(id, "jsonrpc must be \"2.0\""));
    }
    if wire.result.is_some() || wire.error.is_some() {
        return Ok(Message::Response);
    }
    let Some(method) = wire.method else {
        return Err(invalid(id, "missing \"method\""));
    };
    let params = wire.params.map_or("null", RawValue::get).to_string();
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

#[derive(Deserialize, Default)]
#[serde(default)]
struct InitParams {
    #[serde(rename = "protocolVersion")]
    protocol_version: Option<String>,
}

/// The `initialize` result, with the version negotiated from `params`.
pub fn initialize(params: &str) -> (String, &'static str) {
    let asked = crate::json::from_json::<InitParams>(params)
        .ok()
        .and_then(|p| p.protocol_version);
    let version = VERSIONS
        .iter()
        .find(|v| Some(**v) == asked.as_deref())
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

/// The `tools/list` result: the one tool, `chat`, as the op protocol's
/// `list_tools` describes it.
pub fn tools_list(llm: &Llm) -> String {
    format!("{{\"tools\":[{}]}}", llm.chat_tool())
}

#[derive(Deserialize)]
struct CallParams<'a> {
    name: String,
    arguments: Option<ToolArguments>,
    #[serde(rename = "_meta", borrow)]
    meta: Option<Meta<'a>>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(rename = "progressToken", borrow)]
    progress_token: Option<&'a RawValue>,
}

/// A `tools/call`'s tool name, call and progress token, checked as the
/// gateway's own `call_tool` is (the same rules, the same messages).
pub fn tool_call(params: &str) -> Result<(String, ToolCall, Option<String>), String> {
    let p: CallParams = crate::json::from_json(params)
        .map_err(|e| format!("params must be an object with a string name: {e}"))?;
    let token = p.meta.and_then(|m| m.progress_token).and_then(scalar);
    let call = p
        .arguments
        .ok_or_else(|| "missing \"arguments\"".to_string())?
        .check()?;
    Ok((p.name, call, token))
}

#[derive(Deserialize)]
struct CancelParams<'a> {
    #[serde(rename = "requestId", borrow)]
    request_id: Option<&'a RawValue>,
}

/// The id of the request a `notifications/cancelled` names.
pub fn cancelled_id(params: &str) -> Option<String> {
    let p: CancelParams = crate::json::from_json(params).ok()?;
    p.request_id.and_then(scalar)
}

/// What a transport knows of the session a message came on.
pub struct Ctx<'a> {
    pub llm: &'a Llm,
    /// The session's tool calls in flight, by request id.
    pub calls: &'a mut HashMap<String, Rc<Cancel>>,
    /// Who is asking, for a tool call's rules and budget.
    pub caller: Caller,
    /// Set when the rate limits refused this message.
    pub limited: Option<Refused>,
}

/// What became of a message, for its transport to carry out.
pub enum Handled {
    /// Nothing to answer: a notification or a response.
    Nothing,
    /// The answer to send.
    Answer(String),
    /// `initialize`'s answer, and the version agreed (the HTTP transport
    /// opens its session with it).
    Initialized(String, &'static str),
    /// A `tools/call` that passed its checks, registered in the session's
    /// calls: the transport runs it ([`Started::run`]) and forgets it
    /// when it ends.
    Call(Started),
}

/// One message, on either transport: the methods this server offers, the
/// rate limits' refusal, and `notifications/cancelled`.
pub fn handle(message: Message, ctx: Ctx) -> Handled {
    let (id, method, params) = match message {
        Message::Response => return Handled::Nothing,
        Message::Notification { method, params } => {
            if ctx.limited.is_none() && method == "notifications/cancelled" {
                let call = cancelled_id(&params).and_then(|rid| ctx.calls.remove(&rid));
                if let Some(call) = call {
                    call.cancel();
                }
            }
            return Handled::Nothing;
        }
        Message::Request { id, method, params } => (id, method, params),
    };
    if let Some(r) = &ctx.limited {
        return Handled::Answer(rate_limited(&id, &method, r));
    }
    Handled::Answer(match method.as_str() {
        "initialize" => {
            let (body, version) = initialize(&params);
            return Handled::Initialized(result(&id, &body), version);
        }
        "ping" => result(&id, "{}"),
        "tools/list" => result(&id, &tools_list(ctx.llm)),
        "tools/call" => match start_call(ctx.llm, ctx.calls, &id, &params, ctx.caller) {
            Ok(started) => return Handled::Call(started),
            Err(answer) => answer,
        },
        _ => no_method(&id, &method),
    })
}

/// The answer to a request a rate limit refused: a tool error for
/// `tools/call` (the model reading it can wait), `-32000` otherwise.
pub fn rate_limited(id: &str, method: &str, refused: &crate::limit::Refused) -> String {
    let ms = refused.retry_after_ms();
    if method == "tools/call" {
        let msg = format!("too many requests ({} limit)", refused.level.label());
        result(id, &tool_error("RATE_LIMITED", &msg, Some(ms)))
    } else {
        let data = format!("{{\"code\":\"RATE_LIMITED\",\"retry_after_ms\":{ms}}}");
        error(Some(id), code::LIMITED, "too many requests", Some(&data))
    }
}

/// The answer to a method this server does not offer.
pub fn no_method(id: &str, method: &str) -> String {
    let m: String = method.chars().take(64).collect();
    let msg =
        format!("no method {m:?}: this server offers initialize, ping, tools/list and tools/call");
    error(Some(id), code::METHOD_NOT_FOUND, &msg, None)
}

/// A `tools/call` that passed its checks and holds its slots.
pub struct Started {
    /// The request's id, as it came.
    pub id: String,
    /// Cancels the call (the transport's client went away).
    pub cancel: Rc<Cancel>,
    call: ToolCall,
    token: Option<String>,
    /// One of `llm.max_in_flight`, for as long as the call runs.
    slot: crate::limit::InFlight,
    caller: Caller,
}

/// Checks a `tools/call` on either transport (its parameters, the tool,
/// the call itself, the session's and the gateway's caps) and registers
/// it in the session's `calls`; or returns the answer that refuses it.
fn start_call(
    llm: &Llm,
    calls: &mut HashMap<String, Rc<Cancel>>,
    id: &str,
    params: &str,
    caller: Caller,
) -> Result<Started, String> {
    let refuse =
        |code: &str, msg: &str, retry: Option<u64>| result(id, &tool_error(code, msg, retry));
    let (name, call, token) =
        tool_call(params).map_err(|msg| error(Some(id), code::INVALID_PARAMS, &msg, None))?;
    if name != "chat" {
        let n: String = name.chars().take(32).collect();
        let msg = format!("no tool {n:?}: tools/list names them");
        return Err(error(Some(id), code::INVALID_PARAMS, &msg, None));
    }
    if let Err(r) = llm.check(&call, &caller) {
        if matches!(r.code, ErrorCode::Forbidden | ErrorCode::BudgetExceeded) {
            // Not the tool's failure, which the model might work around:
            // the caller may not, and a JSON-RPC error says so.
            let data = JsonOut::new()
                .str("code", r.code.as_str())
                .opt_num("retry_after_ms", r.retry_after_ms)
                .finish();
            return Err(error(Some(id), code::DENIED, &r.message, Some(&data)));
        }
        return Err(refuse(r.code.as_str(), &r.message, r.retry_after_ms));
    }
    if calls.contains_key(id) {
        let msg = "a call with this id is in flight";
        return Err(error(Some(id), code::INVALID_REQUEST, msg, None));
    }
    let per_session = llm.max_in_flight_per_session() as usize;
    if calls.len() >= per_session {
        let msg = format!("at most {per_session} tool calls in flight per session");
        return Err(refuse("OVER_CAPACITY", &msg, Some(1000)));
    }
    let Some(slot) = llm.try_start() else {
        let msg = "the gateway is at its limit of tool calls";
        return Err(refuse("OVER_CAPACITY", msg, Some(1000)));
    };
    let cancel = Rc::new(Cancel::default());
    calls.insert(id.to_string(), cancel.clone());
    Ok(Started {
        id: id.to_string(),
        call,
        token,
        slot,
        cancel,
        caller,
    })
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
                params: "null".into()
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
        assert!(parse(r#"{"jsonrpc":"2.0","id":true,"method":"x"}"#).is_err());
        // Ids are echoed exactly as they came (valid JSON, escapes kept).
        let Message::Request { id, params, .. } =
            parse(r#"{"jsonrpc":"2.0","id":"a\"b","method":"x","params":{"k":1}}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            result(&id, "{}"),
            r#"{"jsonrpc":"2.0","id":"a\"b","result":{}}"#
        );
        assert_eq!(params, r#"{"k":1}"#);
        assert_eq!(
            cancelled_id(r#"{"requestId":3,"reason":"x"}"#).as_deref(),
            Some("3")
        );
        assert_eq!(cancelled_id("null"), None);
    }

    #[test]
    fn negotiates_the_version_and_checks_tool_calls() {
        let (body, v) = initialize(r#"{"protocolVersion":"2025-03-26"}"#);
        assert_eq!(v, "2025-03-26");
        assert!(body.contains("\"tools\""));
        assert_eq!(initialize(r#"{"protocolVersion":"1999"}"#).1, VERSIONS[0]);
        assert_eq!(initialize("null").1, VERSIONS[0]);
        let ok = tool_call(r#"{"name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]},"_meta":{"progressToken":5}}"#).unwrap();
        assert_eq!((ok.0.as_str(), ok.2.as_deref()), ("chat", Some("5")));
        assert!(tool_call(r#"{"name":"chat","arguments":{}}"#)
            .unwrap_err()
            .contains("messages"));
        assert!(tool_call(r#"{"name":7}"#).is_err());
        // A hostile name stays a string.
        let quoted = tool_call(r#"{"name":"x\",\"op\":\"hello","arguments":{"messages":[{"role":"user","content":"hi"}]}}"#).unwrap();
        assert_eq!(quoted.0, "x\",\"op\":\"hello");
    }

    #[test]
    fn tools_list_is_the_op_protocols_tool_with_its_full_schema() {
        use crate::llm::{Llm, LlmConfig, ProviderConfig};
        let cfg = LlmConfig {
            chain: vec!["kimi".into()],
            providers: vec![ProviderConfig {
                name: "kimi".into(),
                base_url: "http://127.0.0.1:9/v1".into(),
                model: "m".into(),
                ..ProviderConfig::default()
            }],
            ..LlmConfig::default()
        };
        let log = crate::ops::log::Logger::new(Default::default(), Default::default());
        let llm = Llm::new(&cfg, log, Default::default(), &crate::ca::no_roots()).unwrap();
        let mcp: serde_json::Value = serde_json::from_str(&tools_list(&llm)).unwrap();
        let ops: serde_json::Value = serde_json::from_str(&llm.list_tools(None)).unwrap();
        assert_eq!(mcp["tools"], ops["tools"]);
        let schema = &mcp["tools"][0]["inputSchema"];
        assert_eq!(schema["required"], serde_json::json!(["messages"]));
        assert_eq!(schema["properties"]["messages"]["minItems"], 1);
        assert_eq!(
            schema["properties"]["provider"]["enum"],
            serde_json::json!(["auto", "kimi"])
        );
        assert_eq!(
            schema["properties"]["model"]["type"],
            serde_json::json!(["string", "null"])
        );
        assert_eq!(schema["properties"]["stream"]["type"], "boolean");
    }
}
