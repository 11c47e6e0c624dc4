//! The tool requests of one connection: `call_tool` and `cancel`. A call
//! runs in its own task (returned to the caller to spawn); a repeat of a
//! `request_id` in flight shares its answer; `cancel`, or the connection's
//! end, stops it and nothing more is sent for it.

use super::{answer_frame, said_frame, Answer, Call, Caller, Llm, Output, Said};
use crate::hub::{Reply, Task, MAX_IN_FLIGHT};
use crate::json::JsonOut;
use crate::protocol::ErrorCode;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a call in flight when the gateway shuts down is told.
pub const SHUTTING_DOWN: &str = "the gateway is shutting down; call again once reconnected";

/// Most repeats of one call's `request_id` that share its answer (each one
/// is an answer frame more when it ends).
pub const MAX_FOLLOWERS: u32 = 8;

/// A tool call in flight: its cancel flag (shared with the pool thread that
/// reads the upstream) and how many more askers share its answer.
#[derive(Default)]
struct CallState {
    switch: Cancel,
    followers: Cell<u32>,
}

impl CallState {
    fn cancel(&self) {
        self.switch.cancel();
    }
}

/// A tool call's cancel switch: the flag the pool thread reading the
/// upstream checks, and a wake-up for the relay waiting on it.
#[derive(Default)]
pub struct Cancel {
    pub flag: Arc<AtomicBool>,
    wake: event_listener::Event,
}

impl Cancel {
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.wake.notify(usize::MAX);
    }

    pub fn cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Resolves once cancelled (for [`Output::until_cancelled`]).
    pub async fn until(&self) {
        loop {
            let listener = self.wake.listen();
            if self.cancelled() {
                return;
            }
            listener.await;
        }
    }
}

/// Where a tool call's frames go.
struct CallOutput {
    reply: Reply,
    state: Rc<CallState>,
    /// Streamed text held back while the client's outbox is past half
    /// full (a fast provider outruns a slow reader): joined, and sent as
    /// one chunk once there is room. What is still held at the end is
    /// dropped: the result carries the whole answer.
    held: RefCell<(&'static str, String)>,
}

impl CallOutput {
    /// Sends the held text, when there is room for it.
    fn release(&self) {
        let mut held = self.held.borrow_mut();
        let (field, text) = &mut *held;
        // The text's length first, to render only what may go.
        if text.is_empty() || !self.reply.has_room(text.len()) {
            return;
        }
        let piece = Said::Piece { field, text };
        if let Some(frame) = said_frame(self.reply.rid(), &piece) {
            if self.reply.has_room(frame.len()) {
                text.clear();
                self.reply.send(frame);
            }
        }
    }
}

impl Output for CallOutput {
    fn rid(&self) -> Option<&str> {
        self.reply.rid()
    }

    fn say(&self, what: Said) {
        if self.cancelled() {
            return;
        }
        if let Said::Piece { field, text } = what {
            if self.held.borrow().0 != field {
                // Another kind of piece: what was held goes first, or, when
                // it cannot, gives way (reasoning comes before the answer).
                self.release();
                self.held.borrow_mut().1.clear();
            }
            {
                let mut held = self.held.borrow_mut();
                held.0 = field;
                held.1.push_str(text);
            }
            return self.release();
        }
        self.release();
        if let Some(frame) = said_frame(self.reply.rid(), &what) {
            self.reply.send(frame);
        }
    }

    fn answer(&self, answer: &Answer) {
        if self.cancelled() {
            return;
        }
        // Every asker of a shared call gets the answer; the later ones
        // are told it was shared.
        let followers = self.state.followers.get();
        if followers > 0 {
            let shared = answer_frame(self.reply.rid(), answer, true);
            for _ in 0..followers {
                self.reply.send(shared.clone());
            }
        }
        self.reply
            .send(answer_frame(self.reply.rid(), answer, false));
    }

    fn fail(&self, code: ErrorCode, message: &str, retry_after_ms: Option<u64>) {
        if self.cancelled() {
            return;
        }
        let frame = crate::protocol::error_frame(self.reply.rid(), code, message, retry_after_ms);
        for _ in 0..=self.state.followers.get() {
            self.reply.send(frame.clone());
        }
    }

    fn cancelled(&self) -> bool {
        self.state.switch.cancelled()
    }

