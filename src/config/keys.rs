//! Every configuration key, each written once: its name, its default as
//! it would be written in a file, what it means, and how a value is checked
//! and stored. The embedded default is this table's defaults read like a
//! file; unknown-key hints, environment names and the README's reference
//! come from the same list.

use super::setting::Setting;
use super::Config;
use crate::access::Rule;
use crate::auth::AuthMode;
use crate::cluster::ClusterConfig;
use crate::hub::MAX_OUTBOX_FRAMES;
use crate::llm::ProviderConfig;
use crate::ops::log::{LogFormat, LogLevel};
use crate::remote::RemoteConfig;
use crate::store::Synchronous;
use std::time::Duration;

type Apply<T> = fn(&mut T, &Setting) -> Result<(), String>;

/// Where a key's value goes: the config itself, the `[remote]` or
/// `[cluster]` section (created by its first key), one
/// `[provider.NAME]` section, or one `[[access]]` rule.
pub enum Set {
    C(Apply<Config>),
    R(Apply<RemoteConfig>),
    P(Apply<ProviderConfig>),
    K(Apply<ClusterConfig>),
    A(Apply<Rule>),
}

pub struct Key {
    /// `section.key`; `provider.NAME.key` for every provider's keys.
    pub name: &'static str,
    /// The default as TOML (`""`: none, the key is unset).
    pub default: &'static str,
    /// What the default means beyond its value, for people.
    pub note: &'static str,
    pub meaning: &'static str,
    pub set: Set,
}

impl Key {
    /// The default as the README and a generated config show it.
    pub fn shown_default(&self) -> String {
        match (self.default, self.note) {
            ("", "") => "none".into(),
            ("", note) => note.into(),
            (d, "") => d.into(),
            (d, note) => format!("{d} ({note})"),
        }
    }
}

/// Every key: the core sections, then the optional ones (`[remote]`,
/// `[cluster]`, `[provider.NAME]`, `[[access]]`, in `sections`).
pub fn keys() -> impl Iterator<Item = &'static Key> {
    CORE.iter().chain(super::sections::SECTIONS.iter())
}

