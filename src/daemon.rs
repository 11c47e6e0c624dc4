//! The life of the process: bind, tell systemd we are ready, serve until a
//! signal, drain, exit.
//!
//! Shutdown order matters to the clients and to whatever balances load in
//! front of the device: the first SIGTERM or SIGINT turns `/readyz` to 503
//! and refuses new upgrades (the port stays open so probes get an answer),
//! asks every connection to close with 1001, and waits for them up to
//! `server.drain_timeout_ms`. A second signal exits at once.

use crate::chat::Chat;
use crate::config::Config;
use crate::executor::Executor;
use crate::ops::log::Logger;
use crate::ops::systemd::Notifier;
use crate::pool::Pool;
use crate::server::{accept_loop, Gateway, Services};
use crate::store::Store;
use async_io::{Async, Timer};
use futures_lite::{FutureExt, StreamExt};
use std::net::TcpListener;
use std::rc::Rc;
use std::time::Instant;

/// Exit code after a second signal cut the drain short.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Where the configuration came from, to read it again on SIGHUP.
pub struct ConfigSource {
    pub path: Option<std::path::PathBuf>,
    /// The environment at start (a reload cannot see a new one).
    pub env: Vec<(String, String)>,
}

pub fn run(cfg: Config, log: Logger, source: ConfigSource) -> Result<i32, String> {
    tune_malloc();
    raise_fd_limit(&log, cfg.server.max_connections);
    std::fs::create_dir_all(&cfg.server.data_dir).map_err(|e| {
        format!(
            "cannot create the data directory {}: {e} (set server.data_dir, or run where it is writable)",
            cfg.server.data_dir.display()
        )
    })?;
    let listen = cfg.server.listen;
    let listener = TcpListener::bind(listen).map_err(|e| {
        format!(
            "cannot listen on {listen}: {e} (is another process using the port? set server.listen)"
        )
    })?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let listener = Async::new(listener).map_err(|e| e.to_string())?;
    let admin = match cfg.server.admin_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).map_err(|e| {
                format!(
                    "cannot listen on {addr} for the operator endpoints: {e} (is another process \
                     using the port? set server.admin_listen, or \"\" to turn them off)"
                )
            })?;
            let local = l.local_addr().map_err(|e| e.to_string())?;
            Some((Async::new(l).map_err(|e| e.to_string())?, local))
        }
        None => None,
    };
    let admin_addr = admin
        .as_ref()
        .map_or_else(|| "off".to_string(), |(_, a)| a.to_string());
    let mut signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let hangups = async_signal::Signals::new([async_signal::Signal::Hup])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;

    let pool = Rc::new(
        Pool::new(cfg.pool.threads, cfg.pool.queue)
            .map_err(|e| format!("cannot start the pool threads: {e}"))?,
    );
    // The fan-out queue may hold two commit batches; past that the writer
    // waits, and publishers meet a full write queue (OVER_CAPACITY).
    let chat = Rc::new(Chat::new(cfg.store.batch_max * 2));
    let downstream = chat.clone();
    let (store, writer) = Store::open(
        &cfg.store,
        &cfg.server.data_dir,
        cfg.cluster
            .as_ref()
            .map(crate::cluster::ClusterConfig::bus_log),
        pool.clone(),
        Box::new(move || downstream.wait_for_room()),
    )?;
    let store = Rc::new(store);
    let cluster = cfg.cluster.clone().map(|k| {
        Rc::new(crate::cluster::Cluster::new(
            k,
            store.clone(),
            chat.clone(),
            pool.clone(),
            log,
            cfg.chat,
        ))
    });
    let ex = Rc::new(Executor::new());
    let redact = cfg.redactor();
    let https = cfg.llm.providers.iter().map(|p| p.base_url.as_str());
    let https = https
        .chain(cfg.remote.iter().map(|r| r.url.as_str()))
        .any(|u| u.starts_with("https://"));
    let upstream_tls = if https {
        crate::ca::load(&cfg.server.upstream_ca_file)?
    } else {
        crate::ca::no_roots()
    };
    let llm = crate::llm::Llm::new(&cfg.llm, log, redact.clone(), &upstream_tls)
        .map_err(|e| format!("cannot start the upstream pool: {e}"))?;
    let remote = match &cfg.remote {
        Some(r) => Some(
            crate::remote::Remote::new(r, log, redact, &upstream_tls)
                .map_err(|e| format!("cannot start the sync thread: {e}"))?,
        ),
        None => None,
    };
    let tls = crate::server::tls::from_config(&cfg)?;
    let reload_pool = pool.clone();
    let services = Services {
        pool,
        store,
        chat,
        llm,
        remote,
        cluster,
        tls,
    };
    let gw = Rc::new(Gateway::new(cfg, log, ex.clone(), services));
    let notifier = Notifier::from_env();

    if gw.cfg.auth.implicit_open() {
        log.warn(
            "no auth.tokens configured: running in open mode on a loopback address; every session gets a generated name",
            &[],
        );
    }
    log.info(
        "sign-in",
        &[
            ("mode", &gw.cfg.auth.mode.label()),
            ("inferred", &!gw.cfg.auth.mode_explicit),
            ("tokens", &gw.cfg.auth.tokens.len()),
            ("access_rules", &gw.cfg.access.len()),
        ],
    );
    if gw
        .cfg
        .server
        .admin_listen
        .is_some_and(|a| !a.ip().is_loopback())
    {
        log.warn(
            "server.admin_listen is not a loopback address: anyone who reaches it reads the metrics and the upstream key ids",
            &[("admin", &admin_addr)],
        );
    }
    if gw.cfg.cluster.as_ref().is_some_and(|k| k.signing.is_none()) {
        log.warn(
            "bus messages are not signed: anything that can publish on the cluster's subjects can speak for any box (set cluster.signing_key_file and cluster.trusted_keys)",
            &[],
        );
    }
    if gw.cfg.access.is_empty() && gw.cfg.auth.mode != crate::auth::AuthMode::Open {
        log.warn(
            "no [[access]] rules: every signed-in user may join, read and publish in every room and call every provider",
            &[],
        );
    }
    log.info(
        "listening",
        &[
            ("addr", &local),
            ("admin", &admin_addr),
            ("version", &crate::VERSION),
            ("max_connections", &gw.cfg.server.max_connections),
            ("data_dir", &gw.cfg.server.data_dir.display().to_string()),
        ],
    );

    let main = async {
        // The gateway's own tasks go through `Gateway::spawn` (boxed, one
        // kind of task for all).
        gw.spawn(Box::pin(writer));
        gw.start();
        gw.load_budgets().await;
        gw.spawn(Box::pin(accept_loop(gw.clone(), ex.clone(), listener)));
        if let Some((l, _)) = admin {
            gw.spawn(Box::pin(crate::server::admin::accept_loop(gw.clone(), l)));
        }
        if let Some(period) = Notifier::watchdog_period() {
            let n = Notifier::from_env();
            let g = gw.clone();
            gw.spawn(Box::pin(async move {
                loop {
                    n.notify("WATCHDOG=1");
                    n.notify(&format!("STATUS={}", g.status()));
                    Timer::after(period).await;
                }
            }));
        }
        notifier.notify("READY=1");
        notifier.notify(&format!("STATUS={}", gw.status()));
        let g = gw.clone();
        gw.spawn(Box::pin(async move {
            let mut hangups = hangups;
            while hangups.next().await.is_some() {
                reload(&g, &reload_pool, &source).await;
            }
        }));

        let signal = match signals.next().await {
            Some(Ok(async_signal::Signal::Int)) => "SIGINT",
            _ => "SIGTERM",
        };
        log.info(
            "shutting down",
            &[("signal", &signal), ("open", &gw.open_connections())],
        );
        notifier.notify("STOPPING=1");
        gw.begin_drain();

        let deadline = Instant::now() + gw.cfg.server.drain_timeout;
        let drained = async {
            gw.drained().await;
            0
        };
        let timed_out = async {
            Timer::at(deadline).await;
            log.warn("drain timeout reached", &[("open", &gw.open_connections())]);
            0
        };
        let second = async {
            signals.next().await;
            log.warn("second signal: exiting now", &[]);
            EXIT_INTERRUPTED
        };
        let code = drained.or(timed_out).or(second).await;
        log.info("stopped", &[("exit", &code)]);
        code
    };
    Ok(async_io::block_on(ex.run(main)))
}

