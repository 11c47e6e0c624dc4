//! MCP's Streamable HTTP transport at `/mcp`: one JSON-RPC message per
//! `POST`, answered with JSON, or for `tools/call` with an SSE stream
//! (progress notifications, then the result) when the client accepts one.
//! `DELETE` ends a session. `GET` opens the session's server-to-client
//! stream (one per session); hivegate sends nothing unasked today, so it
//! stays open and silent until the session ends or the client leaves.
//!
//! Admission (`request.rs`) is the WebSocket's; every message passes the
//! three rate limits, and a tool call takes the same in-flight slots. A
//! client that hangs up cancels its call.

use super::http::{Head, Response};
use super::request::{self, Admitted};
use super::tls::Socket;
use super::Gateway;
use crate::auth::Identity;
use crate::mcp::{self, code, Handled, Message};
use crate::ops::metrics::inc;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

/// Progress notifications waiting for a slow reader; past it the oldest
/// ones are dropped (the result never is).
const MAX_QUEUED: usize = 256;

/// The methods `/mcp` takes.
pub const METHODS: &[&str] = &["GET", "POST", "DELETE"];

fn json(status: u16, body: String) -> Response {
    Response::new(status, "application/json", body)
}

/// Answers an admitted request; for a streamed tool call, for as long as
/// the call runs.
pub(super) async fn answer(
    gw: &Rc<Gateway>,
    a: &Admitted,
    stream: &mut Socket,
    ip: IpAddr,
) -> Option<Response> {
    inc(&gw.metrics.mcp_requests);
    let now = Instant::now();
    let session_id = a.head.mcp_session.as_deref();
    // Without a token (open mode) the session's own guest, or for a new
    // session a new one: no two guests share a name or a rate bucket.
    let who: Rc<Identity> = match &a.who {
        Some(w) => w.clone(),
        None => session_id
            .and_then(|sid| gw.mcp.borrow().anonymous_guest(sid))
            .unwrap_or_else(|| Rc::new(Identity::guest(None))),
    };
    let user = who.user.clone();
    if a.head.method == "DELETE" {
        let Some(id) = session_id else {
            return Some(Response::text(400, "DELETE needs an Mcp-Session-Id\n"));
        };
        let mut sessions = gw.mcp.borrow_mut();
        let mine = sessions.touch(id, &user, now).is_some();
        return Some(if mine && sessions.close(id) {
            Response::text(200, "session ended\n")
        } else {
            Response::text(404, "no such session\n")
        });
    }
    if a.head.method == "GET" {
        return stream_for(gw, a, &user, stream, now).await;
    }
    if let Some(v) = &a.head.mcp_version {
        if !mcp::VERSIONS.contains(&v.as_str()) {
            let msg = format!(
                "unsupported MCP-Protocol-Version {v:?}; this server speaks {}",
                mcp::VERSIONS.join(", ")
            );
            return Some(json(
                400,
                mcp::error(None, code::INVALID_REQUEST, &msg, None),
            ));
        }
    }
    let message = match mcp::parse(&a.body) {
        Ok(m) => m,
        Err(e) => {
            inc(&gw.metrics.invalid_requests);
            return Some(json(
                400,
                mcp::error(e.id.as_deref(), e.code, &e.message, None),
            ));
        }
    };
    // Every message passes the rate limits, as a frame on /ws does.
    let limited = gw.rate_check(now, ip, &user).err();
    let caller = |who: Rc<Identity>| crate::llm::Caller {
        grant: gw.live.borrow().rules.llm(&who),
        who,
    };
    if matches!(&message, Message::Request { method, .. } if method == "initialize") {
        let ctx = mcp::Ctx {
            llm: &gw.llm,
            calls: &mut Default::default(),
            caller: caller(who.clone()),
            limited,
        };
        let (answer, version) = match mcp::handle(message, ctx) {
            Handled::Initialized(answer, version) => (answer, version),
            // Refused by the rate limits: no session.
            Handled::Answer(answer) => return Some(json(200, answer)),
            Handled::Nothing | Handled::Call(_) => return Some(Response::text(202, "")),
        };
        // A user's quota is theirs; guests share their address's.
        let owner: Rc<str> = match &a.who {
            Some(w) => w.user.clone(),
            None => Rc::from(format!("ip:{}", crate::limit::ip_group(ip))),
        };
        let sid = gw
            .mcp
            .borrow_mut()
            .open(who.clone(), a.who.is_none(), owner, version, now);
        gw.log.info(
            "mcp session opened",
            &[("ip", &ip), ("user", &user.to_string())],
        );
        return Some(json(200, answer).header("Mcp-Session-Id", sid));
    }
    // Everything else belongs to a session; a notification without one
    // is accepted and has nothing to act on.
    let handled = {
        let mut sessions = gw.mcp.borrow_mut();
        let session = session_id.and_then(|sid| sessions.touch(sid, &user, now));
        match (session, message) {
            (Some(s), message) => {
                // The session's own identity: its refusals are logged once.
                let caller = caller(s.who.clone());
                let ctx = mcp::Ctx {
                    llm: &gw.llm,
                    calls: &mut s.calls,
                    caller,
                    limited,
                };
                mcp::handle(message, ctx)
            }
            (None, Message::Request { id, .. }) => {
                let (status, msg) = match session_id {
                    None => (400, "send the Mcp-Session-Id that initialize returned"),
                    Some(_) => (
                        404,
                        "no such session (it ended or expired): initialize again",
                    ),
                };
                return Some(json(
                    status,
                    mcp::error(Some(&id), code::INVALID_REQUEST, msg, None),
                ));
            }
            (None, _) => Handled::Nothing,
        }
    };
    match handled {
        Handled::Nothing => Some(Response::text(202, "")),
        Handled::Answer(answer) | Handled::Initialized(answer, _) => Some(json(200, answer)),
        Handled::Call(started) => {
            let sid = session_id.unwrap_or_default();
            call_tool(gw, sid, &a.head, started, stream).await
        }
    }
}

