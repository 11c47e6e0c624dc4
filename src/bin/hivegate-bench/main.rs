//! `hivegate-bench`: benchmarks run by hand, against the `hivegate` binary
//! built beside this one, on loopback only. Each prints its figure and the
//! numbers behind it.
//!
//!   cargo build --release && target/release/hivegate-bench idle 10000
//!
//! `idle N`: memory per idle authenticated connection. Starts the gateway,
//! opens and authenticates 200 warm-up connections, reads the gateway's
//! resident set size, opens N more, reads it again, and divides.
//!
//! `fanout M S`: one room of M members (raw sockets that only count
//! frames, so the client is not the bottleneck) and 4 publishers keeping
//! 32 publishes each in flight; counts the message frames the members
//! receive over S seconds, and the gateway's CPU time.
//!
//! `publish N S`: N publishers, each in a room of its own, each with one
//! publish in flight (send, wait for the ack, repeat); counts acks over S
//! seconds with `synchronous = FULL`.
//!
//! `relay N`, `streams N`: the LLM relay's overhead and the memory of
//! many streams through it (see `relay.rs`).
//!
//! `cluster M S`: two boxes sharing a room through NATS (see `cluster.rs`).
//!
//! `guard`, `report`: the figures held to `bench/baseline.txt` (see
//! `guard.rs`).
//!
//! `web N [SLOWDOWN]`: the web chat in a room of N messages (see `web.rs`).
//!
//! `start`, `quiet S`, `soak S I`: edge fitness (see `fitness.rs`), and
//! `exercise ADDR`, which `.ci/text-order` runs while it records the code
//! a session runs.

mod cluster;
mod fitness;
mod guard;
mod raw;
mod relay;
mod web;

use raw::{count_deliveries, raw_member, text_frame, WINDOW};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::{protocol::Role, Message, WebSocket};

const USAGE: &str = "\
Usage: hivegate-bench idle [N]          memory per idle authenticated connection (N: 10000)
       hivegate-bench fanout [M] [S]    deliveries per second to one room of M members (1000, 5 s)
       hivegate-bench publish [N] [S]   durable acks per second from N publishers (100, 5 s)
       hivegate-bench relay [N]         LLM relay overhead to the first chunk over N calls (1000), on /ws and /v1
       hivegate-bench streams [N]       N concurrent streams through /v1/chat/completions: the gateway's peak memory (200)
       hivegate-bench start             resident memory right after start, embedded defaults
       hivegate-bench quiet [S]         wake-ups per second of an idle gateway over S seconds (60)
       hivegate-bench soak [S] [I]      memory over S seconds of client churn beside I idle connections (600, 2000)
       hivegate-bench sign [N]          the cost of signing and checking one bus event (20000 of each)
       hivegate-bench beats [N]         a box's CPU per presence beat of 10,000 names, each replacing the last (20)
       hivegate-bench cluster [M] [S] [unsigned]   two boxes on NATS, messages signed unless `unsigned`: cross-box latency, deliveries per second (100, 5 s)
       hivegate-bench web [N] [SLOWDOWN] the web chat in a room of N messages, in headless Chromium, its page's thread SLOWDOWN times slower (a phone's): frames (script and wheel scrolling), long tasks, live latency, DOM size (2000, 1)
       hivegate-bench exercise ADDR     one open-mode session and each HTTP route (.ci/text-order)
       hivegate-bench guard [--write | FIGURE...]   the figures held to bench/baseline.txt, or only those named (.ci/run; needs valgrind)
       hivegate-bench report [--check]  the README's table of those figures, from the baseline
";

/// The tests' fake OpenAI-compatible server, shared rather than copied.
use hivegate::testkit::fake_openai;

