//! Buckets by key (client IP, user) in a table of fixed size.
//!
//! The table never grows past its bound: entries live in a slab allocated
//! once, linked in least-recently-used order. A bucket that has been idle
//! long enough to be full again is the same as a new one, so such entries
//! are dropped first; only when the table is full of live buckets is the
//! least recently used one evicted, and that is counted.

use super::bucket::{BucketParams, TokenBucket};
use slab::Slab;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

const NIL: usize = usize::MAX;

struct Node<K> {
    key: K,
    bucket: TokenBucket,
    /// Towards the most recently used end.
    newer: usize,
    /// Towards the least recently used end.
    older: usize,
}

pub struct KeyedBuckets<K> {
    params: BucketParams,
    nodes: Slab<Node<K>>,
    index: HashMap<K, usize>,
    max: usize,
    newest: usize,
    oldest: usize,
    /// Live buckets pushed out because the table was full.
    pub evictions: u64,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    pub fn new(params: BucketParams, max: usize) -> KeyedBuckets<K> {
        let max = max.max(1);
        KeyedBuckets {
            params,
            // Grown as keys arrive, up to `max`: an idle gateway does not
            // hold (and touch) a full table per limit.
            nodes: Slab::new(),
            index: HashMap::new(),
            max,
            newest: NIL,
            oldest: NIL,
            evictions: 0,
        }
    }

    /// New rates for every key from now on; each bucket keeps what it
    /// holds (a lower capacity takes effect at its next refill).
    pub fn set_params(&mut self, params: BucketParams) {
        self.params = params;
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Takes a token from `key`'s bucket (a new key starts full).
    pub fn take(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        let at = self.touch(key, now);
        let p = self.params;
        self.nodes[at].bucket.take(&p, now)
    }

    /// Gives back the token `take` just took.
    pub fn refund(&mut self, key: &K) {
        let p = self.params;
        if let Some(&at) = self.index.get(key) {
            self.nodes[at].bucket.refund(&p);
        }
    }

    /// Time until `key` has a token (zero for an unknown key).
    pub fn wait_for_one(&self, key: &K) -> Duration {
        self.index.get(key).map_or(Duration::ZERO, |&at| {
            self.nodes[at].bucket.wait_for_one(&self.params)
        })
    }

    /// The node for `key`, created if needed, moved to the newest end.
    fn touch(&mut self, key: &K, now: Instant) -> usize {
        if let Some(&at) = self.index.get(key) {
            self.unlink(at);
            self.push_newest(at);
            return at;
        }
        self.make_room(now);
        if self.nodes.len() == self.nodes.capacity() {
            // Grow geometrically, but never past the bound: the table
            // holds at most `max` nodes' worth of memory.
            let room = self.max.saturating_sub(self.nodes.capacity());
            let more = self.nodes.capacity().max(16).min(room);
            self.nodes.reserve_exact(more.max(1));
        }
        let at = self.nodes.insert(Node {
            key: key.clone(),
            bucket: TokenBucket::new(&self.params, now),
            newer: NIL,
            older: NIL,
        });
        self.index.insert(key.clone(), at);
        self.push_newest(at);
        at
    }

    /// Drops up to two refilled buckets from the old end (amortised
    /// clean-up that keeps the table small when traffic moves on), and
    /// evicts the oldest live one if the table is still full.
    fn make_room(&mut self, now: Instant) {
        for _ in 0..2 {
            let old = self.oldest;
            if old == NIL || !self.nodes[old].bucket.is_full(&self.params, now) {
                break;
            }
            self.remove(old);
        }
        if self.nodes.len() >= self.max {
            let old = self.oldest;
            if old != NIL {
                self.remove(old);
                self.evictions += 1;
            }
        }
    }

    fn remove(&mut self, at: usize) {
        self.unlink(at);
        let node = self.nodes.remove(at);
        self.index.remove(&node.key);
    }

    fn unlink(&mut self, at: usize) {
        let (newer, older) = (self.nodes[at].newer, self.nodes[at].older);
        if newer == NIL {
            self.newest = older;
        } else {
            self.nodes[newer].older = older;
        }
        if older == NIL {
            self.oldest = newer;
        } else {
            self.nodes[older].newer = newer;
        }
        self.nodes[at].newer = NIL;
        self.nodes[at].older = NIL;
    }

    fn push_newest(&mut self, at: usize) {
        self.nodes[at].older = self.newest;
        self.nodes[at].newer = NIL;
        if self.newest != NIL {
            self.nodes[self.newest].newer = at;
        }
        self.newest = at;
        if self.oldest == NIL {
            self.oldest = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: BucketParams = BucketParams {
        capacity: 2.0,
        refill_per_s: 1.0,
    };

    #[test]
    fn evicts_the_least_recently_used_live_bucket_at_the_bound() {
        let t0 = Instant::now();
        let mut t = KeyedBuckets::new(P, 3);
        for k in ["a", "b", "c"] {
            t.take(&k, t0).unwrap();
        }
        // Use "a" again: "b" is now the least recently used.
        t.take(&"a", t0).unwrap();
        assert!(t.take(&"a", t0).is_err());
        t.take(&"d", t0).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.evictions, 1);
        assert!(!t.index.contains_key("b"));
        // "a" kept its empty bucket.
        assert!(t.take(&"a", t0).is_err());
        assert_eq!(t.nodes.capacity(), 3, "the slab never grows");
    }

    #[test]
    fn refilled_buckets_are_dropped_before_anything_is_evicted() {
        let t0 = Instant::now();
        let mut t = KeyedBuckets::new(P, 3);
        for k in ["a", "b", "c"] {
            t.take(&k, t0).unwrap();
        }
        // Two seconds later every bucket is full again: forgettable.
        let t1 = t0 + Duration::from_secs(2);
        t.take(&"d", t1).unwrap();
        t.take(&"e", t1).unwrap();
        assert_eq!(t.evictions, 0);
        assert!(t.len() <= 3);
        assert!(t.index.contains_key("d") && t.index.contains_key("e"));
    }

    #[test]
    fn lru_order_survives_many_operations() {
        let t0 = Instant::now();
        let mut t = KeyedBuckets::new(P, 50);
        for i in 0..10_000u32 {
            let k = (i * 7919) % 97;
            let _ = t.take(&k, t0);
            assert!(t.len() <= 50);
        }
        // Walk the list both ways: every node once, links consistent.
        let mut seen = 0;
        let mut at = t.newest;
        let mut prev = NIL;
        while at != NIL {
            assert_eq!(t.nodes[at].newer, prev);
            prev = at;
            at = t.nodes[at].older;
            seen += 1;
        }
        assert_eq!(prev, t.oldest);
        assert_eq!(seen, t.len());
        assert_eq!(t.index.len(), t.len());
    }
}
