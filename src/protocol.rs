//! The wire protocol (`shared/PROTOCOL.md`): typed requests parsed from
//! client frames, and server frames written as JSON.
//!
//! A frame is read with [`crate::json::from_json`] (bounded nesting, no
//! panic, no loop) into a flat envelope, which is turned into a
//! [`Request`] with every field checked. Server frames are written with
//! [`JsonOut`]; this module holds the vocabulary: ops, limits, error and
//! close codes.

mod close;
use crate::json::{from_json, JsonOut};
pub use close::Close;
use serde::Deserialize;

/// Longest `request_id`, in bytes.
pub const MAX_REQUEST_ID: usize = 64;
/// Longest `client` name in `hello`, in bytes.
pub const MAX_CLIENT_NAME: usize = 128;
/// Longest token in `hello`, in bytes: a JWT with its claims fits.
pub const MAX_TOKEN: usize = 8192;
/// Most messages in one `history` answer or `join`.
pub const MAX_HISTORY: u64 = 200;
/// History when `join` or `history` does not say how much.
pub const DEFAULT_HISTORY: u64 = 50;
/// Longest message id accepted in `react`.
pub const MAX_MESSAGE_ID: usize = 64;
/// Longest emoji, in bytes.
pub const MAX_EMOJI: usize = 32;

/// The error codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    BudgetExceeded,
    RateLimited,
    OverCapacity,
    LimitExceeded,
    NotFound,
    ProviderUnavailable,
    /// The provider refused the request itself (400, 404, 413, 422):
    /// another provider or a retry would too.
    UpstreamRejected,
    Timeout,
    InternalError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::BudgetExceeded => "BUDGET_EXCEEDED",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::OverCapacity => "OVER_CAPACITY",
            ErrorCode::LimitExceeded => "LIMIT_EXCEEDED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::ProviderUnavailable => "PROVIDER_UNAVAILABLE",
            ErrorCode::UpstreamRejected => "UPSTREAM_REJECTED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }
}

/// One message of a `chat` tool call's conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: String,
    pub content: String,
    /// On a `tool` message: the call it answers (OpenAI's `tool_call_id`).
    pub tool_call_id: Option<String>,
    /// On an `assistant` message: the function calls it made, as the
    /// OpenAI-compatible endpoint's client sent them back (a JSON array).
    pub tool_calls: Option<Box<str>>,
}

/// Longest `tool_call_id`, in bytes.
pub const MAX_TOOL_CALL_ID: usize = 128;

/// A `chat` tool call, as the client asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub messages: Vec<Turn>,
    /// `None` for `auto` (the chain).
    pub provider: Option<String>,
    pub model: Option<String>,
    pub stream: bool,
    /// JSON members passed to the provider as they came (`tools`,
    /// `temperature`...): only the OpenAI-compatible endpoint sets them.
    pub options: Option<Box<str>>,
}

/// A request from a client, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Hello {
        token: Option<String>,
        client: Option<String>,
        /// A stable id the client keeps (an addition to PROTOCOL.md): in
        /// open mode the guest name is derived from it, so a reconnecting
        /// page keeps its name.
        client_id: Option<String>,
    },
    Ping,
    /// A request about rooms, handled by `chat`.
    Chat(ChatRequest),
    ListTools,
    CallTool {
        name: String,
        call: ToolCall,
    },
    Cancel,
}

/// A request about rooms and their messages.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatRequest {
    Join {
        room: String,
        history: u64,
    },
    Leave {
        room: String,
    },
    Publish {
        room: String,
        text: String,
    },
    React {
        message_id: String,
        emoji: String,
    },
    History {
        room: String,
        /// Messages before this seq; without it (and without `after_seq`),
        /// the newest.
        before_seq: Option<u64>,
        /// Messages after this seq: what a reconnecting client missed.
        after_seq: Option<u64>,
        limit: u64,
    },
}

/// A parsed frame: the request and its `request_id`, if it had one.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub request_id: Option<String>,
    pub request: Request,
}

