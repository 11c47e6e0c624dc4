//! The socket as a connection task reads it: fair to the other tasks, and
//! bounded in what a client may send without ever completing a message.
//!
//! The event loop is one thread, and a task runs until it returns
//! `Pending`. A client that floods its socket (pings at 100 MB/s, or
//! endless empty continuation frames, which the WebSocket library folds
//! into one message that never ends) would keep its task's reads ready
//! for ever, and nobody else would be served. So:
//!
//! - each task reads at most [`TURN_BYTES`] before it yields to the others
//!   (it is woken again at once: a fast client is slowed, not stopped);
//! - bytes read since the last whole message (text, ping, pong, close) are
//!   counted, and past [`Intake::max_unfinished`] the read fails: the
//!   connection is closed 1008 as abusive.

use futures_lite::io::{AsyncRead, AsyncWrite};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Bytes one connection may read in one turn of the event loop.
pub const TURN_BYTES: usize = 64 * 1024;

pub struct Intake<S> {
    inner: S,
    /// Bytes read in this turn.
    turn: usize,
    /// Bytes read since the last whole message.
    unfinished: usize,
    max_unfinished: usize,
    /// Set when the client went past `max_unfinished`.
    flooded: bool,
}

impl<S> Intake<S> {
    /// `max_message_bytes`: the largest message accepted. A message may
    /// take twice that on the wire (fragment headers), plus a turn.
    pub fn new(inner: S, max_message_bytes: usize) -> Intake<S> {
        Intake {
            inner,
            turn: 0,
            unfinished: 0,
            max_unfinished: max_message_bytes.saturating_mul(2) + TURN_BYTES,
            flooded: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A whole message arrived: what came before it was not a flood.
    pub fn message_done(&mut self) {
        self.unfinished = 0;
    }

    /// Whether reading stopped because the client sent too much without
    /// finishing a message.
    pub fn flooded(&self) -> bool {
        self.flooded
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Intake<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.unfinished > this.max_unfinished {
            this.flooded = true;
            return Poll::Ready(Err(io::Error::other(
                "too many bytes without a complete message",
            )));
        }
        if this.turn >= TURN_BYTES {
            // Let the others run; come back at the end of the queue.
            this.turn = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let want = buf.len().min(TURN_BYTES - this.turn);
        match Pin::new(&mut this.inner).poll_read(cx, &mut buf[..want]) {
            Poll::Ready(Ok(n)) => {
                this.turn += n;
                this.unfinished += n;
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                // Nothing to read: this turn is over anyway.
                this.turn = 0;
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Intake<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{future, AsyncReadExt};

    /// A reader that always has more.
    struct Endless;

    impl AsyncRead for Endless {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            buf.fill(0);
            Poll::Ready(Ok(buf.len()))
        }
    }

    #[test]
    fn yields_after_a_turn_and_fails_a_flood() {
        let mut intake = Intake::new(Endless, 1000);
        let mut buf = vec![0u8; 4096];
        let waker =
            futures_lite::future::block_on(future::poll_fn(|cx| Poll::Ready(cx.waker().clone())));
        let mut cx = Context::from_waker(&waker);
        let mut read = 0;
        let pending = loop {
            match Pin::new(&mut intake).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(n)) => read += n,
                Poll::Pending => break true,
                Poll::Ready(Err(_)) => break false,
            }
            // A message now and then keeps the flood check quiet.
            intake.message_done();
        };
        assert!(pending);
        assert_eq!(read, TURN_BYTES, "one turn's worth, then a yield");
        // Without a message, reading stops past the bound.
        let mut total = 0;
        let err = future::block_on(async {
            loop {
                match intake.read(&mut buf).await {
                    Ok(n) => total += n,
                    Err(e) => return e,
                }
            }
        });
        assert!(intake.flooded(), "{err}");
        assert!(total <= 2000 + TURN_BYTES + buf.len());
    }
}
