//! Edge fitness: what the gateway costs a small device when nobody is
//! talking to it, and whether a long churn of clients leaves memory behind.
//!
//! `start`: resident memory right after start, on the embedded default
//! configuration (no file, no keys, local SQLite), over five starts.
//!
//! `quiet S`: wake-ups of an idle gateway (no clients) over S seconds: the
//! context switches of every thread, from `/proc/PID/task/*/status`.
//!
//! `soak S I`: S seconds of churn (each round: 50 clients connect, say
//! hello, join one of 10 rooms, publish, leave, close) beside I
//! connections held idle throughout, sampling resident memory every 10 s.
//! Memory is flat when the last samples are where the first ones after
//! warm-up were; the slope over the last third says whether it still
//! grows.
//!
//! `exercise ADDR`: against a gateway already running in open mode, what a
//! device's day is made of: the probes, the metrics, the web page, and one
//! session that joins, publishes, reacts, reads history, lists tools and
//! leaves. `.ci/text-order` records the code this runs, to lay it out
//! together in the binary.

use super::{gateway_binary, number, rss_kib, session, start_gateway, NO_RATE_LIMITS};
use async_tungstenite::tungstenite::Message;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway on its embedded defaults, in an empty directory (its data
/// goes to ./hivegate-data there); only the port is chosen free.
struct Default {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Default {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_default(n: usize) -> Result<Default, String> {
    let bin = gateway_binary()?;
    let dir = std::env::temp_dir().join(format!("hivegate-fit-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut child = Command::new(&bin)
        .arg("serve")
        .current_dir(&dir)
        .env("HIVEGATE_SERVER_LISTEN", "127.0.0.1:0")
        .env("HIVEGATE_SERVER_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e} (cargo build --release)",
                bin.display()
            )
        })?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" listening ") {
                let _ = tx.send(());
            }
        }
    });
    let started = Default { child, dir };
    rx.recv_timeout(Duration::from_secs(20))
        .map_err(|_| "the gateway did not start")?;
    Ok(started)
}

pub fn start_rss() -> Result<(), String> {
    let samples = start_rss_samples()?;
    println!("resident memory after start (embedded defaults), 5 starts: {samples:?} KiB");
    println!(
        "median {} KiB ({:.2} MiB), max {} KiB",
        samples[2],
        samples[2] as f64 / 1024.0,
        samples[4]
    );
    Ok(())
}

pub fn start_rss_median() -> Result<u64, String> {
    Ok(start_rss_samples()?[2])
}

/// RSS after five starts, in KiB, sorted.
fn start_rss_samples() -> Result<[u64; 5], String> {
    let mut samples = [0; 5];
    for (n, sample) in samples.iter_mut().enumerate() {
        let gw = start_default(n)?;
        // Right after start: once it listens and has settled for a second.
        std::thread::sleep(Duration::from_secs(1));
        *sample = rss_kib(gw.child.id())?;
    }
    samples.sort_unstable();
    Ok(samples)
}

/// Voluntary plus involuntary context switches per thread name.
fn switches(pid: u32) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    for task in tasks.into_iter().flatten().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        let n = field("voluntary_ctxt_switches:") + field("nonvoluntary_ctxt_switches:");
        match out.iter_mut().find(|(t, _)| *t == name) {
            Some((_, c)) => *c += n,
            None => out.push((name, n)),
        }
    }
    out
}

pub fn quiet(args: &[&str]) -> Result<(), String> {
    let seconds = args.first().map_or(Ok(60), |s| number(s))?;
    let per_s = wakeups_printing(seconds, true)?;
    println!("all threads: {per_s:.2} wake-ups per second");
    Ok(())
}

/// Wake-ups per second of an idle gateway over `seconds`, all threads.
pub fn wakeups(seconds: usize) -> Result<f64, String> {
    wakeups_printing(seconds, false)
}

fn wakeups_printing(seconds: usize, print: bool) -> Result<f64, String> {
    let gw = start_default(0)?;
    let pid = gw.child.id();
    // Start-up work (schema check, first timers) is not idling.
    std::thread::sleep(Duration::from_secs(3));
    let before = switches(pid);
    std::thread::sleep(Duration::from_secs(seconds as u64));
    let after = switches(pid);
    let mut total = 0;
    if print {
        println!("idle gateway, no clients, {seconds} s:");
    }
    for (name, n) in &after {
        let was = before
            .iter()
            .find(|(t, _)| t == name)
            .map_or(0, |(_, c)| *c);
        let woke = n.saturating_sub(was);
        total += woke;
        if print {
            println!(
                "  {name:<16} {woke:>6} wake-ups ({:.2}/s)",
                woke as f64 / seconds as f64
            );
        }
    }
    Ok(total as f64 / seconds.max(1) as f64)
}

