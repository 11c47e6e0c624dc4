//! One port, HTTP and WebSocket: the plain routes, bad heads, slowloris,
//! and the command line.

mod common;
use common::*;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn plain_routes_answer() {
    let gw = Gateway::start("", &[]);
    let r = gw.get("/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = gw.get("/readyz");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["mode"], "online");
    let r = gw.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().contains("version=0.0.4"));
    assert!(r.body.contains("hivegate_connection_table_capacity 1000"));
    assert_eq!(gw.get("/nope").status, 404);
    let page = gw.get("/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("new WebSocket(url)") && page.body.contains("op: \"hello\""));
    assert_eq!(gw.get("/ws").status, 400, "GET /ws without upgrade headers");
    let r = http_request(
        gw.addr,
        "POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 405);
}

#[test]
fn malformed_and_oversized_heads_are_refused() {
    let gw = Gateway::start("", &[]);
    assert_eq!(http_request(gw.addr, "garbage\r\n\r\n").status, 400);
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
    let mut s = connect_from(gw.addr, None);
    let _ = s.write_all(big.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"));
    let r = http_request(
        gw.addr,
        "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 8\r\n\r\n",
    );
    assert_eq!(r.status, 426);
    assert_eq!(r.header("sec-websocket-version").as_deref(), Some("13"));
    assert!(gw.metric("hivegate_connections_refused_total{reason=\"bad_request\"}") >= 3.0);
}

#[test]
fn a_slowloris_client_is_dropped_after_the_handshake_deadline() {
    let gw = Gateway::start("[server]\nhandshake_timeout_ms = 300\n", &[]);
    let mut s = connect_from(gw.addr, None);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    // The server hangs up without an answer.
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    let timeouts = gw.metric("hivegate_connections_refused_total{reason=\"handshake_timeout\"}");
    assert_eq!(timeouts, 1.0, "gateway log:\n{}", gw.log_text());
    // Everyone else is still served.
    assert_eq!(gw.get("/healthz").status, 200);
}

#[test]
fn origins_are_checked_when_configured() {
    let gw = Gateway::start(
        "[server]\nallowed_origins = [\"https://chat.example\"]\n",
        &[],
    );
    let err = gw
        .ws_from(None, &[("Origin", "https://evil.example")])
        .unwrap_err();
    assert_eq!(err.status, 403);
    assert!(gw
        .ws_from(None, &[("Origin", "https://chat.example")])
        .is_ok());
    assert!(
        gw.ws_from(None, &[]).is_ok(),
        "non-browser clients send no Origin"
    );
}

#[test]
fn version_and_help() {
    let bin = env!("CARGO_BIN_EXE_hivegate");
    let out = Command::new(bin).arg("--version").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("hivegate 0.1.0 ("), "{text}");
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["check-config", "--help"],
    ] {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8(out.stdout).unwrap().contains("Usage"));
    }
    let out = Command::new(bin).arg("frobnicate").output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn check_config_reports_every_problem_with_its_line() {
    let bin = env!("CARGO_BIN_EXE_hivegate");
    // Its keys as a unit's credentials would be, checked from a shell.
    let creds = credentials_dir();
    let out = Command::new(bin)
        .args(["check-config", "--credentials-dir"])
        .arg(&creds)
        .arg(fixture("config/full.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without it, the error says what is missing and where it is set.
    let out = Command::new(bin)
        .arg("check-config")
        .arg(fixture("config/full.toml"))
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("names $CREDENTIALS_DIRECTORY, which is not set"),
        "{err}"
    );
    // A key copied with cp (mode 644) is refused, with the fix.
    let loose = tempfile::tempdir().unwrap();
    for name in ["kimi.key", "nats.creds", "box-a.key"] {
        std::fs::copy(creds.join(name), loose.path().join(name)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    let kimi = loose.path().join("kimi.key");
    std::fs::set_permissions(&kimi, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(bin)
        .args(["check-config", "--credentials-dir"])
        .arg(loose.path())
        .arg(fixture("config/full.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("mode 0644") && err.contains(&format!("chmod 600 {}", kimi.display())),
        "{err}"
    );
    let out = Command::new(bin)
        .arg("check-config")
        .arg(fixture("config/broken.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("broken.toml:3: server.max_connections: expected an integer"),
        "{err}"
    );
    assert!(
        err.contains("broken.toml:5: unknown key server.pong_timeout"),
        "{err}"
    );
    assert!(
        err.contains("broken.toml:7: log.level: expected one of"),
        "{err}"
    );
    let out = Command::new(bin)
        .arg("check-config")
        .arg("/nonexistent.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn no_tokens_on_a_public_address_refuses_to_start() {
    let bin = env!("CARGO_BIN_EXE_hivegate");
    let out = Command::new(bin)
        .arg("serve")
        .env("HIVEGATE_SERVER_LISTEN", "0.0.0.0:0")
        .env("HIVEGATE_SERVER_DATA_DIR", std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.mode = \"open\""));
}

#[test]
fn the_page_has_a_strict_policy_and_an_icon() {
    let gw = Gateway::start("", &[]);
    let page = gw.get("/");
    let csp = page.header("content-security-policy").expect("a policy");
    assert!(csp.starts_with("default-src 'none'") && csp.contains("connect-src 'self'"));
    assert!(csp.contains("script-src 'sha256-") && !csp.contains("unsafe"));
    assert_eq!(
        page.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    let icon = gw.get("/favicon.ico");
    assert_eq!(icon.status, 200);
    assert!(icon
        .header("content-type")
        .unwrap()
        .starts_with("image/svg+xml"));
    assert_eq!(
        gw.get("/healthz")
            .header("x-content-type-options")
            .as_deref(),
        Some("nosniff")
    );
}

#[test]
fn head_gets_the_head_without_the_body() {
    let gw = Gateway::start("", &[]);
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        // The probes on the operator port, the rest on the client port.
        let port = match path {
            "/metrics" | "/readyz" => gw.admin.unwrap(),
            _ => gw.addr,
        };
        let r = http_request(
            port,
            &format!("HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        );
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body.is_empty(), "{path}: {:?}", r.body);
        let get = gw.get(path);
        let len: usize = r.header("content-length").unwrap().parse().unwrap();
        // /metrics and /readyz change between two requests; the page does not.
        if path == "/" || path == "/healthz" {
            assert_eq!(len, get.body.len(), "{path}");
        }
    }
}

#[test]
fn the_command_line_names_the_right_word_and_generates_a_config() {
    let bin = env!("CARGO_BIN_EXE_hivegate");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&["help", "foo"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no help for \"foo\""));
    let out = run(&["--help", "serve"], &[]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hivegate serve")
    );
    let full = fixture("config/full.toml");
    let creds = credentials_dir();
    let creds = creds.to_str().unwrap();
    let out = run(
        &["check-config", &format!("--config={}", full.display())],
        &[("CREDENTIALS_DIRECTORY", creds)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &["check-config", "--config", full.to_str().unwrap()],
        &[
            ("HIVEGATE_SERVR_LISTEN", "x"),
            ("CREDENTIALS_DIRECTORY", creds),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unknown HIVEGATE_ variable fails check-config"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "error: environment variable HIVEGATE_SERVR_LISTEN names no configuration key"
        ) && !err.contains("it is ignored"),
        "{err}"
    );
    // serve: a flag without its value says which value it needs.
    for (flag, needs) in [("-c", "needs a FILE"), ("--listen", "needs an ADDR")] {
        let out = run(&["serve", flag], &[]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needs),
            "{flag}"
        );
    }
    // A section twice is a TOML error, with both lines.
    let dir = tempfile::tempdir().unwrap();
    let twice = dir.path().join("twice.toml");
    std::fs::write(
        &twice,
        "[server]\nlisten = \"localhost:8080\"\n[log]\n[server]\nmax_connections = 5\n",
    )
    .unwrap();
    let out = run(&["check-config", twice.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("twice.toml:4: [server] appears a second time (first on line 1)"),
        "{err}"
    );
    let generated = run(&["genconfig"], &[]);
    assert!(generated.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("generated.toml");
    std::fs::write(&path, &generated.stdout).unwrap();
    let out = run(&["check-config", path.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_name_the_build() {
    let gw = Gateway::start("", &[]);
    let body = gw.get("/metrics").body;
    let line = body
        .lines()
        .find(|l| l.starts_with("hivegate_build_info{"))
        .expect("build info");
    assert!(
        line.starts_with("hivegate_build_info{version=\"0.1.0\",commit=\""),
        "{line}"
    );
    assert!(line.ends_with("} 1"), "{line}");
    // The standard process metrics, with plausible values.
    let rss = gw.metric("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 1e9, "{rss}");
    assert!(gw.metric("process_open_fds") >= 3.0);
    assert!(gw.metric("process_max_fds") >= gw.metric("process_open_fds"));
    assert!(gw.metric("process_threads") >= 2.0);
    let start = gw.metric("process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - start).abs() < 120.0, "{start} vs {now}");
    assert!(gw.metric("process_cpu_seconds_total") >= 0.0);
}

#[test]
fn serve_takes_its_address_from_the_command_line() {
    // localhost means the loopback; the flag wins over the variable.
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hivegate"))
        .args(["serve", "--listen", &format!("localhost:{port}")])
        .env("HIVEGATE_SERVER_LISTEN", "127.0.0.1:1")
        .env("HIVEGATE_SERVER_ADMIN_LISTEN", "")
        .env("HIVEGATE_SERVER_DATA_DIR", dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let listening = loop {
        line.clear();
        if std::io::BufRead::read_line(&mut err, &mut line).unwrap() == 0 {
            break None;
        }
        if line.contains("listening") {
            break Some(line.clone());
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let line = listening.expect("the gateway started");
    assert!(line.contains(&format!("addr=127.0.0.1:{port}")), "{line}");
}

/// A directory holding the full fixture's secrets, as a unit's
/// credentials directory would (each readable by its owner only).
fn credentials_dir() -> std::path::PathBuf {
    let mut dir = std::path::PathBuf::new();
    for name in ["kimi.key", "nats.creds", "box-a.key"] {
        let path = hivegate::testkit::secret_fixture(&format!("config/{name}"));
        dir = path.parent().unwrap().to_path_buf();
    }
    dir
}
