//! Members on other boxes of a cluster, merged into each room's presence.
//!
//! Each box tells the bus who of a room is on it (the `cluster` module sends a
//! beat when that changes and every heartbeat); here those lists are kept
//! per room and box, and a room's member list is the union of its local
//! users and every box's. Presence frames say what changed in the union:
//! a user who joins here while already on another box is no news. A box
//! not heard from within the timeout is dropped, and its users leave.
//!
//! Only rooms with local members are tracked (a room goes with its last
//! local member), each with at most [`MAX_PEERS_PER_ROOM`] boxes and at
//! most `members_per_room` remote names in all (a box gets what the others
//! left; the rest of its list is ignored and counted).
//!
//! A beat may list thousands of names, and a room may hear from 64 boxes:
//! a beat costs time in the names it changes (a diff against what that box
//! said before, each name counted by the boxes that list it), never in the
//! room's whole membership.

use super::{note, Chat, Room};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Most other boxes tracked in one room; a beat from one more is ignored.
pub const MAX_PEERS_PER_ROOM: usize = 64;

pub(super) struct Remote {
    users: HashSet<Rc<str>>,
    seen: Instant,
}

/// Rooms whose local members changed, for the bus; kept only once a
/// cluster asked for them, each room at most once.
#[derive(Default)]
pub(super) struct BusNews {
    on: Cell<bool>,
    rooms: RefCell<Vec<Rc<str>>>,
    due: event_listener::Event,
}

impl BusNews {
    pub(super) fn changed(&self, room: &Rc<str>) {
        if !self.on.get() {
            return;
        }
        let mut rooms = self.rooms.borrow_mut();
        if !rooms.contains(room) {
            rooms.push(room.clone());
        }
        self.due.notify(1);
    }
}

impl Room {
    pub(super) fn is_remote_member(&self, user: &Rc<str>) -> bool {
        self.remote_names.contains_key(user)
    }

    /// Local and remote users, sorted, each once.
    pub(super) fn member_names(&self) -> Vec<Rc<str>> {
        let local = self.users.keys().cloned();
        let remote = self.remote_names.keys().cloned();
        let all: BTreeSet<Rc<str>> = local.chain(remote).collect();
        all.into_iter().collect()
    }

    /// One more box lists `user`; news if nobody here did.
    fn add_remote(&mut self, user: &Rc<str>) -> bool {
        let n = self.remote_names.entry(user.clone()).or_insert(0);
        *n += 1;
        let news = *n == 1 && !self.users.contains_key(user);
        if news {
            note(&mut self.left, &mut self.joined, user);
        }
        news
    }

    /// One box fewer lists `user`; news if that was the last one and the
    /// user is not here either.
    fn drop_remote(&mut self, user: &Rc<str>) -> bool {
        let Some(n) = self.remote_names.get_mut(user) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        self.remote_names.remove(user);
        let news = !self.users.contains_key(user);
        if news {
            note(&mut self.joined, &mut self.left, user);
        }
        news
    }

    /// Forgets box `node` and its names; whether presence changed.
    fn forget_box(&mut self, node: &str) -> bool {
        let Some(old) = self.remote.remove(node) else {
            return false;
        };
        self.remote_total -= old.users.len();
        let mut changed = false;
        for u in &old.users {
            changed |= self.drop_remote(u);
        }
        changed
    }
}

impl Chat {
    /// Starts keeping bus news: this box is part of a cluster.
    pub fn report_to_bus(&self) {
        self.bus.on.set(true);
    }

    /// The rooms whose local members changed since the last call.
    pub fn take_bus_news(&self) -> Vec<Rc<str>> {
        std::mem::take(&mut *self.bus.rooms.borrow_mut())
    }

    /// Fires when there is bus news.
    pub fn bus_news(&self) -> event_listener::EventListener {
        self.bus.due.listen()
    }

    pub fn has_bus_news(&self) -> bool {
        !self.bus.rooms.borrow().is_empty()
    }

    /// Rooms with local members.
    pub fn local_rooms(&self) -> Vec<Rc<str>> {
        self.rooms.borrow().keys().cloned().collect()
    }

