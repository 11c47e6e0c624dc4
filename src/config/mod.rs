//! Configuration: one TOML file, overridden key by key from the environment,
//! on top of an embedded default, validated as a whole.
//!
//! Key names are a contract with operators and scripts (see
//! `shared/CONFIG.md` and the README): `[server] listen` in the file is
//! `HIVEGATE_SERVER_LISTEN` in the environment, which wins. Every problem is
//! reported with its line (or variable) and the key it concerns; nothing is
//! silently ignored or clamped.

mod toml;

use crate::auth::{AuthConfig, AuthMode, Secret, TokenEntry, TokenParseError};
use crate::chat::ChatLimits;
use crate::hub::MAX_OUTBOX_FRAMES;
use crate::limit::{BucketParams, LimitParams};
use crate::llm::{LlmConfig, ProviderConfig};
use crate::ops::log::{LogConfig, LogFormat, LogLevel};
use crate::pool::PoolConfig;
use crate::remote::RemoteConfig;
use crate::store::StoreConfig;
use crate::store::Synchronous;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Value;

/// Every key this build understands, with its default as written in a file,
/// and what it means. The README's reference is checked against this list.
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "server.listen",
        "\"127.0.0.1:8080\"",
        "address and port for HTTP and WebSocket",
    ),
    (
        "server.data_dir",
        "\"./hivegate-data\", or $STATE_DIRECTORY",
        "where the database lives",
    ),
    (
        "server.max_connections",
        "1000",
        "connection table capacity (1..=1000000)",
    ),
    (
        "server.max_connections_per_ip",
        "10",
        "open WebSocket connections per client IP",
    ),
    (
        "server.max_handshakes",
        "256",
        "sockets still sending their HTTP head; past it new sockets are closed at once (the last eighth only for addresses holding none)",
    ),
    (
        "server.max_handshakes_per_ip",
        "16",
        "sockets one client IP may have still sending their HTTP head",
    ),
    (
        "server.handshake_timeout_ms",
        "5000",
        "time to send the HTTP head and finish the upgrade",
    ),
    (
        "server.hello_timeout_ms",
        "10000",
        "time to send `hello` after the upgrade (close 4002)",
    ),
    ("server.ping_interval_ms", "25000", "WebSocket ping period"),
    (
        "server.pong_timeout_ms",
        "10000",
        "close 4009 when no pong arrives within this",
    ),
    (
        "server.max_message_bytes",
        "65536",
        "largest inbound message; above it close 1009",
    ),
    (
        "server.outbox_frames",
        "64",
        "per-connection outbound queue in frames (1..=64); full means close 4008",
    ),
    (
        "server.outbox_bytes",
        "1048576",
        "per-connection outbound queue in bytes; full means close 4008",
    ),
    (
        "server.drain_timeout_ms",
        "10000",
        "graceful shutdown budget after SIGTERM",
    ),
    (
        "server.memory_limit_bytes",
        "0 (90% of systemd's MemoryMax, or none)",
        "above this resident memory new connections are refused (503) and /readyz is 503",
    ),
    (
        "server.echo_endpoint",
        "false",
        "for conformance tests only: /ws-echo echoes every message (Autobahn|Testsuite); never in production",
    ),
    (
        "server.allowed_origins",
        "[] (no check)",
        "exact browser `Origin` values allowed to upgrade",
    ),
    (
        "auth.mode",
        "\"token\"",
        "`token`, or `open` (anyone may connect; generated names)",
    ),
    (
        "auth.tokens",
        "[]",
        "`\"user:token\"` or `\"user:sha256:HEX\"` entries",
    ),
    (
        "pool.threads",
        "2",
        "threads of the blocking pool (SQLite, HTTP)",
    ),
    (
        "pool.queue",
        "256",
        "jobs waiting for a pool thread; past it OVER_CAPACITY",
    ),
    (
        "store.synchronous",
        "\"full\"",
        "SQLite `synchronous`: `full`, `normal` or `off`",
    ),
    (
        "store.retention_days",
        "30",
        "messages older than this are deleted",
    ),
    (
        "store.max_messages_per_room",
        "100000",
        "the oldest messages beyond this are deleted",
    ),
    (
        "store.write_queue",
        "1024",
        "writes waiting for the next group commit; past it OVER_CAPACITY",
    ),
    ("store.batch_max", "256", "most writes in one transaction"),
    (
        "store.max_db_bytes",
        "1073741824",
        "database size bound; near it shipped messages are deleted, at it publishes are refused",
    ),
    (
        "store.check_interval_ms",
        "5000",
        "how often the database size is checked",
    ),
    (
        "remote.url",
        "none (local only)",
        "Supabase project URL; its PostgREST API is `{url}/rest/v1`",
    ),
    (
        "remote.api_key_env",
        "none",
        "environment variable holding the service key",
    ),
    (
        "remote.api_key_file",
        "none",
        "file holding the service key",
    ),
    (
        "remote.messages_table",
        "\"messages\"",
        "remote table for messages",
    ),
    (
        "remote.reactions_table",
        "\"reactions\"",
        "remote table for reactions",
    ),
    ("remote.batch_rows", "500", "rows per upsert"),
    (
        "remote.interval_ms",
        "1000",
        "pause between sync rounds when the backlog is empty",
    ),
    (
        "remote.connect_timeout_ms",
        "5000",
        "to connect to the remote",
    ),
    ("remote.timeout_ms", "10000", "a whole upsert"),
    (
        "remote.fail_max",
        "3",
        "consecutive failures that open the remote's breaker (fallback mode)",
    ),
    (
        "remote.reset_timeout_ms",
        "30000",
        "open breaker's wait before a trial batch",
    ),
    (
        "chat.rooms_per_session",
        "32",
        "rooms one connection may be in",
    ),
    ("chat.members_per_room", "10000", "connections in one room"),
    ("chat.max_text_bytes", "8192", "longest message text"),
    (
        "limits.global_capacity",
        "1000",
        "gateway-wide request bucket: burst",
    ),
    (
        "limits.global_refill_per_s",
        "100",
        "gateway-wide request bucket: tokens per second",
    ),
    (
        "limits.ip_capacity",
        "100",
        "per-client-IP request bucket: burst",
    ),
    (
        "limits.ip_refill_per_s",
        "10",
        "per-client-IP request bucket: tokens per second",
    ),
    (
        "limits.user_capacity",
        "50",
        "per-user request bucket: burst",
    ),
    (
        "limits.user_refill_per_s",
        "5",
        "per-user request bucket: tokens per second",
    ),
    (
        "limits.ip_connect_capacity",
        "20",
        "new connections per IP: burst",
    ),
    (
        "limits.ip_connect_refill_per_s",
        "2",
        "new connections per IP: per second",
    ),
    (
        "limits.abuse_threshold",
        "50",
        "refusals within 10 s before close 1008",
    ),
    (
        "limits.table_entries",
        "4096",
        "most buckets in each per-IP and per-user table",
    ),
    (
        "llm.chain",
        "the providers in file order",
        "fallback order for `provider: \"auto\"`, a list of names",
    ),
    (
        "llm.max_in_flight",
        "24",
        "LLM calls at once, gateway-wide (also the upstream pool's threads)",
    ),
    (
        "llm.max_in_flight_per_session",
        "8",
        "LLM calls at once per connection",
    ),
    (
        "llm.max_prompt_bytes",
        "32768",
        "total `content` of a call's messages",
    ),
    (
        "llm.max_response_bytes",
        "1048576",
        "longest answer relayed; past it the call ends with an error",
    ),
    (
        "llm.max_retries",
        "2",
        "retries of a failure before the first streamed byte, per provider",
    ),
    (
        "llm.backoff_base_ms",
        "250",
        "first retry waits up to this (full jitter, doubling)",
    ),
    ("llm.backoff_cap_ms", "5000", "longest wait between retries"),
    (
        "llm.progress_interval_ms",
        "5000",
        "`progress` frames while the client has received nothing for this long",
    ),
    (
        "provider.NAME.base_url",
        "none",
        "OpenAI-compatible base URL, e.g. `https://api.moonshot.ai/v1`",
    ),
    ("provider.NAME.model", "none", "model name sent upstream"),
    (
        "provider.NAME.api_key_env",
        "none",
        "environment variable holding the API key",
    ),
    (
        "provider.NAME.api_key_file",
        "none",
        "file holding the API key (e.g. under `$CREDENTIALS_DIRECTORY`)",
    ),
    (
        "provider.NAME.max_in_flight",
        "4",
        "calls at once to this provider",
    ),
    (
        "provider.NAME.rpm",
        "0 (no quota)",
        "requests per minute allowed by the provider's quota",
    ),
    (
        "provider.NAME.connect_timeout_ms",
        "5000",
        "to connect (TCP and TLS)",
    ),
    (
        "provider.NAME.first_byte_timeout_ms",
        "30000",
        "from the request to the response head",
    ),
    (
        "provider.NAME.idle_timeout_ms",
        "30000",
        "between two reads of the stream",
    ),
    ("provider.NAME.total_timeout_ms", "300000", "the whole call"),
    (
        "provider.NAME.fail_max",
        "4",
        "consecutive counted failures that open the breaker",
    ),
    (
        "provider.NAME.reset_timeout_ms",
        "120000",
        "open breaker's wait before one trial call",
    ),
    (
        "log.level",
        "\"info\"",
        "`error`, `warn`, `info` or `debug`",
    ),
    (
        "log.format",
        "\"text\"",
        "`text` or `json` (one object per line)",
    ),
];

