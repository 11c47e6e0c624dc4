//! A NATS client for the core protocol, as small as the gateway needs:
//! connect and authenticate, subscribe, publish, and the protocol's own
//! PING/PONG. No crate fit a single-threaded async-io loop without pulling
//! in tokio; the protocol is a handful of text lines.
//!
//! Everything read is bounded: a control line by [`MAX_LINE`], a payload by
//! the server's `max_payload` (at most [`MAX_PAYLOAD`]); anything else is
//! an error that ends the connection (the caller reconnects). What is
//! written waits in one buffer of at most `max_pending` bytes; past it a
//! send is refused, and the caller counts it.

use crate::stream::Stream;
use async_io::{Async, Timer};
use futures_lite::io::{ReadHalf, WriteHalf};
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Longest control line (`MSG subject sid reply len`, `INFO {...}`).
pub const MAX_LINE: usize = 16 * 1024;
/// Largest payload accepted whatever the server announces.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// One thing the server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Msg {
        subject: String,
        sid: u64,
        payload: Vec<u8>,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
    Info(String),
}

/// Reads one message off the front of `buf`: `Ok(None)` until it is
/// complete, then the message and the bytes it took.
pub fn parse(buf: &[u8], max_payload: usize) -> Result<Option<(Inbound, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_LINE {
            return Err(format!("a control line longer than {MAX_LINE} bytes"));
        }
        return Ok(None);
    };
    if end > MAX_LINE {
        return Err(format!("a control line longer than {MAX_LINE} bytes"));
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "a control line that is not UTF-8")?;
    let (verb, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let done = |m: Inbound| Ok(Some((m, end + 2)));
    match verb.to_ascii_uppercase().as_str() {
        "PING" => done(Inbound::Ping),
        "PONG" => done(Inbound::Pong),
        "+OK" => done(Inbound::Ok),
        "-ERR" => done(Inbound::Err(rest.trim().trim_matches('\'').to_string())),
        "INFO" => done(Inbound::Info(rest.trim().to_string())),
        "MSG" => {
            let f: Vec<&str> = rest.split_ascii_whitespace().collect();
            let (subject, sid, len) = match f.as_slice() {
                [s, sid, len] | [s, sid, _, len] => (*s, *sid, *len),
                _ => return Err(format!("a MSG line of {} fields", f.len())),
            };
            let sid: u64 = sid.parse().map_err(|_| "a MSG with a bad sid")?;
            let len: usize = len.parse().map_err(|_| "a MSG with a bad length")?;
            if len > max_payload.min(MAX_PAYLOAD) {
                return Err(format!(
                    "a MSG of {len} bytes, over the {max_payload} allowed"
                ));
            }
            let start = end + 2;
            if buf.len() < start + len + 2 {
                return Ok(None);
            }
            if &buf[start + len..start + len + 2] != b"\r\n" {
                return Err("a MSG payload not ended by CRLF".into());
            }
            done(Inbound::Msg {
                subject: subject.to_string(),
                sid,
                payload: buf[start..start + len].to_vec(),
            })
            .map(|m| m.map(|(msg, _)| (msg, start + len + 2)))
        }
        other => Err(format!(
            "an unknown operation {:?}",
            other.chars().take(16).collect::<String>()
        )),
    }
}

/// How to log in: nothing, a token, or a user and password.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Login {
    #[default]
    None,
    Token(String),
    User(String, String),
}

/// Never the secret itself: configurations are compared and shown with
/// `{:?}`.
impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Login::None => f.write_str("None"),
            Login::Token(_) => f.write_str("Token(..)"),
            Login::User(u, _) => write!(f, "User({u:?}, ..)"),
        }
    }
}

impl Login {
    /// A credentials file: `user:password` on its first line, or a token.
    pub fn parse(text: &str) -> Login {
        let line = text.lines().next().unwrap_or("").trim();
        match line.split_once(':') {
            _ if line.is_empty() => Login::None,
            Some((user, pass)) if !user.is_empty() => Login::User(user.into(), pass.into()),
            _ => Login::Token(line.into()),
        }
    }
}

