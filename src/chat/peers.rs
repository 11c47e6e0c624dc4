//! Members on other boxes of a cluster, merged into each room's presence.
//!
//! Each box tells the bus who of a room is on it (`crate::cluster` sends a
//! beat when that changes and every heartbeat); here those lists are kept
//! per room and box, and a room's member list is the union of its local
//! users and every box's. Presence frames say what changed in the union:
//! a user who joins here while already on another box is no news. A box
//! not heard from within the timeout is dropped, and its users leave.
//!
//! Only rooms with local members are tracked (a room goes with its last
//! local member), each with at most [`MAX_PEERS_PER_ROOM`] boxes of at most
//! `members_per_room` users.

use super::{note, Chat, Room};
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Most other boxes tracked in one room; a beat from one more is ignored.
pub const MAX_PEERS_PER_ROOM: usize = 64;

pub(super) struct Remote {
    users: Vec<Rc<str>>,
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
        self.remote.values().any(|r| r.users.contains(user))
    }

    /// Local and remote users, sorted, each once.
    pub(super) fn member_names(&self) -> Vec<Rc<str>> {
        self.names().into_iter().collect()
    }

    fn names(&self) -> BTreeSet<Rc<str>> {
        let local = self.users.keys().cloned();
        let remote = self.remote.values().flat_map(|r| r.users.iter().cloned());
        local.chain(remote).collect()
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
    /// goes out for what changed in the room's union. Returns whether the
    /// box is new in the room (it should hear who is here).
    pub fn set_remote_members(
        &self,
        room: &str,
        node: &str,
        mut users: Vec<Rc<str>>,
        max_users: usize,
        now: Instant,
    ) -> bool {
        let mut rooms = self.rooms.borrow_mut();
        let Some(r) = rooms.get_mut(room) else {
            return false;
        };
        let new = !users.is_empty() && !r.remote.contains_key(node);
        let name: Rc<str> = Rc::from(room);
        let before = r.names();
        if users.is_empty() {
            r.remote.remove(node);
        } else {
            if !r.remote.contains_key(node) && r.remote.len() >= MAX_PEERS_PER_ROOM {
                return false;
            }
            users.truncate(max_users);
            r.remote.insert(Rc::from(node), Remote { users, seen: now });
        }
        self.presence_diff(&name, r, &before);
        new
    }

    /// Drops the boxes not heard from within `timeout`; returns how many.
    pub fn expire_remote(&self, now: Instant, timeout: Duration) -> usize {
        let mut dropped = 0;
        let mut rooms = self.rooms.borrow_mut();
        for (name, r) in rooms.iter_mut() {
            let stale = |x: &Remote| now.saturating_duration_since(x.seen) > timeout;
            if !r.remote.values().any(stale) {
                continue;
            }
            let before = r.names();
            let n = r.remote.len();
            r.remote.retain(|_, x| !stale(x));
            dropped += n - r.remote.len();
            let name = name.clone();
            self.presence_diff(&name, r, &before);
        }
        dropped
    }

    /// Other boxes with members in any room here.
    pub fn remote_boxes(&self) -> usize {
        let rooms = self.rooms.borrow();
        let boxes: BTreeSet<&Rc<str>> = rooms.values().flat_map(|r| r.remote.keys()).collect();
        boxes.len()
    }

    fn presence_diff(&self, name: &Rc<str>, r: &mut Room, before: &BTreeSet<Rc<str>>) {
        let after = r.names();
        let mut changed = false;
        for user in after.difference(before) {
            note(&mut r.left, &mut r.joined, user);
            changed = true;
        }
        for user in before.difference(&after) {
            note(&mut r.joined, &mut r.left, user);
            changed = true;
        }
        if changed {
            self.mark_dirty(name);
        }
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
        assert_eq!(names(&chat.rooms.borrow()["r"].joined), ["bob", "carol"]);
        chat.flush_presence();
        // alice leaves here but is still on box b: no news.
        chat.leave(&room, 1);
        assert!(chat.rooms.borrow()["r"].left.is_empty());
        assert_eq!(chat.remote_boxes(), 1);
        // Box b goes quiet: alice and bob leave.
        assert_eq!(
            chat.expire_remote(now + Duration::from_secs(20), Duration::from_secs(15)),
            1
        );
        let r = &chat.rooms.borrow()["r"];
        assert_eq!(names(&r.left), ["alice", "bob"]);
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
        for i in 0..MAX_PEERS_PER_ROOM + 5 {
            let users: Vec<Rc<str>> = (0..50).map(|u| Rc::from(format!("u{u}"))).collect();
            chat.set_remote_members("r", &format!("box{i}"), users, 3, now);
        }
        let r = &chat.rooms.borrow()["r"];
        assert_eq!(r.remote.len(), MAX_PEERS_PER_ROOM);
        assert!(r.remote.values().all(|x| x.users.len() == 3));
    }
}
