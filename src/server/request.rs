//! A request to one of the HTTP APIs (MCP's Streamable HTTP at `/mcp`,
//! the OpenAI-compatible endpoint under `/v1/`), from its head to its
//! answer. Admission is the WebSocket's: the request is read under the
//! handshake deadline and caps, the `Origin` is checked against the
//! allowed ones (a browser page must not reach the box's APIs from
//! another site), the token comes as `Authorization: Bearer` (open mode
//! as for `/ws`), and the body is bounded by `server.max_message_bytes`.
//! While it is served, a request holds a place under the connection caps.
//! An MCP response closes its connection. An OpenAI-compatible client's
//! connection is kept for its next request (its SDK's pool expects it,
//! and a new connection per call costs more than the relay itself): it
//! keeps its place under the caps, which bound such sockets, and its next
//! request must come within the handshake's time.

use super::http::{Head, Response};
use super::tls::Socket;
use super::{mcp_http, openai_http, Gateway};
use crate::auth::Identity;
use crate::ops::metrics::Refusal;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::net::IpAddr;
use std::rc::Rc;

/// Bytes a client may send after its request before it is taken to be
/// misbehaving and is let go.
const MAX_AFTER_REQUEST: usize = 4096;

/// Requests one kept-alive connection may carry.
const MAX_REQUESTS: u32 = 1000;

/// Which API a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Mcp,
    OpenAi,
}

impl Api {
    /// The API served at `route`, if any.
    pub fn at(route: &str) -> Option<Api> {
        match route {
            "/mcp" => Some(Api::Mcp),
            r if r.starts_with("/v1/") => Some(Api::OpenAi),
            _ => None,
        }
    }

    /// A refusal in the API's own shape (OpenAI's clients read JSON
    /// errors; MCP's transport errors are plain text).
    pub fn shaped(self, r: Response) -> Response {
        match self {
            Api::Mcp => r,
            Api::OpenAi => openai_http::shaped(r),
        }
    }
}

/// A request that passed admission, with its body.
pub struct Admitted {
    pub api: Api,
    pub head: Head,
    pub body: String,
    /// `None`: open mode without a token (a guest).
    pub who: Option<Rc<Identity>>,
    /// Where the connection comes from, and this request's client.
    pub source: super::Source,
    pub ip: IpAddr,
}