/// The CONNECT line: no echo of our own publishes, no verbose `+OK`s.
pub fn connect_line(name: &str, login: &Login) -> String {
    let mut out = crate::json::JsonOut::new()
        .bool("verbose", false)
        .bool("pedantic", false)
        .bool("echo", false)
        .str("name", name)
        .str("lang", "rust")
        .str("version", crate::VERSION)
        .num("protocol", 1);
    out = match login {
        Login::None => out,
        Login::Token(t) => out.str("auth_token", t),
        Login::User(u, p) => out.str("user", u).str("pass", p),
    };
    format!("CONNECT {}\r\nPING\r\n", out.finish())
}

/// `PUB subject len\r\npayload\r\n`.
pub fn pub_frame(subject: &str, payload: &[u8]) -> Vec<u8> {
    let mut f = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
    f.extend_from_slice(payload);
    f.extend_from_slice(b"\r\n");
    f
}

/// One connection to a server, shared by the tasks that read, write and
/// ping it.
pub struct Link {
    /// The connection's halves, each taken by the one loop that uses it.
    reader: RefCell<Option<ReadHalf<Stream>>>,
    writer: RefCell<Option<WriteHalf<Stream>>>,
    out: RefCell<Vec<u8>>,
    out_ready: event_listener::Event,
    max_pending: usize,
    pub max_payload: usize,
    pings: Cell<u64>,
    pongs: Cell<u64>,
    ponged: event_listener::Event,
}

