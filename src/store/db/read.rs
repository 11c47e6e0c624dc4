//! Reads: a room's history, and the rows not yet shipped to the remote.

use crate::store::message::StoredMessage;
use rusqlite::{params, Connection};

/// The columns of a message, in the order [`message_row`] reads them.
const MESSAGE_COLUMNS: &str = "id, room, seq, user, text, ts";

/// A message read with [`MESSAGE_COLUMNS`], without its reactions.
fn message_row(r: &rusqlite::Row) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        id: r.get(0)?,
        room: r.get(1)?,
        seq: r.get(2)?,
        user: r.get(3)?,
        text: r.get(4)?,
        ts: r.get(5)?,
        reactions: Vec::new(),
    })
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
    let (filter, bound) = match range {
        Range::Latest => ("seq < ?2 ORDER BY seq DESC", i64::MAX),
        Range::Before(seq) => ("seq < ?2 ORDER BY seq DESC", seq),
        Range::After(seq) => ("seq > ?2 ORDER BY seq ASC", seq),
    };
    let sql =
        format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ?1 AND {filter} LIMIT ?3");
    let mut msgs: Vec<StoredMessage> = conn
        .prepare_cached(&sql)?
        .query_map(params![room, bound, limit], message_row)?
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
pub struct Unsynced {
    pub messages: Vec<StoredMessage>,
    pub reactions: Vec<OutReaction>,
    pub backlog: i64,
    pub oldest_ts: Option<i64>,
}

/// Up to `limit` unsynced messages in the order they were stored, then up
/// to `limit` unsynced reaction changes (a reaction's message is shipped
/// before it, or in the same round).
pub fn outbox(conn: &Connection, limit: i64) -> rusqlite::Result<Unsynced> {
    let sql =
        format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE synced = 0 ORDER BY rowid LIMIT ?1");
    let messages = conn
        .prepare_cached(&sql)?
        .query_map(params![limit], message_row)?
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
    Ok(Unsynced {
        messages,
        reactions,
        backlog: m_count + r_count,
        oldest_ts,
    })
}

/// The LLM tokens each user spent on `day` (UTC days since the epoch),
/// every provider's together.
pub fn spent(conn: &Connection, day: i64) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user, SUM(prompt + completion) FROM llm_tokens WHERE day = ?1 GROUP BY user",
    )?;
    let rows = stmt.query_map([day], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
    })?;
    rows.collect()
}

/// One row of `hivegate usage`: a day, user and provider's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub day: i64,
    pub user: String,
    pub provider: String,
    pub prompt: u64,
    pub completion: u64,
    pub calls: u64,
    pub estimated: u64,
}

/// LLM usage from day `since` on, of `user` or everyone, by day, user
/// and provider.
pub fn usage(conn: &Connection, since: i64, user: Option<&str>) -> rusqlite::Result<Vec<UsageRow>> {
    let mut stmt = conn.prepare(
        "SELECT day, user, provider, prompt, completion, calls, estimated FROM llm_tokens \
         WHERE day >= ?1 AND (?2 IS NULL OR user = ?2) ORDER BY day, user, provider",
    )?;
    let n = |v: i64| v.max(0) as u64;
    let rows = stmt.query_map(rusqlite::params![since, user], |r| {
        Ok(UsageRow {
            day: r.get(0)?,
            user: r.get(1)?,
            provider: r.get(2)?,
            prompt: n(r.get(3)?),
            completion: n(r.get(4)?),
            calls: n(r.get(5)?),
            estimated: n(r.get(6)?),
        })
    })?;
    rows.collect()
}
