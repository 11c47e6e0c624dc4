//! Chat rooms in memory: who is in which room, presence, fan-out.
//!
//! A room exists while it has members. Members are connection slots; the
//! same user on two devices is two members but one name in the member list
//! and in presence. Presence changes are coalesced: a room sends at most one
//! `presence` frame per [`PRESENCE_INTERVAL`] with every join and leave since
//! the last.
//!
//! Fan-out is one task fed by one queue, in commit order. It takes up to
//! [`FANOUT_BATCH`] frames, queues the same bytes for every member of their
//! rooms, and yields: the member tasks it woke run before it goes on, so
//! each writes its frames with one flush and no healthy member's outbox
//! fills because of a burst (a group commit can finish hundreds of
//! messages at once). Big rooms also yield every [`FANOUT_CHUNK`]
//! deliveries so other clients are not starved. The queue is bounded from
//! upstream: the store's writer takes no new batch while it is longer than
//! its limit.

use crate::hub::{frame, Delivery, Frame, Table};
use crate::json::{escape_into, JsonOut};
use crate::ops::metrics::{add, inc};

mod news;
mod peers;
mod requests;
use news::note;
pub use requests::{told, Asker, ChatRequests, Rights};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The most presence frames a room sends: one per interval.
pub const PRESENCE_INTERVAL: Duration = Duration::from_millis(100);
/// Deliveries between two yields to the executor.
pub const FANOUT_CHUNK: usize = 256;
/// Frames delivered to members between two yields.
pub const FANOUT_BATCH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ChatLimits {
    pub rooms_per_session: usize,
    pub members_per_room: usize,
    pub max_text_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    RoomFull,
}

/// A frame waiting in the fan-out queue.
enum Outgoing {
    /// For every member of a room, and when it was queued.
    Room(Rc<str>, Frame, Instant),
    /// For one connection (slot key, connection id): an `ack` that must
    /// reach its publisher before, and in the same write as, the message.
    Direct(usize, u64, Frame),
}

struct Member {
    /// The connection's id, so a reused slot never gets a frame meant for
    /// the connection that had it before.
    conn_id: u64,
    user: Rc<str>,
}

#[derive(Default)]
struct Room {
    members: HashMap<usize, Member>,
    /// Connections per user name, for presence by user.
    users: HashMap<Rc<str>, u32>,
    joined: news::News,
    left: news::News,
    /// Members on other boxes of a cluster, by box (see `peers`).
    remote: HashMap<Rc<str>, peers::Remote>,
    /// Every remote name, with the number of boxes that list it.
    remote_names: HashMap<Rc<str>, u32>,
    /// Names listed by all boxes together (bounded in total).
    remote_total: usize,
}

pub struct Chat {
    rooms: RefCell<HashMap<Rc<str>, Room>>,
    /// The rooms of each connection (by slot key): the same membership as
    /// `rooms`, indexed the other way, kept by `join` and `leave` alone.
    by_conn: RefCell<HashMap<usize, Vec<Rc<str>>>>,
    /// Direct answers cut to fit the client's outbox.
    answers_cut: std::cell::Cell<u64>,
    /// From a `publish` read to its `ack` queued (the commit included).
    pub publish_ack: crate::ops::histogram::Histogram,
    /// From a room frame queued to its members' outboxes holding it.
    fanout_lag: crate::ops::histogram::Histogram,
    /// Rooms with presence changes not sent yet.
    dirty: RefCell<Vec<Rc<str>>>,
    pub presence_due: event_listener::Event,
    /// Frames waiting for fan-out, in commit order.
    queue: RefCell<VecDeque<Outgoing>>,
    queued: event_listener::Event,
    drained: event_listener::Event,
    backlog_limit: usize,
    /// On a box of a cluster: rooms whose local members changed, for the
    /// bus (see `peers`). Empty and never filled otherwise.
    bus: peers::BusNews,
}

/// Delivery counters, kept by the caller's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    pub delivered: u64,
    pub slow: u64,
}

