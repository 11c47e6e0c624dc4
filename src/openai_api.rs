//! The OpenAI-compatible endpoint, transport-free: a `chat/completions`
//! request read into a relay call, the relay's events written back in
//! OpenAI's shapes (a whole `chat.completion`, or `chat.completion.chunk`
//! events ending in `[DONE]`), errors in its error shape, and the models a
//! caller may name. Any program that speaks OpenAI's API gets the relay's
//! breakers, fallback chain, key rotation, rules, budgets and limits
//! without knowing hivegate.
//!
//! A `model` is `auto` (the fallback chain), a provider's name (its
//! configured model), or `provider/model`. `tools`, `tool_choice` and the
//! sampling settings go to the provider as they came; the answer's
//! function calls come back whole (or as pieces, streamed).

use crate::json::{from_json, JsonOut};
use crate::llm::dialect::{ToolCallDelta, Usage};
use crate::llm::{Answer, Call, Cancel, Llm, Output, Said};
use crate::protocol::{ErrorCode, Turn, MAX_TOOL_CALL_ID};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

/// The members of a request passed to the provider as they came.
const PASSED: [&str; 13] = [
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "response_format",
    "reasoning_effort",
];

/// A checked `POST /v1/chat/completions`.
#[derive(Debug)]
pub struct Completion {
    pub call: Call,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// The model as the client named it, echoed in streamed chunks.
    pub model: String,
}

/// An error in OpenAI's shape, with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// The gateway's code, lower-cased (`rate_limited`...).
    pub code: String,
    pub message: String,
    /// For `Retry-After`, where waiting helps.
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_ascii_lowercase(),
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// The relay's refusal or failure, with the status an OpenAI client
    /// expects for it.
    pub fn from_code(code: ErrorCode, message: &str, retry_after_ms: Option<u64>) -> ApiError {
        let status = match code {
            ErrorCode::InvalidRequest | ErrorCode::UpstreamRejected => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::RateLimited
            | ErrorCode::BudgetExceeded
            | ErrorCode::OverCapacity
            | ErrorCode::LimitExceeded => 429,
            ErrorCode::ProviderUnavailable if retry_after_ms.is_some() => 503,
            ErrorCode::ProviderUnavailable => 502,
            ErrorCode::Timeout => 504,
            ErrorCode::InternalError => 500,
        };
        ApiError {
            retry_after_ms,
            ..ApiError::new(status, code.as_str(), message)
        }
    }

    /// OpenAI's `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            400 | 404 | 405 | 411 | 413 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "api_error",
        }
    }

    /// `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> String {
        let error = JsonOut::new()
            .str("message", &self.message)
            .str("type", self.kind())
            .raw("param", "null")
            .str("code", &self.code)
            .finish();
        JsonOut::new().raw("error", &error).finish()
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "INVALID_REQUEST", message)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Message<'a> {
    role: Option<String>,
    /// Text, or parts of which only text is relayed.
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    tool_call_id: Option<String>,
    #[serde(borrow)]
    tool_calls: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// A request's member `name` read as a `T`, if present (and not null).
fn member<'a, T: Deserialize<'a>>(
    body: &BTreeMap<String, &'a RawValue>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    match body.get(name) {
        None => Ok(None),
        Some(v) if v.get() == "null" => Ok(None),
        Some(v) => serde_json::from_str(v.get())
            .map(Some)
            .map_err(|e| invalid(format!("{name}: {e}"))),
    }
}

/// Reads a request body into the call it asks for, checked against the
/// providers `llm` has (the access rules are the relay's to check).
pub fn read(body: &str, llm: &Llm) -> Result<Completion, ApiError> {
    // Read as members, each then as its type: one map instead of a
    // derived reader for every option passed through.
    let b: BTreeMap<String, &RawValue> = from_json(body).map_err(|e| invalid(e.message))?;
    let asked = member::<String>(&b, "model")?
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("model is required: \"auto\", a provider, or provider/model (GET /v1/models lists them)"))?;
    let (provider, model) = pick(&asked, llm)?;
    if member::<u64>(&b, "n")?.is_some_and(|n| n != 1) {
        return Err(invalid("n must be 1: this gateway returns one choice"));
    }
    let messages = member::<Vec<Message>>(&b, "messages")?
        .ok_or_else(|| invalid("messages is required"))?
        .iter()
        .map(turn)
        .collect::<Result<Vec<_>, _>>()?;
    if b.get("tools").is_some_and(|t| !t.get().starts_with('[')) {
        return Err(invalid("tools must be a list"));
    }
    let mut options = String::new();
    for name in PASSED {
        if let Some(v) = b.get(name) {
            if !options.is_empty() {
                options.push(',');
            }
            options.push_str(&format!("\"{name}\":{}", v.get()));
        }
    }
    Ok(Completion {
        call: Call {
            messages,
            provider,
            model,
            stream: member::<bool>(&b, "stream")?.unwrap_or(false),
            options: (!options.is_empty()).then(|| options.into_boxed_str()),
        },
        include_usage: member::<StreamOptions>(&b, "stream_options")?
            .is_some_and(|o| o.include_usage),
        model: asked,
    })
}

