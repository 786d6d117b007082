//! Wires the daemon together: pool, cache, service, the background tasks (CDC, health monitor,
//! watchdog, metrics, stats line) and the socket server; then drains and stops them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{metrics, monitor};
use crate::cdc::Applier;
use crate::config::Config;
use crate::model::registry::Tables;
use crate::rpc::server::{self, BoundSocket};
use crate::service::{schema, Hooks, Service};
use crate::store::pg::Db;
use crate::store::redis::Cache;
use crate::support::error::caught;
use crate::support::systemd::{self, Heartbeats};

/// How long shutdown waits for open connections to finish their in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the daemon on an already-bound socket until `shutdown` fires, then drains and returns.
/// `hooks`: the test pause points (empty in production).
pub async fn run(
    config: Arc<Config>,
    socket: BoundSocket,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> anyhow::Result<()> {
    config.require_backends()?;
    fit_open_files(&config);
    let db = Db::new(&config)?;
    let cache = Cache::new(&config)?;
    let tables = Tables::new(
        config
            .tables
            .iter()
            .map(|(name, t)| (name.clone(), t.lookups.is_empty()))
            .collect(),
    );
    let service = Arc::new(
        Service::new(db, cache, hooks, config.miss_loaders())
            .with_tables(tables, config.cache.max_entry_bytes),
    );
    let resp = crate::resp::server::bind(&config).await?;
    say_starting(&config, &socket, &resp);
    // Why the daemon stops on its own, if it does: a declared table it cannot serve, a task that
    // panicked.
    let unservable = schema::Unservable::default();
    let background = Background {
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
        failed: unservable.clone(),
    };
    let stop_background = CancellationToken::new();
    spawn_background(&background, &service, &config, &stop_background).await?;
    background.spawn(
        "schema",
        schema::watch(
            service.clone(),
            config.clone(),
            unservable.clone(),
            shutdown.clone(),
            stop_background.clone(),
        ),
    );
    // One bound on connections for both front ends.
    let permits = Arc::new(Semaphore::new(config.socket.max_connections));
    tokio::join!(
        server::serve(
            socket,
            service.clone(),
            config.clone(),
            permits.clone(),
            shutdown.clone(),
            DRAIN_TIMEOUT,
        ),
        crate::resp::server::serve(
            resp,
            service.clone(),
            config.clone(),
            permits,
            shutdown,
            DRAIN_TIMEOUT,
        ),
    );
    stop_background.cancel();
    background.tracker.close();
    background.tracker.wait().await;
    let pending = service.repairs_pending();
    if pending > 0 {
        tracing::warn!(
            pending,
            "stopping with cache repairs pending; those entries expire with their TTL"
        );
    }
    tracing::info!("stopped");
    let why = unservable.lock().expect("not poisoned").take();
    match why {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// `starting` with the effective configuration, and the warnings it deserves.
fn say_starting(config: &Config, socket: &BoundSocket, resp: &crate::resp::server::Listeners) {
    tracing::info!(
        socket = %socket.path().display(),
        resp = %resp.describe(),
        postgres = %config.postgres.url.as_ref().expect("checked by require_backends"),
        redis = %config.redis_servers(),
        key_prefix = %config.cache.key_prefix,
        ttl_secs = config.cache.ttl_secs,
        pool_size = config.postgres.pool_size,
        max_connections = config.socket.max_connections,
        config = %serde_json::to_string(config).expect("config serializes"),
        "starting"
    );
    if config.cache.ttl_secs > config.cdc.retention_secs {
        // A first start replays only what the outbox retains; older entries must have expired.
        tracing::warn!(
            ttl_secs = config.cache.ttl_secs,
            retention_secs = config.cdc.retention_secs,
            "cache.ttl_secs exceeds cdc.retention_secs: entries may outlive the change history that keeps them correct"
        );
    }
}

/// The tasks that run beside the socket. One that panics (a bug) is said at error and stops the
/// daemon, which exits with an error naming it: run on without it, the daemon would keep serving
/// with no monitor judging Redis, no schema check or no watchdog, and say nothing. (The CDC worker
/// starts a session that panicked over itself: see `cdc::Applier::run`.)
struct Background {
    tracker: TaskTracker,
    /// Stops the daemon.
    shutdown: CancellationToken,
    /// Why it stopped on its own.
    failed: schema::Unservable,
}

impl Background {
    fn spawn(&self, task: &'static str, future: impl Future<Output = ()> + Send + 'static) {
        let shutdown = self.shutdown.clone();
        let failed = self.failed.clone();
        self.tracker.spawn(async move {
            if let Err(message) = caught(future).await {
                tracing::error!(task, %message, "background task panicked; stopping");
                failed
                    .lock()
                    .expect("not poisoned")
                    .get_or_insert_with(|| format!("the {task} task panicked: {message}"));
                shutdown.cancel();
            }
        });
    }
}

/// Starts the tasks that run beside the socket until `stop`: metrics, the CDC worker, the health
/// monitor, the systemd watchdog and the stats line.
async fn spawn_background(
    background: &Background,
    service: &Arc<Service>,
    config: &Arc<Config>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on metrics.listen {addr}: {e}"))?;
        tracing::info!(%addr, "metrics listening");
        background.spawn(
            "metrics",
            metrics::serve(listener, service.clone(), stop.clone()),
        );
    }
    if config.cdc.enabled {
        let applier = Applier::new(
            config.clone(),
            service.cache().clone(),
            service.cdc.clone(),
            service.tables.clone(),
        );
        background.spawn("cdc", applier.run(stop.clone()));
    }
    if let Some(watch) = service.cache().watch_sentinels(stop.clone()) {
        background.spawn("sentinel watch", watch);
    }
    background.spawn(
        "consistency checker",
        crate::service::consistency::run(service.clone(), config.consistency.clone(), stop.clone()),
    );
    let beats = Arc::new(Heartbeats::default());
    background.spawn(
        "monitor",
        monitor::run(service.clone(), beats.clone(), stop.clone()),
    );
    if let Some(period) = systemd::watchdog_period() {
        tracing::info!(
            period_ms = period.as_millis() as u64,
            "systemd watchdog enabled"
        );
        background.spawn("watchdog", systemd::watchdog(period, beats, stop.clone()));
    }
    if config.log.stats_interval_secs > 0 {
        background.spawn(
            "stats",
            stats_line(
                service.clone(),
                Duration::from_secs(config.log.stats_interval_secs),
                stop.clone(),
            ),
        );
    }
    Ok(())
}

/// File descriptors the daemon needs besides its clients: the pool, the CDC and monitor
/// connections, Redis, the listener, logs, and some slack.
const FDS_BESIDES_CLIENTS: u64 = 64;

/// Raises the soft limit on open files to the hard limit (systemd and most shells start services
/// at 1024), and warns when `socket.max_connections` still does not fit: past the limit accept
/// fails with EMFILE (backed off and said at most every 10 s).
fn fit_open_files(config: &Config) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    let needed = config.socket.max_connections as u64
        + config.postgres.pool_size as u64
        + FDS_BESIDES_CLIENTS;
    if limit.rlim_cur < needed {
        tracing::warn!(
            max_connections = config.socket.max_connections,
            open_files_limit = limit.rlim_cur,
            needed,
            "socket.max_connections does not fit the open-file limit"
        );
    }
}

/// One `stats` event per interval.
async fn stats_line(service: Arc<Service>, every: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let s = service.stats_report(true);
        tracing::info!(
            connections = s.connections,
            requests = s.requests,
            errors = s.errors,
            cache_hits = s.cache_hits,
            cache_misses = s.cache_misses,
            db_queries = s.db_queries,
            stale_writes_refused = s.stale_writes_refused,
            fenced_writes_refused = s.fenced_writes_refused,
            foreign_values_skipped = s.foreign_values_skipped,
            repairs_pending = s.repairs_pending,
            near_hits = s.near_cache.hits,
            near_entries = s.near_cache.entries,
            near_bytes = s.near_cache.bytes,
            near_invalidations = s.near_cache.invalidations,
            near_flushes = s.near_cache.flushes,
            near_table_flushes = s.near_cache.table_flushes,
            consistency_checked = s.consistency.checked,
            consistency_mismatched = s.consistency.mismatched,
            consistency_oldest_mismatch_ms = s.consistency.oldest_mismatch_ms,
            cdc_applied = s.cdc.applied,
            cdc_batches = s.cdc.batches,
            cdc_reconnects = s.cdc.reconnects,
            cdc_resyncs = s.cdc.resyncs,
            cdc_lag_p50_ms = s.cdc.lag_ms.p50,
            cdc_lag_p99_ms = s.cdc.lag_ms.p99,
            cdc_lag_max_ms = s.cdc.lag_ms.max,
            "stats"
        );
        systemd::status(&format!(
            "{} connections, {} requests ({} errors), {} hits, {} misses, cdc lag p99 {} ms",
            s.connections, s.requests, s.errors, s.cache_hits, s.cache_misses, s.cdc.lag_ms.p99
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_background_task_that_panics_stops_the_daemon_and_says_which() {
        let background = Background {
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            failed: Default::default(),
        };
        background.spawn("fine", async {});
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !background.shutdown.is_cancelled(),
            "a task that ends is no failure"
        );
        background.spawn("doomed", async { panic!("at the seam") });
        tokio::time::timeout(Duration::from_secs(5), background.shutdown.cancelled())
            .await
            .expect("the daemon is stopped");
        assert_eq!(
            background.failed.lock().unwrap().as_deref(),
            Some("the doomed task panicked: at the seam")
        );
    }
}
