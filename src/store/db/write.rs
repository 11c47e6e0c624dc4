//! The write batch: every change as an op, applied in one transaction per
//! group commit, with refusals that do not take the batch down; and the
//! deletes of retention and of a full disk.

use super::bus::{self, BusKind, BusLog};
use super::room_for_reaction;
use super::seqs::Seqs;
use crate::store::ReactionChange;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// One change in a write batch.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A new message (its `seq` is given in the commit).
    Publish(crate::store::StoredMessage),
    React {
        message_id: String,
        emoji: String,
        user: String,
        ts: i64,
        /// The rooms the reacting connection is in: a message elsewhere is
        /// "not found" (its existence is not revealed).
        rooms: Vec<String>,
    },
    /// Deletes up to `batch` messages older than `older_than_ts`, then up to
    /// `batch` beyond `max_per_room` in each room. With `synced_only`
    /// (a remote is configured) a message not yet shipped is never deleted.
    Prune {
        older_than_ts: i64,
        max_per_room: i64,
        batch: i64,
        synced_only: bool,
    },
    /// Storage pressure: deletes the oldest `batch` messages, only shipped
    /// ones when `synced_only`.
    MakeRoom { batch: i64, synced_only: bool },
    /// The remote has these: messages by id; reactions by key and the
    /// version that was shipped (a newer change stays unsynced).
    MarkSynced {
        messages: Vec<String>,
        reactions: Vec<(String, String, String, i64)>,
    },
    /// An event from another box (see `bus`); boxed, so that every op
    /// in the write queue is not as large as a peer's message.
    Bus(Box<super::bus::BusEvent>),
    /// The bus has this box's outbox up to this `bus_log` id.
    BusPublished { upto: i64 },
    /// Keeps this box's bus log within its bounds.
    BusPrune {
        max_rows: i64,
        older_than_ts: i64,
        batch: i64,
    },
    /// One call's LLM usage (added to its day, user and provider); days
    /// older than [`USAGE_DAYS`] are forgotten.
    Spend(Box<Spent>),
    /// The remote refused this row: park it and say why.
    DeadLetter {
        kind: &'static str,
        key: Vec<String>,
        row_json: String,
        error: String,
        ts: i64,
    },
}

/// Days of LLM usage kept: budgets need today's, accounting a year and a
/// month (rows are one per day, user and provider).
pub const USAGE_DAYS: i64 = 400;

/// One call's LLM usage, as it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spent {
    pub user: String,
    pub provider: String,
    /// UTC days since the epoch.
    pub day: i64,
    pub prompt: u64,
    pub completion: u64,
    /// The provider reported no counts: these are estimates.
    pub estimated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOk {
    Published {
        seq: i64,
    },
    /// What the writer makes of `Published` for the publisher: its
    /// message, numbered (boxed: every answer would be as large).
    Stored(Box<crate::store::StoredMessage>),
    Reacted {
        room: String,
        count: i64,
        added: bool,
    },
    Pruned {
        deleted: i64,
    },
    Marked,
    Bus(super::bus::Applied),
    /// A refused row was parked; `pruned` older dead letters were dropped
    /// to keep the table within [`MAX_DEAD_LETTERS`].
    Parked {
        pruned: u64,
    },
}

/// Most rows kept in `dead_letters`; past it the oldest go. The rows they
/// stood for stay in `messages`/`reactions` (marked `synced = 2`) until
/// retention.
pub const MAX_DEAD_LETTERS: i64 = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteErr {
    NotFound,
    LimitExceeded(&'static str),
    /// The database failed; the message says how.
    Storage(String),
}

impl std::fmt::Display for WriteErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteErr::NotFound => f.write_str("not found"),
            WriteErr::LimitExceeded(m) => f.write_str(m),
            WriteErr::Storage(m) => write!(f, "database: {m}"),
        }
    }
}

impl std::error::Error for WriteErr {}

/// Applies a batch in one transaction (the group commit). A failing op
/// must not take the others with it, and a savepoint around every op would
/// double the statements, so the batch first runs without them: refusals
/// (not found, limits) change nothing before they return. Only if an op
/// fails in the database itself is the transaction rolled back and the
/// batch run again with a savepoint per op. If the commit fails, every op
/// fails.
pub fn write_batch(conn: &mut Connection, ops: &[WriteOp]) -> Vec<Result<WriteOk, WriteErr>> {
    write_batch_as(conn, ops, None)
}

