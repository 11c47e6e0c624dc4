//! Configuration: one TOML file, overridden key by key from the environment,
//! on top of an embedded default, validated as a whole.
//!
//! Key names are a contract with operators and scripts (see
//! `shared/CONFIG.md` and the README): `[server] listen` in the file is
//! `HIVEGATE_SERVER_LISTEN` in the environment, which wins. Every problem is
//! reported with its line (or variable) and the key it concerns; nothing is
//! silently ignored or clamped.

mod error;
mod keys;
mod sections;
mod setting;
mod toml;
mod words;

use error::mentioned;
pub use error::{ConfigError, ConfigErrors, Origin};
pub use keys::Key;
use keys::Set;
use setting::Setting;
pub use words::generate;
use words::unknown_key;

/// Every key: the core sections (`keys.rs`), then the optional ones
/// (`[remote]`, `[cluster]`, `[provider.NAME]`, `[[access]]`, in
/// `sections.rs`).
pub fn keys() -> impl Iterator<Item = &'static Key> {
    keys::CORE.iter().chain(sections::SECTIONS.iter())
}

use crate::auth::{AuthMode, Secret};
use crate::chat::ChatLimits;
use crate::limit::LimitParams;
use crate::llm::{LlmConfig, ProviderConfig};
use crate::ops::log::LogConfig;
use crate::pool::PoolConfig;
use crate::remote::RemoteConfig;
use crate::store::StoreConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Value;

#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: Server,
    pub auth: AuthConfig,
    pub limits: LimitParams,
    pub pool: PoolConfig,
    pub store: StoreConfig,
    pub chat: ChatLimits,
    /// `[mcp]`: the Streamable HTTP transport's session table.
    pub mcp: crate::mcp::McpConfig,
    pub llm: LlmConfig,
    /// `None`: local only, no sync at all.
    pub remote: Option<RemoteConfig>,
    /// `None`: one box alone.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// The `[[access]]` rules, in file order.
    pub access: Vec<crate::access::Rule>,
    pub log: LogConfig,
}

/// `[auth]`.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// The mode in force after validation: `Open` also when no tokens are
    /// configured and the listen address is loopback.
    pub mode: AuthMode,
    /// False when `auth.mode` was not written and the mode was inferred
    /// (token, or open for no tokens on loopback): a reload may not change
    /// such a mode (see `server::reload`).
    pub mode_explicit: bool,
    pub tokens: Vec<crate::auth::TokenEntry>,
    /// `auth.mode = "jwt"`: how tokens are verified.
    pub jwt: crate::jwt::JwtConfig,
}

impl AuthConfig {
    /// Open mode chosen because no tokens were configured, not written:
    /// worth a warning at start.
    pub fn implicit_open(&self) -> bool {
        self.mode == AuthMode::Open && !self.mode_explicit
    }
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    /// The operator endpoints' own listener; `None`: off.
    pub admin_listen: Option<SocketAddr>,
    /// Names this box answers to, besides IP addresses and `localhost`.
    pub hostnames: Vec<String>,
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
    /// Proxies whose word about the client's address is taken.
    pub trusted_proxies: crate::forwarded::TrustedProxies,
    /// Their connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Both or neither: TLS on the listen port.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// CAs for https:// upstreams.
    pub upstream_ca_file: PathBuf,
}

/// A blank to be filled from [`keys`] (`Config::default_with_env`); these
/// are not the defaults.
impl Default for Server {
    fn default() -> Self {
        Server {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: None,
            hostnames: Vec::new(),
            data_dir: PathBuf::new(),
            max_connections: 0,
            max_connections_per_ip: 0,
            max_handshakes: 0,
            max_handshakes_per_ip: 0,
            handshake_timeout: Duration::ZERO,
            hello_timeout: Duration::ZERO,
            ping_interval: Duration::ZERO,
            pong_timeout: Duration::ZERO,
            max_message_bytes: 0,
            outbox_frames: 0,
            outbox_bytes: 0,
            drain_timeout: Duration::ZERO,
            allowed_origins: Vec::new(),
            memory_limit_bytes: 0,
            echo_endpoint: false,
            trusted_proxies: crate::forwarded::TrustedProxies::default(),
            proxy_protocol: false,
            tls_cert_file: None,
            tls_key_file: None,
            upstream_ca_file: PathBuf::new(),
        }
    }
}

