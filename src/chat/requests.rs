//! The chat requests of a session: join, leave, publish, react, history.
//!
//! Each request checks at once what it can (membership, sizes, limits) and
//! answers an error through its [`Reply`]; what must wait for the store
//! comes back as a [`Task`] for the caller to spawn, which answers when the
//! store does. Nothing here knows about sockets: the tests below run the
//! requests against a real store and read the frames from the hub.

use super::{names_json, Chat, ChatLimits, JoinError};
use crate::access::Action;
use crate::hub::{frame, Reply, Task, MAX_IN_FLIGHT};
use crate::json::JsonOut;
use crate::ops::log::Logger;
use crate::protocol::{ChatRequest, ErrorCode};
use crate::store::db::bus::{BusKind, Effect};
use crate::store::{Range, Reacted, Store, StoreError, StoredMessage};
use std::cell::Cell;
use std::rc::Rc;

/// Who asks: the connection (slot key and id, for the reply and for
/// membership), its user, and its count of requests in flight.
pub struct Asker {
    pub key: usize,
    pub conn: u64,
    pub user: Rc<str>,
    pub in_flight: Rc<Cell<u32>>,
}

/// What the access rules let a session do, as its connection checks them.
pub trait Rights {
    /// Whether the session may do `action` in `room`; when not, it has
    /// been answered `FORBIDDEN` (counted, and logged once per rule).
    fn allowed(&mut self, rid: Option<&str>, room: &str, action: Action) -> bool;
    /// Whether it may, without a word to the session.
    fn may(&self, room: &str, action: Action) -> bool;
    /// Whether any access rule is configured.
    fn ruled(&self) -> bool;
}

/// The chat's request handlers, with what they need besides the chat.
pub struct ChatRequests {
    pub chat: Rc<Chat>,
    pub limits: ChatLimits,
    /// The most bytes a direct answer may take: half the outbox.
    pub answer_budget: usize,
    pub log: Logger,
}

impl ChatRequests {
    /// One chat request of a session: checked against what `rights`
    /// allow, then handled; what waits for the store comes back as a task.
    pub fn handle(
        &self,
        store: &Store,
        asker: &Asker,
        reply: Reply,
        request: ChatRequest,
        rights: &mut dyn Rights,
    ) -> Option<Task> {
        match request {
            ChatRequest::Join { room, history } => {
                if !rights.allowed(reply.rid(), &room, Action::Join) {
                    return None;
                }
                self.join(store, asker, reply, room, history)
            }
            ChatRequest::Leave { room } => {
                self.leave(asker, reply, &room);
                None
            }
            ChatRequest::Publish { room, text } => {
                if !rights.allowed(reply.rid(), &room, Action::Publish) {
                    return None;
                }
                self.publish(store, asker, reply, room, text)
            }
            ChatRequest::React { message_id, emoji } => {
                let mine = self.chat.rooms_of(asker.key);
                let rooms: Vec<String> = mine
                    .iter()
                    .filter(|r| rights.may(r, Action::React))
                    .map(|r| r.to_string())
                    .collect();
                if rooms.is_empty() && !mine.is_empty() {
                    // In rooms, none of which allows reacting.
                    rights.allowed(reply.rid(), &mine[0], Action::React);
                    return None;
                }
                self.react(store, asker, reply, message_id, emoji, rooms)
            }
            ChatRequest::History {
                room,
                before_seq,
                after_seq,
                limit,
            } => {
                let range = match (before_seq, after_seq) {
                    (Some(b), _) => Range::Before(b.min(i64::MAX as u64) as i64),
                    (None, Some(a)) => Range::After(a.min(i64::MAX as u64) as i64),
                    (None, None) => Range::Latest,
                };
                // With rules, one who may read a room reads its history
                // without joining; a member may (joining implies reading).
                let member = self.chat.is_member(&room, asker.key);
                if !member && !rights.ruled() {
                    let msg = "join the room before reading its history";
                    reply.error(ErrorCode::Unauthorized, msg, None);
                    return None;
                }
                if !member && !rights.allowed(reply.rid(), &room, Action::Read) {
                    return None;
                }
                self.history(store, asker, reply, room, range, limit)
            }
        }
    }