/// The provider and model a `model` names.
fn pick(asked: &str, llm: &Llm) -> Result<(Option<String>, Option<String>), ApiError> {
    if asked == "auto" {
        return Ok((None, None));
    }
    let (name, model) = match asked.split_once('/') {
        Some((name, model)) if !model.is_empty() => (name, Some(model.to_string())),
        _ => (asked, None),
    };
    if !llm.providers().any(|(n, _)| n == name) {
        let shown: String = asked.chars().take(64).collect();
        return Err(ApiError::new(
            404,
            "MODEL_NOT_FOUND",
            format!("no model {shown:?}: GET /v1/models lists the ones you may use"),
        ));
    }
    Ok((Some(name.to_string()), model))
}

fn turn(m: &Message) -> Result<Turn, ApiError> {
    let role = m
        .role
        .clone()
        .ok_or_else(|| invalid("each message needs a role"))?;
    let parse_err = |e: serde_json::Error| invalid(format!("content: {e}"));
    let content = match m.content.map(RawValue::get) {
        None | Some("null") => String::new(),
        Some(t) if t.starts_with('"') => serde_json::from_str(t).map_err(parse_err)?,
        Some(parts) => {
            let parts: Vec<Part> = serde_json::from_str(parts).map_err(parse_err)?;
            let mut text = String::new();
            for p in &parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    _ => {
                        let kind: String = p.kind.chars().take(32).collect();
                        return Err(invalid(format!(
                            "content parts of type {kind:?} are not relayed: send text"
                        )));
                    }
                }
            }
            text
        }
    };
    if let Some(id) = &m.tool_call_id {
        if id.is_empty() || id.len() > MAX_TOOL_CALL_ID {
            return Err(invalid(format!(
                "tool_call_id must be 1-{MAX_TOOL_CALL_ID} bytes"
            )));
        }
    }
    let tool_calls = match m.tool_calls.map(RawValue::get) {
        None | Some("null") => None,
        Some(calls) if !calls.starts_with('[') => return Err(invalid("tool_calls must be a list")),
        Some(calls) => Some(Box::from(calls)),
    };
    Ok(Turn {
        role,
        content,
        tool_call_id: m.tool_call_id.clone(),
        tool_calls,
    })
}

/// `GET /v1/models`: `auto` when any provider of the chain may be used,
/// then each provider the caller may use, as itself and as
/// `provider/model`.
pub fn models(llm: &Llm, caller: &crate::llm::Caller) -> String {
    let mut ids: Vec<String> = Vec::new();
    if llm.chain().any(|name| caller.may_use(name)) {
        ids.push("auto".into());
    }
    for (name, model) in llm.providers() {
        if caller.may_use(name) {
            ids.push(name.to_string());
            ids.push(format!("{name}/{model}"));
        }
    }
    let data: Vec<String> = ids
        .iter()
        .map(|id| {
            JsonOut::new()
                .str("id", id)
                .str("object", "model")
                .num("created", 0)
                .str("owned_by", "hivegate")
                .finish()
        })
        .collect();
    JsonOut::new()
        .str("object", "list")
        .raw("data", &format!("[{}]", data.join(",")))
        .finish()
}

/// How a call ended, kept until the writer sends it.
pub enum End {
    Answer(Finished),
    Failed(ApiError),
}

/// An [`Answer`], owned.
pub struct Finished {
    text: String,
    tool_calls: Vec<ToolCallDelta>,
    finish_reason: String,
    provider: String,
    model: String,
    usage: Usage,
}

