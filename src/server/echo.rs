//! A WebSocket that echoes every message back, served at `/ws-echo` only
//! when `server.echo_endpoint` is set. It exists for conformance runs
//! (Autobahn|Testsuite): they test the gateway's WebSocket layer (framing,
//! fragments, UTF-8, the close handshake, the intake's bounds) as clients
//! meet it, without the chat protocol in the way. It goes through the same
//! admission, connection table and intake as `/ws`.

use super::conn::{drain_input, ws_error_close, WsStream};
use super::Gateway;
use crate::protocol::Close;
use async_io::Timer;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::Message;
use futures_lite::{FutureExt, StreamExt};
use std::time::Duration;

/// Echoes until the client closes or breaks the protocol, then closes with
/// the code RFC 6455 asks for.
pub async fn run(gw: &Gateway, ws: &mut WsStream) {
    let close = loop {
        match ws.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                if ws.send(m).await.is_err() {
                    break Close::Abnormal;
                }
            }
            // Pings are answered and a close is returned by tungstenite
            // itself, on the next read.
            Some(Ok(_)) => {}
            None => break Close::Normal,
            Some(Err(_)) if ws.get_ref().flooded() => break Close::Policy,
            Some(Err(e)) => break ws_error_close(&e).0,
        }
    };
    gw.metrics.closed(close.code());
    if close == Close::Normal || close == Close::Abnormal {
        return;
    }
    let frame = CloseFrame {
        code: CloseCode::from(close.code()),
        reason: "".into(),
    };
    async {
        let _ = ws.close(Some(frame)).await;
        let _ = ws
            .get_ref()
            .get_ref()
            .tcp()
            .shutdown(std::net::Shutdown::Write);
        drain_input(ws).await;
    }
    .or(async {
        Timer::after(Duration::from_secs(2)).await;
    })
    .await;
}
