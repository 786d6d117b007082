//! The use cases behind the socket: `get` (cache-aside, one database query per cold key), `put`,
//! `rename` and `delete` (write-through, PostgreSQL first), and what keeps the cache honest when a
//! Redis write fails: the repair queue.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use tokio::sync::OwnedSemaphorePermit;

use crate::cache::{Cache, CacheError, Outcome, Write};
use crate::db::{Db, DbError};
use crate::loads::{Batch, Loads};
use crate::protocol::{ErrorKind, RpcError};

/// Names queued for repair before the queue gives up on names and clears the whole cache instead.
pub const REPAIR_CAPACITY: usize = 100_000;
/// Cold names read per database query.
const LOAD_BATCH: usize = 256;
/// Names repaired per database query and Redis call.
const REPAIR_BATCH: usize = 500;

/// Why a use case failed, as the client will be told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("user '{0}' not found")]
    NotFound(String),
    #[error("user '{0}' already exists")]
    Conflict(String),
    /// A backend the request needs is down or timed out.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ServiceError> for RpcError {
    fn from(e: ServiceError) -> Self {
        let kind = match e {
            ServiceError::NotFound(_) => ErrorKind::NotFound,
            ServiceError::Conflict(_) => ErrorKind::Conflict,
            ServiceError::Unavailable(_) => ErrorKind::Unavailable,
            ServiceError::Internal(_) => ErrorKind::Internal,
        };
        RpcError::new(kind, e.to_string())
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

/// The two backends, as named in logs and `health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Redis,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Redis => "redis",
        }
    }
}

/// What the daemon currently believes about its backends. Written by the health monitor and by
/// failing requests, read by every request.
#[derive(Debug, Default)]
pub struct Health {
    postgres_up: AtomicBool,
    redis_up: AtomicBool,
    postgres_seen: AtomicBool,
    redis_seen: AtomicBool,
    /// Latched once both backends were reached while the socket listens (DESIGN: stays true while
    /// degraded).
    ready: AtomicBool,
}

impl Health {
    pub fn is_up(&self, backend: Backend) -> bool {
        match backend {
            Backend::Postgres => self.postgres_up.load(Relaxed),
            Backend::Redis => self.redis_up.load(Relaxed),
        }
    }

    /// Records a backend's state; logs `backend up` / `backend down` on a change. Returns true when
    /// this call brought the backend up.
    pub fn set(&self, backend: Backend, up: bool, reason: &str) -> bool {
        let (flag, seen) = match backend {
            Backend::Postgres => (&self.postgres_up, &self.postgres_seen),
            Backend::Redis => (&self.redis_up, &self.redis_seen),
        };
        let was = flag.swap(up, Relaxed);
        if up && !was {
            let first = !seen.swap(true, Relaxed);
            if first {
                tracing::info!(backend = backend.name(), "backend reached");
            } else {
                tracing::warn!(backend = backend.name(), "backend up");
                self.report_status();
            }
            return true;
        }
        if !up && was {
            tracing::warn!(backend = backend.name(), reason, "backend down");
            self.report_status();
        }
        false
    }

    /// Tells systemd (STATUS=) what the daemon is doing now.
    fn report_status(&self) {
        let down: Vec<&str> = [Backend::Postgres, Backend::Redis]
            .into_iter()
            .filter(|b| !self.is_up(*b))
            .map(Backend::name)
            .collect();
        crate::supervisor::status(&match down.is_empty() {
            true => "serving".to_owned(),
            false => format!("degraded: {} down", down.join(" and ")),
        });
    }

    /// Marks a backend up after a call to it succeeded; a load when it already is.
    pub fn saw_up(&self, backend: Backend) {
        if !self.is_up(backend) {
            self.set(backend, true, "");
        }
    }

    /// Whether `backend` was ever reached.
    pub fn ever_reached(&self, backend: Backend) -> bool {
        match backend {
            Backend::Postgres => self.postgres_seen.load(Relaxed),
            Backend::Redis => self.redis_seen.load(Relaxed),
        }
    }

