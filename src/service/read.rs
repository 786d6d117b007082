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
//! 2. that queue runs one pipeline at a time, in queue order ([`WorkQueue::serial`](crate::support::workqueue::WorkQueue::serial),
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
use crate::model::entry::Write;
use crate::model::key::{Key, KeyParts};
use crate::model::user::User;
use crate::store::pg::{DbError, Found};
use crate::store::redis::{CacheError, Outcome};

/// Cold names read per database query.
const LOAD_BATCH: usize = 256;

impl Service {
    /// Cache-aside read of the gets a client pipelined together: Redis, else PostgreSQL (one
    /// query however many ask at once, and the misses that arrive meanwhile share it), then fill.
    /// A get with a `min_version` (read-your-writes) takes a cached entry only if it is at least
    /// that new; otherwise the database answers it, in a read shared with the other misses on
    /// the name that begins after it arrived (never one that may have begun before the write it
    /// waits for). One answer per name, in order.
    /// Keys of declared tables are answered with their entry (`{"version","row"}`), users' with
    /// the user's JSON.
    pub async fn get_many(
        self: &Arc<Self>,
        keys: &[Key],
        min_versions: &[Option<i64>],
    ) -> Vec<Result<(String, Source), ServiceError>> {
        let asked_at = Instant::now();
        let min_version = |i: usize| min_versions.get(i).copied().flatten();
        let mut answers: Vec<Option<Result<(String, Source), ServiceError>>> =
            vec![None; keys.len()];
        let distrusts = self.repairs.distrusts();
        let trusted: Vec<usize> = (0..keys.len())
            .filter(|&i| self.cache_trusted_for(&keys[i]))
            .collect();
        if !trusted.is_empty() {
            let asked: Vec<Key> = trusted.iter().map(|&i| keys[i].clone()).collect();
            let wanted: Vec<Option<i64>> = trusted.iter().map(|&i| min_version(i)).collect();
            match self.cache.get_live_many(&asked, &wanted).await {
                // Trust was withdrawn while the read was on its way: PostgreSQL answers.
                Ok(_) if self.repairs.distrusts() != distrusts => {}
                Ok(values) => {
                    for (&i, value) in trusted.iter().zip(values) {
                        if let Some(live) = value {
                            answers[i] = Some(Ok((live.json, Source::Cache)));
                        }
                    }
                }
                Err(e) => self.cache_failed(&e, "get"),
            }
        }
        let misses: Vec<usize> = (0..keys.len()).filter(|&i| answers[i].is_none()).collect();
        let hits = keys.len() - misses.len();
        self.stats.cache_hits.fetch_add(hits as u64, Relaxed);
        if keys.iter().any(|k| !k.is_user()) {
            // Counted once per table and batch: one atomic add each, not one per key.
            let mut counts = vec![[0u64; 2]; self.stats.tables.len()];
            for (key, answer) in keys.iter().zip(&answers) {
                if let Some(at) = (key.table().0 as usize).checked_sub(1) {
                    counts[at][answer.is_none() as usize] += 1;
                }
            }
            for (counters, [hits, misses]) in self.stats.tables.iter().zip(counts) {
                if hits > 0 {
                    counters.cache_hits.fetch_add(hits, Relaxed);
                }
                if misses > 0 {
                    counters.cache_misses.fetch_add(misses, Relaxed);
                }
            }
        }
        if !misses.is_empty() {
            self.stats
                .cache_misses
                .fetch_add(misses.len() as u64, Relaxed);
            #[cfg(feature = "test-hooks")]
            self.hooks
                .pause_after_miss(&misses.iter().map(|&i| keys[i].as_str()).collect::<Vec<_>>())
                .await;
            // A get with a min_version joins only a flight whose database read has not begun
            // (and which the database answers): one that began may have read before the write
            // it waits for.
            let mut queued = false;
            let flights: Vec<_> = misses
                .iter()
                .map(|&i| {
                    let (flight, started) = match min_version(i) {
                        Some(_) => self.flights.join_fresh(&keys[i], asked_at),
                        None => self.flights.join(&keys[i], asked_at),
                    };
                    queued |= started;
                    flight
                })
                .collect();
            if queued {
                self.start_loader();
            }
            for (&i, flight) in misses.iter().zip(flights) {
                answers[i] = Some(
                    flight
                        .wait()
                        .await
                        .and_then(|found| found.ok_or_else(|| self.not_found(&keys[i]))),
                );
            }
        }
        answers
            .into_iter()
            .map(|a| a.expect("every name answered"))
            .collect()
    }

    /// Queues the fill of declared tables' rows (not awaited: see read-your-fill above).
    fn fill_rows(self: &Arc<Self>, mut writes: Vec<crate::model::entry::Write>) {
        writes.retain(|write| self.cache.may_fill(|| write.key().clone()));
        if writes.is_empty() || !self.health.is_up(Backend::Redis) {
            return;
        }
        let fill = self.cache.fill(writes);
        let service = self.clone();
        tokio::spawn(async move {
            match fill.await {
                Ok(outcomes) => service.stats.count_outcomes(&outcomes),
                Err(e) => service.cache_failed(&e, "fill"),
            }
        });
    }

