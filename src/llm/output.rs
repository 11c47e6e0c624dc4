//! What a call says while it runs, and how it ended, as the relay hands
//! it to a transport: a connection renders it as `op` frames, MCP as
//! JSON-RPC.

use super::dialect::{ToolCallDelta, Usage};
use crate::json::JsonOut;
use crate::protocol::ErrorCode;

/// What a call says while it runs.
pub enum Said<'a> {
    /// A streamed piece: `field` is `chunk` (the answer) or `reasoning`.
    Piece { field: &'static str, text: &'a str },
    /// Nothing heard from the provider for a while, and why.
    Waiting(&'a str),
    /// Pieces of function calls (only for a request that offered tools:
    /// the OpenAI-compatible endpoint's).
    ToolCalls(&'a [ToolCallDelta]),
}

/// How a call ended well.
pub struct Answer<'a> {
    pub text: &'a str,
    /// The function calls the model made, whole.
    pub tool_calls: &'a [ToolCallDelta],
    /// Why the answer ended, as the provider said.
    pub finish_reason: Option<&'a str>,
    pub provider: &'a str,
    pub model: &'a str,
    pub usage: Usage,
}

/// Where a call's events go: a connection renders them as `op` frames
/// ([`said_frame`], [`answer_frame`]), MCP as JSON-RPC. A cancelled call
/// says nothing more.
pub trait Output {
    fn rid(&self) -> Option<&str>;
    fn say(&self, what: Said);
    /// The call's result (to every asker, for a shared call).
    fn answer(&self, answer: &Answer);
    /// The call's end without a result.
    fn fail(&self, code: ErrorCode, message: &str, retry_after_ms: Option<u64>);
    fn cancelled(&self) -> bool;
    /// Resolves when the call is cancelled.
    fn until_cancelled(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>;
}

/// `stream_chunk` or `progress`, for the `op` protocol (which offers no
/// tools, so hears of no function calls).
pub fn said_frame(rid: Option<&str>, what: &Said) -> Option<String> {
    Some(match what {
        Said::Piece { field, text } => JsonOut::op("stream_chunk")
            .opt_str("request_id", rid)
            .str(field, text)
            .finish(),
        Said::Waiting(why) => JsonOut::op("progress")
            .opt_str("request_id", rid)
            .str("message", why)
            .finish(),
        Said::ToolCalls(_) => return None,
    })
}

/// `call_tool_res`, for the `op` protocol; `shared` marks the copy a
/// repeat of the call's `request_id` gets (`"from_inflight":true`).
pub fn answer_frame(rid: Option<&str>, a: &Answer, shared: bool) -> String {
    let usage = JsonOut::new()
        .num("prompt_tokens", a.usage.prompt_tokens)
        .num("completion_tokens", a.usage.completion_tokens)
        .finish();
    let output = JsonOut::new()
        .str("type", "text")
        .str("text", a.text)
        .finish();
    let mut frame = JsonOut::op("call_tool_res");
    if shared {
        frame = frame.bool("from_inflight", true);
    }
    frame
        .opt_str("request_id", rid)
        .raw("outputs", &format!("[{output}]"))
        .str("provider", a.provider)
        .str("model", a.model)
        .raw("usage", &usage)
        .finish()
}
