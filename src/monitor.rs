//! The health monitor: checks both backends every [`MONITOR_INTERVAL`], keeps the cache fence in
//! place, latches readiness, and repairs the cache once both backends are up.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::hooks::monitor_wedge;
use crate::service::{Backend, Service};
use crate::store::cache::{Cache, CacheError};
use crate::store::connect;
use crate::systemd::{self, Heartbeats};

/// How often the monitor checks both backends (and drains the repair queue).
const MONITOR_INTERVAL: Duration = Duration::from_millis(250);
/// While a backend has never been reached, `backend unreachable` is logged every this many checks.
const UNREACHABLE_REPORT_EVERY: u32 = 40;
/// Checks both backends every [`MONITOR_INTERVAL`] (PostgreSQL on its own connection, so a busy
/// pool never looks like an outage), latches readiness, and repairs the cache once both are up.
pub async fn run(
    service: Arc<Service>,
    config: Arc<Config>,
    beats: Arc<Heartbeats>,
    stop: CancellationToken,
) {
    let wedge_at = monitor_wedge().map(|after| tokio::time::Instant::now() + after);
    let target = match connect::pg_target(&config) {
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
    let mut epochs = Epochs::default();
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
        let (fence, postgres) =
            tokio::join!(service.cache().fence(), ping_postgres(&target, &mut probe));
        if fence.is_ok() && !policy_checked {
            policy_checked = true;
            warn_if_evicting(service.cache()).await;
        }
        if let Ok(present) = &fence {
            epochs.check(&service, present.is_some()).await;
        }
        let redis = match fence {
            Ok(Some(_)) => {
                fence_broken = false;
                Ok(())
            }
            Ok(None) if postgres.is_ok() => {
                service.restore_fence().await;
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
            systemd::ready("ready: serving");
        }
        if health.is_up(Backend::Redis) && health.is_up(Backend::Postgres) {
            if let Err(e) = service.run_repairs().await {
                tracing::warn!(error = %e, "cache repair failed; will retry");
            }
            epochs.record_once_settled(&service).await;
        }
    }
}

/// Which Redis process the cached data was written under (see `Cache::epoch_key`): data from
/// another process (a restart from persisted data, a promoted replica, a restore) may lack the
/// newest writes, so the whole cache is distrusted and dropped before the epoch is recorded.
#[derive(Default)]
struct Epochs {
    /// The `run_id` to record once the cache holds nothing from before it.
    pending: Option<String>,
    /// Whether `INFO` was refused (said once: a replaced Redis then goes unnoticed).
    unknowable: bool,
}

impl Epochs {
    /// `fenced`: the fence is there (Redis kept data); without it Redis lost everything, which
    /// the fence already handles.
    async fn check(&mut self, service: &Service, fenced: bool) {
        let (run_id, recorded) = match service.cache().epoch().await {
            Ok(epoch) => epoch,
            Err(e) => return tracing::debug!(error = %e, "cannot read the redis epoch"),
        };
        let Some(run_id) = run_id else {
            if !self.unknowable {
                self.unknowable = true;
                tracing::warn!("redis refuses INFO: a restart from persisted data or a failover goes unnoticed; allow INFO (docs/operations.md)");
            }
            return;
        };
        if recorded.as_deref() == Some(run_id.as_str()) || self.pending.as_ref() == Some(&run_id) {
            return;
        }
        if fenced {
            tracing::warn!(
                run_id = %run_id,
                recorded = recorded.as_deref().unwrap_or(""),
                "redis holds data written under another redis process: dropping every cached entry, reads go to postgres until then"
            );
            service.repairs.distrust_all();
        }
        self.pending = Some(run_id);
    }

    /// Records the pending epoch once nothing from before it is trusted any more.
    async fn record_once_settled(&mut self, service: &Service) {
        let Some(run_id) = &self.pending else {
            return;
        };
        if service.repairs.any() {
            return;
        }
        match service.cache().record_epoch(run_id).await {
            Ok(()) => self.pending = None,
            Err(e) => tracing::debug!(error = %e, "cannot record the redis epoch yet"),
        }
    }
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

async fn ping_postgres(
    target: &connect::PgTarget,
    probe: &mut Option<tokio_postgres::Client>,
) -> Result<(), String> {
    let timeout = Duration::from_secs(1);
    if probe.as_ref().is_none_or(|c| c.is_closed()) {
        *probe = None;
        let client = tokio::time::timeout(timeout, target.connect())
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