/// SIGHUP: read the configuration again (on the pool: files and key files
/// are read from disk) and apply what can change while running. An
/// invalid configuration is logged, error by error, and the old one stays.
async fn reload(gw: &Gateway, pool: &Pool, source: &ConfigSource) {
    let notifier = Notifier::from_env();
    notifier.notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        crate::clock::monotonic_usec()
    ));
    let log = gw.log;
    let (path, env) = (source.path.clone(), source.env.clone());
    let job = pool.submit(RELOAD_READ_TIMEOUT, move || {
        read_config(path.as_deref(), &env)
    });
    let loaded = match job {
        Ok(job) => job.await.map_err(|e| vec![format!("{e:?}")]),
        Err(e) => Err(vec![format!(
            "could not read the configuration ({e:?}: the pool is busy); send SIGHUP again"
        )]),
    };
    match loaded.and_then(|r| r) {
        Ok((cfg, warnings, tls)) => {
            for w in &warnings {
                log.warn(w, &[]);
            }
            let fixed = match gw.reload(&cfg, tls) {
                Ok(fixed) => fixed,
                Err(why) => {
                    gw.reload_failed();
                    log.error(
                        "reload refused; the running configuration stays",
                        &[("error", &why)],
                    );
                    notifier.notify("READY=1");
                    return;
                }
            };
            if !fixed.is_empty() {
                log.warn(
                    "reload: these sections changed in settings only a restart applies; they keep their old values",
                    &[("sections", &fixed.join(","))],
                );
            }
            log.info(
                "configuration reloaded",
                &[
                    ("tokens", &cfg.auth.tokens.len()),
                    ("origins", &cfg.server.allowed_origins.len()),
                ],
            );
        }
        Err(errors) => {
            gw.reload_failed();
            for e in &errors {
                log.error(
                    "reload refused: the configuration is invalid; the running one stays",
                    &[("error", e)],
                );
            }
        }
    }
    notifier.notify("READY=1");
    notifier.notify(&format!("STATUS={}", gw.status()));
}

