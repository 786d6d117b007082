//! Settings: built-in defaults, a TOML file, `CACHEWARD__SECTION__KEY`, `DATABASE_URL`/`REDIS_URL` and
//! command-line flags, layered in that order (`docs/reference.md`, "Configuration"), then validated
//! section by section: one file per section, each validating itself.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod cache;
mod cdc;
mod consistency;
mod error;
mod log;
mod postgres;
mod redis;
mod resp;
mod secret_url;
mod socket;
mod tables;

pub use self::cache::CacheConfig;
pub use self::cdc::{CdcConfig, CdcMode};
pub use self::consistency::ConsistencyConfig;
use self::error::invalid;
pub use self::error::ConfigError;
pub use self::log::{LogConfig, LogFormat, MetricsConfig};
pub use self::postgres::PostgresConfig;
pub use self::redis::{RedisConfig, RedisMode};
pub use self::resp::RespConfig;
pub use self::secret_url::{redact_url, SecretUrl};
pub use self::socket::{SocketConfig, SocketMode};
pub use self::tables::TableConfig;

/// Where a config file is looked for when `--config` is not given; the first that exists wins.
pub const DEFAULT_FILES: [&str; 2] = ["config/cacheward.toml", "/etc/cacheward/cacheward.toml"];

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
    /// The read-only Redis-protocol front end.
    pub resp: RespConfig,
    /// The declared tables, by their name in cacheward (`[tables.NAME]`).
    pub tables: BTreeMap<String, TableConfig>,
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
        let config: Config = layered
            .clone()
            .try_deserialize()
            .map_err(|first| every_type_error(&layered, first))?;
        // Known before anything can fail on them, so that no log line or error shows them.
        crate::support::secrets::register(
            config
                .secret_urls()
                .into_iter()
                .map(|(_, url)| url.expose()),
        );
        config.validate()?;
        Ok(config)
    }

    /// Range and format checks that serde's types cannot express, section by section: every
    /// section is checked, and each wrong one named (`ConfigError::Several` when more than one).
    /// Backend URLs are checked by [`Config::require_backends`], since client commands do not
    /// need them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let resp_socket = || match self.resp.socket.as_ref() == Some(&self.socket.path) {
            true => Err(invalid(
                "resp.socket",
                "must not be socket.path (the JSON-RPC socket)",
            )),
            false => Ok(()),
        };
        let cluster_prefix = || {
            // The fences live under users' prefix, one per slot: a hash tag there puts them all
            // in one slot, and a declared table's keys in other slots would have none.
            match self.redis.mode == RedisMode::Cluster
                && !self.tables.is_empty()
                && has_hash_tag(&self.cache.key_prefix)
            {
                true => Err(invalid(
                    "cache.key_prefix",
                    "may not carry a hash tag ({...}) when tables are declared in cluster mode",
                )),
                false => Ok(()),
            }
        };
        let mut errors: Vec<ConfigError> = [
            self.socket.validate(),
            self.postgres.validate(),
            self.redis.validate(),
            self.cache.validate(),
            self.cdc.validate(),
            self.log.validate(),
            self.consistency.validate(),
            self.resp.validate(),
            resp_socket(),
            tables::validate(&self.tables, &self.cache.key_prefix),
            cluster_prefix(),
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect();
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Several(errors)),
        }
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
        let (mine, theirs) = (self.secret_urls(), other.secret_urls());
        for (key, _) in mine.iter().chain(&theirs) {
            let of = |urls: &[(&str, &SecretUrl)]| -> Vec<String> {
                let urls = urls.iter().filter(|(k, _)| k == key);
                urls.map(|(_, url)| url.expose().to_owned()).collect()
            };
            if of(&mine) != of(&theirs) && !changed.iter().any(|k| k == key) {
                changed.push((*key).to_owned());
            }
        }
        changed
    }

    /// Every configured value that may hold a secret, with its key: the one list of them. Each is
    /// registered with the log scrubber before anything can fail on it, and compared in full by
    /// [`Config::changed_keys`] (their serialized forms are redacted).
    pub fn secret_urls(&self) -> Vec<(&'static str, &SecretUrl)> {
        let single = [
            ("postgres.url", &self.postgres.url),
            ("cdc.url", &self.cdc.url),
            ("redis.url", &self.redis.url),
        ];
        let single = single
            .into_iter()
            .filter_map(|(key, url)| Some((key, url.as_ref()?)));
        let listed = self.redis.urls.iter().map(|url| ("redis.urls", url));
        single.chain(listed).collect()
    }

    /// How many batches of cache misses may read PostgreSQL at once: a quarter of the pool, so
    /// that misses arriving while those run queue up and are read together, and writes and the
    /// CDC worker keep connections of their own.
    pub fn miss_loaders(&self) -> usize {
        (self.postgres.pool_size / 4).max(1)
    }
}

