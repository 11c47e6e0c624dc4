//! `relay N`: the LLM relay's overhead. The fake OpenAI-compatible server
//! of the tests streams a short answer; N calls go to it directly (a
//! connection each: it closes them), N through the gateway's `op`
//! protocol (one WebSocket) and N through its OpenAI-compatible endpoint
//! (one connection kept alive, as an SDK's pool keeps it; then a
//! connection each), one at a time, timing the first chunk of each.
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

/// A client of the chat completions API: a connection of its own for
/// each call, or one kept open from call to call (as an SDK's pool keeps
/// it; the gateway then sends a stream in HTTP chunks).
struct Client {
    addr: SocketAddr,
    auth: String,
    keep: bool,
    conn: Option<TcpStream>,
}

impl Client {
    fn new(addr: SocketAddr, token: Option<&str>, keep: bool) -> Client {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        Client {
            addr,
            auth,
            keep,
            conn: None,
        }
    }

    /// One streamed call: the time to its first piece of content; then
    /// reads the stream to its end, which must be `[DONE]`.
    fn call(&mut self) -> Result<Duration, String> {
        let t = Instant::now();
        let mut s = match self.conn.take() {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                s
            }
        };
        let close = if self.keep {
            ""
        } else {
            "Connection: close\r\n"
        };
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{close}{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{CALL}",
            self.auth,
            CALL.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let mut read = |s: &mut TcpStream, got: &mut Vec<u8>| -> Result<usize, String> {
            let k = s.read(&mut buf).map_err(|e| e.to_string())?;
            got.extend_from_slice(&buf[..k]);
            Ok(k)
        };
        while !got.windows(9).any(|w| w == b"\"content\"") {
            if read(&mut s, &mut got)? == 0 {
                return Err(format!(
                    "closed before the first chunk: {}",
                    String::from_utf8_lossy(&got)
                ));
            }
        }
        let first = t.elapsed();
        // The gateway keeps the connection (a stream in chunks) until its
        // limit of requests on one connection, then closes it.
        let chunked = got.windows(26).any(|w| w == b"Transfer-Encoding: chunked");
        let end: &[u8] = if chunked {
            b"data: [DONE]\n\n\r\n0\r\n\r\n"
        } else {
            b"data: [DONE]\n\n"
        };
        while !got.ends_with(end) {
            if read(&mut s, &mut got)? == 0 {
                let tail = &got[got.len().saturating_sub(120)..];
                return Err(format!(
                    "the stream ended without [DONE]: ...{}",
                    String::from_utf8_lossy(tail)
                ));
            }
        }
        if chunked {
            self.conn = Some(s);
        }
        Ok(first)
    }
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
    let mut direct = Client::new(fake.addr, None, false);
    let mut v1_each = Client::new(gw.addr, Some("bench-token"), false);
    let mut v1_kept = Client::new(gw.addr, Some("bench-token"), true);
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
    let direct = measure(&mut || direct.call())?;
    let through_ws = measure(&mut ws_once)?;
    let through_v1 = measure(&mut || v1_kept.call())?;
    let through_v1_each = measure(&mut || v1_each.call())?;
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
    line("through /v1 (one kept-alive):", &through_v1);
    line("through /v1 (a connection each):", &through_v1_each);
    overhead("relay overhead, /ws:", &through_ws);
    overhead("relay overhead, /v1:", &through_v1);
    overhead("relay overhead, /v1, a connection each:", &through_v1_each);
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
                Client::new(addr, Some("bench-token"), false).call()?;
                Ok(true)
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
