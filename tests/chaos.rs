//! Chaos, bounded in time and count, on loopback only: the gateway killed
//! while 50 clients publish; its remote store and LLM provider failing and
//! recovering in a loop while clients chat; and a combined attack (a
//! connection flood at 20x the table, 500 slowloris sockets, a control
//! frame flooder, a 1 MiB-frame sender) while a good client keeps talking.
//! Round-trip figures are printed (`--nocapture`) for the README; the
//! assertions are about loss, duplicates, memory and service, not speed.

mod common;
use common::fake_openai::{counting_transcript, ok_stream, Behaviour, FakeOpenAi};
use common::fake_postgrest::{FakePostgrest, Mode};
use common::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// A session from `source`, or `None` when the gateway refuses it.
fn session_from(addr: SocketAddr, source: IpAddr) -> Option<Ws> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    socket.bind(&SocketAddr::new(source, 0).into()).ok()?;
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .ok()?;
    let stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let (mut ws, _) = tungstenite::client::client(format!("ws://{addr}/ws"), stream).ok()?;
    ws.send(Message::text(json!({"op":"hello"}).to_string()))
        .ok()?;
    loop {
        match ws.read().ok()? {
            Message::Text(t) if t.contains("hello_ack") => return Some(ws),
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// The answer to `rid`, or `None` once the connection is gone.
fn answer(ws: &mut Ws, rid: &str) -> Option<Value> {
    loop {
        if let Message::Text(t) = ws.read().ok()? {
            let v: Value = serde_json::from_str(&t).ok()?;
            if v["request_id"] == rid {
                return Some(v);
            }
        }
    }
}

fn ask(ws: &mut Ws, v: Value) -> Option<Value> {
    let rid = v["request_id"].as_str()?.to_string();
    ws.send(Message::text(v.to_string())).ok()?;
    answer(ws, &rid)
}

/// Publishes into `room` (joining it first) until `stop` or the
/// connection breaks, `pause` apart; returns what was acknowledged, as
/// (id, seq). A refused publish (`OVER_CAPACITY`, say) is not acknowledged
/// and not counted.
fn publisher(
    ws: &mut Ws,
    room: &str,
    tag: &str,
    stop: &AtomicBool,
    pause: Duration,
) -> Vec<(String, u64)> {
    let mut acked = Vec::new();
    if ask(
        ws,
        json!({"op":"join","room":room,"history":0,"request_id":"j"}),
    )
    .is_none()
    {
        return acked;
    }
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let rid = format!("{tag}-{i}");
        let Some(a) = ask(
            ws,
            json!({"op":"publish","room":room,"text":rid,"request_id":rid}),
        ) else {
            break;
        };
        if let (Some(id), Some(seq)) = (a["id"].as_str(), a["seq"].as_u64()) {
            acked.push((id.to_string(), seq));
        }
        i += 1;
        std::thread::sleep(pause);
    }
    acked
}

/// Every message of `room`, by id, with its seq (paging `after_seq`).
fn read_room(ws: &mut Ws, room: &str) -> HashMap<String, u64> {
    ask(
        ws,
        json!({"op":"join","room":room,"history":0,"request_id":"j"}),
    )
    .expect("join");
    let mut all = HashMap::new();
    let mut after = 0;
    loop {
        let h = ask(
            ws,
            json!({"op":"history","room":room,"after_seq":after,"limit":200,"request_id":"h"}),
        )
        .expect("history");
        let page = h["messages"].as_array().expect("messages").clone();
        if page.is_empty() {
            return all;
        }
        for m in page {
            let seq = m["seq"].as_u64().unwrap();
            let id = m["id"].as_str().unwrap().to_string();
            assert!(all.insert(id, seq).is_none(), "a message came twice");
            after = seq;
        }
    }
}

fn loopback(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::from([127, a, b, c])
}

#[test]
fn sigkill_while_50_clients_publish_loses_no_acknowledged_message() {
    let mut gw = Gateway::start(NO_RATE_LIMITS, &[]);
    let mut acked: Vec<(String, u64)> = Vec::new();
    for round in 0..3u8 {
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<JoinHandle<Vec<(String, u64)>>> = (0..50u8)
            .map(|i| {
                let (addr, stop) = (gw.addr, stop.clone());
                std::thread::spawn(move || {
                    let Some(mut ws) = session_from(addr, loopback(1, round, i + 1)) else {
                        return Vec::new();
                    };
                    publisher(
                        &mut ws,
                        "chaos",
                        &format!("r{round}c{i}"),
                        &stop,
                        Duration::ZERO,
                    )
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(800));
        gw.signal(libc::SIGKILL);
        let _ = gw.wait_exit(Duration::from_secs(5));
        stop.store(true, Ordering::Relaxed);
        let before = acked.len();
        for c in clients {
            acked.extend(c.join().unwrap());
        }
        assert!(
            acked.len() > before,
            "round {round}: nothing was acknowledged"
        );
        gw.restart();
    }
    let (mut reader, _) = gw.session(None);
    let stored = read_room(&mut reader, "chaos");
    let seqs: HashSet<u64> = stored.values().copied().collect();
    assert_eq!(seqs.len(), stored.len(), "a seq was given twice");
    for (id, seq) in &acked {
        assert_eq!(
            stored.get(id),
            Some(seq),
            "acknowledged {id} (seq {seq}) was lost"
        );
    }
    eprintln!(
        "chaos: 3 SIGKILLs under 50 publishers: {} acknowledged, {} stored, 0 lost",
        acked.len(),
        stored.len()
    );
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// How long the flapping runs.
const FLAP_FOR: Duration = Duration::from_secs(60);
/// Resident memory the gateway must stay under while its upstreams flap.
const FLAP_RSS_BOUND_KIB: u64 = 64 * 1024;

#[test]
fn upstreams_failing_in_a_loop_lose_nothing_and_memory_stays_bounded() {
    const KEY: &str = "chaos-remote-key-0001";
    let remote = FakePostgrest::start(KEY);
    let llm = FakeOpenAi::start(ok_stream(counting_transcript(5)));
    let cfg = format!(
        "{NO_RATE_LIMITS}[remote]\nurl = \"{}\"\napi_key_env = \"SUPABASE_KEY\"\ninterval_ms = 50\n\
         fail_max = 3\nreset_timeout_ms = 300\ntimeout_ms = 1000\n\
         [llm]\nmax_retries = 1\nbackoff_base_ms = 10\n\
         [provider.kimi]\nbase_url = \"{}\"\nmodel = \"m\"\nfail_max = 2\nreset_timeout_ms = 300\n\
         first_byte_timeout_ms = 500\nidle_timeout_ms = 500\n",
        remote.url(),
        llm.base_url()
    );
    let gw = Gateway::start(&cfg, &[("SUPABASE_KEY", KEY)]);
    let stop = Arc::new(AtomicBool::new(false));
    let chatters: Vec<JoinHandle<Vec<(String, u64)>>> = (0..4u8)
        .map(|i| {
            let (addr, stop) = (gw.addr, stop.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                // Reconnect if a connection drops; pace ~20 messages/s.
                while !stop.load(Ordering::Relaxed) {
                    let Some(mut ws) = session_from(addr, loopback(2, 0, i + 1)) else {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    };
                    let tag = format!("c{i}-{}", acked.len());
                    let pause = Duration::from_millis(50);
                    acked.extend(publisher(&mut ws, "flap", &tag, &stop, pause));
                }
                acked
            })
        })
        .collect();
    let callers: Vec<JoinHandle<(u32, u32)>> = (0..2u8)
        .map(|i| {
            let (addr, stop) = (gw.addr, stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, 0);
                let Some(mut ws) = session_from(addr, loopback(2, 1, i + 1)) else {
                    return (0, 0);
                };
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let rid = format!("t{n}");
                    n += 1;
                    let call = json!({"op":"call_tool","request_id":rid,"name":"chat",
                        "arguments":{"messages":[{"role":"user","content":"hi"}]}});
                    if ws.send(Message::text(call.to_string())).is_err() {
                        break;
                    }
                    loop {
                        let Some(v) = answer(&mut ws, &rid) else {
                            return (ok, failed);
                        };
                        match v["op"].as_str() {
                            Some("call_tool_res") => ok += 1,
                            Some("error") => failed += 1,
                            _ => continue,
                        }
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                (ok, failed)
            })
        })
        .collect();
    // Flap both upstreams through every way of failing.
    let remote_modes = [
        Mode::Up,
        Mode::Unavailable,
        Mode::Up,
        Mode::Hang,
        Mode::Up,
        Mode::Refuse,
    ];
    let llm_modes = [
        ok_stream(counting_transcript(5)),
        Behaviour::Status {
            status: 500,
            retry_after: None,
            body: "{\"error\":{\"message\":\"down\"}}".into(),
        },
        ok_stream(counting_transcript(5)),
        Behaviour::Stall,
        ok_stream(counting_transcript(5)),
        Behaviour::CloseAfter {
            transcript: counting_transcript(5),
            events: 2,
        },
    ];
    let started = Instant::now();
    let (mut max_rss, mut step) = (0, 0);
    while started.elapsed() < FLAP_FOR {
        remote.set_mode(remote_modes[step % remote_modes.len()]);
        llm.set(llm_modes[step % llm_modes.len()].clone());
        step += 1;
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(500));
            max_rss = max_rss.max(rss_kib(gw.pid()));
        }
    }
    remote.set_mode(Mode::Up);
    llm.set(ok_stream(counting_transcript(5)));
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<(String, u64)> = chatters
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let (ok, failed) = callers
        .into_iter()
        .map(|c| c.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    // Back online, the backlog drains.
    let end = Instant::now() + Duration::from_secs(30);
    while gw.metric("hivegate_sync_backlog_rows") > 0.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gw.metric("hivegate_sync_backlog_rows"), 0.0);
    let stored = remote.stored("messages");
    for (id, _) in &acked {
        assert_eq!(
            stored.get(id),
            Some(&1),
            "{id} reached the remote {:?} times",
            stored.get(id)
        );
    }
    assert!(
        acked.len() > 500,
        "only {} messages acknowledged",
        acked.len()
    );
    assert!(
        ok > 0 && failed > 0,
        "calls: {ok} answered, {failed} failed"
    );
    eprintln!(
        "chaos: {}s of flapping upstreams: {} messages acknowledged, each stored remotely once; \
         {ok} tool calls answered, {failed} failed; max RSS {max_rss} KiB",
        FLAP_FOR.as_secs(),
        acked.len()
    );
    assert!(
        max_rss < FLAP_RSS_BOUND_KIB,
        "RSS reached {max_rss} KiB (bound {FLAP_RSS_BOUND_KIB})"
    );
}

/// How long the combined attack runs.
const ATTACK_FOR: Duration = Duration::from_secs(10);

#[test]
fn a_good_client_is_served_through_a_combined_attack() {
    raise_fd_limit();
    let cap = 50;
    // The message buckets out of the good client's way (it pings 100 times
    // a second); the connection limits stay at their defaults.
    let gw = Gateway::start(
        &format!(
            "[server]\nmax_connections = {cap}\n[limits]\nglobal_capacity = 1e9\n\
             global_refill_per_s = 1e9\nip_capacity = 1e9\nip_refill_per_s = 1e9\n\
             user_capacity = 1e9\nuser_refill_per_s = 1e9\n"
        ),
        &[],
    );
    let (mut good, _) = gw.session(None);
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers: Vec<JoinHandle<()>> = Vec::new();
    // A connection flood: 20 addresses, each asking for as many
    // connections as the whole table holds (20x it in all), holding what it
    // gets for 300 ms, and asking again.
    for t in 0..20u8 {
        let (addr, stop) = (gw.addr, stop.clone());
        attackers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let held: Vec<Ws> = (0..cap)
                    .filter_map(|_| session_from(addr, loopback(3, 0, t + 1)))
                    .collect();
                std::thread::sleep(Duration::from_millis(300));
                drop(held);
            }
        }));
    }
    // 500 slowloris sockets from one address.
    {
        let (addr, stop) = (gw.addr, stop.clone());
        attackers.push(std::thread::spawn(move || {
            let held: Vec<std::net::TcpStream> = (0..500)
                .filter_map(|_| {
                    let mut s = connect_from(addr, Some(loopback(3, 1, 1)));
                    s.write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                        .ok()?;
                    Some(s)
                })
                .collect();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(held);
        }));
    }
    // A control-frame flooder, reconnecting whenever it is thrown out.
    {
        let (addr, stop) = (gw.addr, stop.clone());
        attackers.push(std::thread::spawn(move || {
            let burst: Vec<u8> = raw_frame(0x9, &[1u8; 125]).repeat(1024);
            while !stop.load(Ordering::Relaxed) {
                let Some(ws) = session_from(addr, loopback(3, 2, 1)) else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let mut s = ws.into_inner();
                while !stop.load(Ordering::Relaxed) && s.write_all(&burst).is_ok() {}
                let mut sink = [0u8; 4096];
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            }
        }));
    }
    // A sender of 1 MiB frames (the limit is 64 KiB), again and again.
    {
        let (addr, stop) = (gw.addr, stop.clone());
        attackers.push(std::thread::spawn(move || {
            let big = raw_frame(0x1, &vec![b'a'; 1 << 20]);
            while !stop.load(Ordering::Relaxed) {
                let Some(ws) = session_from(addr, loopback(3, 3, 1)) else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let mut s = ws.into_inner();
                let _ = s.write_all(&big);
                let mut sink = [0u8; 4096];
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            }
        }));
    }
    // The good client: a ping every 10 ms for the whole attack.
    let started = Instant::now();
    let mut rtts = Vec::new();
    while started.elapsed() < ATTACK_FOR {
        let rid = format!("g{}", rtts.len());
        let t = Instant::now();
        good.send(Message::text(
            json!({"op":"ping","request_id":rid}).to_string(),
        ))
        .expect("the good client can send");
        let v = answer(&mut good, &rid).expect("the good client is answered");
        assert_eq!(v["op"], "pong");
        rtts.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() as f64 * p) as usize).min(rtts.len() - 1)];
    eprintln!(
        "chaos: combined attack for {}s: {} round trips, p50 {:?}, p99 {:?}, max {:?}",
        ATTACK_FOR.as_secs(),
        rtts.len(),
        pct(0.5),
        pct(0.99),
        rtts[rtts.len() - 1]
    );
    // Every attack met its bound.
    let m = |name: &str| gw.metric(name);
    let refused = ["global_cap", "ip_cap", "ip_rate"].map(|r| {
        m(&format!(
            "hivegate_connections_refused_total{{reason=\"{r}\"}}"
        ))
    });
    assert!(refused.iter().sum::<f64>() >= 900.0, "{refused:?}");
    assert!(m("hivegate_connections_open") <= cap as f64);
    assert!(m("hivegate_connections_refused_total{reason=\"handshake_ip_cap\"}") >= 400.0);
    assert!(m("hivegate_connections_closed_total{code=\"1008\"}") >= 1.0);
    assert!(m("hivegate_connections_closed_total{code=\"1009\"}") >= 1.0);
    eprintln!(
        "chaos: refused before the upgrade: {}; closed 1008 (floods): {}; closed 1009 (1 MiB frames): {}",
        refused.iter().sum::<f64>() + m("hivegate_connections_refused_total{reason=\"handshake_ip_cap\"}"),
        m("hivegate_connections_closed_total{code=\"1008\"}"),
        m("hivegate_connections_closed_total{code=\"1009\"}"),
    );
    // Liveness, not speed: no round trip waited for the attack to end.
    assert!(rtts.len() > 100);
    assert!(rtts[rtts.len() - 1] < Duration::from_secs(2));
}
