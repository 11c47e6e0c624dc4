//! What a SIGHUP changes while every connection stays open: tokens, auth
//! mode, allowed origins, rate limits, the memory limit, upstream API keys (rotation
//! without a restart) and the TLS certificate. Sessions already signed in keep their user; a
//! removed token only stops new sign-ins.
//!
//! Everything else is fixed at start (sizes of tables and buffers, the
//! listen address, the store, the provider list...): a reload that changes
//! it names the section and says a restart applies it.

use super::Gateway;
use crate::access::{Action, Denied, Rules};
use crate::auth::{AuthMode, Authenticator, Identity};
use crate::config::Config;
use crate::hub::frame;
use crate::json::JsonOut;
use crate::jwt::JwtConfig;
use crate::ops::metrics::inc;
use crate::ops::metrics::Denial;
use crate::protocol::ErrorCode;
use crate::redact::Redactor;
use std::rc::Rc;

/// The settings a reload replaces, read on every admission and `hello`.
pub struct Live {
    pub auth: Authenticator,
    pub mode: AuthMode,
    pub jwt: JwtConfig,
    pub rules: Rules,
    pub origins: Vec<String>,
    /// `server.hostnames`.
    pub hostnames: Vec<String>,
    /// Every key configured since start (old keys stay redacted).
    pub redact: Redactor,
}

/// Why a presented token signs nobody in (for the log; the client is
/// told only that it was refused).
pub type SignInRefused = &'static str;

impl Live {
    /// Who `token` signs in as: a configured token (in every mode), or in
    /// jwt mode a valid JWT.
    pub fn sign_in(&self, token: &str) -> Result<Identity, SignInRefused> {
        if let Some(who) = self.auth.identify(token) {
            return Ok(who);
        }
        if self.mode != AuthMode::Jwt {
            return Err("unknown token");
        }
        let now = crate::clock::unix_ms().max(0) as u64 / 1000;
        crate::jwt::verify(&self.jwt, token, now).map_err(|r| r.label())
    }

    /// Who a session without a token is: a guest in open mode, nobody
    /// otherwise.
    pub fn anonymous(&self, client_id: Option<&str>) -> Option<Identity> {
        (self.mode == AuthMode::Open).then(|| Identity::guest(client_id))
    }

    /// Whether a browser's `Origin` may connect: no `Origin` (not a
    /// browser), one of `allowed_origins`, or with no list, one whose host
    /// is this box's (see [`Live::host_allowed`]).
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let Some(o) = origin else {
            return true;
        };
        if !self.origins.is_empty() {
            return self.origins.iter().any(|a| a == o);
        }
        let host = o
            .strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"));
        host.is_some_and(|h| self.host_allowed(Some(h)))
    }

    /// Whether a `Host` header names this box: an IP address (a browser
    /// never sends one for a name it resolved, so DNS rebinding cannot
    /// produce it), `localhost`, or one of `server.hostnames`. A request
    /// without `Host` is not from a browser and passes.
    pub fn host_allowed(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            return true;
        };
        let name = strip_port(host).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.hostnames.iter().any(|h| h == name)
    }

    pub fn new(cfg: &Config) -> Live {
        Live {
            auth: Authenticator::new(cfg.auth.tokens.clone()),
            mode: cfg.auth.mode,
            jwt: cfg.auth.jwt.clone(),
            rules: Rules::new(cfg.access.clone()),
            origins: cfg.server.allowed_origins.clone(),
            hostnames: cfg.server.hostnames.clone(),
            redact: cfg.redactor(),
        }
    }
}