    /// Both backends were reached at least once; the caller then latches readiness.
    pub fn both_seen(&self) -> bool {
        self.postgres_seen.load(Relaxed) && self.redis_seen.load(Relaxed)
    }

    pub fn set_ready(&self) -> bool {
        !self.ready.swap(true, Relaxed)
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Relaxed)
    }
}

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
}

impl Stats {
    /// Counts what a batch of cache writes found (see [`Service::count_outcomes`]).
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

/// `stats` as sent to clients (DESIGN 1.3).
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
    /// Cache writes not made because the key held a value that is not cacheward's.
    pub foreign_values_skipped: u64,
    pub repairs_pending: u64,
    pub cdc: CdcReport,
}

#[derive(Debug, Default, Serialize)]
pub struct CdcReport {
    pub applied: u64,
    pub batches: u64,
    pub reconnects: u64,
    pub resyncs: u64,
    pub lag_ms: LagReport,
}

#[derive(Debug, Default, Serialize)]
pub struct LagReport {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// `health` as sent to clients (DESIGN 1.3).
#[derive(Debug, Serialize)]
pub struct HealthReport {
    pub ready: bool,
    pub postgres: &'static str,
    pub redis: &'static str,
    pub cdc: CdcHealth,
}

#[derive(Debug, Default, Serialize)]
pub struct CdcHealth {
    pub listening: bool,
    pub cursor: i64,
    pub lag_ms: u64,
}

/// A pause point for tests: runs after a cache-aside fill read its row and before it writes Redis.
pub type FillHook = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Test-only interleaving points; all `None` in production.
#[derive(Clone, Default)]
pub struct Hooks {
    pub before_fill: Option<FillHook>,
    /// Runs after a `get` missed Redis and before it joins (or starts) the database read.
    pub after_miss: Option<FillHook>,
}

/// Names whose Redis entry may be stale because a write-through could not reach Redis. Each name
/// carries the generation it was last queued at, so a repair that raced a newer failure keeps it.
#[derive(Default)]
struct RepairQueue {
    names: HashMap<String, u64>,
    /// Bumped by every failed write, queued or not.
    generation: u64,
    /// Too many names to track: the whole cache is cleared once Redis is back.
    overflowed: bool,
}

/// The repair state, one object that owns its counts: the queue, the overflow, and the read path's
/// lock-free "anything pending?" flag, all changed together under one lock, so `stats`, the read
/// path and the monitor never disagree.
#[derive(Default)]
pub struct Repairs {
    state: Mutex<RepairQueue>,
    /// True while the queue holds a name or has overflowed (written under the lock).
    pending: AtomicBool,
}

impl Repairs {
    fn lock(&self) -> std::sync::MutexGuard<'_, RepairQueue> {
        self.state.lock().expect("repair lock is never poisoned")
    }

    fn settle(&self, queue: &RepairQueue) {
        self.pending
            .store(queue.overflowed || !queue.names.is_empty(), Relaxed);
    }