/// Lifts every rate limit: the benchmarks measure the gateway, not its
/// protection.
const NO_RATE_LIMITS: &str = "[limits]\nglobal_capacity = 1e9\nglobal_refill_per_s = 1e9\n\
    ip_capacity = 1e9\nip_refill_per_s = 1e9\nuser_capacity = 1e9\nuser_refill_per_s = 1e9\n\
    ip_connect_capacity = 1e9\nip_connect_refill_per_s = 1e9\nabuse_threshold = 1000000\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["idle"] => idle(10_000),
        ["idle", n] => number(n).and_then(idle),
        ["fanout", rest @ ..] => numbers(rest, [1000, 5]).and_then(|[m, s]| fanout(m, s)),
        ["publish", rest @ ..] => numbers(rest, [100, 5]).and_then(|[n, s]| publish(n, s)),
        ["relay", rest @ ..] => numbers(rest, [1000]).and_then(|[n]| relay::overhead(n)),
        ["streams", rest @ ..] => numbers(rest, [200]).and_then(|[n]| relay::streams(n)),
        ["start"] => fitness::start_rss(),
        ["quiet", rest @ ..] => fitness::quiet(rest),
        ["soak", rest @ ..] => fitness::soak(rest),
        ["web", rest @ ..] => {
            numbers(rest, [2000, 1]).and_then(|[n, slowdown]| web::run(n, slowdown))
        }
        ["exercise", addr] => fitness::exercise(addr),
        ["guard", rest @ ..] => guard::run(rest),
        ["report", rest @ ..] => guard::report(rest),
        ["cluster", rest @ ..] => cluster::run(rest),
        ["sign", rest @ ..] => numbers(rest, [20_000]).and_then(|[n]| cluster::sign_cost(n)),
        ["beats", rest @ ..] => numbers(rest, [20]).and_then(|[n]| cluster::beat_cost(n)),
        _ => {
            print!("{USAGE}");
            return;
        }
    };
    if let Err(e) = result {
        eprintln!("hivegate-bench: {e}");
        std::process::exit(1);
    }
}

/// The gateway under test, killed by PID when dropped.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    /// The operator endpoints (`/metrics`).
    admin: SocketAddr,
    _dir: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn start_gateway(config: &str) -> Result<Gateway, String> {
    start_gateway_with(config, &[])
}

impl Gateway {
    /// SIGTERM, then waits for the drain to end (a tool wrapped around the
    /// gateway writes its report then).
    fn stop_gracefully(mut self, within: Duration) -> Result<(), String> {
        // SAFETY: kill(2) on the PID of a child this process started and
        // has not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + within;
        while Instant::now() < end {
            if self.child.try_wait().map_err(|e| e.to_string())?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("the gateway did not stop after SIGTERM".into())
    }
}

/// The `hivegate` binary built beside this one.
fn gateway_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("hivegate");
    if !bin.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build --release)",
            bin.display()
        ));
    }
    Ok(bin)
}

/// `wrapper`: a command the gateway runs under (valgrind), or none.
fn start_gateway_with(config: &str, wrapper: &[String]) -> Result<Gateway, String> {
    let bin = gateway_binary()?;
    // One directory per gateway: a benchmark may start several.
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hivegate-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join("bench.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n{config}\n[log]\nlevel = \"warn\"\n",
        dir.join("data")
    );
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    let mut command = match wrapper {
        [] => Command::new(&bin),
        [first, rest @ ..] => {
            let mut c = Command::new(first);
            c.args(rest).arg(&bin);
            c
        }
    };
    let mut child = command
        .args(["serve", "--config"])
        .arg(&path)
        .env("HIVEGATE_LOG_LEVEL", "info")
        .env("HIVEGATE_SERVER_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" listening ") {
                let _ = tx.send(line);
            }
        }
    });
    // Under valgrind, start-up takes a while.
    let wait = if wrapper.is_empty() { 20 } else { 180 };
    let line = rx
        .recv_timeout(Duration::from_secs(wait))
        .map_err(|_| "the gateway did not start")?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
        .ok_or("no address in the listening line")?;
    let admin = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .and_then(|a| a.parse().ok())
        .ok_or("no operator address in the listening line")?;
    Ok(Gateway {
        child,
        addr,
        admin,
        _dir: dir,
    })
}

pub(crate) fn rss_kib(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".to_string())
}