impl Finished {
    fn of(a: &Answer) -> Finished {
        let reason = match a.finish_reason {
            Some(r) => r,
            None if !a.tool_calls.is_empty() => "tool_calls",
            None => "stop",
        };
        Finished {
            text: a.text.to_string(),
            tool_calls: a.tool_calls.to_vec(),
            finish_reason: reason.to_string(),
            provider: a.provider.to_string(),
            model: a.model.to_string(),
            usage: a.usage,
        }
    }
}

/// What the relay said that the client has not been sent yet. Pieces
/// that pile up while the client reads slowly join into one chunk, so a
/// fast provider costs a slow reader bytes, never a queue of events; the
/// relay bounds the whole answer (`llm.max_response_bytes`).
#[derive(Default)]
pub struct Pending {
    reasoning: String,
    content: String,
    tool_calls: Vec<ToolCallDelta>,
    /// The provider is slow to answer, and why (a comment line keeps a
    /// started stream alive).
    waiting: Option<String>,
    pub end: Option<End>,
}

impl Pending {
    /// Whether a piece of the answer is waiting.
    pub fn has_piece(&self) -> bool {
        !(self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty())
    }
}

/// One call's exchange between the relay (an [`Output`]) and the writer
/// that sends it to the client.
pub struct Exchange {
    pending: RefCell<Pending>,
    pub cancel: Rc<Cancel>,
    /// The relay has returned: nothing more will come.
    done: Cell<bool>,
    ready: event_listener::Event,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            pending: RefCell::default(),
            cancel: Rc::default(),
            done: Cell::new(false),
            ready: event_listener::Event::new(),
        }
    }
}

impl Exchange {
    /// The relay has returned (said to the writer).
    pub fn close(&self) {
        self.done.set(true);
        self.ready.notify(usize::MAX);
    }

    /// Whether nothing more will come: the relay returned or the call
    /// was cancelled.
    pub fn over(&self) -> bool {
        self.done.get() || self.cancel.cancelled()
    }

    /// Everything pending, taken.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.borrow_mut())
    }

    /// Resolves at the next thing the relay says (listen before taking).
    pub fn listen(&self) -> event_listener::EventListener {
        self.ready.listen()
    }

    fn changed(&self, f: impl FnOnce(&mut Pending)) {
        if !self.cancel.cancelled() {
            f(&mut self.pending.borrow_mut());
            self.ready.notify(usize::MAX);
        }
    }
}

impl Output for Exchange {
    fn rid(&self) -> Option<&str> {
        None
    }

    fn say(&self, what: Said) {
        self.changed(|p| match what {
            Said::Piece {
                field: "chunk",
                text,
            } => p.content.push_str(text),
            Said::Piece { text, .. } => p.reasoning.push_str(text),
            Said::ToolCalls(calls) => crate::llm::join_tool_calls(&mut p.tool_calls, calls),
            Said::Waiting(why) => p.waiting = Some(why.to_string()),
        });
    }

    fn answer(&self, answer: &Answer) {
        self.changed(|p| p.end = Some(End::Answer(Finished::of(answer))));
    }

    fn fail(&self, code: ErrorCode, message: &str, retry_after_ms: Option<u64>) {
        let e = ApiError::from_code(code, message, retry_after_ms);
        self.changed(|p| p.end = Some(End::Failed(e)));
    }

    fn cancelled(&self) -> bool {
        self.cancel.cancelled()
    }

    fn until_cancelled(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(self.cancel.until())
    }
}

/// Writes one completion's answer: its id, creation time and model are
/// the same in every chunk.
pub struct Writer {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// The first chunk carries the role.
    started: bool,
}

impl Writer {
    pub fn new(c: &Completion) -> Writer {
        Writer {
            id: format!("chatcmpl-{:016x}", crate::resilience::random_u64()),
            created: (crate::clock::unix_ms().max(0) / 1000) as u64,
            model: c.model.clone(),
            include_usage: c.include_usage,
            started: false,
        }
    }

