//! The listener and everything before a connection exists: reading the
//! request head under a deadline, the plain HTTP routes, admission (caps,
//! origin, token) and the upgrade. Then [`conn`] takes over.
//!
//! Admission happens before anything is allocated for a client: a refused
//! upgrade costs a short-lived head buffer and one response, never a slot.

pub mod admin;
mod admission;
pub mod conn;
pub mod echo;
pub mod handshakes;
pub mod http;
pub mod intake;
pub mod mcp_http;
pub mod openai_http;
mod probes;
pub mod reload;
pub mod request;
pub mod tls;
pub mod web;

use crate::chat::Chat;
use crate::config::Config;
use crate::executor::Executor;
use crate::hub::Table;
use crate::limit::{Limits, Meters};
use crate::ops::log::Logger;
use crate::ops::metrics::{inc, Gauges, Metrics, Refusal};
use crate::pool::Pool;
use crate::store::Store;
use async_io::{Async, Timer};
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::WebSocketStream;
use futures_lite::{AsyncWriteExt, FutureExt};
use http::{HeadError, Response};
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Seconds a refused client is told to wait before trying again.
const RETRY_AFTER_S: u32 = 5;

/// The state shared by every task on the event loop.
pub struct Gateway {
    pub cfg: Config,
    pub log: Logger,
    metrics: Metrics,
    table: Rc<RefCell<Table>>,
    /// What a SIGHUP may change: tokens, origins, the redactor.
    live: RefCell<reload::Live>,
    limits: RefCell<Limits>,
    meters: RefCell<Meters>,
    draining: Cell<bool>,
    /// Sockets between accept and upgrade (or their HTTP answer).
    handshakes: RefCell<handshakes::Handshakes>,
    next_conn_id: Cell<u64>,
    ws_config: WebSocketConfig,
    /// Notified when the last connection leaves, for the drain.
    emptied: event_listener::Event,
    pool: Rc<Pool>,
    store: Rc<Store>,
    chat: Rc<Chat>,
    /// The chat requests of every session.
    requests: crate::chat::ChatRequests,
    llm: Rc<crate::llm::Llm>,
    /// `None` in local-only mode.
    remote: Option<crate::remote::Remote>,
    /// `None`: one box alone.
    cluster: Option<Rc<crate::cluster::Cluster>>,
    /// Resident memory and its limit: over it, new connections are refused.
    memory: crate::ops::memory::MemorySentinel,
    ex: Rc<Executor>,
    web: web::Web,
    /// `None`: plain TCP.
    tls: Option<tls::Tls>,
    /// MCP sessions of the HTTP transport.
    mcp: RefCell<crate::mcp::Sessions>,
    /// Each user's calls in flight on the OpenAI-compatible endpoint.
    openai_calls: openai_http::Calls,
}

/// What the daemon builds, each module from its own settings, and hands
/// to the gateway.
pub struct Services {
    pub pool: Rc<Pool>,
    pub store: Rc<Store>,
    pub chat: Rc<Chat>,
    pub llm: crate::llm::Llm,
    /// `None` in local-only mode.
    pub remote: Option<crate::remote::Remote>,
    /// `None`: one box alone.
    pub cluster: Option<Rc<crate::cluster::Cluster>>,
    /// The certificate to serve, when TLS is on.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Gateway {
    pub fn new(cfg: Config, log: Logger, ex: Rc<Executor>, services: Services) -> Gateway {
        let Services {
            pool,
            store,
            chat,
            llm,
            remote,
            cluster,
            tls,
        } = services;
        let s = &cfg.server;
        let table = Table::new(
            s.max_connections,
            s.max_connections_per_ip,
            s.outbox_frames,
            s.outbox_bytes,
        );
        // Small buffers: an idle connection holds its read buffer for life
        // (the intake reads the socket for it; see there). Larger messages
        // grow the buffer as needed, up to the cap.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(intake::LIBRARY_READ_BYTES)
            .write_buffer_size(4096)
            .max_write_buffer_size(s.outbox_bytes.saturating_mul(2).max(1 << 20))
            .max_message_size(Some(s.max_message_bytes))
            .max_frame_size(Some(s.max_message_bytes));
        let requests = crate::chat::ChatRequests {
            chat: chat.clone(),
            limits: cfg.chat,
            answer_budget: s.outbox_bytes / 2,
            log,
        };
        Gateway {
            live: RefCell::new(reload::Live::new(&cfg)),
            limits: RefCell::new(Limits::new(&cfg.limits, Instant::now())),
            meters: RefCell::new(Meters::new(Instant::now())),
            table: Rc::new(RefCell::new(table)),
            metrics: Metrics::default(),
            draining: Cell::new(false),
            handshakes: RefCell::new(handshakes::Handshakes::new(
                s.max_handshakes,
                s.max_handshakes_per_ip,
            )),
            next_conn_id: Cell::new(1),
            ws_config,
            emptied: event_listener::Event::new(),
            pool,
            store,
            chat,
            requests,
            llm: Rc::new(llm),
            remote,
            cluster,
            memory: crate::ops::memory::MemorySentinel::new(cfg.server.memory_limit_bytes, log),
            ex,
            web: web::Web::new(),
            tls: tls.map(tls::Tls::new),
            mcp: RefCell::new(crate::mcp::Sessions::with(&cfg.mcp)),
            openai_calls: openai_http::Calls::default(),
            cfg,
            log,
        }
    }