    fn until_cancelled(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(self.state.switch.until())
    }
}

/// The tool calls of one connection, by `request_id` (at most
/// `llm.max_in_flight_per_session`).
#[derive(Default)]
pub struct ToolCalls {
    calls: Rc<RefCell<HashMap<String, Rc<CallState>>>>,
}

impl ToolCalls {
    /// `call_tool`: answers at once when the call is refused or shared;
    /// otherwise acknowledges it and returns the task that runs it.
    pub fn call(
        &self,
        llm: &Rc<Llm>,
        mut reply: Reply,
        in_flight: &Rc<Cell<u32>>,
        name: &str,
        call: Call,
        caller: Caller,
    ) -> Option<Task> {
        let rid = reply.rid().unwrap_or_default().to_string();
        if name != "chat" {
            let name: String = name.chars().take(32).collect();
            let msg = format!("no tool {name:?}; list_tools names them");
            reply.error(ErrorCode::NotFound, &msg, None);
            return None;
        }
        // The same request_id while it runs: share the answer, call nobody.
        if let Some(state) = self.calls.borrow().get(&rid) {
            if state.followers.get() >= MAX_FOLLOWERS {
                let msg = format!("at most {MAX_FOLLOWERS} repeats of a call in flight share it");
                reply.error(ErrorCode::LimitExceeded, &msg, None);
                return None;
            }
            state.followers.set(state.followers.get() + 1);
            reply.send(
                JsonOut::op("call_tool_ack")
                    .opt_str("request_id", reply.rid())
                    .bool("from_inflight", true)
                    .finish(),
            );
            return None;
        }
        if let Err(r) = llm.check(&call, &caller) {
            reply.error(r.code, &r.message, r.retry_after_ms);
            return None;
        }
        let per_session = llm.max_in_flight_per_session();
        if self.calls.borrow().len() >= per_session as usize {
            let msg = format!("at most {per_session} tool calls in flight per connection");
            reply.error(ErrorCode::OverCapacity, &msg, Some(1000));
            return None;
        }
        let Some(slot) = llm.try_start() else {
            let msg = "the gateway is at its limit of tool calls";
            reply.error(ErrorCode::OverCapacity, msg, Some(1000));
            return None;
        };
        if !reply.begin(in_flight, MAX_IN_FLIGHT) {
            return None;
        }
        let state = Rc::new(CallState::default());
        self.calls.borrow_mut().insert(rid.clone(), state.clone());
        reply.send(
            JsonOut::op("call_tool_ack")
                .opt_str("request_id", reply.rid())
                .finish(),
        );
        let (calls, llm) = (self.calls.clone(), llm.clone());
        Some(Box::pin(async move {
            let _slot = slot;
            let out = CallOutput {
                reply,
                state: state.clone(),
                held: RefCell::new(("chunk", String::new())),
            };
            llm.run(call, &caller, &out).await;
            let mut calls = calls.borrow_mut();
            if calls.get(&rid).is_some_and(|s| Rc::ptr_eq(s, &state)) {
                calls.remove(&rid);
            }
        }))
    }

    /// `cancel`: stops the call with the reply's `request_id`.
    pub fn cancel(&self, reply: Reply) {
        let state = self
            .calls
            .borrow_mut()
            .remove(reply.rid().unwrap_or_default());
        match state {
            Some(state) => {
                state.cancel();
                reply.send(
                    JsonOut::op("cancelled")
                        .opt_str("request_id", reply.rid())
                        .finish(),
                );
            }
            None => reply.error(
                ErrorCode::NotFound,
                "no tool call in flight with that request_id",
                None,
            ),
        }
    }

    /// The gateway is shutting down: every call stops, and each of its
    /// askers is told so (`reply` for each `request_id`) before the close.
    pub fn shut_down(&self, reply: impl Fn(&str) -> Reply) {
        for (rid, call) in self.calls.borrow_mut().drain() {
            call.cancel();
            let reply = reply(&rid);
            for _ in 0..=call.followers.get() {
                reply.error(ErrorCode::OverCapacity, SHUTTING_DOWN, Some(1000));
            }
        }
    }