pub fn soak(args: &[&str]) -> Result<(), String> {
    let seconds = args.first().map_or(Ok(600), |s| number(s))?;
    let idle = args.get(1).map_or(Ok(2000), |s| number(s))?;
    hivegate::ops::fd::raise_open_files_limit();
    let cap = idle + 100;
    let gw = start_gateway(&format!(
        "max_connections = {cap}\nmax_connections_per_ip = {cap}\nmax_handshakes_per_ip = 1024\n{NO_RATE_LIMITS}[auth]\ntokens = [\"soak:soak-token\"]\n"
    ))?;
    let pid = gw.child.id();
    // Connections that stay for the whole soak, as on a real box: the
    // churn must not grow what they hold either.
    let held = (0..idle)
        .map(|_| session(gw.addr, "soak-token"))
        .collect::<Result<Vec<_>, _>>()?;
    let end = Instant::now() + Duration::from_secs(seconds as u64);
    let mut next_sample = Instant::now();
    let (mut samples, mut rounds, mut published) = (Vec::new(), 0u64, 0u64);
    while Instant::now() < end {
        if Instant::now() >= next_sample {
            samples.push(rss_kib(pid)?);
            next_sample += Duration::from_secs(10);
        }
        let mut clients = Vec::with_capacity(50);
        for i in 0..50 {
            let mut ws = session(gw.addr, "soak-token")?;
            let room = format!("soak-{}", (rounds as usize + i) % 10);
            let join = format!("{{\"op\":\"join\",\"request_id\":\"j\",\"room\":\"{room}\"}}");
            ws.send(Message::text(join)).map_err(|e| e.to_string())?;
            let publish = format!(
                "{{\"op\":\"publish\",\"request_id\":\"p\",\"room\":\"{room}\",\"text\":\"round {rounds} client {i}\"}}"
            );
            ws.send(Message::text(publish)).map_err(|e| e.to_string())?;
            clients.push((ws, room));
        }
        for (ws, room) in &mut clients {
            // Wait for this client's publish ack, then leave.
            loop {
                match ws.read().map_err(|e| e.to_string())? {
                    Message::Text(t) if t.contains("\"op\":\"ack\"") => break,
                    Message::Text(t) if t.contains("\"op\":\"error\"") => {
                        return Err(format!("refused during the soak: {t}"))
                    }
                    _ => {}
                }
            }
            published += 1;
            let leave = format!("{{\"op\":\"leave\",\"request_id\":\"l\",\"room\":\"{room}\"}}");
            ws.send(Message::text(leave)).map_err(|e| e.to_string())?;
        }
        for (mut ws, _) in clients {
            let _ = ws.close(None);
            let _ = ws.flush();
        }
        rounds += 1;
    }
    samples.push(rss_kib(pid)?);
    drop(held);
    let warm = samples.get(6).copied().unwrap_or(samples[0]);
    let last = *samples.last().unwrap_or(&0);
    let max = samples.iter().copied().max().unwrap_or(0);
    println!(
        "soak: {seconds} s, {idle} idle connections, {rounds} rounds of 50 clients, {published} messages published and acknowledged"
    );
    println!("RSS every 10 s (KiB): {samples:?}");
    println!(
        "after 1 minute {warm} KiB, at the end {last} KiB ({:+} KiB), peak {max} KiB",
        last as i64 - warm as i64
    );
    // Levelled off or still growing: the slope over the last third.
    let third = &samples[samples.len() * 2 / 3..];
    if let (Some(a), Some(b)) = (third.first(), third.last()) {
        let minutes = (third.len().saturating_sub(1) * 10) as f64 / 60.0;
        println!(
            "over the last {minutes:.1} minutes: {:+} KiB ({:+.1} KiB per minute)",
            *b as i64 - *a as i64,
            (*b as f64 - *a as f64) / minutes.max(1.0 / 6.0)
        );
    }
    Ok(())
}

pub fn exercise(addr: &str) -> Result<(), String> {
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| format!("{addr}: {e} (an address such as 127.0.0.1:8080)"))?;
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).map_err(|e| e.to_string())?;
    }
    let mut ws = session(addr, "")?;
    send(
        &mut ws,
        r#"{"op":"join","room":"general","history":50}"#.into(),
    )?;
    for i in 0..20 {
        let publish = format!(
            r#"{{"op":"publish","request_id":"p{i}","room":"general","text":"hello {i}"}}"#
        );
        send(&mut ws, publish)?;
    }
    let mut first = None;
    let mut acks = 0;
    while acks < 20 {
        if let Message::Text(t) = ws.read().map_err(|e| e.to_string())? {
            if t.contains(r#""op":"ack""#) {
                acks += 1;
                first = first.or_else(|| field(&t, "id"));
            }
        }
    }
    let id = first.ok_or("no message id in the acks")?;
    let then = [
        format!(r#"{{"op":"react","request_id":"r","message_id":"{id}","emoji":"👍"}}"#),
        r#"{"op":"history","request_id":"h","room":"general","limit":10}"#.into(),
        r#"{"op":"list_tools","request_id":"t"}"#.into(),
        r#"{"op":"leave","room":"general"}"#.into(),
    ];
    for text in then {
        send(&mut ws, text)?;
    }
    loop {
        match ws.read().map_err(|e| e.to_string())? {
            Message::Text(t) if t.contains(r#""op":"left""#) => break,
            Message::Text(t) if t.contains(r#""op":"error""#) => return Err(t.to_string()),
            _ => {}
        }
    }
    let _ = ws.close(None);
    let _ = ws.flush();
    println!("exercised {addr}: probes, metrics, web page, one session");
    Ok(())
}

fn send(ws: &mut WebSocket, text: String) -> Result<(), String> {
    ws.send(Message::text(text)).map_err(|e| e.to_string())
}

/// A string field of a flat JSON frame, enough for the gateway's acks.
fn field(frame: &str, name: &str) -> Option<String> {
    let start = frame.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let len = frame[start..].find('"')?;
    Some(frame[start..start + len].to_string())
}

type WebSocket = async_tungstenite::tungstenite::WebSocket<std::net::TcpStream>;
