//! Raw WebSocket clients for the benchmarks: frames written and read by
//! hand, so the client costs little next to the gateway it measures.

use async_io::Async;
use std::net::{SocketAddr, TcpStream};

/// A masked client text frame.
pub fn text_frame(payload: &str) -> Vec<u8> {
    let p = payload.as_bytes();
    let mut f = vec![0x81];
    match p.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend((n as u16).to_be_bytes());
        }
    }
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    f.extend(mask);
    f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads server frames (unmasked) from a raw socket, cheaply.
pub struct FrameReader {
    pub buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    fn new() -> FrameReader {
        FrameReader {
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        }
    }

    /// The next whole frame in the buffer: (opcode, payload range).
    pub fn next(&mut self) -> Option<(u8, std::ops::Range<usize>)> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return None;
        }
        let (len, header) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if b.len() < header + len {
            return None;
        }
        let op = b[0] & 0x0f;
        let range = self.start + header..self.start + header + len;
        self.start += header + len;
        Some((op, range))
    }

    pub async fn fill(&mut self, s: &mut Async<TcpStream>) -> std::io::Result<usize> {
        use futures_lite::AsyncReadExt;
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let n = self.buf.len() * 2;
            self.buf.resize(n, 0);
        }
        let n = s.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// Upgrades a raw socket, says hello and joins `room`; waits for `joined`.
pub async fn raw_member(
    addr: SocketAddr,
    room: &str,
) -> Result<(Async<TcpStream>, FrameReader), String> {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let mut s = Async::<TcpStream>::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed during the handshake".into());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(format!("refused: {}", String::from_utf8_lossy(&head)));
    }
    let mut out = text_frame(r#"{"op":"hello","client":"bench/1"}"#);
    out.extend(text_frame(&format!(
        r#"{{"op":"join","room":"{room}","history":0}}"#
    )));
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut r = FrameReader::new();
    loop {
        while let Some((_, range)) = r.next() {
            if r.buf[range].starts_with(b"{\"op\":\"joined\"") {
                return Ok((s, r));
            }
        }
        if r.fill(&mut s).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed before joined".into());
        }
    }
}

/// A member of `room` that counts the text frames it receives (those
/// starting with `only`) until `stop`.
async fn counting_member(
    addr: SocketAddr,
    room: &str,
    only: &'static [u8],
    received: std::rc::Rc<std::cell::Cell<u64>>,
    stop: std::rc::Rc<std::cell::Cell<bool>>,
) -> Result<impl std::future::Future<Output = ()>, String> {
    let (mut s, mut r) = raw_member(addr, room).await?;
    Ok(async move {
        while !stop.get() {
            while let Some((op, range)) = r.next() {
                if op == 1 && r.buf[range].starts_with(only) {
                    received.set(received.get() + 1);
                }
            }
            if r.fill(&mut s).await.map_or(true, |n| n == 0) {
                return;
            }
        }
    })
}

/// A member of `room` that keeps `window` publishes in flight until `stop`.
async fn pipelined_publisher(
    addr: SocketAddr,
    room: &str,
    tag: usize,
    window: usize,
    stop: std::rc::Rc<std::cell::Cell<bool>>,
) -> Result<impl std::future::Future<Output = ()>, String> {
    use futures_lite::AsyncWriteExt;
    let (mut s, mut r) = raw_member(addr, room).await?;
    let room = room.to_string();
    Ok(async move {
        let mut in_flight = 0;
        let mut n = 0u64;
        while !stop.get() {
            let mut out = Vec::new();
            while in_flight < window {
                out.extend(text_frame(&format!(
                    r#"{{"op":"publish","room":"{room}","text":"benchmark message {tag}-{n}","request_id":"{tag}-{n}"}}"#
                )));
                n += 1;
                in_flight += 1;
            }
            if !out.is_empty() && s.write_all(&out).await.is_err() {
                return;
            }
            if r.fill(&mut s).await.map_or(true, |n| n == 0) {
                return;
            }
            while let Some((_, range)) = r.next() {
                let f = &r.buf[range];
                if f.starts_with(b"{\"op\":\"ack\"") || f.starts_with(b"{\"op\":\"error\"") {
                    in_flight -= 1;
                }
            }
        }
    })
}

/// What [`count_deliveries`] counted.
pub struct Counted {
    pub delivered: u64,
    pub seconds: f64,
    /// `probe` at the end less `probe` at the start of the count.
    pub probed: f64,
}

/// Publishers keeping this many publishes in flight each.
pub const WINDOW: usize = 32;

/// `members` members of `room` at `to` count the frames they get that
/// start with `only`; `publishers` publishers at `from` keep [`WINDOW`]
/// publishes in flight each. After a second of warm-up, counts over
/// `seconds`; `probe` (the gateway's CPU time, say) is read at the start
/// and the end of the count.
pub fn count_deliveries(
    (from, to): (SocketAddr, SocketAddr),
    room: &str,
    only: &'static [u8],
    (members, publishers): (usize, usize),
    seconds: usize,
    probe: impl Fn() -> f64,
) -> Result<Counted, String> {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::{Duration, Instant};
    let ex = Rc::new(hivegate::executor::Executor::new());
    let received = Rc::new(Cell::new(0u64));
    let stop = Rc::new(Cell::new(false));
    async_io::block_on(ex.run(async {
        let mut readers = Vec::new();
        for _ in 0..members {
            let counting = counting_member(to, room, only, received.clone(), stop.clone());
            readers.push(ex.spawn(counting.await?));
        }
        // Presence of all those joins goes out within a few 100 ms.
        async_io::Timer::after(Duration::from_secs(1)).await;
        for p in 0..publishers {
            let publishing = pipelined_publisher(from, room, p, WINDOW, stop.clone());
            ex.spawn(publishing.await?).detach();
        }
        async_io::Timer::after(Duration::from_secs(1)).await;
        let (r0, p0, t0) = (received.get(), probe(), Instant::now());
        async_io::Timer::after(Duration::from_secs(seconds as u64)).await;
        let (r1, p1, elapsed) = (received.get(), probe(), t0.elapsed().as_secs_f64());
        stop.set(true);
        drop(readers);
        Ok(Counted {
            delivered: r1 - r0,
            seconds: elapsed,
            probed: p1 - p0,
        })
    }))
}
