//! What this box says on the bus: its outbox, in commit order and
//! confirmed; a beat when a room's local members change and every
//! heartbeat; and the log kept within its bounds.

use super::{wire, Cluster, Link, BATCH};
use crate::ops::metrics::add;
use async_io::Timer;
use futures_lite::FutureExt;
use std::rc::Rc;
use std::time::{Duration, Instant};

impl Cluster {
    /// Publishes the bus log in commit order; moves the mark once the
    /// server confirmed.
    pub(super) async fn run_outbox(&self) {
        let mut mark = loop {
            if let Ok(f) = self.store.bus_published_mark() {
                match f.await {
                    Ok(m) => break m,
                    Err(e) => self
                        .log
                        .error("cannot read the bus mark", &[("error", &e.to_string())]),
                }
            }
            Timer::after(Duration::from_secs(1)).await;
        };
        loop {
            let logged = self.store.bus_logged();
            let link = self.linked().await;
            let (rows, backlog) = match self.store.bus_unpublished(mark, BATCH) {
                Ok(f) => f.await.unwrap_or_default(),
                Err(_) => Default::default(),
            };
            self.stats.backlog.set(backlog.max(0) as u64);
            if rows.is_empty() {
                let changed = self.link_changed.listen();
                logged.or(changed).await;
                continue;
            }
            // In commit order, each run of one room's rows together.
            let mut sent = 0;
            while sent < rows.len() {
                let room = &rows[sent].room;
                let run = rows[sent..].iter().take_while(|r| r.room == *room).count();
                let bodies: Vec<&str> = rows[sent..sent + run]
                    .iter()
                    .map(|r| r.body.as_str())
                    .collect();
                let subject = wire::room_subject(&self.cfg.subject_prefix, room);
                let n = self.publish_events(&link, &subject, &bodies);
                sent += n;
                if n < run {
                    break;
                }
            }
            if sent > 0 && link.confirm(self.cfg.heartbeat * 2).await {
                mark = rows[sent - 1].id;
                add(&self.stats.published, sent as u64);
                self.stats
                    .backlog
                    .set((backlog - sent as i64).max(0) as u64);
                if let Ok(f) = self.store.bus_published(mark) {
                    // Only a hint for after a restart: a lost mark means
                    // duplicates, which peers drop.
                    let _ = f.await;
                }
            } else {
                // The buffer is full or the server slow: let it drain.
                Timer::after(Duration::from_millis(50)).await;
            }
        }
    }

    /// Local members changed in these rooms: subscribe or leave, and beat.
    pub(super) async fn run_news(&self) {
        loop {
            let l = self.chat.bus_news();
            if !self.chat.has_bus_news() {
                l.await;
            }
            let Some(link) = self.current() else {
                // Reconnecting subscribes every local room anyway.
                self.chat.take_bus_news();
                continue;
            };
            for room in self.chat.take_bus_news() {
                let users = self.chat.local_users(&room);
                if users.is_empty() {
                    // An empty beat: peers drop this box from the room.
                    self.beat(&link, &room, &users, 0);
                    if let Some(sid) = self.subs.borrow_mut().remove(&room) {
                        link.send(format!("UNSUB {sid}\r\n").as_bytes());
                    }
                    self.applied.borrow_mut().retain(|(_, r), _| *r != room);
                    self.asked.borrow_mut().remove(&room);
                } else {
                    let new = !self.subs.borrow().contains_key(&room);
                    self.subscribe(&link, &room);
                    self.beat(&link, &room, &users, 0);
                    if new {
                        self.want_sync(&room);
                    }
                }
            }
        }
    }

    /// Every heartbeat: a beat per local room with this box's head there,
    /// boxes gone quiet dropped, and now and then the log pruned.
    pub(super) async fn run_heartbeat(&self) {
        let mut last_prune = Instant::now();
        loop {
            Timer::after(self.cfg.heartbeat).await;
            let now = Instant::now();
            let gone = self.chat.expire_remote(now, self.cfg.heartbeat * 3);
            add(&self.stats.peers_expired, gone as u64);
            if now.duration_since(last_prune) >= Duration::from_secs(60) {
                last_prune = now;
                self.prune().await;
            }
            let Some(link) = self.current() else { continue };
            let rooms: Vec<String> = self
                .chat
                .local_rooms()
                .iter()
                .map(|r| r.to_string())
                .collect();
            if rooms.is_empty() {
                continue;
            }
            let heads = match self.store.bus_heads(rooms) {
                Ok(f) => f.await.unwrap_or_default(),
                Err(_) => continue,
            };
            for h in heads {
                self.beat(&link, &h.room, &self.chat.local_users(&h.room), h.own);
            }
        }
    }

    pub(super) async fn prune(&self) {
        let older_than = crate::clock::unix_ms() - self.cfg.outbox_max_age.as_millis() as i64;
        let pruned = self
            .store
            .bus_prune(self.cfg.outbox_max_rows, older_than, 10_000);
        if let Ok(f) = pruned {
            if let Ok(deleted) = f.await {
                if deleted > 0 {
                    add(&self.stats.outbox_pruned, deleted as u64);
                    self.log.warn(
                        "bus outbox over its bound: events never published were dropped (still stored here)",
                        &[("events", &deleted)],
                    );
                }
            }
        }
    }

    /// A beat for `room` now, if this box is on the bus and has members
    /// there.
    pub(super) fn beat_now(&self, room: &Rc<str>) {
        let users = self.chat.local_users(room);
        if let (Some(link), false) = (self.current(), users.is_empty()) {
            self.beat(&link, room, &users, 0);
        }
    }

    /// Tells peers who of `room` is on this box, and this box's head there
    /// (0: not said).
    fn beat(&self, link: &Link, room: &str, users: &[Rc<str>], head: i64) {
        let body = wire::beat(&self.cfg.node_id, room, users, head);
        self.publish(
            link,
            &wire::room_subject(&self.cfg.subject_prefix, room),
            &body,
        );
    }
}
