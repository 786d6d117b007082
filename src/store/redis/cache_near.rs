//! The near cache as the rest of the daemon reaches it through [`Cache`]: its hits, its figures,
//! and what drops its entries (the daemon's own writes, a flush, one table's entries, one key).

use std::sync::Arc;

use super::cache::Cache;
use super::near::NearReport;
use crate::model::entry::{Live, Write};
use crate::model::key::{Key, KeyParts, TableId};

impl Cache {
    /// The near cache's figures (all zero when it is off).
    pub fn near_report(&self) -> NearReport {
        self.near
            .as_ref()
            .map(|near| near.report())
            .unwrap_or_default()
    }

    /// `answer` of the near cache's entry of `key` (its JSON), if it holds one (a hit counted).
    pub fn near_with<R>(&self, key: &dyn KeyParts, answer: impl FnOnce(&str) -> R) -> Option<R> {
        self.near.as_ref()?.with(key, None, |json, _| answer(json))
    }

    /// The near cache's entry of `key`, if it holds one (no hit counted).
    pub fn near_peek(&self, key: &Key) -> Option<Live> {
        let hit = self.near.as_ref()?.peek(key)?;
        Some(Live {
            json: hit.json.to_string(),
            version: hit.version,
        })
    }

    /// Up to `n` keys the near cache holds, spread by `seed`.
    pub fn near_sample(&self, n: usize, seed: u64) -> Vec<Key> {
        self.near
            .as_ref()
            .map_or_else(Vec::new, |near| near.sample(n, seed))
    }

    /// Tells `watcher` of every invalidation the near cache handles; `false` when it is off (then
    /// nothing tells this daemon of changes it did not make).
    pub fn watch_near(&self, watcher: Arc<dyn super::near::Watcher>) -> bool {
        self.near.as_ref().is_some_and(|near| near.watch(watcher))
    }

    /// Drops the near cache (Redis came back up: what it said meanwhile may be lost).
    pub fn flush_near(&self) {
        if let Some(near) = &self.near {
            near.flush();
        }
    }

    /// Invalidates the near entries `writes` may change: those older than what each leaves.
    pub(super) fn invalidate_near_of<'a>(&self, writes: impl IntoIterator<Item = &'a Write>) {
        if let Some(near) = &self.near {
            for write in writes {
                near.invalidate_written(write);
            }
        }
    }

    /// Drops the near cache's entries of `table` (and tells the tracking clients that read them).
    pub fn forget_near_table(&self, table: TableId) {
        if let Some(near) = &self.near {
            near.flush_table(table);
        }
    }

    /// Drops the near cache's entry of `key` (the consistency checker found it wrong).
    pub fn forget_near(&self, key: &Key) {
        if let Some(near) = &self.near {
            near.invalidate(key);
        }
    }
}