impl Chat {
    /// A chat whose fan-out queue counts as full past `backlog_limit`.
    pub fn new(backlog_limit: usize) -> Chat {
        Chat {
            rooms: RefCell::default(),
            by_conn: RefCell::default(),
            answers_cut: std::cell::Cell::new(0),
            publish_ack: Default::default(),
            fanout_lag: Default::default(),
            dirty: RefCell::default(),
            presence_due: event_listener::Event::new(),
            queue: RefCell::default(),
            queued: event_listener::Event::new(),
            drained: event_listener::Event::new(),
            backlog_limit: backlog_limit.max(1),
            bus: peers::BusNews::default(),
        }
    }

    /// Queues a frame for every member of `room`, behind what is queued.
    pub fn enqueue(&self, room: Rc<str>, f: Frame) {
        self.queue
            .borrow_mut()
            .push_back(Outgoing::Room(room, f, Instant::now()));
        self.queued.notify(1);
    }

    /// Queues a frame for one connection, in line with room frames.
    pub fn enqueue_direct(&self, key: usize, conn_id: u64, f: Frame) {
        self.queue
            .borrow_mut()
            .push_back(Outgoing::Direct(key, conn_id, f));
        self.queued.notify(1);
    }

    /// Frames waiting for fan-out.
    pub fn backlog(&self) -> usize {
        self.queue.borrow().len()
    }

    /// `None` while the fan-out queue is within its limit; otherwise a
    /// listener that fires when it has shrunk (the store's writer waits on
    /// it before taking the next batch).
    pub fn wait_for_room(&self) -> Option<event_listener::EventListener> {
        let listener = self.drained.listen();
        (self.backlog() > self.backlog_limit).then_some(listener)
    }

    /// The fan-out task: runs for the life of the gateway.
    pub async fn run_fanout(&self, table: &RefCell<Table>, metrics: &crate::ops::metrics::Metrics) {
        loop {
            let listener = self.queued.listen();
            if self.backlog() == 0 {
                listener.await;
                continue;
            }
            let sent = self.deliver_batch(table).await;
            count(metrics, sent);
            self.drained.notify(usize::MAX);
            // Let the member tasks just woken write before the next batch.
            futures_lite::future::yield_now().await;
        }
    }

    /// Takes up to [`FANOUT_BATCH`] queued frames and delivers them, room
    /// by room, each member getting its frames in order.
    async fn deliver_batch(&self, table: &RefCell<Table>) -> Fanout {
        // Each room's frames, and when the first of them was queued.
        let mut by_room: Vec<(Rc<str>, Vec<Frame>, Instant)> = Vec::new();
        let mut total = Fanout::default();
        {
            let mut queue = self.queue.borrow_mut();
            for _ in 0..FANOUT_BATCH {
                match queue.pop_front() {
                    None => break,
                    // Delivered now, so before any room frame of the batch.
                    Some(Outgoing::Direct(key, id, f)) => {
                        if table.borrow_mut().deliver_to(key, id, &f) == Delivery::Queued {
                            total.delivered += 1;
                        }
                    }
                    Some(Outgoing::Room(room, f, queued)) => {
                        match by_room.iter_mut().find(|(r, _, _)| *r == room) {
                            Some((_, frames, _)) => frames.push(f),
                            None => by_room.push((room, vec![f], queued)),
                        }
                    }
                }
            }
        }
        for (room, frames, queued) in by_room {
            let s = self.deliver(table, &room, &frames).await;
            // The oldest frame's wait: what its members waited longest.
            self.fanout_lag.observe(queued.elapsed());
            total.delivered += s.delivered;
            total.slow += s.slow;
        }
        total
    }

