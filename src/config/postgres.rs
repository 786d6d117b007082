//! `[postgres]`: where PostgreSQL is and how the request path uses it.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{at_least, invalid, ConfigError};
use super::secret_url::SecretUrl;

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

impl PostgresConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        at_least("postgres.pool_size", self.pool_size as u64, 1)?;
        at_least(
            "postgres.statement_timeout_ms",
            self.statement_timeout_ms,
            1,
        )?;
        if let Some(url) = &self.url {
            check_pg_url("postgres.url", url)?;
        }
        if let Some(path) = &self.password_file {
            crate::support::secrets::read_password_file(path)
                .map_err(|e| invalid("postgres.password_file", e))?;
        }
        Ok(())
    }
}

/// `url` (at `key`) as libpq would take it: its TLS parameters, then the rest.
pub(super) fn check_pg_url(key: &'static str, url: &SecretUrl) -> Result<(), ConfigError> {
    let bad = |e: &dyn fmt::Display| invalid(key, format!("{}: {e}", url.redacted()));
    let (rest, _) = crate::support::tls::PgTls::split(url.expose()).map_err(|e| bad(&e))?;
    rest.parse::<tokio_postgres::Config>()
        .map_err(|e| bad(&e))?;
    Ok(())
}
