//! Presence news not sent yet: who joined a room and who left it since
//! its last `presence` frame, in the order it happened.
//!
//! A beat from another box may bring thousands of names at once, so
//! recording one is constant time (a map by name, with an arrival number
//! for the order), never a scan of what is pending.

use std::collections::HashMap;
use std::rc::Rc;

#[derive(Default)]
pub(super) struct News {
    names: HashMap<Rc<str>, u64>,
    next: u64,
}

impl News {
    /// The names, in the order they were noted.
    pub(super) fn ordered(&self) -> Vec<Rc<str>> {
        let mut v: Vec<(&Rc<str>, &u64)> = self.names.iter().collect();
        v.sort_by_key(|(_, n)| **n);
        v.into_iter().map(|(u, _)| u.clone()).collect()
    }

    /// [`News::ordered`], emptied.
    pub(super) fn take(&mut self) -> Vec<Rc<str>> {
        let out = self.ordered();
        self.names.clear();
        out
    }
}

/// Records a presence change, cancelling an opposite one not sent yet
/// (join then leave within an interval is no news).
pub(super) fn note(opposite: &mut News, this: &mut News, user: &Rc<str>) {
    if opposite.names.remove(user).is_none() && !this.names.contains_key(user) {
        this.names.insert(user.clone(), this.next);
        this.next += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn news_keeps_its_order_and_opposites_cancel() {
        let (mut joined, mut left) = (News::default(), News::default());
        let (a, b, c): (Rc<str>, Rc<str>, Rc<str>) = (Rc::from("a"), Rc::from("b"), Rc::from("c"));
        note(&mut left, &mut joined, &c);
        note(&mut left, &mut joined, &a);
        note(&mut left, &mut joined, &c);
        note(&mut joined, &mut left, &b);
        assert_eq!(joined.ordered(), [c.clone(), a.clone()]);
        // a leaves before the frame went out: no news of a at all.
        note(&mut joined, &mut left, &a);
        assert_eq!(joined.take(), [c]);
        assert_eq!(left.take(), [b]);
        assert!(joined.names.is_empty() && left.names.is_empty());
    }
}