    /// Adds a connection to a room (creating it). Joining twice is a no-op.
    /// Returns the room's member names.
    pub fn join(
        &self,
        room: &Rc<str>,
        key: usize,
        conn_id: u64,
        user: &Rc<str>,
        limits: &ChatLimits,
    ) -> Result<Vec<Rc<str>>, JoinError> {
        let mut rooms = self.rooms.borrow_mut();
        let r = rooms.entry(room.clone()).or_default();
        if !r.members.contains_key(&key) {
            if r.members.len() >= limits.members_per_room {
                if r.members.is_empty() {
                    rooms.remove(room);
                }
                return Err(JoinError::RoomFull);
            }
            self.by_conn
                .borrow_mut()
                .entry(key)
                .or_default()
                .push(room.clone());
            r.members.insert(
                key,
                Member {
                    conn_id,
                    user: user.clone(),
                },
            );
            let n = r.users.entry(user.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.bus.changed(room);
                if !r.is_remote_member(user) {
                    note(&mut r.left, &mut r.joined, user);
                    self.mark_dirty(room);
                }
            }
        }
        Ok(r.member_names())
    }

    /// Removes a connection from a room; the room goes when it is empty.
    pub fn leave(&self, room: &Rc<str>, key: usize) -> bool {
        let mut rooms = self.rooms.borrow_mut();
        let Some(r) = rooms.get_mut(room) else {
            return false;
        };
        let Some(m) = r.members.remove(&key) else {
            return false;
        };
        let mut by_conn = self.by_conn.borrow_mut();
        if let Some(list) = by_conn.get_mut(&key) {
            list.retain(|x| x != room);
            if list.is_empty() {
                by_conn.remove(&key);
            }
        }
        if let Some(n) = r.users.get_mut(&m.user) {
            *n -= 1;
            if *n == 0 {
                r.users.remove(&m.user);
                self.bus.changed(room);
                if !r.is_remote_member(&m.user) {
                    note(&mut r.joined, &mut r.left, &m.user);
                    self.mark_dirty(room);
                }
            }
        }
        if r.members.is_empty() {
            // Nobody is left to tell; the room goes with its last member.
            rooms.remove(room);
        }
        true
    }

    /// The rooms a connection is in.
    pub fn rooms_of(&self, key: usize) -> Vec<Rc<str>> {
        self.by_conn.borrow().get(&key).cloned().unwrap_or_default()
    }

    /// Every (room, connection key) membership.
    pub fn memberships(&self) -> Vec<(Rc<str>, usize)> {
        self.by_conn
            .borrow()
            .iter()
            .flat_map(|(key, rooms)| rooms.iter().map(move |r| (r.clone(), *key)))
            .collect()
    }

    /// How many rooms a connection is in.
    pub fn room_count_of(&self, key: usize) -> usize {
        self.by_conn.borrow().get(&key).map_or(0, Vec::len)
    }

    /// Takes a connection out of every room (it closed).
    pub fn leave_all(&self, key: usize) {
        for room in self.rooms_of(key) {
            self.leave(&room, key);
        }
    }

    pub fn is_member(&self, room: &str, key: usize) -> bool {
        self.rooms
            .borrow()
            .get(room)
            .is_some_and(|r| r.members.contains_key(&key))
    }

    pub fn has_pending_presence(&self) -> bool {
        !self.dirty.borrow().is_empty()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.borrow().len()
    }

    /// Sends coalesced presence, at most one frame per room per
    /// [`PRESENCE_INTERVAL`], for the life of the gateway.
    pub async fn run_presence(&self) {
        loop {
            let due = self.presence_due.listen();
            if !self.has_pending_presence() {
                due.await;
            }
            async_io::Timer::after(PRESENCE_INTERVAL).await;
            self.flush_presence();
        }
    }

    /// The chat's gauges and counters, for `/metrics`.
    pub fn render(&self, out: &mut String) {
        crate::ops::metrics::gauge(
            out,
            "hivegate_chat_rooms",
            "Rooms with at least one member.",
            self.room_count() as u64,
        );
        crate::ops::metrics::counter(
            out,
            "hivegate_answers_cut_total",
            "History answers cut to fit the client's outbox (sent with \"more\":true).",
            self.answers_cut.get(),
        );
        for (name, help, h) in [
            (
                "hivegate_publish_ack_seconds",
                "From a publish read to its ack queued, the commit to SQLite included.",
                &self.publish_ack,
            ),
            (
                "hivegate_fanout_lag_seconds",
                "From a room's frame queued to every member's outbox holding it (per room and batch, its oldest frame).",
                &self.fanout_lag,
            ),
        ] {
            crate::ops::histogram::family(out, name, help);
            h.write(out, name, "");
        }
    }

