//! The sessions of MCP's HTTP transport (`Mcp-Session-Id`): bounded in
//! all and per owner (a user, or in open mode an address), each gone
//! after its idle timeout; no timer runs for it.
//!
//! One table shared by everyone must not let one client push the others
//! out: an owner at its quota gives up its own oldest session, and when
//! the table is full the one to go is the oldest of whoever holds the
//! most. A session with its `GET` stream open counts as in use.

use super::Cancel;
use crate::auth::Identity;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// One MCP session (`Mcp-Session-Id`).
pub struct Session {
    pub who: Rc<Identity>,
    /// Opened without a token (open mode): only requests without one may
    /// use it, and its guest is its own.
    pub anonymous: bool,
    /// Whose quota it counts against.
    owner: Rc<str>,
    pub version: &'static str,
    last_used: Instant,
    /// Tool calls in flight, by request id.
    pub calls: HashMap<String, Rc<Cancel>>,
    /// Whether a `GET` stream is open (at most one per session).
    pub streaming: bool,
    /// Notified when the session ends, for its `GET` stream.
    pub ended: Rc<event_listener::Event>,
}

/// `[mcp]`.
#[derive(Debug, Clone, Default)]
pub struct McpConfig {
    pub max_sessions: usize,
    pub max_sessions_per_owner: usize,
    pub session_idle: Duration,
}

/// The sessions, bounded: past `max`, the one idle longest goes; one idle
/// past `idle_timeout` is gone when next looked up. No timer runs.
pub struct Sessions {
    by_id: HashMap<String, Session>,
    max: usize,
    max_per_owner: usize,
    idle_timeout: Duration,
    pub evicted: u64,
}

impl Sessions {
    /// The table `[mcp]` sizes.
    pub fn with(cfg: &McpConfig) -> Sessions {
        Sessions::new(
            cfg.max_sessions,
            cfg.max_sessions_per_owner,
            cfg.session_idle,
        )
    }

    pub fn new(max: usize, max_per_owner: usize, idle_timeout: Duration) -> Sessions {
        Sessions {
            by_id: HashMap::new(),
            max: max.max(1),
            max_per_owner: max_per_owner.max(1),
            idle_timeout,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// A new session for `who`, counted against `owner`; returns its id.
    pub fn open(
        &mut self,
        who: Rc<Identity>,
        anonymous: bool,
        owner: Rc<str>,
        version: &'static str,
        now: Instant,
    ) -> String {
        let expired: Vec<String> = self
            .by_id
            .iter()
            .filter(|(_, s)| !s.streaming)
            .filter(|(_, s)| now.saturating_duration_since(s.last_used) >= self.idle_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            // Through close: its calls are cancelled, its stream told.
            self.close(&id);
        }
        let held = self.by_id.values().filter(|s| s.owner == owner).count();
        let victim = if held >= self.max_per_owner {
            Some(owner.clone())
        } else if self.by_id.len() >= self.max {
            self.largest_owner()
        } else {
            None
        };
        if let Some(victim) = victim {
            let oldest = self
                .by_id
                .iter()
                .filter(|(_, s)| s.owner == victim)
                .min_by_key(|(_, s)| (s.streaming, s.last_used))
                .map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                self.close(&id);
                self.evicted += 1;
            }
        }
        let id = format!(
            "{:016x}{:016x}",
            crate::resilience::random_u64(),
            crate::resilience::random_u64()
        );
        self.by_id.insert(
            id.clone(),
            Session {
                who,
                anonymous,
                owner,
                version,
                last_used: now,
                calls: HashMap::new(),
                streaming: false,
                ended: Rc::new(event_listener::Event::new()),
            },
        );
        id
    }

    /// The owner holding the most sessions.
    fn largest_owner(&self) -> Option<Rc<str>> {
        let mut counts: HashMap<&Rc<str>, usize> = HashMap::new();
        for s in self.by_id.values() {
            *counts.entry(&s.owner).or_insert(0) += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(o, _)| o.clone())
    }

    /// The guest of an anonymous session, for a request without a token.
    pub fn anonymous_guest(&self, id: &str) -> Option<Rc<Identity>> {
        self.by_id
            .get(id)
            .filter(|s| s.anonymous)
            .map(|s| s.who.clone())
    }

    /// The session `id` for a request by `user`, if it is live.
    pub fn touch(&mut self, id: &str, user: &str, now: Instant) -> Option<&mut Session> {
        let live = self.by_id.get(id).is_some_and(|s| {
            (s.streaming || now.saturating_duration_since(s.last_used) < self.idle_timeout)
                && &*s.who.user == user
        });
        if !live {
            if self.by_id.get(id).is_some_and(|s| &*s.who.user == user) {
                self.close(id);
            }
            return None;
        }
        let s = self.by_id.get_mut(id)?;
        s.last_used = now;
        Some(s)
    }

    /// A live session, whoever asks (the caller checked the user).
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Session> {
        self.by_id.get_mut(id)
    }

    /// Ends a session and cancels its calls.
    pub fn close(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(s) => {
                for call in s.calls.values() {
                    call.cancel();
                }
                s.ended.notify(usize::MAX);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::VERSIONS;

    fn user(name: &str) -> Rc<Identity> {
        Rc::new(Identity::new(name, &["user"]))
    }

    fn open(s: &mut Sessions, name: &str, at: Instant) -> String {
        s.open(user(name), false, Rc::from(name), VERSIONS[0], at)
    }

    #[test]
    fn sessions_are_bounded_and_expire_without_a_timer() {
        let t0 = Instant::now();
        let sec = |n| t0 + Duration::from_secs(n);
        let mut s = Sessions::new(2, 8, Duration::from_secs(60));
        let a = open(&mut s, "u", t0);
        let b = open(&mut s, "u", sec(1));
        assert!(s.touch(&a, "u", sec(2)).is_some());
        // Full: b, idle longest, goes.
        let c = open(&mut s, "u", sec(3));
        assert!(s.touch(&b, "u", sec(3)).is_none());
        assert_eq!(s.evicted, 1);
        // Another user's token cannot use a session.
        assert!(s.touch(&c, "mallory", sec(4)).is_none());
        assert!(s.touch(&c, "u", sec(4)).is_some());
        // Idle past the timeout: gone.
        assert!(s.touch(&a, "u", sec(100)).is_none());
        assert!(s.close(&c));
        assert!(s.is_empty());
    }

    #[test]
    fn one_owner_cannot_push_others_out() {
        let t0 = Instant::now();
        let sec = |n| t0 + Duration::from_secs(n);
        let mut s = Sessions::new(8, 3, Duration::from_secs(600));
        let alice = open(&mut s, "alice", t0);
        let streaming = open(&mut s, "bob", t0);
        s.get_mut(&streaming).unwrap().streaming = true;
        // Mallory opens many: she only ever replaces her own.
        for i in 0..50 {
            open(&mut s, "mallory", sec(1 + i));
        }
        assert_eq!(s.len(), 5);
        assert!(s.touch(&alice, "alice", sec(100)).is_some());
        assert!(s.touch(&streaming, "bob", sec(100)).is_some());
        // With the table full, the largest holder gives one up.
        let mut others = Vec::new();
        for name in ["c", "d", "e", "f"] {
            others.push(open(&mut s, name, sec(200)));
        }
        assert_eq!(s.len(), 8);
        assert_eq!(
            s.by_id.values().filter(|x| &*x.owner == "mallory").count(),
            2
        );
        assert!(s.touch(&alice, "alice", sec(201)).is_some());
        // An open stream keeps a session past its idle time.
        assert!(s.touch(&streaming, "bob", sec(5000)).is_some());
    }
}