#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub pool: PoolConfig,
    pub store: StoreConfig,
    pub chat: ChatLimits,
    pub llm: LlmConfig,
    /// `None`: local only, no sync at all.
    pub remote: Option<RemoteConfig>,
    pub log: LogConfig,
}

/// The keys of a `[provider.NAME]` section.
const PROVIDER_FIELDS: &[&str] = &[
    "base_url",
    "model",
    "api_key_env",
    "api_key_file",
    "max_in_flight",
    "rpm",
    "connect_timeout_ms",
    "first_byte_timeout_ms",
    "idle_timeout_ms",
    "total_timeout_ms",
    "fail_max",
    "reset_timeout_ms",
];

#[derive(Debug, Clone)]
pub struct Limits {
    pub buckets: LimitParams,
    /// Refusals within 10 s that close a connection with 1008.
    pub abuse_threshold: u64,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub max_connections: usize,
    pub max_connections_per_ip: u32,
    pub max_handshakes: usize,
    pub max_handshakes_per_ip: u32,
    pub handshake_timeout: Duration,
    pub hello_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub max_message_bytes: usize,
    pub outbox_frames: usize,
    pub outbox_bytes: usize,
    pub drain_timeout: Duration,
    pub allowed_origins: Vec<String>,
    /// 0: automatic (from the cgroup), see `ops::memory`.
    pub memory_limit_bytes: u64,
    /// Serve `/ws-echo` (conformance tests only).
    pub echo_endpoint: bool,
}

