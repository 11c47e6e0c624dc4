//! Admission of a WebSocket upgrade: the checks run before a connection
//! exists, cheapest and most telling first (shape, drain, memory, origin,
//! rates, failed sign-ins, caps, token), so a refusal costs one response
//! and never a slot. The checks every surface shares (a token signing in,
//! the failed sign-ins' cooldown, the caps' refusal, the rate limits)
//! are here too, for the HTTP APIs' requests (`request.rs`).

use super::http::{self, Response};
use super::{refuse, retry_after, Gateway, Slot, RETRY_AFTER_S};
use crate::hub::Full;
use crate::limit::Refused;
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

impl Gateway {
    /// Who a token given with a request (`Authorization`, a `bearer.`
    /// subprotocol entry) signs in; or the `401` that refuses it, counted
    /// as a failed sign-in.
    pub(super) fn sign_in_or_401(
        &self,
        ip: IpAddr,
        token: &str,
    ) -> Result<Rc<crate::auth::Identity>, Response> {
        let signed = self.live.borrow().sign_in(token);
        signed.map(Rc::new).map_err(|reason| {
            self.failed_sign_in(ip, reason);
            refuse(
                self,
                Refusal::Unauthorized,
                ip,
                Response::text(401, "bad token\n").header("WWW-Authenticate", "Bearer"),
            )
        })
    }

    /// `429` while `ip` is past its failed sign-ins (on every surface).
    pub(super) fn sign_in_cooldown(&self, ip: IpAddr) -> Result<(), Response> {
        let failed = self
            .limits
            .borrow_mut()
            .check_failed_hellos(Instant::now(), ip);
        failed.map_err(|wait| {
            refuse(
                self,
                Refusal::HelloCooldown,
                ip,
                Response::text(429, "too many failed sign-ins from your address\n")
                    .header("Retry-After", retry_after(wait)),
            )
        })
    }

    /// The answer when a connection cap is full: `503` for the gateway,
    /// `429` for the address.
    pub(super) fn cap_refusal(&self, full: Full, ip: IpAddr) -> Response {
        let retry = RETRY_AFTER_S.to_string();
        match full {
            Full::Global => refuse(
                self,
                Refusal::GlobalCap,
                ip,
                Response::text(503, "gateway full\n").header("Retry-After", retry),
            ),
            Full::Ip => refuse(
                self,
                Refusal::IpCap,
                ip,
                Response::text(429, "too many connections from your address\n")
                    .header("Retry-After", retry),
            ),
        }
    }

    /// The three rate limits, for one request of `user` from `ip` on any
    /// surface; a refusal is counted on the refusal meter.
    pub(crate) fn rate_check(
        &self,
        now: Instant,
        ip: IpAddr,
        user: &Rc<str>,
    ) -> Result<(), Refused> {
        let checked = self.limits.borrow_mut().check(now, ip, user);
        if checked.is_err() {
            self.meters.borrow_mut().refusals.record(now);
        }
        checked
    }

    /// A token that signed nobody in, on any surface: counted against
    /// the address's failed sign-ins (past the limit its attempts get 429).
    pub(super) fn failed_sign_in(&self, ip: IpAddr, reason: &str) {
        self.limits
            .borrow_mut()
            .note_failed_hello(Instant::now(), ip);
        self.log.info(
            "sign-in refused",
            &[("ip", &ip), ("reason", &reason.to_string())],
        );
    }
}