/// In the handshake phase: method, drain, origin, token, body.
pub async fn admit(
    gw: &Gateway,
    api: Api,
    head: Head,
    leftover: Vec<u8>,
    stream: &mut Socket,
    source: super::Source,
    ip: IpAddr,
) -> Result<Admitted, Response> {
    let refuse = |why: Refusal, r: Response| {
        gw.metrics.refused(why);
        r
    };
    let methods = match api {
        Api::Mcp => mcp_http::METHODS,
        Api::OpenAi => openai_http::methods(head.route()),
    };
    if !methods.contains(&head.method.as_str()) {
        let text = match api {
            Api::Mcp => {
                "MCP: POST a JSON-RPC message, GET the session's stream, or DELETE a session\n"
                    .to_string()
            }
            Api::OpenAi if methods.is_empty() => return Err(Response::text(
                404,
                "not found: the OpenAI-compatible API has /v1/chat/completions and /v1/models\n",
            )),
            Api::OpenAi => format!("{} takes {}\n", head.route(), methods.join(", ")),
        };
        return Err(Response::text(405, text).header("Allow", methods.join(", ")));
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
            api,
            head,
            body: String::new(),
            who,
            source,
            ip,
        });
    }
    let Some(len) = head.content_length.filter(|_| !head.chunked) else {
        return Err(Response::text(411, "send the body with a Content-Length\n"));
    };
    if len > gw.cfg.server.max_message_bytes {
        return Err(Response::text(
            413,
            format!(
                "a request may have at most {} bytes (server.max_message_bytes)\n",
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
    Ok(Admitted {
        api,
        head,
        body,
        who,
        source,
        ip,
    })
}

/// Answers an admitted request; for a stream, for as long as it runs.
/// An OpenAI-compatible client's connection stays open for its next
/// request (as its SDK's connection pool expects) after a whole answer:
/// at most [`MAX_REQUESTS`], each head within `server.handshake_timeout_ms`.
pub async fn serve(gw: &Rc<Gateway>, mut a: Admitted, mut stream: Socket) {
    // A request (a stream above all) holds a place under the same caps as
    // a WebSocket, for as long as it is served, kept-alive time included:
    // the first request's client's (behind a proxy that reuses its
    // connections, later requests may be others', each limited as itself).
    let held_ip = a.ip;
    let held = gw.table.borrow_mut().hold(held_ip);
    for served in 1.. {
        let keep =
            held.is_ok() && a.api == Api::OpenAi && a.head.keep_alive && served < MAX_REQUESTS;
        let ip = a.ip;
        let answered = match held {
            Ok(()) => match a.api {
                Api::Mcp => match mcp_http::answer(gw, &a, &mut stream, ip).await {
                    Some(r) => Answered::Whole(r),
                    None => Answered::Streamed { again: false },
                },
                Api::OpenAi => openai_http::answer(gw, &a, &mut stream, ip, keep).await,
            },
            Err(full) => Answered::Whole(a.api.shaped(gw.cap_refusal(full, ip))),
        };
        let again = match answered {
            Answered::Whole(mut r) => {
                r.keep_alive = keep && !gw.draining.get();
                r.send(&mut stream).await;
                r.keep_alive
            }
            Answered::Streamed { again } => again && !gw.draining.get(),
        };
        if !again {
            break;
        }
        // The next head and body within the handshake's time, as a new
        // connection's.
        let deadline = async {
            async_io::Timer::after(gw.cfg.server.handshake_timeout).await;
            Err(None)
        };
        match futures_lite::future::or(next(gw, &mut stream, a.source), deadline).await {
            Ok(next) => a = next,
            Err(Some(r)) => {
                Api::OpenAi.shaped(r).send(&mut stream).await;
                break;
            }
            Err(None) => break,
        }
    }
    let _ = stream.close().await;
    if held.is_ok() {
        gw.table.borrow_mut().release(held_ip);
    }
}

/// The next request on a kept-alive connection, read and admitted as a
/// first one is; `Err` with the answer that refuses it, or `None` when
/// the client closed, stayed silent, or asked for something not under
/// `/v1/`.
async fn next(
    gw: &Gateway,
    stream: &mut Socket,
    source: super::Source,
) -> Result<Admitted, Option<Response>> {
    let (head, leftover) = super::http::read_head(stream).await.map_err(|_| None)?;
    let ip = source.client(gw, &head);
    if let Some(r) = super::wrong_host(gw, &head, ip) {
        return Err(Some(r));
    }
    if Api::at(head.route()) != Some(Api::OpenAi) {
        return Err(None);
    }
    admit(gw, Api::OpenAi, head, leftover, stream, source, ip)
        .await
        .map_err(Some)
}

/// Resolves when the client hangs up: its side of the socket ends or
/// fails, or it sends more than a client that waits for its answer
/// would. Dropping it reads nothing more, so it can be raced against
/// whatever the answer waits for.
pub async fn hung_up(stream: &mut Socket) {
    let (mut buf, mut extra) = ([0u8; 512], 0);
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                extra += n;
                if extra > MAX_AFTER_REQUEST {
                    return;
                }
            }
        }
    }
}

/// Whether the client hung up before `until` resolved: `until`'s value,
/// or `None` once the client is gone.
pub async fn unless_hung_up<T>(
    stream: &mut Socket,
    until: impl std::future::Future<Output = T>,
) -> Option<T> {
    futures_lite::future::or(async { Some(until.await) }, async {
        hung_up(stream).await;
        None
    })
    .await
}

/// Writes `bytes` and flushes them; `false` when the client is gone.
pub async fn write(stream: &mut Socket, bytes: &[u8]) -> bool {
    stream.write_all(bytes).await.is_ok() && stream.flush().await.is_ok()
}

/// The head of an answer streamed as server-sent events, with `extra`
/// header lines (each ending in CRLF). `kept`: the events go in HTTP
/// chunks and the connection stays open after them; otherwise its end
/// ends the stream.
pub fn sse_head(kept: bool, extra: &str) -> String {
    let connection = if kept {
        "keep-alive\r\nTransfer-Encoding: chunked"
    } else {
        "close"
    };
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: {connection}\r\nX-Content-Type-Options: nosniff\r\n{extra}\r\n"
    )
}

/// How a request was answered.
pub enum Answered {
    /// With one response, to send.
    Whole(Response),
    /// As a stream, already sent; `again`: it ended cleanly and the
    /// connection may carry the next request.
    Streamed { again: bool },
}