    /// Spawns the gateway's own loops: fan-out, presence, the store's
    /// retention and size bound, the memory sentinel and the remote sync.
    pub fn start(self: &Rc<Self>) {
        self.start_budgets();
        let g = self.clone();
        self.spawn(Box::pin(async move {
            g.chat.run_fanout(&g.table, &g.metrics).await
        }));
        let g = self.clone();
        self.spawn(Box::pin(async move { g.chat.run_presence().await }));
        // With a remote, a message is deleted only once shipped.
        let synced_only = self.remote.is_some();
        let g = self.clone();
        self.spawn(Box::pin(async move {
            g.store.retention(&g.cfg.store, synced_only, g.log).await
        }));
        let g = self.clone();
        self.spawn(Box::pin(async move {
            g.store.keep_size(&g.cfg.store, synced_only, g.log).await
        }));
        let g = self.clone();
        self.spawn(Box::pin(async move {
            g.memory.run(|| g.open_connections() > 0).await
        }));
        if self.remote.is_some() {
            let g = self.clone();
            self.spawn(Box::pin(async move {
                if let Some(r) = &g.remote {
                    r.run(&g.store).await;
                }
            }));
        }
        if let Some(c) = &self.cluster {
            for task in c.tasks() {
                self.spawn(task);
            }
        }
    }

    /// LLM usage and the budgets: every call's usage is written through
    /// to the store.
    fn start_budgets(self: &Rc<Self>) {
        let store = self.store.clone();
        self.llm
            .ledger
            .persist_with(Box::new(move |spent: crate::store::Spent| {
                // The write is queued now; nobody waits for its answer.
                let _ = store.spend(spent);
            }));
    }

