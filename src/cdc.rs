//! The CDC worker: applies out-of-band changes to Redis. It reads `cacheward_outbox` (filled by the
//! trigger of sql/0002_cdc.sql) after a durable cursor, on a dedicated connection that LISTENs for
//! wake-ups and also polls, refetches the current rows of every name a batch mentions, writes them
//! through the same versioned script as reads and writes, and only then moves the cursor.
//!
//! Commit order is not id order: a transaction may take outbox id 10, commit after id 11 was
//! applied. Every batch therefore reads one snapshot and remembers the transactions that were still
//! running in it (`pending`, with the id range their rows may hide in); once such a transaction has
//! finished, its rows in that range are read and applied. The cursor and the pending list are stored
//! together, so a restart resumes exactly.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, CacheError, Write};
use crate::config::{CdcMode, Config};
use crate::db::{self, DbError};
use crate::service::{CdcHealth, CdcReport, LagReport};
use crate::user::User;

/// Why a CDC step failed.
#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    /// The dedicated connection failed: reconnect with back-off.
    #[error(transparent)]
    Postgres(#[from] DbError),
    /// Redis refused or is down: keep the cursor, retry the batch later.
    #[error(transparent)]
    Redis(#[from] CacheError),
}

impl From<tokio_postgres::Error> for CdcError {
    fn from(e: tokio_postgres::Error) -> Self {
        CdcError::Postgres(e.into())
    }
}

/// Counters and the lag histogram behind `stats` and `health`.
pub struct CdcStats {
    pub applied: AtomicU64,
    pub batches: AtomicU64,
    pub reconnects: AtomicU64,
    pub resyncs: AtomicU64,
    pub listening: AtomicBool,
    pub cursor: AtomicI64,
    /// Largest lag of the last batch; 0 once a poll finds nothing new.
    pub last_lag_ms: AtomicU64,
    /// Change-to-applied lag since the last stats line.
    lag: Mutex<hdrhistogram::Histogram<u64>>,
    /// Change-to-applied lag since start: counts per bucket of [`LAG_BUCKETS_MS`] (the last slot
    /// counts the rest), and the sum in ms; the Prometheus histogram.
    pub lag_buckets: [AtomicU64; LAG_BUCKETS_MS.len() + 1],
    pub lag_sum_ms: AtomicU64,
}

/// Upper bounds (ms) of the lag histogram's buckets.
pub const LAG_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000];

impl Default for CdcStats {
    fn default() -> Self {
        CdcStats {
            applied: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            cursor: AtomicI64::new(0),
            last_lag_ms: AtomicU64::new(0),
            lag_buckets: Default::default(),
            lag_sum_ms: AtomicU64::new(0),
            lag: Mutex::new(
                hdrhistogram::Histogram::new(3).expect("3 significant digits is valid"),
            ),
        }
    }
}

impl CdcStats {
    fn record_lag(&self, ms: u64) {
        self.lag
            .lock()
            .expect("lag lock is never poisoned")
            .saturating_record(ms);
        let bucket = LAG_BUCKETS_MS
            .iter()
            .position(|&le| ms <= le)
            .unwrap_or(LAG_BUCKETS_MS.len());
        self.lag_buckets[bucket].fetch_add(1, Relaxed);
        self.lag_sum_ms.fetch_add(ms, Relaxed);
    }

    /// Lag percentiles over the current window; `reset` starts a new window.
    pub fn lag(&self, reset: bool) -> LagReport {
        let mut histogram = self.lag.lock().expect("lag lock is never poisoned");
        let report = LagReport {
            p50: histogram.value_at_quantile(0.5),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
        };
        if reset {
            histogram.reset();
        }
        report
    }

    pub fn report(&self, reset_lag: bool) -> CdcReport {
        CdcReport {
            applied: self.applied.load(Relaxed),
            batches: self.batches.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            resyncs: self.resyncs.load(Relaxed),
            lag_ms: self.lag(reset_lag),
        }
    }

    pub fn health(&self) -> CdcHealth {
        CdcHealth {
            listening: self.listening.load(Relaxed),
            cursor: self.cursor.load(Relaxed),
            lag_ms: self.last_lag_ms.load(Relaxed),
        }
    }
}

/// A transaction that was running when a batch read its snapshot: its outbox rows with ids in
/// `(after, upto]` are still to be applied once it has finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub txid: u64,
    pub after: i64,
    pub upto: i64,
}

