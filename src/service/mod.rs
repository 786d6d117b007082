//! The use cases behind the socket. Writes live here: `put`, `rename` and `delete`, write-through
//! (PostgreSQL first, then Redis; a Redis failure queues a repair, it never fails the request).
//! Reads are in [`read`], repairs in [`repair`], the backends' state in [`health`], the counters
//! and reports in [`stats`].

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use crate::cdc::stats::CdcStats;
use crate::model::entry::Write;
use crate::model::key::Key;
use crate::model::registry::Tables;
use crate::store::pg::connect::PgTarget;
use crate::store::pg::{Db, DbError, DbErrorKind};
use crate::store::redis::{Cache, CacheError, CacheErrorKind};

pub mod consistency;
pub mod flights;
pub mod health;
pub mod hooks;
pub mod read;
pub mod repair;
mod rows;
pub mod schema;
pub mod stats;
mod writes;

use flights::Flights;
pub use health::{Backend, Health};
pub use hooks::Hooks;
pub use repair::{Repairs, REPAIR_CAPACITY};
pub use stats::{HealthReport, Stats, StatsReport};

/// Why a use case failed, as the client will be told. Clone, because one database read answers
/// every waiter of a flight: a backend's error is shared behind an `Arc`, its source kept.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("user '{0}' not found")]
    NotFound(String),
    /// A declared table has no row with the key asked for.
    #[error("table {table}: no row with key '{key}'")]
    RowNotFound { table: String, key: String },
    /// A declared table's write a unique constraint refused.
    #[error("{0}")]
    RowConflict(String),
    /// A declared table's write with a value, column or constraint PostgreSQL refused.
    #[error("{0}")]
    InvalidRow(String),
    /// A declared table cannot be used now (not checked against the catalog yet).
    #[error("table {0} is not available yet: PostgreSQL has not been reached since start")]
    TableUnavailable(String),
    #[error("user '{0}' already exists")]
    Conflict(String),
    /// PostgreSQL failed: down, timed out, a query it refused, or a row that cannot be served.
    #[error(transparent)]
    Postgres(Arc<DbError>),
    /// Redis failed where the request needed it.
    #[error(transparent)]
    Redis(Arc<CacheError>),
    /// The daemon itself failed (a task that died or was abandoned).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// Whether the failure is a backend that is down or too slow: retrying later may succeed.
    pub fn unavailable(&self) -> bool {
        match self {
            ServiceError::Postgres(e) => e.is_unavailable() || e.kind() == DbErrorKind::Timeout,
            ServiceError::Redis(_) | ServiceError::TableUnavailable(_) => true,
            _ => false,
        }
    }
}

/// Where a `get` found the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Db,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Db => "db",
        }
    }
}

/// The request-path use cases, shared by every connection.
pub struct Service {
    db: Db,
    cache: Cache,
    pub health: Arc<Health>,
    pub stats: Arc<Stats>,
    /// Written by the CDC worker, reported by `stats` and `health`.
    pub cdc: Arc<CdcStats>,
    /// Single flight and batching of cache misses.
    flights: Arc<Flights>,
    /// Names whose Redis entry a failed write left in doubt.
    pub repairs: Repairs,
    /// The declared tables (shared with the CDC worker).
    pub tables: Arc<Tables>,
    /// A declared table's entry larger than this is served, never cached.
    max_entry_bytes: u64,
    /// What the live consistency checker found.
    consistency: Arc<consistency::ConsistencyStats>,
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    pub(crate) hooks: Hooks,
    started: Instant,
    /// Whether the last check found a trigger of users' capture not firing (see `schema`).
    users_capture_off: std::sync::atomic::AtomicBool,
}

/// Records the outcome of a database call in `health` and turns a failure into what the client is
/// told.
fn db_result<T>(result: Result<T, DbError>, health: &Health) -> Result<T, ServiceError> {
    match result {
        Ok(value) => {
            health.saw_up(Backend::Postgres);
            Ok(value)
        }
        Err(e) => Err(db_error(e, health)),
    }
}

fn db_error(e: DbError, health: &Health) -> ServiceError {
    match e.kind() {
        _ if e.is_unavailable() => {
            health.set(Backend::Postgres, false, &e.to_string());
        }
        DbErrorKind::Timeout => {}
        // One row that cannot be served: its own request fails, naming the column.
        DbErrorKind::Row => tracing::debug!(error = %e, "a users row cannot be served"),
        _ => tracing::error!(error = %e, "postgres query failed"),
    }
    ServiceError::Postgres(Arc::new(e))
}

