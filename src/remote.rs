//! Shipping the local store to a remote Supabase/PostgREST project, and the
//! fallback mode while it is unreachable.
//!
//! SQLite is the truth on the device. Every message and reaction change is
//! marked unsynced in the transaction that stores it; this job sends the
//! oldest unsynced rows in batches as upserts (so a batch sent twice, after
//! a crash between the remote's commit and the local mark, is harmless) and
//! marks them synced through the store's write queue. A batch the remote
//! refuses with a 4xx is split in halves until the refused rows are found;
//! those are parked in `dead_letters`, and the rest flows on. Connect
//! errors, timeouts and 5xx count against a circuit breaker: while it is
//! open the gateway is in fallback mode (chat goes on, on SQLite alone),
//! and it leaves fallback mode when a batch goes through.

use crate::auth::Secret;
use crate::json::JsonOut;
use crate::ops::log::Logger;
use crate::pool::Pool;
use crate::resilience::{backoff, Breaker, BreakerState, Jitter};
use crate::store::{Store, Unsynced};
use async_io::Timer;
use std::cell::{Cell, RefCell};
use std::io::Read;
use std::time::{Duration, Instant};

/// `[remote]`: where and how to ship rows.
#[derive(Debug, Clone, Default)]
pub struct RemoteConfig {
    pub url: String,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<std::path::PathBuf>,
    pub api_key: Option<Secret>,
    pub messages_table: String,
    pub reactions_table: String,
    pub batch_rows: usize,
    pub interval: Duration,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub fail_max: u32,
    pub reset_timeout: Duration,
}

/// What a POST of rows came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Posted {
    Ok,
    /// The remote refused the rows (4xx): their fault, not the remote's.
    Refused(String),
    /// The remote failed (connect error, timeout, 5xx): count it.
    Failed(String),
}

pub struct Remote {
    cfg: RemoteConfig,
    agent: ureq::Agent,
    /// One thread: a slow remote must not hold a store thread.
    pool: Pool,
    pub breaker: RefCell<Breaker>,
    fallback: Cell<bool>,
    backlog: Cell<i64>,
    oldest_ts: Cell<Option<i64>>,
    shipped: Cell<u64>,
    batches_failed: Cell<u64>,
    dead_letters: Cell<u64>,
    /// Old dead letters dropped to keep the table bounded.
    dead_letters_pruned: Cell<u64>,
    jitter: RefCell<Jitter>,
    log: Logger,
    /// Cleans the remote's words before they are logged or stored;
    /// replaced by a reload (it must know the new key).
    redact: RefCell<crate::redact::Redactor>,
    /// The API key; `cfg.api_key` is only where it came from at start.
    key: crate::upstream_key::UpstreamKey,
}

