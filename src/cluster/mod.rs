//! Rooms across gateways, on NATS. Local first: a box accepts, stores and
//! acknowledges on its own; the bus only carries what boxes committed.
//!
//! Each message and reaction change committed here is also written, in the
//! same transaction, to the bus log with the room's next origin sequence
//! (`store::db::bus`). The outbox task publishes the log in commit order
//! to `PREFIX.room.ROOM` and moves its mark only once the server has
//! confirmed (a PONG after the publishes): what was committed while the
//! bus was down, or before a crash, goes out when it is back.
//!
//! A box subscribes to the rooms it has members in. It applies another
//! box's events in origin order, each once (in the writer's transaction),
//! and fans them out to its members under its own `seq`. An event that
//! skips ahead is a gap: the box asks on `PREFIX.sync` for what it lacks,
//! and each origin replays from its log into the asker's inbox. A box asks
//! too when it subscribes, when it reconnects, and when a beat says an
//! origin is further on than what it holds: so a box that was cut off
//! catches up, whichever side reconnects first.
//!
//! Beats (every `heartbeat_ms`, and at once when local members change)
//! carry who of a room is on a box; `chat::peers` merges them into presence
//! and drops a box not heard from in three heartbeats.
//!
//! Bounded: subscriptions by the chat's rooms, replay answers and sync
//! requests by queues of [`MAX_QUEUED`], events waiting to be applied by
//! `cluster.max_inbound` (past it they are dropped, and come back as a gap),
//! bytes waiting for the socket by `cluster.max_pending_bytes`, and the
//! log by rows and age.

mod inbound;
mod nats;
mod outbox;
mod replay;
pub mod sign;
mod wire;

pub use nats::{host_port, Login};
pub use wire::{default_node_id, valid_node, valid_prefix};

use crate::chat::Chat;
use crate::ops::log::Logger;
use crate::ops::metrics::inc;
use crate::resilience::{backoff, Breaker, Jitter};
use crate::store::db::bus::Applied;
use crate::store::db::bus::BusEvent;
use crate::store::{Store, StoreError};
use async_io::Timer;
use futures_lite::FutureExt;
use nats::Link;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Sync requests and replay answers waiting; more are dropped (the asker
/// asks again).
pub const MAX_QUEUED: usize = 64;
/// Events per replay answer, and per outbox round.
const BATCH: i64 = 1000;
/// The least time between two sync requests for one room.
const SYNC_SPACING: Duration = Duration::from_millis(100);

/// `[cluster]`.
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    pub nats_urls: Vec<String>,
    pub node_id: String,
    pub subject_prefix: String,
    pub credentials_file: Option<std::path::PathBuf>,
    /// Read from `credentials_file` when the configuration is checked.
    pub login: Login,
    pub connect_timeout: Duration,
    pub heartbeat: Duration,
    pub outbox_max_rows: i64,
    pub outbox_max_age: Duration,
    pub max_inbound: usize,
    pub max_pending_bytes: usize,
    /// Bytes of events all replay answers together may publish a second.
    pub replay_bytes_per_s: usize,
    /// For `tls://` servers: the CAs trusted, and this box's certificate
    /// and key if the server asks for one.
    pub tls_ca_file: std::path::PathBuf,
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Built from the three above when a URL is `tls://`.
    pub tls: Option<NatsTls>,
    pub signing_key_file: Option<std::path::PathBuf>,
    pub trusted_keys: Vec<String>,
    /// Read from the two above when the configuration is checked; `None`:
    /// messages go unsigned and are taken unsigned.
    pub signing: Option<sign::SigningConfig>,
}

/// The TLS settings for `tls://` servers.
#[derive(Clone)]
pub struct NatsTls(pub std::sync::Arc<rustls::ClientConfig>);

impl std::fmt::Debug for NatsTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The files it came from are in the config beside it.
        f.write_str("NatsTls")
    }
}

impl NatsTls {
    /// Reads the CAs and, if given, this box's certificate and key.
    fn load(cfg: &ClusterConfig) -> Result<NatsTls, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::ca::pem_certificates(&cfg.tls_ca_file, "cluster.tls_ca_file")? {
            roots
                .add(cert)
                .map_err(|e| format!("cluster.tls_ca_file: {e}"))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        let config = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = crate::ca::pem_certificates(cert, "cluster.tls_cert_file")?;
                let pem = crate::ops::file::read_secret(key, 1 << 20, "cluster.tls_key_file")?;
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| format!("cluster.tls_key_file {}: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "cluster.tls_cert_file and cluster.tls_key_file do not make a pair: {e}"
                    )
                })?
            }
            _ => return Err("cluster.tls_cert_file and cluster.tls_key_file go together".into()),
        };
        Ok(NatsTls(std::sync::Arc::new(config)))
    }
}

