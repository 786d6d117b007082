//! The CDC worker: applies out-of-band changes to Redis. It reads `cacheward_outbox` (filled by the
//! trigger of sql/0002_cdc.sql) after a durable cursor, on a dedicated connection that LISTENs for
//! wake-ups and also polls, refetches the current rows of every name a batch mentions, writes them
//! through the same versioned script as reads and writes, and only then moves the cursor.
//!
//! One batch is four steps, one room each: [`outbox::read`] → [`plan::Plan::of`] →
//! [`Applier::apply`](apply) → the cursor moved past it (the algebra in [`cursor`]); [`batch`]
//! runs them, and reads the next batch while Redis applies one.
//! This module runs sessions: connect, lead (one worker per cache), load the cursor, loop.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::model::registry::Tables;
use crate::store::pg::connect;
use crate::store::pg::{DbError, DbErrorKind};
use crate::store::redis::{Cache, CacheError};
use crate::support::error::caught;
use crate::support::time::{within, Backoff};

pub mod apply;
mod batch;
pub mod cursor;
pub mod identity;
pub mod lease;
pub mod outbox;
pub mod plan;
mod start;
pub mod statements;
pub mod stats;
pub mod tables;
pub mod wake;

use apply::Unsaved;
use cursor::Cursor;
use statements::Statements;
use stats::CdcStats;
use wake::Spurious;