/// Where a setting came from, so an error can point at it.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    File {
        path: PathBuf,
        line: usize,
    },
    Env(String),
    /// A problem of the configuration as a whole.
    Whole,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { path, line } => write!(f, "{}:{line}: {}", path.display(), self.message),
            Origin::Env(var) => write!(f, "environment {var}: {}", self.message),
            Origin::Whole => write!(f, "{}", self.message),
        }
    }
}

/// All the problems found, so an operator fixes them in one go.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A setting from the file or the environment, with enough context to
/// convert it and to report a problem with it.
struct Setting<'a> {
    key: &'a str,
    value: &'a Value,
    /// Environment values are always strings and are parsed by kind.
    from_env: bool,
}

impl Setting<'_> {
    fn int(&self, min: i64, max: i64) -> Result<i64, String> {
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
    fn float(&self, min: f64, max: f64) -> Result<f64, String> {
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

    fn usize(&self, min: usize, max: usize) -> Result<usize, String> {
        self.int(min as i64, max as i64).map(|n| n as usize)
    }

    fn millis(&self, min: u64, max: u64) -> Result<Duration, String> {
        self.int(min as i64, max as i64)
            .map(|n| Duration::from_millis(n as u64))
    }

    fn boolean(&self) -> Result<bool, String> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            Value::Str(s) if self.from_env && (s == "true" || s == "false") => Ok(s == "true"),
            other => Err(format!(
                "{}: expected true or false, found {other}",
                self.key
            )),
        }
    }

    fn string(&self) -> Result<String, String> {
        match self.value {
            Value::Str(s) => Ok(s.clone()),
            other => Err(format!("{}: expected a string, found {other}", self.key)),
        }
    }

    fn choice<T: Copy>(&self, choices: &[(&str, T)]) -> Result<T, String> {
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
    fn strings(&self) -> Result<Vec<String>, String> {
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
}

impl Config {
    /// What removes every configured upstream key from upstream text.
    /// (Client tokens are not among them: only their digests are kept.)
    pub fn redactor(&self) -> crate::redact::Redactor {
        let providers = self.llm.providers.iter().filter_map(|p| p.api_key.as_ref());
        let remote = self.remote.iter().filter_map(|r| r.api_key.as_ref());
        crate::redact::Redactor::new(providers.chain(remote).map(|k| k.expose()))
    }

    /// The embedded default: loopback, local data only, no keys.
    pub fn default_with_env(env: &[(String, String)]) -> Config {
        let data_dir = env
            .iter()
            .find(|(k, _)| k == "STATE_DIRECTORY")
            // systemd may pass several directories separated by ':'.
            .and_then(|(_, v)| v.split(':').next().filter(|s| !s.is_empty()))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("./hivegate-data"));
        Config {
            server: Server {
                listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
                data_dir,
                max_connections: 1000,
                max_connections_per_ip: 10,
                max_handshakes: 256,
                max_handshakes_per_ip: 16,
                handshake_timeout: Duration::from_millis(5000),
                hello_timeout: Duration::from_millis(10_000),
                ping_interval: Duration::from_millis(25_000),
                pong_timeout: Duration::from_millis(10_000),
                max_message_bytes: 65536,
                outbox_frames: MAX_OUTBOX_FRAMES,
                outbox_bytes: 1 << 20,
                drain_timeout: Duration::from_millis(10_000),
                allowed_origins: Vec::new(),
                memory_limit_bytes: 0,
                echo_endpoint: false,
            },
            auth: AuthConfig {
                mode: AuthMode::Token,
                implicit_open: false,
                tokens: Vec::new(),
            },
            limits: Limits {
                buckets: LimitParams {
                    global: bucket(1000.0, 100.0),
                    ip: bucket(100.0, 10.0),
                    user: bucket(50.0, 5.0),
                    ip_connect: bucket(20.0, 2.0),
                    table_entries: 4096,
                },
                abuse_threshold: 50,
            },
            pool: PoolConfig {
                threads: 2,
                queue: 256,
            },
            store: StoreConfig {
                synchronous: Synchronous::Full,
                retention: Duration::from_secs(30 * 86_400),
                max_messages_per_room: 100_000,
                write_queue: 1024,
                batch_max: 256,
                max_db_bytes: 1 << 30,
                check_interval: Duration::from_secs(5),
            },
            chat: ChatLimits {
                rooms_per_session: 32,
                members_per_room: 10_000,
                max_text_bytes: 8192,
            },
            llm: LlmConfig {
                chain: Vec::new(),
                max_in_flight: 24,
                max_in_flight_per_session: 8,
                max_prompt_bytes: 32 * 1024,
                max_response_bytes: 1 << 20,
                max_retries: 2,
                backoff_base: Duration::from_millis(250),
                backoff_cap: Duration::from_secs(5),
                progress_interval: Duration::from_secs(5),
                providers: Vec::new(),
            },
            remote: None,
            log: LogConfig {
                level: LogLevel::Info,
                format: LogFormat::Text,
            },
        }
    }

    /// Loads the file (if any), then the `HIVEGATE_*` variables of `env`, and
    /// validates the result. Unknown `HIVEGATE_*` variables are returned as
    /// warnings: the environment is shared with other software (a key file
    /// variable may well be called `HIVEGATE_KIMI_KEY`).
    pub fn load(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<(Config, Vec<String>), ConfigErrors> {
        let text = match path.map(std::fs::read_to_string) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                return Err(ConfigErrors(vec![ConfigError {
                    origin: Origin::Whole,
                    message: format!(
                        "cannot read config file {}: {e}",
                        path.unwrap_or(Path::new("-")).display()
                    ),
                }]))
            }
        };
        Config::from_text(path.zip(text.as_deref()), env)
    }

    /// [`Config::load`] of a file already read: `(its path, its text)`.
    pub fn from_text(
        file: Option<(&Path, &str)>,
        env: &[(String, String)],
    ) -> Result<(Config, Vec<String>), ConfigErrors> {
        let mut cfg = Config::default_with_env(env);
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut token_origin = Origin::Whole;
        let mut mode_set = false;

        if let Some((path, text)) = file {
            match toml::parse(text) {
                Err(e) => errors.push(ConfigError {
                    origin: Origin::File {
                        path: path.to_path_buf(),
                        line: e.line,
                    },
                    message: e.message,
                }),
                Ok(entries) => {
                    for entry in entries {
                        let origin = Origin::File {
                            path: path.to_path_buf(),
                            line: entry.line,
                        };
                        let setting = Setting {
                            key: &entry.key,
                            value: &entry.value,
                            from_env: false,
                        };
                        track(&entry.key, &origin, &mut token_origin, &mut mode_set);
                        if let Err(message) = cfg.apply(&setting) {
                            errors.push(ConfigError { origin, message });
                        }
                    }
                }
            }
        }

        for (var, value) in env {
            let Some(rest) = var.strip_prefix("HIVEGATE_") else {
                continue;
            };
            let Some(key) = key_for_env(rest) else {
                warnings.push(format!(
                    "environment variable {var} names no configuration key; it is ignored"
                ));
                continue;
            };
            let origin = Origin::Env(var.clone());
            track(&key, &origin, &mut token_origin, &mut mode_set);
            let value = Value::Str(value.clone());
            let setting = Setting {
                key: &key,
                value: &value,
                from_env: true,
            };
            if let Err(message) = cfg.apply(&setting) {
                errors.push(ConfigError { origin, message });
            }
        }

        if errors.is_empty() {
            if let Err(message) = cfg.check_whole(mode_set) {
                errors.push(ConfigError {
                    origin: token_origin,
                    message,
                });
            }
            if let Err(message) = cfg.check_remote(env) {
                errors.push(ConfigError {
                    origin: Origin::Whole,
                    message,
                });
            }
            if let Err(message) = cfg.check_llm(env) {
                errors.push(ConfigError {
                    origin: Origin::Whole,
                    message,
                });
            }
        }
        if errors.is_empty() {
            Ok((cfg, warnings))
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn apply(&mut self, s: &Setting) -> Result<(), String> {
        let sv = &mut self.server;
        match s.key {
            "server.listen" => {
                let text = s.string()?;
                sv.listen = text.parse().map_err(|_| {
                    format!(
                        "server.listen: {text:?} is not an address and port such as \"127.0.0.1:8080\" or \"[::]:8080\""
                    )
                })?;
            }
            "server.data_dir" => {
                let dir = s.string()?;
                if dir.is_empty() {
                    return Err("server.data_dir: must not be empty".into());
                }
                sv.data_dir = PathBuf::from(dir);
            }
            "server.max_connections" => sv.max_connections = s.usize(1, 1_000_000)?,
            "server.max_connections_per_ip" => {
                sv.max_connections_per_ip = s.int(1, 1_000_000)? as u32
            }
            "server.max_handshakes" => sv.max_handshakes = s.usize(1, 100_000)?,
            "server.max_handshakes_per_ip" => sv.max_handshakes_per_ip = s.int(1, 100_000)? as u32,
            "server.handshake_timeout_ms" => sv.handshake_timeout = s.millis(10, 600_000)?,
            "server.hello_timeout_ms" => sv.hello_timeout = s.millis(10, 600_000)?,
            "server.ping_interval_ms" => sv.ping_interval = s.millis(10, 3_600_000)?,
            "server.pong_timeout_ms" => sv.pong_timeout = s.millis(10, 3_600_000)?,
            "server.max_message_bytes" => sv.max_message_bytes = s.usize(256, 16 << 20)?,
            "server.outbox_frames" => sv.outbox_frames = s.usize(1, MAX_OUTBOX_FRAMES)?,
            "server.outbox_bytes" => sv.outbox_bytes = s.usize(1024, 1 << 30)?,
            "server.drain_timeout_ms" => sv.drain_timeout = s.millis(0, 600_000)?,
            "server.allowed_origins" => sv.allowed_origins = s.strings()?,
            "server.echo_endpoint" => sv.echo_endpoint = s.boolean()?,
            "server.memory_limit_bytes" => sv.memory_limit_bytes = s.int(0, 1 << 50)? as u64,
            "auth.mode" => {
                self.auth.mode =
                    s.choice(&[("token", AuthMode::Token), ("open", AuthMode::Open)])?
            }
            "auth.tokens" => {
                let mut tokens = Vec::new();
                for (i, spec) in s.strings()?.iter().enumerate() {
                    // The message never repeats the entry: it holds a secret.
                    let entry = TokenEntry::parse(spec).map_err(|e| {
                        let why = match e {
                            TokenParseError::Shape => {
                                "is not \"user:token\" or \"user:sha256:HEX\""
                            }
                            TokenParseError::User => {
                                "has a user name that is not 1-32 of [A-Za-z0-9_.-]"
                            }
                            TokenParseError::Hex => "has a sha256 digest that is not 64 hex digits",
                            TokenParseError::Empty => "has an empty token",
                        };
                        format!("auth.tokens: entry {} {why}", i + 1)
                    })?;
                    if tokens.iter().any(|t: &TokenEntry| t.digest == entry.digest) {
                        return Err(format!(
                            "auth.tokens: entry {} repeats the token of an earlier entry",
                            i + 1
                        ));
                    }
                    tokens.push(entry);
                }
                self.auth.tokens = tokens;
            }
            "limits.global_capacity" => self.limits.buckets.global.capacity = s.float(1.0, 1e9)?,
            "limits.global_refill_per_s" => {
                self.limits.buckets.global.refill_per_s = s.float(0.001, 1e9)?
            }
            "limits.ip_capacity" => self.limits.buckets.ip.capacity = s.float(1.0, 1e9)?,
            "limits.ip_refill_per_s" => {
                self.limits.buckets.ip.refill_per_s = s.float(0.001, 1e9)?
            }
            "limits.user_capacity" => self.limits.buckets.user.capacity = s.float(1.0, 1e9)?,
            "limits.user_refill_per_s" => {
                self.limits.buckets.user.refill_per_s = s.float(0.001, 1e9)?
            }
            "limits.ip_connect_capacity" => {
                self.limits.buckets.ip_connect.capacity = s.float(1.0, 1e9)?
            }
            "limits.ip_connect_refill_per_s" => {
                self.limits.buckets.ip_connect.refill_per_s = s.float(0.001, 1e9)?
            }
            "limits.abuse_threshold" => self.limits.abuse_threshold = s.int(1, 1_000_000)? as u64,
            "limits.table_entries" => self.limits.buckets.table_entries = s.usize(16, 1_000_000)?,
            "pool.threads" => self.pool.threads = s.usize(1, 64)?,
            "pool.queue" => self.pool.queue = s.usize(1, 1_000_000)?,
            "store.synchronous" => {
                self.store.synchronous = s.choice(&[
                    ("full", Synchronous::Full),
                    ("normal", Synchronous::Normal),
                    ("off", Synchronous::Off),
                ])?
            }
            "store.retention_days" => {
                self.store.retention = Duration::from_secs(s.int(1, 36_500)? as u64 * 86_400)
            }
            "store.max_messages_per_room" => {
                self.store.max_messages_per_room = s.int(1, 1_000_000_000)?
            }
            "store.write_queue" => self.store.write_queue = s.usize(1, 1_000_000)?,
            "store.batch_max" => self.store.batch_max = s.usize(1, 10_000)?,
            "chat.rooms_per_session" => self.chat.rooms_per_session = s.usize(1, 10_000)?,
            "chat.members_per_room" => self.chat.members_per_room = s.usize(1, 1_000_000)?,
            "chat.max_text_bytes" => self.chat.max_text_bytes = s.usize(1, 1 << 20)?,
            "log.level" => {
                self.log.level = s.choice(&[
                    ("error", LogLevel::Error),
                    ("warn", LogLevel::Warn),
                    ("info", LogLevel::Info),
                    ("debug", LogLevel::Debug),
                ])?
            }
            "log.format" => {
                self.log.format =
                    s.choice(&[("text", LogFormat::Text), ("json", LogFormat::Json)])?
            }
            "llm.chain" => self.llm.chain = s.strings()?,
            "llm.max_in_flight" => self.llm.max_in_flight = s.int(1, 1024)? as u32,
            "llm.max_in_flight_per_session" => {
                self.llm.max_in_flight_per_session = s.int(1, 1024)? as u32
            }
            "llm.max_prompt_bytes" => self.llm.max_prompt_bytes = s.usize(1, 16 << 20)?,
            "llm.max_response_bytes" => self.llm.max_response_bytes = s.usize(1024, 64 << 20)?,
            "llm.max_retries" => self.llm.max_retries = s.int(0, 10)? as u32,
            "llm.backoff_base_ms" => self.llm.backoff_base = s.millis(1, 60_000)?,
            "llm.backoff_cap_ms" => self.llm.backoff_cap = s.millis(1, 600_000)?,
            "llm.progress_interval_ms" => self.llm.progress_interval = s.millis(10, 600_000)?,
            "store.max_db_bytes" => self.store.max_db_bytes = s.int(1 << 16, 1 << 50)?,
            "store.check_interval_ms" => self.store.check_interval = s.millis(10, 3_600_000)?,
            other if other.starts_with("remote.") => {
                let r = self.remote.get_or_insert_with(RemoteConfig::default);
                match other {
                    "remote.url" => {
                        let url = s.string()?;
                        if !(url.starts_with("http://") || url.starts_with("https://")) {
                            return Err(format!(
                                "remote.url: {url:?} must start with http:// or https://"
                            ));
                        }
                        r.url = url.trim_end_matches('/').to_string();
                    }
                    "remote.api_key_env" => r.api_key_env = Some(s.string()?),
                    "remote.api_key_file" => r.api_key_file = Some(PathBuf::from(s.string()?)),
                    "remote.messages_table" => r.messages_table = table_name(s)?,
                    "remote.reactions_table" => r.reactions_table = table_name(s)?,
                    "remote.batch_rows" => r.batch_rows = s.usize(1, 10_000)?,
                    "remote.interval_ms" => r.interval = s.millis(10, 3_600_000)?,
                    "remote.connect_timeout_ms" => r.connect_timeout = s.millis(10, 600_000)?,
                    "remote.timeout_ms" => r.timeout = s.millis(10, 3_600_000)?,
                    "remote.fail_max" => r.fail_max = s.int(1, 1000)? as u32,
                    "remote.reset_timeout_ms" => r.reset_timeout = s.millis(10, 86_400_000)?,
                    _ => return Err(unknown_key(other)),
                }
            }
            other if other.starts_with("provider.") => self.apply_provider(s)?,
            other => return Err(unknown_key(other)),
        }
        Ok(())
    }

    /// `provider.NAME.FIELD`: a provider is created by its first key.
    fn apply_provider(&mut self, s: &Setting) -> Result<(), String> {
        let rest = &s.key["provider.".len()..];
        let (name, field) = rest.rsplit_once('.').ok_or_else(|| {
            format!(
                "{}: expected provider.NAME.FIELD, e.g. provider.kimi.base_url",
                s.key
            )
        })?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "{}: provider names are letters, digits, '_' and '-'",
                s.key
            ));
        }
        if !PROVIDER_FIELDS.contains(&field) {
            return Err(format!(
                "unknown key {}; keys of a [provider.NAME] section are: {}",
                s.key,
                PROVIDER_FIELDS.join(", ")
            ));
        }
        let i = match self.llm.providers.iter().position(|p| p.name == name) {
            Some(i) => i,
            None => {
                self.llm.providers.push(ProviderConfig::new(name));
                self.llm.providers.len() - 1
            }
        };
        let p = &mut self.llm.providers[i];
        match field {
            "base_url" => {
                let url = s.string()?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!(
                        "{}: {url:?} must start with http:// or https://",
                        s.key
                    ));
                }
                p.base_url = url.trim_end_matches('/').to_string();
            }
            "model" => p.model = s.string()?,
            "api_key_env" => p.api_key_env = Some(s.string()?),
            "api_key_file" => p.api_key_file = Some(PathBuf::from(s.string()?)),
            "max_in_flight" => p.max_in_flight = s.int(1, 1024)? as u32,
            "rpm" => p.rpm = s.int(0, 1_000_000)? as u32,
            "connect_timeout_ms" => p.connect_timeout = s.millis(10, 600_000)?,
            "first_byte_timeout_ms" => p.first_byte_timeout = s.millis(10, 3_600_000)?,
            "idle_timeout_ms" => p.idle_timeout = s.millis(10, 3_600_000)?,
            "total_timeout_ms" => p.total_timeout = s.millis(10, 86_400_000)?,
            "fail_max" => p.fail_max = s.int(1, 1000)? as u32,
            _ => p.reset_timeout = s.millis(10, 86_400_000)?,
        }
        Ok(())
    }

    /// The remote, complete, with its key read.
    fn check_remote(&mut self, env: &[(String, String)]) -> Result<(), String> {
        let Some(r) = &mut self.remote else {
            return Ok(());
        };
        if r.url.is_empty() {
            return Err("[remote] needs url (remote.url), or no [remote] section at all for local-only mode".into());
        }
        r.api_key = read_key("remote", &r.api_key_env, &r.api_key_file, env)?;
        Ok(())
    }

    /// The providers, complete, with their keys read; the chain checked.
    fn check_llm(&mut self, env: &[(String, String)]) -> Result<(), String> {
        for p in &mut self.llm.providers {
            if p.base_url.is_empty() || p.model.is_empty() {
                return Err(format!(
                    "provider {} needs base_url and model (provider.{}.base_url, provider.{}.model)",
                    p.name, p.name, p.name
                ));
            }
            p.api_key = read_key(
                &format!("provider {}", p.name),
                &p.api_key_env,
                &p.api_key_file,
                env,
            )?;
        }
        if self.llm.chain.is_empty() {
            self.llm.chain = self.llm.providers.iter().map(|p| p.name.clone()).collect();
        }
        for name in &self.llm.chain {
            if !self.llm.providers.iter().any(|p| &p.name == name) {
                return Err(format!(
                    "llm.chain names {name:?}, which has no [provider.{name}] section"
                ));
            }
        }
        Ok(())
    }

    /// Rules that involve more than one key.
    fn check_whole(&mut self, mode_set: bool) -> Result<(), String> {
        let largest = crate::chat::largest_message_frame(self.chat.max_text_bytes);
        if largest > self.server.outbox_bytes / 2 {
            return Err(format!(
                "server.outbox_bytes ({}) must hold two of the largest message frames: with \
                 chat.max_text_bytes = {} (each byte may take 6 escaped), a message frame may be \
                 {largest} bytes. Raise server.outbox_bytes to at least {} or lower chat.max_text_bytes",
                self.server.outbox_bytes,
                self.chat.max_text_bytes,
                largest * 2
            ));
        }
        if self.auth.mode == AuthMode::Token && self.auth.tokens.is_empty() {
            if !self.server.listen.ip().is_loopback() {
                return Err(format!(
                    "auth.tokens is empty and server.listen ({}) is not a loopback address: \
                     anyone on the network could connect. Add tokens under [auth], or set \
                     auth.mode = \"open\" if that is really what you want",
                    self.server.listen
                ));
            }
            self.auth.mode = AuthMode::Open;
            self.auth.implicit_open = !mode_set;
        }
        Ok(())
    }
}