    /// Reads today's LLM spending back from the store: the daemon waits
    /// for it before it accepts anyone, so no budget starts afresh.
    pub async fn load_budgets(&self) {
        let day = crate::llm::day_of(crate::clock::unix_ms());
        loop {
            let read = match self.store.spent(day) {
                Ok(f) => f.await,
                Err(e) => Err(e),
            };
            match read {
                Ok(rows) => return self.llm.ledger.load(day, rows),
                Err(e) => {
                    self.log.warn(
                        "cannot read today's LLM spending; retrying",
                        &[("error", &format!("{e:?}"))],
                    );
                    Timer::after(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// `isolated` while a cluster's box is off the bus, `fallback` while
    /// the remote store is down, else `online`.
    pub fn mode(&self) -> &'static str {
        if self.cluster.as_ref().is_some_and(|c| !c.connected()) {
            "isolated"
        } else if self.remote.as_ref().is_some_and(|r| r.in_fallback()) {
            "fallback"
        } else {
            "online"
        }
    }

    /// One line for `systemctl status`: connections, mode, trouble.
    pub fn status(&self) -> String {
        let mode = match self.mode() {
            "isolated" => "isolated (off the bus, serving alone)",
            "fallback" => "fallback mode (remote down)",
            other => other,
        };
        let mut s = format!("{} connections, {mode}", self.open_connections());
        if self.memory.shedding() {
            s.push_str(", shedding load (memory)");
        }
        if self.store.is_full() {
            s.push_str(", storage full");
        }
        s
    }

    pub fn open_connections(&self) -> usize {
        self.table.borrow().len()
    }

    /// Starts the drain: `/readyz` turns 503, new upgrades are refused, and
    /// every connection is asked to close with 1001.
    pub fn begin_drain(&self) {
        self.draining.set(true);
        self.table
            .borrow_mut()
            .request_close_all(crate::protocol::Close::GoingAway);
    }

    /// Resolves when the last connection has gone.
    pub async fn drained(&self) {
        loop {
            let listener = self.emptied.listen();
            if self.table.borrow().is_empty() {
                return;
            }
            listener.await;
        }
    }

    /// Runs `f` on the event loop, detached (work a request started that
    /// outlives the frame that asked for it, the gateway's own loops).
    /// Boxed: one kind of task for all of them, instead of the executor's
    /// code again for each future's type (2.3 KB of binary each). (A connection's task is not: it
    /// is the one there are thousands of, see `handle_socket`.)
    pub fn spawn(&self, task: crate::hub::Task) {
        self.ex.spawn(task).detach();
    }

    fn gauges(&self) -> Gauges {
        let table = self.table.borrow();
        Gauges {
            connections_open: table.len(),
            table_capacity: table.capacity(),
            handshakes_pending: self.handshakes.borrow().pending(),
            draining: self.draining.get(),
            denied_provider: self.llm.ledger.denied_provider.get(),
            denied_budget: self.llm.ledger.denied_budget.get(),
        }
    }
}

/// A connection's place in the table. Dropping it frees the slot and the
/// client IP's share, on every path out of a connection: normal close,
/// error, timeout, or the task being dropped at exit.
pub struct Slot {
    gw: Rc<Gateway>,
    pub key: usize,
    /// Unique for the life of the process (slab keys are reused); used in
    /// logs.
    pub id: u64,
    pub ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.gw.table.borrow_mut();
        table.remove(self.key);
        if table.is_empty() {
            self.gw.emptied.notify(usize::MAX);
        }
    }
}

/// Counts a socket as in its handshake for as long as it lives.
struct HandshakeGuard(Rc<Gateway>, u64);

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.0.handshakes.borrow_mut().leave(self.1);
    }
}

/// Accepts sockets for ever, each handled in its own task.
pub async fn accept_loop(gw: Rc<Gateway>, ex: Rc<Executor>, listener: Async<TcpListener>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors, most likely: back off instead of
                // spinning, and say so (once per back-off, not per socket).
                gw.log.warn("accept failed", &[("error", &e)]);
                Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        let ticket = if gw.cfg.server.trusted_proxies.contains(ip) {
            gw.handshakes.borrow_mut().enter_from_proxy()
        } else {
            match gw.handshakes.borrow_mut().try_enter(ip) {
                Ok(t) => t,
                Err(why) => {
                    gw.metrics.refused(why);
                    drop(stream);
                    continue;
                }
            }
        };
        let evicted = ticket.evicted.clone();
        let guard = HandshakeGuard(gw.clone(), ticket.id);
        let _ = stream.get_ref().set_nodelay(true);
        ex.spawn(handle_socket(gw.clone(), stream, peer, (guard, evicted)))
            .detach();
    }
}

/// What the pre-upgrade phase decided.
enum Outcome {
    /// The request was answered (or dropped); nothing more to do.
    Done,
    Upgrade {
        slot: Slot,
        leftover: Vec<u8>,
        user: Option<Rc<crate::auth::Identity>>,
        /// `/ws-echo`: echo instead of the chat protocol.
        echo: bool,
        /// The `mcp` subprotocol: JSON-RPC instead of the `op` protocol.
        mcp: bool,
    },
    /// A request for an HTTP API (MCP's, OpenAI's), read and admitted.
    Api(Box<request::Admitted>),
}

/// Where a socket comes from: its peer, and the client a trusted proxy
/// named in a PROXY header. For each request, the client is that, or what
/// a trusted proxy's `Forwarded` or `X-Forwarded-For` says, or the peer.
#[derive(Clone, Copy)]
pub struct Source {
    pub peer: IpAddr,
    pub named: Option<IpAddr>,
}

impl Source {
    /// The client behind the request `head`.
    pub fn client(&self, gw: &Gateway, head: &http::Head) -> IpAddr {
        self.named.unwrap_or_else(|| {
            gw.cfg.server.trusted_proxies.client(
                self.peer,
                head.forwarded.as_deref(),
                head.x_forwarded_for.as_deref(),
            )
        })
    }
}

