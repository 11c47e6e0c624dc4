//! The session on top of the socket: `hello` and who the client is, the
//! rate limits every request passes, invalid frames, and the dispatch of a
//! request to its handler (chat requests in `chat`, tool calls in `llm`).
//! Handlers answer through a [`Reply`]; one that must end the connection
//! returns `Err(Close::..)`.

use super::{Conn, Session};
use crate::access::Action;
use crate::auth::Identity;
use crate::chat::{Asker, Rights};
use crate::hub::{Reply, Task};
use crate::json::JsonOut;
use crate::limit::Refused;
use crate::llm::ToolCalls;
use crate::ops::metrics::inc;
use crate::protocol::{self, Close, ErrorCode, Request};
use std::rc::Rc;
use std::time::Instant;

impl Conn {
    pub(super) fn on_text(&mut self, text: &str, now: Instant) -> Result<(), Close> {
        if let Some(calls) = self.mcp.clone() {
            return self.on_mcp(calls, text, now);
        }
        let parsed = protocol::parse(text);
        // Every request of a session passes the rate limits before it costs
        // anything more than its parse (which is what finds the request_id
        // to answer with). `hello` itself is paid for by the connection rate.
        if let Some(session) = &self.session {
            let checked = self.gw.rate_check(now, self.slot.ip, &session.who.user);
            if let Err(refused) = checked {
                let rid = match &parsed {
                    Ok(e) => e.request_id.as_deref(),
                    Err(e) => e.request_id.as_deref(),
                };
                return self.rate_limited(rid, refused, now);
            }
        }
        let envelope = match parsed {
            Ok(e) => e,
            Err(e) => {
                // A well-formed frame that is not `hello` is another
                // protocol talking to us.
                if self.session.is_none() && !e.malformed {
                    return Err(Close::UnknownProtocol);
                }
                return self.invalid_request(e.request_id.as_deref(), &e.message);
            }
        };
        let rid = envelope.request_id.as_deref();
        match (&self.session, envelope.request) {
            (
                None,
                Request::Hello {
                    token,
                    client,
                    client_id,
                },
            ) => self.hello(
                rid,
                token.as_deref(),
                client.as_deref(),
                client_id.as_deref(),
            ),
            (None, _) => Err(Close::UnknownProtocol),
            (Some(_), Request::Hello { .. }) => {
                self.invalid_request(rid, "hello was already accepted on this connection")
            }
            (Some(_), Request::Ping) => {
                self.send(JsonOut::op("pong").opt_str("request_id", rid).finish());
                Ok(())
            }
            (Some(_), Request::Chat(request)) => {
                let (gw, asker, reply) = (self.gw.clone(), self.asker(), self.reply(rid));
                let task = gw.requests.handle(&gw.store, &asker, reply, request, self);
                self.spawn(task)
            }
            (Some(_), Request::ListTools) => {
                self.send(self.gw.llm.list_tools(rid));
                Ok(())
            }
            (Some(_), Request::CallTool { name, call }) => {
                let (reply, caller) = (self.reply(rid), self.caller());
                let tools = self.tools.get_or_insert_with(ToolCalls::default);
                let task = tools.call(&self.gw.llm, reply, &self.in_flight, &name, call, caller);
                self.spawn(task)
            }
            (Some(_), Request::Cancel) => {
                let reply = self.reply(rid);
                self.tools
                    .get_or_insert_with(ToolCalls::default)
                    .cancel(reply);
                Ok(())
            }
        }
    }

    /// Answers `RATE_LIMITED`; the connection stays open unless the client
    /// keeps hammering past the abuse threshold.
    fn rate_limited(
        &mut self,
        rid: Option<&str>,
        refused: Refused,
        now: Instant,
    ) -> Result<(), Close> {
        let message = format!("too many requests ({} limit)", refused.level.label());
        self.send(protocol::error_frame(
            rid,
            ErrorCode::RateLimited,
            &message,
            Some(refused.retry_after_ms()),
        ));
        self.refused(now)
    }

    fn invalid_request(&mut self, rid: Option<&str>, message: &str) -> Result<(), Close> {
        inc(&self.gw.metrics.invalid_requests);
        self.send(protocol::error_frame(
            rid,
            ErrorCode::InvalidRequest,
            message,
            None,
        ));
        self.strike()
    }

