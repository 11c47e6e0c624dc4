//! The OpenAI-compatible endpoint's transport: `POST /v1/chat/completions`
//! answered whole, or as server-sent events when `stream` is set, and
//! `GET /v1/models`. What the requests and answers mean is
//! `openai_api.rs`; admission is `request.rs`.
//!
//! A call passes what a tool call on `/ws` passes: the rate limits, the
//! access rules and budget (in the relay's check), a slot of the user's
//! own (`llm.max_in_flight_per_session` per user) and one of the
//! gateway's. A streamed answer's head waits for the first piece, so a
//! call that fails before it gets its real HTTP status; after it, an error
//! is an event in the stream. A client that hangs up cancels the call.

use super::http::Response;
use super::request::{self, Admitted, Answered};
use super::tls::Socket;
use super::{retry_after, Gateway};
use crate::auth::Identity;
use crate::limit::InFlight;
use crate::llm::Caller;
use crate::openai_api::{self, ApiError, Completion, End, Exchange, Writer};
use crate::ops::metrics::inc;
use crate::protocol::ErrorCode;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The methods a route under `/v1/` takes (none: no such route).
pub fn methods(route: &str) -> &'static [&'static str] {
    match route {
        "/v1/chat/completions" => &["POST"],
        "/v1/models" => &["GET"],
        _ => &[],
    }
}

/// A refusal written as plain text (admission's, the caps'), in OpenAI's
/// error shape, its headers kept.
pub fn shaped(r: Response) -> Response {
    if r.status < 400 || r.content_type != "text/plain; charset=utf-8" {
        return r;
    }
    let code = match r.status {
        401 => "UNAUTHORIZED",
        403 => "FORBIDDEN",
        404 => "NOT_FOUND",
        429 => "RATE_LIMITED",
        503 => "UNAVAILABLE",
        _ => "INVALID_REQUEST",
    };
    let e = ApiError::new(r.status, code, r.body.trim_end());
    Response {
        content_type: "application/json",
        body: e.body(),
        ..r
    }
}

fn error(e: &ApiError) -> Response {
    let r = Response::new(e.status, "application/json", e.body());
    match e.retry_after_ms {
        Some(ms) => r.header("Retry-After", retry_after(Duration::from_millis(ms))),
        None => r,
    }
}

/// Calls in flight per user. Only users with a call in flight matter, so
/// the table is bounded by the gateway's slots (idle entries are dropped
/// as it grows).
#[derive(Default)]
pub struct Calls(RefCell<HashMap<Rc<str>, Rc<Cell<u32>>>>);

impl Calls {
    fn take(&self, user: &Rc<str>, max: u32) -> Option<InFlight> {
        let mut map = self.0.borrow_mut();
        if map.len() >= 64 {
            map.retain(|_, n| n.get() > 0);
        }
        let n = map.entry(user.clone()).or_default();
        InFlight::try_take(n, max)
    }
}

/// Answers an admitted request; a streamed one for as long as it runs.
/// With `keep`, a stream goes in chunks and leaves the connection open
/// for the client's next request.
pub(super) async fn answer(
    gw: &Rc<Gateway>,
    a: &Admitted,
    stream: &mut Socket,
    ip: IpAddr,
    keep: bool,
) -> Answered {
    match answer_or_refuse(gw, a, stream, ip, keep).await {
        Ok(done) => done,
        Err(r) => Answered::Whole(r),
    }
}