    fn join(
        &self,
        store: &Store,
        asker: &Asker,
        mut reply: Reply,
        room: String,
        history: u64,
    ) -> Option<Task> {
        let room: Rc<str> = Rc::from(room);
        let limits = self.limits;
        let already = self.chat.is_member(&room, asker.key);
        if !already && self.chat.room_count_of(asker.key) >= limits.rooms_per_session {
            let msg = format!("at most {} rooms per connection", limits.rooms_per_session);
            reply.error(ErrorCode::LimitExceeded, &msg, None);
            return None;
        }
        if !reply.begin(&asker.in_flight, MAX_IN_FLIGHT) {
            return None;
        }
        let members = match self
            .chat
            .join(&room, asker.key, asker.conn, &asker.user, &limits)
        {
            Ok(m) => m,
            Err(JoinError::RoomFull) => {
                let msg = format!("room is full ({} members)", limits.members_per_room);
                reply.error(ErrorCode::LimitExceeded, &msg, None);
                return None;
            }
        };
        // Membership first, history second: a message committed meanwhile
        // may arrive twice (clients dedupe by seq) but never not at all.
        let joined = JsonOut::op("joined")
            .opt_str("request_id", reply.rid())
            .str("room", &room)
            .raw("members", &names_json(&members));
        let read = if history == 0 {
            None
        } else {
            let read = store.history(room.to_string(), Range::Latest, history as i64);
            if read.is_err() && !already {
                // Without its history the join did not happen.
                self.chat.leave(&room, asker.key);
            }
            Some(self.queued(&reply, read)?)
        };
        let (chat, log, budget) = (self.chat.clone(), self.log, self.answer_budget);
        Some(Box::pin(async move {
            let messages = match read {
                None => Ok(Vec::new()),
                Some(f) => f.await,
            };
            match messages {
                Ok(msgs) => {
                    reply.send(with_messages(&chat, budget, joined, "history", &msgs, true))
                }
                Err(e) => {
                    if !already {
                        chat.leave(&room, reply.key);
                    }
                    store_error(log, &reply, &e);
                }
            }
        }))
    }

    fn leave(&self, asker: &Asker, reply: Reply, room: &str) {
        if let Some(room) = self
            .chat
            .rooms_of(asker.key)
            .into_iter()
            .find(|r| &**r == room)
        {
            self.chat.leave(&room, asker.key);
        }
        // Leaving a room one is not in is not an error: the outcome is the same.
        reply.send(
            JsonOut::op("left")
                .opt_str("request_id", reply.rid())
                .str("room", room)
                .finish(),
        );
    }

    fn publish(
        &self,
        store: &Store,
        asker: &Asker,
        mut reply: Reply,
        room: String,
        text: String,
    ) -> Option<Task> {
        let max = self.limits.max_text_bytes;
        if text.is_empty() || text.len() > max {
            let msg = format!("text must be 1-{max} bytes");
            reply.error(ErrorCode::InvalidRequest, &msg, None);
            return None;
        }
        if !self.chat.is_member(&room, asker.key) {
            let msg = "join the room before publishing to it";
            reply.error(ErrorCode::Unauthorized, msg, None);
            return None;
        }
        if store.is_full() {
            let msg = "storage full: the database is at store.max_db_bytes";
            reply.error(ErrorCode::OverCapacity, msg, Some(5000));
            return None;
        }
        if !reply.begin(&asker.in_flight, MAX_IN_FLIGHT) {
            return None;
        }
        let began = std::time::Instant::now();
        let ts = crate::clock::unix_ms();
        let id = store.new_id(ts.max(0) as u64);
        let msg = StoredMessage::new(id, room, asker.user.to_string(), text, ts);
        let committed = self.queued(&reply, store.publish(msg))?;
        let (chat, log) = (self.chat.clone(), self.log);
        Some(Box::pin(async move {
            match committed.await {
                Ok(stored) => {
                    // Acknowledged only now: the message is on disk.
                    let ack = JsonOut::op("ack")
                        .opt_str("request_id", reply.rid())
                        .str("id", &stored.id)
                        .num("seq", stored.seq as u64)
                        .finish();
                    // Through the fan-out queue, just ahead of the message:
                    // the publisher gets both in one write.
                    chat.enqueue_direct(reply.key, reply.conn, frame(ack));
                    chat.publish_ack.observe(began.elapsed());
                    chat.enqueue(Rc::from(stored.room.as_str()), frame(stored.frame()));
                }
                Err(e) => store_error(log, &reply, &e),
            }
        }))
    }

