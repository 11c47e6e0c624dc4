//! Message ids: ULID-shaped (26 characters of Crockford base32: 48 bits of
//! milliseconds, then 80 random bits), so they sort by time, and monotonic
//! within a millisecond, so they also sort in the order they were made.

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

pub struct UlidGen {
    last_ms: u64,
    last_rand: u128,
    state: u64,
}

impl UlidGen {
    pub fn new(seed: u64) -> UlidGen {
        UlidGen {
            last_ms: 0,
            last_rand: 0,
            state: seed | 1,
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: ids need to be unique and unguessable enough not to
        // collide across restarts, not secret.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn next(&mut self, now_ms: u64) -> String {
        let mask: u128 = (1 << 80) - 1;
        let (ms, rand) = if now_ms <= self.last_ms {
            // Same (or an earlier) millisecond: count up from the last id.
            let r = (self.last_rand + 1) & mask;
            let ms = if r == 0 {
                self.last_ms + 1
            } else {
                self.last_ms
            };
            (ms, r)
        } else {
            let r = ((self.next_u64() as u128) << 16 | (self.next_u64() as u128 & 0xffff)) & mask;
            (now_ms, r)
        };
        self.last_ms = ms;
        self.last_rand = rand;
        let value: u128 = ((ms as u128 & ((1 << 48) - 1)) << 80) | rand;
        let mut text = [0u8; 26];
        for (i, c) in text.iter_mut().enumerate() {
            *c = ALPHABET[((value >> (125 - i * 5)) & 31) as usize];
        }
        // The alphabet is ASCII.
        String::from_utf8_lossy(&text).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_in_the_order_they_were_made() {
        let mut g = UlidGen::new(42);
        let mut ids = Vec::new();
        for ms in [
            1_700_000_000_000u64,
            1_700_000_000_000,
            1_700_000_000_000,
            1_700_000_000_001,
            1_699_999_999_999,
        ] {
            ids.push(g.next(ms));
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(ids.iter().all(|id| id.len() == 26));
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids[0].starts_with("01H"), "{}", ids[0]);
    }
}