/// The last `oseq` applied, by (origin box, room).
type Marks = HashMap<(Rc<str>, Rc<str>), i64>;

impl ClusterConfig {
    /// This box's side of the store's bus log: its node id, and the wire
    /// format its events are kept in.
    pub fn bus_log(&self) -> crate::store::db::bus::BusLog {
        crate::store::db::bus::BusLog {
            node: std::sync::Arc::from(self.node_id.as_str()),
            encode: wire::encode_event,
        }
    }

    /// Checks what a file cannot say alone: servers given, a valid node id
    /// (the host name when unset) and prefix; reads the credentials.
    pub fn complete(&mut self) -> Result<(), String> {
        if self.nats_urls.is_empty() {
            return Err("[cluster] needs nats_url (cluster.nats_url), or no [cluster] section at all for one box alone".into());
        }
        for url in &self.nats_urls {
            if let Err(e) = host_port(url) {
                return Err(format!(
                    "cluster.nats_url: {e} (write nats://host:port, or tls://host:port)"
                ));
            }
        }
        if self.node_id.is_empty() {
            self.node_id = default_node_id();
        }
        if !valid_node(&self.node_id) {
            return Err(format!(
                "cluster.node_id {:?} is not 1-64 of [A-Za-z0-9_-]",
                self.node_id
            ));
        }
        if !valid_prefix(&self.subject_prefix) {
            return Err(format!(
                "cluster.subject_prefix {:?} is not dot-separated tokens of [A-Za-z0-9_-]",
                self.subject_prefix
            ));
        }
        if let Some(path) = &self.credentials_file {
            let text = crate::ops::file::read_secret(path, 64 * 1024, "cluster.credentials_file")?;
            self.login = Login::parse(&text);
        }
        self.tls = if self.nats_urls.iter().any(|u| nats::wants_tls(u)) {
            Some(NatsTls::load(self)?)
        } else {
            None
        };
        self.signing = match (&self.signing_key_file, self.trusted_keys.is_empty()) {
            (None, true) => None,
            (Some(path), false) => {
                let text = crate::ops::file::read_secret(path, 64 * 1024, "cluster.signing_key_file")?;
                Some(sign::SigningConfig::read(&self.node_id, &text, &self.trusted_keys)?)
            }
            _ => {
                return Err("cluster.signing_key_file and cluster.trusted_keys go together: \
                            this box signs with its key, and takes only what the trusted keys signed"
                    .into())
            }
        };
        Ok(())
    }
}

type Pending = Pin<Box<dyn Future<Output = Result<Applied, StoreError>>>>;

/// In the order events arrived: each applied, then told to members.
enum Item {
    /// Received, not yet handed to the store.
    Event(BusEvent),
    /// In the store's queue.
    Applying(BusEvent, Pending),
    /// `origin` is at `head` in `room`: ask for the rest if behind.
    Head(Rc<str>, Rc<str>, i64),
}

#[derive(Default)]
struct Stats {
    published: Cell<u64>,
    received: Cell<u64>,
    applied: Cell<u64>,
    duplicates: Cell<u64>,
    gaps: Cell<u64>,
    syncs_sent: Cell<u64>,
    replayed: Cell<u64>,
    /// Bytes of events replayed, and repeated requests not answered.
    replay_bytes: Cell<u64>,
    replays_repeated: Cell<u64>,
    dropped_inbound: Cell<u64>,
    dropped_replays: Cell<u64>,
    malformed: Cell<u64>,
    /// Messages without a trusted node's signature (with keys configured).
    unsigned: Cell<u64>,
    /// Remote names past a room's bound, left out of presence.
    names_left_out: Cell<u64>,
    outbox_pruned: Cell<u64>,
    backlog: Cell<u64>,
    connects: Cell<u64>,
    connect_failures: Cell<u64>,
    peers_expired: Cell<u64>,
}

