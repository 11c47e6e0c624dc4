//! A tool call on MCP: the relay's events turned into progress
//! notifications and the result, and the run of a call a transport
//! started.

use super::{result, tool_error, Started};
use crate::json::JsonOut;
use crate::llm::{Answer, Llm, Said};
use crate::protocol::ErrorCode;
use std::cell::RefCell;
use std::rc::Rc;

impl Started {
    /// Runs the call through the relay, handing each message to `deliver`
    /// (the message, and whether it is the result). Without `progress`
    /// (a plain JSON answer) no progress notification is made.
    pub async fn run(self, llm: &Llm, progress: bool, deliver: impl Fn(String, bool)) {
        let token = self.token.filter(|_| progress);
        let sink = Sink {
            translator: RefCell::new(Translator::new(self.id, token)),
            cancel: self.cancel,
            deliver,
        };
        let _slot = self.slot;
        llm.run(self.call, &self.caller, &sink).await;
    }
}

/// Turns one call's relay events into MCP messages.
struct Translator {
    id: String,
    token: Option<String>,
    progress: u64,
}

impl Translator {
    fn new(id: String, token: Option<String>) -> Translator {
        Translator {
            id,
            token,
            progress: 0,
        }
    }

    /// A `notifications/progress` for a streamed piece or a wait, when
    /// the call has a progress token.
    fn progress(&mut self, what: &Said) -> Option<String> {
        let token = self.token.as_ref()?;
        let message = match what {
            Said::Piece { text, .. } => text,
            Said::Waiting(why) => why,
            Said::ToolCalls(_) => return None,
        };
        self.progress += 1;
        let params = JsonOut::new()
            .raw("progressToken", token)
            .num("progress", self.progress)
            .str("message", message)
            .finish();
        Some(format!(
            "{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{params}}}"
        ))
    }

    /// The call's result.
    fn answer(&self, a: &Answer) -> String {
        let content = JsonOut::new()
            .str("type", "text")
            .str("text", a.text)
            .finish();
        let usage = JsonOut::new()
            .num("prompt_tokens", a.usage.prompt_tokens)
            .num("completion_tokens", a.usage.completion_tokens)
            .finish();
        let structured = JsonOut::new()
            .str("text", a.text)
            .str("provider", a.provider)
            .str("model", a.model)
            .raw("usage", &usage)
            .finish();
        let body = JsonOut::new()
            .raw("content", &format!("[{content}]"))
            .raw("structuredContent", &structured)
            .bool("isError", false)
            .finish();
        result(&self.id, &body)
    }

    /// The call's end without an answer: a tool error.
    fn fail(&self, code: ErrorCode, message: &str, retry_after_ms: Option<u64>) -> String {
        result(
            &self.id,
            &tool_error(code.as_str(), message, retry_after_ms),
        )
    }
}

/// Where a tool call's relay frames go on either transport: translated,
/// then handed to `deliver` (the message, and whether it is the result).
struct Sink<D: Fn(String, bool)> {
    translator: RefCell<Translator>,
    cancel: Rc<crate::llm::Cancel>,
    deliver: D,
}

impl<D: Fn(String, bool)> crate::llm::Output for Sink<D> {
    fn rid(&self) -> Option<&str> {
        Some("mcp")
    }

    fn say(&self, what: Said) {
        if self.cancelled() {
            return;
        }
        let notification = self.translator.borrow_mut().progress(&what);
        if let Some(n) = notification {
            (self.deliver)(n, false);
        }
    }

    fn answer(&self, answer: &Answer) {
        if !self.cancelled() {
            (self.deliver)(self.translator.borrow().answer(answer), true);
        }
    }

    fn fail(&self, code: ErrorCode, message: &str, retry_after_ms: Option<u64>) {
        if !self.cancelled() {
            (self.deliver)(
                self.translator.borrow().fail(code, message, retry_after_ms),
                true,
            );
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.cancelled()
    }

    fn until_cancelled(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(self.cancel.until())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_events_become_progress_and_results() {
        let mut t = Translator::new("3".into(), Some("\"tok\"".into()));
        let n = t
            .progress(&Said::Piece {
                field: "chunk",
                text: "Hel",
            })
            .unwrap();
        assert!(
            n.contains(r#""progressToken":"tok","progress":1,"message":"Hel""#),
            "{n}"
        );
        let d = t.answer(&Answer {
            text: "Hello",
            tool_calls: &[],
            finish_reason: None,
            provider: "p",
            model: "m",
            usage: Default::default(),
        });
        assert!(
            d.starts_with(
                r#"{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"Hello"}]"#
            ),
            "{d}"
        );
        let e = t.fail(ErrorCode::RateLimited, "slow down", Some(250));
        assert!(
            e.contains(r#""isError":true"#)
                && e.contains(r#""retry_after_ms":250"#)
                && e.contains("RATE_LIMITED"),
            "{e}"
        );
        let mut silent = Translator::new("4".into(), None);
        assert_eq!(silent.progress(&Said::Waiting("x")), None);
    }
}
