//! The database's side of rooms across gateways (the `cluster` module).
//! The events' wire format is the cluster's: the store keeps each of this
//! box's events as `(oseq, body)`, the body written by [`BusLog::encode`].
//!
//! This box's own events go into `bus_log` in the transaction that commits
//! them, each with the room's next origin sequence (`oseq`): a crash can
//! lose neither the message nor its place in the outbox. Events from other
//! boxes are applied in `oseq` order per origin and room, each once: one
//! already applied is a duplicate, one that skips ahead is a gap (the
//! caller asks the origin to replay). Every check and its write happen in
//! the writer's transaction, so they cannot race.

use rusqlite::{params, Connection, OptionalExtension};

/// An event from another box.
#[derive(Debug, Clone, PartialEq)]
pub struct BusEvent {
    pub origin: String,
    pub room: String,
    pub oseq: i64,
    pub kind: BusKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BusKind {
    /// A message, its `seq` not yet this box's (0).
    Message(crate::store::StoredMessage),
    Reaction(crate::store::ReactionChange),
    /// The origin no longer holds its events up to `oseq` (its log was
    /// pruned): move past them.
    Skip,
}

/// What a peer's change did here, for its members to be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Stored under this box's own `seq` for the room.
    Message { seq: i64 },
    /// The emoji's count on the message after the change.
    Reaction { room: String, count: i64 },
}

/// What applying a [`BusEvent`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Applied, in order.
    Changed(Effect),
    /// Applied already (a replay, or published twice).
    Duplicate,
    /// Events are missing before this one; `have` is the last applied.
    Gap { have: i64 },
    /// Nothing for members to see: a skip, or a reaction to a message
    /// this box does not hold.
    Quiet,
    /// Taken in order but not applied: past a bound a local client is held
    /// to (a message's distinct emoji, an emoji's users).
    Refused,
}

/// One row of this box's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub id: i64,
    pub room: String,
    pub oseq: i64,
    pub body: String,
}

fn log_row(r: &rusqlite::Row) -> rusqlite::Result<LogRow> {
    Ok(LogRow {
        id: r.get(0)?,
        room: r.get(1)?,
        oseq: r.get(2)?,
        body: r.get(3)?,
    })
}

/// Appends this box's `event` in `room` to the log, under the room's next
/// `oseq`.
pub fn log_event(
    conn: &Connection,
    log: &BusLog,
    room: &str,
    ts: i64,
    event: &BusKind,
) -> rusqlite::Result<()> {
    let oseq: i64 = conn
        .prepare_cached("UPDATE rooms SET oseq = oseq + 1 WHERE name = ?1 RETURNING oseq")?
        .query_row(params![room], |r| r.get(0))?;
    conn.prepare_cached("INSERT INTO bus_log (room, oseq, body, ts) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![
            room,
            oseq,
            (log.encode)(&log.node, room, oseq, event),
            ts
        ])?;
    Ok(())
}

/// How this box's events are written for the bus: its node, the room,
/// the event's `oseq` and the event. The format is the cluster's
/// (`cluster::wire`); the store only keeps the text it returns.
pub type Encode = fn(node: &str, room: &str, oseq: i64, event: &BusKind) -> String;

/// This box on the bus: its name, and how its events are written.
#[derive(Clone)]
pub struct BusLog {
    pub node: std::sync::Arc<str>,
    pub encode: Encode,
}