/// Why a CDC step failed.
#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    /// The dedicated connection failed: reconnect with back-off.
    #[error(transparent)]
    Postgres(#[from] DbError),
    /// Redis refused or is down: keep the cursor, retry the batch later.
    #[error(transparent)]
    Redis(#[from] CacheError),
    /// Another worker took the lease over (this one was silent for too long): stand by.
    #[error("the cdc lease was taken over by another worker")]
    LeaseLost,
    /// The batch changes a declared table not checked against the catalog yet (the daemon just
    /// started): keep the cursor, retry the batch shortly. Passed over, its rows would get
    /// tombstones at their keys only, and their lookups' copies would stay as they were.
    #[error("declared table {0} is not checked against the catalog yet")]
    Unchecked(String),
    /// A bug: the session panicked (said at error); it starts over like after a lost connection.
    #[error("the cdc session panicked: {0}")]
    Panicked(String),
}

impl From<tokio_postgres::Error> for CdcError {
    fn from(e: tokio_postgres::Error) -> Self {
        CdcError::Postgres(e.into())
    }
}

/// The consumer of the change stream that keeps the cache whose id in Redis is `cache_id`: one
/// cursor, and one active worker, per consumer.
pub fn consumer_of(cache_id: &str) -> String {
    format!("cache:{cache_id}")
}

/// The CDC worker of one daemon.
pub struct Applier {
    config: Arc<Config>,
    cache: Cache,
    stats: Arc<CdcStats>,
    tables: Arc<Tables>,
    /// The cache this worker keeps (`cache:` + the cache's id in Redis, asked at every session):
    /// one cursor, and one active worker, per consumer.
    consumer: Mutex<String>,
    /// The consumer this worker applied for before its cache got a new id, whose cursor the
    /// new one starts from.
    inherited: Mutex<Option<String>>,
    /// When `cdc lagging` was last said, while the lag lasts.
    lag_warned: Mutex<Option<Instant>>,
    /// Undeclared tables whose changes this worker said it passes over (once each).
    undeclared_said: Mutex<std::collections::BTreeSet<String>>,
    /// This worker's name in the lease table (see [`identity`]): unique among daemons, kept
    /// across reconnections and restarts.
    holder: String,
    /// Client-side bound on every PostgreSQL call of a session (a frozen server never answers).
    query_bound: Duration,
}

/// How often processed outbox rows are pruned, at most.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Applier {
    /// Says, once per table, that the stream holds changes of a table this daemon does not
    /// declare: they are passed over, so a cache of that table kept by this stream goes stale.
    fn say_undeclared(&self, names: &std::collections::BTreeSet<String>) {
        if names.is_empty() {
            return;
        }
        let mut said = self.undeclared_said.lock().expect("not poisoned");
        for name in names {
            if said.len() < 64 && said.insert(name.clone()) {
                tracing::warn!(
                    table = %name,
                    "cdc passes over changes of a table this daemon does not declare"
                );
            }
        }
    }

    /// `tables`: the declared tables, shared with the request path (their rows are read once
    /// they are checked).
    pub fn new(
        config: Arc<Config>,
        cache: Cache,
        stats: Arc<CdcStats>,
        tables: Arc<Tables>,
    ) -> Applier {
        let holder = identity::holder(&config.socket.path);
        let query_bound = config.statement_timeout() + Duration::from_secs(1);
        Applier {
            config,
            cache,
            stats,
            tables,
            consumer: Mutex::default(),
            inherited: Mutex::default(),
            lag_warned: Mutex::new(None),
            undeclared_said: Mutex::default(),
            holder,
            query_bound,
        }
    }

    /// The consumer of the current session (see [`Applier::consumer`]'s field).
    fn consumer(&self) -> String {
        self.consumer.lock().expect("never poisoned").clone()
    }

    /// Runs until `stop`: sessions on a dedicated connection, reconnecting with back-off.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let started = Instant::now();
            let outcome = caught(self.session(&stop)).await.unwrap_or_else(|message| {
                tracing::error!(%message, "cdc session panicked");
                Err(CdcError::Panicked(message))
            });
            self.stats.listening.store(false, Relaxed);
            let error = match outcome {
                Ok(()) => return,
                Err(e) => e,
            };
            if let CdcError::Postgres(e) = &error {
                if e.is_misconfiguration() {
                    tracing::error!(error = %e, "cdc stopped: the configuration cannot work");
                    return;
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff.reset();
            }
            self.stats.reconnects.fetch_add(1, Relaxed);
            let wait = backoff.next_wait();
            tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "cdc reconnecting");
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn session(&self, stop: &CancellationToken) -> Result<(), CdcError> {
        let target = connect::cdc_target(&self.config)?;
        let mut pg = target.config();
        if pg.get_application_name() == Some("cacheward") {
            // Tells the CDC session apart in pg_stat_activity.
            pg.application_name("cacheward-cdc");
        }
        let (client, mut connection) = match tokio::time::timeout(
            Duration::from_secs(5),
            pg.connect(target.tls),
        )
        .await
        {
            Err(_) => {
                let bound = Duration::from_secs(5);
                return Err(DbError::timeout("cdc connect", bound).into());
            }
            Ok(Err(e)) => {
                let e = DbError::from_driver("cdc connect", e);
                return Err(match e.kind() {
                        DbErrorKind::Pooler => DbError::said(
                            DbErrorKind::Pooler,
                            format!("{e}: postgres.url is a pooler, and the CDC worker needs a direct session: set cdc.url"),
                        ),
                        _ => e,
                    }
                    .into());
            }
            Ok(Ok(connected)) => connected,
        };
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
        // The session's writes are bookkeeping that a crash may undo at no cost: its cursor (a
        // cursor that goes back re-applies changes, which versions make harmless), its lease, the
        // transaction id a batch draws, a prune (undone with the rows it deleted). Waiting for
        // their flush (or a synchronous standby) would hold every batch after them back by one:
        // an early batch draws an id, so its read commits a write.
        let settings = async { Ok(client.batch_execute("SET synchronous_commit = off").await?) };
        self.bounded("session settings", settings).await?;

        // Which cache this is: asked of Redis at every session (a Redis that lost its data is
        // another cache, with a new id).
        let id = self.cache.cache_id().await?;
        let consumer = consumer_of(&id);
        let before = std::mem::replace(
            &mut *self.consumer.lock().expect("never poisoned"),
            consumer.clone(),
        );
        if !before.is_empty() && before != consumer {
            // The same cache under a new id (Redis lost its data): its cursor goes on from the
            // old one's, so that no change this worker had not applied yet is skipped.
            *self.inherited.lock().expect("never poisoned") = Some(before);
        }
        if !self.lead(&client, stop).await? {
            return Ok(());
        }
        let outcome = self.lead_session(&client, &wake, stop).await;
        if outcome.is_ok() {
            // Stopping: a standby takes over at once instead of after the lease expires.
            let consumer = self.consumer();
            let release = lease::release(&client, &consumer, &self.holder);
            let _ = self.bounded("lease release", release).await;
        }
        outcome
    }

    /// The session as leader: listen, load the cursor, then apply batch after batch; every
    /// PostgreSQL call bounded in time and the lease renewed at least every [`lease::HEARTBEAT`],
    /// so that a connection that went silent is given up within seconds.
    async fn lead_session(
        &self,
        client: &Client,
        wake: &Notify,
        stop: &CancellationToken,
    ) -> Result<(), CdcError> {
        let cdc = &self.config.cdc;
        self.bounded("listen", async {
            client
                .batch_execute(&format!("LISTEN \"{}\"", cdc.channel))
                .await?;
            client
                .execute(
                    "UPDATE cacheward_cdc_settings SET channel = $1, notify = $2 WHERE channel <> $1 OR notify <> $2",
                    &[&cdc.channel, &cdc.notify],
                )
                .await?;
            Ok(())
        })
        .await?;
        let statements = self
            .bounded("prepare", async { Ok(Statements::prepare(client).await?) })
            .await?;
        let mut cursor = self.load_cursor(client, &statements).await?;
        self.stats.listening.store(true, Relaxed);
        self.stats.cursor.store(cursor.position, Relaxed);
        tracing::info!(channel = %cdc.channel, position = cursor.position, pending = cursor.pending.len(), "cdc listening");
        // What the last worker passed over stays missed until this one has applied it.
        let consumer = self.consumer();
        let missed = outbox::load_missed(client, &consumer);
        let mut unsaved = Unsaved::default();
        unsaved.missed = self.bounded("cursor load", missed).await?;
        let following = Following {
            client,
            statements: &statements,
            wake,
            stop,
        };
        let result = self.follow(following, &mut cursor, &mut unsaved).await;
        if result.is_ok() {
            // Stopping: the cursor is stored before the session ends.
            self.save(client, &statements, &cursor, &mut unsaved)
                .await?;
        }
        result
    }

    /// The session's loop: catches up, prunes, waits for a notification or the next poll.
    async fn follow(
        &self,
        following: Following<'_>,
        cursor: &mut Cursor,
        unsaved: &mut Unsaved,
    ) -> Result<(), CdcError> {
        let Following {
            client,
            statements,
            wake,
            stop,
        } = following;
        // A batch read while the last one applied (see [`batch`]).
        let mut ahead = None;
        let cdc = &self.config.cdc;
        // Whether the last batch found changes: the next one likely will too.
        let mut busy = false;
        let mut renewed = Instant::now();
        let mut last_prune: Option<Instant> = None;
        let poll = Duration::from_millis(cdc.poll_interval_ms);
        let prune_every = PRUNE_EVERY.min(Duration::from_secs(cdc.retention_secs));
        let mut redis_retry = Backoff::new(Duration::from_millis(50), poll);
        let mut spurious = Spurious::default();
        loop {
            // Catch up: batch after batch until one comes back short.
            loop {
                if renewed.elapsed() >= lease::HEARTBEAT {
                    // The renewal is a write: a read ahead's transaction (read only) ends first.
                    if let Some(unused) = ahead.take() {
                        self.discard(client, unused).await?;
                    }
                }
                self.heartbeat(client, &mut renewed).await?;
                // Every primary answers again: what one missed is applied again from the floor.
                if let Some(floor) = unsaved.replay(|| self.cache.unreachable().is_empty()) {
                    tracing::info!(
                        from = floor.position,
                        to = cursor.position,
                        "cdc replays the changes a redis node missed"
                    );
                    *cursor = floor;
                    busy = true;
                }
                // A notification says a change is likely there too.
                let early = busy || spurious.woke;
                let batch = self.batch(&following, cursor, early, unsaved, &mut ahead);
                match batch.await {
                    Ok((fresh, read)) => {
                        spurious.batch_read(read);
                        let more = fresh >= cdc.batch_size || ahead.is_some();
                        if !more || stop.is_cancelled() {
                            if let Some(unused) = ahead.take() {
                                self.discard(client, unused).await?;
                            }
                            busy = fresh > 0;
                            spurious.after_catch_up();
                            break;
                        }
                        busy = true;
                    }
                    Err(CdcError::Redis(e)) => {
                        // The cursor stays where it is; try again once Redis answers.
                        tracing::debug!(error = %e, "cdc batch not applied: redis");
                        if !redis_retry.wait(stop).await {
                            return Ok(());
                        }
                        continue;
                    }
                    Err(e @ CdcError::Unchecked(_)) => {
                        tracing::debug!(error = %e, "cdc batch not applied yet");
                        if !redis_retry.wait(stop).await {
                            return Ok(());
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                redis_retry.reset();
            }
            if last_prune.is_none_or(|at| at.elapsed() >= prune_every) {
                // Nothing the stored cursor has not passed is pruned.
                self.save(client, statements, cursor, unsaved).await?;
                let prune = outbox::prune(client, unsaved.storable(cursor), cdc.retention_secs);
                let pruned = self.bounded("prune", prune).await?;
                if pruned > 0 {
                    tracing::debug!(pruned, "cdc outbox pruned");
                }
                last_prune = Some(Instant::now());
            }
            // Wait for a notification or the next poll, renewing the lease meanwhile.
            let next_poll = tokio::time::Instant::now() + poll;
            // A moved cursor not carried by a next batch soon is stored alone.
            let save_at = tokio::time::Instant::now() + apply::SAVE_AFTER;
            // After a run of notifications that brought nothing, the next waits a little: a
            // flood of NOTIFYs from any role costs a bounded number of reads.
            let gap = spurious.gap().min(poll);
            let heed_at = tokio::time::Instant::now() + gap;
            spurious.woke = false;
            loop {
                let next_beat = tokio::time::Instant::from_std(renewed + lease::HEARTBEAT);
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    _ = async {
                        // No timer unless a gap is due: one costs up to a tick of the driver (1 ms).
                        if !gap.is_zero() {
                            tokio::time::sleep_until(heed_at).await;
                        }
                        wake.notified().await
                    } => {
                        spurious.woke = true;
                        break;
                    }
                    _ = tokio::time::sleep_until(save_at), if unsaved.moved => {
                        self.save(client, statements, cursor, unsaved).await?;
                    }
                    _ = tokio::time::sleep_until(next_poll.min(next_beat)) => {}
                }
                if client.is_closed() {
                    return Err(DbError::said(DbErrorKind::Lost, "cdc connection closed").into());
                }
                self.heartbeat(client, &mut renewed).await?;
                if tokio::time::Instant::now() >= next_poll {
                    break;
                }
            }
            if client.is_closed() {
                return Err(DbError::said(DbErrorKind::Lost, "cdc connection closed").into());
            }
        }
    }

    /// Renews the lease if a [`lease::HEARTBEAT`] has passed since `renewed`; a lease lost (it
    /// expired and another worker took it) ends the session.
    async fn heartbeat(&self, client: &Client, renewed: &mut Instant) -> Result<(), CdcError> {
        if renewed.elapsed() < lease::HEARTBEAT {
            return Ok(());
        }
        let consumer = self.consumer();
        let renew = lease::renew(client, &consumer, &self.holder);
        if !self.bounded("lease renewal", renew).await? {
            return Err(CdcError::LeaseLost);
        }
        *renewed = Instant::now();
        Ok(())
    }

    /// `call`, or a timeout error once it has taken longer than the session's bound.
    fn bounded<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, CdcError>>,
    ) -> impl std::future::Future<Output = Result<T, CdcError>> {
        within(self.query_bound, call, move |bound| {
            DbError::timeout(format!("cdc {what} (the connection is given up)"), bound).into()
        })
    }

    /// Only one worker per consumer applies changes: the holder of its lease (see [`lease`]); the
    /// others wait as standbys and take over once it expires. Returns false when asked to stop.
    async fn lead(&self, client: &Client, stop: &CancellationToken) -> Result<bool, CdcError> {
        let mut said = false;
        let poll = Duration::from_millis(self.config.cdc.poll_interval_ms);
        let mut retry = Backoff::fixed(poll.min(lease::HEARTBEAT));
        loop {
            let consumer = self.consumer();
            let acquire = lease::acquire(client, &consumer, &self.holder);
            if self.bounded("lease", acquire).await? {
                return Ok(true);
            }
            if !said {
                tracing::info!(consumer = %self.consumer(), "cdc standby: another daemon applies changes for this cache");
                said = true;
            }
            if !retry.wait(stop).await {
                return Ok(false);
            }
        }
    }
}

/// What a session's loop works with.
struct Following<'a> {
    client: &'a Client,
    statements: &'a Statements,
    /// Notified by the connection driver on every `NOTIFY` of the channel.
    wake: &'a Notify,
    stop: &'a CancellationToken,
}

/// Aborts the connection driver when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