/// [`write_batch`] on a box of a cluster (`log`): each message and
/// reaction change made here also goes into the bus log, in the same
/// transaction.
pub fn write_batch_as(
    conn: &mut Connection,
    ops: &[WriteOp],
    log: Option<&BusLog>,
) -> Vec<Result<WriteOk, WriteErr>> {
    match try_batch(conn, ops, false, log) {
        Ok(results) => results,
        Err(Retry::WithSavepoints) => {
            try_batch(conn, ops, true, log).unwrap_or_else(|e| all_fail(ops, &e))
        }
        Err(e) => all_fail(ops, &e),
    }
}

enum Retry {
    /// An op failed in the database: run again, isolating each op.
    WithSavepoints,
    Failed(String),
}

fn all_fail(ops: &[WriteOp], e: &Retry) -> Vec<Result<WriteOk, WriteErr>> {
    let msg = match e {
        Retry::Failed(m) => m.clone(),
        Retry::WithSavepoints => "an op failed twice".to_string(),
    };
    ops.iter()
        .map(|_| Err(WriteErr::Storage(msg.clone())))
        .collect()
}

fn try_batch(
    conn: &mut Connection,
    ops: &[WriteOp],
    isolate: bool,
    log: Option<&BusLog>,
) -> Result<Vec<Result<WriteOk, WriteErr>>, Retry> {
    let failed = |e: rusqlite::Error| Retry::Failed(e.to_string());
    // Dropping the transaction without commit rolls it back.
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    let mut seqs = Seqs::default();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let result = if isolate {
            // A savepoint rolls back on drop: a failed op leaves no trace,
            // in the rooms' numbering either.
            let before = seqs.clone();
            let result = match tx.savepoint() {
                Ok(sp) => apply_as(&sp, op, log, &mut seqs).and_then(|ok| {
                    sp.commit().map_err(|e| WriteErr::Storage(e.to_string()))?;
                    Ok(ok)
                }),
                Err(e) => Err(WriteErr::Storage(e.to_string())),
            };
            if result.is_err() {
                seqs = before;
            }
            result
        } else {
            match apply_as(&tx, op, log, &mut seqs) {
                Err(WriteErr::Storage(_)) => return Err(Retry::WithSavepoints),
                other => other,
            }
        };
        results.push(result);
    }
    seqs.store(&tx).map_err(failed)?;
    tx.commit().map_err(failed)?;
    Ok(results)
}

/// Applies one op; on a cluster's box, logs what it changed for the bus.
fn apply_as(
    conn: &Connection,
    op: &WriteOp,
    log: Option<&BusLog>,
    seqs: &mut Seqs,
) -> Result<WriteOk, WriteErr> {
    let ok = apply(conn, op, seqs)?;
    let Some(log) = log else { return Ok(ok) };
    let (room, event) = match (op, &ok) {
        (WriteOp::Publish(m), WriteOk::Published { .. }) => (&m.room, BusKind::Message(m.clone())),
        (
            WriteOp::React {
                message_id,
                emoji,
                user,
                ts,
                ..
            },
            WriteOk::Reacted { room, added, .. },
        ) => (
            room,
            BusKind::Reaction(ReactionChange {
                message_id: message_id.clone(),
                emoji: emoji.clone(),
                user: user.clone(),
                added: *added,
                ts: *ts,
            }),
        ),
        _ => return Ok(ok),
    };
    let ts = match &event {
        BusKind::Message(m) => m.ts,
        BusKind::Reaction(r) => r.ts,
        BusKind::Skip => 0,
    };
    bus::log_event(conn, log, room, ts, &event).map_err(|e| WriteErr::Storage(e.to_string()))?;
    Ok(ok)
}