/// The keys of the sections every configuration has.
const CORE: &[Key] = &[
    Key {
        name: "server.listen",
        default: "\"127.0.0.1:8080\"",
        note: "",
        meaning: "address and port for HTTP and WebSocket",
        set: Set::C(|c, s| s.socket_addr().map(|v| c.server.listen = v)),
    },
    Key {
        name: "server.admin_listen",
        default: "\"127.0.0.1:8081\"",
        note: "",
        meaning: "address and port of the operator endpoints (`/metrics`, the detailed `/readyz`), plain HTTP; keep it on loopback; `\"\"` turns them off",
        set: Set::C(|c, s| s.opt_socket_addr().map(|v| c.server.admin_listen = v)),
    },
    Key {
        name: "server.hostnames",
        default: "[]",
        note: "IP addresses and `localhost` only",
        meaning: "host names this box is served under (`Host` header; with no `allowed_origins`, also the browser origins accepted); any other name gets 421, against DNS rebinding",
        set: Set::C(|c, s| s.hostnames().map(|v| c.server.hostnames = v)),
    },
    Key {
        name: "server.data_dir",
        default: "\"./hivegate-data\"",
        note: "or $STATE_DIRECTORY",
        meaning: "where the database lives",
        set: Set::C(|c, s| s.path().map(|v| c.server.data_dir = v)),
    },
    Key {
        name: "server.max_connections",
        default: "1000",
        note: "",
        meaning: "connection table capacity (1..=1000000)",
        set: Set::C(|c, s| s.usize(1, 1_000_000).map(|v| c.server.max_connections = v)),
    },
    Key {
        name: "server.max_connections_per_ip",
        default: "10",
        note: "",
        meaning: "open WebSocket connections per client IP",
        set: Set::C(|c, s| s.u32(1, 1_000_000).map(|v| c.server.max_connections_per_ip = v)),
    },
    Key {
        name: "server.max_handshakes",
        default: "256",
        note: "",
        meaning: "sockets still sending their HTTP head; past it new sockets are closed at once (the last eighth only for addresses holding none)",
        set: Set::C(|c, s| s.usize(1, 100_000).map(|v| c.server.max_handshakes = v)),
    },
    Key {
        name: "server.max_handshakes_per_ip",
        default: "16",
        note: "",
        meaning: "sockets one client IP may have still sending their HTTP head",
        set: Set::C(|c, s| s.u32(1, 100_000).map(|v| c.server.max_handshakes_per_ip = v)),
    },
    Key {
        name: "server.handshake_timeout_ms",
        default: "5000",
        note: "",
        meaning: "time to send the HTTP head and finish the upgrade",
        set: Set::C(|c, s| s.millis(10, 600_000).map(|v| c.server.handshake_timeout = v)),
    },
    Key {
        name: "server.hello_timeout_ms",
        default: "10000",
        note: "",
        meaning: "time to send `hello` after the upgrade (close 4002)",
        set: Set::C(|c, s| s.millis(10, 600_000).map(|v| c.server.hello_timeout = v)),
    },
    Key {
        name: "server.ping_interval_ms",
        default: "25000",
        note: "",
        meaning: "WebSocket ping period",
        set: Set::C(|c, s| s.millis(10, 3_600_000).map(|v| c.server.ping_interval = v)),
    },
    Key {
        name: "server.pong_timeout_ms",
        default: "10000",
        note: "",
        meaning: "close 4009 when no pong arrives within this",
        set: Set::C(|c, s| s.millis(10, 3_600_000).map(|v| c.server.pong_timeout = v)),
    },
    Key {
        name: "server.max_message_bytes",
        default: "65536",
        note: "",
        meaning: "largest inbound message; above it close 1009",
        set: Set::C(|c, s| s.usize(256, 16 << 20).map(|v| c.server.max_message_bytes = v)),
    },
    Key {
        name: "server.outbox_frames",
        default: "64",
        note: "",
        meaning: "per-connection outbound queue in frames (1..=64); full means close 4008",
        set: Set::C(|c, s| s.usize(1, MAX_OUTBOX_FRAMES).map(|v| c.server.outbox_frames = v)),
    },
    Key {
        name: "server.outbox_bytes",
        default: "1048576",
        note: "",
        meaning: "per-connection outbound queue in bytes; full means close 4008",
        set: Set::C(|c, s| s.usize(1024, 1 << 30).map(|v| c.server.outbox_bytes = v)),
    },
    Key {
        name: "server.drain_timeout_ms",
        default: "10000",
        note: "",
        meaning: "graceful shutdown budget after SIGTERM",
        set: Set::C(|c, s| s.millis(0, 600_000).map(|v| c.server.drain_timeout = v)),
    },
    Key {
        name: "server.memory_limit_bytes",
        default: "0",
        note: "90% of systemd's MemoryMax, or none",
        meaning: "above this resident memory new connections are refused (503) and /readyz is 503",
        set: Set::C(|c, s| s.int(0, 1 << 50).map(|v| c.server.memory_limit_bytes = v as u64)),
    },
    Key {
        name: "server.echo_endpoint",
        default: "false",
        note: "",
        meaning: "for conformance tests only: /ws-echo echoes every message (Autobahn|Testsuite); never in production",
        set: Set::C(|c, s| s.boolean().map(|v| c.server.echo_endpoint = v)),
    },
    Key {
        name: "server.allowed_origins",
        default: "[]",
        note: "this box's own names",
        meaning: "exact browser `Origin` values allowed to upgrade and call `/mcp`; when empty, origins whose host is an IP address, `localhost` or one of `server.hostnames`",
        set: Set::C(|c, s| s.strings().map(|v| c.server.allowed_origins = v)),
    },
    Key {
        name: "server.tls_cert_file",
        default: "\"\"",
        note: "plain TCP",
        meaning: "PEM certificate chain: serve HTTPS and `wss://` on the listen port (with `tls_key_file`; both re-read on SIGHUP)",
        set: Set::C(|c, s| s.opt_path().map(|v| c.server.tls_cert_file = v)),
    },
    Key {
        name: "server.tls_key_file",
        default: "\"\"",
        note: "plain TCP",
        meaning: "PEM private key of `tls_cert_file`",
        set: Set::C(|c, s| s.opt_path().map(|v| c.server.tls_key_file = v)),
    },
    Key {
        name: "server.upstream_ca_file",
        default: "\"/etc/ssl/certs/ca-certificates.crt\"",
        note: "Debian's `ca-certificates`",
        meaning: "PEM bundle of the CAs trusted for `https://` providers and remote; read at start, only when an upstream is `https://`",
        set: Set::C(|c, s| s.path().map(|v| c.server.upstream_ca_file = v)),
    },
    Key {
        name: "auth.mode",
        default: "\"token\"",
        note: "`open` when no tokens are set and the listen address is loopback",
        meaning: "`token` (tokens from `auth.tokens`), `jwt` (signed tokens, see `auth.jwt_*`), or `open` (anyone may connect as a guest); write it out: a reload never changes an inferred mode",
        set: Set::C(|c, s| s.choice(&[("token", AuthMode::Token), ("open", AuthMode::Open), ("jwt", AuthMode::Jwt)]).map(|v| c.auth.mode = v)),
    },
    Key {
        name: "auth.tokens",
        default: "[]",
        note: "",
        meaning: "`\"user:token\"` or `\"user:sha256:HEX\"` entries, each with optional roles after a colon (`\"alice:TOKEN:staff,ops\"`; role `user` when none)",
        set: Set::C(|c, s| s.tokens().map(|v| c.auth.tokens = v)),
    },
    Key {
        name: "auth.jwt_secret_file",
        default: "",
        note: "no HS256",
        meaning: "file holding the HS256 secret (Supabase's legacy JWT secret), at least 32 bytes; re-read on SIGHUP",
        set: Set::C(|c, s| s.path().map(|v| c.auth.jwt.secret_file = Some(v))),
    },
    Key {
        name: "auth.jwks_file",
        default: "",
        note: "no RS256, ES256, EdDSA",
        meaning: "file holding a JSON Web Key Set (Supabase's `/auth/v1/.well-known/jwks.json`); tokens name their key by `kid`; re-read on SIGHUP",
        set: Set::C(|c, s| s.path().map(|v| c.auth.jwt.jwks_file = Some(v))),
    },
    Key {
        name: "auth.jwt_issuer",
        default: "",
        note: "not checked",
        meaning: "the `iss` a token must carry (Supabase: `https://PROJECT.supabase.co/auth/v1`)",
        set: Set::C(|c, s| s.string().map(|v| c.auth.jwt.issuer = Some(v).filter(|v| !v.is_empty()))),
    },
    Key {
        name: "auth.jwt_audience",
        default: "[]",
        note: "not checked",
        meaning: "`aud` values accepted (Supabase: `[\"authenticated\"]`)",
        set: Set::C(|c, s| s.strings().map(|v| c.auth.jwt.audience = v)),
    },
    Key {
        name: "auth.jwt_user_claim",
        default: "\"sub\"",
        note: "",
        meaning: "the claim holding the user name (1-64 of `[A-Za-z0-9_.-]`)",
        set: Set::C(|c, s| s.string().map(|v| c.auth.jwt.user_claim = v)),
    },
    Key {
        name: "auth.jwt_roles_claim",
        default: "\"role\"",
        note: "",
        meaning: "the claim holding the roles, a string or a list (role `user` when absent)",
        set: Set::C(|c, s| s.string().map(|v| c.auth.jwt.roles_claim = v)),
    },
    Key {
        name: "auth.jwt_leeway_s",
        default: "30",
        note: "",
        meaning: "clock skew allowed when checking `exp` and `nbf`",
        set: Set::C(|c, s| s.int(0, 600).map(|v| c.auth.jwt.leeway_s = v as u64)),
    },
    Key {
        name: "pool.threads",
        default: "2",
        note: "",
        meaning: "threads of the blocking pool (SQLite, HTTP)",
        set: Set::C(|c, s| s.usize(1, 64).map(|v| c.pool.threads = v)),
    },
    Key {
        name: "pool.queue",
        default: "256",
        note: "",
        meaning: "jobs waiting for a pool thread; past it OVER_CAPACITY",
        set: Set::C(|c, s| s.usize(1, 1_000_000).map(|v| c.pool.queue = v)),
    },
    Key {
        name: "store.synchronous",
        default: "\"full\"",
        note: "",
        meaning: "SQLite `synchronous`: `full`, `normal` or `off`",
        set: Set::C(|c, s| s.choice(&[("full", Synchronous::Full), ("normal", Synchronous::Normal), ("off", Synchronous::Off)]).map(|v| c.store.synchronous = v)),
    },
    Key {
        name: "store.retention_days",
        default: "30",
        note: "",
        meaning: "messages older than this are deleted",
        set: Set::C(|c, s| s.int(1, 36_500).map(|v| c.store.retention = Duration::from_secs(v as u64 * 86_400))),
    },
    Key {
        name: "store.max_messages_per_room",
        default: "100000",
        note: "",
        meaning: "the oldest messages beyond this are deleted",
        set: Set::C(|c, s| s.int(1, 1_000_000_000).map(|v| c.store.max_messages_per_room = v)),
    },
    Key {
        name: "store.write_queue",
        default: "1024",
        note: "",
        meaning: "writes waiting for the next group commit; past it OVER_CAPACITY",
        set: Set::C(|c, s| s.usize(1, 1_000_000).map(|v| c.store.write_queue = v)),
    },
    Key {
        name: "store.batch_max",
        default: "256",
        note: "",
        meaning: "most writes in one transaction",
        set: Set::C(|c, s| s.usize(1, 10_000).map(|v| c.store.batch_max = v)),
    },
    Key {
        name: "store.max_db_bytes",
        default: "1073741824",
        note: "",
        meaning: "database size bound; near it shipped messages are deleted, at it publishes are refused",
        set: Set::C(|c, s| s.int(1 << 16, 1 << 50).map(|v| c.store.max_db_bytes = v)),
    },
    Key {
        name: "store.check_interval_ms",
        default: "5000",
        note: "",
        meaning: "how often the database size is checked",
        set: Set::C(|c, s| s.millis(10, 3_600_000).map(|v| c.store.check_interval = v)),
    },
    Key {
        name: "chat.rooms_per_session",
        default: "32",
        note: "",
        meaning: "rooms one connection may be in",
        set: Set::C(|c, s| s.usize(1, 10_000).map(|v| c.chat.rooms_per_session = v)),
    },
    Key {
        name: "chat.members_per_room",
        default: "10000",
        note: "",
        meaning: "connections in one room",
        set: Set::C(|c, s| s.usize(1, 1_000_000).map(|v| c.chat.members_per_room = v)),
    },
    Key {
        name: "chat.max_text_bytes",
        default: "8192",
        note: "",
        meaning: "longest message text",
        set: Set::C(|c, s| s.usize(1, 1 << 20).map(|v| c.chat.max_text_bytes = v)),
    },
    Key {
        name: "limits.global_capacity",
        default: "1000",
        note: "",
        meaning: "gateway-wide request bucket: burst",
        set: Set::C(|c, s| s.float(1.0, 1e9).map(|v| c.limits.global.capacity = v)),
    },
    Key {
        name: "limits.global_refill_per_s",
        default: "100",
        note: "",
        meaning: "gateway-wide request bucket: tokens per second",
        set: Set::C(|c, s| s.float(0.001, 1e9).map(|v| c.limits.global.refill_per_s = v)),
    },
    Key {
        name: "limits.ip_capacity",
        default: "100",
        note: "",
        meaning: "per-client-IP request bucket: burst",
        set: Set::C(|c, s| s.float(1.0, 1e9).map(|v| c.limits.ip.capacity = v)),
    },
    Key {
        name: "limits.ip_refill_per_s",
        default: "10",
        note: "",
        meaning: "per-client-IP request bucket: tokens per second",
        set: Set::C(|c, s| s.float(0.001, 1e9).map(|v| c.limits.ip.refill_per_s = v)),
    },
    Key {
        name: "limits.user_capacity",
        default: "50",
        note: "",
        meaning: "per-user request bucket: burst",
        set: Set::C(|c, s| s.float(1.0, 1e9).map(|v| c.limits.user.capacity = v)),
    },
    Key {
        name: "limits.user_refill_per_s",
        default: "5",
        note: "",
        meaning: "per-user request bucket: tokens per second",
        set: Set::C(|c, s| s.float(0.001, 1e9).map(|v| c.limits.user.refill_per_s = v)),
    },
    Key {
        name: "limits.ip_connect_capacity",
        default: "20",
        note: "",
        meaning: "new connections per IP: burst",
        set: Set::C(|c, s| s.float(1.0, 1e9).map(|v| c.limits.ip_connect.capacity = v)),
    },
    Key {
        name: "limits.ip_connect_refill_per_s",
        default: "2",
        note: "",
        meaning: "new connections per IP: per second",
        set: Set::C(|c, s| s.float(0.001, 1e9).map(|v| c.limits.ip_connect.refill_per_s = v)),
    },
    Key {
        name: "limits.abuse_threshold",
        default: "50",
        note: "",
        meaning: "refusals within 10 s before close 1008",
        set: Set::C(|c, s| s.int(1, 1_000_000).map(|v| c.limits.abuse_threshold = v as u64)),
    },
    Key {
        name: "limits.failed_hellos_per_minute",
        default: "5",
        note: "",
        meaning: "refused hellos (bad or missing token) one IP may have in a minute; past it its upgrades get 429 until the minute has passed",
        set: Set::C(|c, s| s.float(1.0, 1e6).map(|v| c.limits.failed_hellos_per_minute = v)),
    },
    Key {
        name: "limits.table_entries",
        default: "4096",
        note: "",
        meaning: "most buckets in each per-IP and per-user table",
        set: Set::C(|c, s| s.usize(16, 1_000_000).map(|v| c.limits.table_entries = v)),
    },
    Key {
        name: "llm.chain",
        default: "",
        note: "the providers in file order",
        meaning: "fallback order for `provider: \"auto\"`, a list of names",
        set: Set::C(|c, s| s.strings().map(|v| c.llm.chain = v)),
    },
    Key {
        name: "llm.max_in_flight",
        default: "24",
        note: "",
        meaning: "LLM calls at once, gateway-wide (also the upstream pool's threads)",
        set: Set::C(|c, s| s.u32(1, 1024).map(|v| c.llm.max_in_flight = v)),
    },
    Key {
        name: "llm.max_in_flight_per_session",
        default: "8",
        note: "",
        meaning: "LLM calls at once per connection",
        set: Set::C(|c, s| s.u32(1, 1024).map(|v| c.llm.max_in_flight_per_session = v)),
    },
    Key {
        name: "llm.max_prompt_bytes",
        default: "32768",
        note: "",
        meaning: "total `content` of a call's messages",
        set: Set::C(|c, s| s.usize(1, 16 << 20).map(|v| c.llm.max_prompt_bytes = v)),
    },
    Key {
        name: "llm.max_response_bytes",
        default: "1048576",
        note: "",
        meaning: "longest answer relayed; past it the call ends with an error",
        set: Set::C(|c, s| s.usize(1024, 64 << 20).map(|v| c.llm.max_response_bytes = v)),
    },
    Key {
        name: "llm.max_retries",
        default: "2",
        note: "",
        meaning: "retries of a failure before the first streamed byte, per provider",
        set: Set::C(|c, s| s.u32(0, 10).map(|v| c.llm.max_retries = v)),
    },
    Key {
        name: "llm.backoff_base_ms",
        default: "250",
        note: "",
        meaning: "first retry waits up to this (full jitter, doubling)",
        set: Set::C(|c, s| s.millis(1, 60_000).map(|v| c.llm.backoff_base = v)),
    },
    Key {
        name: "llm.backoff_cap_ms",
        default: "5000",
        note: "",
        meaning: "longest wait between retries",
        set: Set::C(|c, s| s.millis(1, 600_000).map(|v| c.llm.backoff_cap = v)),
    },
    Key {
        name: "llm.progress_interval_ms",
        default: "5000",
        note: "",
        meaning: "`progress` frames while the client has received nothing for this long",
        set: Set::C(|c, s| s.millis(10, 600_000).map(|v| c.llm.progress_interval = v)),
    },
    Key {
        name: "log.level",
        default: "\"info\"",
        note: "",
        meaning: "`error`, `warn`, `info` or `debug`",
        set: Set::C(|c, s| s.choice(&[("error", LogLevel::Error), ("warn", LogLevel::Warn), ("info", LogLevel::Info), ("debug", LogLevel::Debug)]).map(|v| c.log.level = v)),
    },
    Key {
        name: "log.format",
        default: "\"text\"",
        note: "",
        meaning: "`text` or `json` (one object per line)",
        set: Set::C(|c, s| s.choice(&[("text", LogFormat::Text), ("json", LogFormat::Json)]).map(|v| c.log.format = v)),
    },
];
