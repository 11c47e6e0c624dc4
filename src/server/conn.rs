//! One task per connection, from the upgrade to the last byte.
//!
//! The task waits on four things at once, in one `poll_fn`: a close request
//! in its table entry, frames in its outbox (written into the socket as fast
//! as it takes them), frames from the client, and one timer re-armed to the
//! nearest deadline (hello, next ping, pong). Reading never waits for
//! writing: a client that stops reading fills its bounded outbox and is
//! closed as a slow consumer, and nobody else notices.

use super::{Gateway, Slot};
use crate::auth::AuthMode;
use crate::chat::JoinError;
use crate::hub::{frame, Frame};
use crate::json::JsonOut;
use crate::limit::{InFlight, RateMeter, Refused, Strikes};
use crate::ops::metrics::{add, inc};
use crate::protocol::{self, close, ErrorCode, Request};
use crate::store::{Range, StoreError, StoredMessage, WriteOk, WriteOp};
use async_io::{Async, Timer};
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_lite::{future, FutureExt, Stream};
use futures_sink::Sink;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::TcpStream;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub type WsStream = WebSocketStream<super::intake::Intake<Async<TcpStream>>>;

/// Requests of one connection still running (store writes, history reads).
const MAX_IN_FLIGHT: u32 = 32;
/// Most repeats of one tool call's `request_id` that share its answer
/// (each one is an answer frame more when it ends).
const MAX_FOLLOWERS: u32 = 8;

/// Where the answer to a request that continues in its own task goes, and
/// its place among the connection's requests in flight (freed on drop).
struct Reply {
    gw: Rc<Gateway>,
    key: usize,
    conn: u64,
    rid: Option<String>,
    _in_flight: InFlight,
}

impl Reply {
    fn rid(&self) -> Option<&str> {
        self.rid.as_deref()
    }

    /// Queues a frame for the connection that asked, if it is still there.
    fn send(&self, text: String) {
        self.gw
            .table
            .borrow_mut()
            .deliver_to(self.key, self.conn, &frame(text));
    }

    fn fail(&self, e: &StoreError) {
        let (code, msg, retry) = store_error_parts(&self.gw, self.conn, self.rid(), e);
        self.send(protocol::error_frame(self.rid(), code, &msg, retry));
    }

    /// The store answered with the wrong kind of result: a bug, logged.
    fn unexpected(&self, answer: &WriteOk) {
        self.gw.log.warn(
            "unexpected store answer",
            &[("conn", &self.conn), ("answer", &format!("{answer:?}"))],
        );
        self.fail(&StoreError::Storage("unexpected answer".into()));
    }
}

/// A tool call in flight: its cancel flag (shared with the pool thread that
/// reads the upstream) and how many more askers share its answer.
#[derive(Default)]
struct CallState {
    cancelled: Arc<AtomicBool>,
    wake: event_listener::Event,
    followers: Cell<u32>,
}

impl CallState {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        self.wake.notify(usize::MAX);
    }
}

/// Where a tool call's frames go.
struct CallOutput {
    reply: Reply,
    state: Rc<CallState>,
}

impl crate::llm::Output for CallOutput {
    fn rid(&self) -> Option<&str> {
        self.reply.rid()
    }

    fn send(&self, frame: String) {
        if !self.cancelled() {
            self.reply.send(frame);
        }
    }

    fn finish(&self, frame: String) {
        if self.cancelled() {
            return;
        }
        // Every asker of a shared call gets the answer; the later ones
        // are told it was shared.
        for _ in 0..self.state.followers.get() {
            let shared = frame.replacen(
                "{\"op\":\"call_tool_res\",",
                "{\"op\":\"call_tool_res\",\"from_inflight\":true,",
                1,
            );
            self.reply.send(shared);
        }
        self.reply.send(frame);
    }

    fn cancelled(&self) -> bool {
        self.state.cancelled.load(Ordering::Relaxed)
    }

    fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.state.cancelled.clone()
    }

    fn until_cancelled(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(async move {
            loop {
                let listener = self.state.wake.listen();
                if self.cancelled() {
                    return;
                }
                listener.await;
            }
        })
    }
}

