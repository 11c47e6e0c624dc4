//! Admission of a WebSocket upgrade: the checks run before a connection
//! exists, cheapest and most telling first (shape, drain, memory, origin,
//! rates, failed sign-ins, caps, token), so a refusal costs one response
//! and never a slot.

use super::http::{self, Response};
use super::{refuse, retry_after, Gateway, Slot, RETRY_AFTER_S};
use crate::ops::metrics::Refusal;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

/// Decides whether an upgrade request gets a connection, in the order the
/// checks are cheapest and most telling: shape, drain, origin, capacity,
/// token. On success the slot is taken.
pub(super) fn admit(
    gw: &Rc<Gateway>,
    head: &http::Head,
    ip: IpAddr,
) -> Result<(Slot, Option<Rc<crate::auth::Identity>>), Response> {
    let bad_request = |why: &str| refuse(gw, Refusal::BadRequest, ip, Response::text(400, why));
    if !(head.upgrade_websocket && head.connection_upgrade && head.ws_key.is_some()) {
        return Err(bad_request("expected a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade, Sec-WebSocket-Key)\n"));
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(refuse(
            gw,
            Refusal::BadRequest,
            ip,
            Response::text(426, "only WebSocket version 13 is supported\n")
                .header("Sec-WebSocket-Version", "13"),
        ));
    }
    // RFC 6455 4.2.1: the key is the base64 of 16 bytes.
    if !head.ws_key.as_deref().is_some_and(http::valid_ws_key) {
        return Err(bad_request(
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes\n",
        ));
    }
    let retry = || RETRY_AFTER_S.to_string();
    if gw.draining.get() {
        return Err(refuse(
            gw,
            Refusal::Draining,
            ip,
            Response::text(503, "shutting down\n").header("Retry-After", retry()),
        ));
    }
    if gw.memory.shedding_now(Instant::now()) {
        return Err(refuse(
            gw,
            Refusal::Memory,
            ip,
            Response::text(503, "shedding load: memory is over its limit\n")
                .header("Retry-After", retry()),
        ));
    }
    if !gw.live.borrow().origin_allowed(head.origin.as_deref()) {
        return Err(refuse(
            gw,
            Refusal::Origin,
            ip,
            Response::text(403, "origin not allowed\n"),
        ));
    }
    if let Err(wait) = gw.limits.borrow_mut().check_connect(Instant::now(), ip) {
        return Err(refuse(
            gw,
            Refusal::IpRate,
            ip,
            Response::text(429, "too many new connections from your address\n")
                .header("Retry-After", retry_after(wait)),
        ));
    }
    gw.sign_in_cooldown(ip)?;
    let full = gw.table.borrow().check(ip);
    if let Err(full) = full {
        return Err(gw.cap_refusal(full, ip));
    }
    if head.ws_bearer.is_some() && !(head.ws_mcp || head.ws_op) {
        // The token must not be the protocol the server picks (it would
        // be echoed back), and a browser fails an upgrade that picks none.
        return Err(bad_request(
            "offer a bearer.TOKEN subprotocol beside `hivegate` (the op protocol) or `mcp`\n",
        ));
    }
    let user = match head.bearer.as_ref().or(head.ws_bearer.as_ref()) {
        Some(token) => Some(gw.sign_in_or_401(ip, token)?),
        None => None,
    };
    // An MCP client has no `hello`: its token comes with the upgrade.
    if head.ws_mcp && user.is_none() && gw.live.borrow().mode != crate::auth::AuthMode::Open {
        gw.failed_sign_in(ip, "missing token");
        return Err(refuse(
            gw,
            Refusal::Unauthorized,
            ip,
            Response::text(
                401,
                "the mcp subprotocol needs Authorization: Bearer TOKEN (or a bearer.TOKEN subprotocol)\n",
            )
            .header("WWW-Authenticate", "Bearer"),
        ));
    }
    let id = gw.next_conn_id.get();
    let key = gw
        .table
        .borrow_mut()
        .insert(ip, id, Instant::now())
        .map_err(|_| {
            // check() passed on this same thread a moment ago; keep a sane
            // answer anyway.
            Response::text(503, "gateway full\n").header("Retry-After", retry())
        })?;
    gw.next_conn_id.set(id + 1);
    Ok((
        Slot {
            gw: gw.clone(),
            key,
            id,
            ip,
        },
        user,
    ))
}
