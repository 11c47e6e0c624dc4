//! What a SIGHUP changes while every connection stays open: tokens, auth
//! mode, allowed origins, rate limits, the memory limit, upstream API keys (rotation
//! without a restart) and the TLS certificate. Sessions already signed in keep their user; a
//! removed token only stops new sign-ins.
//!
//! Everything else is fixed at start (sizes of tables and buffers, the
//! listen address, the store, the provider list...): a reload that changes
//! it names the section and says a restart applies it.

use super::Gateway;
use crate::auth::{AuthMode, Authenticator};
use crate::config::Config;
use crate::ops::metrics::inc;
use crate::redact::Redactor;

/// The settings a reload replaces, read on every admission and `hello`.
pub struct Live {
    pub auth: Authenticator,
    pub mode: AuthMode,
    pub origins: Vec<String>,
    /// Every key configured since start (old keys stay redacted).
    pub redact: Redactor,
}

impl Live {
    /// Whether a browser's `Origin` may connect (no `Origin`, or no list:
    /// yes).
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        origin.is_none_or(|o| self.origins.is_empty() || self.origins.iter().any(|a| a == o))
    }

    pub fn new(cfg: &Config) -> Live {
        Live {
            auth: Authenticator::new(cfg.auth.tokens.clone()),
            mode: cfg.auth.mode,
            origins: cfg.server.allowed_origins.clone(),
            redact: cfg.redactor(),
        }
    }
}

impl Gateway {
    /// Applies `new`'s reloadable settings; returns the sections that
    /// differ in what only a restart applies.
    pub fn reload(
        &self,
        new: &Config,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) -> Vec<&'static str> {
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
        needs_restart(&self.cfg, new)
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
    let (a, b) = (fixed(old), fixed(new));
    let mut out = Vec::new();
    let mut differ = |name: &'static str, x: String, y: String| {
        if x != y {
            out.push(name);
        }
    };
    differ(
        "server",
        format!("{:?}", a.server),
        format!("{:?}", b.server),
    );
    differ(
        "limits",
        format!("{:?}", a.limits),
        format!("{:?}", b.limits),
    );
    differ("pool", format!("{:?}", a.pool), format!("{:?}", b.pool));
    differ("store", format!("{:?}", a.store), format!("{:?}", b.store));
    differ("chat", format!("{:?}", a.chat), format!("{:?}", b.chat));
    differ("llm", format!("{:?}", a.llm), format!("{:?}", b.llm));
    differ(
        "remote",
        format!("{:?}", a.remote),
        format!("{:?}", b.remote),
    );
    differ(
        "cluster",
        format!("{:?}", a.cluster),
        format!("{:?}", b.cluster),
    );
    differ("log", format!("{:?}", a.log), format!("{:?}", b.log));
    out
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
    fn only_settings_a_reload_cannot_apply_are_named() {
        let old = cfg("[auth]\ntokens = [\"a:tok-a\"]\n");
        let reloadable = cfg("[auth]\ntokens = [\"b:tok-b\"]\n[server]\nallowed_origins = [\"https://x\"]\n[limits]\nuser_capacity = 3\n");
        assert!(needs_restart(&old, &reloadable).is_empty());
        let fixed = cfg("[auth]\ntokens = [\"a:tok-a\"]\n[server]\nmax_connections = 7\n[limits]\ntable_entries = 100\n");
        assert_eq!(needs_restart(&old, &fixed), vec!["server", "limits"]);
    }
}