/// Adds `"messages"` (or `"history"`) to a direct answer, cut so that the
/// whole frame stays within half the connection's outbox: the client must
/// be able to receive its own answer whatever the messages hold. A cut
/// answer says `"more":true`; the client asks again from the seq at its
/// edge. `keep_newest` keeps the end of the list (the newest page, or the
/// page before a seq), otherwise its start (the page after a seq).
fn with_messages(
    gw: &Gateway,
    answer: JsonOut,
    key: &str,
    msgs: &[StoredMessage],
    keep_newest: bool,
) -> String {
    // The envelope, the key and `"more":true` come out of the budget.
    let budget =
        (gw.cfg.server.outbox_bytes / 2).saturating_sub(answer.byte_len() + key.len() + 32);
    let mut parts: Vec<String> = Vec::with_capacity(msgs.len());
    let mut total = 2;
    let mut take = |m: &StoredMessage| {
        let json = crate::chat::message_json(m);
        if total + json.len() + 1 > budget {
            return false;
        }
        total += json.len() + 1;
        parts.push(json);
        true
    };
    if keep_newest {
        msgs.iter().rev().take_while(|m| take(m)).for_each(drop);
        parts.reverse();
    } else {
        msgs.iter().take_while(|m| take(m)).for_each(drop);
    }
    let more = parts.len() < msgs.len();
    let answer = answer.raw(key, &format!("[{}]", parts.join(",")));
    if more {
        add(&gw.metrics.answers_cut, 1);
        answer.bool("more", true).finish()
    } else {
        answer.finish()
    }
}

/// The protocol error for a store failure. Database failures are logged
/// with the connection and request ids, and the client gets only a
/// correlation id.
fn store_error_parts(
    gw: &Gateway,
    conn: u64,
    rid: Option<&str>,
    e: &StoreError,
) -> (ErrorCode, String, Option<u64>) {
    match e {
        StoreError::Busy { retry_after_ms } => (
            ErrorCode::OverCapacity,
            "the store is busy; retry later".into(),
            Some(*retry_after_ms),
        ),
        StoreError::Timeout => (
            ErrorCode::Timeout,
            "the store did not answer in time".into(),
            None,
        ),
        StoreError::NotFound => (
            ErrorCode::NotFound,
            "no such message in your rooms".into(),
            None,
        ),
        StoreError::LimitExceeded(m) => (ErrorCode::LimitExceeded, (*m).into(), None),
        StoreError::Storage(m) => {
            gw.log.warn(
                "store failed",
                &[
                    ("conn", &conn),
                    ("request_id", &rid.unwrap_or("-")),
                    ("error", m),
                ],
            );
            (
                ErrorCode::InternalError,
                format!(
                    "internal error (conn {conn}, request {})",
                    rid.unwrap_or("-")
                ),
                None,
            )
        }
    }
}

/// Messages handled in one turn of the event loop before the task yields
/// (the intake bounds the bytes; this bounds the work).
const TURN_MESSAGES: u32 = 64;
/// Pings and pongs a client may send in 10 s; past it, close 1008. A
/// client needs one pong per server ping and a ping now and then.
const MAX_CONTROL_PER_10S: u64 = 100;
/// Invalid frames tolerated within a minute before close 4000.
const MAX_INVALID_PER_MINUTE: usize = 10;
/// How long a close may take: sending the close frame, then waiting for the
/// client to hang up.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most bytes read and thrown away while waiting for the client to hang up.
const CLOSE_DRAIN_BYTES: usize = 256 * 1024;

/// What a session knows after `hello`.
struct Session {
    user: Rc<str>,
}

enum Event {
    Message(Message),
    /// The client hung up (after a close handshake or without one).
    Ended,
    Failed(WsError),
    Timer,
    CloseRequested(u16),
}

pub struct Conn {
    gw: Rc<Gateway>,
    slot: Slot,
    ws: WsStream,
    /// A user fixed at upgrade time by an `Authorization: Bearer` header.
    preauth: Option<Rc<str>>,
    session: Option<Session>,
    hello_deadline: Instant,
    next_ping: Instant,
    pong_deadline: Option<Instant>,
    invalid: Strikes<MAX_INVALID_PER_MINUTE>,
    /// Rate-limit refusals, for the abuse threshold.
    refusals: RateMeter<10>,
    /// Pings and pongs from the client, for [`MAX_CONTROL_PER_10S`].
    control: RateMeter<10>,
    /// Messages handled since the task last yielded.
    turn_messages: u32,
    timer: Timer,
    armed_at: Instant,
    ping_pending: bool,
    flush_pending: bool,
    /// Whether the client sent a close frame (so the ending is normal).
    peer_closed: Option<u16>,
    /// The rooms this connection is in (at most `chat.rooms_per_session`).
    rooms: Vec<Rc<str>>,
    /// Requests of this connection still running in their own tasks.
    in_flight: Rc<Cell<u32>>,
    /// Tool calls in flight, by request_id (at most
    /// `llm.max_in_flight_per_session`).
    calls: Rc<RefCell<HashMap<String, Rc<CallState>>>>,
}

impl Conn {
    pub fn new(gw: Rc<Gateway>, slot: Slot, ws: WsStream, preauth: Option<Rc<str>>) -> Conn {
        let now = Instant::now();
        let cfg = &gw.cfg.server;
        let hello_deadline = now + cfg.hello_timeout;
        let next_ping = now + cfg.ping_interval;
        Conn {
            hello_deadline,
            next_ping,
            pong_deadline: None,
            invalid: Strikes::new(now),
            refusals: RateMeter::new(now),
            control: RateMeter::new(now),
            turn_messages: 0,
            timer: Timer::at(hello_deadline.min(next_ping)),
            armed_at: hello_deadline.min(next_ping),
            ping_pending: false,
            flush_pending: false,
            peer_closed: None,
            rooms: Vec::new(),
            in_flight: Rc::new(Cell::new(0)),
            calls: Rc::default(),
            session: None,
            preauth,
            gw,
            slot,
            ws,
        }
    }