    fn hello(
        &mut self,
        rid: Option<&str>,
        token: Option<&str>,
        client: Option<&str>,
        client_id: Option<&str>,
    ) -> Result<(), Close> {
        let gw = self.gw.clone();
        // In open mode a token that signs nobody in makes a guest, told so
        // in its `hello_ack` (and no failed sign-in: anyone may be a guest).
        let mut token_ignored = false;
        let signed = match (token, &self.preauth) {
            (Some(t), _) => {
                let live = gw.live.borrow();
                live.sign_in(t).map(Rc::new).or_else(|reason| {
                    let guest = live.anonymous(client_id).map(Rc::new).ok_or(reason);
                    token_ignored = guest.is_ok();
                    guest
                })
            }
            (None, Some(who)) => Ok(who.clone()),
            (None, None) => gw
                .live
                .borrow()
                .anonymous(client_id)
                .map(Rc::new)
                .ok_or("missing token"),
        };
        let who: Rc<Identity> = match signed {
            Ok(who) => who,
            Err(reason) => {
                gw.limits
                    .borrow_mut()
                    .note_failed_hello(Instant::now(), self.slot.ip);
                gw.log.info(
                    "hello refused",
                    &[("conn", &self.slot.id), ("reason", &reason)],
                );
                self.send(
                    JsonOut::op("hello_ack")
                        .opt_str("request_id", rid)
                        .bool("ok", false)
                        .str("error", "unauthorized")
                        .finish(),
                );
                return Err(Close::Unauthorized);
            }
        };
        let user = who.user.clone();
        let session_id = format!("{:016x}{:x}", crate::resilience::random_u64(), self.slot.id);
        let user_bucket = gw.limits.borrow().params().user;
        let limits = JsonOut::new()
            .num("max_message_bytes", gw.cfg.server.max_message_bytes as u64)
            .float("rate_per_s", user_bucket.refill_per_s)
            .float("burst", user_bucket.capacity)
            .finish();
        self.send(
            JsonOut::op("hello_ack")
                .opt_str("request_id", rid)
                .bool("ok", true)
                .str("session_id", &session_id)
                .str("user", &user)
                .opt_str(
                    "notice",
                    token_ignored.then_some(
                        "the token signs nobody in: this session is a guest (open mode)",
                    ),
                )
                .str("server", concat!("hivegate/", env!("CARGO_PKG_VERSION")))
                .raw("limits", &limits)
                .finish(),
        );
        gw.log.info(
            "hello",
            &[
                ("conn", &self.slot.id),
                ("user", &user),
                ("client", &client.unwrap_or("-").to_string()),
            ],
        );
        if let Some(e) = gw.table.borrow_mut().get_mut(self.slot.key) {
            e.who = Some(who.clone());
        }
        self.session = Some(Session::new(who));
        Ok(())
    }

    fn user(&self) -> Rc<str> {
        self.session
            .as_ref()
            .map_or_else(|| Rc::from("-"), |s| s.who.user.clone())
    }

    /// This session as the LLM relay sees it.
    pub(super) fn caller(&self) -> crate::llm::Caller {
        match &self.session {
            Some(s) => crate::llm::Caller {
                who: s.who.clone(),
                grant: self.gw.live.borrow().rules.llm(&s.who),
            },
            None => crate::llm::Caller {
                grant: Err(crate::access::Denied::NoRule),
                ..crate::llm::Caller::unrestricted("-")
            },
        }
    }

    /// Where the answers to a request of this connection go.
    pub(super) fn reply(&self, rid: Option<&str>) -> Reply {
        Reply::new(self.gw.table.clone(), self.slot.key, self.slot.id, rid)
    }

    /// This connection as the chat sees it.
    fn asker(&self) -> Asker {
        Asker {
            key: self.slot.key,
            conn: self.slot.id,
            user: self.user(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// Runs a request's remaining work on the event loop.
    fn spawn(&self, task: Option<Task>) -> Result<(), Close> {
        if let Some(task) = task {
            self.gw.spawn(task);
        }
        Ok(())
    }
}

impl Rights for Conn {
    /// Whether the access rules let this session do `action` in `room`.
    fn may(&self, room: &str, action: Action) -> bool {
        self.session.as_ref().is_some_and(|s| {
            self.gw
                .live
                .borrow()
                .rules
                .room(&s.who, room, action)
                .is_ok()
        })
    }

    /// Answers `FORBIDDEN` when not: counted by action, logged once per
    /// session and rule.
    fn allowed(&mut self, rid: Option<&str>, room: &str, action: Action) -> bool {
        let Some(s) = &self.session else {
            return false;
        };
        let Err(denied) = self.gw.live.borrow().rules.room(&s.who, room, action) else {
            return true;
        };
        self.gw.metrics.denied(action.denial());
        if s.who.first_refusal(denied.slot()) {
            self.gw.log.info(
                "access denied",
                &[
                    ("conn", &self.slot.id),
                    ("user", &s.who.user),
                    ("action", &action.label()),
                    ("room", &room.to_string()),
                    ("why", &denied.describe()),
                ],
            );
        }
        let msg = format!(
            "you may not {} room {room}: {}",
            action.label(),
            denied.describe()
        );
        self.send(protocol::error_frame(rid, ErrorCode::Forbidden, &msg, None));
        false
    }

    fn ruled(&self) -> bool {
        !self.gw.live.borrow().rules.is_empty()
    }
}
