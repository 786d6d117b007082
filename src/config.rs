//! Settings: built-in defaults, a TOML file, `CACHEWARD__SECTION__KEY`, `DATABASE_URL`/`REDIS_URL` and
//! command-line flags, layered in that order (DESIGN 1.2), then validated key by key.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a config file is looked for when `--config` is not given; the first that exists wins.
pub const DEFAULT_FILES: [&str; 2] = ["config/cacheward.toml", "/etc/cacheward/cacheward.toml"];

/// Why the configuration could not be loaded. Every variant names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config FILE` named a file that does not exist.
    #[error("config file {0} does not exist")]
    FileNotFound(PathBuf),
    /// A file could not be read or parsed, or a value has the wrong type (config-rs names the key).
    /// Never echoes the file's text: a line that fails to parse may hold a password.
    #[error("{}", load_error(.0))]
    Load(#[from] config::ConfigError),
    /// A key that cacheward does not know: almost always a typo.
    #[error("unknown configuration key `{key}` (from {origin})")]
    UnknownKey { key: String, origin: String },
    /// A key whose value is out of range or malformed.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// What a config-rs error may say: where a file failed to parse, never the text there; anything
/// else with connection-string passwords redacted.
fn load_error(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::FileParse { uri, cause } => {
            let cause = cause.to_string();
            // The TOML error's first line says where ("TOML parse error at line 3, column 8"), its
            // last says what; the lines between quote the file.
            let mut lines = cause.lines().map(str::trim).filter(|l| !l.is_empty());
            let at = lines.next().unwrap_or("parse error");
            let what = lines
                .next_back()
                .filter(|l| !l.contains('|') && !l.starts_with(|c: char| c.is_ascii_digit()))
                .map(|l| format!(": {}", crate::secrets::redact_text(l)))
                .unwrap_or_default();
            format!(
                "cannot parse {}: {at}{what}",
                uri.as_deref().unwrap_or("the configuration file")
            )
        }
        other => crate::secrets::scrub(&other.to_string()).into_owned(),
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The whole configuration, one struct per section. Passed around as `Arc<Config>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub socket: SocketConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub cache: CacheConfig,
    pub cdc: CdcConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub consistency: ConsistencyConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketConfig {
    pub path: PathBuf,
    pub mode: SocketMode,
    pub max_connections: usize,
    pub max_request_bytes: usize,
    pub max_inflight: usize,
    /// Request bytes read but not answered, plus answer bytes not written, per connection: past
    /// it the daemon stops reading that connection.
    pub max_inflight_bytes: usize,
    pub idle_timeout_secs: u64,
    /// A connection whose answers cannot be written for this long is closed.
    pub write_timeout_secs: u64,
    /// Peers (SO_PEERCRED) allowed to connect; both empty: anyone the file mode lets in.
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    /// Peers that may only read (`get`, `stats`, `health`).
    pub readonly_uids: Vec<u32>,
    pub readonly_gids: Vec<u32>,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: PathBuf::from("/run/cacheward/cacheward.sock"),
            mode: SocketMode(0o660),
            max_connections: 1024,
            max_request_bytes: 65536,
            max_inflight: 128,
            max_inflight_bytes: 1 << 20,
            idle_timeout_secs: 300,
            write_timeout_secs: 10,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            readonly_uids: Vec::new(),
            readonly_gids: Vec::new(),
        }
    }
}

/// Lists that the environment gives as comma-separated text (`CACHEWARD__SOCKET__ALLOW_UIDS=0,1000`,
/// `CACHEWARD__REDIS__URLS=redis://a:7001,redis://b:7002`).
const LIST_KEYS: [&str; 5] = [
    "redis.urls",
    "socket.allow_uids",
    "socket.allow_gids",
    "socket.readonly_uids",
    "socket.readonly_gids",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    pub url: Option<SecretUrl>,
    pub pool_size: usize,
    pub statement_timeout_ms: u64,
    /// The password, in a file read afresh for every new connection (rotation needs no restart).
    pub password_file: Option<PathBuf>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            pool_size: 16,
            statement_timeout_ms: 2000,
            password_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Option<SecretUrl>,
    pub mode: RedisMode,
    /// More nodes: cluster seeds, or the sentinels.
    pub urls: Vec<SecretUrl>,
    pub sentinel_master: Option<String>,
    pub timeout_ms: u64,
    /// Roots for a `rediss://` server's certificate (PEM) [the system's].
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate (PEM) and its key, for a server that asks for one (mTLS).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// The password, in a file read afresh for every new connection (rotation needs no restart).
    pub password_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            mode: RedisMode::Standalone,
            urls: Vec::new(),
            sentinel_master: None,
            timeout_ms: 100,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            password_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub key_prefix: String,
    pub ttl_secs: u64,
    /// The near cache's bound in bytes; 0: off (see `store::near`).
    pub local_max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            key_prefix: "user:".into(),
            ttl_secs: 3600,
            local_max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// How Redis is deployed (DESIGN 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server (or a managed endpoint that looks like one) at `redis.url`.
    #[default]
    Standalone,
    /// Redis Cluster, seeded by `redis.url` and `redis.urls`.
    Cluster,
    /// Sentinel-managed replication: `redis.urls` are the sentinels, `redis.sentinel_master` the name.
    Sentinel,
}

/// What the CDC worker does with a changed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CdcMode {
    /// Write every changed row to its key; remove keys of deleted or renamed-away names.
    Refresh,
    /// Only remove the keys of changed names.
    Invalidate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CdcConfig {
    /// false: this daemon never runs the CDC worker (sidecar fleets where another daemon does).
    pub enabled: bool,
    /// The direct session the CDC worker uses (LISTEN, its lease, its cursor) when
    /// `postgres.url` is a transaction-mode pooler [unset: `postgres.url`].
    pub url: Option<SecretUrl>,
    pub mode: CdcMode,
    pub channel: String,
    pub notify: bool,
    pub batch_size: usize,
    pub poll_interval_ms: u64,
    pub retention_secs: u64,
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            enabled: true,
            url: None,
            mode: CdcMode::Refresh,
            channel: "cacheward_users".into(),
            notify: true,
            batch_size: 500,
            poll_interval_ms: 1000,
            retention_secs: 86400,
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    pub stats_interval_secs: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            stats_interval_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
}

/// The live consistency checker (`service::consistency`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistencyConfig {
    /// Cached entries compared with their rows per second; 0: off.
    pub sample_per_sec: u64,
    /// How long an entry may differ from its row before it is a mismatch: the changes in flight
    /// (a write between its two steps, a CDC batch, an invalidation) settle well within it.
    pub window_ms: u64,
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        ConsistencyConfig {
            sample_per_sec: 10,
            window_ms: 2000,
        }
    }
}

