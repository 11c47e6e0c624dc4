//! MCP's Streamable HTTP transport at `/mcp`: one JSON-RPC message per
//! `POST`, answered with JSON, or for `tools/call` with an SSE stream
//! (progress notifications, then the result) when the client accepts one.
//! `DELETE` ends a session. `GET` opens the session's server-to-client
//! stream (one per session); hivegate sends nothing unasked today, so it
//! stays open and silent until the session ends or the client leaves.
//!
//! Admission is the WebSocket's: the request is read under the handshake
//! deadline and caps, the `Origin` is checked against the allowed ones
//! (the spec's DNS-rebinding defence), the token comes as `Authorization:
//! Bearer` (open mode as for `/ws`), every message passes the three rate
//! limits, and a tool call takes the same in-flight slots. Each response
//! closes its connection: no idle keep-alive sockets to bound.

use super::http::{Head, Response};
use super::tls::Socket;
use super::Gateway;
use crate::auth::Identity;
use crate::mcp::{self, code, Handled, Message};
use crate::ops::metrics::{inc, Refusal};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

/// Progress notifications waiting for a slow reader; past it the oldest
/// ones are dropped (the result never is).
const MAX_QUEUED: usize = 256;

/// A request that passed admission, with its body.
pub struct Admitted {
    head: Head,
    body: String,
    /// `None`: open mode without a token (a guest, per session).
    who: Option<Rc<Identity>>,
}

fn json(status: u16, body: String) -> Response {
    Response::new(status, "application/json", body)
}

/// In the handshake phase: method, drain, origin, token, body.
pub async fn admit(
    gw: &Gateway,
    head: Head,
    leftover: Vec<u8>,
    stream: &mut Socket,
    ip: IpAddr,
) -> Result<Admitted, Response> {
    let refuse = |why: Refusal, r: Response| {
        gw.metrics.refused(why);
        r
    };
    if !matches!(head.method.as_str(), "POST" | "DELETE" | "GET") {
        return Err(Response::text(
            405,
            "MCP: POST a JSON-RPC message, GET the session's stream, or DELETE a session\n",
        )
        .header("Allow", "GET, POST, DELETE"));
    }
    if gw.draining.get() {
        return Err(refuse(
            Refusal::Draining,
            Response::text(503, "shutting down\n"),
        ));
    }
    if !gw.live.borrow().origin_allowed(head.origin.as_deref()) {
        return Err(refuse(
            Refusal::Origin,
            Response::text(403, "origin not allowed\n"),
        ));
    }
    gw.sign_in_cooldown(ip)?;
    let who = match &head.bearer {
        Some(t) => Some(gw.sign_in_or_401(ip, t)?),
        None if gw.live.borrow().mode == crate::auth::AuthMode::Open => None,
        None => {
            gw.failed_sign_in(ip, "missing token");
            return Err(refuse(
                Refusal::Unauthorized,
                Response::text(401, "send Authorization: Bearer TOKEN\n")
                    .header("WWW-Authenticate", "Bearer"),
            ));
        }
    };
    if head.method != "POST" {
        return Ok(Admitted {
            head,
            body: String::new(),
            who,
        });
    }
    if head.chunked {
        return Err(Response::text(411, "send the body with a Content-Length\n"));
    }
    let Some(len) = head.content_length else {
        return Err(Response::text(411, "send the body with a Content-Length\n"));
    };
    if len > gw.cfg.server.max_message_bytes {
        return Err(Response::text(
            413,
            format!(
                "a message may have at most {} bytes\n",
                gw.cfg.server.max_message_bytes
            ),
        ));
    }
    let mut body = leftover;
    body.truncate(len);
    if body.len() < len {
        let have = body.len();
        body.resize(len, 0);
        if stream.read_exact(&mut body[have..]).await.is_err() {
            return Err(Response::text(400, "the body ended early\n"));
        }
    }
    let body = String::from_utf8(body).map_err(|_| {
        refuse(
            Refusal::BadRequest,
            Response::text(400, "the body is not UTF-8\n"),
        )
    })?;
    Ok(Admitted { head, body, who })
}

/// Answers an admitted request; for a streamed tool call, for as long as
/// the call runs.
pub async fn serve(gw: &Rc<Gateway>, a: Admitted, mut stream: Socket, ip: IpAddr) {
    inc(&gw.metrics.mcp_requests);
    // A request (a stream above all) holds a place under the same caps as
    // a WebSocket, for as long as it is served.
    let held = gw.table.borrow_mut().hold(ip);
    let response = match held {
        Ok(()) => answer(gw, &a, &mut stream, ip).await,
        Err(full) => Some(gw.cap_refusal(full, ip)),
    };
    if let Some(r) = response {
        r.send(&mut stream).await;
    }
    let _ = stream.close().await;
    if held.is_ok() {
        gw.table.borrow_mut().release(ip);
    }
}

async fn answer(
    gw: &Rc<Gateway>,
    a: &Admitted,
    stream: &mut Socket,
    ip: IpAddr,
) -> Option<Response> {
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
    if stream.write_all(sse_head(sid).as_bytes()).await.is_ok() && stream.flush().await.is_ok() {
        let listener = ended.listen();
        // Whatever the client sends is read and dropped; its end ends this.
        let hung_up = async {
            let mut buf = [0u8; 256];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        futures_lite::future::or(listener, hung_up).await;
    }
    if let Some(s) = gw.mcp.borrow_mut().get_mut(sid) {
        s.streaming = false;
    }
    None
}

/// The head of an event-stream answer for session `sid`.
fn sse_head(sid: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\nX-Content-Type-Options: nosniff\r\nMcp-Session-Id: {sid}\r\n\r\n"
    )
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
        queue.end();
    };
    let response = if streamed {
        let ok = stream.write_all(sse_head(sid).as_bytes()).await.is_ok();
        let writer = async {
            if !ok {
                cancel.cancel();
                return;
            }
            loop {
                let ready = queue.ready.listen();
                loop {
                    let next = queue.messages.borrow_mut().pop_front();
                    let Some(m) = next else { break };
                    let event = format!("event: message\ndata: {m}\n\n");
                    if stream.write_all(event.as_bytes()).await.is_err()
                        || stream.flush().await.is_err()
                    {
                        // The client went away: nobody reads the answer.
                        cancel.cancel();
                        return;
                    }
                }
                if queue.done.get() || cancel.cancelled() {
                    return;
                }
                ready.await;
            }
        };
        futures_lite::future::zip(relay, writer).await;
        None
    } else {
        relay.await;
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
        self.ready.notify(usize::MAX);
    }

    fn end(&self) {
        self.done.set(true);
        self.ready.notify(usize::MAX);
    }
}
