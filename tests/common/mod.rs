//! Shared test helpers: start the real `hivegate` binary on a free loopback
//! port, talk to it over real sockets, read its metrics and logs.

#![allow(dead_code)]

use serde_json::Value;
use socket2::{Domain, Socket, Type};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

pub type Ws = WebSocket<TcpStream>;

/// A `[limits]` section that keeps the rate limits out of a test's way.
pub const NO_RATE_LIMITS: &str = "[limits]\nglobal_capacity = 1e9\nglobal_refill_per_s = 1e9\n\
    ip_capacity = 1e9\nip_refill_per_s = 1e9\nuser_capacity = 1e9\nuser_refill_per_s = 1e9\n\
    ip_connect_capacity = 1e9\nip_connect_refill_per_s = 1e9\nabuse_threshold = 1000000\n";

/// A running gateway, killed (by its PID) when dropped.
pub struct Gateway {
    /// The environment it was started with, for a restart.
    env: Vec<(String, String)>,
    pub child: Child,
    pub addr: SocketAddr,
    /// The operator endpoints (`server.admin_listen`), where they are on.
    pub admin: Option<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

/// Raises this test process's open-file limit so a test can hold many
/// sockets.
pub fn raise_fd_limit() {
    hivegate::ops::fd::raise_open_files_limit();
}

impl Gateway {
    /// Starts the gateway with `config` (TOML, appended to a loopback listen
    /// on port 0 and a private data directory) and extra environment.
    pub fn start(config: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hivegate.toml");
        let data = dir.path().join("data");
        let text = if config.contains("listen") {
            config.to_string()
        } else {
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = {data:?}\n{}",
                strip_server_header(config)
            )
        };
        std::fs::write(&path, text).expect("write config");
        let (child, addr, admin, log) = spawn(&path, env);
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Gateway {
            env,
            child,
            addr,
            admin,
            log,
            dir,
        }
    }

    /// Starts a new gateway process on the same configuration and data
    /// (after this one exited or was killed).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (child, addr, admin, log) = spawn(&self.dir.path().join("hivegate.toml"), &env);
        self.child = child;
        self.addr = addr;
        self.admin = admin;
        self.log = log;
    }
}

/// The operator endpoints' address from the `listening` line (`None`:
/// turned off).
pub fn admin_addr(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .and_then(|a| a.parse().ok())
}

/// Gateways started by tests run side by side: unless a test chose its
/// own, each one's operator endpoints take a free port.
pub const ADMIN_ANY_PORT: (&str, &str) = ("HIVEGATE_SERVER_ADMIN_LISTEN", "127.0.0.1:0");

