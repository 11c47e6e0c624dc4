//! One task per connection, from the upgrade to the last byte.
//!
//! The task waits on four things at once, in one `poll_fn`: a close request
//! in its table entry, frames in its outbox (written into the socket as fast
//! as it takes them), frames from the client, and one timer re-armed to the
//! nearest deadline (hello, next ping, pong). Reading never waits for
//! writing: a client that stops reading fills its bounded outbox and is
//! closed as a slow consumer, and nobody else notices.

use super::{Gateway, Slot};
use crate::auth::Identity;
use crate::hub::frame;
use crate::limit::{RateMeter, Strikes, Tally};
use crate::llm::ToolCalls;
use crate::ops::metrics::{add, inc};
use crate::protocol::Close;
use async_io::Timer;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_lite::{future, FutureExt, Stream};
use futures_sink::Sink;
use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

mod mcp;
mod session;

pub type WsStream = WebSocketStream<super::intake::Intake<super::tls::Socket>>;

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
    who: Rc<Identity>,
}

impl Session {
    fn new(who: Rc<Identity>) -> Session {
        Session { who }
    }
}

/// What the connection does after an event.
enum Next {
    Wait,
    Yield,
    /// The code sent (or the client's own) and the reason logged.
    Close(u16, &'static str),
}

enum Event {
    Message(Message),
    /// The client hung up (after a close handshake or without one).
    Ended,
    Failed(WsError),
    Timer,
    CloseRequested(Close),
}

/// What only a misbehaving client costs, boxed on its first offence:
/// most connections never have one, and inline these were 128 bytes on
/// every connection.
struct Trouble {
    invalid: Strikes<MAX_INVALID_PER_MINUTE>,
    /// Rate-limit refusals, for the abuse threshold.
    refusals: RateMeter<10>,
}

/// A connection's state for its whole life: everything here is paid for
/// by every connection, idle or not (a test keeps its size in check).
pub struct Conn {
    gw: Rc<Gateway>,
    slot: Slot,
    ws: WsStream,
    /// Who signed in at upgrade time (`Authorization: Bearer`, or a
    /// `bearer.TOKEN` subprotocol entry).
    preauth: Option<Rc<Identity>>,
    session: Option<Session>,
    /// When the upgrade completed: the epoch of the `hello` deadline and
    /// of `control`.
    born: Instant,
    next_ping: Instant,
    pong_deadline: Option<Instant>,
    trouble: Option<Box<Trouble>>,
    /// Pings and pongs from the client, for [`MAX_CONTROL_PER_10S`].
    control: Tally,
    /// Messages handled since the task last yielded.
    turn_messages: u32,
    timer: Timer,
    armed_at: Instant,
    ping_pending: bool,
    flush_pending: bool,
    /// Whether the client sent a close frame (so the ending is normal).
    peer_closed: Option<u16>,
    /// Requests of this connection still running in their own tasks.
    in_flight: Rc<Cell<u32>>,
    /// Tool calls in flight (made on the first call: most connections
    /// never make one).
    tools: Option<ToolCalls>,
    /// `Some` when the client chose the `mcp` subprotocol: its calls.
    mcp: Option<mcp::Calls>,
}

impl Conn {
    /// `mcp`: the client chose the `mcp` subprotocol; the upgrade's user
    /// (or open mode's guest) is the session, with no `hello`.
    pub fn new(
        gw: Rc<Gateway>,
        slot: Slot,
        ws: WsStream,
        preauth: Option<Rc<Identity>>,
        mcp: bool,
    ) -> Conn {
        let now = Instant::now();
        let cfg = &gw.cfg.server;
        let hello_deadline = now + cfg.hello_timeout;
        let next_ping = now + cfg.ping_interval;
        Conn {
            born: now,
            next_ping,
            pong_deadline: None,
            trouble: None,
            control: Tally::default(),
            turn_messages: 0,
            timer: Timer::at(hello_deadline.min(next_ping)),
            armed_at: hello_deadline.min(next_ping),
            ping_pending: false,
            flush_pending: false,
            peer_closed: None,
            in_flight: Rc::new(Cell::new(0)),
            tools: None,
            // An MCP client without a token in open mode is a guest of its
            // own (admission refused it in the other modes).
            session: mcp.then(|| {
                Session::new(
                    preauth
                        .clone()
                        .unwrap_or_else(|| Rc::new(Identity::guest(None))),
                )
            }),
            mcp: mcp.then(mcp::Calls::default),
            preauth,
            gw,
            slot,
            ws,
        }
    }

