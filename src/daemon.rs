//! Wires the daemon together: pool, cache, service, the health monitor, the stats line and the
//! socket server, all stopped by one cancellation token.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{Cache, CacheError};
use crate::cdc::Applier;
use crate::config::Config;
use crate::db::{self, Db};
use crate::server::{self, BoundSocket};
use crate::service::{Backend, Hooks, Service};
use crate::supervisor::{self, Heartbeats};

/// How often the monitor checks both backends (and drains the repair queue).
const MONITOR_INTERVAL: Duration = Duration::from_millis(250);
/// While a backend has never been reached, `backend unreachable` is logged every this many checks.
const UNREACHABLE_REPORT_EVERY: u32 = 40;
/// How long shutdown waits for open connections to finish their in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the daemon on an already-bound socket until `shutdown` fires, then drains and returns.
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
    let service = Arc::new(Service::new(db, cache, hooks, config.miss_loaders()));
    tracing::info!(
        socket = %socket.path().display(),
        postgres = %config.postgres.url.as_ref().expect("checked by require_backends"),
        redis = %config.redis.url.as_ref().expect("checked by require_backends"),
        key_prefix = %config.cache.key_prefix,
        ttl_secs = config.cache.ttl_secs,
        pool_size = config.postgres.pool_size,
        max_connections = config.socket.max_connections,
        config = %serde_json::to_string(&*config).expect("config serializes"),
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
    let background = TaskTracker::new();
    let stop_background = CancellationToken::new();
    if let Some(addr) = config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on metrics.listen {addr}: {e}"))?;
        tracing::info!(%addr, "metrics listening");
        background.spawn(crate::metrics::serve(
            listener,
            service.clone(),
            stop_background.clone(),
        ));
    }
    if config.cdc.enabled {
        let applier = Applier::new(config.clone(), service.cache().clone(), service.cdc.clone());
        background.spawn(applier.run(stop_background.clone()));
    }
    let beats = Arc::new(Heartbeats::default());
    background.spawn(monitor(
        service.clone(),
        config.clone(),
        beats.clone(),
        stop_background.clone(),
    ));
    if let Some(period) = supervisor::watchdog_period() {
        tracing::info!(
            period_ms = period.as_millis() as u64,
            "systemd watchdog enabled"
        );
        background.spawn(supervisor::watchdog(period, beats, stop_background.clone()));
    }
    if config.log.stats_interval_secs > 0 {
        background.spawn(stats_line(
            service.clone(),
            Duration::from_secs(config.log.stats_interval_secs),
            stop_background.clone(),
        ));
    }
    background.spawn({
        let (service, shutdown, stop) =
            (service.clone(), shutdown.clone(), stop_background.clone());
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let open = service.stats.connections.load(Relaxed);
                    supervisor::stopping(&format!("stopping: draining {open} connections"));
                }
                _ = stop.cancelled() => {}
            }
        }
    });
    server::serve(socket, service.clone(), config, shutdown, DRAIN_TIMEOUT).await;
    stop_background.cancel();
    background.close();
    background.wait().await;
    let pending = service.repairs_pending();
    if pending > 0 {
        tracing::warn!(
            pending,
            "stopping with cache repairs pending; those entries expire with their TTL"
        );
    }
    tracing::info!("stopped");
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

