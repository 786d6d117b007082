//! `[consistency]`: the live consistency checker's pace and window.

use serde::{Deserialize, Serialize};

use super::error::{at_least, at_most, ConfigError};

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

impl ConsistencyConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        at_most("consistency.sample_per_sec", self.sample_per_sec, 100_000)?;
        at_least("consistency.window_ms", self.window_ms, 100)
    }
}