    /// The connection's task: the connection and its run, nothing more.
    /// A plain fn returning an `async move` block: an async fn keeps a
    /// by-value argument twice in its state, and this state lives as long
    /// as the connection.
    #[allow(clippy::manual_async_fn)]
    pub fn task(mut self) -> impl std::future::Future<Output = ()> {
        async move { self.run().await }
    }

    async fn run(&mut self) {
        let (code, reason) = self.serve().await;
        if code == Close::GoingAway.code() {
            // Tool calls are told the gateway is going, before they are
            // cancelled with everything else below.
            self.shut_down_calls();
        }
        // Leaving is automatic, whatever ended the connection, and nobody
        // is left to read a tool call's answer.
        self.gw.chat.leave_all(self.slot.key);
        if let Some(tools) = &self.tools {
            tools.cancel_all();
        }
        if let Some(calls) = &self.mcp {
            for (_, call) in calls.borrow_mut().drain() {
                call.cancel();
            }
        }
        // Boxed, and bound first: a temporary in the awaited expression
        // would stay in this future's state for the whole connection; the
        // closing's state must exist only while closing.
        let closing = Box::pin(self.finish(code, reason));
        closing.await;
    }

    /// Serves the connection until it must close; returns the close code.
    /// Nothing but `self` is kept across an await: this state lives as
    /// long as the connection.
    async fn serve(&mut self) -> (u16, &'static str) {
        loop {
            let deadline = self.next_deadline();
            if deadline != self.armed_at {
                self.timer.set_at(deadline);
                self.armed_at = deadline;
            }
            let event = future::poll_fn(|cx| self.poll_event(cx)).await;
            match self.on_event(event) {
                Next::Wait => {}
                // A client with frames always ready must not keep the
                // loop to itself.
                Next::Yield => future::yield_now().await,
                Next::Close(code, reason) => return (code, reason),
            }
        }
    }

    fn on_event(&mut self, event: Event) -> Next {
        let close = match event {
            Event::CloseRequested(close) => close,
            Event::Ended => {
                return match self.peer_closed {
                    Some(code) => Next::Close(code, "client closed"),
                    None => Next::Close(Close::Abnormal.code(), "client vanished"),
                }
            }
            Event::Failed(_) if self.ws.get_ref().flooded() => {
                inc(&self.gw.metrics.abuse_closes);
                return Next::Close(
                    Close::Policy.code(),
                    "too many bytes without a complete message",
                );
            }
            Event::Failed(e) => {
                let (close, reason) = ws_error_close(&e);
                return Next::Close(close.code(), reason);
            }
            Event::Timer => match self.on_timer(Instant::now()) {
                Ok(()) => return Next::Wait,
                Err(close) => close,
            },
            Event::Message(msg) => {
                self.ws.get_mut().message_done();
                if let Err(close) = self.on_message(msg) {
                    return Next::Close(close.code(), close.reason());
                }
                self.turn_messages += 1;
                if self.turn_messages < TURN_MESSAGES {
                    return Next::Wait;
                }
                self.turn_messages = 0;
                return Next::Yield;
            }
        };
        Next::Close(close.code(), close.reason())
    }

    /// After serving: in a shutdown, requests already started get to
    /// finish (the daemon bounds the whole drain); then the close.
    async fn finish(&mut self, code: u16, reason: &'static str) {
        if code == Close::GoingAway.code() {
            while self.in_flight.get() > 0 {
                Timer::after(Duration::from_millis(10)).await;
            }
        }
        self.close(code, reason).await;
    }

    fn hello_deadline(&self) -> Instant {
        self.born + self.gw.cfg.server.hello_timeout
    }