fn spawn(
    path: &std::path::Path,
    env: &[(&str, &str)],
) -> (
    Child,
    SocketAddr,
    Option<SocketAddr>,
    Arc<Mutex<Vec<String>>>,
) {
    {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hivegate"));
        cmd.arg("serve").arg("--config").arg(path);
        cmd.env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC");
        let chosen = std::fs::read_to_string(path).is_ok_and(|t| t.contains("admin_listen"))
            || env.iter().any(|(k, _)| *k == ADMIN_ANY_PORT.0);
        if !chosen {
            cmd.env(ADMIN_ANY_PORT.0, ADMIN_ANY_PORT.1);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn hivegate");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains(" listening ") {
                        let _ = tx.send(line.clone());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "gateway did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .and_then(|a| a.parse().ok())
            .expect("listening line names the address");
        (child, addr, admin_addr(&line), log)
    }
}

impl Gateway {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// A GET: `/metrics` and `/readyz` from the operator endpoints (where
    /// they are on), the rest from the client port.
    pub fn get(&self, path: &str) -> HttpResponse {
        let admin = path.starts_with("/metrics") || path.starts_with("/readyz");
        let addr = match self.admin {
            Some(a) if admin => a,
            _ => self.addr,
        };
        http_request(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        )
    }

    /// A GET on the client port, whatever the path.
    pub fn get_public(&self, path: &str) -> HttpResponse {
        http_request(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        )
    }

    /// The value of one metric line, e.g. `hivegate_connections_closed_total{code="4002"}`.
    pub fn metric(&self, name: &str) -> f64 {
        let body = self.get("/metrics").body;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{body}"))
    }

    /// Waits until a metric reaches `at_least`.
    pub fn wait_metric(&self, name: &str, at_least: f64, within: Duration) -> f64 {
        let end = Instant::now() + within;
        loop {
            let v = self.metric(name);
            if v >= at_least || Instant::now() > end {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log holds `needle` `count` times (its lines are
    /// read from the process's stderr as they come): a check of what is
    /// not in the log first waits for the line that would hold it.
    pub fn wait_log(&self, needle: &str, count: usize) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.log_text().matches(needle).count() < count {
            assert!(
                Instant::now() < end,
                "no {needle:?} in the log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `ok` holds, up to 10 s (a failure after that).
    pub fn wait_until(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; gateway log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ws(&self) -> Ws {
        self.ws_from(None, &[]).expect("upgrade")
    }

    /// Upgrades from a given loopback source address, with extra headers.
    pub fn ws_from(
        &self,
        source: Option<IpAddr>,
        headers: &[(&str, &str)],
    ) -> Result<Ws, HttpResponse> {
        let stream = connect_from(self.addr, source);
        let mut req = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            self.addr
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut stream = stream;
        stream.write_all(req.as_bytes()).unwrap();
        let head = read_head(&mut stream);
        if !head.starts_with("HTTP/1.1 101") {
            let mut rest = String::new();
            let _ = stream.read_to_string(&mut rest);
            return Err(parse_response(&(head + &rest)));
        }
        Ok(WebSocket::from_raw_socket(
            stream,
            tungstenite::protocol::Role::Client,
            None,
        ))
    }

    /// Connects and says hello; returns the socket and the `hello_ack`.
    pub fn session(&self, token: Option<&str>) -> (Ws, Value) {
        let mut ws = self.ws();
        let hello = match token {
            Some(t) => serde_json::json!({"op":"hello","token":t,"client":"test/1"}),
            None => serde_json::json!({"op":"hello","client":"test/1"}),
        };
        send_json(&mut ws, &hello);
        let ack = recv_json(&mut ws);
        (ws, ack)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config` with its `[server]` keys (under `[server]` headers, and any
/// before the first header) gathered first, to continue the harness's
/// own `[server]` section: TOML allows a section once.
fn strip_server_header(config: &str) -> String {
    let (mut server, mut rest) = (String::new(), String::new());
    let mut in_server = true;
    for line in config.lines() {
        let header = line.trim();
        if header.starts_with('[') {
            in_server = header == "[server]";
            if in_server {
                continue;
            }
        }
        let into = if in_server { &mut server } else { &mut rest };
        into.push_str(line);
        into.push('\n');
    }
    server + &rest
}

pub fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(ip) = source {
        socket.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    }
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads a response head, up to its blank line.
pub fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON (`null` when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

pub fn parse_response(text: &str) -> HttpResponse {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Sends raw bytes and reads the whole answer until the server closes.
pub fn http_request(addr: SocketAddr, raw: &str) -> HttpResponse {
    let mut s = connect_from(addr, None);
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&String::from_utf8_lossy(&out))
}

/// An MCP `initialize` request.
pub const MCP_INIT: &str =
    r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18"}}"#;

/// POSTs one JSON-RPC message to `/mcp`, with extra header lines (each
/// ending in CRLF), and reads the answer.
pub fn mcp_post(addr: SocketAddr, headers: &str, body: &str) -> HttpResponse {
    http_request(
        addr,
        &format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Type: application/json\r\n\
             Accept: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

pub fn send_json(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).expect("send");
}

/// The next text frame, as JSON (pings and pongs are skipped).
pub fn recv_json(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("read a frame") {
            Message::Text(t) => return serde_json::from_str(&t).expect("server sent JSON"),
            Message::Close(c) => panic!("closed unexpectedly: {c:?}"),
            _ => continue,
        }
    }
}

/// Reads until the server's close frame; returns its code (None when the
/// connection ended without one).
pub fn expect_close(ws: &mut Ws) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return Some(u16::from(f.code)),
            Ok(Message::Close(None)) => return Some(1005),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

pub fn close_code(code: CloseCode) -> u16 {
    u16::from(code)
}

/// A masked client frame, for sending what tungstenite would not.
pub fn raw_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let mask = [1u8, 2, 3, 4];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Where test fixtures live.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}
#[allow(unused_imports)]
pub use hivegate::testkit::fake_openai;
pub mod fake_postgrest;

/// A masked client frame with the FIN bit as given (for fragments).
pub fn raw_fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = raw_frame(opcode, payload);
    if !fin {
        f[0] &= 0x7f;
    }
    f
}

/// Writes a secret (a key, a credential) readable by its owner only, as
/// the gateway requires of secrets.
pub fn write_secret(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Copies a secret fixture to `to`, readable by its owner only.
pub fn copy_secret(from: &std::path::Path, to: &std::path::Path) {
    hivegate::ops::file::private_copy(from, to).unwrap();
}

/// Runs a tool to its end and fails the test, with everything the tool
/// said, unless it succeeded; its standard output.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
