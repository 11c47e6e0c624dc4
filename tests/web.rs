//! The web chat in real headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from tests/web/, both installed by `.ci/web-setup`):
//! tests/web/e2e.mjs uses the page as people do, against this gateway and a
//! fake provider, and this test plays the outage it asks for; it also
//! opens the operator view on the operator port. Screenshots go
//! to target/web-screenshots/.
//!
//! Without Chromium or playwright-core the test says so and passes, unless
//! `REQUIRE_BROWSER=1` (as `.ci/run` sets).

mod common;
use common::fake_openai::{counting_transcript, Behaviour, FakeOpenAi};
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[test]
#[cfg_attr(
    missing_browser,
    ignore = "chromium or playwright-core is missing: run .ci/web-setup"
)]
fn the_web_chat_works_in_a_real_browser() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    let ready = dir.join("node_modules/playwright-core").exists() && chromium().is_some();
    // Marked ignored when they were missing at build time (build.rs).
    assert!(
        ready,
        "chromium or playwright-core missing: run .ci/web-setup"
    );
    // The assistant streams 60 chunks, 100 ms apart: time to press Cancel.
    let fake = FakeOpenAi::start(Behaviour::Stream {
        transcript: counting_transcript(60),
        delay: Duration::from_millis(100),
        first_byte: Duration::ZERO,
    });
    // A fixed port: the page reconnects to the same address after the
    // restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let data = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n{NO_RATE_LIMITS}\
             [provider.fake]\nbase_url = \"{}\"\nmodel = \"fake-model\"\n",
            data.path(),
            fake.base_url()
        ),
        &[],
    );
    fill_big_room(&gw, 600);
    // A server with tokens, rate limits, no assistant, and a remote that
    // is down (fallback mode).
    let tokens = Gateway::start(
        "[auth]\ntokens = [\"alice:browser-token-1\"]\n[remote]\nurl = \"http://127.0.0.1:9\"\n\
         interval_ms = 50\nfail_max = 1\nconnect_timeout_ms = 200\ntimeout_ms = 500\n",
        &[],
    );
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/web-screenshots");
    let mut node = Node(
        Command::new("node")
            .arg(dir.join("e2e.mjs"))
            .current_dir(&dir)
            .env("BASE_URL", format!("http://127.0.0.1:{port}"))
            .env("CHROMIUM", chromium().unwrap())
            .env("SHOT_DIR", &shots)
            .env("TOKEN_URL", format!("http://{}", tokens.addr))
            .env(
                "ADMIN_URL",
                format!("http://{}", gw.admin.expect("an operator port")),
            )
            .env("TOKEN", "browser-token-1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node"),
    );
    let mut stdin = node.0.stdin.take().unwrap();
    let stdout = BufReader::new(node.0.stdout.take().unwrap());
    let mut report = Vec::new();
    for line in stdout.lines().map_while(Result::ok) {
        eprintln!("web: {line}");
        if line == "OUTAGE" {
            outage(&mut gw);
            writeln!(stdin, "SENT").unwrap();
        }
        if line == "DRAIN" {
            tokens.signal(libc::SIGTERM);
        }
        report.push(line);
    }
    let status = node.0.wait().unwrap();
    assert!(
        status.success() && report.last().map(String::as_str) == Some("DONE"),
        "the browser test failed:\n{}",
        report.join("\n")
    );
    assert!(Path::new(&shots.join("phone.png")).exists());
}

/// Kills the gateway, starts it again on the same port and data, and sends
/// 120 messages into `general` and 3 into `second` from another client,
/// all acknowledged.
fn outage(gw: &mut Gateway) {
    gw.signal(libc::SIGKILL);
    gw.wait_exit(Duration::from_secs(5));
    gw.restart();
    let (mut ws, _) = gw.session(None);
    send_json(
        &mut ws,
        &json!({"op":"join","room":"general","history":0,"request_id":"j"}),
    );
    recv_json(&mut ws);
    // One at a time, each acknowledged (a connection has at most 32
    // requests in flight).
    send_json(
        &mut ws,
        &json!({"op":"join","room":"second","history":0,"request_id":"j2"}),
    );
    while recv_json(&mut ws)["op"] != "joined" {}
    let rooms = (0..120).map(|i| ("general", format!("m{i:03}")));
    for (room, text) in rooms.chain((0..3).map(|i| ("second", format!("s{i}")))) {
        send_json(
            &mut ws,
            &json!({"op":"publish","room":room,"text":text,"request_id":text}),
        );
        while recv_json(&mut ws)["op"] != "ack" {}
    }
}

/// `n` messages in room `big`, `b000` first, from one sender; every fifth
/// is three lines long, so rows differ in height.
fn fill_big_room(gw: &Gateway, n: usize) {
    let (mut ws, _) = gw.session(None);
    send_json(
        &mut ws,
        &json!({"op":"join","room":"big","history":0,"request_id":"j"}),
    );
    while recv_json(&mut ws)["op"] != "joined" {}
    for i in 0..n {
        let id = format!("b{i:03}");
        let text = if i % 5 == 0 {
            format!("{id} is a longer one\nwith a second line\nand a third")
        } else {
            id.clone()
        };
        send_json(
            &mut ws,
            &json!({"op":"publish","room":"big","text":text,"request_id":id}),
        );
        while recv_json(&mut ws)["op"] != "ack" {}
    }
}

/// The browser script, ended (by its PID) if the test fails first.
struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