/// Applies an event from another box, once and in order.
pub(super) fn apply_event(
    conn: &Connection,
    ev: &BusEvent,
    seqs: &mut super::seqs::Seqs,
) -> rusqlite::Result<Applied> {
    let have: i64 = conn
        .prepare_cached("SELECT oseq FROM bus_peers WHERE origin = ?1 AND room = ?2")?
        .query_row(params![ev.origin, ev.room], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let advance = |to: i64| -> rusqlite::Result<()> {
        conn.prepare_cached(
            "INSERT INTO bus_peers (origin, room, oseq) VALUES (?1, ?2, ?3)
             ON CONFLICT (origin, room) DO UPDATE SET oseq = excluded.oseq",
        )?
        .execute(params![ev.origin, ev.room, to])?;
        Ok(())
    };
    if let BusKind::Skip = ev.kind {
        if ev.oseq > have {
            advance(ev.oseq)?;
        }
        return Ok(Applied::Quiet);
    }
    if ev.oseq <= have {
        return Ok(Applied::Duplicate);
    }
    if ev.oseq > have + 1 {
        return Ok(Applied::Gap { have });
    }
    advance(ev.oseq)?;
    match &ev.kind {
        BusKind::Message(m) => {
            let (id, user, text, ts) = (&m.id, &m.user, &m.text, m.ts);
            let known: Option<i64> = conn
                .prepare_cached("SELECT 1 FROM messages WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()?;
            if known.is_some() {
                return Ok(Applied::Duplicate);
            }
            let seq = seqs.next(conn, &ev.room)?;
            // Shipped to a remote store by its origin, not by every box.
            conn.prepare_cached(
                "INSERT INTO messages (id, room, seq, user, text, ts, synced, origin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7)",
            )?
            .execute(params![id, ev.room, seq, user, text, ts, ev.origin])?;
            Ok(Applied::Changed(Effect::Message { seq }))
        }
        BusKind::Reaction(r) => {
            let (message_id, emoji, user, added, ts) =
                (&r.message_id, &r.emoji, &r.user, &r.added, r.ts);
            let room: Option<String> = conn
                .prepare_cached("SELECT room FROM messages WHERE id = ?1")?
                .query_row(params![message_id], |r| r.get(0))
                .optional()?;
            let Some(room) = room else {
                return Ok(Applied::Quiet);
            };
            if *added && !within_reaction_bounds(conn, message_id, emoji, user)? {
                return Ok(Applied::Refused);
            }
            conn.prepare_cached(
                "INSERT INTO reactions (message_id, emoji, user, ts, removed, synced)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1)
                 ON CONFLICT (message_id, emoji, user)
                 DO UPDATE SET removed = excluded.removed, ts = excluded.ts, version = version + 1",
            )?
            .execute(params![message_id, emoji, user, ts, !added])?;
            let count: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM reactions WHERE message_id = ?1 AND emoji = ?2 AND removed = 0",
                )?
                .query_row(params![message_id, emoji], |r| r.get(0))?;
            Ok(Applied::Changed(Effect::Reaction { room, count }))
        }
        BusKind::Skip => Ok(Applied::Quiet),
    }
}

/// Whether adding `user`'s `emoji` keeps the message within the bounds a
/// local reaction is held to ([`super::room_for_reaction`]).
fn within_reaction_bounds(
    conn: &Connection,
    message_id: &str,
    emoji: &str,
    user: &str,
) -> rusqlite::Result<bool> {
    let active: Option<i64> = conn
        .prepare_cached(
            "SELECT 1 FROM reactions WHERE message_id = ?1 AND emoji = ?2 AND user = ?3 AND removed = 0",
        )?
        .query_row(params![message_id, emoji, user], |r| r.get(0))
        .optional()?;
    Ok(active.is_some()
        || super::room_for_reaction(conn, message_id, emoji)?
            .1
            .is_none())
}

/// Outbox rows after `after` (a `bus_log` id), oldest first, and how many
/// there are in all.
pub fn unpublished(
    conn: &Connection,
    after: i64,
    limit: i64,
) -> rusqlite::Result<(Vec<LogRow>, i64)> {
    let rows = conn
        .prepare_cached(
            "SELECT id, room, oseq, body FROM bus_log WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?
        .query_map(params![after, limit], log_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let backlog: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM bus_log WHERE id > ?1")?
        .query_row(params![after], |r| r.get(0))?;
    Ok((rows, backlog))
}

/// What a peer lacks of this box's events in a room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// The log no longer starts right after what the peer has: the last
    /// `oseq` pruned away (the peer skips to it).
    pub skip: Option<i64>,
    pub rows: Vec<LogRow>,
    /// This box's last `oseq` in the room: the asker compares it with what
    /// it then holds.
    pub head: i64,
}

/// This box's events in `room` after `after_oseq`, for a peer that lacks
/// them.
pub fn replay(
    conn: &Connection,
    room: &str,
    after_oseq: i64,
    limit: i64,
) -> rusqlite::Result<Replay> {
    let rows = conn
        .prepare_cached(
            "SELECT id, room, oseq, body FROM bus_log WHERE room = ?1 AND oseq > ?2 ORDER BY oseq LIMIT ?3",
        )?
        .query_map(params![room, after_oseq, limit], log_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let head = own_head(conn, room)?;
    let first = rows.first().map_or(head + 1, |r| r.oseq);
    let skip = (first > after_oseq + 1).then_some(first - 1);
    Ok(Replay { skip, rows, head })
}

/// This box's last `oseq` in `room` (0: none yet).
fn own_head(conn: &Connection, room: &str) -> rusqlite::Result<i64> {
    Ok(conn
        .prepare_cached("SELECT oseq FROM rooms WHERE name = ?1")?
        .query_row(params![room], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Where a room stands on this box.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heads {
    pub room: String,
    /// This box's last `oseq` in the room.
    pub own: i64,
    /// The last `oseq` applied here, per origin box.
    pub applied: Vec<(String, i64)>,
}

/// Per room: this box's last `oseq` and what it has applied from others.
pub fn heads(conn: &Connection, rooms: &[String]) -> rusqlite::Result<Vec<Heads>> {
    let mut out = Vec::with_capacity(rooms.len());
    for room in rooms {
        let own = own_head(conn, room)?;
        let peers = conn
            .prepare_cached("SELECT origin, oseq FROM bus_peers WHERE room = ?1 LIMIT 64")?
            .query_map(params![room], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        out.push(Heads {
            room: room.clone(),
            own,
            applied: peers,
        });
    }
    Ok(out)
}

/// The last outbox row published (and confirmed by the bus).
pub fn published_mark(conn: &Connection) -> rusqlite::Result<i64> {
    Ok(conn
        .prepare_cached("SELECT value FROM bus_state WHERE key = 'published'")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

pub fn set_published_mark(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO bus_state (key, value) VALUES ('published', ?1)
         ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
    )?
    .execute(params![id])?;
    Ok(())
}

/// Keeps the log within `max_rows` and `older_than_ts`; returns how many
/// rows went that were never published (counted by the caller: those
/// events reach other boxes only if they replay from before the cut,
/// which they then skip).
pub fn prune_log(
    conn: &Connection,
    max_rows: i64,
    older_than_ts: i64,
    batch: i64,
) -> rusqlite::Result<i64> {
    let mark = published_mark(conn)?;
    let cut: Option<i64> = conn
        .prepare_cached(
            "SELECT MAX(id) FROM (SELECT id FROM bus_log
              WHERE ts < ?1 OR id <= (SELECT MAX(id) FROM bus_log) - ?2
              ORDER BY id LIMIT ?3)",
        )?
        .query_row(params![older_than_ts, max_rows, batch], |r| r.get(0))?;
    let Some(cut) = cut else { return Ok(0) };
    let lost: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM bus_log WHERE id > ?1 AND id <= ?2")?
        .query_row(params![mark, cut], |r| r.get(0))?;
    conn.prepare_cached("DELETE FROM bus_log WHERE id <= ?1")?
        .execute(params![cut])?;
    if lost > 0 {
        set_published_mark(conn, cut)?;
    }
    Ok(lost)
}