    /// The users of `room` on this box, sorted.
    pub fn local_users(&self, room: &str) -> Vec<Rc<str>> {
        let rooms = self.rooms.borrow();
        let mut users: Vec<Rc<str>> = rooms
            .get(room)
            .map(|r| r.users.keys().cloned().collect())
            .unwrap_or_default();
        users.sort();
        users
    }

    /// Box `node` says these of `room`'s users are on it (none: it has
    /// left the room). Ignored for a room with no local members. Presence
    /// goes out for what changed in the room's union. `max_users` bounds
    /// the room's remote names in all. Returns whether the box is new in
    /// the room (it should hear who is here), and how many of its names
    /// were left out for the bound.
    pub fn set_remote_members(
        &self,
        room: &str,
        node: &str,
        users: Vec<Rc<str>>,
        max_users: usize,
        now: Instant,
    ) -> (bool, usize) {
        let mut rooms = self.rooms.borrow_mut();
        let Some(r) = rooms.get_mut(room) else {
            return (false, 0);
        };
        let known = r.remote.contains_key(node);
        if !known && (users.is_empty() || r.remote.len() >= MAX_PEERS_PER_ROOM) {
            return (false, 0);
        }
        let old = r.remote.remove(node).map(|x| x.users).unwrap_or_default();
        r.remote_total -= old.len();
        let budget = max_users.saturating_sub(r.remote_total);
        let offered = users.len();
        let mut now_listed: HashSet<Rc<str>> = HashSet::with_capacity(offered.min(budget));
        let mut left_out = 0;
        for u in users {
            if now_listed.len() >= budget && !now_listed.contains(&u) {
                left_out += 1;
                continue;
            }
            now_listed.insert(u);
        }
        let mut changed = false;
        for u in old.difference(&now_listed) {
            changed |= r.drop_remote(u);
        }
        for u in now_listed.difference(&old) {
            changed |= r.add_remote(u);
        }
        // A box is kept only with names in the room (one left without
        // room under the bound is not new, and is not answered).
        let stored = !now_listed.is_empty();
        if stored {
            r.remote_total += now_listed.len();
            let users = now_listed;
            r.remote.insert(Rc::from(node), Remote { users, seen: now });
        }
        if changed {
            self.mark_dirty(&Rc::from(room));
        }
        (!known && stored, left_out)
    }

    /// Drops the boxes not heard from within `timeout`; returns how many.
    pub fn expire_remote(&self, now: Instant, timeout: Duration) -> usize {
        let mut dropped = 0;
        let mut dirty = Vec::new();
        let mut rooms = self.rooms.borrow_mut();
        for (name, r) in rooms.iter_mut() {
            let stale: Vec<Rc<str>> = r
                .remote
                .iter()
                .filter(|(_, x)| now.saturating_duration_since(x.seen) > timeout)
                .map(|(node, _)| node.clone())
                .collect();
            let mut changed = false;
            for node in &stale {
                changed |= r.forget_box(node);
            }
            dropped += stale.len();
            if changed {
                dirty.push(name.clone());
            }
        }
        drop(rooms);
        for name in dirty {
            self.mark_dirty(&name);
        }
        dropped
    }

