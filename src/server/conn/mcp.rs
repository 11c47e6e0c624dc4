//! MCP over the WebSocket: a client that upgrades `/ws` with the `mcp`
//! subprotocol speaks JSON-RPC instead of the `op` protocol. The
//! connection is the session (no `hello`: the user comes from the upgrade's
//! `Authorization: Bearer`, or open mode); messages pass the same rate
//! limits, and tool calls take the same slots, as on the other transports.
//! What a message means is `mcp::handle`'s; this is only the carrying.

use super::Conn;
use crate::hub::MAX_IN_FLIGHT;
use crate::limit::InFlight;
use crate::llm::SHUTTING_DOWN;
use crate::mcp::{self, Cancel, Handled, Started};
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
        let limited = self.gw.rate_check(now, self.slot.ip, &user).err();
        let message = match mcp::parse(text) {
            Ok(m) => m,
            Err(e) => {
                inc(&self.gw.metrics.invalid_requests);
                self.send(mcp::error(e.id.as_deref(), e.code, &e.message, None));
                return self.strike();
            }
        };
        if limited.is_some() {
            self.refused(now)?;
        }
        let caller = self.caller();
        let handled = mcp::handle(
            message,
            mcp::Ctx {
                llm: &self.gw.llm,
                calls: &mut calls.borrow_mut(),
                caller,
                limited,
            },
        );
        match handled {
            Handled::Nothing => {}
            Handled::Answer(a) | Handled::Initialized(a, _) => self.send(a),
            Handled::Call(started) => self.run_mcp_call(calls, started),
        }
        Ok(())
    }

    /// Runs a started `tools/call` in its own task, under this
    /// connection's cap of requests in flight.
    fn run_mcp_call(&mut self, calls: Calls, started: Started) {
        let Some(held) = InFlight::try_take(&self.in_flight, MAX_IN_FLIGHT) else {
            calls.borrow_mut().remove(&started.id);
            let msg = "too many requests in flight on this connection";
            let refusal = mcp::tool_error("OVER_CAPACITY", msg, Some(1000));
            self.send(mcp::result(&started.id, &refusal));
            return;
        };
        let llm = self.gw.llm.clone();
        let reply = self.reply(None);
        let (id, cancel) = (started.id.clone(), started.cancel.clone());
        self.gw.spawn(Box::pin(async move {
            let _held = held;
            // Progress is dropped while the client's outbox is past half
            // full (the result carries the whole answer), so a fast
            // provider never makes the gateway's own client a slow
            // consumer.
            let deliver = move |m: String, is_result| {
                if is_result || reply.has_room(m.len()) {
                    reply.send(m);
                }
            };
            started.run(&llm, true, deliver).await;
            let mut calls = calls.borrow_mut();
            if calls.get(&id).is_some_and(|c| Rc::ptr_eq(c, &cancel)) {
                calls.remove(&id);
            }
        }));
    }

    /// In a shutdown: every tool call of this connection stops (its LLM
    /// slot is freed, so the drain does not wait for a long answer), and
    /// each asker gets a last answer saying so, on either protocol.
    pub(super) fn shut_down_calls(&mut self) {
        if let Some(tools) = &self.tools {
            tools.shut_down(|rid| self.reply(Some(rid)));
        }
        let Some(calls) = self.mcp.clone() else {
            return;
        };
        let refusal = mcp::tool_error("OVER_CAPACITY", SHUTTING_DOWN, Some(1000));
        for (rid, call) in calls.borrow_mut().drain() {
            call.cancel();
            self.send(mcp::result(&rid, &refusal));
        }
    }
}