fn apply(conn: &Connection, op: &WriteOp, seqs: &mut Seqs) -> Result<WriteOk, WriteErr> {
    let storage = |e: rusqlite::Error| WriteErr::Storage(e.to_string());
    match op {
        WriteOp::Publish(m) => {
            let (id, room, user, text, ts) = (&m.id, &m.room, &m.user, &m.text, m.ts);
            seqs.next(conn, room)
            .and_then(|seq| {
                conn.prepare_cached(
                    "INSERT INTO messages (id, room, seq, user, text, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![id, room, seq, user, text, ts])?;
                Ok(WriteOk::Published { seq })
            })
            .map_err(storage)
        }
        WriteOp::React {
            message_id,
            emoji,
            user,
            ts,
            rooms,
        } => {
            let room: Option<String> = conn
                .prepare_cached("SELECT room FROM messages WHERE id = ?1")
                .and_then(|mut s| s.query_row(params![message_id], |r| r.get(0)).optional())
                .map_err(storage)?;
            let room = room
                .filter(|r| rooms.iter().any(|allowed| allowed == r))
                .ok_or(WriteErr::NotFound)?;
            let current: Option<i64> = conn
                .prepare_cached(
                    "SELECT removed FROM reactions WHERE message_id = ?1 AND emoji = ?2 AND user = ?3",
                )
                .and_then(|mut s| s.query_row(params![message_id, emoji, user], |r| r.get(0)).optional())
                .map_err(storage)?;
            let count_for = |emoji: &str| -> Result<i64, WriteErr> {
                conn.prepare_cached(
                    "SELECT COUNT(*) FROM reactions WHERE message_id = ?1 AND emoji = ?2 AND removed = 0",
                )
                .and_then(|mut s| s.query_row(params![message_id, emoji], |r| r.get(0)))
                .map_err(storage)
            };
            // Every change bumps the version and marks the row unsynced.
            let set_removed = |removed: bool| -> Result<(), WriteErr> {
                conn.prepare_cached(
                    "UPDATE reactions SET removed = ?4, ts = ?5, synced = 0, version = version + 1
                     WHERE message_id = ?1 AND emoji = ?2 AND user = ?3",
                )
                .and_then(|mut s| s.execute(params![message_id, emoji, user, removed, ts]))
                .map(|_| ())
                .map_err(storage)
            };
            if current == Some(0) {
                set_removed(true)?;
                return Ok(WriteOk::Reacted {
                    room,
                    count: count_for(emoji)?,
                    added: false,
                });
            }
            let (users, full) = room_for_reaction(conn, message_id, emoji).map_err(storage)?;
            if let Some(bound) = full {
                return Err(WriteErr::LimitExceeded(bound));
            }
            if current.is_some() {
                set_removed(false)?;
            } else {
                conn.prepare_cached(
                    "INSERT INTO reactions (message_id, emoji, user, ts) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![message_id, emoji, user, ts]))
                .map_err(storage)?;
            }
            Ok(WriteOk::Reacted {
                room,
                count: users + 1,
                added: true,
            })
        }
        WriteOp::Prune {
            older_than_ts,
            max_per_room,
            batch,
            synced_only,
        } => prune(conn, *older_than_ts, *max_per_room, *batch, *synced_only).map_err(storage),
        WriteOp::MakeRoom { batch, synced_only } => make_room(conn, *batch, *synced_only).map_err(storage),
        WriteOp::MarkSynced { messages, reactions } => (|| {
            for id in messages {
                conn.prepare_cached("UPDATE messages SET synced = 1 WHERE id = ?1")?
                    .execute(params![id])?;
            }
            for (message_id, emoji, user, version) in reactions {
                conn.prepare_cached(
                    "UPDATE reactions SET synced = 1
                     WHERE message_id = ?1 AND emoji = ?2 AND user = ?3 AND version = ?4",
                )?
                .execute(params![message_id, emoji, user, version])?;
            }
            Ok(WriteOk::Marked)
        })()
        .map_err(storage),
        WriteOp::Bus(ev) => bus::apply_event(conn, ev, seqs).map(WriteOk::Bus).map_err(storage),
        WriteOp::BusPublished { upto } => bus::set_published_mark(conn, *upto)
            .map(|_| WriteOk::Marked)
            .map_err(storage),
        WriteOp::BusPrune {
            max_rows,
            older_than_ts,
            batch,
        } => bus::prune_log(conn, *max_rows, *older_than_ts, *batch)
            .map(|deleted| WriteOk::Pruned { deleted })
            .map_err(storage),
        WriteOp::Spend(s) => (|| {
            let n = |v: u64| v.min(i64::MAX as u64) as i64;
            conn.prepare_cached(
                "INSERT INTO llm_tokens (day, user, provider, prompt, completion, calls, estimated) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6) ON CONFLICT (day, user, provider) DO UPDATE SET \
                 prompt = prompt + excluded.prompt, completion = completion + excluded.completion, \
                 calls = calls + 1, estimated = estimated + excluded.estimated",
            )?
            .execute(params![
                s.day,
                s.user,
                s.provider,
                n(s.prompt),
                n(s.completion),
                s.estimated as i64
            ])?;
            conn.prepare_cached("DELETE FROM llm_tokens WHERE day < ?1 - ?2")?
                .execute(params![s.day, USAGE_DAYS])?;
            Ok(WriteOk::Marked)
        })()
        .map_err(storage),
        WriteOp::DeadLetter {
            kind,
            key,
            row_json,
            error,
            ts,
        } => (|| {
            conn.prepare_cached(
                "INSERT INTO dead_letters (kind, row_key, row_json, error, ts) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![kind, key.join("/"), row_json, error, ts])?;
            let pruned = conn
                .prepare_cached(
                    "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?1",
                )?
                .execute(params![MAX_DEAD_LETTERS])?;
            if *kind == "message" {
                conn.prepare_cached("UPDATE messages SET synced = 2 WHERE id = ?1")?
                    .execute(params![key.first()])?;
            } else {
                conn.prepare_cached(
                    "UPDATE reactions SET synced = 2 WHERE message_id = ?1 AND emoji = ?2 AND user = ?3",
                )?
                .execute(params![key.first(), key.get(1), key.get(2)])?;
            }
            Ok(WriteOk::Parked {
                pruned: pruned as u64,
            })
        })()
        .map_err(storage),
    }
}

/// Deletes messages (and their reactions) by id. A message whose
/// reactions still wait to be shipped is kept.
fn delete_messages(conn: &Connection, ids: &[String], synced_only: bool) -> rusqlite::Result<i64> {
    let mut deleted = 0;
    for id in ids {
        if synced_only {
            let pending: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM reactions WHERE message_id = ?1 AND synced = 0",
                )?
                .query_row(params![id], |r| r.get(0))?;
            if pending > 0 {
                continue;
            }
        }
        conn.prepare_cached("DELETE FROM reactions WHERE message_id = ?1")?
            .execute(params![id])?;
        deleted += conn
            .prepare_cached("DELETE FROM messages WHERE id = ?1")?
            .execute(params![id])? as i64;
    }
    Ok(deleted)
}

fn make_room(conn: &Connection, batch: i64, synced_only: bool) -> rusqlite::Result<WriteOk> {
    let floor = if synced_only { 1 } else { 0 };
    let ids: Vec<String> = conn
        .prepare_cached("SELECT id FROM messages WHERE synced >= ?2 ORDER BY ts LIMIT ?1")?
        .query_map(params![batch, floor], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(WriteOk::Pruned {
        deleted: delete_messages(conn, &ids, synced_only)?,
    })
}

fn prune(
    conn: &Connection,
    older_than_ts: i64,
    max_per_room: i64,
    batch: i64,
    synced_only: bool,
) -> rusqlite::Result<WriteOk> {
    // synced = 1 (shipped), or anything when there is no remote.
    let floor = if synced_only { 1 } else { 0 };
    let mut ids: Vec<String> = conn
        .prepare_cached(
            "SELECT id FROM messages WHERE ts < ?1 AND synced >= ?3 ORDER BY ts LIMIT ?2",
        )?
        .query_map(params![older_than_ts, batch, floor], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    // Rooms past their bound: their oldest messages beyond it.
    let crowded: Vec<(String, i64)> = conn
        .prepare_cached(
            "SELECT room, MAX(seq) - ?1 FROM messages GROUP BY room HAVING COUNT(*) > ?1 LIMIT 16",
        )?
        .query_map(params![max_per_room], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (room, below_or_at) in crowded {
        let mut more: Vec<String> = conn
            .prepare_cached(
                "SELECT id FROM messages WHERE room = ?1 AND seq <= ?2 AND synced >= ?4 ORDER BY seq LIMIT ?3",
            )?
            .query_map(params![room, below_or_at, batch, floor], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids.append(&mut more);
    }
    Ok(WriteOk::Pruned {
        deleted: delete_messages(conn, &ids, synced_only)?,
    })
}
