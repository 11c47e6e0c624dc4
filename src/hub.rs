//! The connection table: a slab sized once at start-up, the count of
//! connections per client IP, and each connection's bounded outbound queue.
//!
//! Everything another task may need to reach a connection (its outbox, the
//! waker of its task, a request to close) lives here, so delivering a frame
//! to a member is a slab lookup and a push, never a channel per connection.

use crate::limit::{InFlight, RateMeter};
use crate::protocol::{error_frame, Close, ErrorCode};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::rc::Rc;
use std::task::Waker;
use std::time::Instant;

/// The most frames `server.outbox_frames` may allow in one outbound queue.
pub const MAX_OUTBOX_FRAMES: usize = 64;

/// Requests of one connection still running in their own tasks (store
/// writes, history reads, tool calls); past it, `OVER_CAPACITY`.
pub const MAX_IN_FLIGHT: u32 = 32;

/// Work a request started that outlives the frame that asked for it: the
/// caller spawns it on the event loop.
pub type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// A server frame, encoded once for every recipient: queueing it is a
/// reference-count increment, and writing it is one slice of a vectored
/// write, straight to the socket (see `Intake::poll_write_frames`).
pub type Frame = Rc<Encoded>;

/// A text message as it goes on the wire: the WebSocket header (a server's
/// frames are not masked) and the text, in one allocation.
pub struct Encoded {
    wire: Box<[u8]>,
    /// Where the text starts in `wire`.
    header: u8,
}

impl Encoded {
    /// The text's length: what the outbox's byte bound counts.
    pub fn len(&self) -> usize {
        self.wire.len() - self.header as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole frame, header and text.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    pub fn text(&self) -> &str {
        // Made from a String, and only the header is before it.
        std::str::from_utf8(&self.wire[self.header as usize..]).unwrap_or_default()
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({} bytes of text)", self.len())
    }
}

pub fn frame(text: String) -> Frame {
    // FIN and the text opcode, then the length in the shortest form
    // (RFC 6455 5.2).
    let n = text.len();
    let mut wire = Vec::with_capacity(n + 10);
    wire.push(0x81);
    match n {
        0..=125 => wire.push(n as u8),
        126..=0xffff => {
            wire.push(126);
            wire.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            wire.push(127);
            wire.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let header = wire.len() as u8;
    wire.extend_from_slice(text.as_bytes());
    Rc::new(Encoded {
        wire: wire.into_boxed_slice(),
        header,
    })
}

/// Why a connection cannot be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Global,
    Ip,
}

/// What happened to a frame offered to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// The queue was full: the connection has been marked for close 4008.
    SlowConsumer,
    /// The connection is gone or already closing.
    Gone,
}

/// What happened to frames offered to a connection together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handed {
    pub queued: u32,
    /// One did not fit: the connection has been marked for close 4008.
    pub slow: bool,
}

/// A connection's outbound queue, bounded in frames and in bytes.
///
/// A growable queue held to the bound, not a fixed-capacity one: an
/// inline array of 64 pointers was 512 bytes on every connection, most of
/// which are idle with nothing queued. This one holds what a connection's
/// busiest moment needed (a few pointers for most).
#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Frame>,
    bytes: usize,
}

