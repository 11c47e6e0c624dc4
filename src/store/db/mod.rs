//! The SQLite side of the store: opening and migrating the database, the
//! write batch (one transaction per group commit), history reads, retention.
//! Everything here blocks and runs on the pool.

pub mod bus;
mod read;
mod schema;
mod seqs;
mod write;

pub use read::*;
pub use schema::*;
pub use write::*;

/// Most distinct emoji on one message.
pub const MAX_EMOJI_PER_MESSAGE: i64 = 50;
/// Most users behind one emoji on one message.
pub const MAX_USERS_PER_EMOJI: i64 = 100;

/// How many users `emoji` has on the message, and the bound one more
/// would pass (`None`: there is room), for a local reaction and a peer's.
pub(crate) fn room_for_reaction(
    conn: &rusqlite::Connection,
    message_id: &str,
    emoji: &str,
) -> rusqlite::Result<(i64, Option<&'static str>)> {
    use rusqlite::params;
    let users: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM reactions WHERE message_id = ?1 AND emoji = ?2 AND removed = 0",
        )?
        .query_row(params![message_id, emoji], |r| r.get(0))?;
    if users > 0 {
        let full = users >= MAX_USERS_PER_EMOJI;
        return Ok((users, full.then_some("an emoji holds at most 100 users")));
    }
    let distinct: i64 = conn
        .prepare_cached(
            "SELECT COUNT(DISTINCT emoji) FROM reactions WHERE message_id = ?1 AND removed = 0",
        )?
        .query_row(params![message_id], |r| r.get(0))?;
    let full = distinct >= MAX_EMOJI_PER_MESSAGE;
    Ok((
        0,
        full.then_some("a message holds at most 50 distinct emoji"),
    ))
}

#[cfg(test)]
mod tests;