    /// Other boxes with members in any room here.
    pub fn remote_boxes(&self) -> usize {
        let rooms = self.rooms.borrow();
        let boxes: BTreeSet<&Rc<str>> = rooms.values().flat_map(|r| r.remote.keys()).collect();
        boxes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatLimits;

    fn names(v: &[Rc<str>]) -> Vec<&str> {
        v.iter().map(|s| &**s).collect()
    }

    #[test]
    fn members_are_the_union_of_every_box_and_presence_says_what_changed_in_it() {
        let chat = Chat::new(10);
        chat.report_to_bus();
        let limits = ChatLimits {
            rooms_per_session: 4,
            members_per_room: 10,
            max_text_bytes: 100,
        };
        let room: Rc<str> = Rc::from("r");
        let now = Instant::now();
        chat.join(&room, 1, 1, &Rc::from("alice"), &limits).unwrap();
        assert_eq!(names(&chat.take_bus_news()), ["r"]);
        chat.flush_presence();
        chat.set_remote_members("r", "b", vec![Rc::from("bob"), Rc::from("alice")], 10, now);
        let members = chat.join(&room, 2, 2, &Rc::from("carol"), &limits).unwrap();
        assert_eq!(names(&members), ["alice", "bob", "carol"]);
        // alice was here already: only bob is news from box b.
        assert_eq!(
            names(&chat.rooms.borrow()["r"].joined.ordered()),
            ["bob", "carol"]
        );
        chat.flush_presence();
        // alice leaves here but is still on box b: no news.
        chat.leave(&room, 1);
        assert!(chat.rooms.borrow()["r"].left.ordered().is_empty());
        assert_eq!(chat.remote_boxes(), 1);
        // Box b goes quiet: alice and bob leave.
        assert_eq!(
            chat.expire_remote(now + Duration::from_secs(20), Duration::from_secs(15)),
            1
        );
        let r = &chat.rooms.borrow()["r"];
        let mut left = r.left.ordered();
        left.sort();
        assert_eq!(names(&left), ["alice", "bob"]);
        assert_eq!(names(&r.member_names()), ["carol"]);
    }

    #[test]
    fn remote_lists_are_bounded_and_rooms_without_local_members_ignored() {
        let chat = Chat::new(10);
        let now = Instant::now();
        chat.set_remote_members("nowhere", "b", vec![Rc::from("x")], 10, now);
        assert_eq!(chat.remote_boxes(), 0);
        let limits = ChatLimits {
            rooms_per_session: 4,
            members_per_room: 10,
            max_text_bytes: 100,
        };
        chat.join(&Rc::from("r"), 1, 1, &Rc::from("alice"), &limits)
            .unwrap();
        // Bus news is kept only on a cluster's box.
        assert!(!chat.has_bus_news());
        // The room's remote names are bounded in all, not per box.
        let mut left_out = 0;
        for i in 0..MAX_PEERS_PER_ROOM + 5 {
            let users: Vec<Rc<str>> = (0..50).map(|u| Rc::from(format!("b{i}u{u}"))).collect();
            left_out += chat
                .set_remote_members("r", &format!("box{i}"), users, 120, now)
                .1;
        }
        let r = &chat.rooms.borrow()["r"];
        assert_eq!(r.remote_total, 120);
        assert_eq!(r.remote_names.len(), 120);
        assert_eq!(left_out, (MAX_PEERS_PER_ROOM + 5) * 50 - 120);
        assert!(r.remote.len() <= MAX_PEERS_PER_ROOM);
    }

    #[test]
    fn a_beat_costs_what_it_changes_not_the_room() {
        let chat = Chat::new(10);
        let limits = ChatLimits {
            rooms_per_session: 4,
            members_per_room: 10_000,
            max_text_bytes: 100,
        };
        chat.join(&Rc::from("r"), 1, 1, &Rc::from("alice"), &limits)
            .unwrap();
        chat.flush_presence();
        let now = Instant::now();
        let list = |from: usize, n: usize| -> Vec<Rc<str>> {
            (from..from + n)
                .map(|u| Rc::from(format!("user{u}")))
                .collect()
        };
        // 8 boxes' worth of names (the bound is 10,000 in all): the names
        // past the bound are left out, counted.
        let mut left_out = 0;
        for b in 0..8 {
            left_out += chat
                .set_remote_members("r", &format!("b{b}"), list(b * 10_000, 10_000), 10_000, now)
                .1;
        }
        // The same beats again: nothing changed, nothing to tell.
        for b in 0..8 {
            chat.set_remote_members("r", &format!("b{b}"), list(b * 10_000, 10_000), 10_000, now);
        }
        assert_eq!(left_out, 70_000);
        let r = &chat.rooms.borrow()["r"];
        assert_eq!((r.remote_total, r.joined.ordered().len()), (10_000, 10_000));
    }
}