/// Serves one socket from accept to close. A plain fn returning an `async
/// move` block, because an async fn would keep its by-value arguments twice
/// in the task's state, for the life of the connection.
#[allow(clippy::manual_async_fn)]
fn handle_socket(
    gw: Rc<Gateway>,
    stream: Async<TcpStream>,
    peer: SocketAddr,
    (guard, evicted): (HandshakeGuard, Rc<handshakes::Eviction>),
) -> impl std::future::Future<Output = ()> {
    async move {
        let began = Instant::now();
        let ip = peer.ip().to_canonical();
        let timeout = gw.cfg.server.handshake_timeout;
        let mut stream = stream;
        // The handshake phase is boxed (and the box bound to a name, so no
        // temporary outlives it): the task then keeps, for the life of the
        // connection, only the state of the connection itself.
        let handshake = Box::pin(
            async {
                let mut source = Source {
                    peer: ip,
                    named: None,
                };
                let proxied = gw.cfg.server.trusted_proxies.contains(ip);
                if proxied && gw.cfg.server.proxy_protocol {
                    match crate::forwarded::read_header(&mut stream).await {
                        Ok(named) => source.named = named,
                        Err(_) => {
                            gw.metrics.refused(Refusal::BadRequest);
                            gw.log
                                .debug("no PROXY header from a trusted proxy", &[("ip", &ip)]);
                            return (Outcome::Done, None);
                        }
                    }
                }
                let mut socket = match &gw.tls {
                    None => tls::Socket::Plain(stream),
                    Some(t) => match t.accept(stream).await {
                        Ok(s) => s,
                        Err(e) => {
                            gw.metrics.refused(Refusal::TlsHandshake);
                            gw.log.debug(
                                "TLS handshake failed",
                                &[("ip", &ip), ("error", &e.to_string())],
                            );
                            return (Outcome::Done, None);
                        }
                    },
                };
                let outcome = pre_upgrade(&gw, &mut socket, source).await;
                (outcome, Some(socket))
            }
            .or(async {
                Timer::after(timeout).await;
                gw.metrics.refused(Refusal::HandshakeTimeout);
                gw.log.debug("handshake timed out", &[("ip", &ip)]);
                (Outcome::Done, None)
            })
            .or(async {
                // The table was full and this was its oldest handshake.
                evicted.wait().await;
                gw.metrics.refused(Refusal::HandshakeEvicted);
                (Outcome::Done, None)
            }),
        );
        let (outcome, socket) = handshake.await;
        drop(guard);
        if matches!(outcome, Outcome::Upgrade { .. } | Outcome::Api(_)) {
            gw.metrics.handshake.observe(began.elapsed());
        }
        let (outcome, stream) = match (outcome, socket) {
            (Outcome::Api(admitted), Some(stream)) => {
                // Boxed: the task's state is as large as its largest
                // phase, and every WebSocket connection would pay for an
                // HTTP request's.
                let serving = Box::pin(request::serve(&gw, *admitted, stream));
                serving.await;
                return;
            }
            (o, Some(stream)) => (o, stream),
            _ => return,
        };
        let Outcome::Upgrade {
            slot,
            leftover,
            user,
            echo,
            mcp,
        } = outcome
        else {
            return;
        };
        gw.log
            .info("connected", &[("conn", &slot.id), ("ip", &slot.ip)]);
        let max_message = gw.cfg.server.max_message_bytes;
        let ws = WebSocketStream::from_partially_read(
            intake::Intake::new(stream, max_message),
            leftover,
            Role::Server,
            Some(gw.ws_config),
        )
        .await;
        if echo {
            let mut ws = ws;
            let echoing = Box::pin(echo::run(&gw, &mut ws));
            echoing.await;
            drop(slot);
            return;
        }
        // A task of its own, and this one ends: its state would keep the
        // handshake's arguments and locals beside the connection for the
        // connection's whole life.
        let conn = conn::Conn::new(gw.clone(), slot, ws, user, mcp);
        gw.ex.spawn(conn.task()).detach();
    }
}

