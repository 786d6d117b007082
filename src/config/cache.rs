//! `[cache]`: the key prefix, the TTL and the near cache's bound.

use serde::{Deserialize, Serialize};

use super::error::{at_least, invalid, ConfigError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub key_prefix: String,
    pub ttl_secs: u64,
    /// The near cache's bound in bytes; 0: off (see `store::redis::near`).
    pub local_max_bytes: u64,
    /// A declared table's row whose JSON is larger is served from PostgreSQL, never cached.
    pub max_entry_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            key_prefix: "user:".into(),
            ttl_secs: 3600,
            local_max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
        }
    }
}

impl CacheConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        at_least("cache.ttl_secs", self.ttl_secs, 1)?;
        at_least("cache.max_entry_bytes", self.max_entry_bytes, 1)?;
        if self.key_prefix.is_empty() {
            // Every key in the logical database would be a user's: a TRUNCATE would drop them all.
            return Err(invalid(
                "cache.key_prefix",
                "must not be empty: cacheward's keys must not share a namespace with others",
            ));
        }
        if self.key_prefix.chars().any(char::is_control) {
            return Err(invalid(
                "cache.key_prefix",
                "must not contain control characters",
            ));
        }
        Ok(())
    }
}