/// What a warning about a `HIVEGATE_*` variable that names no key says
/// (check-config counts it as an error; other warnings are warnings).
pub const UNKNOWN_VARIABLE: &str = "names no configuration key";

/// A key renamed (see [`keys::RENAMED`]): the new key and the value in
/// its unit, and the warning that says so; or the setting as it came.
fn renamed(key: &str, value: &Value, origin: &Origin) -> Option<(String, Value, String)> {
    let (old, new, factor) = keys::RENAMED.iter().find(|(old, _, _)| *old == key)?;
    let scaled = |n: i64| n.saturating_mul(*factor);
    let value = match value {
        Value::Int(n) => Value::Int(scaled(*n)),
        Value::Str(s) => match s.trim().parse::<i64>() {
            Ok(n) => Value::Str(scaled(n).to_string()),
            Err(_) => value.clone(),
        },
        other => other.clone(),
    };
    let shown = match &value {
        Value::Int(n) => n.to_string(),
        Value::Str(s) => s.clone(),
        _ => "...".into(),
    };
    let warning = ConfigError {
        origin: origin.clone(),
        message: format!(
            "{old} is deprecated: write {new} = {shown} (durations are in milliseconds)"
        ),
    };
    Some((new.to_string(), value, warning.to_string()))
}

impl Config {
    /// What removes every configured upstream key from upstream text.
    /// (Client tokens are not among them: only their digests are kept.)
    pub fn redactor(&self) -> crate::redact::Redactor {
        let providers = self.llm.providers.iter().filter_map(|p| p.api_key.as_ref());
        let remote = self.remote.iter().filter_map(|r| r.api_key.as_ref());
        crate::redact::Redactor::new(providers.chain(remote).map(|k| k.expose()))
    }

