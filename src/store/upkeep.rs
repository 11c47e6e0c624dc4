//! The store's own loops: retention (expired and surplus messages go, a
//! small batch at a time, so a publish never waits behind more than one
//! batch) and the size bound (from 90% of `store.max_db_bytes` the oldest
//! messages go; at 100% publishes are refused until space returns). With a
//! remote, only messages already shipped are ever deleted.

use super::{Store, StoreConfig};
use crate::ops::log::Logger;
use async_io::Timer;
use std::time::Duration;

/// Messages deleted per transaction.
const BATCH: i64 = 500;

impl Store {
    /// Whether the database is at `store.max_db_bytes`: publishes are
    /// refused while it is.
    pub fn is_full(&self) -> bool {
        self.full.get()
    }

    /// Sets the full flag; returns whether it changed.
    pub fn mark_full(&self, full: bool) -> bool {
        self.full.replace(full) != full
    }

    /// Retention, for the life of the gateway.
    pub async fn retention(&self, cfg: &StoreConfig, synced_only: bool, log: Logger) {
        let mut pause = Duration::from_secs(5);
        loop {
            Timer::after(pause).await;
            pause = Duration::from_secs(60);
            loop {
                let now_ms = crate::clock::unix_ms();
                let older_than = now_ms - cfg.retention.as_millis() as i64;
                let pruned = self.prune(older_than, cfg.max_messages_per_room, BATCH, synced_only);
                let deleted = match pruned {
                    Ok(done) => match done.await {
                        Ok(deleted) => deleted,
                        Err(e) => {
                            log.warn("retention failed", &[("error", &format!("{e:?}"))]);
                            0
                        }
                    },
                    // The write queue is full: publishes go first.
                    Err(_) => 0,
                };
                if deleted > 0 {
                    log.info("retention", &[("deleted", &deleted)]);
                }
                if deleted < BATCH {
                    break;
                }
            }
        }
    }

    /// The size bound, for the life of the gateway.
    pub async fn keep_size(&self, cfg: &StoreConfig, synced_only: bool, log: Logger) {
        let max = cfg.max_db_bytes;
        // The first check always runs: the file may be over the bound
        // from before a restart.
        let mut seen = None;
        loop {
            Timer::after(cfg.check_interval).await;
            // Nothing written since the last check: the size cannot have
            // grown, so sleep until something is.
            if seen == Some(self.writes.get()) {
                let next = self.wrote.listen();
                if seen == Some(self.writes.get()) {
                    next.await;
                }
                continue;
            }
            seen = Some(self.writes.get());
            let Some(mut bytes) = self.size().await else {
                continue;
            };
            while bytes >= max / 10 * 9 {
                let Ok(done) = self.make_room(BATCH, synced_only) else {
                    break;
                };
                match done.await {
                    Ok(deleted) if deleted > 0 => {
                        log.info(
                            "storage: deleted the oldest messages to make room",
                            &[("deleted", &deleted)],
                        );
                    }
                    _ => break,
                }
                match self.size().await {
                    Some(b) => bytes = b,
                    None => break,
                }
            }
            let full = bytes >= max;
            if self.mark_full(full) {
                if full {
                    log.warn(
                        "storage full: publishes are refused until space returns",
                        &[("used_bytes", &bytes), ("max_db_bytes", &max)],
                    );
                } else {
                    log.info(
                        "storage: space again; publishes are accepted",
                        &[("used_bytes", &bytes)],
                    );
                }
            }
        }
    }

    async fn size(&self) -> Option<i64> {
        self.used_bytes().ok()?.await.ok()
    }
}
