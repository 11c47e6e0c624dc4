//! How one family of LLM APIs is spoken: where a call goes, its headers
//! and body, how a streamed event and a whole answer read, and where a
//! stream ends. The transport (`client.rs`) sends what a dialect writes
//! and hands it what comes back; it knows no API's shapes. A new dialect
//! is a file beside `openai.rs`, declared in `mod.rs` (its `mod` line and
//! its place in `DIALECTS`); a provider picks one with
//! `provider.NAME.dialect`. What a call can come to (`Usage`,
//! `CallError`) is written here, for dialects and transport alike.

use crate::auth::Secret;
use crate::protocol::Turn;
use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
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
    /// The answer was not what the provider's dialect sends.
    Malformed(String),
    /// The answer grew past `llm.max_response_bytes` (the bound).
    TooLong(usize),
}

/// Whose fault a failed call was, which decides what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request itself (400, 404, 413, 422): every provider would
    /// refuse it, so no retry and no fallback, and the breaker does not
    /// count it. The client hears the upstream's words.
    Request,
    /// The API key (401, 403): counted against the key and by the
    /// breaker; the next provider is tried, this one not again.
    Key,
    /// A quota (429): retried after its `Retry-After`, then the next
    /// provider; not the upstream's failure.
    Quota,
    /// The upstream (408, other statuses, timeouts, broken or malformed
    /// answers): counted, retried, then the next provider.
    Upstream,
    /// The gateway's own bound on an answer's size: not the upstream's
    /// failure, and the same question would grow as long again, so
    /// neither counted nor retried.
    Bound,
}

impl CallError {
    pub fn fault(&self) -> Fault {
        match self {
            CallError::Status { code, .. } => match code {
                400 | 404 | 413 | 422 => Fault::Request,
                401 | 403 => Fault::Key,
                429 => Fault::Quota,
                _ => Fault::Upstream,
            },
            CallError::TooLong(_) => Fault::Bound,
            _ => Fault::Upstream,
        }
    }

    /// Whether the breaker counts it: the upstream's fault or its key's,
    /// not the request's and not a quota.
    pub fn counted(&self) -> bool {
        matches!(self.fault(), Fault::Upstream | Fault::Key)
    }

    /// Whether trying the same provider again may help.
    pub fn retryable(&self) -> bool {
        matches!(self.fault(), Fault::Upstream | Fault::Quota)
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
            t @ (CallError::Timeout(_) | CallError::TooLong(_)) => t,
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
            CallError::TooLong(max) => write!(
                f,
                "the answer is longer than llm.max_response_bytes ({max})"
            ),
        }
    }
}

impl std::error::Error for CallError {}

/// A piece of a function call the model makes (only when the request
/// offered tools): pieces with the same `index` join into one call, their
/// `arguments` appended in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// Most function calls one answer may make.
pub const MAX_TOOL_CALLS: u32 = 64;

/// What one streamed event carried (any part may be missing).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub delta: Option<String>,
    /// Reasoning text a model streams before its answer.
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
    /// Why the answer ended (`stop`, `length`, `tool_calls`...).
    pub finish_reason: Option<String>,
    pub model: Option<String>,
    pub usage: Option<Usage>,
}

/// One Server-Sent Event's data, read.
#[derive(Debug, PartialEq, Eq)]
pub enum Streamed {
    Chunk(Chunk),
    /// The answer is complete.
    End,
}

/// A whole answer, from a server that did not stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Whole {
    pub text: String,
    pub tool_calls: Vec<ToolCallDelta>,
    pub finish_reason: Option<String>,
    pub model: Option<String>,
    pub usage: Option<Usage>,
}

pub trait Dialect: Sync {
    /// Its name, as `provider.NAME.dialect` gives it.
    fn name(&self) -> &'static str;
    /// Where a call goes, from the provider's `base_url`.
    fn url(&self, base_url: &str) -> String;
    /// The headers besides `Content-Type` and `Accept`, the API key among
    /// them.
    fn headers(&self, key: Option<&Secret>) -> Vec<(&'static str, String)>;
    /// The request: the model and the conversation, streamed, with the
    /// caller's `options` (JSON members in OpenAI's form: `tools`,
    /// `temperature`...), which a dialect translates or leaves out.
    fn body(&self, model: &str, messages: &[Turn], options: Option<&str>) -> String;
    /// One streamed event's data.
    fn event(&self, data: &str) -> Result<Streamed, CallError>;
    /// A whole answer.
    fn answer(&self, body: &str) -> Result<Whole, CallError>;
    /// What an error body says (cleaned by the caller).
    fn error_message(&self, body: &str) -> String;
}

/// A provider's dialect, as its settings chose it.
#[derive(Clone, Copy)]
pub struct Speaks(pub &'static dyn Dialect);

impl Speaks {
    /// The dialect called `name`, or an error that lists them.
    pub fn named(name: &str) -> Result<Speaks, String> {
        super::DIALECTS
            .iter()
            .find(|d| d.name() == name)
            .map(|d| Speaks(*d))
            .ok_or_else(|| {
                let names: Vec<&str> = super::DIALECTS.iter().map(|d| d.name()).collect();
                format!("no dialect {name:?}; one of: {}", names.join(", "))
            })
    }
}

impl Default for Speaks {
    fn default() -> Self {
        Speaks(super::DIALECTS[0])
    }
}

impl std::ops::Deref for Speaks {
    type Target = dyn Dialect;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl std::fmt::Debug for Speaks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dialect_is_found_by_its_name() {
        assert_eq!(Speaks::named("openai").unwrap().name(), "openai");
        assert_eq!(Speaks::default().name(), "openai");
        let e = Speaks::named("klingon").err().unwrap();
        assert!(e.contains("one of: openai"), "{e}");
    }
}
