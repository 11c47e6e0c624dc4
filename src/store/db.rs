//! The SQLite side of the store: opening and migrating the database, the
//! write batch (one transaction per group commit), history reads, retention.
//! Everything here blocks and runs on the pool.

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use std::path::Path;

/// The schema this build writes. Older databases are migrated on start;
/// a newer one is refused (it was written by a newer hivegate).
pub const SCHEMA_VERSION: i64 = 2;

/// Most distinct emoji on one message.
pub const MAX_EMOJI_PER_MESSAGE: i64 = 50;
/// Most users behind one emoji on one message.
pub const MAX_USERS_PER_EMOJI: i64 = 100;

const SCHEMA_V1: &str = "
CREATE TABLE rooms (
    name TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    room TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user TEXT NOT NULL,
    text TEXT NOT NULL,
    ts INTEGER NOT NULL,
    UNIQUE (room, seq)
);
CREATE INDEX messages_ts ON messages (ts);
CREATE TABLE reactions (
    message_id TEXT NOT NULL,
    emoji TEXT NOT NULL,
    user TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (message_id, emoji, user)
) WITHOUT ROWID;
";

/// Version 2: the outbox. Every message and reaction change is marked
/// unsynced in the transaction that stores it; reactions stay as rows with
/// a `removed` flag and a version, so a toggle is an upsert remotely too,
/// and a row is marked synced only if it did not change while shipping.
/// `synced = 2` parks a row the remote refused (see `dead_letters`).
const SCHEMA_V2: &str = "
ALTER TABLE messages ADD COLUMN synced INTEGER NOT NULL DEFAULT 0;
CREATE INDEX messages_unsynced ON messages (synced) WHERE synced = 0;
ALTER TABLE reactions ADD COLUMN removed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reactions ADD COLUMN synced INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reactions ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
CREATE INDEX reactions_unsynced ON reactions (synced, ts) WHERE synced = 0;
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    row_key TEXT NOT NULL,
    row_json TEXT NOT NULL,
    error TEXT NOT NULL,
    ts INTEGER NOT NULL
);
";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
    Off,
}

impl Synchronous {
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
            Synchronous::Off => "OFF",
        }
    }
}

/// Opens (creating if needed) and migrates the database at `path`. A file
/// that is not a hivegate database is an error naming it, never replaced.
pub fn open_writer(path: &Path, sync: Synchronous) -> Result<Connection, String> {
    let fail = |what: &str, e: rusqlite::Error| {
        format!(
            "database {}: {what}: {e} (if the file is damaged, move it away and restore a backup made with `hivegate backup`)",
            path.display()
        )
    };
    let conn = Connection::open(path).map_err(|e| fail("cannot open", e))?;
    // Reading the header is what finds a file that is not a database.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| fail("cannot read", e))?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "database {} has schema version {version}, newer than this build's {SCHEMA_VERSION}: run a newer hivegate",
            path.display()
        ));
    }
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| fail("cannot set busy_timeout", e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| fail("cannot switch to WAL", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "database {}: WAL mode refused (got {mode})",
            path.display()
        ));
    }
    conn.execute_batch(&format!("PRAGMA synchronous = {};", sync.pragma()))
        .map_err(|e| fail("cannot set synchronous", e))?;
    migrate(&conn, version).map_err(|e| fail("cannot migrate", e))?;
    let check: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(|e| fail("cannot check", e))?;
    if check != "ok" {
        return Err(format!("database {} is damaged: {check}", path.display()));
    }
    Ok(conn)
}

fn migrate(conn: &Connection, from: i64) -> rusqlite::Result<()> {
    if from < 1 {
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA_V1} PRAGMA user_version = 1; COMMIT;"
        ))?;
    }
    if from < 2 {
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA_V2} PRAGMA user_version = 2; COMMIT;"
        ))?;
    }
    Ok(())
}