/// The durable position of one consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Every outbox row with `id <= position` was applied, except the rows of `pending`.
    pub position: i64,
    pub pending: Vec<Pending>,
}

/// The transactions a snapshot saw as running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub running: HashSet<u64>,
}

/// A transaction id (xid8) as PostgreSQL prints it.
fn parse_xid(text: String) -> Result<u64, DbError> {
    text.parse::<u64>()
        .map_err(|e| DbError::Other(format!("xid8 {text}: {e}")))
}

/// A cursor at the newest outbox row, with every transaction in flight pending from `after` (rows
/// up to it are gone), read in one snapshot, and a fresh version horizon drawn with it: a fence at
/// it refuses every write that read its row before.
async fn head(client: &Client, after: i64) -> Result<(Cursor, i64), CdcError> {
    let row = client
        .query_one(
            &format!("SELECT coalesce((SELECT max(id) FROM cacheward_outbox WHERE id <= ({OUTBOX_ID_HORIZON})), 0),
                    nextval('cacheward_version_seq'),
                    pg_snapshot_xmax(pg_current_snapshot())::text,
                    ARRAY(SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x),
                    pg_current_xact_id()::text"),
            &[],
        )
        .await?;
    let position: i64 = row.get(0);
    let listed = row
        .get::<_, Vec<String>>(3)
        .into_iter()
        .map(parse_xid)
        .collect::<Result<HashSet<u64>, _>>()?;
    let running = in_flight(parse_xid(row.get(2))?, listed, parse_xid(row.get(4))?);
    let mut pending: Vec<Pending> = running
        .into_iter()
        .map(|txid| Pending {
            txid,
            after,
            upto: position,
        })
        .filter(|p| p.after < p.upto)
        .collect();
    pending.sort_by_key(|p| p.txid);
    Ok((Cursor { position, pending }, row.get(1)))
}

/// Every transaction a snapshot must treat as running: the ones it lists, and every id from its
/// xmax up to `own` (a transaction id drawn after the snapshot was taken). PostgreSQL's xmax is
/// "latest completed + 1", not "next to be assigned": a transaction that drew a newer id than
/// every finished one is running but not listed, and may already hold a lower outbox id than rows
/// the snapshot sees.
fn in_flight(xmax: u64, listed: HashSet<u64>, own: u64) -> HashSet<u64> {
    let mut running = listed;
    running.extend(xmax..own);
    running
}

impl Snapshot {
    /// Whether `txid` had finished (committed or aborted) when the snapshot was taken.
    pub fn finished(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && !self.running.contains(&txid))
    }
}

impl Cursor {
    /// The cursor after a batch: `fresh_upto` is the largest fresh id applied; `late_complete` says
    /// whether the late rows of finished transactions were all read (else only up to `late_upto`).
    pub fn advance(
        &self,
        snapshot: &Snapshot,
        fresh_upto: Option<i64>,
        late_complete: bool,
        late_upto: i64,
    ) -> Cursor {
        let position = fresh_upto.map_or(self.position, |id| id.max(self.position));
        let mut pending: Vec<Pending> = self
            .pending
            .iter()
            .filter_map(|p| {
                if !snapshot.finished(p.txid) {
                    // Still running: its rows may hide anywhere up to the new position.
                    return Some(Pending {
                        upto: position,
                        ..p.clone()
                    });
                }
                if late_complete {
                    return None;
                }
                let after = p.after.max(late_upto);
                (after < p.upto).then(|| Pending { after, ..p.clone() })
            })
            .collect();
        for &txid in &snapshot.running {
            if position > self.position && !pending.iter().any(|p| p.txid == txid) {
                // Started since the last snapshot: its ids are all above the old position.
                pending.push(Pending {
                    txid,
                    after: self.position,
                    upto: position,
                });
            }
        }
        pending.retain(|p| p.after < p.upto);
        pending.sort_by_key(|p| p.txid);
        Cursor { position, pending }
    }

    /// Oldest outbox id this cursor may still need.
    pub fn low_water(&self) -> i64 {
        self.pending
            .iter()
            .map(|p| p.after)
            .min()
            .unwrap_or(self.position)
            .min(self.position)
    }
}

/// One outbox row as the applier reads it.
#[derive(Debug, Clone)]
struct Change {
    id: i64,
    op: String,
    username: Option<String>,
    old_username: Option<String>,
    version: i64,
    lag_ms: i64,
    /// Whether the version is one the version sequence can have drawn.
    version_drawn: bool,
}