/// Whether `prefix` holds a Redis Cluster hash tag: a non-empty `{...}`.
fn has_hash_tag(prefix: &str) -> bool {
    prefix
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .is_some_and(|(tag, _)| !tag.is_empty())
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
    // Every unknown key is named, not just the first.
    let mut errors = Vec::new();
    for (section, keys) in sections {
        if section == "tables" {
            errors.extend(check_table_keys(keys, &unknown).err());
            continue;
        }
        let Some(known_keys) = known.get(section).and_then(|v| v.as_object()) else {
            errors.push(unknown(section.clone()));
            continue;
        };
        let Some(keys) = keys.as_object() else {
            errors.push(invalid(
                "config",
                format!("`{section}` must be a table of keys"),
            ));
            continue;
        };
        for key in keys.keys() {
            if !known_keys.contains_key(key) {
                errors.push(unknown(format!("{section}.{key}")));
            }
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(ConfigError::Several(errors)),
    }
}

/// config-rs stops at the first value of the wrong type: this names every one, each key (each
/// declared table as a whole) deserialized alone over the defaults. `first` when none fails alone.
fn every_type_error(layered: &config::Config, first: config::ConfigError) -> ConfigError {
    let given: serde_json::Value = match layered.clone().try_deserialize() {
        Ok(given) => given,
        Err(_) => return first.into(),
    };
    let keys = given
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(section, entries)| {
            let names = entries.as_object().into_iter().flat_map(|e| e.keys());
            names.map(move |name| format!("{section}.{name}"))
        });
    let alone = |key: &str| -> Option<ConfigError> {
        let value: config::Value = layered.get(key).ok()?;
        let layer = config::Config::builder().set_override(key, value).ok()?;
        let error = layer.build().ok()?.try_deserialize::<Config>().err()?;
        Some(error.into())
    };
    let mut errors: Vec<ConfigError> = keys.filter_map(|key| alone(&key)).collect();
    match errors.len() {
        0 => first.into(),
        1 => errors.remove(0),
        _ => ConfigError::Several(errors),
    }
}