    /// Queues `names`, whose Redis write failed. Past [`REPAIR_CAPACITY`] names the queue gives up
    /// on names: the whole cache will be dropped instead.
    pub fn queue<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut queue = self.lock();
        queue.generation += 1;
        if !queue.overflowed {
            let generation = queue.generation;
            for name in names {
                if queue.names.len() >= REPAIR_CAPACITY {
                    tracing::error!(
                        capacity = REPAIR_CAPACITY,
                        "repair queue full: every cached user will be removed once redis is back"
                    );
                    queue.overflowed = true;
                    queue.names.clear();
                    break;
                }
                queue.names.insert(name.to_owned(), generation);
            }
        }
        self.settle(&queue);
    }

    /// Whether anything waits (the read path's check, without a lock).
    pub fn any(&self) -> bool {
        self.pending.load(Relaxed)
    }

    /// Whether Redis may answer for `username` as far as repairs go.
    pub fn trusted(&self, username: &str) -> bool {
        if !self.any() {
            return true;
        }
        let queue = self.lock();
        !queue.overflowed && !queue.names.contains_key(username)
    }

    /// Names waiting for repair, or the capacity after an overflow: what `stats` reports.
    pub fn count(&self) -> usize {
        let queue = self.lock();
        match queue.overflowed {
            true => REPAIR_CAPACITY,
            false => queue.names.len(),
        }
    }

    /// `Some(generation)` while overflowed: drop the cache, then [`Repairs::dropped`] with it.
    pub fn overflowed(&self) -> Option<u64> {
        let queue = self.lock();
        queue.overflowed.then_some(queue.generation)
    }

    /// The cache was dropped after an overflow seen at `generation`. The overflow is over unless a
    /// write failed meanwhile (its entry may have been written after the drop passed its key).
    pub fn dropped(&self, generation: u64) -> bool {
        let mut queue = self.lock();
        if queue.generation == generation {
            queue.overflowed = false;
        }
        self.settle(&queue);
        !queue.overflowed
    }

    /// Up to `max` queued names with their generations.
    pub fn batch(&self, max: usize) -> Vec<(String, u64)> {
        self.lock()
            .names
            .iter()
            .take(max)
            .map(|(n, g)| (n.clone(), *g))
            .collect()
    }

    /// Forgets the names of `batch` that were not queued again since; returns how many.
    pub fn repaired(&self, batch: &[(String, u64)]) -> usize {
        let mut queue = self.lock();
        let mut repaired = 0;
        for (name, generation) in batch {
            if queue.names.get(name) == Some(generation) {
                queue.names.remove(name);
                repaired += 1;
            }
        }
        self.settle(&queue);
        repaired
    }
}

/// The request-path use cases, shared by every connection.
pub struct Service {
    db: Db,
    cache: Cache,
    pub health: Arc<Health>,
    pub stats: Arc<Stats>,
    /// Written by the CDC worker, reported by `stats` and `health`.
    pub cdc: Arc<crate::cdc::CdcStats>,
    /// Single flight and batching of cache misses.
    loads: Arc<Loads>,
    /// Names whose Redis entry a failed write left in doubt.
    pub repairs: Repairs,
    hooks: Hooks,
    started: Instant,
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
    match e {
        DbError::Unavailable(reason) => {
            health.set(Backend::Postgres, false, &reason);
            ServiceError::Unavailable(format!("postgres unavailable: {reason}"))
        }
        DbError::Timeout(reason) => {
            ServiceError::Unavailable(format!("postgres timed out: {reason}"))
        }
        // One row that cannot be served: its own request fails, naming the column.
        DbError::Row(e) => {
            tracing::debug!(error = %e, "a users row cannot be served");
            ServiceError::Internal(e.to_string())
        }
        DbError::Conflict(reason) | DbError::Other(reason) => {
            tracing::error!(error = %reason, "postgres query failed");
            ServiceError::Internal(format!("postgres: {reason}"))
        }
    }
}

