//! The health monitor: checks both backends every [`MONITOR_INTERVAL`], keeps the cache fence in
//! place, latches readiness, and repairs the cache once both backends are up.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cdc::outbox::load_missed;
use crate::cdc::{consumer_of, CdcError};
use crate::service::hooks::monitor_wedge;
use crate::service::{Backend, Service};
use crate::store::pg::{connect, DbError};
use crate::store::redis::Watch;
use crate::support::systemd::{self, Heartbeats};
use crate::support::time::within;
use crate::support::time::{RateLimited, WARN_EVERY};

/// How often the monitor checks both backends (and drains the repair queue).
const MONITOR_INTERVAL: Duration = Duration::from_millis(250);
/// The least time between two looks when refusals call for one sooner than the tick (while Redis
/// has no fence, every write is refused; while a connection is not looked at, every read).
const ALARM_GAP: Duration = Duration::from_millis(20);
/// While Redis is down, the least time between two looks (rather than the tick): a Redis back
/// from a restart serves again within this, once looked at (a look, not a request, brings it up:
/// what a restarted process holds must be judged before it answers a read).
const DOWN_RETRY: Duration = Duration::from_millis(20);
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
    // What the monitor keeps between its looks at Redis.
    let mut watch = Watch::default();
    let mut repair_failures = RateLimited::new(WARN_EVERY);
    let mut held = Held::default();
    let mut ticker = tokio::time::interval(MONITOR_INTERVAL);
    let mut last = tokio::time::Instant::now();
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // While Redis is down, looked at more often: it serves again soon after it is back.
        let redis_down = !service.health.is_up(Backend::Redis);
        // Whether the tick came (the counts of failed checks go by ticks, whatever else wakes).
        let tick = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ticker.tick() => true,
            _ = tokio::time::sleep_until(last + DOWN_RETRY), if redis_down => false,
            // A write refused by a fence (if the fence is wrong, the sooner it is seen the better),
            // a read refused by a connection not looked at yet: at most every ALARM_GAP.
            _ = async {
                tokio::time::sleep_until(last + ALARM_GAP).await;
                service.cache().look_alarm().notified().await
            } => false,
        };
        last = tokio::time::Instant::now();
        if wedge_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            tracing::warn!("test wedge: the health monitor stops here");
            stop.cancelled().await;
            return;
        }
        beats.monitor.fetch_add(1, Relaxed);
        // On a Cluster, the slots the change stream passed over are held back before the look
        // (a primary the look finds back must not serve them first).
        if tick && service.cache().is_cluster() {
            held.refresh(&service, probe.as_ref()).await;
        }
        // PostgreSQL is pinged at the tick (or while down), not at every look Redis's outage
        // calls for.
        let ping = tick || !service.health.is_up(Backend::Postgres);
        let (look, postgres) = tokio::join!(service.cache().look(&mut watch), async {
            match ping {
                true => ping_postgres(&target, &mut probe).await,
                false => Ok(()),
            }
        });
        let redis = match look {
            Ok(mut look) => {
                if !look.distrust.is_empty() {
                    service
                        .repairs
                        .distrust_slots(std::mem::take(&mut look.distrust));
                }
                // Until PostgreSQL answers no fence can be drawn: writes are refused meanwhile.
                if look.unfenced && postgres.is_ok() {
                    service.restore_fences(&watch).await;
                }
                if (look.forged || look.suspect) && postgres.is_ok() {
                    service.replace_forged_fences(&mut watch, &look).await;
                }
                service.queue_missed();
                // Only now may the connections looked at for the first time answer reads: what
                // their processes hold is distrusted where it must be.
                service.cache().confirm_looked(&mut look);
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
                    // the first failure and then every UNREACHABLE_REPORT_EVERY ticks.
                    if tick || *failed == 0 {
                        if !health.ever_reached(backend) && *failed % UNREACHABLE_REPORT_EVERY == 0
                        {
                            tracing::warn!(backend = backend.name(), reason, "backend unreachable");
                        }
                        *failed += 1;
                    }
                    health.set(backend, false, &reason);
                }
            }
        }
        // A Cluster connection that keeps failing may be stalled in the driver's recovery.
        if tick
            && failures[0] > 0
            && failures[0] % RENEW_AFTER == 0
            && service.cache().renew_connection()
        {
            tracing::info!(
                failed_checks = failures[0],
                "redis cluster connection renewed"
            );
        }
        if health.is_up(Backend::Redis) && health.is_up(Backend::Postgres) {
            if let Err(e) = service.run_repairs().await {
                // At every look while it fails (a Cluster down for minutes): said every 10 s.
                repair_failures.say(|suppressed| {
                    tracing::warn!(error = %e, suppressed, "cache repair failed; will retry")
                });
            }
            if !service.repairs.any() {
                service.cache().record_epochs(&mut watch).await;
            }
        }
        // After the first look's drops (a Redis that came back without its fence, a topology
        // changed since the last run): ready serves from a cache already judged.
        if health.both_seen() && health.set_ready() {
            tracing::info!("ready");
            systemd::ready("ready: serving");
        }
    }
}

