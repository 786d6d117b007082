//! The request counters behind `stats` and the stats line, and the `stats` / `health` reports as
//! clients receive them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::cdc::stats::{CdcHealth, CdcReport};
use crate::service::consistency::ConsistencyReport;
use crate::store::redis::near::NearReport;
use crate::store::redis::Outcome;

/// Counters behind `stats` and the periodic stats log line.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub db_queries: AtomicU64,
    pub stale_writes_refused: AtomicU64,
    /// Cache writes not made because the key held a value that is not cacheward's.
    pub foreign_values_skipped: AtomicU64,
    /// Declared tables' rows served but not cached: their entry is over `cache.max_entry_bytes`.
    pub rows_too_large: AtomicU64,
    /// Per declared table, by `TableId` from 1 (index 0 is table 1).
    pub tables: Box<[TableCounters]>,
    /// The Redis-protocol front end.
    pub resp: RespCounters,
}

/// The Redis-protocol front end's counters (its connections are not in `connections`).
#[derive(Debug, Default)]
pub struct RespCounters {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    /// Requests answered with an error as a whole.
    pub errors: AtomicU64,
    /// Connections with `CLIENT TRACKING` on.
    pub tracking_clients: AtomicU64,
    /// Keys remembered for them, one per connection that read it.
    pub tracked_keys: AtomicU64,
    /// `invalidate` messages owed to them so far.
    pub invalidations: AtomicU64,
}

/// The front end's counters as `stats` reports them.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RespReport {
    pub connections: u64,
    pub requests: u64,
    pub errors: u64,
    pub tracking_clients: u64,
    pub tracked_keys: u64,
    pub invalidations: u64,
}

impl RespCounters {
    pub fn report(&self) -> RespReport {
        RespReport {
            connections: self.connections.load(Relaxed),
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            tracking_clients: self.tracking_clients.load(Relaxed),
            tracked_keys: self.tracked_keys.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
        }
    }
}

/// One declared table's counters.
#[derive(Debug, Default)]
pub struct TableCounters {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// `upsert`, `update` and `delete` that reached PostgreSQL.
    pub writes: AtomicU64,
}

/// One declared table's counters as `stats` reports them.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TableReport {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub writes: u64,
}

impl TableCounters {
    pub fn report(&self) -> TableReport {
        TableReport {
            cache_hits: self.cache_hits.load(Relaxed),
            cache_misses: self.cache_misses.load(Relaxed),
            writes: self.writes.load(Relaxed),
        }
    }
}

impl Stats {
    /// Counters for `tables` declared tables.
    pub fn with_tables(tables: usize) -> Stats {
        Stats {
            tables: (0..tables).map(|_| TableCounters::default()).collect(),
            ..Stats::default()
        }
    }

    /// The counters of declared table `id` (none for users).
    pub fn table(&self, id: crate::model::key::TableId) -> Option<&TableCounters> {
        self.tables.get((id.0 as usize).checked_sub(1)?)
    }

    /// Counts the writes Redis refused because it held a newer version (a stale fill or a write
    /// that lost a race), and the keys left alone because they hold a value that is not
    /// cacheward's: in aggregate, on the stats line and in `stats`. A write that found its own
    /// version there already (the CDC worker got there first) is not stale, nor is one refused by
    /// the fence (it read before a TRUNCATE, a resync or a Redis restart: the key is just not
    /// filled).
    pub fn count_outcomes(&self, outcomes: &[Outcome]) {
        let count = |wanted| outcomes.iter().filter(|o| **o == wanted).count() as u64;
        let (refused, foreign) = (count(Outcome::Refused), count(Outcome::Foreign));
        if refused > 0 {
            self.stale_writes_refused.fetch_add(refused, Relaxed);
        }
        if foreign > 0 {
            self.foreign_values_skipped.fetch_add(foreign, Relaxed);
        }
    }
}

/// `stats` as sent to clients (docs/reference.md).
#[derive(Debug, Serialize)]
pub struct StatsReport {
    pub uptime_secs: u64,
    pub connections: u64,
    pub requests: u64,
    pub errors: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub db_queries: u64,
    /// Cache writes refused because Redis held a newer version.
    pub stale_writes_refused: u64,
    /// Live cache writes refused by a fence (read before it, or no fence or a wrong one there).
    pub fenced_writes_refused: u64,
    /// Cache writes not made because the key held a value that is not cacheward's.
    pub foreign_values_skipped: u64,
    /// Declared tables' rows served but not cached: larger than `cache.max_entry_bytes`.
    pub rows_too_large: u64,
    /// Per declared table, by name.
    pub tables: std::collections::BTreeMap<String, TableReport>,
    pub repairs_pending: u64,
    /// The Redis-protocol front end.
    pub resp: RespReport,
    /// The near cache (all zero when `cache.local_max_bytes` is 0).
    pub near_cache: NearReport,
    /// The live consistency checker (`service::consistency`).
    pub consistency: ConsistencyReport,
    pub cdc: CdcReport,
}

/// `health` as sent to clients (docs/reference.md).
#[derive(Debug, Serialize)]
pub struct HealthReport {
    pub ready: bool,
    pub postgres: &'static str,
    pub redis: &'static str,
    /// The Redis primaries (`host:port`) that did not answer at the last look while others did:
    /// their slots' reads go to PostgreSQL.
    pub redis_unreachable: Vec<String>,
    pub cdc: CdcHealth,
}