/// Unix permission bits of the socket file. Written as an octal string (`"0660"`) so that a TOML
/// integer, which would be read as decimal, is refused instead of silently meaning something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Serialize for SocketMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SocketMode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal permission string such as \"0660\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SocketMode, E> {
                parse_mode(v).map_err(E::custom)
            }
        }
        // deserialize_any, not deserialize_str: config-rs would turn a TOML integer into a string.
        d.deserialize_any(Visitor)
    }
}

fn parse_mode(text: &str) -> Result<SocketMode, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(format!(
            "\"{text}\" is not an octal permission string such as \"0660\""
        ));
    }
    let mode = u32::from_str_radix(digits, 8).expect("checked to be octal digits");
    if mode > 0o777 {
        return Err(format!("\"{text}\" has bits beyond 0777"));
    }
    Ok(SocketMode(mode))
}

/// A connection URL that may carry a password. `Debug`, `Display` and `Serialize` show it with the
/// password replaced by `***`; only [`SecretUrl::expose`] gives the real text.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL as configured, password included: for connecting, never for logging.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// `url` with every password it holds replaced by `***` (see [`crate::secrets::redact_text`]).
pub fn redact_url(url: &str) -> String {
    crate::secrets::redact_text(url).into_owned()
}

/// What the command line adds on top of files and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--config FILE`: must exist.
    pub file: Option<PathBuf>,
    /// `--socket PATH`.
    pub socket: Option<PathBuf>,
}

