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
/// Keys renamed when every duration came to end in `_ms`: the old name is
/// still read (its value times the factor), with a warning that says what
/// to write instead.
pub const RENAMED: [(&str, &str, i64); 3] = [
    ("auth.jwt_leeway_s", "auth.jwt_leeway_ms", 1000),
    ("store.retention_days", "store.retention_ms", 86_400_000),
    (
        "cluster.outbox_max_age_s",
        "cluster.outbox_max_age_ms",
        1000,
    ),
];

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
    /// A SIGHUP applies a change to it (`server::reload`); otherwise a
    /// restart does. A test holds this to what the reload really does.
    pub reloadable: bool,
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

/// The keys of the sections every configuration has.
pub const CORE: &[Key] = &[
    Key {
        name: "server.listen",
        reloadable: false,
        default: "\"127.0.0.1:8080\"",
        note: "",
        meaning: "address and port for HTTP and WebSocket (`localhost:PORT` is `127.0.0.1:PORT`); `serve --listen ADDR` wins over it",
        set: Set::C(|c, s| s.socket_addr().map(|v| c.server.listen = v)),
    },
    Key {
        name: "server.admin_listen",
        reloadable: false,
        default: "\"127.0.0.1:8081\"",
        note: "",
        meaning: "address and port of the operator endpoints (`/metrics`, the detailed `/readyz`), plain HTTP; keep it on loopback; `\"\"` turns them off",
        set: Set::C(|c, s| s.opt_socket_addr().map(|v| c.server.admin_listen = v)),
    },
    Key {
        name: "server.hostnames",
        reloadable: true,
        default: "[]",
        note: "IP addresses and `localhost` only",
        meaning: "host names this box is served under (`Host` header; with no `allowed_origins`, also the browser origins accepted); any other name gets 421, against DNS rebinding",
        set: Set::C(|c, s| s.hostnames().map(|v| c.server.hostnames = v)),
    },
    Key {
        name: "server.data_dir",
        reloadable: false,
        default: "\"./hivegate-data\"",
        note: "or $STATE_DIRECTORY",
        meaning: "where the database lives",
        set: Set::C(|c, s| s.path().map(|v| c.server.data_dir = v)),
    },
    Key {
        name: "server.max_connections",
        reloadable: false,
        default: "1000",
        note: "",
        meaning: "connection table capacity (1..=1000000)",
        set: Set::C(|c, s| s.usize(1, 1_000_000).map(|v| c.server.max_connections = v)),
    },
    Key {
        name: "server.max_connections_per_ip",
        reloadable: false,
        default: "10",
        note: "",
        meaning: "open WebSocket connections per client IP",
        set: Set::C(|c, s| s.u32(1, 1_000_000).map(|v| c.server.max_connections_per_ip = v)),
    },
    Key {
        name: "server.max_handshakes",
        reloadable: false,
        default: "256",
        note: "",
        meaning: "sockets still sending their HTTP head; past it new sockets are closed at once (the last eighth only for addresses holding none)",
        set: Set::C(|c, s| s.usize(1, 100_000).map(|v| c.server.max_handshakes = v)),
    },
    Key {
        name: "server.max_handshakes_per_ip",
        reloadable: false,
        default: "16",
        note: "",
        meaning: "sockets one client IP may have still sending their HTTP head",
        set: Set::C(|c, s| s.u32(1, 100_000).map(|v| c.server.max_handshakes_per_ip = v)),
    },
    Key {
        name: "server.handshake_timeout_ms",
        reloadable: false,
        default: "5000",
        note: "",
        meaning: "time to send the HTTP head and finish the upgrade",
        set: Set::C(|c, s| s.millis(10, 600_000).map(|v| c.server.handshake_timeout = v)),
    },
    Key {
        name: "server.hello_timeout_ms",
        reloadable: false,
        default: "10000",
        note: "",
        meaning: "time to send `hello` after the upgrade (close 4002)",
        set: Set::C(|c, s| s.millis(10, 600_000).map(|v| c.server.hello_timeout = v)),
    },
    Key {
        name: "server.ping_interval_ms",
        reloadable: false,
        default: "25000",
        note: "",
        meaning: "WebSocket ping period",
        set: Set::C(|c, s| s.millis(10, 3_600_000).map(|v| c.server.ping_interval = v)),
    },
    Key {
        name: "server.pong_timeout_ms",
        reloadable: false,
        default: "10000",
        note: "",
        meaning: "close 4009 when no pong arrives within this",
        set: Set::C(|c, s| s.millis(10, 3_600_000).map(|v| c.server.pong_timeout = v)),
    },
    Key {
        name: "server.max_message_bytes",
        reloadable: false,
        default: "65536",
        note: "",
        meaning: "largest inbound message; above it close 1009",
        set: Set::C(|c, s| s.usize(256, 16 << 20).map(|v| c.server.max_message_bytes = v)),
    },
    Key {
        name: "server.outbox_frames",
        reloadable: false,
        default: "64",
        note: "",
        meaning: "per-connection outbound queue in frames (1..=64); full means close 4008",
        set: Set::C(|c, s| s.usize(1, MAX_OUTBOX_FRAMES).map(|v| c.server.outbox_frames = v)),
    },
    Key {
        name: "server.outbox_bytes",
        reloadable: false,
        default: "1048576",
        note: "",
        meaning: "per-connection outbound queue in bytes; full means close 4008",
        set: Set::C(|c, s| s.usize(1024, 1 << 30).map(|v| c.server.outbox_bytes = v)),
    },
    Key {
        name: "server.drain_timeout_ms",
        reloadable: false,
        default: "10000",
        note: "",
        meaning: "graceful shutdown budget after SIGTERM",
        set: Set::C(|c, s| s.millis(0, 600_000).map(|v| c.server.drain_timeout = v)),
    },
    Key {
        name: "server.memory_limit_bytes",
        reloadable: true,
        default: "0",
        note: "90% of systemd's MemoryMax, or none",
        meaning: "above this resident memory new connections are refused (503) and /readyz is 503",
        set: Set::C(|c, s| s.int(0, 1 << 50).map(|v| c.server.memory_limit_bytes = v as u64)),
    },
    Key {
        name: "server.echo_endpoint",
        reloadable: false,
        default: "false",
        note: "",
        meaning: "for conformance tests only: /ws-echo echoes every message (Autobahn|Testsuite); never in production",
        set: Set::C(|c, s| s.boolean().map(|v| c.server.echo_endpoint = v)),
    },
    Key {
        name: "server.trusted_proxies",
        reloadable: false,
        default: "[]",
        note: "none: every socket is its own client",
        meaning: "reverse proxies (addresses or networks, `[\"127.0.0.1\", \"10.0.0.0/8\"]`) whose word about the client's address is taken: the PROXY header where `proxy_protocol` is on, else `Forwarded` or `X-Forwarded-For` (the right-most entry that is not a trusted proxy); from anyone else these are ignored",
        set: Set::C(|c, s| {
            s.strings().and_then(|list| {
                list.iter()
                    .map(|n| crate::forwarded::Cidr::parse(n).map_err(|e| format!("{}: {e}", s.key)))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|v| c.server.trusted_proxies = crate::forwarded::TrustedProxies(v))
            })
        }),
    },
    Key {
        name: "server.proxy_protocol",
        reloadable: false,
        default: "false",
        note: "",
        meaning: "every connection from `trusted_proxies` starts with a PROXY protocol header (v1 or v2, e.g. HAProxy's `send-proxy`), which names the client; one without it is closed",
        set: Set::C(|c, s| s.boolean().map(|v| c.server.proxy_protocol = v)),
    },
    Key {
        name: "server.allowed_origins",
        reloadable: true,
        default: "[]",
        note: "this box's own names",
        meaning: "exact browser `Origin` values allowed to upgrade and call `/mcp`; when empty, origins whose host is an IP address, `localhost` or one of `server.hostnames`",
        set: Set::C(|c, s| s.strings().map(|v| c.server.allowed_origins = v)),
    },
    Key {
        name: "server.tls_cert_file",
        reloadable: true,
        default: "\"\"",
        note: "plain TCP",
        meaning: "PEM certificate chain: serve HTTPS and `wss://` on the listen port (with `tls_key_file`; both re-read on SIGHUP)",
        set: Set::C(|c, s| s.opt_path().map(|v| c.server.tls_cert_file = v)),
    },
    Key {
        name: "server.tls_key_file",
        reloadable: true,
        default: "\"\"",
        note: "plain TCP",
        meaning: "PEM private key of `tls_cert_file`",
        set: Set::C(|c, s| s.opt_path().map(|v| c.server.tls_key_file = v)),
    },
    Key {
        name: "server.upstream_ca_file",
        reloadable: false,
        default: "\"/etc/ssl/certs/ca-certificates.crt\"",
        note: "Debian's `ca-certificates`",
        meaning: "PEM bundle of the CAs trusted for `https://` providers and remote; read at start, only when an upstream is `https://`",
        set: Set::C(|c, s| s.path().map(|v| c.server.upstream_ca_file = v)),
    },
    Key {
        name: "auth.mode",
        reloadable: true,
        default: "\"token\"",
        note: "`open` when no tokens are set and the listen address is loopback",
        meaning: "`token` (tokens from `auth.tokens`), `jwt` (signed tokens, see `auth.jwt_*`), or `open` (anyone may connect as a guest); write it out: a reload never changes an inferred mode",
        set: Set::C(|c, s| s.choice(&[("token", AuthMode::Token), ("open", AuthMode::Open), ("jwt", AuthMode::Jwt)]).map(|v| c.auth.mode = v)),
    },
    Key {
        name: "auth.tokens",
        reloadable: true,
        default: "[]",
        note: "",
        meaning: "`\"user:token\"` or `\"user:sha256:HEX\"` entries, each with optional roles after a colon (`\"alice:TOKEN:staff,ops\"`; role `user` when none)",
        set: Set::C(|c, s| s.tokens().map(|v| c.auth.tokens = v)),
    },
    Key {
        name: "auth.jwt_secret_file",
        reloadable: true,
        default: "",
        note: "no HS256",
        meaning: "file holding the HS256 secret (Supabase's legacy JWT secret), at least 32 bytes; re-read on SIGHUP",
        set: Set::C(|c, s| s.path().map(|v| c.auth.jwt.secret_file = Some(v))),
    },
    Key {
        name: "auth.jwks_file",
        reloadable: true,
        default: "",
        note: "no RS256, ES256, EdDSA",
        meaning: "file holding a JSON Web Key Set (Supabase's `/auth/v1/.well-known/jwks.json`); tokens name their key by `kid`; re-read on SIGHUP",
        set: Set::C(|c, s| s.path().map(|v| c.auth.jwt.jwks_file = Some(v))),
    },
    Key {
        name: "auth.jwt_issuer",
        reloadable: true,
        default: "",
        note: "not checked",
        meaning: "the `iss` a token must carry (Supabase: `https://PROJECT.supabase.co/auth/v1`)",
        set: Set::C(|c, s| s.string().map(|v| c.auth.jwt.issuer = Some(v).filter(|v| !v.is_empty()))),
    },
    Key {
        name: "auth.jwt_audience",
        reloadable: true,
        default: "[]",
        note: "not checked",
        meaning: "`aud` values accepted (Supabase: `[\"authenticated\"]`)",
        set: Set::C(|c, s| s.strings().map(|v| c.auth.jwt.audience = v)),
    },
    Key {
        name: "auth.jwt_user_claim",
        reloadable: true,
        default: "\"sub\"",
        note: "",
        meaning: "the claim holding the user name (1-64 of `[A-Za-z0-9_.-]`)",
        set: Set::C(|c, s| s.string().map(|v| c.auth.jwt.user_claim = v)),
    },
    Key {
        name: "auth.jwt_roles_claim",
        reloadable: true,
        default: "\"role\"",
        note: "",
        meaning: "the claim holding the roles, a string or a list (role `user` when absent)",
        set: Set::C(|c, s| s.string().map(|v| c.auth.jwt.roles_claim = v)),
    },
    Key {
        name: "auth.jwt_leeway_ms",
        reloadable: true,
        default: "30000",
        note: "30 s",
        meaning: "clock skew allowed when checking `exp` and `nbf` (whole seconds count: tokens carry seconds)",
        set: Set::C(|c, s| s.int(0, 600_000).map(|v| c.auth.jwt.leeway_s = (v as u64).div_ceil(1000))),
    },
    Key {
        name: "pool.threads",
        reloadable: false,
        default: "2",
        note: "",
        meaning: "threads of the blocking pool (SQLite, HTTP)",
        set: Set::C(|c, s| s.usize(1, 64).map(|v| c.pool.threads = v)),
    },
    Key {
        name: "pool.queue",
        reloadable: false,
        default: "256",
        note: "",
        meaning: "jobs waiting for a pool thread; past it OVER_CAPACITY",
        set: Set::C(|c, s| s.usize(1, 1_000_000).map(|v| c.pool.queue = v)),
    },
    Key {
        name: "store.synchronous",
        reloadable: false,
        default: "\"full\"",
        note: "",
        meaning: "SQLite `synchronous`: `full`, `normal` or `off`",
        set: Set::C(|c, s| s.choice(&[("full", Synchronous::Full), ("normal", Synchronous::Normal), ("off", Synchronous::Off)]).map(|v| c.store.synchronous = v)),
    },
    Key {
        name: "store.retention_ms",
        reloadable: false,
        default: "2592000000",
        note: "30 days",
        meaning: "messages older than this are deleted (at least a day)",
        set: Set::C(|c, s| s.int(86_400_000, 3_153_600_000_000).map(|v| c.store.retention = Duration::from_millis(v as u64))),
    },
    Key {
        name: "store.max_messages_per_room",
        reloadable: false,
        default: "100000",
        note: "",
        meaning: "the oldest messages beyond this are deleted",
        set: Set::C(|c, s| s.int(1, 1_000_000_000).map(|v| c.store.max_messages_per_room = v)),
    },
    Key {
        name: "store.write_queue",
        reloadable: false,
        default: "1024",
        note: "",
        meaning: "writes waiting for the next group commit; past it OVER_CAPACITY",
        set: Set::C(|c, s| s.usize(1, 1_000_000).map(|v| c.store.write_queue = v)),
    },
    Key {
        name: "store.batch_max",
        reloadable: false,
        default: "256",
        note: "",
        meaning: "most writes in one transaction",
        set: Set::C(|c, s| s.usize(1, 10_000).map(|v| c.store.batch_max = v)),
    },
    Key {
        name: "store.max_db_bytes",
        reloadable: false,
        default: "1073741824",
        note: "",
        meaning: "database size bound; near it shipped messages are deleted, at it publishes are refused",
        set: Set::C(|c, s| s.int(1 << 16, 1 << 50).map(|v| c.store.max_db_bytes = v)),
    },
    Key {
        name: "store.check_interval_ms",
        reloadable: false,
        default: "5000",
        note: "",
        meaning: "how often the database size is checked",
        set: Set::C(|c, s| s.millis(10, 3_600_000).map(|v| c.store.check_interval = v)),
    },
    Key {
        name: "chat.rooms_per_session",
        reloadable: false,
        default: "32",
        note: "",
        meaning: "rooms one connection may be in",
        set: Set::C(|c, s| s.usize(1, 10_000).map(|v| c.chat.rooms_per_session = v)),
    },
    Key {
        name: "chat.members_per_room",
        reloadable: false,
        default: "10000",
        note: "",
        meaning: "connections in one room",
        set: Set::C(|c, s| s.usize(1, 1_000_000).map(|v| c.chat.members_per_room = v)),
    },
    Key {
        name: "chat.max_text_bytes",
        reloadable: false,
        default: "8192",
        note: "",
        meaning: "longest message text",
        set: Set::C(|c, s| s.usize(1, 1 << 20).map(|v| c.chat.max_text_bytes = v)),
    },
    Key {
        name: "mcp.max_sessions",
        reloadable: false,
        default: "256",
        note: "",
        meaning: "MCP sessions over HTTP at once; past it the one idle longest is closed",
        set: Set::C(|c, s| s.usize(1, 100_000).map(|v| c.mcp.max_sessions = v)),
    },
    Key {
        name: "mcp.max_sessions_per_owner",
        reloadable: false,
        default: "8",
        note: "",
        meaning: "MCP sessions one user (in open mode, one address) may hold; past it its own oldest is closed",
        set: Set::C(|c, s| s.usize(1, 100_000).map(|v| c.mcp.max_sessions_per_owner = v)),
    },
    Key {
        name: "mcp.session_idle_ms",
        reloadable: false,
        default: "1800000",
        note: "",
        meaning: "an MCP session unused this long is gone",
        set: Set::C(|c, s| s.millis(1000, 86_400_000).map(|v| c.mcp.session_idle = v)),
    },
    Key {
        name: "limits.global_capacity",
        reloadable: true,
        default: "1000",
        note: "",
        meaning: "gateway-wide request bucket: burst",
        set: Set::C(|c, s| s.float(1.0, 1e9).map(|v| c.limits.global.capacity = v)),
    },
    Key {
        name: "limits.global_refill_per_s",
        reloadable: true,
        default: "100",
        note: "",
        meaning: "gateway-wide request bucket: tokens per second",
        set: Set::C(|c, s| s.float(0.001, 1e9).map(|v| c.limits.global.refill_per_s = v)),
    },
    Key {
        name: "limits.ip_capacity",
        reloadable: true,
        default: "100",
        note: "",
        meaning: "per-client-IP request bucket: burst",
        set: Set::C(|c, s| s.float(1.0, 1e9).map(|v| c.limits.ip.capacity = v)),
    },
    Key {
        name: "limits.ip_refill_per_s",
        reloadable: true,
        default: "10",
        note: "",
        meaning: "per-client-IP request bucket: tokens per second",
        set: Set::C(|c, s| s.float(0.001, 1e9).map(|v| c.limits.ip.refill_per_s = v)),
    },
    Key {
        name: "limits.user_capacity",
        reloadable: true,
        default: "50",
        note: "",
        meaning: "per-user request bucket: burst",
        set: Set::C(|c, s| s.float(1.0, 1e9).map(|v| c.limits.user.capacity = v)),
    },
    Key {
        name: "limits.user_refill_per_s",
        reloadable: true,
        default: "5",
        note: "",
        meaning: "per-user request bucket: tokens per second",
        set: Set::C(|c, s| s.float(0.001, 1e9).map(|v| c.limits.user.refill_per_s = v)),
    },
    Key {
        name: "limits.ip_connect_capacity",
        reloadable: true,
        default: "20",
        note: "",
        meaning: "new connections per IP: burst",
        set: Set::C(|c, s| s.float(1.0, 1e9).map(|v| c.limits.ip_connect.capacity = v)),
    },
    Key {
        name: "limits.ip_connect_refill_per_s",
        reloadable: true,
        default: "2",
        note: "",
        meaning: "new connections per IP: per second",
        set: Set::C(|c, s| s.float(0.001, 1e9).map(|v| c.limits.ip_connect.refill_per_s = v)),
    },
    Key {
        name: "limits.abuse_threshold",
        reloadable: true,
        default: "50",
        note: "",
        meaning: "refusals within 10 s before close 1008",
        set: Set::C(|c, s| s.int(1, 1_000_000).map(|v| c.limits.abuse_threshold = v as u64)),
    },
    Key {
        name: "limits.failed_hellos_per_minute",
        reloadable: true,
        default: "5",
        note: "",
        meaning: "refused hellos (bad or missing token) one IP may have in a minute; past it its upgrades get 429 until the minute has passed",
        set: Set::C(|c, s| s.float(1.0, 1e6).map(|v| c.limits.failed_hellos_per_minute = v)),
    },
    Key {
        name: "limits.table_entries",
        reloadable: false,
        default: "4096",
        note: "",
        meaning: "most buckets in each per-IP and per-user table",
        set: Set::C(|c, s| s.usize(16, 1_000_000).map(|v| c.limits.table_entries = v)),
    },
    Key {
        name: "llm.chain",
        reloadable: false,
        default: "",
        note: "the providers in file order",
        meaning: "fallback order for `provider: \"auto\"`, a list of names",
        set: Set::C(|c, s| s.strings().map(|v| c.llm.chain = v)),
    },
    Key {
        name: "llm.max_in_flight",
        reloadable: false,
        default: "24",
        note: "",
        meaning: "LLM calls at once, gateway-wide (also the upstream pool's threads)",
        set: Set::C(|c, s| s.u32(1, 1024).map(|v| c.llm.max_in_flight = v)),
    },
    Key {
        name: "llm.max_in_flight_per_session",
        reloadable: false,
        default: "8",
        note: "",
        meaning: "LLM calls at once per connection",
        set: Set::C(|c, s| s.u32(1, 1024).map(|v| c.llm.max_in_flight_per_session = v)),
    },
    Key {
        name: "llm.max_prompt_bytes",
        reloadable: false,
        default: "32768",
        note: "",
        meaning: "total `content` of a call's messages",
        set: Set::C(|c, s| s.usize(1, 16 << 20).map(|v| c.llm.max_prompt_bytes = v)),
    },
    Key {
        name: "llm.max_response_bytes",
        reloadable: false,
        default: "1048576",
        note: "",
        meaning: "longest answer relayed; past it the call ends with an error",
        set: Set::C(|c, s| s.usize(1024, 64 << 20).map(|v| c.llm.max_response_bytes = v)),
    },
    Key {
        name: "llm.max_retries",
        reloadable: false,
        default: "2",
        note: "",
        meaning: "retries of a failure before the first streamed byte, per provider",
        set: Set::C(|c, s| s.u32(0, 10).map(|v| c.llm.max_retries = v)),
    },
    Key {
        name: "llm.backoff_base_ms",
        reloadable: false,
        default: "250",
        note: "",
        meaning: "first retry waits up to this (full jitter, doubling)",
        set: Set::C(|c, s| s.millis(1, 60_000).map(|v| c.llm.backoff_base = v)),
    },
    Key {
        name: "llm.backoff_cap_ms",
        reloadable: false,
        default: "5000",
        note: "",
        meaning: "longest wait between retries",
        set: Set::C(|c, s| s.millis(1, 600_000).map(|v| c.llm.backoff_cap = v)),
    },
    Key {
        name: "llm.progress_interval_ms",
        reloadable: false,
        default: "5000",
        note: "",
        meaning: "`progress` frames while the client has received nothing for this long",
        set: Set::C(|c, s| s.millis(10, 600_000).map(|v| c.llm.progress_interval = v)),
    },
    Key {
        name: "log.level",
        reloadable: false,
        default: "\"info\"",
        note: "",
        meaning: "`error`, `warn`, `info` or `debug`",
        set: Set::C(|c, s| s.choice(&[("error", LogLevel::Error), ("warn", LogLevel::Warn), ("info", LogLevel::Info), ("debug", LogLevel::Debug)]).map(|v| c.log.level = v)),
    },
    Key {
        name: "log.format",
        reloadable: false,
        default: "\"text\"",
        note: "",
        meaning: "`text` or `json` (one object per line)",
        set: Set::C(|c, s| s.choice(&[("text", LogFormat::Text), ("json", LogFormat::Json)]).map(|v| c.log.format = v)),
    },
];
