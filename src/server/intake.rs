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
//!
//! It also keeps the memory of an idle connection small. The WebSocket
//! library keeps a read buffer per connection for the connection's life,
//! and reads the socket in pieces of that buffer's size. So the library's
//! buffer is small ([`LIBRARY_READ_BYTES`]), and the socket is read here
//! into one buffer shared by every connection of the event loop: what the
//! library has not taken yet waits in the connection's spill, which is
//! empty (and holds no memory) once a message has been taken whole.
//!
//! And it writes the hub's frames: they are encoded once for every
//! recipient, and go from the outbox to the socket in one vectored write,
//! without the library copying each into its buffer. A frame the socket
//! took in part is finished before any other byte is written, the
//! library's (pongs, close frames) included.

use crate::hub::Frame;
use futures_lite::io::{AsyncRead, AsyncWrite};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// Bytes one connection may read in one turn of the event loop.
pub const TURN_BYTES: usize = 64 * 1024;

/// The WebSocket library's own read buffer (`read_buffer_size`): held by
/// every connection for its life, so small. A message longer than this
/// grows it (up to `server.max_message_bytes`).
pub const LIBRARY_READ_BYTES: usize = 128;

/// The most one read of a socket takes: the size of the buffer every
/// connection of the event loop shares.
const SHARED_READ_BYTES: usize = 16 * 1024;

thread_local! {
    /// The event loop is one thread, and a read is copied out of this
    /// before anything else runs.
    static SHARED: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SHARED_READ_BYTES].into_boxed_slice());
}

pub struct Intake<S> {
    inner: S,
    // u32s: this is part of every connection's state, and no count here
    // passes 2 x 16 MiB (the largest message) and a turn.
    /// Bytes read in this turn.
    turn: u32,
    /// Bytes read since the last whole message.
    unfinished: u32,
    max_unfinished: u32,
    /// Set when the client went past `max_unfinished`.
    flooded: bool,
    /// Whether the last read found the socket empty (so the socket's
    /// readiness says when to read again).
    drained: bool,
    /// Bytes read from the socket that the library has not taken yet, from
    /// `spill_at` on.
    spill: Vec<u8>,
    spill_at: u32,
    /// How much of `partial` the socket has taken.
    partial_at: u32,
    /// A frame the socket took in part.
    partial: Option<Frame>,
}

/// Frames in one vectored write: most writes carry a few, and the slice
/// array is made on every call.
const FRAMES_PER_WRITE: usize = 16;

