//! Durable chat storage: local SQLite, written by one connection in group
//! commits, read by others, always on the bounded pool.
//!
//! Group commit: writes go into a bounded queue; one writer task takes
//! everything queued (up to `batch_max`) into one pool job and one
//! transaction. While a commit runs, new writes wait in the queue and make
//! the next batch, so throughput grows with load and every answer still
//! means "committed" (`synchronous = FULL` by default: on disk).

pub mod db;
mod message;
mod ulid;
mod upkeep;
mod writes;

use crate::pool::{Pool, PoolError};
pub use db::{Range, Spent, Synchronous, Unsynced, UsageRow};
use db::{WriteErr, WriteOk, WriteOp};
pub use message::{ReactionChange, StoredMessage};
use rusqlite::Connection;
use std::cell::RefCell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
pub use writes::Reacted;

/// `[store]`.
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    pub synchronous: Synchronous,
    pub retention: Duration,
    pub max_messages_per_room: i64,
    pub write_queue: usize,
    pub batch_max: usize,
    pub max_db_bytes: i64,
    pub check_interval: Duration,
}

/// How long a write batch may wait in the pool queue.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a history read may wait in the pool queue.
const READ_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// A bounded queue is full; retry after this long.
    Busy {
        retry_after_ms: u64,
    },
    Timeout,
    NotFound,
    LimitExceeded(&'static str),
    /// The database failed; logged, answered INTERNAL_ERROR.
    Storage(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Busy { retry_after_ms } => {
                write!(f, "the store is busy; retry in {retry_after_ms} ms")
            }
            StoreError::Timeout => f.write_str("the store did not answer in time"),
            StoreError::NotFound => f.write_str("not found"),
            StoreError::LimitExceeded(m) => f.write_str(m),
            StoreError::Storage(m) => write!(f, "database: {m}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<WriteErr> for StoreError {
    fn from(e: WriteErr) -> Self {
        match e {
            WriteErr::NotFound => StoreError::NotFound,
            WriteErr::LimitExceeded(m) => StoreError::LimitExceeded(m),
            WriteErr::Storage(m) => StoreError::Storage(m),
        }
    }
}

fn pool_error(e: PoolError, pool: &Pool) -> StoreError {
    match e {
        PoolError::Full => StoreError::Busy {
            retry_after_ms: pool.retry_after_ms(),
        },
        PoolError::Timeout => StoreError::Timeout,
        PoolError::Gone => StoreError::Storage("the pool dropped the job".into()),
    }
}

/// Asked before each batch: `Some(listener)` while whoever consumes the
/// commits (the fan-out) is behind, and the writer should wait.
pub type Downstream = Box<dyn Fn() -> Option<event_listener::EventListener>>;

struct Pending {
    op: WriteOp,
    reply: async_channel::Sender<Result<WriteOk, StoreError>>,
}

pub struct Store {
    pool: Rc<Pool>,
    /// Unbounded as a channel, bounded by `max_queued` in `write` (as the
    /// pool's queue: an empty queue holds no memory).
    queue: async_channel::Sender<Pending>,
    max_queued: usize,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    ids: RefCell<ulid::UlidGen>,
    /// At `store.max_db_bytes` (kept by `keep_size`).
    full: std::cell::Cell<bool>,
    /// Writes queued since start, and a signal for each: the size check
    /// sleeps while nothing is written (no wake-ups on an idle box).
    writes: std::cell::Cell<u64>,
    wrote: event_listener::Event,
    /// Fires after a commit that added to the bus log (a cluster's box).
    logged: Rc<event_listener::Event>,
}

/// The file name of the database inside `server.data_dir`.
pub const DB_FILE: &str = "hivegate.db";

impl Store {
    /// Opens the database in `data_dir` (migrating it) with the store's
    /// own settings, and returns the store and its writer task, which the
    /// caller spawns on the event loop. On a box of a cluster (`bus`), its
    /// messages and reaction changes also go into the bus log.
    pub fn open(
        settings: &StoreConfig,
        data_dir: &Path,
        bus: Option<db::bus::BusLog>,
        pool: Rc<Pool>,
        downstream: Downstream,
    ) -> Result<(Store, impl Future<Output = ()>), String> {
        let (sync, write_queue) = (settings.synchronous, settings.write_queue);
        let config = WriterConfig {
            batch_max: settings.batch_max,
            bus,
        };
        let path = data_dir.join(DB_FILE);
        let writer = Arc::new(Mutex::new(db::open_writer(&path, sync)?));
        let (tx, rx) = async_channel::unbounded();
        let seed = crate::resilience::random_u64();
        let store = Store {
            pool: pool.clone(),
            queue: tx,
            max_queued: write_queue.max(1),
            readers: Arc::new(Mutex::new(Vec::new())),
            path,
            ids: RefCell::new(ulid::UlidGen::new(seed)),
            full: std::cell::Cell::new(false),
            writes: std::cell::Cell::new(0),
            wrote: event_listener::Event::new(),
            logged: Rc::new(event_listener::Event::new()),
        };
        let logged = store.logged.clone();
        Ok((
            store,
            writer_loop(rx, writer, pool, config, downstream, logged),
        ))
    }

    /// A fresh message id.
    pub fn new_id(&self, now_ms: u64) -> String {
        self.ids.borrow_mut().next(now_ms)
    }

    /// Writes waiting for the writer.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queues a write; the future resolves once it is committed (or failed).
    /// A full queue is refused at once. (Callers use the typed methods of
    /// `writes.rs`.)
    fn write(
        &self,
        op: WriteOp,
    ) -> Result<impl Future<Output = Result<WriteOk, StoreError>>, StoreError> {
        let (reply, rx) = async_channel::bounded(1);
        if self.queue.len() >= self.max_queued {
            return Err(StoreError::Busy { retry_after_ms: 50 });
        }
        self.queue
            .try_send(Pending { op, reply })
            .map_err(|_| StoreError::Busy { retry_after_ms: 50 })?;
        self.writes.set(self.writes.get().wrapping_add(1));
        self.wrote.notify(usize::MAX);
        Ok(async move {
            rx.recv()
                .await
                .unwrap_or(Err(StoreError::Storage("the writer stopped".into())))
        })
    }

    /// Reads history on the pool.
    pub fn history(
        &self,
        room: String,
        range: Range,
        limit: i64,
    ) -> Result<impl Future<Output = Result<Vec<StoredMessage>, StoreError>>, StoreError> {
        self.read(move |c| db::history(c, &room, range, limit))
    }

    /// The LLM tokens each user spent on `day`, for the budgets.
    pub fn spent(
        &self,
        day: i64,
    ) -> Result<impl Future<Output = Result<Vec<(String, u64)>, StoreError>>, StoreError> {
        self.read(move |c| db::spent(c, day))
    }

    /// The oldest unsynced rows and the backlog, for the sync job.
    pub fn outbox(
        &self,
        limit: i64,
    ) -> Result<impl Future<Output = Result<db::Unsynced, StoreError>>, StoreError> {
        self.read(move |c| db::outbox(c, limit))
    }

    /// A listener that fires after the next commit that adds to the bus
    /// log.
    pub fn bus_logged(&self) -> event_listener::EventListener {
        self.logged.listen()
    }

    /// The bus outbox after `after`: up to `limit` rows, and the backlog.
    pub fn bus_unpublished(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<impl Future<Output = Result<(Vec<db::bus::LogRow>, i64), StoreError>>, StoreError>
    {
        self.read(move |c| db::bus::unpublished(c, after, limit))
    }

    /// This box's events in `room` after `after_oseq`, for a peer.
    pub fn bus_replay(
        &self,
        room: String,
        after_oseq: i64,
        limit: i64,
    ) -> Result<impl Future<Output = Result<db::bus::Replay, StoreError>>, StoreError> {
        self.read(move |c| db::bus::replay(c, &room, after_oseq, limit))
    }

    /// Per room: this box's last `oseq`, and the last applied from others.
    pub fn bus_heads(
        &self,
        rooms: Vec<String>,
    ) -> Result<impl Future<Output = Result<Vec<db::bus::Heads>, StoreError>>, StoreError> {
        self.read(move |c| db::bus::heads(c, &rooms))
    }

    /// The last outbox row the bus confirmed.
    pub fn bus_published_mark(
        &self,
    ) -> Result<impl Future<Output = Result<i64, StoreError>>, StoreError> {
        self.read(db::bus::published_mark)
    }

    /// Bytes of the database in use.
    pub fn used_bytes(&self) -> Result<impl Future<Output = Result<i64, StoreError>>, StoreError> {
        self.read(db::used_bytes)
    }

    /// Runs `f` on a read-only connection on the pool.
    fn read<T, F>(&self, f: F) -> Result<impl Future<Output = Result<T, StoreError>>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let readers = self.readers.clone();
        let path = self.path.clone();
        let job = self
            .pool
            .submit(READ_DEADLINE, move || -> Result<T, String> {
                // Check a reader out (or open one: at most one per pool thread).
                let conn = readers.lock().ok().and_then(|mut r| r.pop());
                let conn = match conn {
                    Some(c) => c,
                    None => db::open_reader(&path)?,
                };
                let result = f(&conn).map_err(|e| e.to_string());
                if let Ok(mut r) = readers.lock() {
                    r.push(conn);
                }
                result
            })
            .map_err(|e| pool_error(e, &self.pool))?;
        let pool = self.pool.clone();
        Ok(async move {
            match job.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(StoreError::Storage(e)),
                Err(e) => Err(pool_error(e, &pool)),
            }
        })
    }
}

/// How the writer batches, and for whom.
struct WriterConfig {
    batch_max: usize,
    /// This box on the bus of a cluster; `None`: no bus log.
    bus: Option<db::bus::BusLog>,
}

/// Takes everything queued into one batch, commits it on the pool, answers
/// each write, and goes round again. Ends when the store is dropped.
async fn writer_loop(
    rx: async_channel::Receiver<Pending>,
    conn: Arc<Mutex<Connection>>,
    pool: Rc<Pool>,
    config: WriterConfig,
    downstream: Downstream,
    logged: Rc<event_listener::Event>,
) {
    let batch_max = config.batch_max.max(1);
    let bus: Option<Arc<db::bus::BusLog>> = config.bus.map(Arc::new);
    loop {
        // Backpressure: no new batch while the fan-out is behind.
        while let Some(behind) = downstream() {
            behind.await;
        }
        let Ok(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (ops, replies): (Vec<WriteOp>, Vec<_>) =
            batch.into_iter().map(|p| (p.op, p.reply)).unzip();
        let logs = bus.is_some()
            && ops
                .iter()
                .any(|op| matches!(op, WriteOp::Publish(_) | WriteOp::React { .. }));
        let (conn, bus) = (conn.clone(), bus.clone());
        // The first lane: a pool full of reads neither refuses nor delays
        // a commit.
        // The ops come back with their results: a published message goes
        // back to its publisher whole, numbered, not copied for the batch.
        let job = pool.submit_first(WRITE_DEADLINE, move || {
            let results = match conn.lock() {
                Ok(mut c) => db::write_batch_as(&mut c, &ops, bus.as_deref()),
                Err(_) => ops
                    .iter()
                    .map(|_| Err(WriteErr::Storage("writer lock poisoned".into())))
                    .collect(),
            };
            (results, ops)
        });
        let results = match job {
            Ok(job) => job.await,
            Err(e) => Err(e),
        };
        match results {
            Ok((results, ops)) => {
                for ((reply, r), op) in replies.into_iter().zip(results).zip(ops) {
                    let r = match (r, op) {
                        (Ok(WriteOk::Published { seq }), WriteOp::Publish(m)) => {
                            Ok(WriteOk::Stored(Box::new(StoredMessage { seq, ..m })))
                        }
                        (r, _) => r,
                    };
                    let _ = reply.try_send(r.map_err(StoreError::from));
                }
                if logs {
                    logged.notify(usize::MAX);
                }
            }
            Err(e) => {
                let err = pool_error(e, &pool);
                for reply in replies {
                    let _ = reply.try_send(Err(err.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    fn message(id: String, text: String) -> StoredMessage {
        StoredMessage::new(id, "r".into(), "u".into(), text, 1)
    }

    #[test]
    fn concurrent_writes_are_committed_in_groups_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Rc::new(Pool::new(2, 16).unwrap());
        let settings = StoreConfig {
            synchronous: Synchronous::Full,
            write_queue: 1000,
            batch_max: 64,
            ..StoreConfig::default()
        };
        let (store, writer) =
            Store::open(&settings, dir.path(), None, pool.clone(), Box::new(|| None)).unwrap();
        let ex = crate::executor::Executor::new();
        ex.spawn(writer).detach();
        let futs: Vec<_> = (0..200)
            .map(|i| {
                store
                    .publish(message(store.new_id(1), i.to_string()))
                    .unwrap()
            })
            .collect();
        let seqs: Vec<i64> = block_on(ex.run(async {
            let mut seqs = Vec::new();
            for f in futs {
                seqs.push(f.await.unwrap().seq);
            }
            seqs
        }));
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        // 200 writes queued at once went in at most 64 per transaction. (The
        // pool counts a job just after it answered: give it a moment.)
        let run = || pool.stats.run.load(std::sync::atomic::Ordering::Relaxed);
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while run() < 4 && std::time::Instant::now() < end {
            std::thread::yield_now();
        }
        let jobs = run();
        assert!((4..=10).contains(&jobs), "{jobs} commits");
        let h = block_on(ex.run(store.history("r".into(), Range::Latest, 5).unwrap())).unwrap();
        assert_eq!(h.last().unwrap().text, "199");
    }

    #[test]
    fn a_full_write_queue_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Rc::new(Pool::new(1, 4).unwrap());
        // The writer task is never run: the queue only fills.
        let settings = StoreConfig {
            synchronous: Synchronous::Full,
            write_queue: 2,
            batch_max: 64,
            ..StoreConfig::default()
        };
        let (store, _writer) =
            Store::open(&settings, dir.path(), None, pool, Box::new(|| None)).unwrap();
        let op = || message("x".into(), "t".into());
        assert!(store.publish(op()).is_ok());
        assert!(store.publish(op()).is_ok());
        assert!(matches!(store.publish(op()), Err(StoreError::Busy { .. })));
    }
}