/// Reads a key from the named variable or file, once. The key's value
/// never appears in a message: only where it was looked for.
fn read_key(
    who: &str,
    var: &Option<String>,
    file: &Option<PathBuf>,
    env: &[(String, String)],
) -> Result<Option<Secret>, String> {
    match (var, file) {
        (Some(_), Some(_)) => Err(format!("{who}: give api_key_env or api_key_file, not both")),
        (Some(var), None) => match env.iter().find(|(k, _)| k == var).map(|(_, v)| v.trim()) {
            Some(v) if !v.is_empty() => Ok(Some(Secret::new(v.to_string()))),
            _ => Err(format!(
                "{who}: environment variable {var} (api_key_env) is not set or empty"
            )),
        },
        (None, Some(path)) => {
            // At most 64 KiB: a key is short, and the path may name
            // anything (a device that never ends, say).
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|f| {
                    std::io::Read::read_to_string(&mut std::io::Read::take(f, 64 * 1024), &mut text)
                })
                .map_err(|e| format!("{who}: cannot read api_key_file {}: {e}", path.display()))?;
            let key = text.trim();
            if key.is_empty() {
                return Err(format!("{who}: api_key_file {} is empty", path.display()));
            }
            Ok(Some(Secret::new(key.to_string())))
        }
        // A server that needs no key (a local one).
        (None, None) => Ok(None),
    }
}

