//! The rooms' message numbers, as a write batch hands them out.

use rusqlite::{params, Connection, OptionalExtension};

/// The rooms' message numbering within one batch: each room's last number
/// is read once, counted on here, and written back once before the commit.
/// An upsert returning the new number for every message cost more than
/// the message's own insert.
#[derive(Default, Clone)]
pub struct Seqs {
    /// The rooms that took a number, and their last.
    rooms: std::collections::HashMap<String, i64>,
}

impl Seqs {
    /// The next number of `room`'s messages.
    pub fn next(&mut self, conn: &Connection, room: &str) -> rusqlite::Result<i64> {
        if let Some(last) = self.rooms.get_mut(room) {
            *last += 1;
            return Ok(*last);
        }
        let known: Option<i64> = conn
            .prepare_cached("SELECT last_seq FROM rooms WHERE name = ?1")?
            .query_row(params![room], |r| r.get(0))
            .optional()?;
        let last = match known {
            Some(last) => last,
            None => {
                // The room's row exists from its first message on (the bus
                // log numbers its events there).
                conn.prepare_cached("INSERT INTO rooms (name, last_seq) VALUES (?1, 0)")?
                    .execute(params![room])?;
                0
            }
        };
        self.rooms.insert(room.to_string(), last + 1);
        Ok(last + 1)
    }

    pub fn store(&self, conn: &Connection) -> rusqlite::Result<()> {
        for (room, last) in &self.rooms {
            conn.prepare_cached("UPDATE rooms SET last_seq = ?2 WHERE name = ?1")?
                .execute(params![room, last])?;
        }
        Ok(())
    }
}