    /// The embedded default (loopback, local data only, no keys): every
    /// key's default from [`keys`], read as a file would be, and the data
    /// directory systemd names in `$STATE_DIRECTORY`.
    pub fn default_with_env(env: &[(String, String)]) -> Config {
        let mut cfg: Config = with_defaults(|set| match set {
            Set::C(f) => Some(*f),
            _ => None,
        });
        if let Some(dir) = env
            .iter()
            .find(|(k, _)| k == "STATE_DIRECTORY")
            // systemd may pass several directories separated by ':'.
            .and_then(|(_, v)| v.split(':').next().filter(|s| !s.is_empty()))
        {
            cfg.server.data_dir = PathBuf::from(dir);
        }
        cfg
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
        // Every key set and where: an error about two keys points at the
        // first it names.
        let mut set: Vec<(String, Origin)> = Vec::new();

        if let Some((path, text)) = file {
            match toml::parse(text) {
                Err(syntax) => errors.extend(syntax.into_iter().map(|e| ConfigError {
                    origin: Origin::File {
                        path: path.to_path_buf(),
                        line: e.line,
                    },
                    message: e.message,
                })),
                Ok(entries) => {
                    for mut entry in entries {
                        let origin = Origin::File {
                            path: path.to_path_buf(),
                            line: entry.line,
                        };
                        if let Some((key, value, warning)) =
                            renamed(&entry.key, &entry.value, &origin)
                        {
                            (entry.key, entry.value) = (key, value);
                            warnings.push(warning);
                        }
                        let setting = Setting {
                            key: &entry.key,
                            value: &entry.value,
                            from_env: false,
                            env,
                        };
                        track(&entry.key, &origin, &mut token_origin, &mut mode_set);
                        set.push((entry.key.clone(), origin.clone()));
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
                warnings.push(format!("environment variable {var} {UNKNOWN_VARIABLE}"));
                continue;
            };
            let origin = Origin::Env(var.clone());
            let (key, value) = match renamed(&key, &Value::Str(value.clone()), &origin) {
                Some((key, value, warning)) => {
                    warnings.push(warning);
                    (key, value)
                }
                None => (key, Value::Str(value.clone())),
            };
            track(&key, &origin, &mut token_origin, &mut mode_set);
            set.push((key.clone(), origin.clone()));
            let setting = Setting {
                key: &key,
                value: &value,
                from_env: true,
                env,
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
            let checks = [
                cfg.check_remote(env),
                cfg.check_cluster(),
                cfg.check_llm(env),
                cfg.check_access(),
            ];
            for message in checks.into_iter().filter_map(Result::err) {
                errors.push(ConfigError {
                    origin: mentioned(&message, &set),
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

    /// Stores one setting, through its key in [`keys`]. A `[remote]` or
    /// `[provider.NAME]` section comes into being, with its defaults, at
    /// its first key.
    fn apply(&mut self, s: &Setting) -> Result<(), String> {
        let mut rule = None;
        let (pattern, provider) = match s.key.strip_prefix("provider.") {
            Some(rest) => {
                let (name, field) = provider_key(s.key, rest)?;
                (format!("provider.NAME.{field}"), Some(name))
            }
            None => match access_key(s.key) {
                Some((n, field)) if !s.from_env => {
                    rule = Some(n);
                    (format!("access.N.{field}"), None)
                }
                _ => (s.key.to_string(), None),
            },
        };
        let key = keys()
            .find(|k| k.name == pattern)
            .ok_or_else(|| unknown_key(s.key))?;
        match (&key.set, provider) {
            (Set::C(f), _) => f(self, s),
            (Set::R(f), _) => {
                let remote = self.remote.get_or_insert_with(|| {
                    with_defaults(|set| match set {
                        Set::R(f) => Some(*f),
                        _ => None,
                    })
                });
                f(remote, s)
            }
            (Set::K(f), _) => {
                let cluster = self.cluster.get_or_insert_with(|| {
                    with_defaults(|set| match set {
                        Set::K(f) => Some(*f),
                        _ => None,
                    })
                });
                f(cluster, s)
            }
            (Set::P(f), Some(name)) => f(self.provider(name), s),
            (Set::P(_), None) => Err(unknown_key(s.key)),
            (Set::A(f), _) => {
                // The TOML reader numbers `[[access]]` tables 1, 2, ...
                let Some(n) = rule.filter(|n| *n >= 1 && *n <= self.access.len() + 1) else {
                    return Err(unknown_key(s.key));
                };
                if n > self.access.len() {
                    self.access.push(crate::access::Rule::default());
                }
                f(&mut self.access[n - 1], s)
            }
        }
    }

    /// The `[[access]]` rules, each checked against the providers.
    fn check_access(&self) -> Result<(), String> {
        let names: Vec<String> = self.llm.providers.iter().map(|p| p.name.clone()).collect();
        for (i, r) in self.access.iter().enumerate() {
            r.check(&names)
                .map_err(|e| format!("[[access]] rule {} {e}", i + 1))?;
        }
        Ok(())
    }

    /// The provider called `name`, created with its defaults if new.
    fn provider(&mut self, name: &str) -> &mut ProviderConfig {
        let providers = &mut self.llm.providers;
        let i = match providers.iter().position(|p| p.name == name) {
            Some(i) => i,
            None => {
                let mut p: ProviderConfig = with_defaults(|set| match set {
                    Set::P(f) => Some(*f),
                    _ => None,
                });
                p.name = name.to_string();
                providers.push(p);
                providers.len() - 1
            }
        };
        &mut providers[i]
    }

    /// The cluster, complete (see `ClusterConfig::complete`).
    fn check_cluster(&mut self) -> Result<(), String> {
        self.cluster.as_mut().map_or(Ok(()), |k| k.complete())
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
                &format!("provider.{}", p.name),
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
        if self.server.tls_cert_file.is_some() != self.server.tls_key_file.is_some() {
            return Err(
                "server.tls_cert_file and server.tls_key_file go together: set both to serve TLS, or neither for plain TCP"
                    .to_string(),
            );
        }
        if self.server.proxy_protocol && self.server.trusted_proxies.is_empty() {
            return Err(
                "server.proxy_protocol is on but server.trusted_proxies is empty: list the proxies that send the header"
                    .to_string(),
            );
        }
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
        if let Some(admin) = self.server.admin_listen {
            if admin.port() != 0 && admin == self.server.listen {
                return Err(format!(
                    "server.admin_listen ({admin}) is server.listen: give the operator endpoints \
                     a port of their own, or admin_listen = \"\" to turn them off"
                ));
            }
        }
        self.auth.mode_explicit = mode_set;
        if self.auth.mode == AuthMode::Jwt {
            self.auth.jwt.read_keys()?;
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
            // At most 64 KiB: a key is short.
            let text =
                crate::ops::file::read_secret(path, 64 * 1024, &format!("{who}.api_key_file"))?;
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

/// `access.3.rooms` → (3, "rooms").
fn access_key(key: &str) -> Option<(usize, &str)> {
    let (n, field) = key.strip_prefix("access.")?.split_once('.')?;
    Some((n.parse().ok()?, field))
}

/// The fields of a `[provider.NAME]` section.
fn provider_fields() -> impl Iterator<Item = &'static str> {
    keys().filter_map(|k| k.name.strip_prefix("provider.NAME."))
}

/// `provider.NAME.FIELD` split and checked: (NAME, FIELD).
fn provider_key<'a>(key: &str, rest: &'a str) -> Result<(&'a str, &'a str), String> {
    let (name, field) = rest.rsplit_once('.').ok_or_else(|| {
        format!("{key}: expected provider.NAME.FIELD, e.g. provider.kimi.base_url")
    })?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "{key}: provider names are letters, digits, '_' and '-'"
        ));
    }
    if !provider_fields().any(|f| f == field) {
        let fields: Vec<&str> = provider_fields().collect();
        return Err(format!(
            "unknown key {key}; keys of a [provider.NAME] section are: {}",
            fields.join(", ")
        ));
    }
    Ok((name, field))
}

/// A blank `T` with the default of every key that `pick` says is its
/// own. The defaults are constants, each checked by a test.
fn with_defaults<T: Default>(
    pick: impl Fn(&Set) -> Option<fn(&mut T, &Setting) -> Result<(), String>>,
) -> T {
    let mut target = T::default();
    for key in keys().filter(|k| !k.default.is_empty()) {
        let Some(set) = pick(&key.set) else {
            continue;
        };
        if let Ok(entries) = toml::parse(&format!("x = {}", key.default)) {
            for e in entries {
                let _ = set(
                    &mut target,
                    &Setting {
                        key: key.name,
                        value: &e.value,
                        from_env: false,
                        env: &[],
                    },
                );
            }
        }
    }
    target
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

/// `SERVER_MAX_CONNECTIONS` → `server.max_connections`.
fn key_for_env(rest: &str) -> Option<String> {
    if let Some(provider) = rest.strip_prefix("PROVIDER_") {
        // PROVIDER_<NAME>_<FIELD>: the field is a known suffix, so a name
        // may hold underscores itself.
        return provider_fields().find_map(|field| {
            let name = provider
                .strip_suffix(&field.to_ascii_uppercase())?
                .strip_suffix('_')?;
            (!name.is_empty()).then(|| format!("provider.{}.{field}", name.to_ascii_lowercase()))
        });
    }
    // `[[access]]` rules are the file's alone: a list of tables has no
    // one name in the environment. Renamed keys are still read.
    keys()
        .map(|k| k.name)
        .chain(keys::RENAMED.iter().map(|(old, _, _)| *old))
        .filter(|k| !k.starts_with("provider.") && !k.starts_with("access."))
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
mod tests;
