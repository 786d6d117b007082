//! `[cdc]`: the change-data-capture worker: on or off, its session, its channel and its pace.

use serde::{Deserialize, Serialize};

use super::error::{at_least, invalid, ConfigError};
use super::postgres::check_pg_url;
use super::secret_url::SecretUrl;

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

impl CdcConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let channel = &self.channel;
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
        at_least("cdc.batch_size", self.batch_size as u64, 1)?;
        at_least("cdc.poll_interval_ms", self.poll_interval_ms, 1)?;
        at_least("cdc.retention_secs", self.retention_secs, 1)?;
        if let Some(url) = &self.url {
            check_pg_url("cdc.url", url)?;
        }
        Ok(())
    }
}
