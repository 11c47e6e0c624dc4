//! Durability: an acknowledged message survives SIGKILL, and `hivegate
//! backup` copies the live database consistently.

mod common;
use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tungstenite::Message;

#[test]
fn every_acked_message_survives_sigkill() {
    let mut gw = Gateway::start(NO_RATE_LIMITS, &[]);
    let (mut ws, _) = gw.session(None);
    send_json(
        &mut ws,
        &json!({"op":"join","room":"crash","history":0,"request_id":"j"}),
    );
    while recv_json(&mut ws)["op"] != "joined" {}

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let publisher = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            // Keep up to 20 publishes in flight; read acks until the
            // connection dies under us.
            let mut sent = 0u64;
            let mut in_flight = 0;
            loop {
                while in_flight < 20 {
                    let p = json!({"op":"publish","room":"crash","text":format!("m{sent}"),"request_id":sent.to_string()});
                    if ws.write(Message::text(p.to_string())).is_err() {
                        return sent;
                    }
                    sent += 1;
                    in_flight += 1;
                }
                if ws.flush().is_err() {
                    return sent;
                }
                match ws.read() {
                    Ok(Message::Text(t)) => {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        if v["op"] == "ack" {
                            acked
                                .lock()
                                .unwrap()
                                .push(v["id"].as_str().unwrap().to_string());
                            in_flight -= 1;
                        } else if v["op"] == "error" {
                            in_flight -= 1;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return sent,
                }
            }
        })
    };
    // Let it run, then pull the plug.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 300 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    gw.signal(libc::SIGKILL);
    let sent = publisher.join().unwrap();
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 300,
        "only {} acks before the kill",
        acked.len()
    );

    gw.restart();
    let (mut ws, _) = gw.session(None);
    send_json(
        &mut ws,
        &json!({"op":"join","room":"crash","history":0,"request_id":"j"}),
    );
    while recv_json(&mut ws)["op"] != "joined" {}
    let mut stored = HashSet::new();
    let mut after = 0;
    loop {
        send_json(
            &mut ws,
            &json!({"op":"history","room":"crash","after_seq":after,"limit":200,"request_id":"h"}),
        );
        let h = loop {
            let v = recv_json(&mut ws);
            if v["request_id"] == "h" {
                break v;
            }
        };
        let msgs = h["messages"].as_array().unwrap().clone();
        if msgs.is_empty() {
            break;
        }
        for m in &msgs {
            stored.insert(m["id"].as_str().unwrap().to_string());
            after = m["seq"].as_u64().unwrap();
        }
    }
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acked messages lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    assert!(
        stored.len() as u64 <= sent,
        "more stored ({}) than sent ({sent})",
        stored.len()
    );
    eprintln!(
        "acked {}, stored {}, sent {sent}",
        acked.len(),
        stored.len()
    );
}

#[test]
fn backup_copies_the_live_database() {
    let gw = Gateway::start("", &[]);
    let (mut ws, _) = gw.session(None);
    send_json(
        &mut ws,
        &json!({"op":"join","room":"b","history":0,"request_id":"j"}),
    );
    while recv_json(&mut ws)["op"] != "joined" {}
    for i in 0..25 {
        send_json(
            &mut ws,
            &json!({"op":"publish","room":"b","text":format!("m{i}"),"request_id":"p"}),
        );
        while recv_json(&mut ws)["op"] != "ack" {}
    }
    let config = gw.dir.path().join("hivegate.toml");
    let out = gw.dir.path().join("copy.db");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hivegate"))
            .args(["backup", "--out"])
            .arg(&out)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let done = run();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let copy = rusqlite::Connection::open(&out).unwrap();
    let n: i64 = copy
        .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 25);
    // It will not overwrite a file.
    let again = run();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
}

#[test]
fn a_damaged_database_stops_start_up_with_a_message_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("hivegate.db");
    std::fs::write(&db, vec![b'x'; 8192]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hivegate"))
        .arg("serve")
        .env("HIVEGATE_SERVER_LISTEN", "127.0.0.1:0")
        .env(ADMIN_ANY_PORT.0, ADMIN_ANY_PORT.1)
        .env("HIVEGATE_SERVER_DATA_DIR", &data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&db.display().to_string()), "{err}");
    assert!(err.contains("backup"), "{err}");
    // The file is left as it was, for whoever investigates.
    assert_eq!(std::fs::read(&db).unwrap(), vec![b'x'; 8192]);
}