    /// Takes `&mut self`, not `self`: an async fn keeps a by-value argument
    /// twice in its state, and this state lives as long as the connection.
    pub async fn run(&mut self) {
        let (code, reason) = self.serve().await;
        // Leaving is automatic, whatever ended the connection, and nobody
        // is left to read a tool call's answer.
        for room in std::mem::take(&mut self.rooms) {
            self.gw.chat.leave(&room, self.slot.key);
        }
        for (_, call) in self.calls.borrow_mut().drain() {
            call.cancel();
        }
        if code == close::GOING_AWAY {
            // Shutting down: requests already started get to finish (the
            // daemon bounds the whole drain).
            while self.in_flight.get() > 0 {
                Timer::after(Duration::from_millis(10)).await;
            }
        }
        // Boxed, and bound first: a temporary in the awaited expression
        // would stay in this future's state for the whole connection; the
        // close sequence's state must exist only while closing.
        let closing = Box::pin(self.close(code, reason));
        closing.await;
    }

    /// Serves the connection until it must close; returns the close code.
    async fn serve(&mut self) -> (u16, &'static str) {
        loop {
            let deadline = self.next_deadline();
            if deadline != self.armed_at {
                self.timer.set_at(deadline);
                self.armed_at = deadline;
            }
            let event = future::poll_fn(|cx| self.poll_event(cx)).await;
            match event {
                Event::CloseRequested(code) => return (code, close_reason(code)),
                Event::Ended => {
                    return match self.peer_closed {
                        Some(code) => (code, "client closed"),
                        None => (close::ABNORMAL, "client vanished"),
                    }
                }
                Event::Failed(_) if self.ws.get_ref().flooded() => {
                    inc(&self.gw.metrics.abuse_closes);
                    return (close::POLICY, "too many bytes without a complete message");
                }
                Event::Failed(e) => return ws_error_close(&e),
                Event::Timer => {
                    if let Some(code) = self.on_timer(Instant::now()) {
                        return (code, close_reason(code));
                    }
                }
                Event::Message(msg) => {
                    self.ws.get_mut().message_done();
                    if let Some(code) = self.on_message(msg) {
                        return (code, close_reason(code));
                    }
                    // A client with frames always ready must not keep the
                    // loop to itself.
                    self.turn_messages += 1;
                    if self.turn_messages >= TURN_MESSAGES {
                        self.turn_messages = 0;
                        future::yield_now().await;
                    }
                }
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut d = self.next_ping;
        if self.session.is_none() {
            d = d.min(self.hello_deadline);
        }
        if let Some(p) = self.pong_deadline {
            d = d.min(p);
        }
        d
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        {
            let mut table = self.gw.table.borrow_mut();
            let Some(entry) = table.get_mut(self.slot.key) else {
                return Poll::Ready(Event::CloseRequested(close::INTERNAL));
            };
            if let Some(code) = entry.close_request {
                return Poll::Ready(Event::CloseRequested(code));
            }
            if !entry
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                entry.waker = Some(cx.waker().clone());
            }
        }
        if let Err(e) = self.poll_write(cx) {
            return Poll::Ready(Event::Failed(e));
        }
        match Pin::new(&mut self.ws).poll_next(cx) {
            Poll::Ready(Some(Ok(msg))) => return Poll::Ready(Event::Message(msg)),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Event::Failed(e)),
            Poll::Ready(None) => return Poll::Ready(Event::Ended),
            Poll::Pending => {}
        }
        if Pin::new(&mut self.timer).poll(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        // Waiting: the next wake-up starts a new turn.
        self.turn_messages = 0;
        Poll::Pending
    }

    /// Moves frames from the outbox into the socket while it takes them,
    /// then flushes. Returns at once when the socket is full; the waker is
    /// registered for when it drains.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<(), WsError> {
        let mut sent = 0u32;
        // Ok(true): all moved; Ok(false): the socket is full for now.
        let moved = loop {
            let has_frame = self
                .gw
                .table
                .borrow_mut()
                .get_mut(self.slot.key)
                .is_some_and(|e| !e.outbox.is_empty());
            if !self.ping_pending && !has_frame {
                break Ok(true);
            }
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => break Err(e),
                Poll::Pending => break Ok(false),
            }
            let msg = if self.ping_pending {
                self.ping_pending = false;
                Message::Ping(Default::default())
            } else {
                let Some(f) = self.pop_frame() else {
                    break Ok(true);
                };
                inc(&self.gw.metrics.frames_out);
                add(&self.gw.metrics.bytes_out, f.len() as u64);
                sent += 1;
                Message::Text((*f).clone())
            };
            if let Err(e) = Pin::new(&mut self.ws).start_send(msg) {
                break Err(e);
            }
            self.flush_pending = true;
        };
        // The rate meter once per batch, not once per frame: this is the
        // fan-out's hot path.
        if sent > 0 {
            self.gw
                .meters
                .borrow_mut()
                .messages_out
                .record_n(Instant::now(), sent);
        }
        if !moved? {
            return Ok(());
        }
        if self.flush_pending {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flush_pending = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    fn pop_frame(&self) -> Option<Frame> {
        self.gw
            .table
            .borrow_mut()
            .get_mut(self.slot.key)
            .and_then(|e| e.outbox.pop())
    }

    fn on_timer(&mut self, now: Instant) -> Option<u16> {
        if self.session.is_none() && now >= self.hello_deadline {
            return Some(close::HELLO_TIMEOUT);
        }
        if self.pong_deadline.is_some_and(|d| now >= d) {
            return Some(close::PONG_TIMEOUT);
        }
        if now >= self.next_ping {
            let cfg = &self.gw.cfg.server;
            self.ping_pending = true;
            self.next_ping = now + cfg.ping_interval;
            self.pong_deadline.get_or_insert(now + cfg.pong_timeout);
        }
        None
    }

    fn on_message(&mut self, msg: Message) -> Option<u16> {
        match msg {
            Message::Text(text) => {
                let now = Instant::now();
                inc(&self.gw.metrics.frames_in);
                add(&self.gw.metrics.bytes_in, text.len() as u64);
                self.gw.meters.borrow_mut().messages_in.record(now);
                if let Some(e) = self.gw.table.borrow_mut().get_mut(self.slot.key) {
                    e.messages.record(now);
                }
                self.on_text(&text, now)
            }
            Message::Binary(_) => Some(close::UNSUPPORTED_DATA),
            // tungstenite queues the pong; the next poll writes it.
            Message::Ping(_) => {
                self.flush_pending = true;
                self.control_frame()
            }
            Message::Pong(_) => {
                self.pong_deadline = None;
                self.control_frame()
            }
            Message::Close(frame) => {
                self.peer_closed = Some(frame.map_or(close::NORMAL, |f| u16::from(f.code)));
                self.flush_pending = true;
                None
            }
            Message::Frame(_) => None,
        }
    }

    /// Counts a ping or pong; a flood of them is abuse (close 1008).
    fn control_frame(&mut self) -> Option<u16> {
        let now = Instant::now();
        self.control.record(now);
        if self.control.count(now, 10) > MAX_CONTROL_PER_10S {
            inc(&self.gw.metrics.abuse_closes);
            return Some(close::POLICY);
        }
        None
    }

    fn on_text(&mut self, text: &str, now: Instant) -> Option<u16> {
        let parsed = protocol::parse(text);
        // Every request of a session passes the rate limits before it costs
        // anything more than its parse (which is what finds the request_id
        // to answer with). `hello` itself is paid for by the connection rate.
        if let Some(session) = &self.session {
            let checked = self
                .gw
                .limits
                .borrow_mut()
                .check(now, self.slot.ip, &session.user);
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
                    return Some(close::UNKNOWN_PROTOCOL);
                }
                return self.invalid_request(e.request_id.as_deref(), &e.message);
            }
        };
        let rid = envelope.request_id.as_deref();
        match (&self.session, envelope.request) {
            (None, Request::Hello { token, client }) => {
                self.hello(rid, token.as_deref(), client.as_deref())
            }
            (None, _) => Some(close::UNKNOWN_PROTOCOL),
            (Some(_), Request::Hello { .. }) => {
                self.invalid_request(rid, "hello was already accepted on this connection")
            }
            (Some(_), Request::Ping) => {
                self.send(JsonOut::op("pong").opt_str("request_id", rid).finish());
                None
            }
            (Some(_), Request::Join { room, history }) => self.join(rid, room, history),
            (Some(_), Request::Leave { room }) => self.leave(rid, &room),
            (Some(_), Request::Publish { room, text }) => self.publish(rid, room, text),
            (Some(_), Request::React { message_id, emoji }) => self.react(rid, message_id, emoji),
            (Some(_), Request::ListTools) => {
                self.send(self.gw.llm.list_tools(rid));
                None
            }
            (Some(_), Request::CallTool { name, call }) => self.call_tool(rid, &name, call),
            (Some(_), Request::Cancel) => self.cancel(rid),
            (
                Some(_),
                Request::History {
                    room,
                    before_seq,
                    after_seq,
                    limit,
                },
            ) => {
                let range = match (before_seq, after_seq) {
                    (Some(b), _) => Range::Before(b.min(i64::MAX as u64) as i64),
                    (None, Some(a)) => Range::After(a.min(i64::MAX as u64) as i64),
                    (None, None) => Range::Latest,
                };
                self.history(rid, room, range, limit)
            }
        }
    }

    /// Answers `RATE_LIMITED`; the connection stays open unless the client
    /// keeps hammering past the abuse threshold.
    fn rate_limited(&mut self, rid: Option<&str>, refused: Refused, now: Instant) -> Option<u16> {
        self.gw.meters.borrow_mut().refusals.record(now);
        let message = format!("too many requests ({} limit)", refused.level.label());
        self.send(protocol::error_frame(
            rid,
            ErrorCode::RateLimited,
            &message,
            Some(refused.retry_after_ms()),
        ));
        self.refusals.record(now);
        if self.refusals.count(now, 10) > self.gw.cfg.limits.abuse_threshold {
            inc(&self.gw.metrics.abuse_closes);
            return Some(close::POLICY);
        }
        None
    }

    fn invalid_request(&mut self, rid: Option<&str>, message: &str) -> Option<u16> {
        inc(&self.gw.metrics.invalid_requests);
        self.send(protocol::error_frame(
            rid,
            ErrorCode::InvalidRequest,
            message,
            None,
        ));
        self.invalid
            .record(Instant::now(), 60)
            .then_some(close::INVALID_JSON)
    }

    fn hello(
        &mut self,
        rid: Option<&str>,
        token: Option<&str>,
        client: Option<&str>,
    ) -> Option<u16> {
        let gw = self.gw.clone();
        let user: Option<Rc<str>> = match token {
            Some(t) => gw.auth.user_for(t).map(Rc::from),
            None => match (&self.preauth, gw.cfg.auth.mode) {
                (Some(u), _) => Some(u.clone()),
                (None, AuthMode::Open) => Some(Rc::from(format!("guest-{}", self.slot.id))),
                (None, AuthMode::Token) => None,
            },
        };
        let Some(user) = user else {
            gw.log.info(
                "hello refused",
                &[("conn", &self.slot.id), ("reason", &"bad or missing token")],
            );
            self.send(
                JsonOut::op("hello_ack")
                    .opt_str("request_id", rid)
                    .bool("ok", false)
                    .str("error", "unauthorized")
                    .finish(),
            );
            return Some(close::UNAUTHORIZED);
        };
        let session_id = format!("{:016x}{:x}", crate::resilience::random_u64(), self.slot.id);
        let user_bucket = gw.cfg.limits.user;
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
                .str("server", concat!("hivegate/", env!("CARGO_PKG_VERSION")))
                .raw("limits", &limits)
                .finish(),
        );
        gw.log.info(
            "hello",
            &[
                ("conn", &self.slot.id),
                ("user", &user),
                ("client", &client.unwrap_or("-")),
            ],
        );
        self.session = Some(Session { user });
        None
    }

    fn error(
        &self,
        rid: Option<&str>,
        code: ErrorCode,
        message: &str,
        retry_after_ms: Option<u64>,
    ) {
        self.send(protocol::error_frame(rid, code, message, retry_after_ms));
    }

    fn user(&self) -> Rc<str> {
        self.session
            .as_ref()
            .map_or_else(|| Rc::from("-"), |s| s.user.clone())
    }

    /// Counts a request that continues in its own task and says where its
    /// answer goes; refuses it (answering `OVER_CAPACITY`) when this
    /// connection already has [`MAX_IN_FLIGHT`] of them.
    fn start_request(&self, rid: Option<&str>) -> Option<Reply> {
        let Some(in_flight) = InFlight::try_take(&self.in_flight, MAX_IN_FLIGHT) else {
            self.error(
                rid,
                ErrorCode::OverCapacity,
                &format!("at most {MAX_IN_FLIGHT} requests in flight per connection"),
                Some(100),
            );
            return None;
        };
        Some(Reply {
            gw: self.gw.clone(),
            key: self.slot.key,
            conn: self.slot.id,
            rid: rid.map(String::from),
            _in_flight: in_flight,
        })
    }

    fn join(&mut self, rid: Option<&str>, room: String, history: u64) -> Option<u16> {
        let room: Rc<str> = Rc::from(room);
        let limits = self.gw.cfg.chat;
        let already = self.rooms.contains(&room);
        if !already && self.rooms.len() >= limits.rooms_per_session {
            let msg = format!("at most {} rooms per connection", limits.rooms_per_session);
            self.error(rid, ErrorCode::LimitExceeded, &msg, None);
            return None;
        }
        // Refused (the error is sent): the connection stays open.
        let reply = self.start_request(rid)?;
        let user = self.user();
        let members = match self
            .gw
            .chat
            .join(&room, self.slot.key, self.slot.id, &user, &limits)
        {
            Ok(m) => m,
            Err(JoinError::RoomFull) => {
                let msg = format!("room is full ({} members)", limits.members_per_room);
                self.error(rid, ErrorCode::LimitExceeded, &msg, None);
                return None;
            }
        };
        if !already {
            self.rooms.push(room.clone());
        }
        // Membership first, history second: a message committed meanwhile
        // may arrive twice (clients dedupe by seq) but never not at all.
        let joined = JsonOut::op("joined")
            .opt_str("request_id", rid)
            .str("room", &room)
            .raw("members", &crate::chat::names_json(&members));
        let history = if history == 0 {
            None
        } else {
            match self
                .gw
                .store
                .history(room.to_string(), Range::Latest, history as i64)
            {
                Ok(f) => Some(f),
                Err(e) => {
                    self.undo_join(&room);
                    self.store_error(rid, &e);
                    return None;
                }
            }
        };
        self.gw.spawn(async move {
            let messages = match history {
                None => Ok(Vec::new()),
                Some(f) => f.await,
            };
            match messages {
                Ok(msgs) => reply.send(with_messages(&reply.gw, joined, "history", &msgs, true)),
                Err(e) => {
                    // Without its history the join did not happen.
                    reply.gw.chat.leave(&room, reply.key);
                    reply.fail(&e);
                }
            }
        });
        None
    }

    /// Takes back a join whose history could not be read.
    fn undo_join(&mut self, room: &Rc<str>) {
        self.gw.chat.leave(room, self.slot.key);
        self.rooms.retain(|r| r != room);
    }

    fn leave(&mut self, rid: Option<&str>, room: &str) -> Option<u16> {
        if let Some(i) = self.rooms.iter().position(|r| &**r == room) {
            let r = self.rooms.swap_remove(i);
            self.gw.chat.leave(&r, self.slot.key);
        }
        // Leaving a room one is not in is not an error: the outcome is the same.
        self.send(
            JsonOut::op("left")
                .opt_str("request_id", rid)
                .str("room", room)
                .finish(),
        );
        None
    }

    fn publish(&mut self, rid: Option<&str>, room: String, text: String) -> Option<u16> {
        let max = self.gw.cfg.chat.max_text_bytes;
        if text.is_empty() || text.len() > max {
            self.error(
                rid,
                ErrorCode::InvalidRequest,
                &format!("text must be 1-{max} bytes"),
                None,
            );
            return None;
        }
        if !self.gw.chat.is_member(&room, self.slot.key) {
            self.error(
                rid,
                ErrorCode::Unauthorized,
                "join the room before publishing to it",
                None,
            );
            return None;
        }
        if self.gw.storage_full.get() {
            let msg = "storage full: the database is at store.max_db_bytes";
            self.error(rid, ErrorCode::OverCapacity, msg, Some(5000));
            return None;
        }
        let reply = self.start_request(rid)?;
        let ts = crate::clock::unix_ms();
        let msg = StoredMessage {
            id: self.gw.store.new_id(ts.max(0) as u64),
            room,
            seq: 0,
            user: self.user().to_string(),
            text,
            ts,
            reactions: Vec::new(),
        };
        let op = WriteOp::Publish {
            id: msg.id.clone(),
            room: msg.room.clone(),
            user: msg.user.clone(),
            text: msg.text.clone(),
            ts: msg.ts,
        };
        let committed = match self.gw.store.write(op) {
            Ok(f) => f,
            Err(e) => {
                self.store_error(rid, &e);
                return None;
            }
        };
        self.gw.spawn(async move {
            match committed.await {
                Ok(WriteOk::Published { seq }) => {
                    // Acknowledged only now: the message is on disk.
                    let ack = JsonOut::op("ack")
                        .opt_str("request_id", reply.rid())
                        .str("id", &msg.id)
                        .num("seq", seq as u64)
                        .finish();
                    // Through the fan-out queue, just ahead of the message:
                    // the publisher gets both in one write.
                    let chat = &reply.gw.chat;
                    chat.enqueue_direct(reply.key, reply.conn, frame(ack));
                    let stored = StoredMessage { seq, ..msg };
                    chat.enqueue(
                        Rc::from(stored.room.as_str()),
                        frame(crate::chat::message_json(&stored)),
                    );
                }
                Ok(other) => reply.unexpected(&other),
                Err(e) => reply.fail(&e),
            }
        });
        None
    }

    fn react(&mut self, rid: Option<&str>, message_id: String, emoji: String) -> Option<u16> {
        let reply = self.start_request(rid)?;
        let user = self.user();
        let op = WriteOp::React {
            message_id: message_id.clone(),
            emoji: emoji.clone(),
            user: user.to_string(),
            ts: crate::clock::unix_ms(),
            rooms: self.rooms.iter().map(|r| r.to_string()).collect(),
        };
        let done = match self.gw.store.write(op) {
            Ok(f) => f,
            Err(e) => {
                self.store_error(rid, &e);
                return None;
            }
        };
        self.gw.spawn(async move {
            match done.await {
                Ok(WriteOk::Reacted { room, count, added }) => {
                    reply.send(
                        JsonOut::op("ack")
                            .opt_str("request_id", reply.rid())
                            .finish(),
                    );
                    let event = JsonOut::op("reaction")
                        .str("room", &room)
                        .str("message_id", &message_id)
                        .str("emoji", &emoji)
                        .num("count", count as u64)
                        .str("by", &user)
                        .bool("added", added)
                        .finish();
                    reply.gw.chat.enqueue(Rc::from(room), frame(event));
                }
                Ok(other) => reply.unexpected(&other),
                Err(e) => reply.fail(&e),
            }
        });
        None
    }

    fn history(
        &mut self,
        rid: Option<&str>,
        room: String,
        range: Range,
        limit: u64,
    ) -> Option<u16> {
        if !self.gw.chat.is_member(&room, self.slot.key) {
            self.error(
                rid,
                ErrorCode::Unauthorized,
                "join the room before reading its history",
                None,
            );
            return None;
        }
        let reply = self.start_request(rid)?;
        let read = match self.gw.store.history(room.clone(), range, limit as i64) {
            Ok(f) => f,
            Err(e) => {
                self.store_error(rid, &e);
                return None;
            }
        };
        self.gw.spawn(async move {
            match read.await {
                Ok(msgs) => {
                    let answer = JsonOut::op("history_res")
                        .opt_str("request_id", reply.rid())
                        .str("room", &room);
                    let keep_newest = !matches!(range, Range::After(_));
                    reply.send(with_messages(
                        &reply.gw,
                        answer,
                        "messages",
                        &msgs,
                        keep_newest,
                    ));
                }
                Err(e) => reply.fail(&e),
            }
        });
        None
    }

    fn call_tool(&mut self, rid: Option<&str>, name: &str, call: crate::llm::Call) -> Option<u16> {
        let rid_owned = rid.unwrap_or_default().to_string();
        if name != "chat" {
            let name: String = name.chars().take(32).collect();
            self.error(
                rid,
                ErrorCode::NotFound,
                &format!("no tool {name:?}; list_tools names them"),
                None,
            );
            return None;
        }
        // The same request_id while it runs: share the answer, call nobody.
        if let Some(state) = self.calls.borrow().get(&rid_owned) {
            if state.followers.get() >= MAX_FOLLOWERS {
                let msg = format!("at most {MAX_FOLLOWERS} repeats of a call in flight share it");
                self.error(rid, ErrorCode::LimitExceeded, &msg, None);
                return None;
            }
            state.followers.set(state.followers.get() + 1);
            self.send(
                JsonOut::op("call_tool_ack")
                    .opt_str("request_id", rid)
                    .bool("from_inflight", true)
                    .finish(),
            );
            return None;
        }
        if let Err((code, msg)) = self.gw.llm.check(&call) {
            self.error(rid, code, &msg, None);
            return None;
        }
        let per_session = self.gw.cfg.llm.max_in_flight_per_session;
        if self.calls.borrow().len() >= per_session as usize {
            let msg = format!("at most {per_session} tool calls in flight per connection");
            self.error(rid, ErrorCode::OverCapacity, &msg, Some(1000));
            return None;
        }
        let Some(slot) = self.gw.llm.try_start() else {
            self.error(
                rid,
                ErrorCode::OverCapacity,
                "the gateway is at its limit of tool calls",
                Some(1000),
            );
            return None;
        };
        let reply = self.start_request(rid)?;
        let state = Rc::new(CallState::default());
        self.calls
            .borrow_mut()
            .insert(rid_owned.clone(), state.clone());
        self.send(
            JsonOut::op("call_tool_ack")
                .opt_str("request_id", rid)
                .finish(),
        );
        let calls = self.calls.clone();
        let gw = self.gw.clone();
        self.gw.spawn(async move {
            let _slot = slot;
            let out = CallOutput {
                reply,
                state: state.clone(),
            };
            gw.llm.run(call, &out).await;
            let mut calls = calls.borrow_mut();
            if calls.get(&rid_owned).is_some_and(|s| Rc::ptr_eq(s, &state)) {
                calls.remove(&rid_owned);
            }
        });
        None
    }

    fn cancel(&mut self, rid: Option<&str>) -> Option<u16> {
        let state = self.calls.borrow_mut().remove(rid.unwrap_or_default());
        match state {
            Some(state) => {
                state.cancel();
                self.send(JsonOut::op("cancelled").opt_str("request_id", rid).finish());
            }
            None => self.error(
                rid,
                ErrorCode::NotFound,
                "no tool call in flight with that request_id",
                None,
            ),
        }
        None
    }

    fn store_error(&self, rid: Option<&str>, e: &StoreError) {
        let (code, msg, retry) = store_error_parts(&self.gw, self.slot.id, rid, e);
        self.error(rid, code, &msg, retry);
    }

    /// Queues one of this connection's own frames (answers, errors).
    fn send(&self, text: String) {
        let f = frame(text);
        self.gw.table.borrow_mut().deliver(self.slot.key, &f);
    }

    /// Ends the connection: what is queued is sent (unless the client is
    /// the reason it cannot be), then the close frame, then the socket is
    /// half-closed and read until the client hangs up, all within
    /// [`CLOSE_GRACE`]. Reading to the end keeps the kernel from answering
    /// unread data with a reset that would destroy the close frame in
    /// flight.
    async fn close(&mut self, code: u16, reason: &'static str) {
        let gw = self.gw.clone();
        inc_close(&gw, code);
        let user = self.session.as_ref().map_or("-", |s| &*s.user).to_string();
        let recent = gw
            .table
            .borrow_mut()
            .get_mut(self.slot.key)
            .map_or(0, |e| e.messages.count(Instant::now(), 10));
        gw.log.info(
            "closed",
            &[
                ("conn", &self.slot.id),
                ("user", &user),
                ("code", &code),
                ("reason", &reason),
                ("msgs_10s", &recent),
            ],
        );
        if code == close::ABNORMAL {
            return;
        }
        if code == close::SLOW_CONSUMER {
            // The client is not reading; queued frames would never arrive.
            if let Some(e) = gw.table.borrow_mut().get_mut(self.slot.key) {
                while e.outbox.pop().is_some() {}
            }
        }
        let deadline = Instant::now() + CLOSE_GRACE;
        let send_close = async {
            // Flush what is queued (answers already promised), then close.
            let _ = future::poll_fn(|cx| {
                if let Err(e) = self.poll_write(cx) {
                    return Poll::Ready(Err(e));
                }
                let queued = gw
                    .table
                    .borrow_mut()
                    .get_mut(self.slot.key)
                    .is_some_and(|e| !e.outbox.is_empty());
                if queued || self.flush_pending {
                    Poll::Pending
                } else {
                    Poll::Ready(Ok(()))
                }
            })
            .await;
            if self.peer_closed.is_none() {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                };
                let _ = future::poll_fn(|cx| Pin::new(&mut self.ws).poll_ready(cx)).await;
                let _ = Pin::new(&mut self.ws).start_send(Message::Close(Some(frame)));
                let _ = future::poll_fn(|cx| Pin::new(&mut self.ws).poll_flush(cx)).await;
            }
            let _ = self
                .ws
                .get_ref()
                .get_ref()
                .get_ref()
                .shutdown(std::net::Shutdown::Write);
            drain_input(&mut self.ws).await;
        };
        send_close
            .or(async {
                Timer::at(deadline).await;
            })
            .await;
    }
}

