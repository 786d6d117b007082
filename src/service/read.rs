//! The read path: cache-aside with single flight and miss batching.
//!
//! A `get` reads Redis for every name a client pipelined; the misses join one flight per name
//! ([`Flights`](super::flights::Flights)), and a few loader tasks take every queued flight at once, read their rows in one
//! query and fill Redis in one call.
//!
//! **A get sent after a miss's answer sees the fill** (read-your-fill). Three pieces make it, and
//! each names this rule where it is enforced:
//! 1. the fill is queued on the request-path Redis queue *before* the waiters are answered
//!    ([`Service::load_batch`]), so it needs no awaiting;
//! 2. that queue runs one pipeline at a time, in queue order ([`WorkQueue::serial`](crate::workqueue::WorkQueue::serial),
//!    used by `Cache`), so a read queued after the fill reaches Redis after it;
//! 3. a flight leaves the flight map before its waiters wake ([`Claimed::finish`]), so a get that
//!    arrives after an answer never joins the finished flight and reads Redis instead.
//!
//! The test: `a_get_after_a_miss_is_answered_reads_the_fill_while_redis_is_busy` (tests/consistency.rs).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use super::flights::Claimed;
use super::health::Backend;
use super::{db_result, Service, ServiceError, Source};
use crate::store::cache::{Outcome, Write};
use crate::store::db::{DbError, Found};

/// Cold names read per database query.
const LOAD_BATCH: usize = 256;

impl Service {
    /// Cache-aside read of the gets a client pipelined together: Redis, else PostgreSQL (one
    /// query however many ask at once, and the misses that arrive meanwhile share it), then fill.
    /// One answer per name, in order.
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
            #[cfg(feature = "test-hooks")]
            self.hooks
                .pause_after_miss(&misses.iter().map(|&i| usernames[i]).collect::<Vec<_>>())
                .await;
            let mut queued = false;
            let flights: Vec<_> = misses
                .iter()
                .map(|&i| {
                    let (flight, started) = self.flights.join(usernames[i], asked_at);
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
        self.repairs
            .trusted(username, || self.cache.slot_of(username))
    }

    /// Starts a loader task if a slot is free; otherwise a running loader takes the queue next.
    fn start_loader(self: &Arc<Self>) {
        if let Some(slot) = self.flights.claim() {
            let service = self.clone();
            tokio::spawn(async move {
                let batch = service.flights.gather(LOAD_BATCH).await;
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
    async fn load_batch(self: Arc<Self>, slot: OwnedSemaphorePermit, batch: Claimed) {
        // A flight on the name that completed after the caller's Redis read has filled Redis: a
        // caller arriving just too late to join it reads Redis again instead of the database.
        let late: Vec<usize> = (0..batch.len())
            .filter(|&i| batch.filled_since_asked(i) && self.cache_trusted_for(batch.username(i)))
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
        let Found {
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
        #[cfg(feature = "test-hooks")]
        self.hooks
            .pause_before_fill(
                &users
                    .iter()
                    .map(|u| u.username.as_str())
                    .collect::<Vec<_>>(),
            )
            .await;
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
                let e = DbError::Row(e.clone());
                batch.finish(i, Err(ServiceError::Postgres(Arc::new(e))));
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
                self.stats.count_outcomes(&outcomes);
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
}