/// A PostgREST table name: letters, digits, '_'.
fn table_name(s: &Setting) -> Result<String, String> {
    let name = s.string()?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("{}: {name:?} is not a plain table name", s.key));
    }
    Ok(name)
}

fn bucket(capacity: f64, refill_per_s: f64) -> BucketParams {
    BucketParams {
        capacity,
        refill_per_s,
    }
}

/// Remembers where the auth settings came from, for the whole-config error.
fn track(key: &str, origin: &Origin, token_origin: &mut Origin, mode_set: &mut bool) {
    if key == "auth.tokens" || key == "auth.mode" {
        *token_origin = origin.clone();
    }
    if key == "auth.mode" {
        *mode_set = true;
    }
}

fn unknown_key(key: &str) -> String {
    let section = key.split('.').next().unwrap_or(key);
    let close: Vec<&str> = KEYS
        .iter()
        .map(|(k, _, _)| *k)
        .filter(|k| k.starts_with(section) && k.contains('.'))
        .collect();
    if close.is_empty() {
        format!("unknown key {key}: this build has no [{section}] section")
    } else {
        format!(
            "unknown key {key}; keys of [{section}] are: {}",
            close.join(", ")
        )
    }
}

/// `SERVER_MAX_CONNECTIONS` → `server.max_connections`.
fn key_for_env(rest: &str) -> Option<String> {
    if let Some(provider) = rest.strip_prefix("PROVIDER_") {
        // PROVIDER_<NAME>_<FIELD>: the field is a known suffix, so a name
        // may hold underscores itself.
        return PROVIDER_FIELDS.iter().find_map(|field| {
            let name = provider
                .strip_suffix(&field.to_ascii_uppercase())?
                .strip_suffix('_')?;
            (!name.is_empty()).then(|| format!("provider.{}.{field}", name.to_ascii_lowercase()))
        });
    }
    KEYS.iter()
        .map(|(k, _, _)| *k)
        .filter(|k| !k.starts_with("provider."))
        .find(|k| env_name(k).strip_prefix("HIVEGATE_") == Some(rest))
        .map(String::from)
}