    /// The server-sent events for what was pending (the end included):
    /// chunks, the usage chunk when asked for, then `[DONE]`; or the
    /// error, in the stream.
    pub fn events(&mut self, p: Pending) -> String {
        let mut out = String::new();
        if p.has_piece() {
            let mut delta = JsonOut::new();
            if !self.started {
                delta = delta.str("role", "assistant");
                self.started = true;
            }
            if !p.reasoning.is_empty() {
                delta = delta.str("reasoning_content", &p.reasoning);
            }
            if !p.content.is_empty() {
                delta = delta.str("content", &p.content);
            }
            if !p.tool_calls.is_empty() {
                delta = delta.raw("tool_calls", &calls(&p.tool_calls, true));
            }
            self.event(&mut out, &self.choice(&delta.finish(), None), None);
        } else if let (Some(why), None) = (&p.waiting, &p.end) {
            // A comment: clients skip it, proxies see the stream alive.
            out.push_str(": ");
            out.push_str(&why.replace(['\r', '\n'], " "));
            out.push_str("\n\n");
        }
        match p.end {
            None => {}
            Some(End::Failed(e)) => {
                out.push_str("data: ");
                out.push_str(&e.body());
                out.push_str("\n\n");
            }
            Some(End::Answer(f)) => {
                let model = format!("{}/{}", f.provider, f.model);
                let choice = self.choice("{}", Some(&f.finish_reason));
                self.event(&mut out, &choice, Some(&model));
                if self.include_usage {
                    let usage = usage(&f.usage);
                    let chunk = self.chunk("[]", Some(&model)).raw("usage", &usage);
                    out.push_str("data: ");
                    out.push_str(&chunk.finish());
                    out.push_str("\n\n");
                }
                out.push_str("data: [DONE]\n\n");
            }
        }
        out
    }

    fn choice(&self, delta: &str, finish_reason: Option<&str>) -> String {
        let choice = JsonOut::new().num("index", 0).raw("delta", delta);
        match finish_reason {
            Some(r) => choice.str("finish_reason", r),
            None => choice.raw("finish_reason", "null"),
        }
        .finish()
    }

    fn chunk(&self, choices: &str, model: Option<&str>) -> JsonOut {
        JsonOut::new()
            .str("id", &self.id)
            .str("object", "chat.completion.chunk")
            .num("created", self.created)
            .str("model", model.unwrap_or(&self.model))
            .raw("choices", choices)
    }

    fn event(&self, out: &mut String, choice: &str, model: Option<&str>) {
        out.push_str("data: ");
        out.push_str(&self.chunk(&format!("[{choice}]"), model).finish());
        out.push_str("\n\n");
    }

    /// A whole `chat.completion`.
    pub fn whole(&self, f: &Finished) -> String {
        let mut message = JsonOut::new().str("role", "assistant");
        message = if f.text.is_empty() && !f.tool_calls.is_empty() {
            message.raw("content", "null")
        } else {
            message.str("content", &f.text)
        };
        if !f.tool_calls.is_empty() {
            message = message.raw("tool_calls", &calls(&f.tool_calls, false));
        }
        let choice = JsonOut::new()
            .num("index", 0)
            .raw("message", &message.finish())
            .str("finish_reason", &f.finish_reason)
            .finish();
        JsonOut::new()
            .str("id", &self.id)
            .str("object", "chat.completion")
            .num("created", self.created)
            .str("model", &format!("{}/{}", f.provider, f.model))
            .raw("choices", &format!("[{choice}]"))
            .raw("usage", &usage(&f.usage))
            .finish()
    }
}

fn usage(u: &Usage) -> String {
    JsonOut::new()
        .num("prompt_tokens", u.prompt_tokens)
        .num("completion_tokens", u.completion_tokens)
        .num("total_tokens", u.prompt_tokens + u.completion_tokens)
        .finish()
}

/// Function calls in OpenAI's form: pieces (with their `index`) in a
/// stream, whole calls in a message.
fn calls(calls: &[ToolCallDelta], streamed: bool) -> String {
    let each: Vec<String> = calls
        .iter()
        .map(|c| {
            let mut function = JsonOut::new();
            if let Some(name) = &c.name {
                function = function.str("name", name);
            }
            let function = function.str("arguments", &c.arguments).finish();
            let mut call = JsonOut::new();
            if streamed {
                call = call.num("index", c.index as u64);
            }
            if let Some(id) = &c.id {
                call = call.str("id", id);
            }
            call.str("type", "function")
                .raw("function", &function)
                .finish()
        })
        .collect();
    format!("[{}]", each.join(","))
}

#[cfg(test)]
mod tests;
