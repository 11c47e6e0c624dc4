//! TLS on the listen port: HTTPS and wss:// with a certificate chain a
//! real client verifies, plain TCP refused there, the certificate renewed
//! on SIGHUP while a wss:// session stays open, a bad certificate refused
//! on reload. The certificates in fixtures/tls are for these tests only
//! (a test CA and two server certificates for 127.0.0.1).

mod common;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Message;

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn fixture_tls(name: &str) -> std::path::PathBuf {
    fixture(&format!("tls/{name}"))
}

/// A client that trusts only the test CA, as a browser would its roots.
fn connect(gw: &Gateway) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_file(fixture_tls("ca.pem")).unwrap();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(gw.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls
}

fn served_cert(tls: &Tls) -> Vec<u8> {
    tls.conn.peer_certificates().unwrap()[0].to_vec()
}

fn cert_der(name: &str) -> Vec<u8> {
    CertificateDer::from_pem_file(fixture_tls(name))
        .unwrap()
        .to_vec()
}

fn https_get(gw: &Gateway, path: &str) -> String {
    let mut tls = connect(gw);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out);
    out
}

fn wait_log(gw: &Gateway, needle: &str, count: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while gw.log_text().matches(needle).count() < count {
        assert!(Instant::now() < end, "no {needle:?} in:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rpc(ws: &mut tungstenite::WebSocket<Tls>, v: serde_json::Value) -> serde_json::Value {
    ws.send(Message::text(v.to_string())).unwrap();
    loop {
        if let Message::Text(t) = ws.read().unwrap() {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[test]
fn https_and_wss_on_the_listen_port_with_a_certificate_renewed_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(fixture_tls("server1.pem"), &cert).unwrap();
    copy_secret(&fixture_tls("server1.key"), &key);
    let gw = Gateway::start(
        &format!("[server]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n"),
        &[],
    );

    // HTTPS.
    let page = https_get(&gw, "/healthz");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    // wss:// (open mode on loopback), through a client that verified the
    // chain up to the test CA.
    let tls = connect(&gw);
    assert_eq!(served_cert(&tls), cert_der("server1.pem"));
    let url = format!("wss://127.0.0.1:{}/ws", gw.addr.port());
    let (mut ws, _) = tungstenite::client(url.as_str(), tls).expect("wss upgrade");
    let ack = rpc(&mut ws, serde_json::json!({"op":"hello","client":"tls/1"}));
    assert_eq!(ack["ok"], true, "{ack}");

    // Plain HTTP on a TLS port is refused and counted, without harm.
    let mut tcp = TcpStream::connect(gw.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    // The operator endpoints are plain HTTP on their own loopback port.
    let metrics = gw.get("/metrics").body;
    assert!(
        metrics.contains("hivegate_connections_refused_total{reason=\"tls_handshake\"} 1\n"),
        "{metrics}"
    );

    // Renew: new files in place, SIGHUP. The open session stays; the next
    // handshake gets the new certificate.
    std::fs::copy(fixture_tls("server2.pem"), &cert).unwrap();
    copy_secret(&fixture_tls("server2.key"), &key);
    gw.signal(libc::SIGHUP);
    wait_log(&gw, "configuration reloaded", 1);
    assert_eq!(served_cert(&connect(&gw)), cert_der("server2.pem"));
    let joined = rpc(
        &mut ws,
        serde_json::json!({"op":"join","request_id":"j1","room":"tls"}),
    );
    assert_eq!(joined["op"], "joined", "{joined}");

    // A broken certificate is refused; the renewed one stays in use.
    std::fs::write(&cert, "not a certificate").unwrap();
    gw.signal(libc::SIGHUP);
    wait_log(&gw, "reload refused", 1);
    assert!(gw.log_text().contains("tls_cert_file"), "{}", gw.log_text());
    assert_eq!(served_cert(&connect(&gw)), cert_der("server2.pem"));
}

/// Runs `hivegate COMMAND FILE` on a configuration of `text` (in which
/// `DATA` names a private data directory); its exit code and stderr.
fn hivegate_on(command: &[&str], text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("h.toml");
    let data = format!("{:?}", dir.path().join("data"));
    std::fs::write(&cfg, text.replace("DATA", &data)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hivegate"))
        .args(command)
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), err)
}

#[test]
fn a_certificate_without_its_key_is_a_clear_error() {
    let cert = fixture_tls("server1.pem");
    let (code, err) = hivegate_on(
        &["check-config"],
        &format!("[server]\ntls_cert_file = {cert:?}\n"),
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("tls_cert_file and server.tls_key_file go together"),
        "{err}"
    );
    // A key that is not the certificate's: serve refuses to start.
    let key = hivegate::testkit::secret_fixture("tls/server2.key");
    let (code, err) = hivegate_on(
        &["serve", "--config"],
        &format!("[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = DATA\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n"),
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("do not make a usable pair"), "{err}");
}

/// An OpenAI-compatible provider on https://127.0.0.1, with the test CA's
/// certificate: answers every call with the hello transcript. Returns its
/// base URL; the thread ends with the test process.
fn https_provider() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let certs: Vec<_> = CertificateDer::pem_file_iter(fixture_tls("server1.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(fixture_tls("server1.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let body = common::fake_openai::transcript("hello.txt");
    std::thread::spawn(move || {
        for tcp in listener.incoming().take(16) {
            let Ok(tcp) = tcp else { continue };
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            // The request: head, then Content-Length bytes of body.
            let mut req = Vec::new();
            let mut byte = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") {
                if tls.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                req.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&req).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut rest = vec![0u8; len];
            let _ = tls.read_exact(&mut rest);
            let _ = write!(
                tls,
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n{body}"
            );
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    format!("https://127.0.0.1:{}/v1", addr.port())
}

#[test]
fn an_https_provider_is_verified_against_the_configured_ca_bundle() {
    let url = https_provider();
    let call = |ca: &std::path::Path| {
        let gw = Gateway::start(
            &format!(
                "[server]\nupstream_ca_file = {ca:?}\n[llm]\nmax_retries = 0\n[provider.p]\nbase_url = \"{url}\"\nmodel = \"m\"\n"
            ),
            &[],
        );
        let (mut ws, _) = gw.session(None);
        send_json(
            &mut ws,
            &serde_json::json!({"op":"call_tool","request_id":"c","name":"chat",
                "arguments":{"messages":[{"role":"user","content":"hi"}]}}),
        );
        loop {
            let v = recv_json(&mut ws);
            if v["request_id"] == "c" && (v["op"] == "call_tool_res" || v["op"] == "error") {
                return v;
            }
        }
    };
    // Trusting the test CA: the answer streams through.
    let ok = call(&fixture_tls("ca.pem"));
    assert_eq!(ok["op"], "call_tool_res", "{ok}");
    // Trusting only another CA (the server's own leaf is no CA): refused.
    let refused = call(&fixture_tls("server2.pem"));
    assert_eq!(refused["op"], "error", "{refused}");
    assert_eq!(
        refused["error"]["code"], "PROVIDER_UNAVAILABLE",
        "{refused}"
    );
    assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
}

#[test]
fn an_https_upstream_without_a_ca_bundle_stops_the_start_with_the_fix() {
    let (code, err) = hivegate_on(
        &["serve", "--config"],
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = DATA\nupstream_ca_file = \"/nonexistent/ca.pem\"\n\
         [provider.p]\nbase_url = \"https://127.0.0.1:9/v1\"\nmodel = \"m\"\n",
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("install the ca-certificates package"), "{err}");
}

#[test]
fn slow_tls_handshakes_from_many_addresses_never_lock_out_a_newcomer() {
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(fixture_tls("server1.pem"), &cert).unwrap();
    copy_secret(&fixture_tls("server1.key"), &key);
    let gw = Gateway::start(
        &format!(
            "[server]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n\
             handshake_timeout_ms = 20000\nmax_handshakes = 64\n"
        ),
        &[],
    );
    // 300 sockets from 300 addresses that start no TLS handshake at all.
    let held: Vec<TcpStream> = (0..300u32)
        .map(|i| {
            connect_from(
                gw.addr,
                Some([127, 3, (i / 250) as u8, (i % 250) as u8 + 1].into()),
            )
        })
        .collect();
    let evicted = "hivegate_connections_refused_total{reason=\"handshake_evicted\"}";
    assert!(gw.wait_metric(evicted, 236.0, Duration::from_secs(10)) >= 236.0);
    // Fresh clients still complete their handshakes, and are served.
    for _ in 0..10 {
        let page = https_get(&gw, "/healthz");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    }
    drop(held);
}
