//! The probes: `/readyz` (can this box take clients now, and why not)
//! and `/metrics` (every module's counters, in the Prometheus text format).

use super::{Gateway, Response};
use crate::json::JsonOut;
use std::time::Instant;

/// Every module's counters and gauges, in the Prometheus text format.
pub fn metrics_page(gw: &Gateway) -> String {
    let mut body = String::with_capacity(8192);
    gw.metrics.render(&gw.gauges(), &mut body);
    gw.limits.borrow().render(&mut body);
    gw.pool.render(&mut body);
    gw.llm.render(&mut body);
    if let Some(r) = &gw.remote {
        r.render(&mut body);
    }
    if let Some(c) = &gw.cluster {
        c.render(&mut body);
    }
    let keys: Vec<&crate::upstream_key::UpstreamKey> = gw
        .llm
        .keys()
        .chain(gw.remote.iter().map(|r| r.key()))
        .collect();
    crate::upstream_key::render(&mut body, &keys);
    crate::resilience::render_breakers(&mut body, &all_breakers(gw), Instant::now());
    gw.memory.render(&mut body);
    body.push_str(&format!(
        "# HELP hivegate_build_info The running build.\n# TYPE hivegate_build_info gauge\n\
         hivegate_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        env!("BUILD_GIT_COMMIT")
    ));
    crate::ops::metrics::gauge(
        &mut body,
        "hivegate_store_write_queue",
        "Writes waiting for the next group commit.",
        gw.store.queued() as u64,
    );
    gw.chat.render(&mut body);
    crate::ops::metrics::counter_with(
        &mut body,
        "hivegate_mcp_requests_total",
        "MCP requests, by transport.",
        "transport",
        &[
            ("http", gw.metrics.mcp_requests.get()),
            ("ws", gw.metrics.mcp_requests_ws.get()),
        ],
    );
    crate::ops::metrics::counter(
        &mut body,
        "hivegate_openai_requests_total",
        "Requests to the OpenAI-compatible endpoint (/v1/).",
        gw.metrics.openai_requests.get(),
    );
    let sessions = gw.mcp.borrow();
    crate::ops::metrics::gauge(
        &mut body,
        "hivegate_mcp_sessions",
        "Open MCP sessions.",
        sessions.len() as u64,
    );
    crate::ops::metrics::counter(
        &mut body,
        "hivegate_mcp_sessions_evicted_total",
        "MCP sessions closed because the table was full (the one idle longest).",
        sessions.evicted,
    );
    crate::ops::process::render(&mut body);
    body
}

/// `/readyz`: the status and mode for everyone (the web page shows them);
/// with `detail` (the admin listener), connections, memory, breakers and
/// rates too.
pub fn readyz(gw: &Gateway, detail: bool) -> Response {
    let g = gw.gauges();
    let status = if g.draining {
        "draining"
    } else if gw.memory.shedding_now(Instant::now()) {
        "shedding"
    } else {
        "ready"
    };
    let public = JsonOut::new().str("status", status).str("mode", gw.mode());
    if !detail {
        return Response::new(
            if status == "ready" { 200 } else { 503 },
            "application/json",
            public.finish() + "\n",
        );
    }
    let body = public
        .str("storage", if gw.store.is_full() { "full" } else { "ok" })
        .num("connections", g.connections_open as u64)
        .num("capacity", g.table_capacity as u64)
        .num("rss_bytes", gw.memory.rss())
        .num("memory_limit_bytes", gw.memory.limit().unwrap_or(0))
        .raw("breakers", &breakers_json(gw))
        .raw(
            "sync",
            &gw.remote.as_ref().map_or("null".into(), |r| r.json()),
        )
        .raw(
            "cluster",
            &gw.cluster.as_ref().map_or("null".into(), |c| c.json()),
        )
        .raw("rates", &rates_json(gw))
        .finish();
    Response::new(
        if status == "ready" { 200 } else { 503 },
        "application/json",
        body + "\n",
    )
}

/// The gateway's meters and the relay's, for `/readyz`.
fn rates_json(gw: &Gateway) -> String {
    let mut llm = gw.llm.calls_meter.borrow_mut();
    gw.meters
        .borrow_mut()
        .json(Instant::now(), [("llm_calls", &mut *llm)])
}

/// Every breaker's state, by service, for `/readyz`.
fn breakers_json(gw: &Gateway) -> String {
    let now = Instant::now();
    all_breakers(gw)
        .iter()
        .fold(JsonOut::new(), |out, (service, b)| {
            out.str(service, b.state(now).label())
        })
        .finish()
}

/// Every circuit breaker, by service: the providers', then the remote's.
fn all_breakers(gw: &Gateway) -> Vec<(String, crate::resilience::Breaker)> {
    let mut breakers = gw.llm.breakers();
    if let Some(r) = &gw.remote {
        breakers.push(("remote".to_string(), r.breaker.borrow().clone()));
    }
    if let Some(c) = &gw.cluster {
        breakers.push(("bus".to_string(), c.breaker.borrow().clone()));
    }
    breakers
}