impl Config {
    /// Loads the configuration from the process environment and the default file locations.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Config::load_from(overrides, &env, Path::new("."))
    }

    /// Loads the configuration with `env` as the environment and `cwd` as the working directory.
    pub fn load_from(
        overrides: &Overrides,
        env: &HashMap<String, String>,
        cwd: &Path,
    ) -> Result<Config, ConfigError> {
        let file = match &overrides.file {
            Some(path) if !path.is_file() => return Err(ConfigError::FileNotFound(path.clone())),
            Some(path) => Some(path.clone()),
            None => DEFAULT_FILES
                .iter()
                .map(|f| cwd.join(f))
                .find(|p| p.is_file()),
        };

        let mut cacheward_env: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("CACHEWARD__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Lists come from the environment as comma-separated text.
        let mut lists: Vec<(&str, Vec<String>)> = Vec::new();
        for key in LIST_KEYS {
            let var = format!("CACHEWARD__{}", key.replace('.', "__").to_uppercase());
            if let Some(text) = cacheward_env.remove(&var) {
                let items = text
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(str::to_owned)
                    .collect();
                lists.push((key, items));
            }
        }
        let mut builder = config::Config::builder();
        if let Some(path) = &file {
            builder = builder.add_source(config::File::from(path.as_path()).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("CACHEWARD")
                .prefix_separator("__")
                .separator("__")
                .source(Some(cacheward_env.into_iter().collect())),
        );
        for (key, items) in lists {
            builder = builder.set_override(key, items)?;
        }
        if let Some(url) = env.get("DATABASE_URL") {
            builder = builder.set_override("postgres.url", url.as_str())?;
        }
        if let Some(url) = env.get("REDIS_URL") {
            builder = builder.set_override("redis.url", url.as_str())?;
        }
        if let Some(socket) = &overrides.socket {
            builder = builder.set_override("socket.path", socket.to_string_lossy().as_ref())?;
        }
        let layered = builder.build()?;

        let origin = match &file {
            Some(path) => format!("{} or the environment", path.display()),
            None => "the environment".to_owned(),
        };
        check_known_keys(&layered, &origin)?;
        let config: Config = layered.try_deserialize()?;
        // Known before anything can fail on them, so that no log line or error shows them.
        crate::secrets::register(
            [&config.postgres.url, &config.redis.url, &config.cdc.url]
                .into_iter()
                .flatten()
                .chain(&config.redis.urls)
                .map(SecretUrl::expose),
        );
        config.validate()?;
        Ok(config)
    }

    /// Range and format checks that serde's types cannot express. Backend URLs are checked by
    /// [`Config::require_backends`], since client commands do not need them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.socket;
        if s.path.as_os_str().is_empty() {
            return Err(invalid("socket.path", "must not be empty"));
        }
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if s.path.as_os_str().len() > 107 {
            return Err(invalid(
                "socket.path",
                format!(
                    "{} is longer than the 107 bytes a Unix socket path may have",
                    s.path.display()
                ),
            ));
        }
        at_least("socket.max_connections", s.max_connections as u64, 1)?;
        at_least("socket.max_request_bytes", s.max_request_bytes as u64, 64)?;
        at_most(
            "socket.max_request_bytes",
            s.max_request_bytes as u64,
            64 << 20,
        )?;
        at_least("socket.max_inflight", s.max_inflight as u64, 1)?;
        // One request of the largest size must fit, or that connection could never be read.
        at_least(
            "socket.max_inflight_bytes",
            s.max_inflight_bytes as u64,
            s.max_request_bytes as u64,
        )?;
        at_least("socket.write_timeout_secs", s.write_timeout_secs, 1)?;
        at_least("postgres.pool_size", self.postgres.pool_size as u64, 1)?;
        at_least(
            "postgres.statement_timeout_ms",
            self.postgres.statement_timeout_ms,
            1,
        )?;
        at_least("redis.timeout_ms", self.redis.timeout_ms, 1)?;
        at_least("cache.ttl_secs", self.cache.ttl_secs, 1)?;
        at_most(
            "consistency.sample_per_sec",
            self.consistency.sample_per_sec,
            100_000,
        )?;
        at_least("consistency.window_ms", self.consistency.window_ms, 100)?;
        if self.cache.key_prefix.is_empty() {
            // Every key in the logical database would be a user's: a TRUNCATE would drop them all.
            return Err(invalid(
                "cache.key_prefix",
                "must not be empty: cacheward's keys must not share a namespace with others",
            ));
        }
        if self.cache.key_prefix.chars().any(char::is_control) {
            return Err(invalid(
                "cache.key_prefix",
                "must not contain control characters",
            ));
        }
        let channel = &self.cdc.channel;
        if channel.is_empty()
            || channel.len() > 63
            || !channel
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            || channel.as_bytes()[0].is_ascii_digit()
        {
            return Err(invalid(
                "cdc.channel",
                format!("\"{channel}\" must be 1-63 characters of a-z, 0-9 and _, not starting with a digit"),
            ));
        }
        at_least("cdc.batch_size", self.cdc.batch_size as u64, 1)?;
        at_least("cdc.poll_interval_ms", self.cdc.poll_interval_ms, 1)?;
        at_least("cdc.retention_secs", self.cdc.retention_secs, 1)?;
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return Err(invalid("log.level", format!("\"{}\": {e}", self.log.level)));
        }
        for (key, url) in [
            ("postgres.url", &self.postgres.url),
            ("cdc.url", &self.cdc.url),
        ] {
            let Some(url) = url else { continue };
            let bad = |e: &dyn fmt::Display| invalid(key, format!("{}: {e}", url.redacted()));
            let (rest, _) = crate::tls::PgTls::split(url.expose()).map_err(|e| bad(&e))?;
            rest.parse::<tokio_postgres::Config>()
                .map_err(|e| bad(&e))?;
        }
        if let Some(url) = &self.redis.url {
            redis::Client::open(url.expose())
                .map_err(|e| invalid("redis.url", format!("{}: {e}", url.redacted())))?;
        }
        for (key, file) in [
            ("postgres.password_file", &self.postgres.password_file),
            ("redis.password_file", &self.redis.password_file),
        ] {
            if let Some(path) = file {
                crate::secrets::read_password_file(path).map_err(|e| invalid(key, e))?;
            }
        }
        let r = &self.redis;
        for url in &r.urls {
            redis::Client::open(url.expose())
                .map_err(|e| invalid("redis.urls", format!("{}: {e}", url.redacted())))?;
        }
        if let Some(name) = &r.sentinel_master {
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "redis.sentinel_master",
                    format!("{name:?} is not a master name (one word, as in sentinel.conf's `sentinel monitor NAME`)"),
                ));
            }
        }
        match r.mode {
            RedisMode::Standalone if !r.urls.is_empty() || r.sentinel_master.is_some() => {
                return Err(invalid(
                    "redis.urls",
                    "(and redis.sentinel_master) belong to redis.mode = cluster or sentinel; standalone takes redis.url alone",
                ));
            }
            RedisMode::Cluster if r.sentinel_master.is_some() => {
                return Err(invalid(
                    "redis.sentinel_master",
                    "belongs to redis.mode = sentinel; cluster takes seed nodes in redis.url and redis.urls",
                ));
            }
            RedisMode::Sentinel if r.urls.is_empty() || r.sentinel_master.is_none() => {
                return Err(invalid(
                    "redis.urls",
                    "must name the sentinels, and redis.sentinel_master the master, for redis.mode = sentinel",
                ));
            }
            _ => {}
        }
        if r.tls_cert_file.is_some() != r.tls_key_file.is_some() {
            return Err(invalid(
                "redis.tls_cert_file",
                "and redis.tls_key_file go together: set both or neither",
            ));
        }
        let tls_url = r
            .url
            .as_ref()
            .is_none_or(|u| u.expose().starts_with("rediss://"));
        if (r.tls_ca_file.is_some() || r.tls_cert_file.is_some()) && !tls_url {
            return Err(invalid(
                "redis.tls_ca_file",
                "(or tls_cert_file) is set, but redis.url is not rediss://: TLS would not be used",
            ));
        }
        Ok(())
    }

    /// The daemon, `migrate` and `verify` need both URLs; client commands do not.
    pub fn require_backends(&self) -> Result<(), ConfigError> {
        if self.postgres.url.is_none() {
            return Err(invalid(
                "postgres.url",
                "is not set (set DATABASE_URL or postgres.url)",
            ));
        }
        // Sentinel mode finds its server through redis.urls (validated with the mode).
        let seeds = match self.redis.mode {
            RedisMode::Standalone => self.redis.url.is_some(),
            RedisMode::Cluster => self.redis.url.is_some() || !self.redis.urls.is_empty(),
            RedisMode::Sentinel => true,
        };
        if !seeds {
            return Err(invalid(
                "redis.url",
                "is not set (set REDIS_URL or redis.url)",
            ));
        }
        Ok(())
    }

    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.postgres.statement_timeout_ms)
    }

    /// Where Redis is, as the `starting` event says it (passwords redacted): the URL; the seed
    /// nodes of a Cluster; `MASTER@` and the sentinels under Sentinel.
    pub fn redis_servers(&self) -> String {
        let r = &self.redis;
        let all: Vec<String> = r.url.iter().chain(&r.urls).map(|u| u.redacted()).collect();
        match (&r.mode, &r.sentinel_master) {
            (RedisMode::Sentinel, Some(master)) => {
                let sentinels: Vec<String> = r.urls.iter().map(|u| u.redacted()).collect();
                format!("{master}@{}", sentinels.join(","))
            }
            _ => all.join(","),
        }
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis.timeout_ms)
    }

    /// The most memory clients can make the daemon hold, in bytes: per connection its in-flight
    /// requests (`socket.max_inflight_bytes`), their answers waiting to be written in order (as
    /// large again: an answer echoes its request's id), and the read and write buffers.
    pub fn worst_case_client_memory(&self) -> u64 {
        let per_connection = 2 * self.socket.max_inflight_bytes as u64 + 32 * 1024;
        self.socket.max_connections as u64 * per_connection
    }

    /// How long a connection's answers may wait to be written before it is closed.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.socket.write_timeout_secs)
    }

    /// The idle timeout of a client connection; `None` when set to 0 (never).
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.socket.idle_timeout_secs > 0)
            .then(|| Duration::from_secs(self.socket.idle_timeout_secs))
    }

    /// The `section.key` names whose values differ between `self` and `other` (names only: a
    /// value may be a secret).
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).expect("config serializes"),
            serde_json::to_value(other).expect("config serializes"),
        );
        let mut changed = Vec::new();
        for (section, values) in a.as_object().into_iter().flatten() {
            for (key, value) in values.as_object().into_iter().flatten() {
                if b.get(section).and_then(|s| s.get(key)) != Some(value) {
                    changed.push(format!("{section}.{key}"));
                }
            }
        }
        // URLs serialize redacted: a changed password alone shows only here.
        for (key, differs) in [
            ("postgres.url", self.postgres.url != other.postgres.url),
            ("redis.url", self.redis.url != other.redis.url),
        ] {
            if differs && !changed.iter().any(|k| k == key) {
                changed.push(key.to_owned());
            }
        }
        changed
    }

    /// How many batches of cache misses may read PostgreSQL at once: a quarter of the pool, so
    /// that misses arriving while those run queue up and are read together, and writes and the
    /// CDC worker keep connections of their own.
    pub fn miss_loaders(&self) -> usize {
        (self.postgres.pool_size / 4).max(1)
    }
}

