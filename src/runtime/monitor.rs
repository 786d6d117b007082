//! The health monitor: checks both backends every [`MONITOR_INTERVAL`], keeps the cache fence in
//! place, latches readiness, and repairs the cache once both backends are up.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::service::hooks::monitor_wedge;
use crate::service::{Backend, Service};
use crate::store::pg::connect;
use crate::store::redis::Primary;
use crate::store::redis::{Cache, CacheError, NodeState};
use crate::support::systemd::{self, Heartbeats};

/// How often the monitor checks both backends (and drains the repair queue).
const MONITOR_INTERVAL: Duration = Duration::from_millis(250);
/// Consecutive failed checks of a Cluster after which its connection is made anew (see
/// `topology::ClusterConn`).
const RENEW_AFTER: u32 = 4;
/// While a backend has never been reached, `backend unreachable` is logged every this many checks.
const UNREACHABLE_REPORT_EVERY: u32 = 40;
/// Checks both backends every [`MONITOR_INTERVAL`] (PostgreSQL on its own connection, so a busy
/// pool never looks like an outage), latches readiness, and repairs the cache once both are up.
pub async fn run(service: Arc<Service>, beats: Arc<Heartbeats>, stop: CancellationToken) {
    let wedge_at = monitor_wedge().map(|after| tokio::time::Instant::now() + after);
    let target = service.pg_target().clone();
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
        let (survey, postgres) =
            tokio::join!(survey(service.cache()), ping_postgres(&target, &mut probe));
        if let Ok(nodes) = &survey {
            if !policy_checked {
                policy_checked = true;
                if let Some((primary, _)) = nodes.first() {
                    warn_if_evicting(service.cache(), primary).await;
                }
            }
            epochs.check(&service, nodes).await;
        }
        let redis = match survey {
            Ok(nodes) => {
                let mut broken = None;
                for (primary, state) in nodes.iter().filter(|(_, state)| !state.elsewhere) {
                    match &state.fence {
                        Ok(Some(_)) => {}
                        Ok(None) if postgres.is_ok() => service.restore_fence(primary).await,
                        // Until PostgreSQL answers no fence can be drawn: writes are refused
                        // meanwhile.
                        Ok(None) => {}
                        // Redis answered: it is up, but a fence key holds something not ours.
                        Err(reason) => broken = Some((primary, reason)),
                    }
                }
                match broken {
                    Some((primary, reason)) if !fence_broken => {
                        let key = service.cache().fence_key_of(primary);
                        tracing::error!(key = %key.escape_debug(), error = %reason, "cache fence unusable: the cache is not filled until the key is removed");
                        fence_broken = true;
                    }
                    Some(_) => {}
                    None => fence_broken = false,
                }
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        let health = &service.health;
        let outcomes = [(Backend::Redis, redis), (Backend::Postgres, postgres)];
        for ((backend, outcome), failed) in outcomes.into_iter().zip(failures.iter_mut()) {
            match outcome {
                Ok(()) => {
                    *failed = 0;
                    // What Redis told the near cache while it was down may be lost.
                    if health.set(backend, true, "") && backend == Backend::Redis {
                        service.cache().flush_near();
                    }
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
        // A Cluster connection that keeps failing may be stalled in the driver's recovery.
        if failures[0] > 0 && failures[0] % RENEW_AFTER == 0 && service.cache().renew_connection() {
            tracing::info!(
                failed_checks = failures[0],
                "redis cluster connection renewed"
            );
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

/// Which primary (by node id) serves which slot ranges.
type Topology = Vec<(String, Vec<(u16, u16)>)>;

/// The slots served by another primary (or by none, or newly by one) in `now` than in `before`.
fn changed_hands(before: &Topology, now: &Topology) -> Vec<u16> {
    fn owners(topology: &Topology) -> Vec<Option<&str>> {
        let mut owner = vec![None; crate::store::redis::keys::SLOTS];
        for (id, ranges) in topology {
            for &(from, to) in ranges {
                for slot in from as usize..=(to as usize).min(owner.len() - 1) {
                    owner[slot] = Some(id.as_str());
                }
            }
        }
        owner
    }
    let (before, now) = (owners(before), owners(now));
    (0..before.len())
        .filter(|&slot| before[slot] != now[slot])
        .map(|slot| slot as u16)
        .collect()
}

/// What the monitor sees of Redis in one tick: on Sentinel, the primary the sentinels name (moving
/// there if it moved); then every primary, each looked at in one round trip. One primary that does
/// not answer makes Redis down: reads go to PostgreSQL until it answers or is replaced, so a
/// promoted replica's data is never read before [`Epochs::check`] has looked at it.
async fn survey(cache: &Cache) -> Result<Vec<(Primary, NodeState)>, CacheError> {
    if let Err(e) = cache.follow_sentinels().await {
        tracing::debug!(error = %e, "cannot ask the sentinels");
    }
    let primaries = cache.primaries().await?;
    let looks = primaries.iter().map(|primary| cache.look_at(primary));
    let states = futures::future::try_join_all(looks).await?;
    Ok(primaries.into_iter().zip(states).collect())
}

/// Which Redis process the cached data of each primary was written under (see
/// `Cache::epoch_key`), and which primary serves which slots: data from another process (a
/// restart from persisted data, a promoted replica, a restore) or a changed topology (a failover,
/// slots moved) may lack the newest writes, so the cache is distrusted and dropped before the new
/// epochs are recorded.
#[derive(Default)]
struct Epochs {
    /// The `run_id`s to record, per primary, once the cache holds nothing from before them.
    pending: Vec<(Primary, String)>,
    /// Whether `INFO` was refused (said once: a replaced Redis then goes unnoticed).
    unknowable: bool,
    /// Who served which slots at the last look (node ids and ranges).
    topology: Option<Topology>,
    /// The `run_id` each primary (by node id; `""` for the one server) answered with at the last
    /// look.
    seen: std::collections::HashMap<String, String>,
}

impl Epochs {
    async fn check(&mut self, service: &Service, nodes: &[(Primary, NodeState)]) {
        let topology: Topology = nodes
            .iter()
            .map(|(p, _)| (p.id.clone(), p.ranges.clone()))
            .collect();
        if let Some(seen) = self.topology.as_ref().filter(|seen| **seen != topology) {
            let changed = changed_hands(seen, &topology);
            tracing::warn!(
                primaries = topology.len(),
                slots = changed.len(),
                "redis cluster topology changed (a failover, or slots moved): dropping the cached entries of the slots that changed hands, reads of those go to postgres until then"
            );
            service.repairs.distrust_slots(changed);
            self.pending.clear();
        }
        self.topology = Some(topology);
        for (primary, state) in nodes.iter().filter(|(_, state)| !state.elsewhere) {
            let Some(run_id) = &state.run_id else {
                if !self.unknowable {
                    self.unknowable = true;
                    tracing::warn!("redis refuses INFO: a restart from persisted data or a failover goes unnoticed; allow INFO (docs/operations.md)");
                }
                continue;
            };
            let same_process = self
                .seen
                .insert(primary.id.clone(), run_id.clone())
                .as_ref()
                == Some(run_id);
            if state.recorded.as_ref() == Some(run_id)
                || self
                    .pending
                    .iter()
                    .any(|(p, id)| p == primary && id == run_id)
            {
                continue;
            }
            if same_process {
                // The process answered at the last look too: its anchor slot moved (the epoch
                // there is another primary's, or none), its data did not change hands.
                self.pending.retain(|(p, _)| p != primary);
                self.pending.push((primary.clone(), run_id.clone()));
                continue;
            }
            if matches!(state.fence, Ok(Some(_))) {
                tracing::warn!(
                    run_id = %run_id,
                    recorded = state.recorded.as_deref().unwrap_or(""),
                    node = %primary.address,
                    "redis holds data written under another redis process: dropping every cached entry, reads go to postgres until then"
                );
                service
                    .repairs
                    .distrust_slots(service.cache().slots_of(primary));
            }
            // Without a fence Redis lost everything there, which the fence already handles.
            self.pending.retain(|(p, _)| p != primary);
            self.pending.push((primary.clone(), run_id.clone()));
        }
    }

    /// Records the pending epochs once nothing from before them is trusted any more.
    async fn record_once_settled(&mut self, service: &Service) {
        if self.pending.is_empty() || service.repairs.any() {
            return;
        }
        let mut left = Vec::new();
        for (primary, run_id) in self.pending.drain(..) {
            if let Err(e) = service.cache().record_epoch(&primary, &run_id).await {
                tracing::debug!(error = %e, "cannot record the redis epoch yet");
                left.push((primary, run_id));
            }
        }
        self.pending = left;
    }
}

/// An `allkeys-*` eviction policy may evict a tombstone or a newer entry while a slow fill of an
/// older row is on its way, and the fence itself (it has no TTL, unlike every entry): say so.
async fn warn_if_evicting(cache: &Cache, primary: &Primary) {
    if let Some(policy) = cache.eviction_policy(primary).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slots_that_changed_hands_are_distrusted() {
        let before: Topology = vec![
            ("a".into(), vec![(0, 5460)]),
            ("b".into(), vec![(5461, 10922)]),
            ("c".into(), vec![(10923, 16383)]),
        ];
        // b's replica d was promoted; 100 slots moved from a to c.
        let now: Topology = vec![
            ("a".into(), vec![(100, 5460)]),
            ("d".into(), vec![(5461, 10922)]),
            ("c".into(), vec![(0, 99), (10923, 16383)]),
        ];
        let changed = changed_hands(&before, &now);
        assert_eq!(changed.len(), 100 + 5462);
        assert!(changed.contains(&0) && changed.contains(&99) && !changed.contains(&100));
        assert!(changed.contains(&5461) && changed.contains(&10922));
        assert!(!changed.contains(&10923));
        assert!(changed_hands(&now, &now).is_empty());
    }
}
