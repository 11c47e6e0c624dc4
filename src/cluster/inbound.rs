//! What this box hears on the bus: events applied in arrival order and
//! told to members, beats merged into presence, and catching up: sync
//! requests for what is missing, replays for peers that lack this box's
//! events.

use super::wire::parse_event;
use super::{wire, Cluster, Item, BATCH, MAX_QUEUED, SYNC_SPACING};
use crate::hub::frame;
use crate::ops::metrics::inc;
use crate::store::db::bus::{Applied, BusEvent, BusKind};
use crate::store::StoreError;
use async_io::Timer;
use std::rc::Rc;
use std::time::Instant;

impl Cluster {
    /// One message from the bus: events go to the store in arrival order,
    /// beats to presence, requests to their queue.
    pub(super) fn on_msg(&self, _subject: &str, payload: &[u8]) {
        inc(&self.stats.received);
        let Ok(text) = std::str::from_utf8(payload) else {
            inc(&self.stats.malformed);
            return;
        };
        // With keys, the body and its signature (checked once the body
        // names its node); without, the whole text is the body.
        let (body, sig) = match &self.signer {
            Some(_) => super::sign::split(text),
            None => (text, None),
        };
        // With keys, one box's events may come several to a message.
        if self.signer.is_some() && body.contains('\n') {
            return self.on_batch(body, sig);
        }
        // Events, nearly all the traffic, are read once; the rest (and
        // events that are not whole) as an envelope.
        match parse_event(body) {
            Ok(ev) => {
                if ev.origin != self.cfg.node_id && self.authentic(&ev.origin, body, sig) {
                    self.on_event(ev);
                }
            }
            Err(_) => self.on_other(body, sig),
        }
    }

    /// Events of one box, one a line, under one signature: all or none.
    fn on_batch(&self, body: &str, sig: Option<&str>) {
        let mut events = Vec::new();
        for line in body.split('\n') {
            match parse_event(line) {
                Ok(ev) => events.push(ev),
                Err(_) => {
                    inc(&self.stats.malformed);
                    return;
                }
            }
        }
        crate::ops::metrics::add(&self.stats.received, events.len() as u64 - 1);
        let origin = events[0].origin.clone();
        if events.iter().any(|e| e.origin != origin) {
            inc(&self.stats.malformed);
            return;
        }
        if origin == self.cfg.node_id || !self.authentic(&origin, body, sig) {
            return;
        }
        for ev in events {
            self.on_event(ev);
        }
    }

    /// Whether a message naming `node` counts: always without keys; with
    /// keys, only when `node`'s trusted key signed it (counted if not).
    fn authentic(&self, node: &str, body: &str, sig: Option<&str>) -> bool {
        let Some(signer) = &self.signer else {
            return true;
        };
        let ok = signer.check(node, body, sig).is_ok();
        if !ok {
            inc(&self.stats.unsigned);
        }
        ok
    }

    /// An event from another box, signed if this box checks signatures.
    fn on_event(&self, ev: BusEvent) {
        let valid = wire::valid_node(&ev.origin) && crate::protocol::valid_room(&ev.room);
        if !valid || !wire::within_limits(&ev, self.limits.max_text_bytes) {
            inc(&self.stats.malformed);
            return;
        }
        // At the bound the link waits before handing over the next message
        // (see `inbound_full`): this only guards it.
        if self.inbound_len() >= self.cfg.max_inbound + super::sign::MAX_BATCH_EVENTS {
            inc(&self.stats.dropped_inbound);
            self.want_sync(&Rc::from(ev.room.as_str()));
            return;
        }
        self.queue_inbound(Item::Event(ev));
    }

    /// Beats, heads and sync requests; anything else is malformed.
    fn on_other(&self, text: &str, sig: Option<&str>) {
        let Ok(env) = crate::json::from_json::<wire::Envelope>(text) else {
            inc(&self.stats.malformed);
            return;
        };
        if env.node == self.cfg.node_id || !self.authentic(&env.node, text, sig) {
            return;
        }
        if !wire::valid_node(&env.node) || !crate::protocol::valid_room(&env.room) {
            inc(&self.stats.malformed);
            return;
        }
        let room: Rc<str> = Rc::from(env.room.as_str());
        match env.t.as_str() {
            "beat" | "head" => {
                if env.t == "beat" {
                    let users = env
                        .members
                        .iter()
                        .filter(|u| crate::auth::valid_user(u))
                        .map(|u| Rc::from(u.as_str()))
                        .collect();
                    let (new, left_out) = self.chat.set_remote_members(
                        &room,
                        &env.node,
                        users,
                        self.limits.members_per_room,
                        Instant::now(),
                    );
                    crate::ops::metrics::add(&self.stats.names_left_out, left_out as u64);
                    if new {
                        // A box new in the room hears at once who is here.
                        self.beat_now(&room);
                    }
                }
                if env.head > 0 && self.inbound_len() < self.cfg.max_inbound {
                    self.queue_inbound(Item::Head(Rc::from(env.node.as_str()), room, env.head));
                }
            }
            "sync" => {
                let after = env.have.get(&self.cfg.node_id).copied().unwrap_or(0);
                let mut q = self.replays.borrow_mut();
                if q.len() >= MAX_QUEUED
                    || q.iter().any(|(n, r, _)| *n == env.node && *r == env.room)
                {
                    inc(&self.stats.dropped_replays);
                    return;
                }
                q.push_back((env.node, env.room, after));
                self.replays_ready.notify(1);
            }
            _ => inc(&self.stats.malformed),
        }
    }