impl Change {
    /// Why this outbox row cannot be what the capture trigger wrote, if so. The outbox is input
    /// like any other: a row forged by a role that may insert there must not stop the stream,
    /// fence the cache off for good or make it drop everything at will.
    fn malformed(&self) -> Option<&'static str> {
        if !self.version_drawn {
            return Some("its version is newer than any the version sequence drew");
        }
        match self.op.as_str() {
            "insert" | "update" if self.username.is_none() => {
                Some("an insert or update names no user")
            }
            "delete" if self.old_username.is_none() => Some("a delete names no user"),
            "insert" | "update" | "delete" | "truncate" => None,
            _ => Some("unknown op"),
        }
    }
}

/// The statements of the batch loop, prepared once per session: each then costs one round trip
/// (an unprepared query costs two).
struct Statements {
    snapshot: Statement,
    /// The snapshot and, drawn right after it in the same statement, our own transaction id.
    snapshot_and_xid: Statement,
    fresh: Statement,
    late: Statement,
    rows: Statement,
    own_xid: Statement,
    store_cursor: Statement,
    horizon: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        let fresh = format!(
            "SELECT {CHANGE_COLUMNS} FROM cacheward_outbox o
             WHERE o.id > $1 AND o.id <= ({OUTBOX_ID_HORIZON}) ORDER BY o.id LIMIT $2"
        );
        let late = late_query();
        let rows = db::FIND_USERS;
        const SNAPSHOT: &str = "SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text,
                        ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x)";
        let snapshot = format!("{SNAPSHOT} FROM pg_current_snapshot() s");
        let snapshot_and_xid =
            format!("{SNAPSHOT}, pg_current_xact_id()::text FROM pg_current_snapshot() s");
        let (snapshot, snapshot_and_xid, fresh, late, rows, own_xid, store_cursor, horizon) = tokio::try_join!(
            client.prepare(&snapshot),
            client.prepare(&snapshot_and_xid),
            client.prepare(&fresh),
            client.prepare(&late),
            client.prepare(rows),
            client.prepare("SELECT pg_current_xact_id()::text"),
            client.prepare(
                "INSERT INTO cacheward_cdc_cursors (consumer, position, pending) VALUES ($1, $2, $3::text::jsonb)
                 ON CONFLICT (consumer) DO UPDATE SET position = $2, pending = $3::text::jsonb, updated_at = now()",
            ),
            client.prepare(db::HORIZON),
        )?;
        Ok(Statements {
            snapshot,
            snapshot_and_xid,
            fresh,
            late,
            rows,
            own_xid,
            store_cursor,
            horizon,
        })
    }
}

/// The rows of finished pending transactions: `$1` txids, `$2` afters, `$3` uptos (one each),
/// `$4` the row limit. One primary-key range scan per transaction, whatever the outbox's size:
/// the LIMIT inside the LATERAL keeps PostgreSQL from flattening it into a hash join over a
/// sequential scan of the whole outbox (what it chose without it: 30 ms at 300 000 rows, and
/// every batch after a busy one paid it).
pub fn late_query() -> String {
    format!(
        "SELECT {CHANGE_COLUMNS}
         FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS p(txid, after, upto)
         CROSS JOIN LATERAL (
             SELECT * FROM cacheward_outbox x
             WHERE x.id > p.after AND x.id <= p.upto AND x.txid = p.txid::xid8
             ORDER BY x.id LIMIT $4
         ) o
         ORDER BY o.id LIMIT $4"
    )
}

/// The lag is clamped to [0, one day]: `changed_at` is what the outbox row says, and no value there
/// (`infinity`, a year 294276 AD) may fail the read.
const CHANGE_COLUMNS: &str = "o.id, o.op, o.username, o.old_username, o.version, \
     least(greatest((extract(epoch FROM clock_timestamp()) - extract(epoch FROM o.changed_at)) \
                    * 1000, 0), 86400000)::bigint, \
     o.version <= (SELECT last_value FROM cacheward_version_seq)";

/// The largest outbox id the identity has handed out: a row above it was forged (inserted with
/// OVERRIDING SYSTEM VALUE), and is never read (it would move the cursor past every real change).
const OUTBOX_ID_HORIZON: &str = "SELECT coalesce(pg_sequence_last_value(\
     pg_get_serial_sequence('cacheward_outbox', 'id')::regclass), 0)";