/// `host:port`, `[v6]:port`, `[v6]` or `host` → the host.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl Gateway {
    /// Applies `new`'s reloadable settings; returns the sections that
    /// differ in what only a restart applies. A configuration that would
    /// change the sign-in mode without saying so (an empty file, or one
    /// that lost its `[auth]`, read on a loopback address, infers open
    /// mode) is refused as a whole: the error says what to write.
    pub fn reload(
        &self,
        new: &Config,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) -> Result<Vec<&'static str>, String> {
        let running = self.live.borrow().mode;
        if new.auth.mode != running && !new.auth.mode_explicit {
            return Err(format!(
                "the new configuration does not set auth.mode, and without it the mode would \
                 change from {} to {}; write auth.mode = \"{}\" under [auth] to make that \
                 change, or restore the [auth] settings",
                running.label(),
                new.auth.mode.label(),
                new.auth.mode.label()
            ));
        }
        let redact = self.live.borrow().redact.merged(&new.redactor());
        *self.live.borrow_mut() = Live {
            redact: redact.clone(),
            ..Live::new(new)
        };
        self.limits.borrow_mut().retune(&new.limits);
        self.memory.set_limit(new.server.memory_limit_bytes);
        self.llm.reload_keys(&new.llm, redact.clone());
        if let (Some(r), Some(cfg)) = (&self.remote, &new.remote) {
            r.reload_key(cfg, redact);
        }
        // A certificate renewed in place, or moved: the next handshake
        // uses it. Turning TLS on or off needs a restart.
        if let (Some(t), Some(config)) = (&self.tls, tls) {
            t.replace(config);
        }
        inc(&self.metrics.reloads);
        self.recheck_rooms();
        Ok(needs_restart(&self.cfg, new))
    }

    /// After new rules: every session taken out of the rooms it may no
    /// longer join, told with a `left` and a `FORBIDDEN` error. It stays
    /// connected, in the rooms it may still be in.
    fn recheck_rooms(&self) {
        let live = self.live.borrow();
        if live.rules.is_empty() {
            return;
        }
        let revoked: Vec<(Rc<str>, usize, u64, Denied)> = {
            let table = self.table.borrow();
            self.chat
                .memberships()
                .into_iter()
                .filter_map(|(room, key)| {
                    let e = table.get(key)?;
                    let who = e.who.as_ref()?;
                    let denied = live.rules.room(who, &room, Action::Join).err()?;
                    Some((room, key, e.id, denied))
                })
                .collect()
        };
        for (room, key, id, denied) in &revoked {
            self.chat.leave(room, *key);
            self.metrics.denied(Denial::Revoked);
            let left = JsonOut::op("left")
                .str("room", room)
                .str("reason", "forbidden")
                .finish();
            let msg = format!("you may no longer be in room {room}: {}", denied.describe());
            let error = crate::protocol::error_frame(None, ErrorCode::Forbidden, &msg, None);
            let mut table = self.table.borrow_mut();
            table.deliver_to(*key, *id, &frame(left));
            table.deliver_to(*key, *id, &frame(error));
        }
        if !revoked.is_empty() {
            self.log.info(
                "reload: sessions taken out of rooms the new access rules do not allow",
                &[("memberships", &revoked.len())],
            );
        }
    }

    /// A reload that found the new configuration invalid: counted; the
    /// caller logs why.
    pub fn reload_failed(&self) {
        inc(&self.metrics.reloads_failed);
    }
}