    fn next_deadline(&self) -> Instant {
        let mut d = self.next_ping;
        if self.session.is_none() {
            d = d.min(self.hello_deadline());
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
                return Poll::Ready(Event::CloseRequested(Close::Internal));
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
        // Once everything the client sent has been read, the socket says
        // when there is more: asking it costs less than a read that finds
        // nothing, and most wake-ups of a room's member are for writing.
        let intake = self.ws.get_ref();
        if !intake.drained() || intake.get_ref().poll_readable(cx).is_ready() {
            match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => return Poll::Ready(Event::Message(msg)),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Event::Failed(e)),
                Poll::Ready(None) => return Poll::Ready(Event::Ended),
                Poll::Pending => {}
            }
        }
        if Pin::new(&mut self.timer).poll(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        // Waiting: the next wake-up starts a new turn.
        self.turn_messages = 0;
        Poll::Pending
    }

    /// Writes what is due: first the library's own frames (a ping of
    /// ours, the pong or close it owes the client), then the outbox,
    /// straight to the socket in vectored writes while it takes them.
    /// Returns at once when the socket is full; the waker is registered
    /// for when it drains. `Ok(true)`: nothing is left to write.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, WsError> {
        if self.ping_pending {
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
            self.ping_pending = false;
            Pin::new(&mut self.ws).start_send(Message::Ping(Default::default()))?;
            self.flush_pending = true;
        }
        if self.flush_pending {
            // The library's buffer goes first: the outbox's frames must not
            // overtake it.
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flush_pending = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
        }
        if self.peer_closed.is_some() {
            // The library has answered the client's close: nothing more
            // may follow it, and what is queued stays there.
            return Ok(true);
        }
        let (mut frames, mut bytes) = (0u32, 0u64);
        let written = loop {
            let mut table = self.gw.table.borrow_mut();
            let Some(entry) = table.get_mut(self.slot.key) else {
                break Ok(true);
            };
            let ws = self.ws.get_mut();
            if entry.outbox.is_empty() && !ws.writing() {
                break Ok(true);
            }
            match ws.poll_write_frames(cx, entry.outbox.frames()) {
                Poll::Ready(Ok(taken)) => {
                    let (n, b) = entry.outbox.take(taken);
                    frames += n;
                    bytes += b;
                }
                Poll::Ready(Err(e)) => break Err(WsError::Io(e)),
                Poll::Pending => break Ok(false),
            }
        };
        // The counters and the rate meter once per batch, not once per
        // frame: this is the fan-out's hot path.
        if frames > 0 {
            add(&self.gw.metrics.frames_out, u64::from(frames));
            add(&self.gw.metrics.bytes_out, bytes);
            self.gw
                .meters
                .borrow_mut()
                .messages_out
                .record_n(Instant::now(), frames);
        }
        written
    }