impl Outbox {
    pub fn pop(&mut self) -> Option<Frame> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.len();
        Some(f)
    }

    /// Drops the oldest `n` frames (the socket took them); returns how
    /// many there were and their bytes.
    pub fn take(&mut self, n: usize) -> (u32, u64) {
        let n = n.min(self.frames.len());
        let bytes: usize = self.frames.drain(..n).map(|f| f.len()).sum();
        self.bytes -= bytes;
        (n as u32, bytes as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The queued frames, oldest first, without taking them.
    pub fn frames(&self) -> impl Iterator<Item = &Frame> + Clone {
        self.frames.iter()
    }
}

#[derive(Debug)]
pub struct Entry {
    pub ip: IpAddr,
    /// The connection's id (slab keys are reused; ids are not).
    pub id: u64,
    pub outbox: Outbox,
    /// The connection task, to wake when a frame or a close request arrives.
    pub waker: Option<Waker>,
    /// A close the task must carry out (slow consumer, shutdown).
    pub close_request: Option<Close>,
    /// Messages received from this client, per second.
    pub messages: RateMeter<10>,
    /// Who signed in on it (after `hello`): a reload re-checks its rooms
    /// against the new access rules.
    pub who: Option<Rc<crate::auth::Identity>>,
}

pub struct Table {
    slab: Slab<Entry>,
    capacity: usize,
    /// Places held by long-lived requests that are not WebSocket
    /// connections (MCP's HTTP streams): they count against both caps.
    held: usize,
    per_ip: HashMap<IpAddr, u32>,
    max_per_ip: u32,
    outbox_frames: usize,
    outbox_bytes: usize,
}

impl Table {
    pub fn new(
        capacity: usize,
        max_per_ip: u32,
        outbox_frames: usize,
        outbox_bytes: usize,
    ) -> Table {
        Table {
            slab: Slab::with_capacity(capacity),
            capacity,
            held: 0,
            per_ip: HashMap::new(),
            max_per_ip,
            outbox_frames: outbox_frames.min(MAX_OUTBOX_FRAMES),
            outbox_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn ip_count(&self, ip: IpAddr) -> u32 {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }

    /// Whether a connection from `ip` would be admitted now.
    pub fn check(&self, ip: IpAddr) -> Result<(), Full> {
        if self.slab.len() + self.held >= self.capacity {
            Err(Full::Global)
        } else if self.ip_count(ip) >= self.max_per_ip {
            Err(Full::Ip)
        } else {
            Ok(())
        }
    }

    /// Takes a slot. The slab never grows past the capacity it was made
    /// with, so a slot is a reuse of freed memory or a first touch of
    /// memory reserved at start-up.
    pub fn insert(&mut self, ip: IpAddr, id: u64, now: Instant) -> Result<usize, Full> {
        self.check(ip)?;
        *self.per_ip.entry(ip).or_insert(0) += 1;
        Ok(self.slab.insert(Entry {
            ip,
            id,
            outbox: Outbox::default(),
            waker: None,
            close_request: None,
            messages: RateMeter::new(now),
            who: None,
        }))
    }

    /// Takes a place for a long-lived request from `ip` that has no slot
    /// (an MCP stream), under the same caps; give it back with
    /// [`Table::release`].
    pub fn hold(&mut self, ip: IpAddr) -> Result<(), Full> {
        self.check(ip)?;
        *self.per_ip.entry(ip).or_insert(0) += 1;
        self.held += 1;
        Ok(())
    }

    pub fn release(&mut self, ip: IpAddr) {
        if self.give_back(ip) {
            self.held -= 1;
        }
    }

    /// Frees a slot and the IP's share. Idempotent.
    pub fn remove(&mut self, key: usize) {
        if let Some(entry) = self.slab.try_remove(key) {
            self.give_back(entry.ip);
        }
    }

    /// Gives back one of `ip`'s places; false if it held none.
    fn give_back(&mut self, ip: IpAddr) -> bool {
        let Some(n) = self.per_ip.get_mut(&ip) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            self.per_ip.remove(&ip);
        }
        true
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut Entry> {
        self.slab.get_mut(key)
    }

    pub fn get(&self, key: usize) -> Option<&Entry> {
        self.slab.get(key)
    }

    /// Queues `frames`, in order, for the connection at `key` if it is
    /// still `id`, and wakes its task once: a room's fan-out hands each
    /// member all of a batch's frames in one call, one lookup and one
    /// wake-up for all of them. A slow consumer takes no frame after the
    /// one that did not fit.
    pub fn deliver_all(&mut self, key: usize, id: u64, frames: &[Frame]) -> Handed {
        let (max_frames, max_bytes) = (self.outbox_frames, self.outbox_bytes);
        let mut handed = Handed::default();
        let Some(e) = self.slab.get_mut(key) else {
            return handed;
        };
        // A connection closing for the shutdown still gets the answers to
        // what it asked (the drain waits for them); any other close takes
        // nothing more.
        let closing = e.close_request.is_some_and(|c| c != Close::GoingAway);
        if e.id != id || closing {
            return handed;
        }
        for f in frames {
            if e.outbox.frames.len() < max_frames && e.outbox.bytes + f.len() <= max_bytes {
                e.outbox.frames.push_back(f.clone());
                e.outbox.bytes += f.len();
                handed.queued += 1;
            } else {
                e.close_request = Some(Close::SlowConsumer);
                handed.slow = true;
                break;
            }
        }
        if let Some(w) = &e.waker {
            w.wake_by_ref();
        }
        handed
    }

    /// Queues a frame for the connection at `key` if it is still `id` (a
    /// slot taken over by another connection gets nothing) and wakes its
    /// task. A full queue makes the connection a slow consumer: it is asked
    /// to close with 4008 and gets no more frames, so it can never hold
    /// anyone else up.
    pub fn deliver_to(&mut self, key: usize, id: u64, f: &Frame) -> Delivery {
        match self.deliver_all(key, id, std::slice::from_ref(f)) {
            Handed { slow: true, .. } => Delivery::SlowConsumer,
            Handed { queued: 0, .. } => Delivery::Gone,
            _ => Delivery::Queued,
        }
    }

    /// Whether the connection at `key` (still `id`) has its outbox at most
    /// half full, with room there for `bytes` more: a stream the gateway
    /// makes itself holds back while it has not, rather than make its own
    /// client a slow consumer.
    pub fn has_room(&self, key: usize, id: u64, bytes: usize) -> bool {
        self.slab.get(key).is_some_and(|e| {
            e.id == id
                && e.outbox.frames.len() < self.outbox_frames / 2
                && e.outbox.bytes + bytes <= self.outbox_bytes / 2
        })
    }

    /// Asks a connection to close with `code`, unless it already is.
    pub fn request_close(&mut self, key: usize, close: Close) {
        if let Some(e) = self.slab.get_mut(key) {
            e.close_request.get_or_insert(close);
            if let Some(w) = &e.waker {
                w.wake_by_ref();
            }
        }
    }

    /// Asks every connection to close with `code` (shutdown).
    pub fn request_close_all(&mut self, close: Close) {
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.request_close(k, close);
        }
    }
}

/// Where the answers to one request go: the connection that asked (if it
/// is still there: a reused slot gets nothing), with the request's id.
/// While the request runs in its own task, the reply also holds its place
/// among the connection's requests in flight, freed when it is dropped.
pub struct Reply {
    table: Rc<RefCell<Table>>,
    pub key: usize,
    pub conn: u64,
    rid: Option<String>,
    in_flight: Option<InFlight>,
}

impl Reply {
    pub fn new(table: Rc<RefCell<Table>>, key: usize, conn: u64, rid: Option<&str>) -> Reply {
        Reply {
            table,
            key,
            conn,
            rid: rid.map(String::from),
            in_flight: None,
        }
    }

    pub fn rid(&self) -> Option<&str> {
        self.rid.as_deref()
    }

    /// Queues a frame for the connection that asked.
    pub fn send(&self, text: String) {
        self.table
            .borrow_mut()
            .deliver_to(self.key, self.conn, &frame(text));
    }

    pub fn error(&self, code: ErrorCode, message: &str, retry_after_ms: Option<u64>) {
        self.send(error_frame(self.rid(), code, message, retry_after_ms));
    }

    /// Whether the connection's outbox has room for `bytes` more and is at
    /// most half full (see [`Table::has_room`]).
    pub fn has_room(&self, bytes: usize) -> bool {
        self.table.borrow().has_room(self.key, self.conn, bytes)
    }

    /// Takes a place among the connection's requests in flight (`count`,
    /// at most `max`) for as long as this reply lives; when there is none,
    /// answers `OVER_CAPACITY` and returns false.
    pub fn begin(&mut self, count: &Rc<Cell<u32>>, max: u32) -> bool {
        match InFlight::try_take(count, max) {
            Some(slot) => {
                self.in_flight = Some(slot);
                true
            }
            None => {
                let msg = format!("at most {max} requests in flight per connection");
                self.error(ErrorCode::OverCapacity, &msg, Some(100));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn caps_globally_and_per_ip_and_reuses_slots() {
        let mut t = Table::new(3, 2, 4, 1024);
        let a = t.insert(ip(1), 7, Instant::now()).unwrap();
        t.insert(ip(1), 7, Instant::now()).unwrap();
        assert_eq!(t.insert(ip(1), 7, Instant::now()), Err(Full::Ip));
        let c = t.insert(ip(2), 7, Instant::now()).unwrap();
        assert_eq!(t.insert(ip(3), 7, Instant::now()), Err(Full::Global));
        t.remove(a);
        t.remove(a);
        assert_eq!(t.ip_count(ip(1)), 1);
        assert_eq!(
            t.insert(ip(3), 7, Instant::now()).unwrap(),
            a,
            "freed slot is reused"
        );
        t.remove(c);
        assert_eq!(t.ip_count(ip(2)), 0);
        assert!(!t.per_ip.contains_key(&ip(2)));
        assert_eq!(t.slab.capacity(), 3, "the slab never grows");
    }

    #[test]
    fn frames_carry_their_length_in_the_shortest_form() {
        for (n, header) in [
            (0, vec![0x81, 0]),
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (65535, vec![0x81, 126, 0xff, 0xff]),
            (65536, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let f = frame("é".repeat(n / 2) + &"x".repeat(n % 2));
            assert_eq!(f.len(), n);
            assert_eq!(&f.wire()[..header.len()], &header[..]);
            assert_eq!(f.wire().len(), header.len() + n);
            assert_eq!(f.text().len(), n);
        }
    }

    #[test]
    fn a_full_outbox_makes_a_slow_consumer() {
        let mut t = Table::new(2, 2, 2, 1024);
        let k = t.insert(ip(1), 7, Instant::now()).unwrap();
        let f = frame("x".repeat(10));
        assert_eq!(t.deliver_to(k, 7, &f), Delivery::Queued);
        assert_eq!(t.deliver_to(k, 7, &f), Delivery::Queued);
        assert_eq!(t.deliver_to(k, 7, &f), Delivery::SlowConsumer);
        assert_eq!(
            t.get_mut(k).unwrap().close_request,
            Some(Close::SlowConsumer)
        );
        assert_eq!(t.deliver_to(k, 7, &f), Delivery::Gone);
        let e = t.get_mut(k).unwrap();
        assert_eq!(e.outbox.frames.len(), 2);
        assert!(e.outbox.pop().is_some());
        assert_eq!(e.outbox.bytes, 10);
    }

    #[test]
    fn the_byte_bound_counts_too() {
        let mut t = Table::new(2, 2, 64, 25);
        let k = t.insert(ip(1), 7, Instant::now()).unwrap();
        let f = frame("x".repeat(10));
        assert_eq!(t.deliver_to(k, 7, &f), Delivery::Queued);
        assert_eq!(t.deliver_to(k, 7, &f), Delivery::Queued);
        assert_eq!(t.deliver_to(k, 7, &f), Delivery::SlowConsumer);
    }
}