fn change(row: &tokio_postgres::Row) -> Change {
    Change {
        id: row.get(0),
        op: row.get(1),
        username: row.get(2),
        old_username: row.get(3),
        version: row.get(4),
        lag_ms: row.get(5),
        version_drawn: row.get(6),
    }
}

/// What a batch decided to do to Redis.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// A TRUNCATE was seen: tombstone every entry with a version up to this.
    pub truncate: Option<i64>,
    pub writes: Vec<Write>,
}

impl Plan {
    /// The fence a TRUNCATE at version horizon `version` needs: every row it removed has a version
    /// up to `version`, and every fill that read one of them read a horizon no later than it.
    pub fn truncate_fence(&self) -> Option<i64> {
        self.truncate.map(|version| version.saturating_add(1))
    }
}

/// Turns the names a batch mentions and their current rows (read after the horizon was `read_at`)
/// into cache writes. A name without a row gets a tombstone with the largest version the batch
/// recorded for it, which is at least the last version its removed row had.
pub fn plan(
    mode: CdcMode,
    mentioned: &BTreeMap<String, i64>,
    rows: Vec<User>,
    read_at: i64,
    truncate: Option<i64>,
) -> Plan {
    let mut found: BTreeMap<String, User> =
        rows.into_iter().map(|u| (u.username.clone(), u)).collect();
    let writes = mentioned
        .iter()
        .map(|(name, removed_version)| match (found.remove(name), mode) {
            (Some(user), CdcMode::Refresh) => Write::live(&user, read_at),
            // Removes anything older than the current row, and lets the current row be filled.
            (Some(user), CdcMode::Invalidate) => Write::tombstone(user.username, user.version - 1),
            (None, _) => Write::tombstone(name.clone(), *removed_version),
        })
        .collect();
    Plan { truncate, writes }
}

/// The CDC worker of one daemon.
pub struct Applier {
    config: Arc<Config>,
    cache: Cache,
    stats: Arc<CdcStats>,
    /// The cache this worker keeps: one cursor, and one active worker, per consumer.
    consumer: String,
    /// When `cdc lagging` was last said, while the lag lasts.
    lag_warned: Mutex<Option<Instant>>,
}

/// A change applied later than this after it was made is worth a warning.
const LAG_WARN_MS: u64 = 5_000;
/// How often `cdc lagging` repeats while the lag lasts.
const LAG_WARN_EVERY: Duration = Duration::from_secs(60);

/// How often processed outbox rows are pruned, at most.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows deleted per prune statement.
const PRUNE_CHUNK: i64 = 10_000;

/// Deletes, of the `$3` oldest outbox rows up to id `$2`, those older than `$1` seconds, records
/// how far pruning got, and returns how many it deleted. Ids are handed over as an array so that
/// the delete looks them up by primary key: as a join, PostgreSQL chose a sequential scan of the
/// whole outbox (54 ms at a million rows, every minute, on the CDC worker's connection).
pub const PRUNE_QUERY: &str = "WITH gone AS (DELETE FROM cacheward_outbox o
                   WHERE o.id = ANY(ARRAY(SELECT id FROM cacheward_outbox
                                          WHERE id <= $2 ORDER BY id LIMIT $3))
                     AND o.changed_at < now() - make_interval(secs => $1)
                   RETURNING o.id)
     UPDATE cacheward_cdc_settings
        SET pruned_upto = greatest(pruned_upto, coalesce((SELECT max(id) FROM gone), 0))
     RETURNING (SELECT count(*) FROM gone)";

impl Applier {
    pub fn new(config: Arc<Config>, cache: Cache, stats: Arc<CdcStats>) -> Applier {
        let redis = config
            .redis
            .url
            .as_ref()
            .map(|u| u.redacted())
            .unwrap_or_default();
        let consumer = format!("{}{}", redis, config.cache.key_prefix);
        Applier {
            config,
            cache,
            stats,
            consumer,
            lag_warned: Mutex::new(None),
        }
    }

    /// `cdc lagging` once the lag passes [`LAG_WARN_MS`] (then at most every [`LAG_WARN_EVERY`]),
    /// `cdc caught up` once it is back under.
    fn watch_lag(&self, lag_ms: u64) {
        let mut warned = self.lag_warned.lock().expect("lag lock is never poisoned");
        if lag_ms > LAG_WARN_MS {
            if warned.is_none_or(|at| at.elapsed() >= LAG_WARN_EVERY) {
                tracing::warn!(lag_ms, "cdc lagging");
                *warned = Some(Instant::now());
            }
        } else if warned.take().is_some() {
            tracing::info!(lag_ms, "cdc caught up");
        }
    }