impl<S> Intake<S> {
    /// `max_message_bytes`: the largest message accepted. A message may
    /// take twice that on the wire (fragment headers), plus a turn.
    pub fn new(inner: S, max_message_bytes: usize) -> Intake<S> {
        Intake {
            inner,
            turn: 0,
            unfinished: 0,
            max_unfinished: u32::try_from(max_message_bytes.saturating_mul(2) + TURN_BYTES)
                .unwrap_or(u32::MAX),
            flooded: false,
            drained: false,
            spill: Vec::new(),
            spill_at: 0,
            partial_at: 0,
            partial: None,
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

    /// Whether everything the client sent has been read: the last read
    /// found the socket empty (not a yield at the end of a turn), and
    /// nothing waits in the spill.
    pub fn drained(&self) -> bool {
        self.drained
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Intake<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if (this.spill_at as usize) < this.spill.len() {
            return Poll::Ready(Ok(this.take_spill(buf)));
        }
        if this.unfinished > this.max_unfinished {
            this.flooded = true;
            return Poll::Ready(Err(io::Error::other(
                "too many bytes without a complete message",
            )));
        }
        if this.turn as usize >= TURN_BYTES {
            // Let the others run; come back at the end of the queue.
            this.turn = 0;
            this.drained = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // Never past the flood bound by more than a byte, however large
        // the shared buffer.
        let want = SHARED_READ_BYTES
            .min(TURN_BYTES - this.turn as usize)
            .min((this.max_unfinished - this.unfinished).max(1) as usize);
        let read = SHARED.with_borrow_mut(|shared| {
            let shared = &mut shared[..want];
            let read = Pin::new(&mut this.inner).poll_read(cx, shared);
            if let Poll::Ready(Ok(n)) = read {
                // What does not fit waits for the library's next read.
                let given = n.min(buf.len());
                buf[..given].copy_from_slice(&shared[..given]);
                if n > given {
                    this.spill.extend_from_slice(&shared[given..n]);
                }
            }
            read
        });
        this.drained = read.is_pending();
        match read {
            Poll::Ready(Ok(n)) => {
                // n is at most SHARED_READ_BYTES.
                this.turn += n as u32;
                this.unfinished = this.unfinished.saturating_add(n as u32);
                Poll::Ready(Ok(n.min(buf.len())))
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

impl<S> Intake<S> {
    /// Gives the library what it can take of the spill; the spill's memory
    /// goes once it is all taken.
    fn take_spill(&mut self, buf: &mut [u8]) -> usize {
        let rest = &self.spill[self.spill_at as usize..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        // The spill is at most one shared read.
        self.spill_at += n as u32;
        if self.spill_at as usize == self.spill.len() {
            self.spill = Vec::new();
            self.spill_at = 0;
        }
        n
    }
}

impl<S: AsyncWrite + Unpin> Intake<S> {
    /// Writes `frames`, oldest first, in one vectored write, after the
    /// frame the socket took in part last time. Returns how many of
    /// `frames` the socket took (the last of them perhaps in part: it is
    /// kept here, and finished first next time); `Pending` while the socket
    /// is full (the waker is registered).
    pub fn poll_write_frames<'a>(
        &mut self,
        cx: &mut Context<'_>,
        frames: impl Iterator<Item = &'a Frame> + Clone,
    ) -> Poll<io::Result<usize>> {
        match self.poll_finish_partial(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let mut slices = [IoSlice::new(&[]); FRAMES_PER_WRITE];
        let (mut n, mut total) = (0, 0);
        for (slice, f) in slices.iter_mut().zip(frames.clone()) {
            *slice = IoSlice::new(f.wire());
            n += 1;
            total += slice.len();
        }
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut written = match Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..n]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(w)) => w,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        if written >= total {
            return Poll::Ready(Ok(n));
        }
        for (i, f) in frames.take(n).enumerate() {
            let len = f.wire().len();
            if written < len {
                // u32: a frame is at most the outbox's byte bound.
                self.partial_at = written as u32;
                self.partial = Some(Rc::clone(f));
                return Poll::Ready(Ok(i + 1));
            }
            written -= len;
        }
        Poll::Ready(Ok(n))
    }

    /// Writes the rest of the frame the socket took in part, if any.
    fn poll_finish_partial(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(f) = &self.partial {
            let rest = &f.wire()[self.partial_at as usize..];
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(w)) if w == rest.len() => {
                    self.partial = None;
                    self.partial_at = 0;
                }
                Poll::Ready(Ok(w)) => self.partial_at += w as u32,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Whether a frame waits to be finished.
    pub fn writing(&self) -> bool {
        self.partial.is_some()
    }
}

/// The library's own writes (pongs, pings, close frames) come after a
/// frame the socket took in part.
impl<S: AsyncWrite + Unpin> AsyncWrite for Intake<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_finish_partial(cx))?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_finish_partial(cx))?;
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

    /// A reader with a fixed text, then the end.
    struct Text(&'static [u8]);

    impl AsyncRead for Text {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.0.len().min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn small_reads_get_every_byte_in_order_and_the_spill_is_let_go() {
        let text: &'static [u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut intake = Intake::new(Text(text), 1000);
        let mut got = Vec::new();
        let mut buf = [0u8; 5];
        future::block_on(async {
            loop {
                match intake.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        assert_eq!(got, text);
        assert_eq!(
            intake.spill.capacity(),
            0,
            "no memory held once all is taken"
        );
    }

    /// A socket that takes at most `step` bytes a write, and keeps them.
    struct Narrow {
        step: usize,
        got: Vec<u8>,
    }

    impl AsyncWrite for Narrow {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_frame_taken_in_part_is_finished_before_anything_else() {
        use crate::hub::frame;
        use futures_lite::AsyncWriteExt;
        let frames = [frame("first".into()), frame("second".into())];
        let mut intake = Intake::new(
            Narrow {
                step: 4,
                got: Vec::new(),
            },
            1000,
        );
        let taken = future::block_on(future::poll_fn(|cx| {
            intake.poll_write_frames(cx, frames.iter())
        }))
        .unwrap();
        // A default vectored write takes from the first slice only.
        assert_eq!(taken, 1);
        assert!(intake.writing());
        // The library's own frame (a pong) waits for the rest of it.
        future::block_on(intake.write_all(b"PONG")).unwrap();
        assert!(!intake.writing());
        let taken = future::block_on(future::poll_fn(|cx| {
            intake.poll_write_frames(cx, frames[1..].iter())
        }))
        .unwrap();
        assert_eq!(taken, 1);
        future::block_on(future::poll_fn(|cx| {
            intake.poll_write_frames(cx, std::iter::empty())
        }))
        .unwrap();
        let mut want = frames[0].wire().to_vec();
        want.extend_from_slice(b"PONG");
        want.extend_from_slice(frames[1].wire());
        assert_eq!(intake.inner.got, want);
    }
}