/// A read-only connection for history; WAL lets it read while the writer
/// writes.
pub fn open_reader(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("database {}: cannot open for reading: {e}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// One change in a write batch.
#[derive(Debug, Clone)]
pub enum WriteOp {
    Publish {
        id: String,
        room: String,
        user: String,
        text: String,
        ts: i64,
    },
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
    /// The remote refused this row: park it and say why.
    DeadLetter {
        kind: &'static str,
        key: Vec<String>,
        row_json: String,
        error: String,
        ts: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOk {
    Published {
        seq: i64,
    },
    Reacted {
        room: String,
        count: i64,
        added: bool,
    },
    Pruned {
        deleted: i64,
    },
    Marked,
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

/// Applies a batch in one transaction (the group commit). A failing op
/// must not take the others with it, and a savepoint around every op would
/// double the statements, so the batch first runs without them: refusals
/// (not found, limits) change nothing before they return. Only if an op
/// fails in the database itself is the transaction rolled back and the
/// batch run again with a savepoint per op. If the commit fails, every op
/// fails.
pub fn write_batch(conn: &mut Connection, ops: &[WriteOp]) -> Vec<Result<WriteOk, WriteErr>> {
    match try_batch(conn, ops, false) {
        Ok(results) => results,
        Err(Retry::WithSavepoints) => {
            try_batch(conn, ops, true).unwrap_or_else(|e| all_fail(ops, &e))
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
) -> Result<Vec<Result<WriteOk, WriteErr>>, Retry> {
    let failed = |e: rusqlite::Error| Retry::Failed(e.to_string());
    // Dropping the transaction without commit rolls it back.
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let result = if isolate {
            // A savepoint rolls back on drop: a failed op leaves no trace.
            match tx.savepoint() {
                Ok(sp) => apply(&sp, op).and_then(|ok| {
                    sp.commit().map_err(|e| WriteErr::Storage(e.to_string()))?;
                    Ok(ok)
                }),
                Err(e) => Err(WriteErr::Storage(e.to_string())),
            }
        } else {
            match apply(&tx, op) {
                Err(WriteErr::Storage(_)) => return Err(Retry::WithSavepoints),
                other => other,
            }
        };
        results.push(result);
    }
    tx.commit().map_err(failed)?;
    Ok(results)
}

fn apply(conn: &Connection, op: &WriteOp) -> Result<WriteOk, WriteErr> {
    let storage = |e: rusqlite::Error| WriteErr::Storage(e.to_string());
    match op {
        WriteOp::Publish {
            id,
            room,
            user,
            text,
            ts,
        } => {
            conn.prepare_cached(
                "INSERT INTO rooms (name, last_seq) VALUES (?1, 1)
                 ON CONFLICT (name) DO UPDATE SET last_seq = last_seq + 1
                 RETURNING last_seq",
            )
            .and_then(|mut s| s.query_row(params![room], |r| r.get::<_, i64>(0)))
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
            let users = count_for(emoji)?;
            if users == 0 {
                let distinct: i64 = conn
                    .prepare_cached(
                        "SELECT COUNT(DISTINCT emoji) FROM reactions WHERE message_id = ?1 AND removed = 0",
                    )
                    .and_then(|mut s| s.query_row(params![message_id], |r| r.get(0)))
                    .map_err(storage)?;
                if distinct >= MAX_EMOJI_PER_MESSAGE {
                    return Err(WriteErr::LimitExceeded("a message holds at most 50 distinct emoji"));
                }
            } else if users >= MAX_USERS_PER_EMOJI {
                return Err(WriteErr::LimitExceeded("an emoji holds at most 100 users"));
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

/// A stored message with its reaction counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: String,
    pub room: String,
    pub seq: i64,
    pub user: String,
    pub text: String,
    pub ts: i64,
    pub reactions: Vec<(String, i64)>,
}

/// Which messages of a room to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The newest `limit`.
    Latest,
    /// The `limit` just before this seq.
    Before(i64),
    /// The `limit` just after this seq (what a reconnecting client missed).
    After(i64),
}

/// Up to `limit` messages of `room`, oldest first.
pub fn history(
    conn: &Connection,
    room: &str,
    range: Range,
    limit: i64,
) -> rusqlite::Result<Vec<StoredMessage>> {
    let (sql, bound) = match range {
        Range::Latest => (
            "SELECT id, room, seq, user, text, ts FROM messages WHERE room = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
            i64::MAX,
        ),
        Range::Before(seq) => (
            "SELECT id, room, seq, user, text, ts FROM messages WHERE room = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
            seq,
        ),
        Range::After(seq) => (
            "SELECT id, room, seq, user, text, ts FROM messages WHERE room = ?1 AND seq > ?2 ORDER BY seq ASC LIMIT ?3",
            seq,
        ),
    };
    let mut msgs: Vec<StoredMessage> = conn
        .prepare_cached(sql)?
        .query_map(params![room, bound, limit], |r| {
            Ok(StoredMessage {
                id: r.get(0)?,
                room: r.get(1)?,
                seq: r.get(2)?,
                user: r.get(3)?,
                text: r.get(4)?,
                ts: r.get(5)?,
                reactions: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    msgs.sort_by_key(|m| m.seq);
    if let (Some(first), Some(last)) = (msgs.first(), msgs.last()) {
        let (lo, hi) = (first.seq, last.seq);
        let mut stmt = conn.prepare_cached(
            "SELECT r.message_id, r.emoji, COUNT(*) FROM reactions r JOIN messages m ON m.id = r.message_id
             WHERE m.room = ?1 AND m.seq BETWEEN ?2 AND ?3 AND r.removed = 0 GROUP BY r.message_id, r.emoji ORDER BY MIN(r.ts), r.emoji",
        )?;
        let rows = stmt.query_map(params![room, lo, hi], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (id, emoji, n) = row?;
            if let Some(m) = msgs.iter_mut().find(|m| m.id == id) {
                m.reactions.push((emoji, n));
            }
        }
    }
    Ok(msgs)
}

/// A message waiting to be shipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub id: String,
    pub room: String,
    pub seq: i64,
    pub user: String,
    pub text: String,
    pub ts: i64,
}

/// A reaction change waiting to be shipped, at the version read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutReaction {
    pub message_id: String,
    pub emoji: String,
    pub user: String,
    pub removed: bool,
    pub ts: i64,
    pub version: i64,
}

/// The oldest unsynced rows, and the size and age of the whole backlog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outbox {
    pub messages: Vec<OutMessage>,
    pub reactions: Vec<OutReaction>,
    pub backlog: i64,
    pub oldest_ts: Option<i64>,
}

/// Up to `limit` unsynced messages in the order they were stored, then up
/// to `limit` unsynced reaction changes (a reaction's message is shipped
/// before it, or in the same round).
pub fn outbox(conn: &Connection, limit: i64) -> rusqlite::Result<Outbox> {
    let messages = conn
        .prepare_cached(
            "SELECT id, room, seq, user, text, ts FROM messages WHERE synced = 0 ORDER BY rowid LIMIT ?1",
        )?
        .query_map(params![limit], |r| {
            Ok(OutMessage {
                id: r.get(0)?,
                room: r.get(1)?,
                seq: r.get(2)?,
                user: r.get(3)?,
                text: r.get(4)?,
                ts: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let reactions = conn
        .prepare_cached(
            "SELECT message_id, emoji, user, removed, ts, version FROM reactions WHERE synced = 0 ORDER BY ts LIMIT ?1",
        )?
        .query_map(params![limit], |r| {
            Ok(OutReaction {
                message_id: r.get(0)?,
                emoji: r.get(1)?,
                user: r.get(2)?,
                removed: r.get::<_, i64>(3)? != 0,
                ts: r.get(4)?,
                version: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let pending = |table: &str| -> rusqlite::Result<(i64, Option<i64>)> {
        conn.prepare_cached(&format!(
            "SELECT COUNT(*), MIN(ts) FROM {table} WHERE synced = 0"
        ))?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
    };
    let (m_count, m_oldest) = pending("messages")?;
    let (r_count, r_oldest) = pending("reactions")?;
    let oldest_ts = match (m_oldest, r_oldest) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Outbox {
        messages,
        reactions,
        backlog: m_count + r_count,
        oldest_ts,
    })
}

/// Bytes of the database in use: its pages less the free ones. (The WAL
/// comes on top, bounded by SQLite's automatic checkpoint at about 4 MiB.)
pub fn used_bytes(conn: &Connection) -> rusqlite::Result<i64> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok((pages - free) * size)
}

/// Copies the live database at `from` to `to` with SQLite's online backup
/// API: a consistent snapshot, taken while the gateway keeps writing.
pub fn backup(from: &Path, to: &Path) -> Result<(), String> {
    let src = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("cannot open {}: {e}", from.display()))?;
    src.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(|e| format!("{} is not a readable database: {e}", from.display()))?;
    let mut dst =
        Connection::open(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let backup = rusqlite::backup::Backup::new(&src, &mut dst).map_err(|e| e.to_string())?;
    backup
        .run_to_completion(256, std::time::Duration::from_millis(5), None)
        .map_err(|e| format!("backup to {} failed: {e}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("t.db"), Synchronous::Full).unwrap();
        (dir, conn)
    }

    fn publish(id: &str, room: &str, text: &str, ts: i64) -> WriteOp {
        WriteOp::Publish {
            id: id.into(),
            room: room.into(),
            user: "alice".into(),
            text: text.into(),
            ts,
        }
    }

    fn react(id: &str, emoji: &str, user: &str) -> WriteOp {
        WriteOp::React {
            message_id: id.into(),
            emoji: emoji.into(),
            user: user.into(),
            ts: 1,
            rooms: vec!["x".into()],
        }
    }

    #[test]
    fn sequences_are_per_room_and_survive_a_batch() {
        let (_d, mut c) = db();
        let r = write_batch(
            &mut c,
            &[
                publish("a", "x", "1", 1),
                publish("b", "x", "2", 2),
                publish("c", "y", "3", 3),
            ],
        );
        assert_eq!(
            r,
            vec![
                Ok(WriteOk::Published { seq: 1 }),
                Ok(WriteOk::Published { seq: 2 }),
                Ok(WriteOk::Published { seq: 1 })
            ]
        );
        // A duplicate id fails alone; the rest of the batch commits.
        let r = write_batch(
            &mut c,
            &[publish("a", "x", "dup", 4), publish("d", "x", "4", 5)],
        );
        assert!(matches!(r[0], Err(WriteErr::Storage(_))));
        assert_eq!(r[1], Ok(WriteOk::Published { seq: 3 }));
        let h = history(&c, "x", Range::Latest, 10).unwrap();
        let seqs: Vec<i64> = h.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2, 3], "the failed op's seq was rolled back too");
    }

    #[test]
    fn history_ranges_are_oldest_first() {
        let (_d, mut c) = db();
        let ops: Vec<WriteOp> = (1..=10)
            .map(|i| publish(&format!("m{i}"), "x", &i.to_string(), i))
            .collect();
        write_batch(&mut c, &ops);
        let seqs = |r, l| {
            history(&c, "x", r, l)
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(Range::Latest, 3), [8, 9, 10]);
        assert_eq!(seqs(Range::Before(5), 2), [3, 4]);
        assert_eq!(seqs(Range::After(7), 100), [8, 9, 10]);
        assert!(seqs(Range::After(10), 5).is_empty());
    }

    #[test]
    fn reactions_toggle_and_are_bounded() {
        let (_d, mut c) = db();
        write_batch(&mut c, &[publish("m", "x", "hi", 1)]);
        let r = write_batch(
            &mut c,
            &[
                react("m", "👍", "a"),
                react("m", "👍", "b"),
                react("m", "👍", "a"),
            ],
        );
        assert_eq!(
            r[0],
            Ok(WriteOk::Reacted {
                room: "x".into(),
                count: 1,
                added: true
            })
        );
        assert_eq!(
            r[1],
            Ok(WriteOk::Reacted {
                room: "x".into(),
                count: 2,
                added: true
            })
        );
        assert_eq!(
            r[2],
            Ok(WriteOk::Reacted {
                room: "x".into(),
                count: 1,
                added: false
            })
        );
        assert_eq!(
            write_batch(&mut c, &[react("nope", "👍", "a")])[0],
            Err(WriteErr::NotFound)
        );
        let elsewhere = WriteOp::React {
            message_id: "m".into(),
            emoji: "👍".into(),
            user: "z".into(),
            ts: 1,
            rooms: vec!["other".into()],
        };
        assert_eq!(
            write_batch(&mut c, &[elsewhere])[0],
            Err(WriteErr::NotFound)
        );
        // 100 users on one emoji, then the 101st is refused.
        let ops: Vec<WriteOp> = (0..99)
            .map(|i| react("m", "👍", &format!("u{i}")))
            .collect();
        assert!(write_batch(&mut c, &ops).iter().all(|r| r.is_ok()));
        assert!(matches!(
            write_batch(&mut c, &[react("m", "👍", "late")])[0],
            Err(WriteErr::LimitExceeded(_))
        ));
        // 50 distinct emoji, then the 51st is refused; an existing one still toggles.
        let ops: Vec<WriteOp> = (0..49).map(|i| react("m", &format!("e{i}"), "a")).collect();
        assert!(write_batch(&mut c, &ops).iter().all(|r| r.is_ok()));
        assert!(matches!(
            write_batch(&mut c, &[react("m", "new", "a")])[0],
            Err(WriteErr::LimitExceeded(_))
        ));
        assert!(write_batch(&mut c, &[react("m", "e0", "b")])[0].is_ok());
        let h = history(&c, "x", Range::Latest, 1).unwrap();
        assert_eq!(h[0].reactions.len(), 50);
        assert!(h[0].reactions.contains(&("👍".to_string(), 100)));
        assert!(h[0].reactions.contains(&("e0".to_string(), 2)));
    }

    #[test]
    fn dead_letters_are_kept_to_their_bound() {
        let (_d, mut c) = db();
        let park = |i: i64| WriteOp::DeadLetter {
            kind: "message",
            key: vec![format!("m{i}")],
            row_json: "{}".into(),
            error: "HTTP 400".into(),
            ts: i,
        };
        let ops: Vec<WriteOp> = (0..MAX_DEAD_LETTERS).map(park).collect();
        assert!(write_batch(&mut c, &ops)
            .iter()
            .all(|r| *r == Ok(WriteOk::Parked { pruned: 0 })));
        let more: Vec<WriteOp> = (MAX_DEAD_LETTERS..MAX_DEAD_LETTERS + 5).map(park).collect();
        assert!(write_batch(&mut c, &more)
            .iter()
            .all(|r| *r == Ok(WriteOk::Parked { pruned: 1 })));
        let (n, oldest): (i64, String) = c
            .query_row("SELECT COUNT(*), MIN(row_key) FROM dead_letters", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(n, MAX_DEAD_LETTERS);
        let first: String = c
            .query_row(
                "SELECT row_key FROM dead_letters ORDER BY id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(first, "m5", "the oldest went first ({oldest})");
    }

    #[test]
    fn the_outbox_lists_unsynced_rows_and_marks_only_what_was_shipped() {
        let (_d, mut c) = db();
        write_batch(
            &mut c,
            &[
                publish("a", "x", "1", 1),
                publish("b", "x", "2", 2),
                react("a", "👍", "u"),
            ],
        );
        let o = outbox(&c, 10).unwrap();
        assert_eq!(
            o.messages.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(o.backlog, 3);
        assert_eq!(o.oldest_ts, Some(1));
        let r = o.reactions[0].clone();
        assert!(!r.removed);
        // The reaction is toggled off while the batch is being shipped.
        write_batch(&mut c, &[react("a", "👍", "u")]);
        let mark = WriteOp::MarkSynced {
            messages: vec!["a".into(), "b".into()],
            reactions: vec![(r.message_id, r.emoji, r.user, r.version)],
        };
        assert_eq!(write_batch(&mut c, &[mark])[0], Ok(WriteOk::Marked));
        let o = outbox(&c, 10).unwrap();
        assert!(o.messages.is_empty());
        assert_eq!(o.reactions.len(), 1, "the newer change still waits");
        assert!(o.reactions[0].removed);
        // Parked rows leave the outbox.
        let dl = WriteOp::DeadLetter {
            kind: "reaction",
            key: vec!["a".into(), "👍".into(), "u".into()],
            row_json: "{}".into(),
            error: "400".into(),
            ts: 3,
        };
        write_batch(&mut c, &[dl]);
        assert_eq!(outbox(&c, 10).unwrap().backlog, 0);
        assert!(used_bytes(&c).unwrap() > 0);
    }

    #[test]
    fn unsynced_messages_are_never_pruned_when_a_remote_is_set() {
        let (_d, mut c) = db();
        let ops: Vec<WriteOp> = (1..=4)
            .map(|i| publish(&format!("m{i}"), "x", "t", i))
            .collect();
        write_batch(&mut c, &ops);
        let mark = WriteOp::MarkSynced {
            messages: vec!["m1".into(), "m2".into()],
            reactions: vec![],
        };
        write_batch(&mut c, &[mark]);
        let prune = WriteOp::Prune {
            older_than_ts: 100,
            max_per_room: 1000,
            batch: 10,
            synced_only: true,
        };
        assert_eq!(
            write_batch(&mut c, &[prune])[0],
            Ok(WriteOk::Pruned { deleted: 2 })
        );
        assert_eq!(
            write_batch(
                &mut c,
                &[WriteOp::MakeRoom {
                    batch: 10,
                    synced_only: true
                }]
            )[0],
            Ok(WriteOk::Pruned { deleted: 0 })
        );
        assert_eq!(history(&c, "x", Range::Latest, 10).unwrap().len(), 2);
    }

    #[test]
    fn pruning_removes_old_and_surplus_messages_in_batches() {
        let (_d, mut c) = db();
        let ops: Vec<WriteOp> = (1..=30)
            .map(|i| publish(&format!("m{i}"), "x", "t", i))
            .collect();
        write_batch(&mut c, &ops);
        write_batch(&mut c, &[react("m1", "👍", "a")]);
        // Older than ts 6: five messages, deleted three at a time.
        let prune = |c: &mut Connection, ts, max| {
            write_batch(
                c,
                &[WriteOp::Prune {
                    synced_only: false,
                    older_than_ts: ts,
                    max_per_room: max,
                    batch: 3,
                }],
            )
        };
        assert_eq!(
            prune(&mut c, 6, 1000)[0],
            Ok(WriteOk::Pruned { deleted: 3 })
        );
        assert_eq!(
            prune(&mut c, 6, 1000)[0],
            Ok(WriteOk::Pruned { deleted: 2 })
        );
        assert_eq!(
            prune(&mut c, 6, 1000)[0],
            Ok(WriteOk::Pruned { deleted: 0 })
        );
        // At most 20 per room: 25 left, so 5 more go (3, then 2).
        prune(&mut c, 0, 20);
        prune(&mut c, 0, 20);
        let h = history(&c, "x", Range::Latest, 100).unwrap();
        assert_eq!(h.len(), 20);
        assert_eq!(h[0].seq, 11);
        let orphans: i64 = c
            .query_row("SELECT COUNT(*) FROM reactions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(orphans, 0);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.db");
        std::fs::write(
            &path,
            b"this is not a database, just some text that is long enough",
        )
        .unwrap();
        let err = open_writer(&path, Synchronous::Full).unwrap_err();
        assert!(err.contains("junk.db"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap()[..4],
            *b"this",
            "the file is left alone"
        );
    }

    #[test]
    fn reopening_keeps_data_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let mut c = open_writer(&path, Synchronous::Full).unwrap();
            write_batch(&mut c, &[publish("a", "x", "1", 1)]);
        }
        let c = open_writer(&path, Synchronous::Normal).unwrap();
        assert_eq!(history(&c, "x", Range::Latest, 5).unwrap().len(), 1);
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(c);
        assert!(open_writer(&path, Synchronous::Full)
            .unwrap_err()
            .contains("newer"));
    }

    #[test]
    fn backup_copies_a_consistent_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut c = open_writer(&path, Synchronous::Full).unwrap();
        write_batch(
            &mut c,
            &[publish("a", "x", "1", 1), publish("b", "x", "2", 2)],
        );
        let out = dir.path().join("copy.db");
        backup(&path, &out).unwrap();
        let copy = open_reader(&out).unwrap();
        assert_eq!(history(&copy, "x", Range::Latest, 5).unwrap().len(), 2);
    }
}