/// `server.max_connections` → `HIVEGATE_SERVER_MAX_CONNECTIONS`.
pub fn env_name(key: &str) -> String {
    format!(
        "HIVEGATE_{}",
        key.replace(['.', '-'], "_").to_ascii_uppercase()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::TempPath {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.into_temp_path()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn embedded_default_is_open_on_loopback() {
        let (cfg, warnings) = Config::load(None, &[]).unwrap();
        assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.server.data_dir, PathBuf::from("./hivegate-data"));
        assert_eq!(cfg.auth.mode, AuthMode::Open);
        assert!(cfg.auth.implicit_open);
        assert!(warnings.is_empty());
    }

    #[test]
    fn state_directory_sets_the_data_dir() {
        let (cfg, _) = Config::load(None, &env(&[("STATE_DIRECTORY", "/var/lib/hg:/x")])).unwrap();
        assert_eq!(cfg.server.data_dir, PathBuf::from("/var/lib/hg"));
    }

    #[test]
    fn environment_wins_over_the_file() {
        let p = write("[server]\nmax_connections = 50\nallowed_origins = [\"https://a\"]\n");
        let (cfg, _) = Config::load(
            Some(&p),
            &env(&[
                ("HIVEGATE_SERVER_MAX_CONNECTIONS", "70"),
                ("HIVEGATE_AUTH_TOKENS", "alice:tok1, bob:tok2"),
                ("HIVEGATE_KIMI_KEY", "secret"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.server.max_connections, 70);
        assert_eq!(cfg.server.allowed_origins, ["https://a"]);
        assert_eq!(cfg.auth.tokens.len(), 2);
        assert_eq!(cfg.auth.mode, AuthMode::Token);
    }

    #[test]
    fn unknown_keys_bad_types_and_ranges_name_key_and_line() {
        let p = write(
            "[server]\nmax_conections = 5\nmax_connections = \"many\"\nhello_timeout_ms = 0\n[tls]\ncert = \"x\"\n",
        );
        let errs = Config::load(Some(&p), &[]).unwrap_err().0;
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 4, "{text:?}");
        assert!(
            text[0].contains(":2: unknown key server.max_conections"),
            "{}",
            text[0]
        );
        assert!(text[0].contains("server.max_connections"), "{}", text[0]);
        assert!(
            text[1].contains(":3: server.max_connections: expected an integer"),
            "{}",
            text[1]
        );
        assert!(
            text[2].contains(":4: server.hello_timeout_ms: 0 is out of range"),
            "{}",
            text[2]
        );
        assert!(text[3].contains(":6: unknown key tls.cert"), "{}", text[3]);
    }

    #[test]
    fn limits_take_fractions_and_refuse_zero_refill() {
        let p = write("[limits]\nuser_refill_per_s = 0.5\nuser_capacity = 10\n");
        let (cfg, _) =
            Config::load(Some(&p), &env(&[("HIVEGATE_LIMITS_IP_CAPACITY", "7")])).unwrap();
        assert_eq!(cfg.limits.buckets.user, bucket(10.0, 0.5));
        assert_eq!(cfg.limits.buckets.ip.capacity, 7.0);
        let p = write("[limits]\nglobal_refill_per_s = 0\n");
        let err = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(
            err.contains(":2: limits.global_refill_per_s: 0 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn env_errors_name_the_variable() {
        let errs = Config::load(None, &env(&[("HIVEGATE_SERVER_OUTBOX_FRAMES", "65")]))
            .unwrap_err()
            .0;
        assert_eq!(
            errs[0].origin,
            Origin::Env("HIVEGATE_SERVER_OUTBOX_FRAMES".into())
        );
        assert!(errs[0].message.contains("out of range"));
    }

    #[test]
    fn no_tokens_on_a_public_address_refuses_to_start() {
        let p = write("[server]\nlisten = \"0.0.0.0:8080\"\n");
        let err = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(err.contains("auth.mode = \"open\""), "{err}");
        let p = write("[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nmode = \"open\"\n");
        let (cfg, _) = Config::load(Some(&p), &[]).unwrap();
        assert_eq!(cfg.auth.mode, AuthMode::Open);
        assert!(!cfg.auth.implicit_open);
    }

    #[test]
    fn token_errors_never_echo_the_secret() {
        let p = write("[auth]\ntokens = [\"al ice:hunter2secret\"]\n");
        let err = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(err.contains("entry 1"), "{err}");
        assert!(!err.contains("hunter2secret"), "{err}");
    }

    #[test]
    fn the_readme_documents_every_key() {
        let readme = include_str!("../../README.md");
        for (key, _, _) in KEYS {
            assert!(
                readme.contains(&format!("| `{key}` |")),
                "README lacks {key}"
            );
        }
    }

    #[test]
    fn the_full_fixture_sets_every_key() {
        let text = include_str!("../../fixtures/config/full.toml");
        let keys: Vec<String> = toml::parse(text)
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        for (key, _, _) in KEYS {
            let key = &key.replace("provider.NAME.", "provider.kimi.");
            // The two key sources are alternatives: one of them is set.
            let key = &key.replace("api_key_env", "api_key_file");
            assert!(
                keys.iter().any(|k| k == key),
                "fixtures/config/full.toml lacks {key}"
            );
        }
    }

    #[test]
    fn providers_come_from_sections_and_the_environment_and_keys_stay_secret() {
        let keyfile = write("  sk-from-file-123\n");
        let p = write(&format!(
            "[llm]\nchain = [\"glm\", \"kimi\"]\n[provider.kimi]\nbase_url = \"https://api.moonshot.ai/v1/\"\nmodel = \"m1\"\napi_key_env = \"KIMI_KEY\"\n[provider.glm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"g\"\napi_key_file = {:?}\n",
            keyfile.to_str().unwrap()
        ));
        let env = env(&[
            ("KIMI_KEY", "sk-secret-kimi"),
            (
                "HIVEGATE_PROVIDER_MY_LOCAL_BASE_URL",
                "http://127.0.0.1:8/v1",
            ),
            ("HIVEGATE_PROVIDER_MY_LOCAL_MODEL", "llama"),
            ("HIVEGATE_PROVIDER_KIMI_FAIL_MAX", "7"),
        ]);
        let (cfg, _) = Config::load(Some(&p), &env).unwrap();
        let names: Vec<&str> = cfg.llm.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["kimi", "glm", "my_local"]);
        assert_eq!(cfg.llm.chain, ["glm", "kimi"]);
        let kimi = &cfg.llm.providers[0];
        assert_eq!(kimi.base_url, "https://api.moonshot.ai/v1");
        assert_eq!(kimi.fail_max, 7);
        assert_eq!(kimi.api_key.as_ref().unwrap().expose(), "sk-secret-kimi");
        assert_eq!(
            cfg.llm.providers[1].api_key.as_ref().unwrap().expose(),
            "sk-from-file-123"
        );
        assert!(cfg.llm.providers[2].api_key.is_none());
        assert!(!format!("{cfg:?}").contains("sk-secret-kimi"));
        // A missing key names the variable, never a value.
        let err = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(err.contains("KIMI_KEY"), "{err}");
        let p = write("[llm]\nchain = [\"nope\"]\n");
        assert!(Config::load(Some(&p), &[])
            .unwrap_err()
            .to_string()
            .contains("nope"));
        let p = write("[provider.x]\nbase_url = \"ftp://x\"\n");
        assert!(Config::load(Some(&p), &[]).is_err());
        let p = write("[provider.x]\nbase_uri = \"http://x\"\n");
        assert!(Config::load(Some(&p), &[])
            .unwrap_err()
            .to_string()
            .contains("base_url"));
    }

    #[test]
    fn every_key_maps_to_an_env_variable_and_back() {
        for (key, _, _) in KEYS.iter().filter(|(k, _, _)| !k.starts_with("provider.")) {
            let var = env_name(key);
            assert_eq!(
                key_for_env(&var["HIVEGATE_".len()..]).as_deref(),
                Some(*key)
            );
        }
        assert_eq!(
            key_for_env("PROVIDER_KIMI_API_KEY_ENV").as_deref(),
            Some("provider.kimi.api_key_env")
        );
        assert_eq!(env_name("server.listen"), "HIVEGATE_SERVER_LISTEN");
    }
}