/// Reads and discards until the client hangs up (bounded in bytes; the
/// caller bounds it in time).
pub(super) async fn drain_input(ws: &mut WsStream) {
    use futures_lite::{AsyncReadExt, StreamExt};
    // Let tungstenite see the client's close frame if the stream still works.
    while let Some(Ok(_)) = ws.next().await {}
    let mut buf = vec![0u8; 4096];
    let mut total = 0;
    while total < CLOSE_DRAIN_BYTES {
        match ws.get_mut().read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

fn inc_close(gw: &Gateway, code: u16) {
    gw.metrics.closed(code);
    if code == close::SLOW_CONSUMER {
        inc(&gw.metrics.slow_consumers);
    }
}

fn close_reason(code: u16) -> &'static str {
    match code {
        close::NORMAL => "normal",
        close::GOING_AWAY => "server shutting down",
        close::PROTOCOL_ERROR => "protocol error",
        close::UNSUPPORTED_DATA => "binary frames are not supported",
        close::INVALID_PAYLOAD => "invalid UTF-8",
        close::POLICY => "policy violation",
        close::TOO_BIG => "message too big",
        close::TRY_AGAIN_LATER => "try again later",
        close::INVALID_JSON => "too many invalid requests",
        close::UNKNOWN_PROTOCOL => "expected hello",
        close::HELLO_TIMEOUT => "no hello in time",
        close::UNAUTHORIZED => "unauthorized",
        close::SLOW_CONSUMER => "slow consumer",
        close::PONG_TIMEOUT => "no pong in time",
        _ => "internal error",
    }
}

/// The close code RFC 6455 asks for after a read error.
pub(super) fn ws_error_close(e: &WsError) -> (u16, &'static str) {
    use async_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match e {
        // The client hung up (FIN or reset) without a close frame: an
        // abnormal end, not a protocol error of ours to report.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            (close::ABNORMAL, "client vanished")
        }
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            (close::TOO_BIG, "message too big")
        }
        WsError::Capacity(_) => (close::TOO_BIG, "message too big"),
        WsError::Utf8(_) => (close::INVALID_PAYLOAD, "invalid UTF-8"),
        WsError::Protocol(_) => (close::PROTOCOL_ERROR, "protocol error"),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            (close::ABNORMAL, "connection closed")
        }
        _ => (close::ABNORMAL, "connection failed"),
    }
}
