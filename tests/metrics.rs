//! `/metrics` by Prometheus' conventions, and what ships to watch it: a
//! busy gateway's output passes `promtool check metrics` and has its
//! latency histograms filled; `packaging/prometheus/alerts.yml` passes
//! `promtool check rules` and its unit tests; the Grafana dashboard and
//! the alerts use only families the gateway exports, and between them
//! cover every one of its own.

mod common;
use common::fake_openai::{ok_stream, transcript, FakeOpenAi};
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A gateway with a provider, a remote and a cluster section (so every
/// family is rendered), after a session that joined, published, reacted
/// and called the LLM; its `/metrics` text.
fn busy_metrics() -> String {
    let fake = FakeOpenAi::start(ok_stream(transcript("hello.txt")));
    let cfg = format!(
        "[provider.kimi]\nbase_url = \"{}\"\nmodel = \"m\"\napi_key_env = \"FAKE_KEY\"\n\
         [remote]\nurl = \"http://127.0.0.1:9\"\napi_key_env = \"FAKE_KEY\"\n\
         [cluster]\nnats_url = [\"nats://127.0.0.1:9\"]\nnode_id = \"box-a\"\n",
        fake.base_url()
    );
    let gw = Gateway::start(&cfg, &[("FAKE_KEY", "sk-metrics")]);
    let (mut ws, _) = gw.session(None);
    send_json(&mut ws, &json!({"op":"join","room":"r","request_id":"j"}));
    let until = |ws: &mut Ws, what: &dyn Fn(&Value) -> bool| loop {
        let v = recv_json(ws);
        if what(&v) {
            return v;
        }
    };
    until(&mut ws, &|v| v["op"] == "joined");
    for i in 0..5 {
        send_json(
            &mut ws,
            &json!({"op":"publish","room":"r","text":format!("m{i}"),"request_id":format!("p{i}")}),
        );
        until(&mut ws, &|v| v["op"] == "message");
    }
    send_json(
        &mut ws,
        &json!({"op":"call_tool","request_id":"t","name":"chat","arguments":{"messages":[{"role":"user","content":"hi"}]}}),
    );
    until(&mut ws, &|v| v["op"] == "call_tool_res");
    gw.get("/metrics").body
}

/// The value of the series `name` (labels included) in `text`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// Every family `# TYPE` declares in `text`.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

#[test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool is not installed (apt install prometheus)"
)]
fn a_busy_gateways_metrics_pass_promtool_and_fill_the_histograms() {
    let text = busy_metrics();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for series in [
        "hivegate_handshake_seconds_count",
        "hivegate_publish_ack_seconds_count",
        "hivegate_fanout_lag_seconds_count",
        "hivegate_llm_first_byte_seconds_count{provider=\"kimi\"}",
        "hivegate_llm_call_seconds_count{provider=\"kimi\"}",
    ] {
        assert!(value(&text, series) >= 1.0, "{series} is empty");
    }
    assert!(value(&text, "hivegate_publish_ack_seconds_count") >= 5.0);
    assert_eq!(
        value(
            &text,
            "hivegate_breaker_state{service=\"kimi\",state=\"closed\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "hivegate_breaker_state{service=\"kimi\",state=\"open\"}"
        ),
        0.0
    );
    // What rate() and the process collector already give is not repeated.
    for gone in [
        "_per_second",
        "hivegate_memory_rss_bytes",
        "_bytes_in",
        "_bytes_out",
    ] {
        assert!(!text.contains(gone), "{gone} is back in /metrics");
    }
}

#[test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool is not installed (apt install prometheus)"
)]
fn the_alerts_pass_promtool_and_their_unit_tests() {
    let dir = root().join("packaging/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        run_ok(Command::new("promtool").args(args).current_dir(&dir));
    }
}

/// The `hivegate_*` and `process_*` names an expression text uses, each
/// cut back to its family (histogram series to the histogram).
fn used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("hivegate_") || rest.starts_with("process_") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            i += name.len();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| f.ends_with("_seconds")))
                .unwrap_or(&name)
                .to_string();
            out.insert(family);
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    out
}

#[test]
fn the_dashboard_and_alerts_use_real_families_and_cover_them_all() {
    let dashboard =
        std::fs::read_to_string(root().join("packaging/grafana/hivegate.json")).unwrap();
    let parsed: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 10));
    let mut exprs = String::new();
    for panel in parsed["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push_str(target["expr"].as_str().unwrap_or(""));
            exprs.push('\n');
        }
    }
    let alerts = std::fs::read_to_string(root().join("packaging/prometheus/alerts.yml")).unwrap();
    let text = busy_metrics();
    let exported = families(&text);
    let watched: BTreeSet<String> = used(&exprs).union(&used(&alerts)).cloned().collect();
    let unknown: Vec<&String> = watched.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "watched but never exported: {unknown:?}"
    );
    let unwatched: Vec<&String> = exported
        .iter()
        .filter(|f| f.starts_with("hivegate_"))
        .filter(|f| !watched.contains(*f))
        .collect();
    assert!(
        unwatched.is_empty(),
        "exported but on no panel and in no alert: {unwatched:?}"
    );
}

#[test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool is not installed (apt install prometheus)"
)]
fn every_dashboard_query_is_valid_promql() {
    // Each panel's query as a recording rule, Grafana's variables given
    // values, for promtool to parse.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("packaging/grafana/hivegate.json")).unwrap(),
    )
    .unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:query{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard.yml");
    std::fs::write(&path, rules).unwrap();
    // A query that is not PromQL fails the check.
    run_ok(Command::new("promtool").args(["check", "rules"]).arg(&path));
    assert!(n >= 30, "only {n} queries");
}