    fn mark_dirty(&self, room: &Rc<str>) {
        let mut dirty = self.dirty.borrow_mut();
        if !dirty.contains(room) {
            dirty.push(room.clone());
        }
        self.presence_due.notify(1);
    }

    /// The members of a room, copied: fan-out yields, and the room may
    /// change meanwhile.
    fn snapshot(&self, room: &str) -> Vec<(usize, u64)> {
        self.rooms
            .borrow()
            .get(room)
            .map(|r| r.members.iter().map(|(k, m)| (*k, m.conn_id)).collect())
            .unwrap_or_default()
    }

    /// Queues `frames` for every member of `room`, in order.
    async fn deliver(&self, table: &RefCell<Table>, room: &str, frames: &[Frame]) -> Fanout {
        let members = self.snapshot(room);
        let mut stats = Fanout::default();
        let per_chunk = (FANOUT_CHUNK / frames.len().max(1)).max(1);
        for chunk in members.chunks(per_chunk) {
            {
                let mut t = table.borrow_mut();
                for (key, conn_id) in chunk {
                    let handed = t.deliver_all(*key, *conn_id, frames);
                    stats.delivered += u64::from(handed.queued);
                    stats.slow += u64::from(handed.slow);
                }
            }
            if members.len() > per_chunk {
                futures_lite::future::yield_now().await;
            }
        }
        stats
    }

    /// Queues the coalesced presence of every room that changed.
    pub fn flush_presence(&self) {
        let dirty: Vec<Rc<str>> = std::mem::take(&mut *self.dirty.borrow_mut());
        for room in dirty {
            let text = {
                let mut rooms = self.rooms.borrow_mut();
                let Some(r) = rooms.get_mut(&room) else {
                    continue;
                };
                let joined = r.joined.take();
                let left = r.left.take();
                if joined.is_empty() && left.is_empty() {
                    continue;
                }
                let mut out = JsonOut::op("presence").str("room", &room);
                if !joined.is_empty() {
                    out = out.raw("joined", &names_json(&joined));
                }
                if !left.is_empty() {
                    out = out.raw("left", &names_json(&left));
                }
                out.finish()
            };
            self.enqueue(room, frame(text));
        }
    }
}

pub fn names_json(names: &[Rc<str>]) -> String {
    let mut out = String::from("[");
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        escape_into(&mut out, n);
    }
    out.push(']');
    out
}

/// The most bytes a `message` frame may take for a text of at most
/// `max_text_bytes`: every byte may be a control character written as
/// `\u001f` (six bytes), plus the envelope, the names and the reactions.
pub fn largest_message_frame(max_text_bytes: usize) -> usize {
    max_text_bytes.saturating_mul(6).saturating_add(1024)
}