/// Upgrades, says hello with `token` (none when empty, for open mode),
/// waits for the ack.
pub(crate) fn session(addr: SocketAddr, token: &str) -> Result<WebSocket<TcpStream>, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).map_err(|e| e.to_string())? == 0 {
            return Err("closed during the handshake".into());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&head)
        ));
    }
    let mut ws = WebSocket::from_raw_socket(s, Role::Client, None);
    let hello = match token {
        "" => "{\"op\":\"hello\",\"client\":\"bench/1\"}".to_string(),
        _ => format!("{{\"op\":\"hello\",\"token\":\"{token}\",\"client\":\"bench/1\"}}"),
    };
    ws.send(Message::text(hello)).map_err(|e| e.to_string())?;
    loop {
        match ws.read().map_err(|e| e.to_string())? {
            Message::Text(t) if t.contains("\"ok\":true") => return Ok(ws),
            Message::Text(t) => return Err(format!("hello refused: {t}")),
            _ => continue,
        }
    }
}

fn idle(n: usize) -> Result<(), String> {
    let per_conn = idle_bytes(n)?;
    println!(
        "memory per idle connection: {:.0} bytes ({:.2} KiB)",
        per_conn,
        per_conn / 1024.0
    );
    Ok(())
}

/// Bytes of RSS per idle authenticated connection, over `n` connections.
fn idle_bytes(n: usize) -> Result<f64, String> {
    hivegate::ops::fd::raise_open_files_limit();
    let warmup = 200;
    let cap = n + warmup + 16;
    let gw = start_gateway(&format!(
        "max_connections = {cap}\nmax_connections_per_ip = {cap}\nmax_handshakes = 1024\nmax_handshakes_per_ip = 1024\n\
         [limits]\nip_connect_capacity = 1e9\nip_connect_refill_per_s = 1e9\n\
         [auth]\ntokens = [\"bench:bench-token\"]\n"
    ))?;
    let pid = gw.child.id();
    let mut conns = Vec::with_capacity(cap);
    for _ in 0..warmup {
        conns.push(session(gw.addr, "bench-token")?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid)?;
    let started = Instant::now();
    for i in 0..n {
        conns.push(session(gw.addr, "bench-token").map_err(|e| format!("connection {i}: {e}"))?);
    }
    let opened_in = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid)?;
    let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "idle connections: {n} (after {warmup} warm-up), opened in {:.2} s",
        opened_in.as_secs_f64()
    );
    println!("gateway RSS: {before} KiB before, {after} KiB after");
    drop(conns);
    Ok(per_conn)
}

fn number(s: &str) -> Result<usize, String> {
    s.parse()
        .map_err(|_| format!("expected a whole number, not {s:?}"))
}

fn numbers<const K: usize>(args: &[&str], defaults: [usize; K]) -> Result<[usize; K], String> {
    let mut out = defaults;
    for (i, a) in args.iter().enumerate().take(K) {
        out[i] = number(a)?;
    }
    Ok(out)
}

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// utime + stime from a `stat` file, in seconds.
fn stat_cpu(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // After the ")" that ends the command name come the state (field 3),
    // ... utime (field 14) and stime (field 15).
    let rest: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |n: usize| {
        rest.get(n - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (field(14) + field(15)) as f64 / hz
}

/// CPU seconds per thread name of a process.
fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let cpu = stat_cpu(&dir.join("stat").display().to_string());
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += cpu,
            None => out.push((name, cpu)),
        }
    }
    out
}

pub(crate) fn metric(addr: SocketAddr, name: &str) -> f64 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return -1.0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

fn fanout(members: usize, seconds: usize) -> Result<(), String> {
    hivegate::ops::fd::raise_open_files_limit();
    let publishers = 4;
    let cap = members + publishers + 16;
    let gw = start_gateway(&format!(
        "max_connections = {cap}\nmax_connections_per_ip = {cap}\nmax_handshakes = 1024\nmax_handshakes_per_ip = 1024\n{NO_RATE_LIMITS}"
    ))?;
    let (addr, pid) = (gw.addr, gw.child.id());
    let c = count_deliveries(
        (addr, addr),
        "bench",
        b"",
        (members, publishers),
        seconds,
        || cpu_seconds(pid),
    )?;
    let per_s = c.delivered as f64 / c.seconds;
    println!(
        "room of {members} members, {publishers} publishers with {WINDOW} publishes in flight each"
    );
    println!(
        "deliveries: {} in {:.2} s = {per_s:.0} per second",
        c.delivered, c.seconds
    );
    println!(
        "gateway CPU: {:.0}% of one core",
        c.probed / c.seconds * 100.0
    );
    println!("messages per second: {:.0}", per_s / members as f64);
    println!(
        "slow-consumer closes: {}",
        metric(gw.admin, "hivegate_slow_consumer_closes_total")
    );
    Ok(())
}