/// `GET`: the session's server-to-client stream, held open (and silent)
/// until the session ends or the client hangs up.
async fn stream_for(
    gw: &Gateway,
    a: &Admitted,
    user: &str,
    stream: &mut Socket,
    now: Instant,
) -> Option<Response> {
    if !a.head.accept.contains("text/event-stream") {
        return Some(Response::text(
            406,
            "GET /mcp is an event stream: accept text/event-stream\n",
        ));
    }
    let Some(sid) = a.head.mcp_session.as_deref() else {
        return Some(Response::text(400, "GET /mcp needs an Mcp-Session-Id\n"));
    };
    let ended = {
        let mut sessions = gw.mcp.borrow_mut();
        let Some(s) = sessions.touch(sid, user, now) else {
            return Some(Response::text(404, "no such session\n"));
        };
        if s.streaming {
            return Some(Response::text(
                409,
                "this session's stream is open already\n",
            ));
        }
        s.streaming = true;
        s.ended.clone()
    };
    if request::write(stream, sse_head(sid).as_bytes()).await {
        let listener = ended.listen();
        request::unless_hung_up(stream, listener).await;
    }
    if let Some(s) = gw.mcp.borrow_mut().get_mut(sid) {
        s.streaming = false;
    }
    None
}

/// The head of an event-stream answer for session `sid`.
fn sse_head(sid: &str) -> String {
    request::sse_head(false, &format!("Mcp-Session-Id: {sid}\r\n"))
}

/// A started `tools/call`, relayed; the answer streams as SSE when the
/// client accepts it.
async fn call_tool(
    gw: &Rc<Gateway>,
    sid: &str,
    head: &Head,
    started: mcp::Started,
    stream: &mut Socket,
) -> Option<Response> {
    let streamed = head.accept.contains("text/event-stream");
    let queue = Rc::new(Queue::default());
    let (id, cancel) = (started.id.clone(), started.cancel.clone());
    let to_queue = queue.clone();
    let relay = async {
        let deliver = move |m, is_result| to_queue.push(m, is_result);
        started.run(&gw.llm, streamed, deliver).await;
        if !queue.answered.get() {
            // Cancelled (its session ended, or a `notifications/cancelled`
            // named it) while its client still waits: the request gets
            // an answer all the same, so no client hangs on it.
            let msg = "the call was cancelled before it was answered";
            queue.push(mcp::error(Some(&id), code::CANCELLED, msg, None), true);
        }
        queue.end();
    };
    let response = if streamed {
        let writer = async {
            if !request::write(stream, sse_head(sid).as_bytes()).await {
                cancel.cancel();
                return;
            }
            loop {
                let ready = queue.ready.listen();
                loop {
                    let next = queue.messages.borrow_mut().pop_front();
                    let Some(m) = next else { break };
                    let event = format!("event: message\ndata: {m}\n\n");
                    if !request::write(stream, event.as_bytes()).await {
                        // The client went away: nobody reads the answer.
                        cancel.cancel();
                        return;
                    }
                }
                if queue.done.get() {
                    return;
                }
                if request::unless_hung_up(stream, ready).await.is_none() {
                    cancel.cancel();
                    return;
                }
            }
        };
        futures_lite::future::zip(relay, writer).await;
        None
    } else {
        // A client that hangs up cancels the call; the relay then ends.
        let watch = async {
            request::hung_up(stream).await;
            cancel.cancel();
            std::future::pending::<()>().await
        };
        futures_lite::future::or(relay, watch).await;
        let last = queue.messages.borrow_mut().pop_back();
        last.map(|m| json(200, m))
    };
    forget(gw, sid, &id);
    response
}

fn forget(gw: &Gateway, sid: &str, id: &str) {
    if let Some(s) = gw.mcp.borrow_mut().get_mut(sid) {
        s.calls.remove(id);
    }
}

/// A streamed call's messages, waiting for the writer.
#[derive(Default)]
struct Queue {
    messages: RefCell<VecDeque<String>>,
    /// The result (or the error that stands for it) is in.
    answered: Cell<bool>,
    done: Cell<bool>,
    ready: event_listener::Event,
}

impl Queue {
    fn push(&self, m: String, is_result: bool) {
        let mut q = self.messages.borrow_mut();
        if !is_result && q.len() >= MAX_QUEUED {
            q.pop_front();
        }
        q.push_back(m);
        drop(q);
        self.answered.set(self.answered.get() || is_result);
        self.ready.notify(usize::MAX);
    }

    fn end(&self) {
        self.done.set(true);
        self.ready.notify(usize::MAX);
    }
}