impl Service {
    /// `loaders`: how many batches of cache misses may read the database at once.
    /// How the request path reaches PostgreSQL (the health monitor's probe goes the same way, so
    /// that a pooler is found out once).
    pub fn pg_target(&self) -> &PgTarget {
        self.db.target()
    }

    pub fn new(db: Db, cache: Cache, hooks: Hooks, loaders: usize) -> Service {
        Service {
            db,
            cache,
            health: Arc::new(Health::default()),
            stats: Arc::new(Stats::default()),
            cdc: Arc::new(CdcStats::default()),
            flights: Arc::new(Flights::new(loaders)),
            repairs: Repairs::default(),
            consistency: Default::default(),
            tables: Default::default(),
            max_entry_bytes: u64::MAX,
            hooks,
            started: Instant::now(),
            users_capture_off: Default::default(),
        }
    }

    /// Serves the declared `tables`, whose entries are cached up to `max_entry_bytes`.
    pub fn with_tables(mut self, tables: Tables, max_entry_bytes: u64) -> Service {
        self.stats = Arc::new(Stats::with_tables(tables.names().len()));
        self.tables = Arc::new(tables);
        self.max_entry_bytes = max_entry_bytes;
        self
    }

    /// The error for a key no row has.
    pub(crate) fn not_found(&self, key: &Key) -> ServiceError {
        match key.is_user() {
            true => ServiceError::NotFound(key.as_str().to_owned()),
            false => ServiceError::RowNotFound {
                table: self.tables.name(key.table()).to_owned(),
                key: key.as_str().to_owned(),
            },
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Get-or-create, write-through. Returns the user's JSON and whether it was created.
    pub async fn put(self: &Arc<Self>, username: String) -> Result<(String, bool), ServiceError> {
        self.detached(move |svc| async move {
            svc.stats.db_queries.fetch_add(1, Relaxed);
            let (user, created, read_at) =
                db_result(svc.db.get_or_create(&username).await, &svc.health)?;
            svc.write_through(vec![Write::live(&user, read_at)]).await;
            Ok((user.json, created))
        })
        .await
    }

    /// Rename, write-through: the old name's entry becomes a tombstone, the new one is set.
    pub async fn rename(
        self: &Arc<Self>,
        old: String,
        new: String,
    ) -> Result<String, ServiceError> {
        self.detached(move |svc| async move {
            svc.stats.db_queries.fetch_add(1, Relaxed);
            let (user, read_at) = match svc.db.rename(&old, &new).await {
                Ok(Some(found)) => {
                    svc.health.saw_up(Backend::Postgres);
                    found
                }
                Ok(None) => {
                    svc.health.saw_up(Backend::Postgres);
                    return Err(ServiceError::NotFound(old));
                }
                Err(e) if e.kind() == DbErrorKind::Conflict => {
                    return Err(ServiceError::Conflict(new))
                }
                Err(e) => return Err(db_error(e, &svc.health)),
            };
            let mut writes = Vec::with_capacity(2);
            if old != new {
                writes.push(Write::tombstone(Key::user(&old), user.version));
            }
            writes.push(Write::live(&user, read_at));
            svc.write_through(writes).await;
            Ok(user.json)
        })
        .await
    }

    /// Delete, write-through: the entry becomes a tombstone carrying the deleted row's version V.
    /// Returns the version the deletion is known by, V + 1 (`None` when there was no such user):
    /// a `get` with it as `min_version` refuses a cached entry of the deleted row itself, which a
    /// bare V would accept, while any row that takes the name later has a version above V.
    pub async fn delete(self: &Arc<Self>, username: String) -> Result<Option<i64>, ServiceError> {
        self.detached(move |svc| async move {
            svc.stats.db_queries.fetch_add(1, Relaxed);
            let Some(version) = db_result(svc.db.delete(&username).await, &svc.health)? else {
                return Ok(None);
            };
            svc.write_through(vec![Write::tombstone(Key::user(&username), version)])
                .await;
            Ok(Some(version.saturating_add(1)))
        })
        .await
    }

    /// Runs a write on its own task, so that a client that hangs up between the database commit and
    /// the Redis write cannot cancel the second half.
    async fn detached<T, F, Fut>(self: &Arc<Self>, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Service>) -> Fut,
        Fut: Future<Output = Result<T, ServiceError>> + Send + 'static,
    {
        tokio::spawn(f(self.clone()))
            .await
            .map_err(|e| ServiceError::Internal(format!("write task failed: {e}")))?
    }

    /// The Redis half of a write. A failure never fails the request (the row is the truth): the
    /// names are queued and repaired from the database once Redis answers again.
    async fn write_through(&self, writes: Vec<Write>) {
        let reachable = || writes.iter().all(|w| self.cache.reachable(w.key()));
        if self.health.is_up(Backend::Redis) && reachable() {
            match self.cache.apply(&writes).await {
                Ok(outcomes) => {
                    self.stats.count_outcomes(&outcomes);
                    return;
                }
                Err(e) => self.cache_failed(&e, "write"),
            }
        }
        let keys: Vec<&Key> = writes.iter().map(Write::key).collect();
        tracing::debug!(keys = ?keys, "cache write skipped: queued for repair");
        self.repairs.queue(keys);
    }

    fn cache_failed(&self, e: &CacheError, during: &'static str) {
        match e.kind() {
            CacheErrorKind::Refused | CacheErrorKind::Lost | CacheErrorKind::Tls => {
                if self.cache.node_failed() {
                    self.health.set(Backend::Redis, false, &e.to_string());
                }
            }
            CacheErrorKind::Timeout => {
                // On a Cluster, one primary may be down: the monitor looks at once.
                self.cache.node_failed();
                let after = e.bound().unwrap_or_default();
                tracing::warn!(
                    during,
                    timeout_ms = after.as_millis() as u64,
                    "redis call timed out"
                );
            }
            CacheErrorKind::Unfenced => {
                tracing::debug!(during, "redis has no fence yet");
            }
            // A new connection, looked at by the monitor at once: PostgreSQL answers meanwhile.
            CacheErrorKind::Unconfirmed => {
                tracing::debug!(during, error = %e, "redis connection not looked at yet");
            }
            // A failover or a resharding under way (said by the monitor, once per change of
            // topology, not once per request): PostgreSQL answers until it is over.
            CacheErrorKind::Elsewhere => {
                tracing::debug!(during, error = %e, "redis does not serve that key now");
            }
            CacheErrorKind::Server | CacheErrorKind::Config => {
                tracing::error!(during, error = %e, "redis refused a command");
            }
            // The daemon's own doing (a task gone): Redis is not down for it.
            CacheErrorKind::Abandoned => {
                tracing::error!(during, error = %e, "a redis call was abandoned");
            }
        }
    }

    /// The counters; `reset_lag` starts a new window for the CDC lag percentiles.
    pub fn stats_report(&self, reset_lag: bool) -> StatsReport {
        let s = &self.stats;
        StatsReport {
            uptime_secs: self.started.elapsed().as_secs(),
            connections: s.connections.load(Relaxed),
            requests: s.requests.load(Relaxed),
            errors: s.errors.load(Relaxed),
            cache_hits: s.cache_hits.load(Relaxed),
            cache_misses: s.cache_misses.load(Relaxed),
            db_queries: s.db_queries.load(Relaxed),
            stale_writes_refused: s.stale_writes_refused.load(Relaxed),
            fenced_writes_refused: self.cache.fenced_refused(),
            foreign_values_skipped: s.foreign_values_skipped.load(Relaxed),
            rows_too_large: s.rows_too_large.load(Relaxed),
            tables: self
                .tables
                .names()
                .iter()
                .zip(s.tables.iter())
                .map(|(name, counters)| (name.clone(), counters.report()))
                .collect(),
            repairs_pending: self.repairs.count() as u64,
            resp: s.resp.report(),
            near_cache: self.cache.near_report(),
            consistency: self.consistency.report(),
            cdc: self.cdc.report(reset_lag),
        }
    }

    pub fn health_report(&self) -> HealthReport {
        let state = |b| if self.health.is_up(b) { "up" } else { "down" };
        HealthReport {
            ready: self.health.ready(),
            postgres: state(Backend::Postgres),
            redis: state(Backend::Redis),
            redis_unreachable: self.cache.unreachable(),
            cdc: self.cdc.health(),
        }
    }
}