fn publish(publishers: usize, seconds: usize) -> Result<(), String> {
    use futures_lite::AsyncWriteExt;
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    hivegate::ops::fd::raise_open_files_limit();
    let cap = publishers + 16;
    let gw = start_gateway(&format!(
        "max_connections = {cap}\nmax_connections_per_ip = {cap}\nmax_handshakes = 1024\nmax_handshakes_per_ip = 1024\n[store]\nsynchronous = \"full\"\n{NO_RATE_LIMITS}"
    ))?;
    let (addr, pid) = (gw.addr, gw.child.id());
    let ex = Rc::new(hivegate::executor::Executor::new());
    let acks = Rc::new(Cell::new(0u64));
    let latencies = Rc::new(RefCell::new(Vec::<Duration>::new()));
    let measuring = Rc::new(Cell::new(false));
    let stop = Rc::new(Cell::new(false));
    async_io::block_on(ex.run(async {
        let mut conns = Vec::new();
        for i in 0..publishers {
            conns.push(raw_member(addr, &format!("p{i}")).await?);
        }
        for (i, (mut s, mut r)) in conns.into_iter().enumerate() {
            let (acks, latencies, measuring, stop) = (acks.clone(), latencies.clone(), measuring.clone(), stop.clone());
            ex.spawn(async move {
                let mut n = 0u64;
                while !stop.get() {
                    let frame = text_frame(&format!(r#"{{"op":"publish","room":"p{i}","text":"durable message {n}","request_id":"{n}"}}"#));
                    n += 1;
                    let sent = Instant::now();
                    if s.write_all(&frame).await.is_err() {
                        return;
                    }
                    'ack: loop {
                        while let Some((_, range)) = r.next() {
                            if r.buf[range].starts_with(b"{\"op\":\"ack\"") {
                                if measuring.get() {
                                    acks.set(acks.get() + 1);
                                    latencies.borrow_mut().push(sent.elapsed());
                                }
                                break 'ack;
                            }
                        }
                        if r.fill(&mut s).await.map_or(true, |n| n == 0) {
                            return;
                        }
                    }
                }
            })
            .detach();
        }
        async_io::Timer::after(Duration::from_secs(1)).await;
        measuring.set(true);
        let (t0, cpu0) = (Instant::now(), thread_cpu(pid));
        async_io::Timer::after(Duration::from_secs(seconds as u64)).await;
        measuring.set(false);
        let (elapsed, cpu1) = (t0.elapsed().as_secs_f64(), thread_cpu(pid));
        stop.set(true);
        let mut l = latencies.borrow_mut();
        l.sort();
        let pct = |p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or_default();
        println!("{publishers} publishers, one publish in flight each, synchronous = FULL");
        println!("acks: {} in {elapsed:.2} s = {:.0} per second", acks.get(), acks.get() as f64 / elapsed);
        println!("ack latency: p50 {:.2} ms, p99 {:.2} ms", pct(0.5).as_secs_f64() * 1e3, pct(0.99).as_secs_f64() * 1e3);
        let busy: Vec<String> = cpu1
            .iter()
            .map(|(name, c)| {
                let before = cpu0.iter().find(|(n, _)| n == name).map_or(0.0, |(_, c)| *c);
                format!("{name} {:.0}%", (c - before) / elapsed * 100.0)
            })
            .collect();
        println!("gateway threads' CPU: {}", busy.join(", "));
        let commits = metric(gw.admin, "hivegate_pool_jobs_run_total");
        println!("commits (pool jobs, warm-up included): {commits:.0}");
        Ok::<(), String>(())
    }))
}