impl Service {
    /// `loaders`: how many batches of cache misses may read the database at once.
    pub fn new(db: Db, cache: Cache, hooks: Hooks, loaders: usize) -> Service {
        Service {
            db,
            cache,
            health: Arc::new(Health::default()),
            stats: Arc::new(Stats::default()),
            cdc: Arc::new(crate::cdc::CdcStats::default()),
            loads: Arc::new(Loads::new(loaders)),
            repairs: Repairs::default(),
            hooks,
            started: Instant::now(),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Cache-aside read: Redis, else PostgreSQL (one query however many ask at once), then fill.
    pub async fn get(self: &Arc<Self>, username: &str) -> Result<(String, Source), ServiceError> {
        self.get_many(&[username])
            .await
            .pop()
            .expect("one answer per name")
    }

    /// [`Service::get`] of several names at once (the gets a client pipelined): one Redis read
    /// for all of them, and their misses join the same database batches. One answer per name, in
    /// order.
    pub async fn get_many(
        self: &Arc<Self>,
        usernames: &[&str],
    ) -> Vec<Result<(String, Source), ServiceError>> {
        let asked_at = Instant::now();
        let mut answers: Vec<Option<Result<(String, Source), ServiceError>>> =
            vec![None; usernames.len()];
        let trusted: Vec<usize> = (0..usernames.len())
            .filter(|&i| self.cache_trusted_for(usernames[i]))
            .collect();
        if !trusted.is_empty() {
            let names: Vec<&str> = trusted.iter().map(|&i| usernames[i]).collect();
            match self.cache.get_live_many(&names).await {
                Ok(values) => {
                    for (&i, value) in trusted.iter().zip(values) {
                        if let Some(json) = value {
                            answers[i] = Some(Ok((json, Source::Cache)));
                        }
                    }
                }
                Err(e) => self.cache_failed(&e, "get"),
            }
        }
        let misses: Vec<usize> = (0..usernames.len())
            .filter(|&i| answers[i].is_none())
            .collect();
        let hits = usernames.len() - misses.len();
        self.stats.cache_hits.fetch_add(hits as u64, Relaxed);
        if !misses.is_empty() {
            self.stats
                .cache_misses
                .fetch_add(misses.len() as u64, Relaxed);
            if let Some(hook) = &self.hooks.after_miss {
                for &i in &misses {
                    hook(usernames[i].to_owned()).await;
                }
            }
            let mut queued = false;
            let flights: Vec<_> = misses
                .iter()
                .map(|&i| {
                    let (flight, started) = self.loads.join(usernames[i], asked_at);
                    queued |= started;
                    flight
                })
                .collect();
            if queued {
                self.start_loader();
            }
            for (&i, flight) in misses.iter().zip(flights) {
                answers[i] = Some(flight.wait().await.and_then(|found| {
                    found.ok_or_else(|| ServiceError::NotFound(usernames[i].to_owned()))
                }));
            }
        }
        answers
            .into_iter()
            .map(|a| a.expect("every name answered"))
            .collect()
    }

    /// Whether Redis may answer for `username`: it is up, and no failed write left its entry in doubt.
    fn cache_trusted_for(&self, username: &str) -> bool {
        if !self.health.is_up(Backend::Redis) {
            return false;
        }
        self.repairs.trusted(username)
    }

    /// Starts a loader task if a slot is free; otherwise a running loader takes the queue next.
    fn start_loader(self: &Arc<Self>) {
        if let Some(slot) = self.loads.claim() {
            let service = self.clone();
            tokio::spawn(async move {
                let batch = service.loads.gather(LOAD_BATCH).await;
                if batch.is_empty() {
                    drop(slot);
                    return service.start_loader();
                }
                service.load_batch(slot, batch).await
            });
        }
    }

    /// Reads a batch of cold names in one query, fills Redis with what it found in one call, and
    /// answers every waiter. The loader slot is held for the database read only: the next batch
    /// is read while this one fills.
    async fn load_batch(self: Arc<Self>, slot: OwnedSemaphorePermit, batch: Batch) {
        // A flight on the name that completed after the caller's Redis read has filled Redis: a
        // caller arriving just too late to join it reads Redis again instead of the database.
        let late: Vec<usize> = (0..batch.len())
            .filter(|&i| batch.filled_since_asked(i))
            .collect();
        if !late.is_empty() && self.health.is_up(Backend::Redis) {
            let names: Vec<&str> = late.iter().map(|&i| batch.username(i)).collect();
            if let Ok(values) = self.cache.get_live_many(&names).await {
                for (&i, value) in late.iter().zip(values) {
                    if let Some(json) = value {
                        batch.finish(i, Ok(Some((json, Source::Cache))));
                    }
                }
            }
        }
        let cold: Vec<usize> = (0..batch.len())
            .filter(|&i| !batch.is_finished(i))
            .collect();
        if cold.is_empty() {
            return;
        }
        let names: Vec<&str> = cold.iter().map(|&i| batch.username(i)).collect();
        self.stats.db_queries.fetch_add(1, Relaxed);
        let users = self.db.find_users(&names).await;
        drop(slot);
        self.start_loader();
        let crate::db::Found {
            users,
            broken,
            read_at,
        } = match db_result(users, &self.health) {
            Ok(found) => found,
            Err(e) => {
                for &i in &cold {
                    batch.finish(i, Err(e.clone()));
                }
                return;
            }
        };
        if let Some(hook) = &self.hooks.before_fill {
            for user in &users {
                hook(user.username.clone()).await;
            }
        }
        // Queued ahead of any read that follows the answers below, so the fill need not be
        // awaited before answering: a get after this one's answer sees it.
        let fill = (self.health.is_up(Backend::Redis) && !users.is_empty()).then(|| {
            self.cache.fill(
                users
                    .iter()
                    .map(|user| Write::live(user, read_at))
                    .collect(),
            )
        });
        let found: HashMap<&str, &str> = users
            .iter()
            .map(|user| (user.username.as_str(), user.json.as_str()))
            .collect();
        for &i in &cold {
            let name = batch.username(i);
            if let Some(e) = broken.iter().find(|e| e.username.as_deref() == Some(name)) {
                batch.finish(i, Err(ServiceError::Internal(e.to_string())));
                continue;
            }
            let json = found.get(name).map(|json| json.to_string());
            batch.finish(i, Ok(json.map(|json| (json, Source::Db))));
        }
        let Some(fill) = fill else {
            return;
        };
        match fill.await {
            Ok(outcomes) => {
                self.count_outcomes(&outcomes);
                for (user, outcome) in users.iter().zip(outcomes) {
                    if outcome == Outcome::Refused {
                        tracing::debug!(
                            username = user.username,
                            version = user.version,
                            "cache fill refused: newer version cached"
                        );
                    }
                }
            }
            Err(e) => self.cache_failed(&e, "fill"),
        }
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
                Err(DbError::Conflict(_)) => return Err(ServiceError::Conflict(new)),
                Err(e) => return Err(db_error(e, &svc.health)),
            };
            let mut writes = Vec::with_capacity(2);
            if old != new {
                writes.push(Write::tombstone(old, user.version));
            }
            writes.push(Write::live(&user, read_at));
            svc.write_through(writes).await;
            Ok(user.json)
        })
        .await
    }

    /// Delete, write-through: the entry becomes a tombstone carrying the deleted row's version.
    /// Returns that version, or `None` when there was no such user.
    pub async fn delete(self: &Arc<Self>, username: String) -> Result<Option<i64>, ServiceError> {
        self.detached(move |svc| async move {
            svc.stats.db_queries.fetch_add(1, Relaxed);
            let Some(version) = db_result(svc.db.delete(&username).await, &svc.health)? else {
                return Ok(None);
            };
            svc.write_through(vec![Write::tombstone(username, version)])
                .await;
            Ok(Some(version))
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
        if self.health.is_up(Backend::Redis) {
            match self.cache.apply(&writes).await {
                Ok(outcomes) => {
                    self.count_outcomes(&outcomes);
                    return;
                }
                Err(e) => self.cache_failed(&e, "write"),
            }
        }
        let names: Vec<&str> = writes.iter().map(Write::username).collect();
        tracing::debug!(usernames = ?names, "cache write skipped: queued for repair");
        self.repairs.queue(names);
    }

    /// Counts the writes Redis refused because it held a newer version (a stale fill or a write
    /// that lost a race), and the keys left alone because they hold a value that is not
    /// cacheward's: in aggregate, on the stats line and in `stats`. A write that found its own
    /// version there already (the CDC worker got there first) is not stale, nor is one refused by
    /// the fence (it read before a TRUNCATE, a resync or a Redis restart: the key is just not
    /// filled).
    pub fn count_outcomes(&self, outcomes: &[Outcome]) {
        self.stats.count_outcomes(outcomes);
    }

    fn cache_failed(&self, e: &CacheError, during: &'static str) {
        match e {
            CacheError::Down(reason) => {
                self.health.set(Backend::Redis, false, reason);
            }
            CacheError::Timeout(after) => {
                tracing::warn!(
                    during,
                    timeout_ms = after.as_millis() as u64,
                    "redis call timed out"
                );
            }
            CacheError::Server(reason) => {
                tracing::error!(during, error = %reason, "redis refused a command");
            }
            CacheError::Unfenced => {
                tracing::debug!(during, "redis has no fence yet");
            }
        }
    }

    /// Names waiting for repair (or the capacity, after an overflow).
    pub fn repairs_pending(&self) -> usize {
        self.repairs.count()
    }

    /// Brings every queued name's entry in line with its row (or clears the cache after an
    /// overflow). Returns how many names were repaired. Called by the health monitor while both
    /// backends are up.
    pub async fn run_repairs(&self) -> Result<usize, ServiceError> {
        if !self.repairs.any() {
            return Ok(0);
        }
        if let Some(generation) = self.repairs.overflowed() {
            // Every entry may be stale: a fence at a fresh horizon keeps out every write that read
            // before now, and every entry written before it is dropped.
            let fence = db_result(self.db.fresh_horizon().await, &self.health)?;
            let removed = self
                .cache
                .drop_all(fence)
                .await
                .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
            tracing::warn!(removed, "cache cleared after repair queue overflow");
            if !self.repairs.dropped(generation) {
                // A write failed while the cache was being dropped: drop it again next time.
                return Ok(0);
            }
        }
        let mut repaired = 0;
        loop {
            let batch = self.repairs.batch(REPAIR_BATCH);
            if batch.is_empty() {
                break;
            }
            let names: Vec<String> = batch.iter().map(|(n, _)| n.clone()).collect();
            let (found, horizon) = db_result(self.db.current_rows(&names).await, &self.health)?;
            // A row that cannot be served gets a tombstone, like a missing one: nothing stale
            // stays cached for it.
            let mut writes: Vec<Write> = found
                .users
                .iter()
                .map(|u| Write::live(u, found.read_at))
                .collect();
            for name in &names {
                if !writes.iter().any(|w| w.username() == name) {
                    writes.push(Write::tombstone(name.clone(), horizon));
                }
            }
            let outcomes = self.cache.apply(&writes).await.map_err(|e| {
                self.cache_failed(&e, "repair");
                ServiceError::Unavailable(e.to_string())
            })?;
            self.count_outcomes(&outcomes);
            repaired += self.repairs.repaired(&batch);
        }
        if repaired > 0 {
            tracing::info!(repaired, "cache entries repaired");
        }
        Ok(repaired)
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
            foreign_values_skipped: s.foreign_values_skipped.load(Relaxed),
            repairs_pending: self.repairs.count() as u64,
            cdc: self.cdc.report(reset_lag),
        }
    }

    pub fn health_report(&self) -> HealthReport {
        let state = |b| if self.health.is_up(b) { "up" } else { "down" };
        HealthReport {
            ready: self.health.ready(),
            postgres: state(Backend::Postgres),
            redis: state(Backend::Redis),
            cdc: self.cdc.health(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_own_their_counts() {
        let repairs = Repairs::default();
        assert!(!repairs.any() && repairs.trusted("a"));
        repairs.queue(["a", "b"]);
        assert!(repairs.any() && !repairs.trusted("a") && repairs.trusted("c"));
        assert_eq!(repairs.count(), 2);
        let batch = repairs.batch(10);
        // "a" fails again while the batch is repaired: it stays.
        repairs.queue(["a"]);
        assert_eq!(repairs.repaired(&batch), 1);
        assert_eq!(repairs.count(), 1);
        assert!(!repairs.trusted("a") && repairs.trusted("b"));
    }

    #[test]
    fn an_overflow_is_counted_as_the_capacity_until_the_cache_is_dropped() {
        let repairs = Repairs::default();
        let names: Vec<String> = (0..=REPAIR_CAPACITY).map(|i| format!("u{i}")).collect();
        repairs.queue(names.iter().map(String::as_str));
        // The count `stats` reports and the one the shutdown warning uses are one and the same.
        assert_eq!(repairs.count(), REPAIR_CAPACITY);
        assert!(!repairs.trusted("anyone"));
        let generation = repairs.overflowed().expect("overflowed");
        // A write fails while the cache is being dropped: the overflow stands.
        repairs.queue(["late"]);
        assert!(!repairs.dropped(generation));
        assert_eq!(repairs.count(), REPAIR_CAPACITY);
        let generation = repairs.overflowed().expect("still overflowed");
        assert!(repairs.dropped(generation));
        assert_eq!(repairs.count(), 0);
        assert!(!repairs.any() && repairs.trusted("anyone"));
    }
}