fn refuse(gw: &Gateway, why: Refusal, ip: IpAddr, resp: Response) -> Response {
    gw.metrics.refused(why);
    gw.log
        .debug("refused", &[("ip", &ip), ("reason", &why.label())]);
    resp
}

async fn pre_upgrade(gw: &Rc<Gateway>, stream: &mut tls::Socket, source: Source) -> Outcome {
    let ip = source.named.unwrap_or(source.peer);
    let (head, leftover) = match http::read_head(stream).await {
        Ok(h) => h,
        Err(HeadError::Closed) => return Outcome::Done,
        Err(HeadError::Malformed) => {
            let r = refuse(
                gw,
                Refusal::BadRequest,
                ip,
                Response::text(400, "malformed request\n"),
            );
            r.send(stream).await;
            return Outcome::Done;
        }
        Err(HeadError::TooLarge) => {
            let r = refuse(
                gw,
                Refusal::BadRequest,
                ip,
                Response::text(431, "request head too large\n"),
            );
            r.send(stream).await;
            return Outcome::Done;
        }
    };
    // From here on, the client behind a trusted proxy.
    let ip = source.client(gw, &head);
    if let Some(r) = wrong_host(gw, &head, ip) {
        r.send(stream).await;
        return Outcome::Done;
    }
    // HEAD is answered like GET, without the body.
    let get = head.method == "GET" || head.method == "HEAD";
    // `/ws-echo`, when enabled, is `/ws` with an echo instead of the chat.
    let echo = gw.cfg.server.echo_endpoint && head.route() == "/ws-echo";
    let route = if echo { "/ws" } else { head.route() };
    if let Some(api) = request::Api::at(route) {
        return match request::admit(gw, api, head, leftover, stream, source, ip).await {
            Ok(admitted) => Outcome::Api(Box::new(admitted)),
            Err(r) => {
                api.shaped(r).send(stream).await;
                Outcome::Done
            }
        };
    }
    let response = match route {
        "/ws" if get => match admission::admit(gw, &head, ip) {
            Ok((slot, user)) => {
                let protocol = if head.ws_mcp && !echo {
                    Some("mcp")
                } else {
                    head.ws_op.then_some("hivegate")
                };
                if stream
                    .write_all(&http::switching_protocols(
                        head.ws_key.as_deref().unwrap_or(""),
                        protocol,
                    ))
                    .await
                    .is_err()
                {
                    return Outcome::Done;
                }
                inc(&gw.metrics.accepted);
                gw.meters.borrow_mut().connections.record(Instant::now());
                return Outcome::Upgrade {
                    slot,
                    leftover,
                    user,
                    echo,
                    mcp: head.ws_mcp && !echo,
                };
            }
            Err(resp) => resp,
        },
        "/healthz" if get => Response::text(200, "ok\n"),
        // The embedded web chat: a plain client of the wire protocol.
        "/" if get => gw.web.page(),
        "/favicon.ico" if get => gw.web.icon(),
        // Only what the web page needs: key ids, memory and breakers are
        // for the operator, on server.admin_listen.
        "/readyz" if get => probes::readyz(gw, false),
        "/metrics" if get => Response::text(
            404,
            "not found: /metrics is served on server.admin_listen (127.0.0.1:8081 by default)\n",
        ),
        "/" | "/ws" | "/healthz" | "/readyz" | "/metrics" => {
            Response::text(405, "method not allowed\n").header("Allow", "GET, HEAD")
        }
        _ => Response::text(404, "not found\n"),
    };
    inc(&gw.metrics.http_requests);
    let response = Response {
        head_only: head.method == "HEAD",
        ..response
    };
    response.send(stream).await;
    Outcome::Done
}

/// The `421` for a request whose `Host` names another box (against DNS
/// rebinding), or `None`.
fn wrong_host(gw: &Gateway, head: &http::Head, ip: IpAddr) -> Option<Response> {
    let ok = head.hosts <= 1 && gw.live.borrow().host_allowed(head.host.as_deref());
    (!ok).then(|| {
        refuse(
            gw,
            Refusal::Host,
            ip,
            Response::text(
                421,
                "this box does not answer to that Host name (server.hostnames lists the names it is served under)\n",
            ),
        )
    })
}

/// A wait as `Retry-After` seconds: rounded up, at least one.
fn retry_after(wait: Duration) -> String {
    wait.as_secs_f64().ceil().max(1.0).to_string()
}
