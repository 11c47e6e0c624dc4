//! MCP over the WebSocket: a client that upgrades `/ws` with the `mcp`
//! subprotocol speaks JSON-RPC instead of the `op` protocol. The
//! connection is the session (no `hello`: the user comes from the upgrade's
//! `Authorization: Bearer`, or open mode); messages pass the same rate
//! limits, and tool calls take the same slots, as on the other transports.

use super::Conn;
use crate::hub::{Reply, MAX_IN_FLIGHT};
use crate::limit::InFlight;
use crate::mcp::{self, Cancel, Message, Translator};
use crate::ops::metrics::inc;
use crate::protocol::Close;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

/// A connection's MCP calls in flight, by request id.
pub type Calls = Rc<RefCell<HashMap<String, Rc<Cancel>>>>;

impl Conn {
    pub(super) fn on_mcp(&mut self, calls: Calls, text: &str, now: Instant) -> Result<(), Close> {
        inc(&self.gw.metrics.mcp_requests_ws);
        let Some(user) = self.session.as_ref().map(|s| s.who.user.clone()) else {
            return Err(Close::Unauthorized);
        };
        let limited = self
            .gw
            .limits
            .borrow_mut()
            .check(now, self.slot.ip, &user)
            .err();
        let message = match mcp::parse(text) {
            Ok(m) => m,
            Err(e) => {
                inc(&self.gw.metrics.invalid_requests);
                self.send(mcp::error(e.id.as_deref(), e.code, &e.message, None));
                return self.strike();
            }
        };
        if let Some(r) = &limited {
            self.refused(now)?;
            if let Message::Request { id, method, .. } = &message {
                self.send(mcp::rate_limited(id, method, r));
            }
            return Ok(());
        }
        let (id, method, params) = match message {
            Message::Response => return Ok(()),
            Message::Notification { method, params } => {
                if method == "notifications/cancelled" {
                    let rid = mcp::cancelled_id(&params).unwrap_or_default();
                    if let Some(call) = calls.borrow_mut().remove(&rid) {
                        call.cancel();
                    }
                }
                return Ok(());
            }
            Message::Request { id, method, params } => (id, method, params),
        };
        let answer = match method.as_str() {
            "initialize" => mcp::result(&id, &mcp::initialize(&params).0),
            "ping" => mcp::result(&id, "{}"),
            "tools/list" => mcp::result(&id, &mcp::tools_list(&self.gw.llm)),
            "tools/call" => match self.mcp_call(calls, &id, &params) {
                Some(answer) => answer,
                None => return Ok(()),
            },
            _ => mcp::no_method(&id, &method),
        };
        self.send(answer);
        Ok(())
    }

    /// Starts a `tools/call`; returns the answer when it is refused at once.
    fn mcp_call(&mut self, calls: Calls, id: &str, params: &str) -> Option<String> {
        let Some(held) = InFlight::try_take(&self.in_flight, MAX_IN_FLIGHT) else {
            let msg = "too many requests in flight on this connection";
            return Some(mcp::result(
                id,
                &mcp::tool_error("OVER_CAPACITY", msg, Some(1000)),
            ));
        };
        let llm = self.gw.llm.clone();
        let caller = self.caller();
        let started = match mcp::start_call(&llm, &mut calls.borrow_mut(), id, params, caller) {
            Ok(s) => s,
            Err(answer) => return Some(answer),
        };
        let reply = Reply::new(self.gw.table.clone(), self.slot.key, self.slot.id, None);
        let translator = Translator::new(id.to_string(), started.token);
        let cancel = started.cancel;
        let sink = mcp::Sink::new(translator, cancel.clone(), move |m, _| reply.send(m));
        let id = id.to_string();
        let (call, slot, caller) = (started.call, started.slot, started.caller);
        self.gw.spawn(Box::pin(async move {
            let (_slot, _held) = (slot, held);
            llm.run(call, &caller, &sink).await;
            let mut calls = calls.borrow_mut();
            if calls.get(&id).is_some_and(|c| Rc::ptr_eq(c, &cancel)) {
                calls.remove(&id);
            }
        }));
        None
    }
}