/// The sections of `new` that differ from `old` in settings a reload
/// does not apply. Compared through `Debug`, which shows no secret (keys
/// are reloadable, and `Secret` prints nothing of itself anyway).
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let fixed = |c: &Config| {
        let mut c = c.clone();
        c.server.allowed_origins.clear();
        c.server.hostnames.clear();
        c.server.memory_limit_bytes = 0;
        // Only whether TLS is on is fixed; the files are re-read.
        let on = c
            .server
            .tls_cert_file
            .is_some()
            .then(std::path::PathBuf::new);
        c.server.tls_cert_file = on.clone();
        c.server.tls_key_file = on;
        c.auth = Default::default();
        c.access.clear();
        c.limits = crate::limit::LimitParams {
            table_entries: c.limits.table_entries,
            ..Default::default()
        };
        for p in &mut c.llm.providers {
            (p.api_key, p.api_key_env, p.api_key_file) = (None, None, None);
        }
        if let Some(r) = &mut c.remote {
            (r.api_key, r.api_key_env, r.api_key_file) = (None, None, None);
        }
        c
    };
    let sections = |c: &Config| {
        [
            ("server", format!("{:?}", c.server)),
            ("limits", format!("{:?}", c.limits)),
            ("pool", format!("{:?}", c.pool)),
            ("store", format!("{:?}", c.store)),
            ("chat", format!("{:?}", c.chat)),
            ("mcp", format!("{:?}", c.mcp)),
            ("llm", format!("{:?}", c.llm)),
            ("remote", format!("{:?}", c.remote)),
            ("cluster", format!("{:?}", c.cluster)),
            ("log", format!("{:?}", c.log)),
        ]
    };
    let (a, b) = (sections(&fixed(old)), sections(&fixed(new)));
    a.into_iter()
        .zip(b)
        .filter(|(x, y)| x.1 != y.1)
        .map(|(x, _)| x.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::from_text(Some((std::path::Path::new("t.toml"), text)), &[])
            .unwrap()
            .0
    }

    #[test]
    fn hosts_and_origins_must_name_this_box() {
        let live = Live::new(&cfg("[server]\nhostnames = [\"chat.example.org\"]\n"));
        for ok in [
            None,
            Some("127.0.0.1:8080"),
            Some("[::1]:8080"),
            Some("192.168.1.5"),
            Some("localhost:8080"),
            Some("Chat.Example.Org"),
            Some("chat.example.org.:443"),
        ] {
            assert!(live.host_allowed(ok), "{ok:?}");
        }
        for bad in [
            Some("evil.example"),
            Some("evil.example:8080"),
            Some("127.0.0.1.evil.example"),
            Some(""),
        ] {
            assert!(!live.host_allowed(bad), "{bad:?}");
        }
        assert!(live.origin_allowed(None));
        assert!(live.origin_allowed(Some("http://127.0.0.1:8080")));
        assert!(live.origin_allowed(Some("https://chat.example.org")));
        assert!(!live.origin_allowed(Some("http://evil.example")));
        assert!(!live.origin_allowed(Some("null")));
        let listed = Live::new(&cfg(
            "[server]\nallowed_origins = [\"https://app.example\"]\n",
        ));
        assert!(listed.origin_allowed(Some("https://app.example")));
        assert!(!listed.origin_allowed(Some("http://127.0.0.1:8080")));
    }

    #[test]
    fn only_settings_a_reload_cannot_apply_are_named() {
        let old = cfg("[auth]\ntokens = [\"a:tok-a\"]\n");
        let reloadable = cfg("[auth]\ntokens = [\"b:tok-b\"]\n[server]\nallowed_origins = [\"https://x\"]\n[limits]\nuser_capacity = 3\n");
        assert!(needs_restart(&old, &reloadable).is_empty());
        let fixed = cfg("[auth]\ntokens = [\"a:tok-a\"]\n[server]\nmax_connections = 7\n[limits]\ntable_entries = 100\n");
        assert_eq!(needs_restart(&old, &fixed), vec!["server", "limits"]);
    }

    /// `fixtures/config/box-a.key`'s public key, as `hivegate genkey` prints it.
    /// A copy of a secret fixture only its owner may read (as the
    /// gateway requires), its path quoted as TOML wants it. The copies
    /// live as long as the test process.
    fn secret(rel: &str) -> &'static str {
        let dir: &'static tempfile::TempDir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
        let path = dir.path().join(rel.replace('/', "-"));
        crate::ops::file::private_copy(&std::path::Path::new("fixtures").join(rel), &path).unwrap();
        Box::leak(format!("{:?}", path.display().to_string()).into_boxed_str())
    }

    const TRUSTED: &str = "[\"a:aqWFhsiNoCxlblBzQohOWG9v_55353gf6hLmvzvVHRw\"]";

    /// Each key's `reloadable` flag is what a reload does with it: a
    /// change to that key alone leaves nothing for a restart exactly
    /// when the flag says a SIGHUP applies it.
    #[test]
    fn every_keys_reload_flag_is_what_a_reload_does() {
        let env = [("KEY_A", "sk-a"), ("KEY_B", "sk-b")].map(|(k, v)| (k.into(), v.into()));
        // Every section present (each key has a home), files from fixtures.
        let base: &[(&str, &[(&str, &str)])] = &[
            (
                "[server]",
                &[
                    ("tls_cert_file", "\"fixtures/tls/server1.pem\""),
                    ("tls_key_file", secret("tls/server1.key")),
                ],
            ),
            ("[auth]", &[("tokens", "[\"a:tok-aaaaaaaaaaaa\"]")]),
            ("[pool]", &[]),
            ("[store]", &[]),
            ("[chat]", &[]),
            ("[mcp]", &[]),
            ("[limits]", &[]),
            ("[llm]", &[]),
            ("[log]", &[]),
            (
                "[provider.p]",
                &[
                    ("base_url", "\"http://127.0.0.1:9/v1\""),
                    ("model", "\"m\""),
                ],
            ),
            (
                "[provider.q]",
                &[
                    ("base_url", "\"http://127.0.0.1:9/v1\""),
                    ("model", "\"m\""),
                ],
            ),
            ("[remote]", &[("url", "\"http://127.0.0.1:9\"")]),
            (
                "[cluster]",
                &[
                    ("nats_url", "[\"nats://127.0.0.1:4222\"]"),
                    ("node_id", "\"a\""),
                ],
            ),
            (
                "[[access]]",
                &[
                    ("roles", "[\"*\"]"),
                    ("rooms", "[\"*\"]"),
                    ("can", "[\"join\"]"),
                ],
            ),
        ];
        // Keys that only go with another: changed together.
        let companion = |key: &str| match key {
            "cluster.signing_key_file" => Some(("trusted_keys", TRUSTED)),
            "cluster.trusted_keys" => Some(("signing_key_file", secret("config/box-a.key"))),
            "access.N.llm_tokens_per_day" => Some(("providers", "[\"*\"]")),
            "server.proxy_protocol" => Some(("trusted_proxies", "[\"127.0.0.1\"]")),
            _ => None,
        };
        let text = |change: Option<(&str, &str, &str)>, with: Option<(&str, &str)>| {
            let mut out = String::new();
            let mut placed = false;
            for (header, lines) in base {
                out.push_str(header);
                out.push('\n');
                for (k, v) in lines.iter() {
                    match change {
                        Some((h, ck, cv)) if h == *header && ck == *k => {
                            out.push_str(&format!("{k} = {cv}\n"));
                            placed = true;
                        }
                        _ => out.push_str(&format!("{k} = {v}\n")),
                    }
                }
                if let Some((h, ck, cv)) = change {
                    if h == *header && !placed {
                        out.push_str(&format!("{ck} = {cv}\n"));
                        if let Some((wk, wv)) = with {
                            out.push_str(&format!("{wk} = {wv}\n"));
                        }
                        placed = true;
                    }
                }
            }
            out
        };
        let load = |t: &str| Config::from_text(Some((std::path::Path::new("t.toml"), t)), &env);
        let old = load(&text(None, None)).unwrap().0;
        let shown = format!("{old:?}");
        let pool = [
            "\"normal\"",
            "\"off\"",
            "\"warn\"",
            "\"json\"",
            "\"open\"",
            "\"127.0.0.1:8090\"",
            "\"http://127.0.0.1:10/v1\"",
            "\"nats://127.0.0.1:4223\"",
            "\"KEY_B\"",
            "\"b\"",
            "\"fixtures/tls/server2.pem\"",
            secret("tls/server2.key"),
            "\"fixtures/tls/ca.pem\"",
            secret("config/kimi.key"),
            secret("config/box-a.key"),
            secret("config/nats.creds"),
            "\"fixtures/jwt/rsa-jwk.json\"",
            "\"./other-data\"",
            "[\"example.org\"]",
            "[\"https://app.example\"]",
            "[\"b:tok-bbbbbbbbbbbb\"]",
            "[\"staff\"]",
            "[\"join\", \"publish\"]",
            "[\"authenticated\"]",
            "[\"q\"]",
            "[\"10.0.0.0/8\"]",
            TRUSTED,
            "1000",
            "true",
        ];
        // Only one value is possible so far: nothing to change them to.
        const ONE_VALUE: &[&str] = &["provider.NAME.dialect"];
        let (mut wrong, mut untried) = (Vec::new(), Vec::new());
        for key in crate::config::keys() {
            let name = key.name.replace("NAME", "p").replace(".N.", ".1.");
            let (section, field) = name.rsplit_once('.').unwrap();
            let header = match section {
                "access.1" => "[[access]]".to_string(),
                s => format!("[{s}]"),
            };
            let mut candidates: Vec<String> = Vec::new();
            if let Ok(n) = key.default.parse::<i64>() {
                candidates.extend([n + 1, n - 1, 1, 2].map(|v| v.to_string()));
            }
            match key.default {
                "true" => candidates.push("false".into()),
                "false" => candidates.push("true".into()),
                _ => {}
            }
            candidates.extend(pool.iter().map(|c| c.to_string()));
            let changed = candidates.iter().find_map(|c| {
                let changed = text(Some((&header, field, c)), companion(key.name));
                let cfg = load(&changed).ok()?.0;
                (format!("{cfg:?}") != shown).then_some(cfg)
            });
            let Some(new) = changed else {
                if !ONE_VALUE.contains(&key.name) {
                    untried.push(key.name);
                }
                continue;
            };
            let restart = needs_restart(&old, &new);
            if restart.is_empty() != key.reloadable {
                wrong.push(format!(
                    "{}: reloadable = {}, but a reload {}",
                    key.name,
                    key.reloadable,
                    if restart.is_empty() {
                        "applies it".to_string()
                    } else {
                        format!("leaves {restart:?} for a restart")
                    }
                ));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
        assert!(
            untried.is_empty(),
            "no value changed these keys: {untried:?}"
        );
    }
}
