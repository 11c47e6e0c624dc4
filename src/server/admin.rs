//! The operator endpoints on a listener of their own (`server.admin_listen`,
//! loopback by default): `/metrics`, the detailed `/readyz` and the page
//! drawn from it (`/`, the operator view) say which
//! upstream keys are in use, how much memory the box holds and which
//! breakers are open, which is nobody's business on the client port.
//!
//! Its sockets are not the client port's: a slowloris attack on the
//! client port fills the client handshake table, never this one, so the
//! scrape that would show the attack still gets through. They have a
//! small bound of their own and the same head deadline.

use super::http::{self, HeadError, Response};
use super::{probes, Gateway};
use async_io::{Async, Timer};
use futures_lite::FutureExt;
use std::cell::Cell;
use std::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::time::Duration;

/// Admin sockets served at once; past it a new one is closed at once.
const MAX_SOCKETS: u32 = 16;

/// Accepts operator requests for ever.
pub async fn accept_loop(gw: Rc<Gateway>, listener: Async<TcpListener>) {
    let open = Rc::new(Cell::new(0u32));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                gw.log.warn("admin accept failed", &[("error", &e)]);
                Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.get() >= MAX_SOCKETS {
            continue;
        }
        open.set(open.get() + 1);
        let (g, o) = (gw.clone(), open.clone());
        gw.spawn(Box::pin(async move {
            serve(&g, stream).await;
            o.set(o.get() - 1);
        }));
    }
}

async fn serve(gw: &Gateway, mut stream: Async<TcpStream>) {
    let timeout = gw.cfg.server.handshake_timeout;
    let read = async { Some(http::read_head(&mut stream).await) }
        .or(async {
            Timer::after(timeout).await;
            None
        })
        .await;
    let head = match read {
        Some(Ok((head, _))) => head,
        Some(Err(HeadError::Closed)) | None => return,
        Some(Err(_)) => {
            Response::text(400, "malformed request\n")
                .send(&mut stream)
                .await;
            return;
        }
    };
    let get = head.method == "GET" || head.method == "HEAD";
    // A browser page rebinding its name to 127.0.0.1 must not read these.
    let host_ok = head.hosts <= 1 && gw.live.borrow().host_allowed(head.host.as_deref());
    let response = match head.route() {
        _ if !host_ok => Response::text(421, "this box does not answer to that Host name\n"),
        "/metrics" if get => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            probes::metrics_page(gw),
        ),
        "/readyz" if get => probes::readyz(gw, true),
        "/healthz" if get => Response::text(200, "ok\n"),
        "/" if get => gw.web.ops(),
        "/favicon.ico" if get => gw.web.icon(),
        "/metrics" | "/readyz" | "/healthz" | "/" | "/favicon.ico" => {
            Response::text(405, "method not allowed\n").header("Allow", "GET, HEAD")
        }
        _ => Response::text(
            404,
            "not found: this port serves / (the operator view), /metrics, /readyz and /healthz\n",
        ),
    };
    Response {
        head_only: head.method == "HEAD",
        ..response
    }
    .send(&mut stream)
    .await;
}