    /// Runs until `stop`: sessions on a dedicated connection, reconnecting with back-off.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let outcome = self.session(&stop).await;
            self.stats.listening.store(false, Relaxed);
            let error = match outcome {
                Ok(()) => return,
                Err(e) => e,
            };
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            self.stats.reconnects.fetch_add(1, Relaxed);
            tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64, "cdc reconnecting");
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(&self, stop: &CancellationToken) -> Result<(), CdcError> {
        let pg = db::pg_config(&self.config)?;
        let (client, mut connection) =
            tokio::time::timeout(Duration::from_secs(5), pg.connect(NoTls))
                .await
                .map_err(|_| DbError::Timeout("cdc connect".into()))??;
        let wake = Arc::new(Notify::new());
        let driver_wake = wake.clone();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => driver_wake.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "cdc connection failed");
                        break;
                    }
                }
            }
            // Wake the loop so that it notices the dead connection now.
            driver_wake.notify_one();
        });
        let _abort_driver = AbortOnDrop(driver);

        if !self.lead(&client, stop).await? {
            return Ok(());
        }
        let cdc = &self.config.cdc;
        client
            .batch_execute(&format!("LISTEN \"{}\"", cdc.channel))
            .await?;
        client
            .execute(
                "UPDATE cacheward_cdc_settings SET channel = $1, notify = $2 WHERE channel <> $1 OR notify <> $2",
                &[&cdc.channel, &cdc.notify],
            )
            .await?;
        let statements = Statements::prepare(&client).await?;
        let mut cursor = self.load_cursor(&client, &statements).await?;
        let mut last_prune: Option<Instant> = None;
        self.stats.listening.store(true, Relaxed);
        self.stats.cursor.store(cursor.position, Relaxed);
        tracing::info!(channel = %cdc.channel, position = cursor.position, pending = cursor.pending.len(), "cdc listening");

        let poll = Duration::from_millis(cdc.poll_interval_ms);
        let prune_every = PRUNE_EVERY.min(Duration::from_secs(cdc.retention_secs));
        let mut redis_retry = Duration::from_millis(50);
        // Whether the last batch found changes: the next one likely will too.
        let mut busy = false;
        loop {
            // Catch up: batch after batch until one comes back short.
            loop {
                match self.batch(&client, &statements, &mut cursor, busy).await {
                    Ok(fresh) if fresh < cdc.batch_size || stop.is_cancelled() => {
                        busy = fresh > 0;
                        break;
                    }
                    Ok(_) => busy = true,
                    Err(CdcError::Redis(e)) => {
                        // The cursor stays where it is; try again once Redis answers.
                        tracing::debug!(error = %e, "cdc batch not applied: redis");
                        tokio::select! {
                            biased;
                            _ = stop.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(redis_retry) => {}
                        }
                        redis_retry = (redis_retry * 2).min(poll);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                redis_retry = Duration::from_millis(50);
            }
            if last_prune.is_none_or(|at| at.elapsed() >= prune_every) {
                self.prune(&client, &cursor).await?;
                last_prune = Some(Instant::now());
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            if client.is_closed() {
                return Err(DbError::Unavailable("cdc connection closed".into()).into());
            }
        }
    }

    /// Only one worker per consumer applies changes (a session advisory lock, released when its
    /// connection ends); the others wait as standbys. Returns false when asked to stop.
    async fn lead(&self, client: &Client, stop: &CancellationToken) -> Result<bool, CdcError> {
        let key = format!("cacheward_cdc:{}", self.consumer);
        let mut said = false;
        loop {
            let locked: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                    &[&key],
                )
                .await?
                .get(0);
            if locked {
                return Ok(true);
            }
            if !said {
                tracing::info!(consumer = %self.consumer, "cdc standby: another daemon applies changes for this cache");
                said = true;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(false),
                _ = tokio::time::sleep(Duration::from_millis(self.config.cdc.poll_interval_ms)) => {}
            }
        }
    }

    /// Loads this consumer's cursor; decides on a first start or a gap whether to replay or resync.
    async fn load_cursor(&self, client: &Client, st: &Statements) -> Result<Cursor, CdcError> {
        let row = client
            .query_opt(
                "SELECT position, pending::text FROM cacheward_cdc_cursors WHERE consumer = $1",
                &[&self.consumer],
            )
            .await?;
        let pruned_upto: i64 = client
            .query_one("SELECT pruned_upto FROM cacheward_cdc_settings", &[])
            .await?
            .get(0);
        let cursor = match row {
            Some(row) => {
                let pending: String = row.get(1);
                Cursor {
                    position: row.get(0),
                    pending: serde_json::from_str(&pending)
                        .map_err(|e| DbError::Other(format!("cdc cursor pending list: {e}")))?,
                }
            }
            None => {
                // First start for this cache. An empty cache needs no history; one with entries
                // replays what the outbox retains (its TTL bounds anything older).
                let cached = self.cache.any_entry().await?;
                let cursor = if cached {
                    Cursor::default()
                } else {
                    // Transactions in flight may still commit changes below the head.
                    head(client, pruned_upto).await?.0
                };
                self.store_cursor(client, st, &cursor).await?;
                if cached && pruned_upto == 0 {
                    tracing::info!(consumer = %self.consumer, "cdc first start: replaying the retained outbox");
                }
                cursor
            }
        };
        if cursor.low_water() < pruned_upto {
            return self
                .resync(
                    client,
                    st,
                    pruned_upto,
                    "changes newer than the cursor were pruned from the outbox",
                )
                .await;
        }
        Ok(cursor)
    }

    async fn store_cursor(
        &self,
        client: &Client,
        st: &Statements,
        cursor: &Cursor,
    ) -> Result<(), CdcError> {
        let pending = serde_json::to_string(&cursor.pending).expect("pending list serializes");
        client
            .execute(
                &st.store_cursor,
                &[&self.consumer, &cursor.position, &pending],
            )
            .await?;
        self.stats.cursor.store(cursor.position, Relaxed);
        Ok(())
    }

    /// Starts over from the head of the outbox after history was lost: the cache is fenced at a
    /// fresh version horizon and every cached entry dropped (so no entry older than now survives,
    /// and no write that read before now can land), and the cursor jumps to the newest change.
    async fn resync(
        &self,
        client: &Client,
        st: &Statements,
        pruned_upto: i64,
        reason: &str,
    ) -> Result<Cursor, CdcError> {
        tracing::warn!(consumer = %self.consumer, reason, "cdc resync: dropping every cached user entry");
        let (cursor, horizon) = head(client, pruned_upto).await?;
        let dropped = self.cache.drop_all(horizon).await?;
        let position = cursor.position;
        self.store_cursor(client, st, &cursor).await?;
        self.stats.resyncs.fetch_add(1, Relaxed);
        tracing::warn!(consumer = %self.consumer, dropped, position, "cdc resync done");
        Ok(cursor)
    }

    /// Reads, applies and records one batch; returns how many fresh rows it read.
    async fn batch(
        &self,
        client: &Client,
        st: &Statements,
        cursor: &mut Cursor,
        busy: bool,
    ) -> Result<usize, CdcError> {
        let started = Instant::now();
        let limit = self.config.cdc.batch_size as i64;
        // One snapshot for everything read: the outbox rows, the running transactions, the rows.
        // Requests are pipelined: BEGIN and the first two reads cost one round trip, the rows and
        // COMMIT another. Any database error ends the session (and the connection with it), so
        // the transaction never outlives a failure.
        //
        // The transactions that may hide rows below the new position are those running at the
        // snapshot and every id from its xmax up to one of our own (see `in_flight`): the later
        // ours is drawn, the more ids land in that range, each to be remembered and looked up.
        // While changes keep coming, ours is drawn in the snapshot's own statement; an idle poll
        // draws none, and a batch that finds changes after one draws it with the rows instead.
        let fresh_params: [&(dyn ToSql + Sync); 2] = [&cursor.position, &limit];
        let snapshot_statement = match busy {
            true => &st.snapshot_and_xid,
            false => &st.snapshot,
        };
        // The version horizon is read first, in a statement of its own before the snapshot: the
        // rows' `read_at` (see `Cache::fence_key`).
        let (horizon, _, snap, fresh) = tokio::try_join!(
            client.query_one(&st.horizon, &[]),
            client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
            client.query_one(snapshot_statement, &[]),
            client.query(&st.fresh, &fresh_params),
        )?;
        let read_at: i64 = horizon.get(0);
        let early_xid: Option<String> = busy.then(|| snap.get(3));
        let mut snapshot = Snapshot {
            xmin: parse_xid(snap.get(0))?,
            xmax: parse_xid(snap.get(1))?,
            running: snap
                .get::<_, Vec<String>>(2)
                .into_iter()
                .map(parse_xid)
                .collect::<Result<_, _>>()?,
        };
        let fresh: Vec<Change> = fresh.iter().map(change).collect();
        // Only finished transactions are asked for: a long-running one's range keeps growing.
        let finished: Vec<&Pending> = cursor
            .pending
            .iter()
            .filter(|p| snapshot.finished(p.txid))
            .collect();
        let late: Vec<Change> = if finished.is_empty() {
            Vec::new()
        } else {
            let txids: Vec<String> = finished.iter().map(|p| p.txid.to_string()).collect();
            let afters: Vec<i64> = finished.iter().map(|p| p.after).collect();
            let uptos: Vec<i64> = finished.iter().map(|p| p.upto).collect();
            client
                .query(&st.late, &[&txids, &afters, &uptos, &limit])
                .await?
                .iter()
                .map(change)
                .collect()
        };

        let mut mentioned: BTreeMap<String, i64> = BTreeMap::new();
        let mut truncate: Option<i64> = None;
        for c in fresh.iter().chain(&late) {
            if let Some(reason) = c.malformed() {
                tracing::warn!(id = c.id, op = %c.op, version = c.version, reason, "cdc skipped a malformed outbox row");
                continue;
            }
            if c.op == "truncate" {
                truncate = truncate.max(Some(c.version));
            }
            for name in [&c.username, &c.old_username].into_iter().flatten() {
                let v = mentioned.entry(name.clone()).or_insert(c.version);
                *v = (*v).max(c.version);
            }
        }
        let names: Vec<&String> = mentioned.keys().collect();
        let rows_params: [&(dyn ToSql + Sync); 1] = [&names];
        let rows = async {
            match names.is_empty() {
                true => Ok(Vec::new()),
                false => client.query(&st.rows, &rows_params).await,
            }
        };
        // The position moves past the fresh rows: the transactions that may still hide rows below
        // it must all be known (see `in_flight`), which takes a transaction id of our own.
        let own_xid = async {
            match (fresh.is_empty(), early_xid) {
                (true, _) => Ok(None),
                (false, Some(own)) => Ok(Some(own)),
                (false, None) => client
                    .query_one(&st.own_xid, &[])
                    .await
                    .map(|row| Some(row.get(0))),
            }
        };
        let (rows, own_xid, _) = tokio::try_join!(rows, own_xid, client.batch_execute("COMMIT"))?;
        // A row that cannot be served is skipped, once per change, and its name gets a tombstone
        // (the plan treats it as missing): the rest of the batch is applied.
        let (rows, broken) = User::from_rows(&rows);
        for e in &broken {
            tracing::warn!(username = ?e.username, error = %e.reason, "cdc skipped a row that cannot be served");
        }
        if let Some(own) = own_xid {
            let own = parse_xid(own)?;
            snapshot.running = in_flight(snapshot.xmax, snapshot.running, own);
        }

        let plan = plan(self.config.cdc.mode, &mentioned, rows, read_at, truncate);
        if let Some(fence) = plan.truncate_fence() {
            let dropped = self.cache.drop_all(fence).await?;
            tracing::info!(dropped, "cdc applied a TRUNCATE: every cached user dropped");
        }
        self.cache.apply(&plan.writes).await?;

        let late_upto = late.last().map_or(0, |c| c.id);
        let next = cursor.advance(
            &snapshot,
            fresh.last().map(|c| c.id),
            (late.len() as i64) < limit,
            late_upto,
        );
        if next != *cursor {
            self.store_cursor(client, st, &next).await?;
            *cursor = next;
        }
        let applied = fresh.len() + late.len();
        if applied == 0 {
            self.stats.last_lag_ms.store(0, Relaxed);
        } else {
            let elapsed = started.elapsed().as_millis() as i64;
            let mut worst = 0;
            for c in fresh.iter().chain(&late) {
                let lag = (c.lag_ms.max(0) + elapsed) as u64;
                self.stats.record_lag(lag);
                worst = worst.max(lag);
            }
            self.stats.last_lag_ms.store(worst, Relaxed);
            self.watch_lag(worst);
            self.stats.applied.fetch_add(applied as u64, Relaxed);
            self.stats.batches.fetch_add(1, Relaxed);
            tracing::debug!(
                changes = applied,
                took_us = started.elapsed().as_micros() as u64,
                late = late.len(),
                pending = cursor.pending.len(),
                writes = plan.writes.len(),
                position = cursor.position,
                lag_ms = worst,
                "cdc batch applied"
            );
        }
        Ok(fresh.len())
    }

    /// Deletes outbox rows older than `cdc.retention_secs` that this consumer no longer needs, and
    /// records how far it pruned so that a consumer left behind knows to resync.
    async fn prune(&self, client: &Client, cursor: &Cursor) -> Result<(), CdcError> {
        let retention = self.config.cdc.retention_secs as f64;
        let mut pruned = 0;
        loop {
            let row = client
                .query_one(
                    PRUNE_QUERY,
                    &[&retention, &cursor.low_water(), &PRUNE_CHUNK],
                )
                .await?;
            let deleted: i64 = row.get(0);
            pruned += deleted;
            if deleted < PRUNE_CHUNK {
                break;
            }
        }
        if pruned > 0 {
            tracing::debug!(pruned, "cdc outbox pruned");
        }
        Ok(())
    }
}

