//! Rate limits over real sockets: the per-user burst, refusals that keep
//! the connection open and say when to retry, the abuse close that spares a
//! polite neighbour, and the per-IP connection rate.

mod common;
use common::*;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::time::Duration;
use tungstenite::Message;

/// Sends `n` pings in one write and reads the `n` answers.
fn burst(ws: &mut Ws, n: usize, tag: &str) -> Vec<Value> {
    for i in 0..n {
        let ping = json!({"op":"ping","request_id":format!("{tag}{i}")});
        ws.write(Message::text(ping.to_string())).unwrap();
    }
    ws.flush().unwrap();
    (0..n).map(|_| recv_json(ws)).collect()
}

#[test]
fn a_burst_past_the_user_bucket_gets_rate_limited_then_served_again() {
    let gw = Gateway::start("", &[]);
    let (mut ws, ack) = gw.session(None);
    assert_eq!(ack["limits"]["rate_per_s"], 5);
    assert_eq!(ack["limits"]["burst"], 50);
    let answers = burst(&mut ws, 60, "b");
    let pongs = answers.iter().filter(|a| a["op"] == "pong").count();
    let limited: Vec<&Value> = answers.iter().filter(|a| a["op"] == "error").collect();
    assert_eq!((pongs, limited.len()), (50, 10), "{answers:?}");
    let mut retry_after = 0;
    for e in &limited {
        assert_eq!(e["error"]["code"], "RATE_LIMITED");
        assert!(e["request_id"].as_str().unwrap().starts_with('b'));
        let ms = e["error"]["retry_after_ms"].as_u64().unwrap();
        assert!(ms > 0 && ms <= 200, "{e}");
        retry_after = retry_after.max(ms);
    }
    // The connection is still open, and after retry_after_ms one more
    // request is served.
    std::thread::sleep(Duration::from_millis(retry_after));
    let again = burst(&mut ws, 1, "a");
    assert_eq!(again[0]["op"], "pong", "{again:?}");
    assert_eq!(
        gw.metric("hivegate_rate_limited_total{level=\"user\"}"),
        10.0
    );
    assert_eq!(
        gw.metric("hivegate_rate_table_entries{table=\"user\"}"),
        1.0
    );
}

#[test]
fn an_abusive_client_is_closed_with_1008_and_a_polite_neighbour_is_not() {
    let gw = Gateway::start("", &[]);
    let (mut polite, _) = gw.session(None);
    let (mut abusive, _) = gw.session(None);
    // 50 served, then refusals: the 51st within 10 s closes the connection.
    for i in 0..120 {
        let ping = json!({"op":"ping","request_id":format!("x{i}")});
        if abusive.write(Message::text(ping.to_string())).is_err() {
            break;
        }
    }
    let _ = abusive.flush();
    assert_eq!(expect_close(&mut abusive), Some(1008));
    assert_eq!(gw.metric("hivegate_abuse_closes_total"), 1.0);
    assert_eq!(
        gw.metric("hivegate_connections_closed_total{code=\"1008\"}"),
        1.0
    );
    // Same IP, other user: the refused requests cost the IP bucket nothing.
    let answers = burst(&mut polite, 10, "p");
    assert!(answers.iter().all(|a| a["op"] == "pong"), "{answers:?}");
}

#[test]
fn connection_churn_from_one_ip_gets_429() {
    let gw = Gateway::start("[server]\nmax_connections_per_ip = 100\n", &[]);
    let churner: IpAddr = "127.0.0.5".parse().unwrap();
    let mut refused = None;
    for attempt in 0..40 {
        match gw.ws_from(Some(churner), &[]) {
            Ok(ws) => drop(ws),
            Err(r) => {
                refused = Some((attempt, r));
                break;
            }
        }
    }
    let (attempt, r) = refused.expect("churn was never refused");
    // 20 at once, then 2 a second: the refusal comes right after the burst.
    assert!((20..=25).contains(&attempt), "refused at attempt {attempt}");
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        gw.metric("hivegate_connections_refused_total{reason=\"ip_rate\"}"),
        1.0
    );
    // Another address connects as usual.
    assert!(gw.ws_from(Some("127.0.0.6".parse().unwrap()), &[]).is_ok());
}

#[test]
fn rates_are_in_readyz_and_left_to_rate_in_metrics() {
    let gw = Gateway::start("", &[]);
    let (mut ws, _) = gw.session(None);
    burst(&mut ws, 5, "r");
    // Rates count complete seconds: wait for the second to end.
    let ready = || -> Value { serde_json::from_str(&gw.get("/readyz").body).unwrap() };
    gw.wait_until("a rate of messages in", || {
        ready()["rates"]["messages_in"]["60s"].as_f64() > Some(0.0)
    });
    let ready = ready();
    assert!(
        ready["rates"]["messages_out"]["10s"].as_f64() > Some(0.0),
        "{ready}"
    );
    for meter in [
        "messages_in",
        "messages_out",
        "connections",
        "refusals",
        "llm_calls",
    ] {
        for window in ["1s", "10s", "60s"] {
            assert!(ready["rates"][meter][window].is_number(), "{ready}");
        }
        // The operator view's sparkline: each of the last 60 seconds.
        let series = ready["rates"][meter]["last_60s"].as_array().unwrap();
        assert_eq!(series.len(), 60, "{ready}");
    }
    let seconds = |meter: &str| -> u64 {
        ready["rates"][meter]["last_60s"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .sum()
    };
    assert!(
        seconds("messages_in") >= 5 && seconds("connections") >= 1,
        "{ready}"
    );
    // What else the operator view draws: memory against its limit, and no
    // sync or bus on a box without them.
    assert!(ready["memory_limit_bytes"].is_u64(), "{ready}");
    assert!(
        ready["sync"].is_null() && ready["cluster"].is_null(),
        "{ready}"
    );
    // /metrics has the counters; rates there are PromQL's rate().
    let metrics = gw.get("/metrics").body;
    assert!(!metrics.contains("_per_second"), "{metrics}");
    assert!(gw.metric("hivegate_frames_received_total") >= 5.0);
}

#[test]
fn failed_hellos_put_an_address_on_a_cool_down() {
    let gw = Gateway::start("[auth]\ntokens = [\"alice:good-token-1\"]\n", &[]);
    let bad: std::net::IpAddr = "127.0.0.7".parse().unwrap();
    for _ in 0..5 {
        let mut ws = gw.ws_from(Some(bad), &[]).expect("upgrade");
        send_json(&mut ws, &serde_json::json!({"op":"hello","token":"wrong"}));
        assert_eq!(recv_json(&mut ws)["ok"], false);
        assert_eq!(expect_close(&mut ws), Some(4003));
    }
    let Err(refused) = gw.ws_from(Some(bad), &[]) else {
        panic!("the sixth upgrade was accepted");
    };
    assert_eq!(refused.status, 429);
    assert!(refused.header("retry-after").is_some());
    // Another address is not affected, and the tries were counted.
    let (_, ack) = gw.session(Some("good-token-1"));
    assert_eq!(ack["ok"], true);
    assert_eq!(gw.metric("hivegate_hello_failures_total"), 5.0);
    assert_eq!(
        gw.metric("hivegate_connections_refused_total{reason=\"hello_cooldown\"}"),
        1.0
    );
}
