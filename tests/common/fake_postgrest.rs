//! A fake PostgREST (Supabase) server: std only, loopback, free port. It
//! keeps rows by primary key with upsert semantics, checks the headers a
//! real project needs, and can be switched to refuse connections, hang,
//! answer 503, or reject any batch holding one poison row with 400.

use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Up,
    /// Accepts and closes at once.
    Refuse,
    /// Reads the request and never answers.
    Hang,
    /// Answers 503.
    Unavailable,
}

#[derive(Default)]
struct State {
    mode: Option<Mode>,
    /// table → primary key → row.
    tables: HashMap<String, HashMap<String, Value>>,
    /// table → primary key → how many times a row with that key was
    /// stored (an upsert hides duplicates; this shows them).
    stored: HashMap<String, HashMap<String, usize>>,
    /// Rows with this `text` make their whole batch a 400.
    poison: Option<String>,
    posts: usize,
    header_errors: Vec<String>,
}

pub struct FakePostgrest {
    pub addr: SocketAddr,
    key: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FakePostgrest {
    pub fn start(key: &str) -> FakePostgrest {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            mode: Some(Mode::Up),
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop, key) = (state.clone(), stop.clone(), key.to_string());
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(s) = s {
                        let (state, stop, key) = (state.clone(), stop.clone(), key.clone());
                        std::thread::spawn(move || serve(s, &state, &stop, &key));
                    }
                }
            });
        }
        FakePostgrest {
            addr,
            key: key.to_string(),
            state,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, m: Mode) {
        self.state.lock().unwrap().mode = Some(m);
    }

    pub fn set_poison(&self, text: &str) {
        self.state.lock().unwrap().poison = Some(text.to_string());
    }

    /// The rows of a table, by primary key.
    pub fn rows(&self, table: &str) -> HashMap<String, Value> {
        self.state
            .lock()
            .unwrap()
            .tables
            .get(table)
            .cloned()
            .unwrap_or_default()
    }

    /// How many times each key of a table was stored.
    pub fn stored(&self, table: &str) -> HashMap<String, usize> {
        self.state
            .lock()
            .unwrap()
            .stored
            .get(table)
            .cloned()
            .unwrap_or_default()
    }

    pub fn posts(&self) -> usize {
        self.state.lock().unwrap().posts
    }

    pub fn header_errors(&self) -> Vec<String> {
        self.state.lock().unwrap().header_errors.clone()
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for FakePostgrest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn respond(s: &mut TcpStream, status: u16, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn serve(mut s: TcpStream, state: &Mutex<State>, stop: &AtomicBool, key: &str) {
    let mode = state.lock().unwrap().mode.unwrap_or(Mode::Up);
    if mode == Mode::Refuse {
        return;
    }
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if s.read_exact(&mut body).is_err() {
        return;
    }
    match mode {
        Mode::Hang => {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        Mode::Unavailable => return respond(&mut s, 503, r#"{"message":"unavailable"}"#),
        _ => {}
    }
    // The request line: POST /rest/v1/TABLE?on_conflict=a,b HTTP/1.1
    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let Some(table) = path.strip_prefix("/rest/v1/") else {
        return respond(&mut s, 404, "{}");
    };
    let conflict: Vec<String> = query
        .strip_prefix("on_conflict=")
        .map(|c| c.split(',').map(String::from).collect())
        .unwrap_or_default();
    let mut st = state.lock().unwrap();
    st.posts += 1;
    let bearer = format!("Bearer {key}");
    let checks = [
        ("apikey", header("apikey").as_deref() == Some(key)),
        (
            "authorization",
            header("authorization").as_deref() == Some(bearer.as_str()),
        ),
        (
            "content-type",
            header("content-type").as_deref() == Some("application/json"),
        ),
        (
            "prefer",
            header("prefer").is_some_and(|p| {
                p.contains("resolution=merge-duplicates") && p.contains("return=minimal")
            }),
        ),
        ("on_conflict", !conflict.is_empty()),
    ];
    for (name, ok) in checks {
        if !ok {
            st.header_errors.push(name.to_string());
            drop(st);
            return respond(&mut s, 401, r#"{"message":"bad headers"}"#);
        }
    }
    let Ok(Value::Array(rows)) = serde_json::from_slice::<Value>(&body) else {
        drop(st);
        return respond(&mut s, 400, r#"{"message":"not a JSON array"}"#);
    };
    if let Some(p) = &st.poison {
        if rows.iter().any(|r| r["text"] == *p) {
            drop(st);
            // Like some proxies, it echoes the key it was sent: the
            // gateway must not log or store it.
            let echo = format!(
                r#"{{"message":"new row violates check constraint \"no_poison\"","hint":"apikey {key}\u001b[2J"}}"#
            );
            return respond(&mut s, 400, &echo);
        }
    }
    for row in rows {
        let k: Vec<String> = conflict
            .iter()
            .map(|c| row[c].as_str().unwrap_or("").to_string())
            .collect();
        let k = k.join("/");
        *st.stored
            .entry(table.to_string())
            .or_default()
            .entry(k.clone())
            .or_default() += 1;
        st.tables
            .entry(table.to_string())
            .or_default()
            .insert(k, row);
    }
    drop(st);
    respond(&mut s, 201, "");
}