impl Remote {
    pub fn new(
        cfg: &RemoteConfig,
        log: Logger,
        redact: crate::redact::Redactor,
        tls: &ureq::tls::TlsConfig,
    ) -> std::io::Result<Remote> {
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.clone())
            .http_status_as_error(false)
            .timeout_connect(Some(cfg.connect_timeout))
            .timeout_global(Some(cfg.timeout))
            .user_agent(concat!("hivegate/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Remote {
            agent,
            pool: Pool::new(1, 2)?,
            breaker: RefCell::new(Breaker::new(
                cfg.fail_max,
                cfg.reset_timeout,
                Instant::now(),
            )),
            fallback: Cell::new(false),
            backlog: Cell::new(0),
            oldest_ts: Cell::new(None),
            shipped: Cell::new(0),
            batches_failed: Cell::new(0),
            dead_letters: Cell::new(0),
            dead_letters_pruned: Cell::new(0),
            jitter: RefCell::new(Jitter::new(crate::resilience::random_u64())),
            key: crate::upstream_key::UpstreamKey::new(
                "remote",
                cfg.api_key.clone(),
                &crate::upstream_key::source(&cfg.api_key_env, &cfg.api_key_file),
                log,
            ),
            cfg: cfg.clone(),
            log,
            redact: RefCell::new(redact),
        })
    }

    pub fn in_fallback(&self) -> bool {
        self.fallback.get()
    }

    fn set_fallback(&self, on: bool, why: &str) {
        if self.fallback.replace(on) != on {
            // Once per change, not per attempt.
            if on {
                self.log.warn(
                    "fallback mode: the remote is unreachable; chat goes on locally",
                    &[("why", &why.to_string())],
                );
            } else {
                self.log.info(
                    "online: the remote is reachable again; the backlog is being shipped",
                    &[("backlog", &self.backlog.get())],
                );
            }
        }
    }

    /// The sync job: runs for the life of the gateway.
    pub async fn run(&self, store: &Store) {
        let mut streak = 0u32;
        loop {
            let pause = match self.round(store).await {
                Round::Full => Duration::ZERO,
                Round::Idle => self.cfg.interval,
                Round::Failed => {
                    streak += 1;
                    let wait = backoff(
                        streak,
                        self.cfg.interval,
                        self.cfg.reset_timeout,
                        self.jitter.borrow_mut().unit(),
                    );
                    wait.max(self.cfg.interval)
                }
                Round::Open(at) => at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            };
            if !matches!(pause, Duration::ZERO) {
                Timer::after(pause).await;
            }
            if self.breaker.borrow().state(Instant::now()) == BreakerState::Closed {
                streak = 0;
            }
        }
    }

    async fn round(&self, store: &Store) -> Round {
        let outbox = match store.outbox(self.cfg.batch_rows as i64) {
            Ok(f) => match f.await {
                Ok(o) => o,
                Err(_) => return Round::Idle,
            },
            Err(_) => return Round::Idle,
        };
        self.backlog.set(outbox.backlog);
        self.oldest_ts.set(outbox.oldest_ts);
        let empty = outbox.messages.is_empty() && outbox.reactions.is_empty();
        let probing = empty && self.fallback.get();
        if empty && !probing {
            return Round::Idle;
        }
        match self.breaker.borrow_mut().allow(Instant::now()) {
            Err(at) => {
                self.set_fallback(true, "circuit open");
                return Round::Open(at);
            }
            Ok(t) => self.note(t),
        }
        match self.ship(store, &outbox, probing).await {
            Ok(()) => {
                let t = self.breaker.borrow_mut().success();
                self.note(t);
                self.set_fallback(false, "");
                let full = outbox.messages.len() >= self.cfg.batch_rows
                    || outbox.reactions.len() >= self.cfg.batch_rows;
                if full {
                    Round::Full
                } else {
                    Round::Idle
                }
            }
            Err(why) => {
                self.batches_failed.set(self.batches_failed.get() + 1);
                let t = self.breaker.borrow_mut().failure(Instant::now());
                self.log.debug("sync failed", &[("error", &why)]);
                if let Some((_, BreakerState::Open)) = t {
                    self.set_fallback(true, &why);
                }
                self.note(t);
                Round::Failed
            }
        }
    }

    fn note(&self, t: Option<crate::resilience::Transition>) {
        if let Some((from, to)) = t {
            self.log.info(
                "circuit breaker",
                &[
                    ("service", &"remote"),
                    ("from", &from.label()),
                    ("to", &to.label()),
                ],
            );
        }
    }

    /// Ships one outbox read: messages first, then reactions. `Err` when
    /// the remote failed (the breaker counts it).
    async fn ship(&self, store: &Store, outbox: &Unsynced, probe: bool) -> Result<(), String> {
        if probe {
            // Nothing to send, but the breaker wants a trial: an empty upsert.
            return match self.post(&self.cfg.messages_table, "id", "[]".into()).await {
                Posted::Failed(why) => Err(why),
                _ => Ok(()),
            };
        }
        let messages: Vec<String> = outbox.messages.iter().map(|m| m.row()).collect();
        let ok = self
            .post_all(
                store,
                &self.cfg.messages_table,
                "id",
                "message",
                &messages,
                |i| vec![outbox.messages[i].id.clone()],
            )
            .await?;
        let synced_messages: Vec<String> =
            ok.iter().map(|&i| outbox.messages[i].id.clone()).collect();
        let reactions: Vec<String> = outbox
            .reactions
            .iter()
            .map(|r| {
                JsonOut::new()
                    .str("message_id", &r.message_id)
                    .str("emoji", &r.emoji)
                    .str("user", &r.user)
                    .bool("removed", r.removed)
                    .num("ts", r.ts as u64)
                    .finish()
            })
            .collect();
        let ok_r = self
            .post_all(
                store,
                &self.cfg.reactions_table,
                "message_id,emoji,user",
                "reaction",
                &reactions,
                |i| {
                    let r = &outbox.reactions[i];
                    vec![r.message_id.clone(), r.emoji.clone(), r.user.clone()]
                },
            )
            .await?;
        let synced_reactions = ok_r
            .iter()
            .map(|&i| {
                let r = &outbox.reactions[i];
                (
                    r.message_id.clone(),
                    r.emoji.clone(),
                    r.user.clone(),
                    r.version,
                )
            })
            .collect();
        let count = synced_messages.len() + ok_r.len();
        // If the mark fails, the rows are sent again later: upserts make
        // that harmless.
        if let Ok(done) = store.mark_synced(synced_messages, synced_reactions) {
            if let Ok(()) = done.await {
                self.shipped.set(self.shipped.get() + count as u64);
                // Keep the gauge current until the next round reads it.
                self.backlog.set((self.backlog.get() - count as i64).max(0));
            }
        }
        Ok(())
    }

    /// Upserts `rows`, splitting a refused batch in halves until the
    /// refused rows are alone; those are dead-lettered. Returns the indices
    /// the remote took.
    async fn post_all(
        &self,
        store: &Store,
        table: &str,
        conflict: &str,
        kind: &'static str,
        rows: &[String],
        key: impl Fn(usize) -> Vec<String>,
    ) -> Result<Vec<usize>, String> {
        let mut ok = Vec::new();
        let mut todo = vec![(0, rows.len())];
        while let Some((from, to)) = todo.pop() {
            if from >= to {
                continue;
            }
            let body = format!("[{}]", rows[from..to].join(","));
            match self.post(table, conflict, body).await {
                Posted::Ok => ok.extend(from..to),
                Posted::Failed(why) => return Err(why),
                Posted::Refused(why) if to - from == 1 => {
                    self.dead_letters.set(self.dead_letters.get() + 1);
                    self.log.warn(
                        "sync: the remote refused a row; it is parked in dead_letters",
                        &[
                            ("kind", &kind),
                            ("key", &key(from).join("/")),
                            ("error", &why),
                        ],
                    );
                    let (row, ts) = (rows[from].clone(), crate::clock::unix_ms());
                    if let Ok(done) = store.dead_letter(kind, key(from), row, why, ts) {
                        if let Ok(pruned) = done.await {
                            self.backlog.set((self.backlog.get() - 1).max(0));
                            let n = &self.dead_letters_pruned;
                            n.set(n.get() + pruned);
                        }
                    }
                }
                Posted::Refused(_) => {
                    let mid = from + (to - from) / 2;
                    // Second half pushed first: the first is tried first.
                    todo.push((mid, to));
                    todo.push((from, mid));
                }
            }
        }
        ok.sort_unstable();
        Ok(ok)
    }

    /// One upsert, on the remote's pool thread.
    async fn post(&self, table: &str, conflict: &str, body: String) -> Posted {
        let url = format!("{}/rest/v1/{table}?on_conflict={conflict}", self.cfg.url);
        let agent = self.agent.clone();
        let key: Option<Secret> = self.key.for_call();
        let redact = self.redact.borrow().clone();
        let job = self.pool.submit(self.cfg.timeout * 2, move || {
            let mut r = agent
                .post(&url)
                .header("Content-Type", "application/json")
                .header("Prefer", "resolution=merge-duplicates,return=minimal");
            if let Some(k) = &key {
                r = r
                    .header("apikey", k.expose())
                    .header("Authorization", &format!("Bearer {}", k.expose()));
            }
            match r.send(body.as_str()) {
                Err(e) => Posted::Failed(redact.clean(&e.to_string())),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let mut text = String::new();
                    let _ = resp
                        .into_body()
                        .into_reader()
                        .take(4096)
                        .read_to_string(&mut text);
                    let text = redact.clean(&text);
                    match status {
                        200..=299 => Posted::Ok,
                        // A 408 or 429 is the remote's state, not the rows'.
                        408 | 429 => Posted::Failed(format!("HTTP {status}: {text}")),
                        400..=499 => Posted::Refused(format!("HTTP {status}: {text}")),
                        _ => Posted::Failed(format!("HTTP {status}: {text}")),
                    }
                }
            }
        });
        match job {
            Ok(f) => f.await.unwrap_or_else(|e| Posted::Failed(format!("{e:?}"))),
            Err(e) => Posted::Failed(format!("{e:?}")),
        }
    }

    /// Key rotation: the key read for the remote now is used from the
    /// next batch on.
    pub fn reload_key(&self, cfg: &RemoteConfig, redact: crate::redact::Redactor) {
        *self.redact.borrow_mut() = redact;
        let source = crate::upstream_key::source(&cfg.api_key_env, &cfg.api_key_file);
        self.key.replace(cfg.api_key.clone(), &source);
    }

    /// The remote's API key (for its per-key metrics).
    pub fn key(&self) -> &crate::upstream_key::UpstreamKey {
        &self.key
    }

    /// `{"mode":..,"backlog":..,"oldest_s":..}` for the detailed `/readyz`.
    pub fn json(&self) -> String {
        crate::json::JsonOut::new()
            .str(
                "mode",
                if self.fallback.get() {
                    "fallback"
                } else {
                    "online"
                },
            )
            .num("backlog", self.backlog.get().max(0) as u64)
            .num("oldest_s", self.oldest_age_s())
            .finish()
    }

    /// Age of the oldest row not shipped yet, in seconds (0: none).
    fn oldest_age_s(&self) -> u64 {
        self.oldest_ts.get().map_or(0, |ts| {
            ((crate::clock::unix_ms() - ts).max(0) / 1000) as u64
        })
    }

    pub fn render(&self, out: &mut String) {
        use crate::ops::metrics::{counter, gauge};
        gauge(
            out,
            "hivegate_mode",
            "0 online, 1 fallback (the remote is unreachable).",
            u64::from(self.fallback.get()),
        );
        gauge(
            out,
            "hivegate_sync_backlog_rows",
            "Messages and reaction changes not shipped yet.",
            self.backlog.get().max(0) as u64,
        );
        gauge(
            out,
            "hivegate_sync_backlog_oldest_seconds",
            "Age of the oldest row not shipped yet.",
            self.oldest_age_s(),
        );
        counter(
            out,
            "hivegate_sync_rows_shipped_total",
            "Rows the remote has taken.",
            self.shipped.get(),
        );
        counter(
            out,
            "hivegate_sync_batches_failed_total",
            "Sync rounds that failed (remote down, timeout, 5xx).",
            self.batches_failed.get(),
        );
        counter(
            out,
            "hivegate_sync_dead_letters_total",
            "Rows the remote refused, parked in dead_letters.",
            self.dead_letters.get(),
        );
        counter(
            out,
            "hivegate_sync_dead_letters_pruned_total",
            "Oldest dead letters dropped to keep the table at its bound (1000 rows).",
            self.dead_letters_pruned.get(),
        );
    }
}

enum Round {
    /// A full batch went: go again at once.
    Full,
    /// Less than a batch, or nothing: wait an interval.
    Idle,
    Failed,
    /// The breaker is open until then.
    Open(Instant),
}