/// Counts a fan-out in the gateway's metrics.
pub fn count(metrics: &crate::ops::metrics::Metrics, f: Fanout) {
    add(&metrics.deliveries, f.delivered);
    if f.slow > 0 {
        inc(&metrics.fanout_slow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;
    use std::time::Instant;

    const LIMITS: ChatLimits = ChatLimits {
        rooms_per_session: 32,
        members_per_room: 3,
        max_text_bytes: 8192,
    };

    fn table_with(n: usize) -> (RefCell<Table>, Vec<(usize, u64)>) {
        let mut t = Table::new(100, 100, 64, 1 << 20);
        let keys = (0..n)
            .map(|i| {
                let id = i as u64 + 1;
                (
                    t.insert([127, 0, 0, 1].into(), id, Instant::now()).unwrap(),
                    id,
                )
            })
            .collect();
        (RefCell::new(t), keys)
    }

    #[test]
    fn presence_is_by_user_and_coalesced() {
        let chat = Chat::new(64);
        let (table, keys) = table_with(3);
        let room: Rc<str> = Rc::from("general");
        let (alice, bob): (Rc<str>, Rc<str>) = (Rc::from("alice"), Rc::from("bob"));
        chat.join(&room, keys[0].0, keys[0].1, &alice, &LIMITS)
            .unwrap();
        chat.join(&room, keys[1].0, keys[1].1, &alice, &LIMITS)
            .unwrap();
        let names = chat
            .join(&room, keys[2].0, keys[2].1, &bob, &LIMITS)
            .unwrap();
        assert_eq!(names, [alice.clone(), bob.clone()]);
        // bob joins and leaves within one interval: no news about bob.
        chat.leave(&room, keys[2].0);
        chat.flush_presence();
        let sent = block_on(chat.deliver_batch(&table));
        assert_eq!(sent.delivered, 2, "two alice connections are members");
        let mut t = table.borrow_mut();
        let f = t.get_mut(keys[0].0).unwrap().outbox.pop().unwrap();
        assert_eq!(
            f.text(),
            r#"{"op":"presence","room":"general","joined":["alice"]}"#
        );
        drop(t);
        // One alice connection leaving is not alice leaving.
        chat.leave(&room, keys[0].0);
        chat.flush_presence();
        assert_eq!(chat.backlog(), 0);
        chat.leave(&room, keys[1].0);
        assert_eq!(chat.room_count(), 0, "a room goes with its last member");
    }

    #[test]
    fn a_full_room_refuses_and_a_reused_slot_gets_nothing() {
        let chat = Chat::new(64);
        let (table, keys) = table_with(4);
        let room: Rc<str> = Rc::from("r");
        let u: Rc<str> = Rc::from("u");
        for (k, id) in &keys[..3] {
            chat.join(&room, *k, *id, &u, &LIMITS).unwrap();
        }
        assert_eq!(
            chat.join(&room, keys[3].0, keys[3].1, &u, &LIMITS),
            Err(JoinError::RoomFull)
        );
        // A member's slot now belongs to another connection (other id).
        {
            let mut t = table.borrow_mut();
            t.remove(keys[0].0);
            let k = t.insert([127, 0, 0, 2].into(), 99, Instant::now()).unwrap();
            assert_eq!(k, keys[0].0);
        }
        chat.enqueue(room.clone(), frame("{}".into()));
        let s = block_on(chat.deliver_batch(&table));
        assert_eq!(s.delivered, 2);
        assert!(table
            .borrow_mut()
            .get_mut(keys[0].0)
            .unwrap()
            .outbox
            .pop()
            .is_none());
    }

    #[test]
    fn a_batch_keeps_each_rooms_order_and_the_backlog_is_bounded() {
        let chat = Chat::new(3);
        let (table, keys) = table_with(2);
        let (r1, r2): (Rc<str>, Rc<str>) = (Rc::from("one"), Rc::from("two"));
        let u: Rc<str> = Rc::from("u");
        chat.join(&r1, keys[0].0, keys[0].1, &u, &LIMITS).unwrap();
        chat.join(&r2, keys[1].0, keys[1].1, &u, &LIMITS).unwrap();
        chat.flush_presence();
        block_on(chat.deliver_batch(&table));
        for i in 0..4 {
            chat.enqueue(r1.clone(), frame(format!("1-{i}")));
            chat.enqueue(r2.clone(), frame(format!("2-{i}")));
        }
        assert!(chat.wait_for_room().is_some(), "8 queued, limit 3");
        let s = block_on(chat.deliver_batch(&table));
        assert_eq!(s.delivered, 8);
        assert!(chat.wait_for_room().is_none());
        let mut t = table.borrow_mut();
        let got: Vec<String> = std::iter::from_fn(|| t.get_mut(keys[0].0).unwrap().outbox.pop())
            .map(|f| f.text().to_string())
            .filter(|s| s.starts_with('1'))
            .collect();
        assert_eq!(got, ["1-0", "1-1", "1-2", "1-3"]);
    }
}