    fn react(
        &self,
        store: &Store,
        asker: &Asker,
        mut reply: Reply,
        message_id: String,
        emoji: String,
        rooms: Vec<String>,
    ) -> Option<Task> {
        if !reply.begin(&asker.in_flight, MAX_IN_FLIGHT) {
            return None;
        }
        // `rooms`: those of the asker's rooms where it may react.
        let (user, ts) = (asker.user.to_string(), crate::clock::unix_ms());
        let done = self.queued(&reply, store.react(message_id, emoji, user, ts, rooms))?;
        let (chat, log) = (self.chat.clone(), self.log);
        Some(Box::pin(async move {
            match done.await {
                Ok(Reacted {
                    room,
                    count,
                    change,
                }) => {
                    reply.send(
                        JsonOut::op("ack")
                            .opt_str("request_id", reply.rid())
                            .finish(),
                    );
                    let event = change.frame(&room, count);
                    chat.enqueue(Rc::from(room), frame(event));
                }
                Err(e) => store_error(log, &reply, &e),
            }
        }))
    }

    fn history(
        &self,
        store: &Store,
        asker: &Asker,
        mut reply: Reply,
        room: String,
        range: Range,
        limit: u64,
    ) -> Option<Task> {
        // Who may read the room was checked by the caller: a member, or
        // one the access rules let read without joining.
        if !reply.begin(&asker.in_flight, MAX_IN_FLIGHT) {
            return None;
        }
        let read = self.queued(&reply, store.history(room.clone(), range, limit as i64))?;
        let (chat, log, budget) = (self.chat.clone(), self.log, self.answer_budget);
        Some(Box::pin(async move {
            match read.await {
                Ok(msgs) => {
                    let answer = JsonOut::op("history_res")
                        .opt_str("request_id", reply.rid())
                        .str("room", &room);
                    let keep_newest = !matches!(range, Range::After(_));
                    let frame =
                        with_messages(&chat, budget, answer, "messages", &msgs, keep_newest);
                    reply.send(frame);
                }
                Err(e) => store_error(log, &reply, &e),
            }
        }))
    }

    /// The store's future for a request; `None` when the store refused
    /// the request at once (its error answered).
    fn queued<F>(&self, reply: &Reply, queued: Result<F, StoreError>) -> Option<F> {
        queued.map_err(|e| store_error(self.log, reply, &e)).ok()
    }
}

/// Adds `"messages"` (or `"history"`) to a direct answer, cut so that the
/// whole frame stays within `budget` bytes: the client must be able to
/// receive its own answer whatever the messages hold. A cut answer says
/// `"more":true`; the client asks again from the seq at its edge.
/// `keep_newest` keeps the end of the list (the newest page, or the page
/// before a seq), otherwise its start (the page after a seq).
fn with_messages(
    chat: &Chat,
    budget: usize,
    answer: JsonOut,
    key: &str,
    msgs: &[StoredMessage],
    keep_newest: bool,
) -> String {
    // The envelope, the key and `"more":true` come out of the budget.
    let budget = budget.saturating_sub(answer.byte_len() + key.len() + 32);
    let mut parts: Vec<String> = Vec::with_capacity(msgs.len());
    let mut total = 2;
    let mut take = |m: &StoredMessage| {
        let json = m.frame();
        if total + json.len() + 1 > budget {
            return false;
        }
        total += json.len() + 1;
        parts.push(json);
        true
    };
    if keep_newest {
        msgs.iter().rev().take_while(|m| take(m)).for_each(drop);
        parts.reverse();
    } else {
        msgs.iter().take_while(|m| take(m)).for_each(drop);
    }
    let more = parts.len() < msgs.len();
    let answer = answer.raw(key, &format!("[{}]", parts.join(",")));
    if more {
        chat.answers_cut.set(chat.answers_cut.get() + 1);
        answer.bool("more", true).finish()
    } else {
        answer.finish()
    }
}

/// Answers a store failure. Database failures are logged with the
/// connection and request ids, and the client gets only a correlation id.
fn store_error(log: Logger, reply: &Reply, e: &StoreError) {
    let rid = reply.rid().unwrap_or("-");
    match e {
        StoreError::Busy { retry_after_ms } => reply.error(
            ErrorCode::OverCapacity,
            "the store is busy; retry later",
            Some(*retry_after_ms),
        ),
        StoreError::Timeout => {
            reply.error(ErrorCode::Timeout, "the store did not answer in time", None)
        }
        StoreError::NotFound => {
            reply.error(ErrorCode::NotFound, "no such message in your rooms", None)
        }
        StoreError::LimitExceeded(m) => reply.error(ErrorCode::LimitExceeded, m, None),
        StoreError::Storage(m) => {
            log.warn(
                "store failed",
                &[
                    ("conn", &reply.conn),
                    ("request_id", &rid.to_string()),
                    ("error", &m.to_string()),
                ],
            );
            let msg = format!("internal error (conn {}, request {rid})", reply.conn);
            reply.error(ErrorCode::InternalError, &msg, None);
        }
    }
}

