//! An upstream's API key, swappable while calls go on: key rotation
//! without a restart (SIGHUP re-reads `api_key_file`), with an audit trail
//! that never holds the key itself.
//!
//! A key is known to logs and metrics by its *id*: `sha256:` and the first
//! 8 hex digits of its SHA-256. That tells an operator which key a box is
//! using (compare it with `printf %s "$KEY" | sha256sum`) and says nothing
//! useful about a real key's value. Each call counts against the id in use,
//! so `/metrics` shows when the old key stopped being used.

use crate::auth::Secret;
use crate::ops::log::Logger;
use std::cell::RefCell;
use std::fmt::Write;

/// Key ids whose call counts are kept per upstream. Past it, the oldest
/// id's line leaves `/metrics` (a counter that stopped moving long ago).
const REMEMBERED: usize = 4;

/// `sha256:` and the first 8 hex digits of the key's digest.
pub fn key_id(secret: &Secret) -> String {
    let d = crate::auth::sha256(secret.expose().as_bytes());
    let mut id = String::from("sha256:");
    for b in &d[..4] {
        let _ = write!(id, "{b:02x}");
    }
    id
}

struct Active {
    secret: Secret,
    id: String,
}

pub struct UpstreamKey {
    /// `provider.kimi`, `remote`.
    upstream: String,
    current: RefCell<Option<Active>>,
    /// Calls and refusals (401, 403) per key id, oldest first.
    calls: RefCell<Vec<(String, u64, u64)>>,
    log: Logger,
}

impl UpstreamKey {
    /// `source` names where the key came from (`env KIMI_KEY`,
    /// `file /run/...`), for the log line.
    pub fn new(upstream: &str, key: Option<Secret>, source: &str, log: Logger) -> UpstreamKey {
        let k = UpstreamKey {
            upstream: upstream.to_string(),
            current: RefCell::new(None),
            calls: RefCell::new(Vec::new()),
            log,
        };
        k.replace(key, source);
        k
    }

    /// The key for one call, counted against its id.
    pub fn for_call(&self) -> Option<Secret> {
        let current = self.current.borrow();
        let active = current.as_ref()?;
        let mut calls = self.calls.borrow_mut();
        match calls.iter_mut().find(|(id, ..)| *id == active.id) {
            Some((_, n, _)) => *n += 1,
            None => {
                if calls.len() == REMEMBERED {
                    calls.remove(0);
                }
                calls.push((active.id.clone(), 1, 0));
            }
        }
        Some(active.secret.clone())
    }

    /// The upstream refused the key with id `id` (401, 403): counted
    /// against it, and logged with its id (never the key).
    pub fn refused(&self, id: &str) {
        if let Some((_, _, n)) = self.calls.borrow_mut().iter_mut().find(|(k, ..)| k == id) {
            *n += 1;
        }
        self.log.warn(
            "upstream refused its key",
            &[("upstream", &self.upstream), ("key", &id.to_string())],
        );
    }

    /// The id of the key in use.
    pub fn id(&self) -> Option<String> {
        self.current.borrow().as_ref().map(|a| a.id.clone())
    }

    /// Puts `key` in use for the next call; logs one line when that
    /// changes which key is used. Calls already sent finish with the old.
    pub fn replace(&self, key: Option<Secret>, source: &str) {
        let new = key.map(|secret| Active {
            id: key_id(&secret),
            secret,
        });
        let old = self.id();
        let new_id = new.as_ref().map(|a| a.id.clone());
        if old == new_id {
            return;
        }
        let none = "none".to_string();
        let (was, now) = (old.unwrap_or_else(|| none.clone()), new_id.unwrap_or(none));
        self.log.info(
            "upstream key in use",
            &[
                ("upstream", &self.upstream),
                ("key", &now),
                ("previous", &was),
                ("source", &source.to_string()),
            ],
        );
        *self.current.borrow_mut() = new;
    }
}

/// The per-key metrics of every upstream's key: calls sent with it, and
/// calls the upstream refused for it (401, 403).
pub fn render(out: &mut String, keys: &[&UpstreamKey]) {
    type Count = fn(&(String, u64, u64)) -> u64;
    let families: [(&str, &str, Count); 2] = [
        (
            "hivegate_upstream_key_calls_total",
            "Calls sent with each API key, by key id (sha256 prefix).",
            |c| c.1,
        ),
        (
            "hivegate_upstream_key_refusals_total",
            "Calls the upstream refused for their API key (401, 403), by key id.",
            |c| c.2,
        ),
    ];
    for (name, help, count) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for k in keys {
            for c in k.calls.borrow().iter() {
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{}\",key=\"{}\"}} {}",
                    k.upstream,
                    c.0,
                    count(c)
                );
            }
        }
    }
}

/// Where a key is read from, for the log: never the key.
pub fn source(env: &Option<String>, file: &Option<std::path::PathBuf>) -> String {
    match (env, file) {
        (Some(var), _) => format!("env {var}"),
        (None, Some(path)) => format!("file {}", path.display()),
        (None, None) => "none".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_count_per_key_id_and_a_rotation_is_logged_once() {
        let log = Logger::new(
            crate::ops::log::LogLevel::Info,
            crate::ops::log::LogFormat::Text,
        );
        let k = UpstreamKey::new(
            "provider.a",
            Some(Secret::new("sk-old".into())),
            "env A",
            log,
        );
        let old = k.id().unwrap();
        assert!(old.starts_with("sha256:") && old.len() == 15);
        assert_eq!(k.for_call().unwrap().expose(), "sk-old");
        k.for_call();
        k.replace(Some(Secret::new("sk-new".into())), "env A");
        let new = k.id().unwrap();
        assert_ne!(old, new);
        k.for_call();
        let mut out = String::new();
        render(&mut out, &[&k]);
        assert!(out.contains(&format!("key=\"{old}\"}} 2")), "{out}");
        assert!(out.contains(&format!("key=\"{new}\"}} 1")), "{out}");
        assert!(!out.contains("sk-"), "{out}");
        for i in 0..10 {
            k.replace(Some(Secret::new(format!("sk-{i}"))), "env A");
            k.for_call();
        }
        assert_eq!(k.calls.borrow().len(), REMEMBERED);
        k.replace(None, "none");
        assert!(k.for_call().is_none());
    }
}