/// Checks both backends every [`MONITOR_INTERVAL`] (PostgreSQL on its own connection, so a busy
/// pool never looks like an outage), latches readiness, and repairs the cache once both are up.
async fn monitor(
    service: Arc<Service>,
    config: Arc<Config>,
    beats: Arc<Heartbeats>,
    stop: CancellationToken,
) {
    let wedge_at = test_wedge();
    let pg_config = match db::pg_config(&config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "health monitor cannot start");
            return;
        }
    };
    let mut probe: Option<tokio_postgres::Client> = None;
    // Consecutive failed checks, to say so while a backend has never been reached.
    let mut failures = [0u32; 2];
    // Whether `cache fence unusable` was said (once).
    let mut fence_broken = false;
    // Whether Redis's eviction policy was looked at (once, at the first contact).
    let mut policy_checked = false;
    let mut ticker = tokio::time::interval(MONITOR_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if wedge_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            tracing::warn!("test wedge: the health monitor stops here");
            stop.cancelled().await;
            return;
        }
        beats.monitor.fetch_add(1, Relaxed);
        let (fence, postgres) = tokio::join!(
            service.cache().fence(),
            ping_postgres(&pg_config, &mut probe)
        );
        if fence.is_ok() && !policy_checked {
            policy_checked = true;
            warn_if_evicting(service.cache()).await;
        }
        let redis = match fence {
            Ok(Some(_)) => {
                fence_broken = false;
                Ok(())
            }
            Ok(None) if postgres.is_ok() => {
                set_fence(&service).await;
                Ok(())
            }
            // Until PostgreSQL answers no fence can be drawn: writes are refused meanwhile.
            Ok(None) => Ok(()),
            // Redis answered: it is up, but the fence key holds something that is not ours.
            Err(CacheError::Server(reason)) => {
                if !fence_broken {
                    tracing::error!(key = %service.cache().fence_key(), error = %reason, "cache fence unusable: the cache is not filled until the key is removed");
                    fence_broken = true;
                }
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        let health = &service.health;
        let outcomes = [
            (Backend::Redis, redis.map_err(|e| e.to_string())),
            (Backend::Postgres, postgres),
        ];
        for ((backend, outcome), failed) in outcomes.into_iter().zip(failures.iter_mut()) {
            match outcome {
                Ok(()) => {
                    *failed = 0;
                    health.set(backend, true, "");
                }
                Err(reason) => {
                    // A transition is logged by `set`; a backend never reached yet is reported on
                    // the first failure and then every UNREACHABLE_REPORT_EVERY checks.
                    if !health.ever_reached(backend) && *failed % UNREACHABLE_REPORT_EVERY == 0 {
                        tracing::warn!(backend = backend.name(), reason, "backend unreachable");
                    }
                    *failed += 1;
                    health.set(backend, false, &reason);
                }
            }
        }
        if health.both_seen() && health.set_ready() {
            tracing::info!("ready");
            supervisor::ready("ready: serving");
        }
        if health.is_up(Backend::Redis) && health.is_up(Backend::Postgres) {
            if let Err(e) = service.run_repairs().await {
                tracing::warn!(error = %e, "cache repair failed; will retry");
            }
        }
    }
}

/// Test builds only: `CACHEWARD_TEST_WEDGE_MONITOR_AFTER_MS` makes the health monitor hang after
/// that long, as a wedged loop would (the watchdog tests need one).
fn test_wedge() -> Option<tokio::time::Instant> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let ms: u64 = std::env::var("CACHEWARD_TEST_WEDGE_MONITOR_AFTER_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(tokio::time::Instant::now() + Duration::from_millis(ms))
}

/// An `allkeys-*` eviction policy may evict a tombstone or a newer entry while a slow fill of an
/// older row is on its way, and the fence itself (it has no TTL, unlike every entry): say so.
async fn warn_if_evicting(cache: &Cache) {
    if let Some(policy) = cache.eviction_policy().await {
        if policy.starts_with("allkeys") {
            tracing::warn!(
                policy = %policy,
                "redis may evict what keeps the cache exact: use noeviction or a volatile policy"
            );
        }
    }
}

/// Redis has no fence (a first start, a Redis restart, a FLUSHALL): sets one from a horizon drawn
/// now, after it was seen missing, so that every write that read its row before Redis lost its
/// data is refused (see `Cache::fence_key`). Until then every live write is refused.
async fn set_fence(service: &Service) {
    let horizon = match service.db().fresh_horizon().await {
        Ok(horizon) => horizon,
        Err(e) => return tracing::debug!(error = %e, "cannot draw a cache fence yet"),
    };
    match service.cache().establish_fence(horizon).await {
        Ok(fence) => tracing::info!(fence, "cache fence set"),
        Err(e) => tracing::debug!(error = %e, "cannot set the cache fence yet"),
    }
}

async fn ping_postgres(
    config: &tokio_postgres::Config,
    probe: &mut Option<tokio_postgres::Client>,
) -> Result<(), String> {
    let timeout = Duration::from_secs(1);
    if probe.as_ref().is_none_or(|c| c.is_closed()) {
        *probe = None;
        let client = tokio::time::timeout(timeout, db::connect(config))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        *probe = Some(client);
    }
    let client = probe.as_ref().expect("connected above");
    match tokio::time::timeout(timeout, client.simple_query("SELECT 1")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            *probe = None;
            Err(e.to_string())
        }
        Err(_) => {
            *probe = None;
            Err("ping timed out".into())
        }
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
            foreign_values_skipped = s.foreign_values_skipped,
            repairs_pending = s.repairs_pending,
            cdc_applied = s.cdc.applied,
            cdc_batches = s.cdc.batches,
            cdc_reconnects = s.cdc.reconnects,
            cdc_resyncs = s.cdc.resyncs,
            cdc_lag_p50_ms = s.cdc.lag_ms.p50,
            cdc_lag_p99_ms = s.cdc.lag_ms.p99,
            cdc_lag_max_ms = s.cdc.lag_ms.max,
            "stats"
        );
        supervisor::status(&format!(
            "{} connections, {} requests ({} errors), {} hits, {} misses, cdc lag p99 {} ms",
            s.connections, s.requests, s.errors, s.cache_hits, s.cache_misses, s.cdc.lag_ms.p99
        ));
    }
}
