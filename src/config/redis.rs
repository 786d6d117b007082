//! `[redis]`: where Redis is (one server, a Cluster, a Sentinel group), TLS, the password file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{at_least, invalid, ConfigError};
use super::secret_url::SecretUrl;

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

/// How Redis is deployed (docs/reference.md, "Configuration").
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

impl RedisConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        at_least("redis.timeout_ms", self.timeout_ms, 1)?;
        if let Some(url) = &self.url {
            redis::Client::open(url.expose())
                .map_err(|e| invalid("redis.url", format!("{}: {e}", url.redacted())))?;
        }
        if let Some(path) = &self.password_file {
            crate::support::secrets::read_password_file(path)
                .map_err(|e| invalid("redis.password_file", e))?;
        }
        let r = self;
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
}