pub struct Cluster {
    cfg: ClusterConfig,
    store: Rc<Store>,
    chat: Rc<Chat>,
    pool: Rc<crate::pool::Pool>,
    log: Logger,
    /// What a local client may send: a peer's events are held to it too.
    limits: crate::chat::ChatLimits,
    link: RefCell<Option<Rc<Link>>>,
    link_changed: event_listener::Event,
    /// Room subscriptions on the current link: room → sid.
    subs: RefCell<HashMap<Rc<str>, u64>>,
    next_sid: Cell<u64>,
    inbound: RefCell<VecDeque<Item>>,
    in_flight: RefCell<VecDeque<Item>>,
    inbound_ready: event_listener::Event,
    inbound_drained: event_listener::Event,
    /// Rooms to send a sync request for, and when each last was.
    wanted: RefCell<Vec<Rc<str>>>,
    asked: RefCell<HashMap<Rc<str>, Instant>>,
    wanted_ready: event_listener::Event,
    /// Replays to send: (asker, room, after).
    replays: RefCell<VecDeque<(String, String, i64)>>,
    replays_ready: event_listener::Event,
    /// Per (origin, room) of a local room: the last event applied here.
    applied: RefCell<Marks>,
    pub breaker: RefCell<Breaker>,
    jitter: RefCell<Jitter>,
    stats: Stats,
    /// `None`: unsigned messages, as the configuration has no keys.
    signer: Option<sign::Signer>,
    replay_budget: RefCell<replay::ReplayBudget>,
}

impl Cluster {
    pub fn new(
        cfg: ClusterConfig,
        store: Rc<Store>,
        chat: Rc<Chat>,
        pool: Rc<crate::pool::Pool>,
        log: Logger,
        limits: crate::chat::ChatLimits,
    ) -> Cluster {
        chat.report_to_bus();
        let signer = cfg.signing.as_ref().and_then(sign::Signer::new);
        let replay_budget =
            replay::ReplayBudget::new(cfg.replay_bytes_per_s, cfg.heartbeat, Instant::now());
        Cluster {
            signer,
            replay_budget: RefCell::new(replay_budget),
            breaker: RefCell::new(Breaker::new(3, cfg.heartbeat * 2, Instant::now())),
            cfg,
            store,
            chat,
            pool,
            log,
            limits,
            link: RefCell::new(None),
            link_changed: event_listener::Event::new(),
            subs: RefCell::default(),
            next_sid: Cell::new(10),
            inbound: RefCell::default(),
            in_flight: RefCell::default(),
            inbound_ready: event_listener::Event::new(),
            inbound_drained: event_listener::Event::new(),
            wanted: RefCell::default(),
            asked: RefCell::default(),
            wanted_ready: event_listener::Event::new(),
            replays: RefCell::default(),
            replays_ready: event_listener::Event::new(),
            applied: RefCell::default(),
            jitter: RefCell::new(Jitter::new(crate::resilience::random_u64())),
            stats: Stats::default(),
        }
    }

    /// Publishes `body` on `subject`, signed when this box has a key;
    /// `false` when the link cannot take it now.
    fn publish(&self, link: &Link, subject: &str, body: &str) -> bool {
        match &self.signer {
            Some(s) => link.publish(subject, &s.sign(body)),
            None => link.publish(subject, body.as_bytes()),
        }
    }

    /// Publishes events on `subject` in order, as many as the link takes;
    /// returns how many. With a key, several go to a message under one
    /// signature (see `sign::MAX_BATCH_BYTES`); without, one a message.
    fn publish_events(&self, link: &Link, subject: &str, bodies: &[&str]) -> usize {
        let Some(signer) = &self.signer else {
            return bodies
                .iter()
                .take_while(|b| link.publish(subject, b.as_bytes()))
                .count();
        };
        let mut sent = 0;
        while sent < bodies.len() {
            let mut end = sent + 1;
            let mut bytes = bodies[sent].len();
            while end < bodies.len()
                && end - sent < sign::MAX_BATCH_EVENTS
                && bytes + 1 + bodies[end].len() <= sign::MAX_BATCH_BYTES
            {
                bytes += 1 + bodies[end].len();
                end += 1;
            }
            if !link.publish(subject, &signer.sign(&bodies[sent..end].join("\n"))) {
                break;
            }
            sent = end;
        }
        sent
    }

    /// On the bus now; `false`: isolated (serving alone).
    pub fn connected(&self) -> bool {
        self.link.borrow().is_some()
    }

