//! The CDC worker: applies out-of-band changes to Redis. It reads `cacheward_outbox` (filled by the
//! trigger of sql/0002_cdc.sql) after a durable cursor, on a dedicated connection that LISTENs for
//! wake-ups and also polls, refetches the current rows of every name a batch mentions, writes them
//! through the same versioned script as reads and writes, and only then moves the cursor.
//!
//! One batch is four steps, one room each: [`outbox::read`] → [`plan::Plan::of`] →
//! [`Applier::apply`](apply) → [`Applier::advance`](apply), with the cursor algebra in [`cursor`].
//! This module runs sessions: connect, lead (one worker per cache), load the cursor, loop.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::cache::{Cache, CacheError};
use crate::store::db::{self, DbError};

pub mod apply;
pub mod cursor;
pub mod outbox;
pub mod plan;
pub mod stats;

use cursor::Cursor;
use outbox::Statements;
use plan::Plan;
use stats::CdcStats;

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

/// How often processed outbox rows are pruned, at most.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

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
        let target = db::pg_target(&self.config)?;
        let (client, mut connection) =
            tokio::time::timeout(Duration::from_secs(5), target.config().connect(target.tls))
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
                let pruned = outbox::prune(&client, &cursor, cdc.retention_secs).await?;
                if pruned > 0 {
                    tracing::debug!(pruned, "cdc outbox pruned");
                }
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
        let (stored, pruned_upto) = outbox::load_cursor(client, &self.consumer).await?;
        let cursor = match stored {
            Some(cursor) => cursor,
            None => {
                // First start for this cache. An empty cache needs no history; one with entries
                // replays what the outbox retains (its TTL bounds anything older).
                let cached = self.cache.any_entry().await?;
                let cursor = if cached {
                    Cursor::default()
                } else {
                    // Transactions in flight may still commit changes below the head.
                    outbox::head(client, pruned_upto).await?.0
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
        let (cursor, horizon) = outbox::head(client, pruned_upto).await?;
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
        let batch = outbox::read(client, st, cursor, limit, busy).await?;
        let plan = Plan::of(self.config.cdc.mode, &batch);
        self.apply(&plan).await?;
        self.advance(client, st, cursor, &batch).await?;
        self.record(&batch, &plan, cursor, started);
        Ok(batch.fresh.len())
    }
}

/// Aborts the connection driver when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