/// Aborts the connection driver when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(xmin: u64, xmax: u64, running: &[u64]) -> Snapshot {
        Snapshot {
            xmin,
            xmax,
            running: running.iter().copied().collect(),
        }
    }

    #[test]
    fn transactions_from_xmax_up_to_our_own_are_in_flight() {
        let running = in_flight(10, HashSet::from([7]), 13);
        assert_eq!(running, HashSet::from([7, 10, 11, 12]));
        assert_eq!(in_flight(10, HashSet::new(), 10), HashSet::new());
    }

    #[test]
    fn finished_means_below_xmin_or_below_xmax_and_not_running() {
        let s = snapshot(10, 20, &[10, 15]);
        assert!(s.finished(9));
        assert!(!s.finished(10));
        assert!(s.finished(11));
        assert!(!s.finished(15));
        assert!(!s.finished(20));
    }

    #[test]
    fn a_running_transaction_is_remembered_until_it_finishes() {
        let start = Cursor::default();
        // Batch 1: ids up to 12 applied; transaction 15 was running and may hold ids below 12.
        let c1 = start.advance(&snapshot(15, 20, &[15]), Some(12), true, 0);
        assert_eq!(c1.position, 12);
        assert_eq!(
            c1.pending,
            vec![Pending {
                txid: 15,
                after: 0,
                upto: 12
            }]
        );
        // Batch 2: still running, the cursor moves on: its range grows with it.
        let c2 = c1.advance(&snapshot(15, 21, &[15]), Some(30), true, 0);
        assert_eq!(
            c2.pending,
            vec![Pending {
                txid: 15,
                after: 0,
                upto: 30
            }]
        );
        // Batch 3: it finished and all its rows were read: forgotten.
        let c3 = c2.advance(&snapshot(21, 21, &[]), None, true, 0);
        assert_eq!(
            c3,
            Cursor {
                position: 30,
                pending: vec![]
            }
        );
    }

    #[test]
    fn a_finished_transaction_read_in_part_keeps_the_rest() {
        let c = Cursor {
            position: 100,
            pending: vec![Pending {
                txid: 7,
                after: 0,
                upto: 100,
            }],
        };
        let next = c.advance(&snapshot(50, 50, &[]), None, false, 40);
        assert_eq!(
            next.pending,
            vec![Pending {
                txid: 7,
                after: 40,
                upto: 100
            }]
        );
        assert_eq!(next.low_water(), 40);
    }

    #[test]
    fn idle_batches_change_nothing() {
        let c = Cursor {
            position: 5,
            pending: vec![],
        };
        assert_eq!(
            c.advance(&snapshot(9, 12, &[9, 10]), None, true, 0),
            c,
            "no new ids: nothing can hide"
        );
    }

    #[test]
    fn plans_refresh_and_invalidate() {
        let user = User {
            username: "a".into(),
            version: 7,
            json: "{}".into(),
        };
        let mentioned: BTreeMap<String, i64> =
            [("a".to_string(), 7), ("gone".to_string(), 5)].into();
        let refresh = plan(CdcMode::Refresh, &mentioned, vec![user.clone()], 3, None);
        assert_eq!(
            refresh.writes,
            vec![Write::live(&user, 3), Write::tombstone("gone", 5)]
        );
        assert_eq!(refresh.truncate_fence(), None);
        let invalidate = plan(CdcMode::Invalidate, &mentioned, vec![user], 3, Some(9));
        assert_eq!(
            invalidate.truncate_fence(),
            Some(10),
            "above every removed row"
        );
        assert_eq!(invalidate.writes[0], Write::tombstone("a", 6));
    }
}