    /// The cluster's loops, for the caller to spawn; they run for the life
    /// of the gateway.
    pub fn tasks(self: &Rc<Self>) -> Vec<Pin<Box<dyn Future<Output = ()>>>> {
        fn task<F: Future<Output = ()> + 'static>(
            c: &Rc<Cluster>,
            run: impl FnOnce(Rc<Cluster>) -> F,
        ) -> Pin<Box<dyn Future<Output = ()>>> {
            Box::pin(run(c.clone()))
        }
        vec![
            task(self, |c| async move { c.run_link().await }),
            task(self, |c| async move { c.run_outbox().await }),
            task(self, |c| async move { c.run_news().await }),
            task(self, |c| async move { c.run_heartbeat().await }),
            task(self, |c| async move { c.run_inbound().await }),
            task(self, |c| async move { c.run_syncs().await }),
            task(self, |c| async move { c.run_replays().await }),
        ]
    }

    /// Connects, serves the link until it fails, waits, and again: through
    /// the URLs in turn, with jittered backoff, behind a breaker.
    async fn run_link(&self) {
        let mut attempt: u32 = 0;
        let mut turn = 0usize;
        loop {
            let wait = self.breaker.borrow_mut().allow(Instant::now()).err();
            if let Some(at) = wait {
                Timer::at(at).await;
                continue;
            }
            let url = &self.cfg.nats_urls[turn % self.cfg.nats_urls.len().max(1)];
            turn += 1;
            match self.connect(url).await {
                Ok(link) => {
                    attempt = 0;
                    self.breaker.borrow_mut().success();
                    let reason = self.serve(Rc::new(link)).await;
                    self.log.warn(
                        "bus connection lost; serving alone until it is back",
                        &[("url", url), ("reason", &reason)],
                    );
                }
                Err(e) => {
                    inc(&self.stats.connect_failures);
                    self.breaker.borrow_mut().failure(Instant::now());
                    if attempt == 0 {
                        self.log
                            .warn("cannot reach the bus; serving alone", &[("error", &e)]);
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
            let unit = self.jitter.borrow_mut().unit();
            let cap = self.cfg.heartbeat.max(Duration::from_millis(200));
            Timer::after(backoff(attempt, Duration::from_millis(100), cap, unit)).await;
        }
    }

    async fn connect(&self, url: &str) -> Result<Link, String> {
        let (host, port) = nats::host_port(url)?;
        let addr: SocketAddr = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            // A name is resolved on the pool: lookups block.
            Err(_) => {
                let name = host.clone();
                let job = self
                    .pool
                    .submit(self.cfg.connect_timeout, move || {
                        (name.as_str(), port)
                            .to_socket_addrs()
                            .map(|mut a| a.next())
                    })
                    .map_err(|_| "the pool is full".to_string())?;
                match job.await {
                    Ok(Ok(Some(a))) => a,
                    Ok(Ok(None)) => return Err(format!("{url}: the name has no address")),
                    Ok(Err(e)) => return Err(format!("{url}: {e}")),
                    Err(_) => return Err(format!("{url}: the lookup timed out")),
                }
            }
        };
        let name = format!("hivegate-{}", self.cfg.node_id);
        let tls = if nats::wants_tls(url) {
            let config = self.cfg.tls.as_ref().ok_or("no TLS settings")?;
            Some(&config.0)
        } else {
            None
        };
        Link::connect(
            addr,
            &host,
            tls,
            &name,
            &self.cfg.login,
            self.cfg.connect_timeout,
            self.cfg.max_pending_bytes,
        )
        .await
    }

    /// Subscribes, announces this box and asks for what it lacks, then
    /// reads, writes and pings until the link fails.
    async fn serve(&self, link: Rc<Link>) -> String {
        inc(&self.stats.connects);
        let prefix = &self.cfg.subject_prefix;
        link.send(format!("SUB {} 1\r\n", wire::sync_subject(prefix)).as_bytes());
        let inbox = wire::inbox_subject(prefix, &self.cfg.node_id);
        link.send(format!("SUB {inbox} 2\r\n").as_bytes());
        self.subs.borrow_mut().clear();
        *self.link.borrow_mut() = Some(link.clone());
        for room in self.chat.local_rooms() {
            self.subscribe(&link, &room);
            // Peers hear at once who is here, and answer with theirs.
            self.beat_now(&room);
            self.want_sync(&room);
        }
        self.link_changed.notify(usize::MAX);
        self.log.info("on the bus", &[("node", &self.cfg.node_id)]);
        let read = link.read_loop(
            |subject, payload| self.on_msg(&subject, &payload),
            || self.inbound_full(),
        );
        let write = async { link.write_loop().await.err().unwrap_or_default() };
        let ping = self.keepalive(&link);
        let reason = read.or(write).or(ping).await;
        *self.link.borrow_mut() = None;
        self.subs.borrow_mut().clear();
        self.link_changed.notify(usize::MAX);
        reason
    }

    /// Pings every heartbeat; a server that does not answer within two is
    /// gone.
    async fn keepalive(&self, link: &Link) -> String {
        loop {
            Timer::after(self.cfg.heartbeat).await;
            if !link.confirm(self.cfg.heartbeat * 2).await {
                return "no PONG from the server".into();
            }
        }
    }

    fn subscribe(&self, link: &Link, room: &Rc<str>) {
        if self.subs.borrow().contains_key(room) {
            return;
        }
        let sid = self.next_sid.get();
        self.next_sid.set(sid + 1);
        let subject = wire::room_subject(&self.cfg.subject_prefix, room);
        if link.send(format!("SUB {subject} {sid}\r\n").as_bytes()) {
            self.subs.borrow_mut().insert(room.clone(), sid);
        }
    }

    fn current(&self) -> Option<Rc<Link>> {
        self.link.borrow().clone()
    }

    /// Waits until the bus is connected, and returns the link.
    async fn linked(&self) -> Rc<Link> {
        loop {
            let l = self.link_changed.listen();
            if let Some(link) = self.current() {
                return link;
            }
            l.await;
        }
    }

    /// `{"connected":..,"peers":..,"outbox":..}` for the detailed `/readyz`.
    pub fn json(&self) -> String {
        crate::json::JsonOut::new()
            .bool("connected", self.connected())
            .num("peers", self.chat.remote_boxes() as u64)
            .num("outbox", self.stats.backlog.get())
            .finish()
    }

    /// `/metrics`.
    pub fn render(&self, out: &mut String) {
        use crate::ops::metrics::{counter, counter_with, gauge};
        let s = &self.stats;
        let pending = self.current().map_or(0, |l| l.pending()) as u64;
        let gauges = [
            (
                "connected",
                "1 while on the bus, 0 while isolated.",
                self.connected() as u64,
            ),
            (
                "outbox",
                "Events committed here and not yet confirmed by the bus.",
                s.backlog.get(),
            ),
            (
                "peers",
                "Other boxes with members in this box's rooms.",
                self.chat.remote_boxes() as u64,
            ),
            (
                "pending_bytes",
                "Bytes waiting for the bus socket.",
                pending,
            ),
        ];
        for (name, help, v) in gauges {
            gauge(out, &format!("hivegate_cluster_{name}"), help, v);
        }
        counter_with(
            out,
            "hivegate_cluster_events_total",
            "Events through the bus: published from here, received, applied here.",
            "direction",
            &[
                ("out", s.published.get()),
                ("in", s.received.get()),
                ("applied", s.applied.get()),
            ],
        );
        counter_with(
            out,
            "hivegate_cluster_dropped_total",
            "Bus work dropped at a bound (events come back by sync; outbox events stay stored here).",
            "reason",
            &[
                ("inbound_full", s.dropped_inbound.get()),
                ("replays_full", s.dropped_replays.get()),
                ("replay_repeated", s.replays_repeated.get()),
                ("malformed", s.malformed.get()),
                ("unsigned", s.unsigned.get()),
                ("outbox_pruned", s.outbox_pruned.get()),
                ("names_over_bound", s.names_left_out.get()),
            ],
        );
        let counters = [
            (
                "duplicates",
                "Events dropped as already applied.",
                &s.duplicates,
            ),
            (
                "gaps",
                "Events that came before the ones they follow (each leads to a sync).",
                &s.gaps,
            ),
            ("sync_requests", "Sync requests sent.", &s.syncs_sent),
            (
                "replayed",
                "Events replayed to peers that lacked them.",
                &s.replayed,
            ),
            (
                "replayed_bytes",
                "Bytes of events replayed (at most cluster.replay_bytes_per_s).",
                &s.replay_bytes,
            ),
            ("connects", "Connections made to the bus.", &s.connects),
            (
                "connect_failures",
                "Failed attempts to connect to the bus.",
                &s.connect_failures,
            ),
            (
                "peers_expired",
                "Boxes dropped from presence after three silent heartbeats.",
                &s.peers_expired,
            ),
        ];
        for (name, help, v) in counters {
            counter(
                out,
                &format!("hivegate_cluster_{name}_total"),
                help,
                v.get(),
            );
        }
    }
}