async fn ping_postgres(
    target: &connect::PgTarget,
    probe: &mut Option<tokio_postgres::Client>,
) -> Result<(), String> {
    let bound = Duration::from_secs(1);
    if probe.as_ref().is_none_or(|c| c.is_closed()) {
        *probe = None;
        let connect = within(bound, target.connect(), |b| DbError::timeout("connect", b));
        *probe = Some(connect.await.map_err(|e| e.to_string())?);
    }
    let client = probe.as_ref().expect("connected above");
    let ping = within(bound, client.simple_query("SELECT 1"), |b| {
        DbError::timeout("ping", b)
    });
    ping.await.map(drop).map_err(|e| {
        *probe = None;
        e.to_string()
    })
}

/// The slots this cache's change stream passed over (a primary did not answer its worker, which
/// may be another daemon's) and has not applied yet, as the worker stored them with its cursor
/// (`sql/0006_missed_slots.sql`): read at every tick and held back from Redis, so that a primary
/// this daemon reaches never serves what the stream could not write there.
#[derive(Default)]
struct Held {
    /// The stream's consumer (`cache:` + the cache's id in Redis), asked again every
    /// [`CONSUMER_EVERY`].
    consumer: Option<(String, tokio::time::Instant)>,
    failed: Option<RateLimited>,
}

/// How long the cache's id is taken as known (it changes only when Redis lost its data).
const CONSUMER_EVERY: Duration = Duration::from_secs(10);

impl Held {
    async fn refresh(&mut self, service: &Service, probe: Option<&tokio_postgres::Client>) {
        let Some(client) = probe.filter(|c| !c.is_closed()) else {
            return;
        };
        if self
            .consumer
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= CONSUMER_EVERY)
        {
            match service.cache().cache_id().await {
                Ok(id) => self.consumer = Some((consumer_of(&id), tokio::time::Instant::now())),
                Err(e) => {
                    return tracing::debug!(error = %e, "cache id not read: missed slots not checked")
                }
            }
        }
        let Some((consumer, _)) = &self.consumer else {
            return;
        };
        let bound = Duration::from_secs(1);
        let read = load_missed(client, consumer);
        match within(bound, read, |b| CdcError::from(DbError::timeout("missed slots", b))).await {
            Ok(missed) => service.cache().hold_slots(missed.slots),
            // Kept as they were: a slot is released only by the stream's own word.
            Err(e) => self
                .failed
                .get_or_insert_with(|| RateLimited::new(WARN_EVERY))
                .say(|suppressed| {
                    tracing::warn!(error = %e, suppressed, "missed slots not read; the ones held stay held")
                }),
        }
    }
}