    /// `answer` of the entry the near cache holds for `key` (borrowed: nothing is allocated to
    /// look it up), as a cache hit, when nothing else is needed: the near cache holds it and the
    /// cache is trusted for it. `None`: the read path must answer.
    pub fn get_near<R>(&self, key: &dyn KeyParts, answer: impl FnOnce(&str) -> R) -> Option<R> {
        if !self.cache_trusted_for(key) {
            return None;
        }
        let answered = self.cache.near_with(key, |json| answer(json))?;
        self.stats.cache_hits.fetch_add(1, Relaxed);
        if let Some(counters) = self.stats.table(key.table()) {
            counters.cache_hits.fetch_add(1, Relaxed);
        }
        Some(answered)
    }

    /// Whether Redis may answer for `key`: it is up, its primary too, and nothing left its entry
    /// in doubt (a failed write, a distrusted slot, a change passed over).
    pub fn cache_trusted_for(&self, key: &dyn KeyParts) -> bool {
        if !self.health.is_up(Backend::Redis) {
            return false;
        }
        self.repairs.trusted(key, || {
            self.cache.slot_of(&Key::new(key.table(), key.text()))
        }) && self.cache.reachable(key)
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
        let distrusts = self.repairs.distrusts();
        let late: Vec<usize> = (0..batch.len())
            .filter(|&i| batch.filled_since_asked(i) && self.cache_trusted_for(batch.key(i)))
            .collect();
        if !late.is_empty() && self.health.is_up(Backend::Redis) {
            let keys: Vec<Key> = late.iter().map(|&i| batch.key(i).clone()).collect();
            let read = self.cache.get_live_many(&keys, &[]).await.ok();
            if let Some(values) = read.filter(|_| self.repairs.distrusts() == distrusts) {
                for (&i, value) in late.iter().zip(values) {
                    if let Some(live) = value {
                        batch.finish(i, Ok(Some((live.json, Source::Cache))));
                    }
                }
            }
        }
        let (cold, rows): (Vec<usize>, Vec<usize>) = (0..batch.len())
            .filter(|&i| !batch.is_finished(i))
            .partition(|&i| batch.key(i).is_user());
        if !rows.is_empty() {
            let keys: Vec<&Key> = rows.iter().map(|&i| batch.key(i)).collect();
            let (answers, writes) = self.read_rows(&keys).await;
            #[cfg(feature = "test-hooks")]
            self.hooks
                .pause_before_fill(&writes.iter().map(|w| w.key().as_str()).collect::<Vec<_>>())
                .await;
            // Queued before the waiters are answered (read-your-fill, above).
            self.fill_rows(writes);
            for (&i, answer) in rows.iter().zip(answers) {
                batch.finish(i, answer);
            }
        }
        if cold.is_empty() {
            drop(slot);
            self.start_loader();
            return;
        }
        let names: Vec<&str> = cold.iter().map(|&i| batch.key(i).as_str()).collect();
        self.stats.db_queries.fetch_add(1, Relaxed);
        let users = self.db.find_users(&names).await;
        drop(slot);
        self.start_loader();
        let found = match db_result(users, &self.health) {
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
                &found
                    .users
                    .iter()
                    .map(|u| u.username.as_str())
                    .collect::<Vec<_>>(),
            )
            .await;
        let (answers, users, fill) = self.settle(&names, found);
        for (&i, answer) in cold.iter().zip(answers) {
            batch.finish(i, answer);
        }
        if let Some(fill) = fill {
            self.filled(&users, fill.await);
        }
    }

    /// What a database read found for `names`, in order (`None`: no such user), the users it
    /// found, and the fill that caches them, queued now: ahead of any read that follows the
    /// answers, so it need not be awaited before answering (a get after this one's answer sees it).
    #[allow(clippy::type_complexity)]
    fn settle(
        &self,
        names: &[&str],
        found: Found,
    ) -> (
        Vec<Result<Option<(String, Source)>, ServiceError>>,
        Vec<User>,
        Option<
            impl std::future::Future<Output = Result<Vec<Outcome>, CacheError>> + Send + 'static,
        >,
    ) {
        let Found {
            mut users,
            broken,
            read_at,
        } = found;
        let by_name: HashMap<&str, &str> = users
            .iter()
            .map(|user| (user.username.as_str(), user.json.as_str()))
            .collect();
        let answers = names
            .iter()
            .map(|&name| {
                if let Some(e) = broken.iter().find(|e| e.username.as_deref() == Some(name)) {
                    let e = DbError::from(e.clone());
                    return Err(ServiceError::Postgres(Arc::new(e)));
                }
                let json = by_name.get(name).map(|json| json.to_string());
                Ok(json.map(|json| (json, Source::Db)))
            })
            .collect();
        users.retain(|user| self.cache.may_fill(|| Key::user(&user.username)));
        let fill = (self.health.is_up(Backend::Redis) && !users.is_empty()).then(|| {
            self.cache.fill(
                users
                    .iter()
                    .map(|user| Write::live(user, read_at))
                    .collect(),
            )
        });
        (answers, users, fill)
    }

    /// Counts what a fill of `users` did.
    fn filled(&self, users: &[User], outcomes: Result<Vec<Outcome>, CacheError>) {
        match outcomes {
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
