//! One setting on its way into the configuration: a key, a value from the
//! file or the environment, and the conversions every key uses, each of
//! which names the key when it refuses a value.

use super::toml::Value;
use crate::auth::{TokenEntry, TokenParseError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A setting from the file or the environment, with enough context to
/// convert it and to report a problem with it.
pub struct Setting<'a> {
    pub key: &'a str,
    pub value: &'a Value,
    /// Environment values are always strings and are parsed by kind.
    pub from_env: bool,
    /// The process environment, for the directories systemd names.
    pub env: &'a [(String, String)],
}

impl Setting<'_> {
    pub fn int(&self, min: i64, max: i64) -> Result<i64, String> {
        let n = match self.value {
            Value::Int(n) => Some(*n),
            Value::Str(s) if self.from_env => s.trim().replace('_', "").parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            Some(n) => Err(format!(
                "{}: {n} is out of range: expected {min} to {max}",
                self.key
            )),
            None => Err(format!(
                "{}: expected an integer from {min} to {max}, found {}",
                self.key, self.value
            )),
        }
    }

    /// A number that may have a fraction (an integer is fine too).
    pub fn float(&self, min: f64, max: f64) -> Result<f64, String> {
        let x = match self.value {
            Value::Int(n) => Some(*n as f64),
            Value::Float(x) => Some(*x),
            Value::Str(s) if self.from_env => {
                s.trim().parse::<f64>().ok().filter(|x| x.is_finite())
            }
            _ => None,
        };
        match x {
            Some(x) if (min..=max).contains(&x) => Ok(x),
            Some(x) => Err(format!(
                "{}: {x} is out of range: expected {min} to {max}",
                self.key
            )),
            None => Err(format!(
                "{}: expected a number from {min} to {max}, found {}",
                self.key, self.value
            )),
        }
    }

    pub fn usize(&self, min: usize, max: usize) -> Result<usize, String> {
        self.int(min as i64, max as i64).map(|n| n as usize)
    }

    pub fn millis(&self, min: u64, max: u64) -> Result<Duration, String> {
        self.int(min as i64, max as i64)
            .map(|n| Duration::from_millis(n as u64))
    }

    pub fn boolean(&self) -> Result<bool, String> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            Value::Str(s) if self.from_env && (s == "true" || s == "false") => Ok(s == "true"),
            other => Err(format!(
                "{}: expected true or false, found {other}",
                self.key
            )),
        }
    }

    pub fn string(&self) -> Result<String, String> {
        match self.value {
            Value::Str(s) => Ok(s.clone()),
            other => Err(format!("{}: expected a string, found {other}", self.key)),
        }
    }

    pub fn choice<T: Copy>(&self, choices: &[(&str, T)]) -> Result<T, String> {
        let s = self.string()?;
        choices
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<_> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                format!(
                    "{}: expected one of {}, found {s:?}",
                    self.key,
                    names.join(", ")
                )
            })
    }

    /// A list of strings; from the environment, comma-separated.
    pub fn strings(&self) -> Result<Vec<String>, String> {
        match self.value {
            Value::Str(s) if self.from_env => Ok(s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()),
            Value::List(items) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.clone()),
                    other => Err(format!(
                        "{}: expected a list of strings, found {other} in it",
                        self.key
                    )),
                })
                .collect(),
            other => Err(format!(
                "{}: expected a list of strings, found {other}",
                self.key
            )),
        }
    }
    pub fn u32(&self, min: u32, max: u32) -> Result<u32, String> {
        self.int(i64::from(min), i64::from(max)).map(|n| n as u32)
    }

    /// An address and port; `localhost:PORT` is the IPv4 loopback (no
    /// name is looked up: the box may have no resolver at start).
    pub fn socket_addr(&self) -> Result<SocketAddr, String> {
        let text = self.string()?;
        let local = text
            .strip_prefix("localhost:")
            .map(|port| format!("127.0.0.1:{port}"));
        local.as_deref().unwrap_or(&text).parse().map_err(|_| {
            format!(
                "{}: {text:?} is not an address and port such as \"127.0.0.1:8080\", \"localhost:8080\" or \"[::]:8080\"",
                self.key
            )
        })
    }

    /// An address and port, or `None` for an empty string (off).
    pub fn opt_socket_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.string()?.is_empty() {
            return Ok(None);
        }
        self.socket_addr().map(Some)
    }

    /// Addresses or networks (`10.0.0.0/8`), as trusted proxies are given.
    pub fn networks(&self) -> Result<crate::forwarded::TrustedProxies, String> {
        self.strings()?
            .iter()
            .map(|n| crate::forwarded::Cidr::parse(n).map_err(|e| format!("{}: {e}", self.key)))
            .collect::<Result<Vec<_>, _>>()
            .map(crate::forwarded::TrustedProxies)
    }

    /// Host names (no port, no scheme), lower-cased.
    pub fn hostnames(&self) -> Result<Vec<String>, String> {
        let names = self.strings()?;
        for n in &names {
            let ok = !n.is_empty()
                && n.len() <= 253
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(format!(
                    "{}: {n:?} is not a host name such as \"chat.example.org\" (no scheme, no port)",
                    self.key
                ));
            }
        }
        Ok(names.iter().map(|n| n.to_ascii_lowercase()).collect())
    }

    /// A path that is not empty. `$CREDENTIALS_DIRECTORY` and
    /// `$STATE_DIRECTORY` (or `${...}`) are replaced by the directories
    /// systemd names in them (the first, when it names several).
    /// A path, or `None` for an empty string (the setting is off).
    pub fn opt_path(&self) -> Result<Option<PathBuf>, String> {
        if self.string()?.is_empty() {
            return Ok(None);
        }
        self.path().map(Some)
    }

    pub fn path(&self) -> Result<PathBuf, String> {
        let mut text = self.string()?;
        if text.is_empty() {
            return Err(format!("{}: must not be empty", self.key));
        }
        for var in ["CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"] {
            for form in [format!("${{{var}}}"), format!("${var}")] {
                if !text.contains(&form) {
                    continue;
                }
                let dir = self
                    .env
                    .iter()
                    .find(|(k, _)| k == var)
                    .and_then(|(_, v)| v.split(':').next().filter(|d| !d.is_empty()))
                    .ok_or_else(|| {
                        format!(
                            "{}: {text:?} names ${var}, which is not set (systemd sets it for a unit with {})",
                            self.key,
                            if var == "STATE_DIRECTORY" { "StateDirectory=" } else { "LoadCredential=" }
                        )
                    })?;
                text = text.replace(&form, dir);
            }
        }
        Ok(PathBuf::from(text))
    }

    /// An `http://` or `https://` URL, without a trailing `/`.
    pub fn url(&self) -> Result<String, String> {
        let url = self.string()?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "{}: {url:?} must start with http:// or https://",
                self.key
            ));
        }
        Ok(url.trim_end_matches('/').to_string())
    }

    /// A PostgREST table name: letters, digits, '_'.
    pub fn table_name(&self) -> Result<String, String> {
        let name = self.string()?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("{}: {name:?} is not a plain table name", self.key));
        }
        Ok(name)
    }

    /// A list of user or role names (or `"*"`).
    pub fn names(&self) -> Result<Vec<String>, String> {
        let names = self.strings()?;
        if let Some(bad) = names
            .iter()
            .find(|n| *n != "*" && !crate::auth::valid_user(n))
        {
            return Err(format!(
                "{}: {bad:?} is not a name (1-64 of [A-Za-z0-9_.-]) or \"*\"",
                self.key
            ));
        }
        Ok(names)
    }

    /// `auth.tokens`: `"user:token"` or `"user:sha256:HEX"` entries. A message
    /// never repeats an entry: it holds a secret.
    pub fn tokens(&self) -> Result<Vec<TokenEntry>, String> {
        let mut tokens: Vec<TokenEntry> = Vec::new();
        for (i, spec) in self.strings()?.iter().enumerate() {
            let entry = TokenEntry::parse(spec).map_err(|e| {
                let why = match e {
                    TokenParseError::Shape => "is not \"user:token[:roles]\" or \"user:sha256:HEX[:roles]\"",
                    TokenParseError::User => "has a user name that is not 1-64 of [A-Za-z0-9_.-]",
                    TokenParseError::Roles => "has roles that are not a comma-separated list of names of [A-Za-z0-9_.-] (a token holding ':' must be given as sha256:HEX)",
                    TokenParseError::Hex => "has a sha256 digest that is not 64 hex digits",
                    TokenParseError::Empty => "has an empty token",
                };
                format!("auth.tokens: entry {} {why}", i + 1)
            })?;
            if tokens.iter().any(|t| t.digest == entry.digest) {
                return Err(format!(
                    "auth.tokens: entry {} repeats the token of an earlier entry",
                    i + 1
                ));
            }
            tokens.push(entry);
        }
        Ok(tokens)
    }
}