impl Link {
    /// Connects to `addr`, reads the server's INFO, starts TLS when `tls`
    /// says so (checking the certificate against `host`), logs in and
    /// waits for the PONG that says the login was taken, all within
    /// `timeout`.
    pub async fn connect(
        addr: SocketAddr,
        host: &str,
        tls: Option<&Arc<rustls::ClientConfig>>,
        name: &str,
        login: &Login,
        timeout: Duration,
        max_pending: usize,
    ) -> Result<Link, String> {
        let attempt = async {
            let mut tcp = Async::<TcpStream>::connect(addr)
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let mut buf = Vec::new();
            let info = read_one(&mut tcp, &mut buf).await?;
            let Inbound::Info(info) = info else {
                return Err(format!(
                    "{addr} did not start with INFO: is it a NATS server?"
                ));
            };
            let (max_payload, tls_required) = read_info(&info);
            // The server speaks plain text until the INFO, then TLS.
            let mut sock = match tls {
                Some(config) => {
                    let server = rustls::pki_types::ServerName::try_from(host.to_string())
                        .map_err(|_| format!("{host} is not a name a certificate can be for"))?;
                    let tls = futures_rustls::TlsConnector::from(config.clone())
                        .connect(server, tcp)
                        .await
                        .map_err(|e| format!("TLS with {addr}: {e}"))?;
                    Stream::Tls(Box::new(futures_rustls::TlsStream::Client(tls)))
                }
                None if tls_required => {
                    return Err(format!("{addr} requires TLS: write its URL as tls://"))
                }
                None => Stream::Plain(tcp),
            };
            sock.write_all(connect_line(name, login).as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            sock.flush().await.map_err(|e| e.to_string())?;
            loop {
                match read_one(&mut sock, &mut buf).await? {
                    Inbound::Pong => break,
                    Inbound::Err(e) => return Err(format!("{addr} refused the login: {e}")),
                    _ => {}
                }
            }
            let (reader, writer) = futures_lite::io::split(sock);
            Ok(Link {
                reader: RefCell::new(Some(reader)),
                writer: RefCell::new(Some(writer)),
                out: RefCell::new(Vec::new()),
                out_ready: event_listener::Event::new(),
                max_pending,
                max_payload,
                pings: Cell::new(0),
                pongs: Cell::new(0),
                ponged: event_listener::Event::new(),
            })
        };
        let late = async {
            Timer::after(timeout).await;
            Err(format!(
                "{addr} did not answer within {} ms",
                timeout.as_millis()
            ))
        };
        attempt.or(late).await
    }

    /// Queues bytes for the server; `false` when that would pass
    /// `max_pending`.
    pub fn send(&self, bytes: &[u8]) -> bool {
        let mut out = self.out.borrow_mut();
        if out.len() + bytes.len() > self.max_pending {
            return false;
        }
        out.extend_from_slice(bytes);
        self.out_ready.notify(1);
        true
    }

    /// Queues a PING or PONG even past `max_pending`: a few bytes that
    /// keep the connection alive (a server that hears no PONG drops us,
    /// and a PING refused for a full buffer would read as a dead server).
    fn control(&self, bytes: &'static [u8]) {
        self.out.borrow_mut().extend_from_slice(bytes);
        self.out_ready.notify(1);
    }

    /// Publishes `payload` on `subject`; `false` if it was not queued.
    pub fn publish(&self, subject: &str, payload: &[u8]) -> bool {
        payload.len() <= self.max_payload && self.send(&pub_frame(subject, payload))
    }

    /// Bytes waiting to be written.
    pub fn pending(&self) -> usize {
        self.out.borrow().len()
    }

    /// Sends a PING and waits for its PONG: every publish queued before it
    /// has then reached the server. `false` after `timeout`.
    pub async fn confirm(&self, timeout: Duration) -> bool {
        self.control(b"PING\r\n");
        self.pings.set(self.pings.get() + 1);
        let want = self.pings.get();
        let wait = async {
            loop {
                let l = self.ponged.listen();
                if self.pongs.get() >= want {
                    return true;
                }
                l.await;
            }
        };
        wait.or(async {
            Timer::after(timeout).await;
            false
        })
        .await
    }

    /// Writes what is queued, for the life of the connection.
    pub async fn write_loop(&self) -> Result<(), String> {
        let mut writer = self.writer.borrow_mut().take().ok_or("written already")?;
        loop {
            let l = self.out_ready.listen();
            let bytes = std::mem::take(&mut *self.out.borrow_mut());
            if bytes.is_empty() {
                l.await;
                continue;
            }
            writer
                .write_all(&bytes)
                .await
                .map_err(|e| format!("write: {e}"))?;
            // TLS holds what it encrypted until flushed.
            writer.flush().await.map_err(|e| format!("write: {e}"))?;
        }
    }

    /// Reads and hands each MSG to `on_msg`, answers the server's PINGs,
    /// counts PONGs. While `full` gives a listener, the next MSG waits for
    /// it (and nothing more is read). Returns the reason the connection
    /// ended.
    pub async fn read_loop(
        &self,
        mut on_msg: impl FnMut(String, Vec<u8>),
        full: impl Fn() -> Option<event_listener::EventListener>,
    ) -> String {
        let Some(mut reader) = self.reader.borrow_mut().take() else {
            return "read already".into();
        };
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            loop {
                match parse(&buf, self.max_payload) {
                    Ok(Some((m, used))) => {
                        if matches!(m, Inbound::Msg { .. }) {
                            while let Some(wait) = full() {
                                wait.await;
                            }
                        }
                        buf.drain(..used);
                        match m {
                            Inbound::Msg {
                                subject, payload, ..
                            } => on_msg(subject, payload),
                            Inbound::Ping => self.control(b"PONG\r\n"),
                            Inbound::Pong => {
                                self.pongs.set(self.pongs.get() + 1);
                                self.ponged.notify(usize::MAX);
                            }
                            Inbound::Err(e) => return format!("the server said: {e}"),
                            Inbound::Ok | Inbound::Info(_) => {}
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return format!("protocol error: {e}"),
                }
            }
            match reader.read(&mut chunk).await {
                Ok(0) => return "the server closed the connection".into(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return format!("read: {e}"),
            }
        }
    }
}

async fn read_one(
    sock: &mut (impl futures_lite::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Result<Inbound, String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((m, used)) = parse(buf, MAX_PAYLOAD)? {
            buf.drain(..used);
            return Ok(m);
        }
        let n = sock.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The server's `max_payload`, within [`MAX_PAYLOAD`] (1 MiB when absent),
/// and whether it requires TLS.
fn read_info(info: &str) -> (usize, bool) {
    #[derive(serde::Deserialize)]
    struct Info {
        max_payload: Option<u64>,
        tls_required: Option<bool>,
    }
    let info = crate::json::from_json::<Info>(info).ok();
    let max = info
        .as_ref()
        .and_then(|i| i.max_payload)
        .map_or(MAX_PAYLOAD, |m| (m as usize).min(MAX_PAYLOAD));
    (max, info.and_then(|i| i.tls_required).unwrap_or(false))
}

/// Whether a server URL asks for TLS (`tls://host:port`).
pub fn wants_tls(url: &str) -> bool {
    url.starts_with("tls://")
}

/// The address of a `nats://host:port`, `tls://host:port` (or
/// `host:port`) URL; names are resolved by the caller, off the event loop.
pub fn host_port(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("nats://")
        .or_else(|| url.strip_prefix("tls://"))
        .unwrap_or(url);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("{url}: bad port"))?),
        None => (rest, 4222),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_whole_or_not_at_all() {
        let wire = b"INFO {\"max_payload\":1024}\r\nMSG a.b 7 5\r\nhello\r\nPING\r\nMSG a.c 8 r.x 2\r\nhi\r\n";
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some((m, used)) = parse(&wire[at..], 1024).unwrap() {
            at += used;
            seen.push(m);
        }
        assert_eq!(at, wire.len());
        assert_eq!(seen[0], Inbound::Info("{\"max_payload\":1024}".into()));
        assert_eq!(
            seen[1],
            Inbound::Msg {
                subject: "a.b".into(),
                sid: 7,
                payload: b"hello".to_vec()
            }
        );
        assert_eq!(seen[2], Inbound::Ping);
        assert!(matches!(&seen[3], Inbound::Msg { payload, .. } if payload == b"hi"));
        // Cut anywhere, nothing comes out until the rest arrives.
        for cut in 0..14 {
            assert_eq!(
                parse(&b"MSG a.b 7 5\r\nhello\r\n"[..cut], 1024).unwrap(),
                None
            );
        }
    }

    #[test]
    fn hostile_input_is_an_error_not_a_wait() {
        assert!(
            parse(b"MSG a 1 2000\r\n", 1024).is_err(),
            "over max_payload"
        );
        assert!(
            parse(b"MSG a 1 2\r\nhiXX", 1024).is_err(),
            "no CRLF after the payload"
        );
        assert!(parse(b"MSG a\r\n", 1024).is_err());
        assert!(parse(b"MSG a x 1\r\nh\r\n", 1024).is_err());
        assert!(parse(b"HELLO\r\n", 1024).is_err());
        assert!(
            parse(&vec![b'x'; MAX_LINE + 1], 1024).is_err(),
            "a line without end"
        );
        assert_eq!(
            parse(b"-ERR 'Authorization Violation'\r\n", 1024)
                .unwrap()
                .unwrap()
                .0,
            Inbound::Err("Authorization Violation".into())
        );
    }

    #[test]
    fn logins_and_urls() {
        assert_eq!(
            Login::parse("alice:s3cret\n"),
            Login::User("alice".into(), "s3cret".into())
        );
        assert_eq!(Login::parse("tok123\n"), Login::Token("tok123".into()));
        assert_eq!(Login::parse(""), Login::None);
        let line = connect_line("hivegate-a", &Login::Token("t\"x".into()));
        assert!(line.starts_with("CONNECT {") && line.ends_with("}\r\nPING\r\n"));
        assert!(line.contains("\"echo\":false") && line.contains("\"auth_token\":\"t\\\"x\""));
        assert_eq!(
            host_port("nats://127.0.0.1:4333").unwrap(),
            ("127.0.0.1".into(), 4333)
        );
        assert_eq!(host_port("nats://u:p@box:1").unwrap(), ("box".into(), 1));
        assert_eq!(host_port("localhost").unwrap(), ("localhost".into(), 4222));
        assert_eq!(host_port("[::1]:4222").unwrap(), ("::1".into(), 4222));
        assert!(host_port("nats://:x").is_err());
        assert_eq!(pub_frame("a.b", b"hi"), b"PUB a.b 2\r\nhi\r\n");
    }
}