/// Refuses any key of a `[tables.NAME]` section that a table does not have.
fn check_table_keys(
    tables: &serde_json::Value,
    unknown: &dyn Fn(String) -> ConfigError,
) -> Result<(), ConfigError> {
    let Some(tables) = tables.as_object() else {
        return Err(invalid(
            "tables",
            "must be a table of [tables.NAME] sections",
        ));
    };
    for (name, keys) in tables {
        let Some(keys) = keys.as_object() else {
            return Err(invalid(
                format!("tables.{name}"),
                "must be a section of keys ([tables.NAME])",
            ));
        };
        if let Some(key) = keys
            .keys()
            .find(|k| !tables::TABLE_KEYS.contains(&k.as_str()))
        {
            return Err(unknown(format!("tables.{name}.{key}")));
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
    fn tables_are_read_from_their_sections_and_their_unknown_keys_named() {
        let c = load(
            &[],
            Some(
                "[tables.accounts]\nkey = [\"id\"]\nlookups = { by_email = [\"email\"] }\n\
                 exclude = [\"secret\"]\n[tables.orders]\nkey = [\"region\", \"id\"]\n",
            ),
        )
        .unwrap();
        assert_eq!(c.tables.len(), 2);
        assert_eq!(c.tables["accounts"].lookups["by_email"], ["email"]);
        assert_eq!(c.tables["orders"].key, ["region", "id"]);
        let typo = load(
            &[],
            Some("[tables.accounts]\nkey = [\"id\"]\ncolums = [\"id\"]\n"),
        );
        assert!(
            matches!(&typo, Err(ConfigError::UnknownKey { key, .. }) if key == "tables.accounts.colums"),
            "{typo:?}"
        );
        let tagged = load(
            &[("CACHEWARD__REDIS__MODE", "cluster")],
            Some("[cache]\nkey_prefix = \"{u}:\"\n[tables.a]\nkey = [\"id\"]\n"),
        )
        .unwrap_err();
        assert!(
            tagged.to_string().contains("`cache.key_prefix`"),
            "{tagged}"
        );
        let flat = load(&[], Some("tables = 3\n")).unwrap_err();
        assert!(flat.to_string().contains("`tables`"), "{flat}");
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
        // Every secret-bearing key, the CDC session's and the sentinels' or seeds' among them: a
        // rotated password there is a change too, though their redacted forms are equal.
        let cluster = |password: &str| {
            let seeds = format!("redis://:{password}@a:7001,redis://:{password}@b:7002");
            let cdc = format!("postgresql://u:{password}@h/db");
            let env = [
                ("DATABASE_URL", "postgresql://u:one@h/db"),
                ("CACHEWARD__REDIS__MODE", "cluster"),
                ("CACHEWARD__REDIS__URLS", seeds.as_str()),
                ("CACHEWARD__CDC__URL", cdc.as_str()),
            ];
            load(&env, None).unwrap()
        };
        assert_eq!(
            cluster("two").changed_keys(&cluster("one")),
            vec!["cdc.url", "redis.urls"]
        );
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
    fn a_line_that_fails_to_parse_is_never_quoted_not_even_down_the_error_chain() {
        // Passwords with a quote or a backslash break the TOML line they are on.
        for line in [
            r#"url = "postgresql://u:se"cr\et@h/db""#,
            r#"url = "postgresql://u:se\qcret@h/db""#,
        ] {
            let e = load(&[], Some(&format!("[postgres]\n{line}\n"))).unwrap_err();
            let mut said = e.to_string();
            let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(c) = cause {
                said.push_str(&format!("\n{c}"));
                cause = c.source();
            }
            assert!(said.contains("line 2"), "{said}");
            for secret in ["cr\\et", "qcret", "se\""] {
                assert!(!said.contains(secret), "{secret} in {said}");
            }
        }
    }

    #[test]
    fn every_value_of_the_wrong_type_is_named_not_just_the_first() {
        let file = "[socket]\nmax_connections = \"many\"\nmode = 660\n\
                    [cache]\nttl_secs = \"an hour\"\n\
                    [tables.accounts]\nkey = \"id\"\n";
        let said = load(&[], Some(file)).unwrap_err().to_string();
        for key in [
            "socket.max_connections",
            "socket.mode",
            "cache.ttl_secs",
            "tables.accounts",
        ] {
            assert!(
                said.contains(&format!("`{key}")),
                "{key} not named in:\n{said}"
            );
        }
        assert_eq!(said.lines().count(), 4, "{said}");
        // Right types everywhere else: the one wrong value alone.
        let said = load(&[], Some("[cache]\nttl_secs = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            said.contains("`cache.ttl_secs`") && !said.contains('\n'),
            "{said}"
        );
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

    #[test]
    fn the_front_end_s_keys_are_checked_and_name_themselves() {
        let refused = |file: &str, key: &str| {
            let e = load(&[], Some(file)).unwrap_err().to_string();
            assert!(e.contains(key), "{file}: {e}");
        };
        // TCP only with a password; a password file that cannot be read; not the JSON-RPC socket.
        refused("[resp]\nlisten = \"127.0.0.1:6380\"\n", "resp.listen");
        refused(
            "[resp]\nlisten = \"127.0.0.1:6380\"\npassword_file = \"/nonexistent/pw\"\n",
            "resp.password_file",
        );
        refused(
            "[socket]\npath = \"/tmp/x.sock\"\n[resp]\nsocket = \"/tmp/x.sock\"\n",
            "resp.socket",
        );
        refused(
            &format!("[resp]\nsocket = \"/{}\"\n", "s".repeat(120)),
            "resp.socket",
        );
        refused("[resp]\nlisten = \"not an address\"\n", "listen");
        refused("[resp]\ntracking_max_keys = 0\n", "resp.tracking_max_keys");
        refused("[resp]\nmode = 438\n", "mode");
        refused("[resp]\nsocket_path = \"/tmp/y\"\n", "resp.socket_path");
        // A password file's content never shows in the error of a key that refers to it.
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "line-one-Secret\nline-two\n").unwrap();
        let file = format!(
            "[resp]\nlisten = \"127.0.0.1:6380\"\npassword_file = \"{}\"\n",
            pw.display()
        );
        let e = load(&[], Some(&file)).unwrap_err().to_string();
        assert!(
            e.contains("resp.password_file") && !e.contains("line-one-Secret"),
            "{e}"
        );
        let ok = format!(
            "[resp]\nsocket = \"/tmp/r.sock\"\nlisten = \"127.0.0.1:6380\"\npassword_file = \"{}\"\n",
            pw.display()
        );
        std::fs::write(&pw, "only-Secret-7\n").unwrap();
        let c = load(&[], Some(&ok)).expect("a valid front end");
        assert!(c.resp.enabled());
    }
}