async fn answer_or_refuse(
    gw: &Rc<Gateway>,
    a: &Admitted,
    stream: &mut Socket,
    ip: IpAddr,
    keep: bool,
) -> Result<Answered, Response> {
    inc(&gw.metrics.openai_requests);
    // Without a token (open mode), a guest of its own.
    let who = a
        .who
        .clone()
        .unwrap_or_else(|| Rc::new(Identity::guest(None)));
    let caller = Caller {
        grant: gw.live.borrow().rules.llm(&who),
        who,
    };
    if a.head.route() == "/v1/models" {
        let body = openai_api::models(&gw.llm, &caller);
        return Err(Response::new(200, "application/json", body));
    }
    if let Err(r) = gw.rate_check(Instant::now(), ip, &caller.who.user) {
        let msg = format!("too many requests: retry after {} ms", r.retry_after_ms());
        let e = ApiError::from_code(ErrorCode::RateLimited, &msg, Some(r.retry_after_ms()));
        return Err(error(&e));
    }
    let c = match openai_api::read(&a.body, &gw.llm) {
        Ok(c) => c,
        Err(e) => {
            inc(&gw.metrics.invalid_requests);
            return Err(error(&e));
        }
    };
    if let Err(r) = gw.llm.check(&c.call, &caller) {
        return Err(error(&ApiError::from_code(
            r.code,
            &r.message,
            r.retry_after_ms,
        )));
    }
    let per_user = gw.llm.max_in_flight_per_session();
    let Some(_mine) = gw.openai_calls.take(&caller.who.user, per_user) else {
        let msg = format!("at most {per_user} calls in flight per user");
        return Err(error(&ApiError::from_code(
            ErrorCode::OverCapacity,
            &msg,
            Some(1000),
        )));
    };
    let Some(_slot) = gw.llm.try_start() else {
        let msg = "the gateway is at its limit of LLM calls";
        return Err(error(&ApiError::from_code(
            ErrorCode::OverCapacity,
            msg,
            Some(1000),
        )));
    };
    let x = Exchange::default();
    let writer = Writer::new(&c);
    Ok(if c.call.stream {
        streamed(gw, c, &caller, &x, writer, stream, keep).await
    } else {
        whole(gw, c, &caller, &x, writer, stream).await
    })
}

/// A call answered with one `chat.completion`.
async fn whole(
    gw: &Gateway,
    c: Completion,
    caller: &Caller,
    x: &Exchange,
    w: Writer,
    stream: &mut Socket,
) -> Answered {
    let relay = gw.llm.run(c.call, caller, x);
    // A client that hangs up cancels the call; the relay then ends.
    let watch = async {
        request::hung_up(stream).await;
        x.cancel.cancel();
        std::future::pending::<()>().await
    };
    futures_lite::future::or(relay, watch).await;
    match x.take().end {
        Some(End::Answer(f)) => {
            Answered::Whole(Response::new(200, "application/json", w.whole(&f)))
        }
        Some(End::Failed(e)) => Answered::Whole(error(&e)),
        // Cancelled: the client is gone.
        None => Answered::Streamed { again: false },
    }
}

/// A call answered as server-sent events, written as the relay speaks:
/// what piled up while the client read is sent as one chunk. With `keep`,
/// in HTTP chunks, so the connection can carry the next request.
async fn streamed(
    gw: &Gateway,
    c: Completion,
    caller: &Caller,
    x: &Exchange,
    mut w: Writer,
    stream: &mut Socket,
    keep: bool,
) -> Answered {
    let relay = async {
        gw.llm.run(c.call, caller, x).await;
        x.close();
    };
    let mut refused = None;
    let mut finished = false;
    let writer = async {
        let mut head_sent = false;
        loop {
            let ready = x.listen();
            let p = x.take();
            let ended = p.end.is_some();
            let mut out = String::new();
            if !head_sent {
                if let (Some(End::Failed(e)), false) = (&p.end, p.has_piece()) {
                    // Nothing streamed yet: the failure gets its status.
                    refused = Some(error(e));
                    return;
                }
                // The head goes with the first piece, in one write.
                head_sent = p.has_piece() || ended;
                if head_sent {
                    out = request::sse_head(keep, "");
                }
            }
            if head_sent {
                let events = w.events(p);
                if !keep {
                    out.push_str(&events);
                } else if !events.is_empty() {
                    out.push_str(&format!("{:x}\r\n{events}\r\n", events.len()));
                }
                if keep && ended {
                    // The last chunk: the connection is free again.
                    out.push_str("0\r\n\r\n");
                    finished = true;
                }
            }
            if !out.is_empty() && !request::write(stream, out.as_bytes()).await {
                finished = false;
                // The client went away: nobody reads the answer.
                x.cancel.cancel();
                return;
            }
            if ended || x.over() {
                return;
            }
            if request::unless_hung_up(stream, ready).await.is_none() {
                x.cancel.cancel();
                return;
            }
        }
    };
    futures_lite::future::zip(relay, writer).await;
    match refused {
        Some(r) => Answered::Whole(r),
        None => Answered::Streamed { again: finished },
    }
}
