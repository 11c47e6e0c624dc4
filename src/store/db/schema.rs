//! The database file: its schema and migrations, the writer's and readers'
//! connections, its size, and the online backup.

use rusqlite::{Connection, OpenFlags};
use std::path::Path;

/// The schema this build writes. Older databases are migrated on start;
/// a newer one is refused (it was written by a newer hivegate).
pub const SCHEMA_VERSION: i64 = 5;

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

/// Version 3: rooms across gateways (see the `cluster` module). `bus_log`
/// holds every event this box originated, in commit order, with its
/// per-room origin sequence `oseq`: it is the bus outbox (rows past the
/// `published` mark in `bus_state`) and what peers replay from.
/// `bus_peers` is, per origin box and room, the last `oseq` applied here:
/// events are applied in order, each once. Messages keep their origin box
/// (`''`: this one).
const SCHEMA_V3: &str = "
ALTER TABLE rooms ADD COLUMN oseq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN origin TEXT NOT NULL DEFAULT '';
CREATE TABLE bus_log (
    id INTEGER PRIMARY KEY,
    room TEXT NOT NULL,
    oseq INTEGER NOT NULL,
    body TEXT NOT NULL,
    ts INTEGER NOT NULL,
    UNIQUE (room, oseq)
);
CREATE TABLE bus_state (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE bus_peers (
    origin TEXT NOT NULL,
    room TEXT NOT NULL,
    oseq INTEGER NOT NULL,
    PRIMARY KEY (origin, room)
) WITHOUT ROWID;
";

/// Version 4: LLM tokens spent, per user and UTC day (days since the
/// epoch), for the access rules' daily budgets: a restart must not give
/// everyone a fresh budget.
const SCHEMA_V4: &str = "
CREATE TABLE llm_usage (
    user TEXT NOT NULL,
    day INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (day, user)
) WITHOUT ROWID;
";

/// Version 5: LLM usage per UTC day, user and provider, for accounting
/// (`hivegate usage`) and the budgets alike: prompt and completion tokens,
/// calls, and the calls whose counts were estimated (the provider reported
/// none). Version 4's totals carry over under provider `?`.
const SCHEMA_V5: &str = "
CREATE TABLE llm_tokens (
    day INTEGER NOT NULL,
    user TEXT NOT NULL,
    provider TEXT NOT NULL,
    prompt INTEGER NOT NULL,
    completion INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    PRIMARY KEY (day, user, provider)
) WITHOUT ROWID;
INSERT INTO llm_tokens SELECT day, user, '?', tokens, 0, 0, 0 FROM llm_usage;
DROP TABLE llm_usage;
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
    if from < 3 {
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA_V3} PRAGMA user_version = 3; COMMIT;"
        ))?;
    }
    if from < 4 {
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA_V4} PRAGMA user_version = 4; COMMIT;"
        ))?;
    }
    if from < 5 {
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA_V5} PRAGMA user_version = 5; COMMIT;"
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