fn at_least(key: &'static str, value: u64, min: u64) -> Result<(), ConfigError> {
    if value < min {
        return Err(invalid(
            key,
            format!("{value} is below the minimum of {min}"),
        ));
    }
    Ok(())
}

fn at_most(key: &'static str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value > max {
        return Err(invalid(
            key,
            format!("{value} is above the maximum of {max}"),
        ));
    }
    Ok(())
}

/// Refuses any key that [`Config`] does not have. The known keys are read off the defaults, so this
/// list can never drift from the struct.
fn check_known_keys(layered: &config::Config, origin: &str) -> Result<(), ConfigError> {
    let known = serde_json::to_value(Config::default()).expect("the default config serializes");
    let given: serde_json::Value = layered.clone().try_deserialize()?;
    let unknown = |key: String| ConfigError::UnknownKey {
        key,
        origin: origin.to_owned(),
    };
    let Some(sections) = given.as_object() else {
        return Ok(());
    };
    for (section, keys) in sections {
        let Some(known_keys) = known.get(section).and_then(|v| v.as_object()) else {
            return Err(unknown(section.clone()));
        };
        let Some(keys) = keys.as_object() else {
            return Err(ConfigError::Invalid {
                key: "config",
                reason: format!("`{section}` must be a table of keys"),
            });
        };
        for key in keys.keys() {
            if !known_keys.contains_key(key) {
                return Err(unknown(format!("{section}.{key}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], file: Option<&str>) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut overrides = Overrides::default();
        if let Some(text) = file {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, text).expect("write config");
            overrides.file = Some(path);
        }
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_from(&overrides, &env, dir.path())
    }

    #[test]
    fn defaults_match_design() {
        let c = load(&[], None).expect("defaults load");
        assert_eq!(c, Config::default());
        assert_eq!(
            c.socket.path,
            PathBuf::from("/run/cacheward/cacheward.sock")
        );
        assert_eq!(c.socket.mode, SocketMode(0o660));
        assert_eq!(c.cache.key_prefix, "user:");
        assert_eq!(c.cdc.mode, CdcMode::Refresh);
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn changed_keys_name_every_difference_and_no_value() {
        let old = load(&[("DATABASE_URL", "postgresql://u:one@h/db")], None).unwrap();
        let new = load(
            &[
                ("DATABASE_URL", "postgresql://u:two@h/db"),
                ("CACHEWARD__LOG__LEVEL", "debug"),
                ("CACHEWARD__SOCKET__MODE", "0600"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            new.changed_keys(&old),
            vec!["socket.mode", "log.level", "postgres.url"]
        );
        assert!(old.changed_keys(&old).is_empty());
    }

    #[test]
    fn libpq_tls_parameters_are_accepted() {
        let url =
            "postgresql://h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem&sslcert=/c&sslkey=/k";
        let c = load(&[("DATABASE_URL", url)], None).expect("libpq's parameters load");
        assert_eq!(c.postgres.url.unwrap().expose(), url);
    }

    #[test]
    fn layers_apply_in_order() {
        let file = "[cache]\nkey_prefix = \"file:\"\nttl_secs = 10\n[postgres]\nurl = \"postgresql://file@h/db\"\n";
        let c = load(
            &[
                ("CACHEWARD__CACHE__KEY_PREFIX", "env:"),
                ("CACHEWARD__POSTGRES__URL", "postgresql://env@h/db"),
                ("DATABASE_URL", "postgresql://plain@h/db"),
                ("CACHEWARD__SOCKET__MAX_CONNECTIONS", "7"),
            ],
            Some(file),
        )
        .expect("loads");
        assert_eq!(c.cache.key_prefix, "env:");
        assert_eq!(c.cache.ttl_secs, 10);
        assert_eq!(c.socket.max_connections, 7);
        assert_eq!(c.postgres.url.unwrap().expose(), "postgresql://plain@h/db");
    }

    #[test]
    fn socket_flag_wins_over_everything() {
        let dir = tempfile::tempdir().expect("temp dir");
        let overrides = Overrides {
            file: None,
            socket: Some(PathBuf::from("/tmp/flag.sock")),
        };
        let env = [(
            "CACHEWARD__SOCKET__PATH".to_string(),
            "/tmp/env.sock".to_string(),
        )]
        .into();
        let c = Config::load_from(&overrides, &env, dir.path()).expect("loads");
        assert_eq!(c.socket.path, PathBuf::from("/tmp/flag.sock"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load(&[("CACHEWARD__CACHE__KEYPREFIX", "x")], None).unwrap_err();
        assert!(err.to_string().contains("cache.keyprefix"), "{err}");
        let err = load(&[], Some("[sockets]\npath = \"/x\"\n")).unwrap_err();
        assert!(err.to_string().contains("`sockets`"), "{err}");
        let err = load(&[], Some("[log]\nlevl = \"debug\"\n")).unwrap_err();
        assert!(err.to_string().contains("log.levl"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, &'a str);
        let cases: &[Case] = &[
            (
                &[("CACHEWARD__SOCKET__MAX_CONNECTIONS", "many")],
                None,
                "socket.max_connections",
            ),
            (
                &[("CACHEWARD__SOCKET__MAX_CONNECTIONS", "0")],
                None,
                "socket.max_connections",
            ),
            (&[], Some("[socket]\nmode = 660\n"), "socket.mode"),
            (&[], Some("[socket]\nmode = \"0999\"\n"), "socket.mode"),
            (&[("CACHEWARD__CDC__MODE", "sometimes")], None, "cdc.mode"),
            (
                &[("CACHEWARD__CDC__CHANNEL", "bad channel;")],
                None,
                "cdc.channel",
            ),
            (
                &[],
                Some("[cache]\nkey_prefix = \"\"\n"),
                "cache.key_prefix",
            ),
            (&[("CACHEWARD__LOG__FORMAT", "xml")], None, "log.format"),
            (&[("CACHEWARD__LOG__LEVEL", "loud=[")], None, "log.level"),
            (
                &[("CACHEWARD__METRICS__LISTEN", "nowhere")],
                None,
                "metrics.listen",
            ),
            (&[("REDIS_URL", "http://x")], None, "redis.url"),
            (
                &[("CACHEWARD__REDIS__TIMEOUT_MS", "-5")],
                None,
                "redis.timeout_ms",
            ),
            (
                &[("DATABASE_URL", "postgresql://h/db?sslmode=allow")],
                None,
                "postgres.url",
            ),
            (
                &[("CACHEWARD__REDIS__MODE", "sentinel")],
                Some("[redis]\nurls = [\"redis://s1:26379\"]\n"),
                "redis.urls",
            ),
            (
                &[("CACHEWARD__REDIS__MODE", "cluster")],
                Some("[redis]\nsentinel_master = \"m\"\n"),
                "redis.sentinel_master",
            ),
            (
                &[("CACHEWARD__REDIS__MODE", "sentinel")],
                Some("[redis]\nurls = [\"redis://s:26379\"]\nsentinel_master = \"my master\"\n"),
                "redis.sentinel_master",
            ),
            (
                &[],
                Some("[redis]\nmode = \"cluster\"\nurls = [\"http://x\"]\n"),
                "redis.urls",
            ),
            (&[("CACHEWARD__REDIS__MODE", "sharded")], None, "redis.mode"),
            (
                &[],
                Some("[redis]\nsentinel_master = \"m\"\n"),
                "redis.urls",
            ),
            (
                &[("REDIS_URL", "rediss://h")],
                Some("[redis]\ntls_cert_file = \"/c.pem\"\n"),
                "redis.tls_cert_file",
            ),
            (
                &[("REDIS_URL", "redis://h")],
                Some("[redis]\ntls_ca_file = \"/ca.pem\"\n"),
                "redis.tls_ca_file",
            ),
        ];
        for (env, file, key) in cases {
            let err = load(env, *file).expect_err(key);
            assert!(
                err.to_string().contains(key),
                "error for {key} does not name it: {err}"
            );
        }
    }

    #[test]
    fn peer_lists_come_from_files_and_comma_separated_environment() {
        let c = load(
            &[
                ("CACHEWARD__SOCKET__ALLOW_UIDS", "0,1000"),
                ("CACHEWARD__SOCKET__READONLY_GIDS", "65534"),
            ],
            Some("[socket]\nallow_gids = [27]\n"),
        )
        .expect("loads");
        assert_eq!(c.socket.allow_uids, vec![0, 1000]);
        assert_eq!(c.socket.allow_gids, vec![27]);
        assert_eq!(c.socket.readonly_gids, vec![65534]);
        let c = load(
            &[
                ("CACHEWARD__REDIS__MODE", "cluster"),
                ("CACHEWARD__REDIS__URLS", "redis://a:7001, redis://b:7002"),
            ],
            None,
        )
        .expect("loads");
        let urls: Vec<&str> = c.redis.urls.iter().map(|u| u.expose()).collect();
        assert_eq!(urls, ["redis://a:7001", "redis://b:7002"]);
        let err = load(&[("CACHEWARD__SOCKET__ALLOW_UIDS", "root")], None).expect_err("not a uid");
        assert!(err.to_string().contains("allow_uids"), "{err}");
        let err = load(&[("CACHEWARD__SOCKET__MAX_INFLIGHT_BYTES", "1000")], None)
            .expect_err("too small");
        assert!(
            err.to_string().contains("socket.max_inflight_bytes"),
            "{err}"
        );
    }

    #[test]
    fn near_cache_and_checker_settings_are_checked() {
        let c = load(
            &[
                ("CACHEWARD__CACHE__LOCAL_MAX_BYTES", "0"),
                ("CACHEWARD__CONSISTENCY__SAMPLE_PER_SEC", "0"),
            ],
            Some("[consistency]\nwindow_ms = 500\n"),
        )
        .expect("loads");
        assert_eq!(c.cache.local_max_bytes, 0);
        assert_eq!(
            (c.consistency.sample_per_sec, c.consistency.window_ms),
            (0, 500)
        );
        for (key, value, named) in [
            ("CACHEWARD__CACHE__LOCAL_MAX_BYTES", "-1", "local_max_bytes"),
            (
                "CACHEWARD__CACHE__LOCAL_MAX_BYTES",
                "64MB",
                "local_max_bytes",
            ),
            (
                "CACHEWARD__CONSISTENCY__SAMPLE_PER_SEC",
                "1000000",
                "consistency.sample_per_sec",
            ),
            (
                "CACHEWARD__CONSISTENCY__WINDOW_MS",
                "10",
                "consistency.window_ms",
            ),
        ] {
            let err = load(&[(key, value)], None).expect_err(value);
            assert!(err.to_string().contains(named), "{key}={value}: {err}");
        }
        let err = load(&[], Some("[consistency]\nwindw_ms = 500\n")).expect_err("a typo");
        assert!(err.to_string().contains("windw_ms"), "{err}");
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let overrides = Overrides {
            file: Some(PathBuf::from("/nonexistent/cacheward.toml")),
            socket: None,
        };
        let err = Config::load_from(&overrides, &HashMap::new(), Path::new("/")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/cacheward.toml"),
            "{err}"
        );
    }

    #[test]
    fn backends_are_required_only_on_request() {
        let c = load(&[], None).expect("loads without URLs");
        let err = c.require_backends().unwrap_err();
        assert!(err.to_string().contains("postgres.url"), "{err}");
    }

    #[test]
    fn passwords_never_show() {
        let url =
            SecretUrl::new("postgresql://app:s3cret@db:5432/users?sslmode=require&password=also");
        let shown = format!("{url} {url:?} {}", serde_json::to_string(&url).unwrap());
        assert!(
            !shown.contains("s3cret") && !shown.contains("also"),
            "{shown}"
        );
        assert!(shown.contains("postgresql://app:***@db:5432/users?sslmode=require&password=***"));
        assert_eq!(
            redact_url("redis://:pw@host:6379/2"),
            "redis://:***@host:6379/2"
        );
        assert_eq!(redact_url("redis://host:6379/2"), "redis://host:6379/2");
        let c = load(&[("DATABASE_URL", "postgresql://u:hunter2@h/db")], None).expect("loads");
        assert!(!format!("{c:?}").contains("hunter2"));
        // Seeds and sentinels, as the `starting` event and the effective configuration show them.
        let c = load(
            &[
                ("CACHEWARD__REDIS__MODE", "sentinel"),
                ("CACHEWARD__REDIS__SENTINEL_MASTER", "m"),
                (
                    "CACHEWARD__REDIS__URLS",
                    "redis://:hunter3@s1:26379,redis://u:hunter4@s2:26379",
                ),
            ],
            None,
        )
        .expect("loads");
        let shown = format!(
            "{} {}",
            c.redis_servers(),
            serde_json::to_string(&c).unwrap()
        );
        assert!(
            !shown.contains("hunter3") && !shown.contains("hunter4"),
            "{shown}"
        );
        assert!(shown.starts_with("m@redis://:***@s1:26379,"), "{shown}");
    }

    #[test]
    fn shipped_file_documents_every_key_with_its_default() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cacheward.toml");
        let text = std::fs::read_to_string(&shipped).expect("config/cacheward.toml exists");
        let c = load(&[], Some(&text)).expect("shipped file loads");
        assert_eq!(c, Config::default(), "shipped file must hold the defaults");
        let known = serde_json::to_value(Config::default()).unwrap();
        for (section, keys) in known.as_object().unwrap() {
            assert!(
                text.contains(&format!("[{section}]")),
                "section [{section}] undocumented"
            );
            for key in keys.as_object().unwrap().keys() {
                let set = format!("\n{key} = ");
                let commented = format!("\n# {key} = ");
                assert!(
                    text.contains(&set) || text.contains(&commented),
                    "{section}.{key} is not documented in config/cacheward.toml"
                );
            }
        }
    }
}
