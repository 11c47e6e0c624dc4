//! Sockets still sending their request head, counted in all and per
//! address (IPv6 by its /64).
//!
//! A slowloris client opens sockets and sends its head a byte at a time.
//! Each address gets a share ([`Handshakes::max_per_ip`]): past it, its
//! newest socket is closed. When the whole table is full, the socket that
//! has been sending its head the longest is dropped to make room for the
//! new one. A real client sends its head in one packet and is gone from
//! the table within a round trip, so it is never the oldest; an attack
//! from many addresses only ever churns its own sockets, and a newcomer
//! (a browser, a health probe) always gets a place.

use crate::limit::ip_group;
use crate::ops::metrics::Refusal;
use event_listener::Event;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;

/// A socket's place in the table; its task waits on `evicted` too.
pub struct Ticket {
    pub id: u64,
    pub evicted: Rc<Eviction>,
}

/// Set once, when a handshake is dropped for a newer socket (perhaps
/// before its task first ran: the flag keeps the news).
#[derive(Default)]
pub struct Eviction {
    done: std::cell::Cell<bool>,
    event: Event,
}

impl Eviction {
    fn fire(&self) {
        self.done.set(true);
        self.event.notify(usize::MAX);
    }

    /// Resolves once evicted.
    pub async fn wait(&self) {
        loop {
            let listener = self.event.listen();
            if self.done.get() {
                return;
            }
            listener.await;
        }
    }
}

struct Pending {
    /// The address group whose share it takes; `None` for a trusted
    /// proxy's socket, which carries many clients (the table's bound and
    /// its eviction still hold).
    ip: Option<IpAddr>,
    evicted: Rc<Eviction>,
}

pub struct Handshakes {
    /// By age: ids are handed out in order, so the first is the oldest.
    pending: BTreeMap<u64, Pending>,
    /// Never more entries than `pending`: an entry exists while its
    /// address group holds at least one place.
    per_ip: HashMap<IpAddr, u32>,
    next_id: u64,
    max: usize,
    max_per_ip: u32,
    /// Handshakes dropped for a newer socket.
    pub evicted: u64,
}

impl Handshakes {
    pub fn new(max: usize, max_per_ip: u32) -> Handshakes {
        Handshakes {
            pending: BTreeMap::new(),
            per_ip: HashMap::new(),
            next_id: 0,
            max: max.max(1),
            max_per_ip,
            evicted: 0,
        }
    }

    /// Takes a place for `ip`, dropping the oldest pending handshake when
    /// the table is full; or says why not (its address holds its share).
    pub fn try_enter(&mut self, ip: IpAddr) -> Result<Ticket, Refusal> {
        let ip = ip_group(ip);
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            return Err(Refusal::HandshakeIpCap);
        }
        *self.per_ip.entry(ip).or_insert(0) += 1;
        Ok(self.enter(Some(ip)))
    }

    /// Takes a place for a trusted proxy's socket: outside any address's
    /// share (its clients are many, and known only from what it says).
    pub fn enter_from_proxy(&mut self) -> Ticket {
        self.enter(None)
    }

    fn enter(&mut self, ip: Option<IpAddr>) -> Ticket {
        if self.pending.len() >= self.max {
            if let Some((id, _)) = self.pending.first_key_value() {
                let id = *id;
                if let Some(p) = self.remove(id) {
                    p.evicted.fire();
                    self.evicted += 1;
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let evicted = Rc::new(Eviction::default());
        self.pending.insert(
            id,
            Pending {
                ip,
                evicted: evicted.clone(),
            },
        );
        Ticket { id, evicted }
    }

    /// Gives back a place taken by [`Handshakes::try_enter`] (a no-op for
    /// one already evicted).
    pub fn leave(&mut self, id: u64) {
        self.remove(id);
    }

    fn remove(&mut self, id: u64) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Some(ip) = p.ip {
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
        Some(p)
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_gets_its_share_and_a_full_table_drops_its_oldest() {
        let mut h = Handshakes::new(4, 2);
        let a1 = h.try_enter(ip(1)).unwrap();
        h.try_enter(ip(1)).unwrap();
        assert_eq!(h.try_enter(ip(1)).err(), Some(Refusal::HandshakeIpCap));
        h.try_enter(ip(2)).unwrap();
        h.try_enter(ip(3)).unwrap();
        assert_eq!(h.pending(), 4);
        // Full: the newcomer gets the oldest one's place.
        let new = h.try_enter(ip(4)).unwrap();
        assert_eq!((h.pending(), h.evicted), (4, 1));
        futures_lite::future::block_on(a1.evicted.wait());
        // The evicted socket's task leaves later: nothing happens twice.
        h.leave(a1.id);
        assert_eq!(h.pending(), 4);
        assert_eq!(h.per_ip.get(&ip(1)), Some(&1));
        h.leave(new.id);
        assert_eq!(h.per_ip.len(), 3);
        assert!(h.try_enter(ip(1)).is_ok());
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let mut h = Handshakes::new(16, 2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        h.try_enter(a).unwrap();
        h.try_enter(b).unwrap();
        assert_eq!(h.try_enter(a).err(), Some(Refusal::HandshakeIpCap));
        assert!(h.try_enter(c).is_ok());
    }
}
