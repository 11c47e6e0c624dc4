//! The sessions of MCP's HTTP transport (`Mcp-Session-Id`): bounded,
//! the one idle longest evicted, each gone after its idle timeout; no
//! timer runs for it.

use super::Cancel;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// One MCP session (`Mcp-Session-Id`).
pub struct Session {
    pub user: Rc<str>,
    pub version: &'static str,
    last_used: Instant,
    /// Tool calls in flight, by request id.
    pub calls: HashMap<String, Rc<Cancel>>,
    /// Whether a `GET` stream is open (at most one per session).
    pub streaming: bool,
    /// Notified when the session ends, for its `GET` stream.
    pub ended: Rc<event_listener::Event>,
}

/// The sessions, bounded: past `max`, the one idle longest goes; one idle
/// past `idle_timeout` is gone when next looked up. No timer runs.
pub struct Sessions {
    by_id: HashMap<String, Session>,
    max: usize,
    idle_timeout: Duration,
    pub evicted: u64,
}

impl Sessions {
    pub fn new(max: usize, idle_timeout: Duration) -> Sessions {
        Sessions {
            by_id: HashMap::new(),
            max: max.max(1),
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

    /// A new session; returns its id.
    pub fn open(&mut self, user: Rc<str>, version: &'static str, now: Instant) -> String {
        let expired: Vec<String> = self
            .by_id
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_used) >= self.idle_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            // Through close: its calls are cancelled, its stream told.
            self.close(&id);
        }
        if self.by_id.len() >= self.max {
            let oldest = self
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.last_used)
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
                user,
                version,
                last_used: now,
                calls: HashMap::new(),
                streaming: false,
                ended: Rc::new(event_listener::Event::new()),
            },
        );
        id
    }

    /// The session `id` for a request by `user`, if it is live.
    pub fn touch(&mut self, id: &str, user: &str, now: Instant) -> Option<&mut Session> {
        let live = self.by_id.get(id).is_some_and(|s| {
            now.saturating_duration_since(s.last_used) < self.idle_timeout && &*s.user == user
        });
        if !live {
            if self.by_id.get(id).is_some_and(|s| &*s.user == user) {
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

    #[test]
    fn sessions_are_bounded_and_expire_without_a_timer() {
        let t0 = Instant::now();
        let mut s = Sessions::new(2, Duration::from_secs(60));
        let a = s.open(Rc::from("u"), VERSIONS[0], t0);
        let b = s.open(Rc::from("u"), VERSIONS[0], t0 + Duration::from_secs(1));
        assert!(s.touch(&a, "u", t0 + Duration::from_secs(2)).is_some());
        // Full: b, idle longest, goes.
        let c = s.open(Rc::from("u"), VERSIONS[0], t0 + Duration::from_secs(3));
        assert!(s.touch(&b, "u", t0 + Duration::from_secs(3)).is_none());
        assert_eq!(s.evicted, 1);
        // Another user's token cannot use a session.
        assert!(s
            .touch(&c, "mallory", t0 + Duration::from_secs(4))
            .is_none());
        assert!(s.touch(&c, "u", t0 + Duration::from_secs(4)).is_some());
        // Idle past the timeout: gone.
        assert!(s.touch(&a, "u", t0 + Duration::from_secs(100)).is_none());
        assert!(s.close(&c));
        assert!(s.is_empty());
    }
}