/// What members of a room are told of a change another box made and
/// this one applied: the room, and the frame (the same a change made
/// here sends).
pub fn told(change: BusKind, effect: &Effect) -> Option<(String, String)> {
    match (change, effect) {
        (BusKind::Message(m), Effect::Message { seq }) => {
            let m = StoredMessage { seq: *seq, ..m };
            Some((m.room.clone(), m.frame()))
        }
        (BusKind::Reaction(r), Effect::Reaction { room, count }) => {
            Some((room.clone(), r.frame(room, *count)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Table;
    use crate::ops::metrics::Metrics;
    use crate::pool::Pool;
    use crate::store::Synchronous;
    use futures_lite::future::{block_on, yield_now};
    use serde_json::Value;
    use std::cell::RefCell;
    use std::net::IpAddr;
    use std::time::Instant;

    /// A chat on a real store, no sockets: frames are read from the hub.
    struct Harness {
        _dir: tempfile::TempDir,
        ex: crate::executor::Executor,
        store: Store,
        table: Rc<RefCell<Table>>,
        requests: ChatRequests,
        next_id: Cell<u64>,
    }

    fn harness(answer_budget: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let pool = Rc::new(Pool::new(1, 16).unwrap());
        let chat = Rc::new(Chat::new(64));
        let settings = crate::store::StoreConfig {
            synchronous: Synchronous::Off,
            write_queue: 64,
            batch_max: 16,
            ..Default::default()
        };
        let (store, writer) =
            Store::open(&settings, dir.path(), None, pool, Box::new(|| None)).unwrap();
        let ex = crate::executor::Executor::new();
        ex.spawn(writer).detach();
        let table = Rc::new(RefCell::new(Table::new(8, 8, 64, 1 << 20)));
        let (c, t) = (chat.clone(), table.clone());
        ex.spawn(async move { c.run_fanout(&t, &Metrics::default()).await })
            .detach();
        let requests = ChatRequests {
            chat,
            limits: ChatLimits {
                rooms_per_session: 2,
                members_per_room: 10,
                max_text_bytes: 100,
            },
            answer_budget,
            log: Logger::new(Default::default(), Default::default()),
        };
        Harness {
            _dir: dir,
            ex,
            store,
            table,
            requests,
            next_id: Cell::new(1),
        }
    }

    impl Harness {
        fn connect(&self, user: &str) -> Asker {
            let id = self.next_id.replace(self.next_id.get() + 1);
            let ip = IpAddr::from([127, 0, 0, 1]);
            let key = self
                .table
                .borrow_mut()
                .insert(ip, id, Instant::now())
                .unwrap();
            Asker {
                key,
                conn: id,
                user: Rc::from(user),
                in_flight: Rc::default(),
            }
        }

        fn reply(&self, a: &Asker, rid: &str) -> Reply {
            Reply::new(self.table.clone(), a.key, a.conn, Some(rid))
        }

        /// Runs a request's task, lets the fan-out deliver, and returns
        /// every frame queued for `a` since the last call.
        fn run(&self, task: Option<Task>, a: &Asker) -> Vec<Value> {
            block_on(self.ex.run(async {
                if let Some(t) = task {
                    t.await;
                }
                for _ in 0..50 {
                    yield_now().await;
                }
            }));
            let mut table = self.table.borrow_mut();
            let outbox = &mut table.get_mut(a.key).unwrap().outbox;
            std::iter::from_fn(|| outbox.pop())
                .map(|f| serde_json::from_str(f.text()).unwrap())
                .collect()
        }

        fn join(&self, a: &Asker, room: &str) -> Vec<Value> {
            let t = self
                .requests
                .join(&self.store, a, self.reply(a, "j"), room.into(), 50);
            self.run(t, a)
        }

        fn publish(&self, a: &Asker, room: &str, text: &str) -> Vec<Value> {
            let r = self.reply(a, "p");
            let t = self
                .requests
                .publish(&self.store, a, r, room.into(), text.into());
            self.run(t, a)
        }
    }

    #[test]
    fn a_publish_is_acked_and_reaches_every_member_once() {
        let h = harness(1 << 19);
        let (alice, bob) = (h.connect("alice"), h.connect("bob"));
        assert_eq!(h.join(&alice, "r")[0]["op"], "joined");
        let joined = h.join(&bob, "r");
        assert_eq!(joined[0]["members"], serde_json::json!(["alice", "bob"]));
        let frames = h.publish(&alice, "r", "hi");
        let ops: Vec<&str> = frames.iter().filter_map(|f| f["op"].as_str()).collect();
        // (Presence is flushed by its own loop, not running here.)
        assert_eq!(ops, ["ack", "message"]);
        assert_eq!(frames[0]["seq"], 1);
        assert_eq!(frames[1]["from"], "alice");
        let to_bob = h.run(None, &bob);
        assert_eq!(to_bob.last().unwrap()["text"], "hi");
    }

    #[test]
    fn publishes_are_checked_before_the_store() {
        let h = harness(1 << 19);
        let a = h.connect("alice");
        let code = |frames: Vec<Value>| frames[0]["error"]["code"].clone();
        assert_eq!(code(h.publish(&a, "r", "hi")), "UNAUTHORIZED");
        h.join(&a, "r");
        assert_eq!(code(h.publish(&a, "r", "")), "INVALID_REQUEST");
        assert_eq!(
            code(h.publish(&a, "r", &"x".repeat(101))),
            "INVALID_REQUEST"
        );
        h.store.mark_full(true);
        assert_eq!(code(h.publish(&a, "r", "hi")), "OVER_CAPACITY");
        h.store.mark_full(false);
        a.in_flight.set(crate::hub::MAX_IN_FLIGHT);
        assert_eq!(code(h.publish(&a, "r", "hi")), "OVER_CAPACITY");
    }

    #[test]
    fn membership_has_one_record_and_its_bound() {
        let h = harness(1 << 19);
        let a = h.connect("alice");
        h.join(&a, "one");
        h.join(&a, "two");
        assert_eq!(h.join(&a, "three")[0]["error"]["code"], "LIMIT_EXCEEDED");
        // Joining a room one is in is no new room.
        assert_eq!(h.join(&a, "two")[0]["op"], "joined");
        h.requests.leave(&a, h.reply(&a, "l"), "one");
        assert_eq!(h.run(None, &a)[0]["op"], "left");
        assert_eq!(h.requests.chat.rooms_of(a.key).len(), 1);
        assert_eq!(h.join(&a, "three")[0]["op"], "joined");
        h.requests.chat.leave_all(a.key);
        assert!(h.requests.chat.rooms_of(a.key).is_empty());
        assert!(!h.requests.chat.is_member("three", a.key));
    }

    #[test]
    fn reactions_toggle_and_history_is_cut_to_the_budget() {
        let h = harness(1200);
        let a = h.connect("alice");
        h.join(&a, "r");
        let mut ids = Vec::new();
        for i in 0..10 {
            let f = h.publish(&a, "r", &format!("message {i} {}", "x".repeat(60)));
            ids.push(f.iter().find(|f| f["op"] == "ack").unwrap()["id"].clone());
        }
        let react = |rid: &str| {
            let id = ids[9].as_str().unwrap().to_string();
            let t = h.requests.react(
                &h.store,
                &a,
                h.reply(&a, rid),
                id,
                "👍".into(),
                vec!["r".into()],
            );
            h.run(t, &a)
        };
        let on = react("x1");
        assert_eq!(on[0]["op"], "ack");
        assert_eq!(
            (on[1]["count"].clone(), on[1]["added"].clone()),
            (1.into(), true.into())
        );
        assert_eq!(react("x2")[1]["added"], false);
        let r = h.reply(&a, "h");
        let t = h
            .requests
            .history(&h.store, &a, r, "r".into(), Range::Latest, 50);
        let answer = &h.run(t, &a)[0];
        let page = answer["messages"].as_array().unwrap();
        assert!(page.len() < 10 && !page.is_empty(), "{}", page.len());
        assert_eq!(answer["more"], true);
        assert_eq!(page.last().unwrap()["id"], ids[9], "the newest are kept");
        assert!(answer.to_string().len() <= 1200);
    }
}
