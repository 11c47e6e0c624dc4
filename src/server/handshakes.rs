//! Sockets still sending their request head, counted in all and per IP.
//!
//! A slowloris client opens sockets and sends its head a byte at a time.
//! One global cap alone would let a single address hold every handshake
//! slot, and nobody else (not even a `/metrics` scrape) could connect. So
//! each IP gets a share ([`Handshakes::max_per_ip`]), and the last eighth of
//! the slots is a reserve that only an address holding no slot yet may
//! take: when many addresses attack at once, a newcomer such as a health
//! probe still finds a place.

use crate::ops::metrics::Refusal;
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug)]
pub struct Handshakes {
    total: usize,
    /// Never more entries than `total`: an entry exists while its IP holds
    /// at least one slot.
    per_ip: HashMap<IpAddr, u32>,
    max: usize,
    max_per_ip: u32,
    reserve: usize,
}

impl Handshakes {
    pub fn new(max: usize, max_per_ip: u32) -> Handshakes {
        Handshakes {
            total: 0,
            per_ip: HashMap::new(),
            max,
            max_per_ip,
            reserve: if max >= 8 { max / 8 } else { 0 },
        }
    }

    /// Takes a slot for `ip`, or says why not.
    pub fn try_enter(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        let held = self.per_ip.get(&ip).copied().unwrap_or(0);
        if held >= self.max_per_ip {
            return Err(Refusal::HandshakeIpCap);
        }
        let general = self.max - self.reserve;
        if self.total >= self.max || (self.total >= general && held > 0) {
            return Err(Refusal::HandshakeCap);
        }
        self.total += 1;
        *self.per_ip.entry(ip).or_insert(0) += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`Handshakes::try_enter`].
    pub fn leave(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
            self.total -= 1;
        }
    }

    pub fn pending(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_gets_its_share_and_newcomers_the_reserve() {
        let mut h = Handshakes::new(16, 4);
        for _ in 0..4 {
            h.try_enter(ip(1)).unwrap();
        }
        assert_eq!(h.try_enter(ip(1)), Err(Refusal::HandshakeIpCap));
        // Ten more addresses fill the 14 general slots...
        for i in 2..=11 {
            h.try_enter(ip(i)).unwrap();
        }
        assert_eq!(h.pending(), 14);
        // ...and an address that holds one may not take the reserve,
        assert_eq!(h.try_enter(ip(2)), Err(Refusal::HandshakeCap));
        // but newcomers may, until everything is taken.
        h.try_enter(ip(20)).unwrap();
        h.try_enter(ip(21)).unwrap();
        assert_eq!(h.try_enter(ip(22)), Err(Refusal::HandshakeCap));
        for _ in 0..4 {
            h.leave(ip(1));
        }
        h.leave(ip(1));
        assert_eq!(h.pending(), 12);
        assert!(!h.per_ip.contains_key(&ip(1)));
        assert_eq!(h.per_ip.len(), h.pending());
        h.try_enter(ip(1)).unwrap();
    }
}