    fn on_timer(&mut self, now: Instant) -> Result<(), Close> {
        if self.session.is_none() && now >= self.hello_deadline() {
            return Err(Close::HelloTimeout);
        }
        if self.pong_deadline.is_some_and(|d| now >= d) {
            return Err(Close::PongTimeout);
        }
        if now >= self.next_ping {
            let cfg = &self.gw.cfg.server;
            self.ping_pending = true;
            self.next_ping = now + cfg.ping_interval;
            self.pong_deadline.get_or_insert(now + cfg.pong_timeout);
        }
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), Close> {
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
            Message::Binary(_) => Err(Close::UnsupportedData),
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
                self.peer_closed = Some(frame.map_or(Close::Normal.code(), |f| u16::from(f.code)));
                self.flush_pending = true;
                Ok(())
            }
            Message::Frame(_) => Ok(()),
        }
    }

    /// Counts a ping or pong; a flood of them is abuse (close 1008).
    fn control_frame(&mut self) -> Result<(), Close> {
        let secs = self.born.elapsed().as_secs();
        if u64::from(self.control.record(secs, 10)) > MAX_CONTROL_PER_10S {
            inc(&self.gw.metrics.abuse_closes);
            return Err(Close::Policy);
        }
        Ok(())
    }

    /// This connection's misbehaviour so far (made on its first offence).
    fn trouble(&mut self) -> &mut Trouble {
        self.trouble.get_or_insert_with(|| {
            let now = Instant::now();
            Box::new(Trouble {
                invalid: Strikes::new(now),
                refusals: RateMeter::new(now),
            })
        })
    }

    /// A request refused by a rate limit (`Gateway::rate_check`, which
    /// counted it), on either protocol: past the abuse threshold in 10 s
    /// the connection is closed 1008.
    fn refused(&mut self, now: Instant) -> Result<(), Close> {
        let refusals = &mut self.trouble().refusals;
        refusals.record(now);
        let recent = refusals.count(now, 10);
        if recent > self.gw.limits.borrow().params().abuse_threshold {
            inc(&self.gw.metrics.abuse_closes);
            return Err(Close::Policy);
        }
        Ok(())
    }

    /// An invalid message, on either protocol: counted, and too many in a
    /// minute close the connection.
    fn strike(&mut self) -> Result<(), Close> {
        self.trouble()
            .invalid
            .record(Instant::now(), 60)
            .then_some(Close::InvalidJson)
            .map_or(Ok(()), Err)
    }

    /// Queues one of this connection's own frames (answers, errors).
    fn send(&self, text: String) {
        let f = frame(text);
        self.gw
            .table
            .borrow_mut()
            .deliver_to(self.slot.key, self.slot.id, &f);
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
        let user = self
            .session
            .as_ref()
            .map_or("-", |s| &*s.who.user)
            .to_string();
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
        if code == Close::Abnormal.code() {
            return;
        }
        if code == Close::SlowConsumer.code() {
            // The client is not reading; queued frames would never arrive.
            if let Some(e) = gw.table.borrow_mut().get_mut(self.slot.key) {
                while e.outbox.pop().is_some() {}
            }
        }
        let deadline = Instant::now() + CLOSE_GRACE;
        let send_close = async {
            // Flush what is queued (answers already promised), then close.
            let _ = future::poll_fn(|cx| match self.poll_write(cx) {
                Ok(true) => Poll::Ready(Ok(())),
                Ok(false) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
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
                .tcp()
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
    if code == Close::SlowConsumer.code() {
        inc(&gw.metrics.slow_consumers);
    }
}

/// The close code RFC 6455 asks for after a read error.
pub(super) fn ws_error_close(e: &WsError) -> (Close, &'static str) {
    use async_tungstenite::tungstenite::error::ProtocolError;
    match e {
        // The client hung up (FIN or reset) without a close frame: an
        // abnormal end, not a protocol error of ours to report.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            (Close::Abnormal, "client vanished")
        }
        WsError::Capacity(_) => (Close::TooBig, Close::TooBig.reason()),
        WsError::Utf8(_) => (Close::InvalidPayload, Close::InvalidPayload.reason()),
        WsError::Protocol(_) => (Close::ProtocolError, Close::ProtocolError.reason()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            (Close::Abnormal, "connection closed")
        }
        _ => (Close::Abnormal, "connection failed"),
    }
}

/// What every connection holds for its whole life, in bytes.
pub struct StateSizes {
    pub conn: usize,
    /// The connection's task: its state and the future that runs it.
    pub task: usize,
    /// Its entry in the connection table.
    pub entry: usize,
}

/// For the unit test below and `hivegate-bench guard`.
pub fn state_sizes() -> StateSizes {
    fn future_size<A, F: std::future::Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    StateSizes {
        conn: std::mem::size_of::<Conn>(),
        task: future_size(Conn::task),
        entry: std::mem::size_of::<crate::hub::Entry>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection holds these for its whole life, idle or not:
    /// together about two thirds of an idle connection's memory
    /// (`hivegate-bench idle`). A change that grows them fails here, and
    /// moves the bound in the commit that says why.
    #[test]
    fn a_connection_holds_little() {
        let StateSizes { conn, task, entry } = state_sizes();
        assert!(conn <= 600, "Conn is {conn} bytes");
        assert!(task <= 680, "the connection task's future is {task} bytes");
        assert!(entry <= 160, "the table entry is {entry} bytes");
    }
}