    pub(super) fn queue_inbound(&self, item: Item) {
        self.inbound.borrow_mut().push_back(item);
        self.inbound_ready.notify(1);
    }

    /// Events received and not yet applied (queued, or in the store's
    /// queue).
    pub(super) fn inbound_len(&self) -> usize {
        self.inbound.borrow().len() + self.in_flight.borrow().len()
    }

    /// While the next message might not fit under `cluster.max_inbound`
    /// (a signed one holds up to a batch of events): a listener that fires
    /// when one has been applied. The link stops reading meanwhile, so a
    /// burst waits in the server's buffer (TCP, then NATS), not here. With
    /// nothing waiting, a message is always taken: at most a batch past
    /// the bound.
    pub(super) fn inbound_full(&self) -> Option<event_listener::EventListener> {
        let l = self.inbound_drained.listen();
        let len = self.inbound_len();
        let room = if self.signer.is_some() {
            super::sign::MAX_BATCH_EVENTS
        } else {
            1
        };
        (len > 0 && len + room > self.cfg.max_inbound).then_some(l)
    }

    /// Hands received events to the store as fast as it takes them, then
    /// takes each result in arrival order (the writer commits in that
    /// order) and tells members what changed.
    pub(super) async fn run_inbound(&self) {
        loop {
            let l = self.inbound_ready.listen();
            let store_full = self.submit();
            let next = self.in_flight.borrow_mut().pop_front();
            match next {
                Some(Item::Applying(ev, pending)) => {
                    let result = pending.await;
                    self.applied_one(ev, result);
                }
                Some(Item::Head(origin, room, head)) => {
                    let have = self.applied.borrow().get(&(origin, room.clone())).copied();
                    if have.is_none_or(|h| h < head) {
                        self.want_sync(&room);
                    }
                }
                Some(Item::Event(_)) => {}
                // The store's queue is full of other writes: try again soon.
                None if store_full => {
                    Timer::after(std::time::Duration::from_millis(2)).await;
                }
                None => {
                    l.await;
                    continue;
                }
            }
            self.inbound_drained.notify(usize::MAX);
        }
    }

    /// Moves received items to the in-flight queue, each event with its
    /// store write; `true` if the store refused one for now (busy).
    fn submit(&self) -> bool {
        loop {
            let Some(item) = self.inbound.borrow_mut().pop_front() else {
                return false;
            };
            let item = match item {
                Item::Event(ev) => match self.store.apply_event(ev.clone()) {
                    Ok(f) => Item::Applying(ev, Box::pin(f)),
                    Err(StoreError::Busy { .. }) => {
                        self.inbound.borrow_mut().push_front(Item::Event(ev));
                        return true;
                    }
                    Err(_) => {
                        inc(&self.stats.dropped_inbound);
                        self.want_sync(&Rc::from(ev.room.as_str()));
                        continue;
                    }
                },
                other => other,
            };
            self.in_flight.borrow_mut().push_back(item);
        }
    }

    pub(super) fn applied_one(&self, ev: BusEvent, result: Result<Applied, StoreError>) {
        let room: Rc<str> = Rc::from(ev.room.as_str());
        let note = |oseq: i64| {
            // Marks are kept for local rooms only (they go with the room).
            if !self.chat.local_users(&room).is_empty() {
                self.raise_mark(&ev.origin, &room, oseq);
            }
        };
        match result {
            Ok(Applied::Changed(effect)) => {
                note(ev.oseq);
                inc(&self.stats.applied);
                if let Some((to, f)) = crate::chat::told(ev.kind, &effect) {
                    self.chat.enqueue(Rc::from(to.as_str()), frame(f));
                }
            }
            Ok(Applied::Quiet) => note(ev.oseq),
            // Past what a local client could do to the message (its
            // emoji bounds): applied as nothing, counted.
            Ok(Applied::Refused) => {
                note(ev.oseq);
                inc(&self.stats.malformed);
            }
            Ok(Applied::Duplicate) => {
                note(ev.oseq);
                inc(&self.stats.duplicates);
            }
            Ok(Applied::Gap { have }) => {
                note(have);
                inc(&self.stats.gaps);
                self.want_sync(&room);
            }
            Err(_) => {
                inc(&self.stats.dropped_inbound);
                self.want_sync(&room);
            }
        }
    }

