//! `cluster [M] [S]`: two boxes on one NATS server, all on loopback.
//! Starts `nats-server` (from PATH) on a free port and two gateways in a
//! cluster through it.
//!
//! Latency: a publisher on box A and a member on box B; 1,000 messages one
//! at a time, each timed from the publish on A to its arrival on B
//! (through A's commit, the bus, B's commit and B's fan-out).
//!
//! Throughput: M members of one room on box B (raw sockets that only count
//! frames) and 4 publishers on box A keeping 32 publishes each in flight;
//! counts the message frames B's members receive over S seconds.

use super::raw::{count_deliveries, WINDOW};
use super::{session, start_gateway, NO_RATE_LIMITS};
use async_tungstenite::tungstenite::Message;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The NATS server of the benchmark, killed by its PID when dropped.
struct Nats(Child);

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nats() -> Result<(Nats, u16), String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start nats-server: {e} (apt install nats-server)"))?;
    let nats = Nats(child);
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > end {
            return Err("nats-server did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((nats, port))
}

pub fn run(args: &[&str]) -> Result<(), String> {
    let members = args.first().map_or(Ok(100), |s| super::number(s))?;
    let seconds = args.get(1).map_or(Ok(5), |s| super::number(s))?;
    // Signed, as a cluster should run; `unsigned` for the difference.
    let signed = args.get(2) != Some(&"unsigned");
    hivegate::ops::fd::raise_open_files_limit();
    let (_nats, port) = start_nats()?;
    let cap = members + 32;
    let keys = if signed { signing_keys()? } else { Vec::new() };
    let box_config = |node: &str| {
        let signing = keys
            .iter()
            .find(|(n, _, _)| n == node)
            .map(|(_, path, _)| {
                let trusted: Vec<String> = keys.iter().map(|(_, _, line)| line.clone()).collect();
                format!(
                    "signing_key_file = {path:?}\ntrusted_keys = [{}]\n",
                    trusted.join(", ")
                )
            })
            .unwrap_or_default();
        format!(
            "max_connections = {cap}\nmax_connections_per_ip = {cap}\nmax_handshakes = 1024\nmax_handshakes_per_ip = 1024\n\
             {NO_RATE_LIMITS}[cluster]\nnats_url = [\"nats://127.0.0.1:{port}\"]\nnode_id = \"{node}\"\n{signing}"
        )
    };
    println!(
        "messages on the bus are {}",
        if signed {
            "signed (Ed25519)"
        } else {
            "unsigned"
        }
    );
    let a = start_gateway(&box_config("bench-a"))?;
    let b = start_gateway(&box_config("bench-b"))?;
    std::thread::sleep(Duration::from_millis(500));
    latency(a.addr, b.addr)?;
    throughput(a.addr, b.addr, members, seconds)?;
    for (name, gw) in [("A", &a), ("B", &b)] {
        let m = |n: &str| super::metric(gw.admin, n);
        println!(
            "box {name}: events out {}, applied {}, duplicates {}, gaps {}, sync requests {}, replayed {}, dropped inbound {}",
            m("hivegate_cluster_events_total{direction=\"out\"}"),
            m("hivegate_cluster_events_total{direction=\"applied\"}"),
            m("hivegate_cluster_duplicates_total"),
            m("hivegate_cluster_gaps_total"),
            m("hivegate_cluster_sync_requests_total"),
            m("hivegate_cluster_replayed_total"),
            m("hivegate_cluster_dropped_total{reason=\"inbound_full\"}"),
        );
    }
    Ok(())
}

fn join(
    ws: &mut async_tungstenite::tungstenite::WebSocket<std::net::TcpStream>,
    room: &str,
) -> Result<(), String> {
    let join = format!(r#"{{"op":"join","room":"{room}","history":0}}"#);
    ws.send(Message::text(join)).map_err(|e| e.to_string())?;
    loop {
        if let Message::Text(t) = ws.read().map_err(|e| e.to_string())? {
            if t.contains(r#""op":"joined""#) {
                return Ok(());
            }
        }
    }
}

fn latency(a: std::net::SocketAddr, b: std::net::SocketAddr) -> Result<(), String> {
    let mut member = session(b, "")?;
    join(&mut member, "latency")?;
    let mut publisher = session(a, "")?;
    join(&mut publisher, "latency")?;
    // B subscribed when its member joined; give the bus a moment.
    std::thread::sleep(Duration::from_millis(500));
    let mut took = Vec::with_capacity(1000);
    for i in 0..1000 {
        let text = format!("lat-{i}");
        let publish = format!(r#"{{"op":"publish","room":"latency","text":"{text}"}}"#);
        let t0 = Instant::now();
        publisher
            .send(Message::text(publish))
            .map_err(|e| e.to_string())?;
        let needle = format!(r#""text":"{text}""#);
        loop {
            if let Message::Text(t) = member.read().map_err(|e| e.to_string())? {
                if t.contains(&needle) {
                    break;
                }
            }
        }
        took.push(t0.elapsed());
        // The publisher's ack, then its own copy.
        loop {
            if let Message::Text(t) = publisher.read().map_err(|e| e.to_string())? {
                if t.contains(&needle) {
                    break;
                }
            }
        }
    }
    took.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "cross-box latency, publish on A to delivery on B, 1000 messages one at a time: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(took[499]),
        ms(took[989]),
        ms(took[999])
    );
    Ok(())
}

fn throughput(
    a: std::net::SocketAddr,
    b: std::net::SocketAddr,
    members: usize,
    seconds: usize,
) -> Result<(), String> {
    let publishers = 4;
    let only = b"{\"op\":\"message\"";
    let c = count_deliveries(
        (a, b),
        "through",
        only,
        (members, publishers),
        seconds,
        || 0.0,
    )?;
    let per_s = c.delivered as f64 / c.seconds;
    println!(
        "through two boxes: {publishers} publishers on A ({WINDOW} in flight each), {members} members on B"
    );
    println!(
        "deliveries on B: {} in {:.2} s = {per_s:.0} per second",
        c.delivered, c.seconds
    );
    println!(
        "messages across the bus per second: {:.0}",
        per_s / members.max(1) as f64
    );
    Ok(())
}

/// A key for each bench box, in a temporary directory: (node, key file,
/// its `trusted_keys` entry).
fn signing_keys() -> Result<Vec<(String, std::path::PathBuf, String)>, String> {
    let dir = std::env::temp_dir().join(format!("hivegate-bench-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    ["bench-a", "bench-b"]
        .iter()
        .map(|node| {
            let (private, public) = hivegate::cluster::sign::generate()?;
            let path = dir.join(format!("{node}.key"));
            std::fs::write(&path, private).map_err(|e| e.to_string())?;
            Ok((node.to_string(), path, format!("\"{node}:{public}\"")))
        })
        .collect()
}

/// What signing costs a bus event: `n` signatures and `n` checks of a
/// typical message event, timed on this machine.
pub fn sign_cost(n: usize) -> Result<(), String> {
    use hivegate::cluster::sign::{generate, split, Signer, SigningConfig};
    let (private, public) = generate()?;
    let cfg = SigningConfig::read("bench-a", &private, &[format!("bench-a:{public}")])?;
    let signer = Signer::new(&cfg).ok_or("no signer")?;
    let body = r#"{"t":"msg","node":"bench-a","room":"bench","oseq":123456,"id":"01JABCDEFGHJKMNPQRSTVWXYZ","from":"publisher","text":"a message of about sixty-four bytes, as the benchmarks send","ts":1732240000123}"#;
    let start = Instant::now();
    let mut signed = Vec::new();
    for _ in 0..n {
        signed = signer.sign(body);
    }
    let sign = start.elapsed();
    let text = String::from_utf8(signed).map_err(|e| e.to_string())?;
    let (b, sig) = split(&text);
    let start = Instant::now();
    for _ in 0..n {
        signer
            .check("bench-a", b, sig)
            .map_err(|e| format!("{e:?}"))?;
    }
    let check = start.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "per event ({n} of each): sign {:.1} µs, check {:.1} µs, 88 bytes more on the wire",
        per(sign),
        per(check)
    );
    Ok(())
}

/// A box's CPU time per presence beat at the documented maximum: one room
/// with a local member, and `n` beats of 10,000 names from one other box,
/// each list replacing the last whole (20,000 presence changes a beat,
/// told to the member). Read from the box's own CPU counter, so it is the
/// event loop's time (nothing of a beat runs elsewhere).
pub fn beat_cost(n: usize) -> Result<(), String> {
    use std::io::Write;
    let (_nats, port) = start_nats()?;
    let gw = start_gateway(&format!(
        "{NO_RATE_LIMITS}[cluster]\nnats_url = [\"nats://127.0.0.1:{port}\"]\nnode_id = \"bench-a\"\n"
    ))?;
    let metric = |name: &str| super::metric(gw.admin, name);
    let end = Instant::now() + Duration::from_secs(10);
    while metric("hivegate_cluster_connected") != 1.0 {
        if Instant::now() > end {
            return Err("the box did not reach the bus".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut member = session(gw.addr, "")?;
    member
        .send(Message::text(r#"{"op":"join","room":"big"}"#))
        .map_err(|e| e.to_string())?;
    // Its own beats show the box is subscribed to the room.
    std::thread::sleep(Duration::from_millis(500));
    let beat = |round: usize| {
        let names: Vec<String> = (0..10_000)
            .map(|u| format!("\"r{}-user{u}\"", round % 2))
            .collect();
        format!(
            r#"{{"t":"beat","node":"bench-b","room":"big","members":[{}],"head":0}}"#,
            names.join(",")
        )
    };
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    raw.write_all(b"CONNECT {\"verbose\":false}\r\n")
        .map_err(|e| e.to_string())?;
    // The member drains its frames meanwhile: a presence frame a beat.
    std::thread::spawn(move || while member.read().is_ok() {});
    let received = "hivegate_cluster_events_total{direction=\"in\"}";
    let (cpu0, in0) = (metric("process_cpu_seconds_total"), metric(received));
    let start = Instant::now();
    for round in 0..n {
        let b = beat(round);
        raw.write_all(format!("PUB hivegate.room.big {}\r\n{b}\r\n", b.len()).as_bytes())
            .map_err(|e| e.to_string())?;
    }
    raw.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
    while metric(received) < in0 + n as f64 {
        if start.elapsed() > Duration::from_secs(120) {
            return Err("the beats were not all received".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A moment for the last beat's work (received is counted first).
    std::thread::sleep(Duration::from_millis(200));
    let cpu = metric("process_cpu_seconds_total") - cpu0;
    println!(
        "{n} beats of 10,000 names (each replacing the last): {:.1} ms of the box's CPU per beat, {:.2} s in all",
        cpu * 1000.0 / n as f64,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