/// Why a frame was refused. `request_id` is kept when it could be read, so
/// the error can be matched to the request.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub request_id: Option<String>,
    pub message: String,
    /// Malformed JSON (as opposed to a well-formed but wrong request).
    pub malformed: bool,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseError {}

/// The flat shape serde fills; every field is optional and checked after.
/// Unknown fields are ignored (clients may send more than this version
/// reads).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Raw {
    op: Option<String>,
    request_id: Option<String>,
    token: Option<String>,
    client: Option<String>,
    client_id: Option<String>,
    room: Option<String>,
    history: Option<u64>,
    text: Option<String>,
    message_id: Option<String>,
    emoji: Option<String>,
    before_seq: Option<u64>,
    after_seq: Option<u64>,
    limit: Option<u64>,
    name: Option<String>,
    arguments: Option<ToolArguments>,
}

/// A `chat` tool call's arguments as they come, on either protocol: the
/// op protocol's `call_tool` and MCP's `tools/call` both read them into
/// this and check them with [`ToolArguments::check`].
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ToolArguments {
    messages: Option<Vec<ChatMessage>>,
    provider: Option<String>,
    model: Option<String>,
    stream: Option<bool>,
}

impl ToolArguments {
    /// The call they ask for, or what is wrong with them.
    pub fn check(self) -> Result<ToolCall, String> {
        let messages = self
            .messages
            .ok_or("missing \"arguments.messages\"")?
            .into_iter()
            .map(|m| match (m.role, m.content, m.tool_call_id) {
                (_, _, Some(id)) if id.is_empty() || id.len() > MAX_TOOL_CALL_ID => {
                    Err(format!("tool_call_id must be 1-{MAX_TOOL_CALL_ID} bytes"))
                }
                (Some(role), Some(content), tool_call_id) => Ok(Turn {
                    role,
                    content,
                    tool_call_id,
                    tool_calls: None,
                }),
                _ => Err("each message needs a role and a string content".into()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ToolCall {
            messages,
            provider: self.provider.filter(|p| p != "auto"),
            model: self.model,
            stream: self.stream.unwrap_or(true),
            options: None,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatMessage {
    role: Option<String>,
    content: Option<String>,
    tool_call_id: Option<String>,
}

pub fn parse(text: &str) -> Result<Envelope, ParseError> {
    let raw: Raw = from_json(text).map_err(|e| ParseError {
        request_id: None,
        malformed: e.malformed,
        message: e.message,
    })?;
    let request_id = raw.request_id;
    let fail = |message: String| ParseError {
        request_id: request_id.clone().filter(|id| id.len() <= MAX_REQUEST_ID),
        message,
        malformed: false,
    };
    if let Some(id) = &request_id {
        if id.len() > MAX_REQUEST_ID {
            return Err(fail(format!(
                "request_id is longer than {MAX_REQUEST_ID} bytes"
            )));
        }
    }
    let op = raw.op.ok_or_else(|| fail("missing \"op\"".into()))?;
    let request = match op.as_str() {
        "hello" => {
            if raw.token.as_ref().is_some_and(|t| t.len() > MAX_TOKEN) {
                return Err(fail(format!("token is longer than {MAX_TOKEN} bytes")));
            }
            if raw
                .client
                .as_ref()
                .is_some_and(|c| c.len() > MAX_CLIENT_NAME)
            {
                return Err(fail(format!(
                    "client is longer than {MAX_CLIENT_NAME} bytes"
                )));
            }
            if raw.client_id.as_ref().is_some_and(|c| {
                !(8..=64).contains(&c.len())
                    || !c
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }) {
                return Err(fail("client_id must be 8-64 of [A-Za-z0-9_-]".into()));
            }
            Request::Hello {
                token: raw.token,
                client: raw.client,
                client_id: raw.client_id,
            }
        }
        "ping" => Request::Ping,
        "join" => Request::Chat(ChatRequest::Join {
            room: room(raw.room, &fail)?,
            history: count(raw.history, "history", &fail)?,
        }),
        "leave" => Request::Chat(ChatRequest::Leave {
            room: room(raw.room, &fail)?,
        }),
        "publish" => Request::Chat(ChatRequest::Publish {
            room: room(raw.room, &fail)?,
            text: raw.text.ok_or_else(|| fail("missing \"text\"".into()))?,
        }),
        "react" => {
            let message_id = raw
                .message_id
                .filter(|m| (1..=MAX_MESSAGE_ID).contains(&m.len()))
                .ok_or_else(|| fail(format!("message_id must be 1-{MAX_MESSAGE_ID} bytes")))?;
            let emoji = raw
                .emoji
                .filter(|e| valid_emoji(e))
                .ok_or_else(|| {
                    fail(format!(
                        "emoji must be 1-{MAX_EMOJI} bytes of printable text, without spaces, quotes or backslashes"
                    ))
                })?;
            Request::Chat(ChatRequest::React { message_id, emoji })
        }
        "list_tools" => Request::ListTools,
        "cancel" => {
            if request_id.is_none() {
                return Err(fail(
                    "cancel needs the request_id of the call to cancel".into(),
                ));
            }
            Request::Cancel
        }
        "call_tool" => {
            if request_id.is_none() {
                return Err(fail(
                    "call_tool needs a request_id (its answers carry it)".into(),
                ));
            }
            let name = raw.name.ok_or_else(|| fail("missing \"name\"".into()))?;
            let call = raw
                .arguments
                .ok_or_else(|| "missing \"arguments\"".to_string())
                .and_then(ToolArguments::check)
                .map_err(fail)?;
            Request::CallTool { name, call }
        }
        "history" => {
            if raw.before_seq.is_some() && raw.after_seq.is_some() {
                return Err(fail("give before_seq or after_seq, not both".into()));
            }
            Request::Chat(ChatRequest::History {
                room: room(raw.room, &fail)?,
                before_seq: raw.before_seq,
                after_seq: raw.after_seq,
                limit: count(raw.limit, "limit", &fail)?,
            })
        }
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(fail(format!("unknown op {shown:?}")));
        }
    };
    Ok(Envelope {
        request_id,
        request,
    })
}

/// A room name: 1-64 bytes of `[A-Za-z0-9_.-]`.
fn room(name: Option<String>, fail: &dyn Fn(String) -> ParseError) -> Result<String, ParseError> {
    match name {
        Some(n) if valid_room(&n) => Ok(n),
        Some(_) => Err(fail(
            "room must be 1-64 characters of A-Z a-z 0-9 _ . -".into(),
        )),
        None => Err(fail("missing \"room\"".into())),
    }
}

/// A message count: at most [`MAX_HISTORY`], [`DEFAULT_HISTORY`] if absent.
fn count(
    n: Option<u64>,
    field: &str,
    fail: &dyn Fn(String) -> ParseError,
) -> Result<u64, ParseError> {
    match n {
        None => Ok(DEFAULT_HISTORY),
        Some(n) if n <= MAX_HISTORY => Ok(n),
        Some(_) => Err(fail(format!("{field} is at most {MAX_HISTORY}"))),
    }
}

/// Whether `name` is a valid room name: 1-64 bytes of `[A-Za-z0-9_.-]`.
pub fn valid_room(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Whether `e` may be a reaction: 1-[`MAX_EMOJI`] bytes of printable text.
/// Quotes, backslashes, control and format characters (and whitespace) are
/// refused: an emoji is shown as a label and used as a JSON key.
pub fn valid_emoji(e: &str) -> bool {
    (1..=MAX_EMOJI).contains(&e.len())
        && e.chars().all(|c| {
            !c.is_control()
                && !c.is_whitespace()
                && c != '"'
                && c != '\\'
                // Bidirectional overrides and other invisible controls,
                // except the joiners and selectors that emoji are made of.
                && !matches!(c, '\u{200b}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
        })
}

/// `{"op":"error","request_id":..,"error":{"code":..,"message":..}}`
pub fn error_frame(
    request_id: Option<&str>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> String {
    let mut err = JsonOut::new()
        .str("code", code.as_str())
        .str("message", message);
    if let Some(ms) = retry_after_ms {
        err = err.num("retry_after_ms", ms);
    }
    JsonOut::op("error")
        .opt_str("request_id", request_id)
        .raw("error", &err.finish())
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::fmt_f64;

    #[test]
    fn parses_hello_and_ping() {
        let e =
            parse(r#"{"op":"hello","token":"t","client":"kiosk/1.0","request_id":"r1"}"#).unwrap();
        assert_eq!(e.request_id.as_deref(), Some("r1"));
        assert_eq!(
            e.request,
            Request::Hello {
                token: Some("t".into()),
                client: Some("kiosk/1.0".into()),
                client_id: None,
            }
        );
        let e = parse(r#" {"op":"ping","extra":[1,{"a":null}],"n":-1.5e3} "#).unwrap();
        assert_eq!(e.request, Request::Ping);
        assert_eq!(e.request_id, None);
        assert!(matches!(
            parse(r#"{"op":"hello","token":null}"#).unwrap().request,
            Request::Hello { token: None, .. }
        ));
    }

    #[test]
    fn parses_chat_requests_and_checks_their_fields() {
        let r = |s: &str| parse(s).map(|e| e.request);
        assert_eq!(
            r(r#"{"op":"join","room":"general"}"#),
            Ok(Request::Chat(ChatRequest::Join {
                room: "general".into(),
                history: 50
            }))
        );
        assert_eq!(
            r(r#"{"op":"history","room":"g","after_seq":42,"limit":200}"#),
            Ok(Request::Chat(ChatRequest::History {
                room: "g".into(),
                before_seq: None,
                after_seq: Some(42),
                limit: 200
            }))
        );
        assert_eq!(
            r(r#"{"op":"react","message_id":"01J","emoji":"👍"}"#),
            Ok(Request::Chat(ChatRequest::React {
                message_id: "01J".into(),
                emoji: "👍".into()
            }))
        );
        for bad in [
            r#"{"op":"join","room":"bad room"}"#,
            r#"{"op":"join"}"#,
            r#"{"op":"join","room":"g","history":201}"#,
            r#"{"op":"join","room":"g","history":-1}"#,
            r#"{"op":"publish","room":"g"}"#,
            r#"{"op":"publish","room":"g","text":5}"#,
            r#"{"op":"react","message_id":"m","emoji":""}"#,
            r#"{"op":"history","room":"g","before_seq":1,"after_seq":2}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.malformed, "{bad}: {e:?}");
        }
    }

    #[test]
    fn parses_tool_calls() {
        let e = parse(r#"{"op":"call_tool","request_id":"t2","name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}],"provider":"auto","model":null,"stream":true}}"#).unwrap();
        match e.request {
            Request::CallTool { name, call } => {
                assert_eq!(name, "chat");
                assert_eq!(
                    call.messages,
                    [Turn {
                        role: "user".into(),
                        content: "hi".into(),
                        tool_call_id: None,
                        tool_calls: None
                    }]
                );
                assert_eq!((call.provider, call.model, call.stream), (None, None, true));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            r#"{"op":"call_tool","name":"chat","arguments":{"messages":[]}}"#,
            r#"{"op":"call_tool","request_id":"t","arguments":{"messages":[]}}"#,
            r#"{"op":"call_tool","request_id":"t","name":"chat"}"#,
            r#"{"op":"call_tool","request_id":"t","name":"chat","arguments":{"messages":[{"role":"user"}]}}"#,
            r#"{"op":"call_tool","request_id":"t","name":"chat","arguments":{"messages":[{"role":"user","content":[{"type":"text"}]}]}}"#,
            r#"{"op":"cancel"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse(r#"{"op":"list_tools","request_id":"t1"}"#)
                .unwrap()
                .request,
            Request::ListTools
        );
    }

    #[test]
    fn unknown_op_and_bad_fields_keep_the_request_id() {
        let e = parse(r#"{"op":"fly","request_id":"r9"}"#).unwrap_err();
        assert_eq!(e.request_id.as_deref(), Some("r9"));
        assert!(!e.malformed);
        assert!(e.message.contains("unknown op"));
        let e = parse(r#"{"request_id":"r9"}"#).unwrap_err();
        assert!(e.message.contains("missing"));
        let long = "x".repeat(65);
        let e = parse(&format!(r#"{{"op":"ping","request_id":"{long}"}}"#)).unwrap_err();
        assert_eq!(e.request_id, None);
        assert!(parse(r#"{"op":5}"#).is_err());
        assert!(parse(r#"{"op":"ping","request_id":7}"#).is_err());
    }

    #[test]
    fn malformed_json_is_refused_without_panicking() {
        for bad in [
            "",
            "[]",
            "null",
            "{",
            "{\"op\":}",
            "{\"x\":]",
            "{\"op\":\"ping\",}",
            "{\"a\" 1}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\u{1}\"}",
            "{} {}",
            "{\"a\":tru}",
            "{\"a\":[1,]}",
            "{\"a\":[1 2]}",
            "{\"a\":\"\\u12\"}",
            // nanoserde aborted on the first and looped for ever on the
            // next two.
            "{\"x\":}",
            "{\"x\":[1,2",
            "{\"x\":{",
            "{\"x\":{\"y\":[{\"z\":",
            "{\"op\":\"ping\"",
            "{\"op\":\"\\ud800\"}",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.malformed, "{bad:?} should be malformed");
        }
    }

    #[test]
    fn mutated_frames_never_panic() {
        let seeds = [
            r#"{"op":"hello","token":"abc","client":"x/1","request_id":"r1"}"#,
            r#"{"op":"ping","a":[1,2,{"b":"c\u00e9\n"}],"t":true,"f":false,"n":null}"#,
        ];
        let alphabet = b"{}[]\":,\\ 0123456789-+.eEtrufalsn\x00\xff";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut bytes = seeds[(next() % 2) as usize].as_bytes().to_vec();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() as usize) % (bytes.len() + 1);
                let c = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if pos < bytes.len() => bytes[pos] = c,
                    1 if pos < bytes.len() => {
                        bytes.remove(pos);
                    }
                    _ => bytes.insert(pos, c),
                }
            }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = parse(text);
            }
        }
    }

    #[test]
    fn emoji_are_printable_text_without_quotes() {
        for ok in ["👍", "❤️", "👨‍👩‍👧", ":+1:", "ok"] {
            assert!(valid_emoji(ok), "{ok:?}");
        }
        for bad in [
            "",
            "\"",
            "a\\",
            "\n",
            "\u{1b}[31m",
            "a b",
            "\u{202e}x",
            &"x".repeat(33),
        ] {
            assert!(!valid_emoji(bad), "{bad:?}");
            let frame = format!(
                r#"{{"op":"react","message_id":"m","emoji":{}}}"#,
                serde_json::to_string(bad).unwrap()
            );
            assert!(parse(&frame).is_err_and(|e| !e.malformed), "{bad:?}");
        }
    }

    /// Keys are escaped like values: a reaction stored before emoji were
    /// checked still cannot break a frame or forge a field.
    #[test]
    fn writes_escaped_frames() {
        let f = error_frame(
            Some("r\"1"),
            ErrorCode::RateLimited,
            "slow\ndown",
            Some(1200),
        );
        assert_eq!(
            f,
            r#"{"op":"error","request_id":"r\"1","error":{"code":"RATE_LIMITED","message":"slow\ndown","retry_after_ms":1200}}"#
        );
        let f = JsonOut::op("x")
            .str("s", "\u{1}👍")
            .num("n", 3)
            .bool("b", false)
            .finish();
        assert_eq!(f, r#"{"op":"x","s":"\u0001👍","n":3,"b":false}"#);
        assert!(serde_json::from_str::<serde_json::Value>(&f).is_ok());
        assert_eq!(fmt_f64(30.0), "30");
        assert_eq!(fmt_f64(0.5), "0.5");
        assert_eq!(fmt_f64(1.0 / 3.0), "0.333");
        assert_eq!(fmt_f64(f64::NAN), "0");
    }

    #[test]
    fn room_names_are_checked() {
        assert!(valid_room("general") && valid_room("a.b-c_9") && valid_room(&"x".repeat(64)));
        assert!(
            !valid_room("")
                && !valid_room("has space")
                && !valid_room(&"x".repeat(65))
                && !valid_room("é")
        );
    }
}
