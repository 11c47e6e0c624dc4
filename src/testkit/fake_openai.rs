//! A fake OpenAI-compatible server (std only, loopback, free port) that
//! can stream a transcript, stall, close mid-stream, answer an error, or
//! wait before its first byte. It records every request and notices when
//! the client hangs up on a stream. It stops when dropped.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Streams the events of `transcript`, `delay` apart, after waiting
    /// `first_byte` (before the response head).
    Stream {
        transcript: String,
        delay: Duration,
        first_byte: Duration,
    },
    /// Streams the first `events` events, then closes the connection.
    CloseAfter { transcript: String, events: usize },
    /// Answers `status` with an optional `Retry-After` (seconds).
    Status {
        status: u16,
        retry_after: Option<u64>,
        body: String,
    },
    /// Reads the request and never answers.
    Stall,
    /// A whole JSON answer (a provider that does not stream).
    Json(String),
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub head: String,
    pub body: String,
}

#[derive(Default)]
struct State {
    /// Used in order, one per request; then `default`.
    queue: VecDeque<Behaviour>,
    default: Option<Behaviour>,
    requests: Vec<Recorded>,
    /// Streams the client hung up on before their end.
    hung_up: usize,
}

pub struct FakeOpenAi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FakeOpenAi {
    pub fn start(default: Behaviour) -> FakeOpenAi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            default: Some(default),
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                // Blocking accept: Drop wakes it with a connection of its own.
                for s in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(s) = s {
                        let (state, stop) = (state.clone(), stop.clone());
                        std::thread::spawn(move || serve(s, state, stop));
                    }
                }
            });
        }
        FakeOpenAi { addr, state, stop }
    }

    /// The base URL to configure (`.../v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set(&self, b: Behaviour) {
        self.state.lock().unwrap().default = Some(b);
    }

    pub fn push(&self, b: Behaviour) {
        self.state.lock().unwrap().queue.push_back(b);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn hung_up(&self) -> usize {
        self.state.lock().unwrap().hung_up
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// The transcript in `fixtures/sse/NAME`.
pub fn transcript(name: &str) -> String {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/sse")
        .join(name);
    std::fs::read_to_string(path).expect("fixture")
}

/// A transcript of `n` chunks "c0 ", "c1 ", ...
pub fn counting_transcript(n: usize) -> String {
    let mut t = String::new();
    for i in 0..n {
        t.push_str(&format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"c{i} \"}}}}]}}\n\n"
        ));
    }
    t.push_str("data: [DONE]\n\n");
    t
}

pub fn ok_stream(transcript: String) -> Behaviour {
    Behaviour::Stream {
        transcript,
        delay: Duration::ZERO,
        first_byte: Duration::ZERO,
    }
}

fn read_request(s: &mut TcpStream) -> Option<Recorded> {
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some(Recorded {
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn serve(mut s: TcpStream, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    let Some(req) = read_request(&mut s) else {
        return;
    };
    let behaviour = {
        let mut st = state.lock().unwrap();
        st.requests.push(req);
        st.queue.pop_front().or_else(|| st.default.clone())
    };
    let sse_head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
    match behaviour {
        None | Some(Behaviour::Stall) => {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                // Notice the client giving up.
                let mut b = [0u8; 1];
                s.set_read_timeout(Some(Duration::from_millis(1))).ok();
                if let Ok(0) = s.read(&mut b) {
                    return;
                }
            }
        }
        Some(Behaviour::Status {
            status,
            retry_after,
            body,
        }) => {
            let extra = retry_after
                .map(|r| format!("Retry-After: {r}\r\n"))
                .unwrap_or_default();
            let _ = write!(
                s,
                "HTTP/1.1 {status} Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
        Some(Behaviour::Json(body)) => {
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        Some(Behaviour::CloseAfter { transcript, events }) => {
            let _ = s.write_all(sse_head.as_bytes());
            for event in transcript.split_inclusive("\n\n").take(events) {
                let _ = s.write_all(event.as_bytes());
            }
            // Dropped here: the stream ends without [DONE].
        }
        Some(Behaviour::Stream {
            transcript,
            delay,
            first_byte,
        }) => {
            std::thread::sleep(first_byte);
            if s.write_all(sse_head.as_bytes()).is_err() {
                state.lock().unwrap().hung_up += 1;
                return;
            }
            for event in transcript.split_inclusive("\n\n") {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if s.write_all(event.as_bytes())
                    .and_then(|_| s.flush())
                    .is_err()
                {
                    state.lock().unwrap().hung_up += 1;
                    return;
                }
                std::thread::sleep(delay);
            }
        }
    }
}
