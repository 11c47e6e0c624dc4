//! `hivegate-bench`: benchmarks run by hand, against the `hivegate` binary
//! built beside this one, on loopback only. Each prints its figure and the
//! numbers behind it.
//!
//!   cargo build --release && target/release/hivegate-bench idle 10000
//!
//! `idle N`: memory per idle authenticated connection. Starts the gateway,
//! opens and authenticates 200 warm-up connections, reads the gateway's
//! resident set size, opens N more, reads it again, and divides.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::{protocol::Role, Message, WebSocket};

const USAGE: &str = "\
Usage: hivegate-bench idle [N]    memory per idle authenticated connection (N defaults to 10000)
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["idle"] => idle(10_000),
        ["idle", n] => match n.parse() {
            Ok(n) => idle(n),
            Err(_) => Err(format!("N must be a whole number, not {n:?}")),
        },
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
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("hivegate");
    if !bin.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build --release)",
            bin.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("hivegate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join("bench.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n{config}\n[log]\nlevel = \"warn\"\n",
        dir.join("data")
    );
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    let mut child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&path)
        .env("HIVEGATE_LOG_LEVEL", "info")
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
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| "the gateway did not start")?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
        .ok_or("no address in the listening line")?;
    Ok(Gateway {
        child,
        addr,
        _dir: dir,
    })
}

fn rss_kib(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".to_string())
}

fn raise_fd_limit() {
    // SAFETY: reads and writes the struct passed, nothing else.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Upgrades, says hello with `token`, waits for the ack.
fn session(addr: SocketAddr, token: &str) -> Result<WebSocket<TcpStream>, String> {
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
    let hello = format!("{{\"op\":\"hello\",\"token\":\"{token}\",\"client\":\"bench/1\"}}");
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
    raise_fd_limit();
    let warmup = 200;
    let cap = n + warmup + 16;
    let gw = start_gateway(&format!(
        "max_connections = {cap}\nmax_connections_per_ip = {cap}\nmax_handshakes = 1024\n\
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
    println!(
        "memory per idle connection: {:.0} bytes ({:.2} KiB)",
        per_conn,
        per_conn / 1024.0
    );
    drop(conns);
    Ok(())
}