    /// Events of `origin` in `room` are applied here up to `oseq`.
    fn raise_mark(&self, origin: &str, room: &Rc<str>, oseq: i64) {
        let mut applied = self.applied.borrow_mut();
        let mark = applied.entry((Rc::from(origin), room.clone())).or_insert(0);
        *mark = (*mark).max(oseq);
    }

    pub(super) fn want_sync(&self, room: &Rc<str>) {
        let mut wanted = self.wanted.borrow_mut();
        if !wanted.contains(room) && wanted.len() < MAX_QUEUED {
            wanted.push(room.clone());
            self.wanted_ready.notify(1);
        }
    }

    /// Sends the sync requests wanted, at most one per room per
    /// [`SYNC_SPACING`], each with what this box holds of every origin.
    pub(super) async fn run_syncs(&self) {
        loop {
            let l = self.wanted_ready.listen();
            if self.wanted.borrow().is_empty() {
                l.await;
                continue;
            }
            let link = self.linked().await;
            let now = Instant::now();
            let due: Vec<Rc<str>> = {
                let asked = self.asked.borrow();
                let mut wanted = self.wanted.borrow_mut();
                let ready = |r: &Rc<str>| {
                    asked
                        .get(r)
                        .is_none_or(|t| now.duration_since(*t) >= SYNC_SPACING)
                };
                let due: Vec<Rc<str>> = wanted.iter().filter(|r| ready(r)).cloned().collect();
                wanted.retain(|r| !due.contains(r));
                due
            };
            if due.is_empty() {
                Timer::after(SYNC_SPACING).await;
                continue;
            }
            let rooms: Vec<String> = due.iter().map(|r| r.to_string()).collect();
            let heads = match self.store.bus_heads(rooms) {
                Ok(f) => f.await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            for h in heads {
                let (room, have) = (Rc::<str>::from(h.room.as_str()), h.applied);
                // Not for a room that went meanwhile.
                if self.chat.local_users(&room).is_empty() {
                    continue;
                }
                for (origin, oseq) in &have {
                    self.raise_mark(origin, &room, *oseq);
                }
                let body = wire::sync(&self.cfg.node_id, &room, &have);
                if self.publish(&link, &wire::sync_subject(&self.cfg.subject_prefix), &body) {
                    inc(&self.stats.syncs_sent);
                    self.asked.borrow_mut().insert(room, Instant::now());
                }
            }
        }
    }

    /// Answers sync requests from this box's log: what the asker lacks of
    /// this box's events in the room (a skip first if the log was pruned
    /// past it), then this box's head.
    pub(super) async fn run_replays(&self) {
        loop {
            let l = self.replays_ready.listen();
            let Some((asker, room, after)) = self.replays.borrow_mut().pop_front() else {
                l.await;
                continue;
            };
            let now = Instant::now();
            if self
                .replay_budget
                .borrow_mut()
                .is_repeat(&asker, &room, after, now)
            {
                inc(&self.stats.replays_repeated);
                continue;
            }
            let wait = self.replay_budget.borrow_mut().wait(now);
            if !wait.is_zero() {
                Timer::after(wait).await;
            }
            let link = self.linked().await;
            let crate::store::db::bus::Replay { skip, rows, head } =
                match self.store.bus_replay(room.clone(), after, BATCH) {
                    Ok(f) => f.await.unwrap_or_default(),
                    Err(_) => continue,
                };
            let inbox = wire::inbox_subject(&self.cfg.subject_prefix, &asker);
            if let Some(to) = skip {
                let body = super::wire::encode_event(&self.cfg.node_id, &room, to, &BusKind::Skip);
                self.publish(&link, &inbox, &body);
            }
            // At least one row, then what fits in an answer; the rest in
            // the next one, which the asker asks for.
            let mut fit = 0;
            let mut room_left = super::replay::MAX_ANSWER_BYTES;
            for r in &rows {
                if fit > 0 && r.body.len() > room_left {
                    break;
                }
                room_left = room_left.saturating_sub(r.body.len());
                fit += 1;
            }
            let bodies: Vec<&str> = rows[..fit].iter().map(|r| r.body.as_str()).collect();
            let sent = self.publish_events(&link, &inbox, &bodies);
            let bytes: usize = bodies[..sent].iter().map(|b| b.len()).sum();
            let last = rows[..sent].last().map_or(after, |r| r.oseq);
            crate::ops::metrics::add(&self.stats.replayed, sent as u64);
            crate::ops::metrics::add(&self.stats.replay_bytes, bytes as u64);
            self.replay_budget.borrow_mut().spend(bytes, Instant::now());
            if last > after || skip.is_some() {
                // The asker compares it with what it applied: behind (a
                // batch was not all), it asks again.
                self.publish(&link, &inbox, &wire::head(&self.cfg.node_id, &room, head));
            }
        }
    }
}