/// The configuration file, the keys it names and the TLS certificate, as
/// a reload reads them (on a pool thread); every error as a line.
type Loaded = (
    Config,
    Vec<String>,
    Option<std::sync::Arc<rustls::ServerConfig>>,
);

fn read_config(
    path: Option<&std::path::Path>,
    env: &[(String, String)],
) -> Result<Loaded, Vec<String>> {
    let (cfg, warnings) = Config::load(path, env)
        .map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    let tls = crate::server::tls::from_config(&cfg).map_err(|e| vec![e])?;
    Ok((cfg, warnings, tls))
}

/// Time allowed to read the configuration and key files on a reload.
const RELOAD_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Keeps glibc from handing freed memory back to the kernel after every
/// burst. Each pool thread has a heap of its own, and glibc trims it with
/// `madvise` whenever a little is free at its top: every trim is a TLB
/// shootdown that interrupts the event loop's core. Profiling the durable
/// publish benchmark showed that as the largest single cost. Up to 8 MiB
/// stays mapped per heap (the process is bounded anyway); fixing the trim
/// threshold also fixes glibc's mmap threshold, so it is raised too, or
/// large buffers would be `munmap`ped, with the same effect, every time.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before any
    // thread of ours exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Raises the open-file limit, and says so when it is still below what
/// the connection table may need.
fn raise_fd_limit(log: &Logger, max_connections: usize) {
    let Some(limit) = crate::ops::fd::raise_open_files_limit() else {
        return;
    };
    let needed = max_connections as u64 + 64;
    if limit < needed {
        log.warn(
            "the open-file limit is below server.max_connections; raise LimitNOFILE",
            &[("limit", &limit), ("needed", &needed)],
        );
    }
}