    /// The connection is gone: nobody is left to read an answer.
    pub fn cancel_all(&self) {
        for (_, call) in self.calls.borrow_mut().drain() {
            call.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Table;
    use crate::llm::{LlmConfig, ProviderConfig};
    use crate::ops::log::Logger;
    use serde_json::Value;
    use std::net::IpAddr;
    use std::time::{Duration, Instant};

    /// An Llm with one provider that is never reached: these tests stop
    /// before a call's task runs.
    fn llm() -> Rc<Llm> {
        let provider = ProviderConfig {
            name: "kimi".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            model: "m".into(),
            max_in_flight: 4,
            total_timeout: Duration::from_secs(1),
            fail_max: 4,
            ..ProviderConfig::default()
        };
        let cfg = LlmConfig {
            chain: vec!["kimi".into()],
            max_in_flight: 8,
            max_in_flight_per_session: 2,
            max_prompt_bytes: 100,
            providers: vec![provider],
            ..LlmConfig::default()
        };
        let log = Logger::new(Default::default(), Default::default());
        Rc::new(Llm::new(&cfg, log, Default::default(), &crate::ca::no_roots()).unwrap())
    }

    struct Conn {
        table: Rc<RefCell<Table>>,
        key: usize,
        in_flight: Rc<Cell<u32>>,
        tools: ToolCalls,
    }

    impl Conn {
        fn new() -> Conn {
            let table = Rc::new(RefCell::new(Table::new(2, 2, 64, 1 << 20)));
            let ip = IpAddr::from([127, 0, 0, 1]);
            let key = table.borrow_mut().insert(ip, 1, Instant::now()).unwrap();
            Conn {
                table,
                key,
                in_flight: Rc::default(),
                tools: ToolCalls::default(),
            }
        }

        fn reply(&self, rid: &str) -> Reply {
            Reply::new(self.table.clone(), self.key, 1, Some(rid))
        }

        fn call(&self, llm: &Rc<Llm>, rid: &str, name: &str, content: &str) -> Option<Task> {
            let call = Call {
                messages: vec![crate::protocol::Turn {
                    role: "user".into(),
                    content: content.into(),
                    tool_call_id: None,
                    tool_calls: None,
                }],
                provider: None,
                model: None,
                stream: true,
                options: None,
            };
            let caller = crate::llm::Caller::unrestricted("alice");
            self.tools
                .call(llm, self.reply(rid), &self.in_flight, name, call, caller)
        }

        fn frames(&self) -> Vec<Value> {
            let mut table = self.table.borrow_mut();
            let outbox = &mut table.get_mut(self.key).unwrap().outbox;
            std::iter::from_fn(|| outbox.pop())
                .map(|f| serde_json::from_str(f.text()).unwrap())
                .collect()
        }
    }

    #[test]
    fn calls_are_checked_acked_and_bounded_per_connection() {
        let (llm, c) = (llm(), Conn::new());
        assert!(c.call(&llm, "a", "weather", "hi").is_none());
        assert!(c.call(&llm, "b", "chat", &"x".repeat(101)).is_none());
        let errors: Vec<Value> = c
            .frames()
            .iter()
            .map(|f| f["error"]["code"].clone())
            .collect();
        assert_eq!(errors, ["NOT_FOUND", "INVALID_REQUEST"]);
        let first = c.call(&llm, "c1", "chat", "hi");
        let second = c.call(&llm, "c2", "chat", "hi");
        assert!(first.is_some() && second.is_some());
        assert!(
            c.call(&llm, "c3", "chat", "hi").is_none(),
            "two per connection"
        );
        let frames = c.frames();
        assert_eq!(frames[0]["op"], "call_tool_ack");
        assert_eq!(frames[2]["error"]["code"], "OVER_CAPACITY");
        assert_eq!(c.in_flight.get(), 2);
        drop((first, second));
        assert_eq!(c.in_flight.get(), 0, "a dropped call frees its place");
    }

    #[test]
    fn repeats_share_a_call_up_to_a_bound_and_cancel_stops_it() {
        let (llm, c) = (llm(), Conn::new());
        let task = c.call(&llm, "same", "chat", "hi");
        assert!(task.is_some());
        for _ in 0..MAX_FOLLOWERS + 2 {
            assert!(c.call(&llm, "same", "chat", "hi").is_none());
        }
        let frames = c.frames();
        let shared = frames.iter().filter(|f| f["from_inflight"] == true).count();
        assert_eq!(shared, MAX_FOLLOWERS as usize);
        assert_eq!(frames.last().unwrap()["error"]["code"], "LIMIT_EXCEEDED");
        c.tools.cancel(c.reply("same"));
        assert_eq!(c.frames()[0]["op"], "cancelled");
        c.tools.cancel(c.reply("same"));
        assert_eq!(c.frames()[0]["error"]["code"], "NOT_FOUND");
        // A new call under the same id is a new call.
        assert!(c.call(&llm, "same", "chat", "hi").is_some());
        c.tools.cancel_all();
        assert!(c.tools.calls.borrow().is_empty());
    }
}
