//! `relay N`: the LLM relay's overhead. The fake OpenAI-compatible server
//! of the tests streams a short answer; N calls go to it directly, N
//! through the gateway's `op` protocol (one WebSocket) and N through its
//! OpenAI-compatible endpoint (a connection each, like the direct calls),
//! one at a time, timing the first chunk of each.
//!
//! `streams N`: N streamed calls at once through `/v1/chat/completions`,
//! each 2 s of 100 chunks, sampling the gateway's resident memory until
//! every client has read its `[DONE]`.

use super::{fake_openai, metric, rss_kib, session, start_gateway, NO_RATE_LIMITS};
use async_tungstenite::tungstenite::Message;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const CALL: &str = r#"{"model":"fake","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// A stream read up to its first piece of content: what was read, and the
/// connection, to be read to its end.
struct Started(Vec<u8>, TcpStream);

/// Sends a streamed chat completion to `addr` on a connection of its own
/// and reads until the first piece of content; the time that took.
fn first_chunk(addr: SocketAddr, token: Option<&str>) -> Result<(Duration, Started), String> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{CALL}",
        CALL.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(9).any(|w| w == b"\"content\"") {
        let k = s.read(&mut buf).map_err(|e| e.to_string())?;
        if k == 0 {
            return Err(format!(
                "closed before the first chunk: {}",
                String::from_utf8_lossy(&got)
            ));
        }
        got.extend_from_slice(&buf[..k]);
    }
    Ok((t.elapsed(), Started(got, s)))
}

/// Reads a stream to its end; whether it ended with `[DONE]`.
fn to_the_end(Started(mut got, mut s): Started) -> bool {
    let _ = s.read_to_end(&mut got);
    got.ends_with(b"data: [DONE]\n\n")
}

/// Time from sending a call to its first chunk, directly and through the
/// gateway's two surfaces.
pub fn overhead(n: usize) -> Result<(), String> {
    let fake =
        fake_openai::FakeOpenAi::start(fake_openai::ok_stream(fake_openai::counting_transcript(3)));
    let gw = start_gateway(&format!(
        "{NO_RATE_LIMITS}[auth]\ntokens = [\"bench:bench-token\"]\n[provider.fake]\nbase_url = \"{}\"\nmodel = \"m\"\n",
        fake.base_url()
    ))?;
    let mut direct_once = || -> Result<Duration, String> {
        let (t, s) = first_chunk(fake.addr, None)?;
        to_the_end(s);
        Ok(t)
    };
    let mut v1_once = || -> Result<Duration, String> {
        let (t, s) = first_chunk(gw.addr, Some("bench-token"))?;
        if !to_the_end(s) {
            return Err("a /v1 stream ended without [DONE]".into());
        }
        Ok(t)
    };
    let mut ws = session(gw.addr, "bench-token")?;
    let call = r#"{"op":"call_tool","request_id":"r","name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]}}"#;
    let mut ws_once = || -> Result<Duration, String> {
        let t = Instant::now();
        ws.send(Message::text(call)).map_err(|e| e.to_string())?;
        let mut first = None;
        loop {
            match ws.read().map_err(|e| e.to_string())? {
                Message::Text(f) if f.starts_with("{\"op\":\"stream_chunk\"") => {
                    first.get_or_insert_with(|| t.elapsed());
                }
                Message::Text(f) if f.starts_with("{\"op\":\"call_tool_res\"") => break,
                Message::Text(f) if f.starts_with("{\"op\":\"error\"") => return Err(f.to_string()),
                _ => {}
            }
        }
        first.ok_or_else(|| "no chunk".to_string())
    };
    let measure =
        |f: &mut dyn FnMut() -> Result<Duration, String>| -> Result<Vec<Duration>, String> {
            for _ in 0..50 {
                f()?;
            }
            let mut v = (0..n).map(|_| f()).collect::<Result<Vec<_>, _>>()?;
            v.sort();
            Ok(v)
        };
    let direct = measure(&mut direct_once)?;
    let through_ws = measure(&mut ws_once)?;
    let through_v1 = measure(&mut v1_once)?;
    let pct = |v: &[Duration], p: f64| {
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e3
    };
    let line = |what: &str, v: &[Duration]| {
        println!(
            "{what:<34} p50 {:.3} ms, p99 {:.3} ms",
            pct(v, 0.5),
            pct(v, 0.99)
        )
    };
    let overhead = |what: &str, v: &[Duration]| {
        println!(
            "{what:<34} p50 {:.3} ms, p99 {:.3} ms",
            pct(v, 0.5) - pct(&direct, 0.5),
            pct(v, 0.99) - pct(&direct, 0.99)
        )
    };
    println!("{n} calls each, one at a time; time to the first chunk:");
    line("direct from the fake:", &direct);
    line("through /ws (op protocol):", &through_ws);
    line("through /v1 (a connection each):", &through_v1);
    overhead("relay overhead, /ws:", &through_ws);
    overhead("relay overhead, /v1:", &through_v1);
    Ok(())
}

/// `n` streams at once through `/v1/chat/completions`: the gateway's
/// resident memory before and at its peak.
pub fn streams(n: usize) -> Result<(), String> {
    let fake = fake_openai::FakeOpenAi::start(fake_openai::Behaviour::Stream {
        transcript: fake_openai::counting_transcript(100),
        delay: Duration::from_millis(20),
        first_byte: Duration::ZERO,
    });
    let gw = start_gateway(&format!(
        "{NO_RATE_LIMITS}[server]\nmax_connections_per_ip = {cap}\nmax_handshakes_per_ip = {cap}\n\
         [auth]\ntokens = [\"bench:bench-token\"]\n\
         [llm]\nmax_in_flight = {n}\nmax_in_flight_per_session = {n}\n\
         [provider.fake]\nbase_url = \"{url}\"\nmodel = \"m\"\nmax_in_flight = {n}\n",
        cap = n + 16,
        url = fake.base_url()
    ))?;
    let pid = gw.child.id();
    let before = rss_kib(pid)?;
    let addr = gw.addr;
    let clients: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || -> Result<bool, String> {
                let (_, s) = first_chunk(addr, Some("bench-token"))?;
                Ok(to_the_end(s))
            })
        })
        .collect();
    let (mut peak, mut most_in_flight) = (before, 0.0f64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while clients.iter().any(|c| !c.is_finished()) {
        if Instant::now() > deadline {
            return Err("the streams did not end within 60 s".into());
        }
        peak = peak.max(rss_kib(pid)?);
        most_in_flight = most_in_flight.max(metric(gw.admin, "hivegate_llm_calls_in_flight"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut done = 0;
    for c in clients {
        if c.join().map_err(|_| "a client panicked")?? {
            done += 1;
        }
    }
    if done != n {
        return Err(format!("{} of {n} streams ended without [DONE]", n - done));
    }
    println!("{n} streams through /v1/chat/completions, 100 chunks over 2 s each; {most_in_flight} at once at most");
    println!(
        "gateway RSS: {before} KiB before, peak {peak} KiB ({:.1} MiB)",
        peak as f64 / 1024.0
    );
    Ok(())
}
