//! The live consistency checker: samples cached entries (Redis's, by a rolling SCAN, and the near
//! cache's) at `consistency.sample_per_sec`, compares each with its row, and reports in `stats`,
//! metrics and the stats line how many it checked and how many differed beyond the convergence
//! window, with a warn event for each such mismatch.
//!
//! **A change still in flight is never a mismatch.** An entry that differs from its row is only a
//! suspect: it is looked at again (entry and row) once `consistency.window_ms` has passed, and is a
//! mismatch only if it still differs and either
//! - it is older than the row as it was at the first look (a change committed a whole window ago
//!   has not reached it), or
//! - neither the entry nor the row changed over the whole window (a difference no change in
//!   flight explains: a value written around the daemon, a lost write).
//!
//! Otherwise (either moved meanwhile: a hot row) it is looked at again one window later, a few
//! times. A mismatch stays outstanding, looked at every window, until the entry matches its row or
//! is gone; `oldest_mismatch_ms` is the age of the oldest outstanding one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Backend, Service};
use crate::config::ConsistencyConfig;
use crate::model::entry::{live_version, same_json, Live};
use crate::model::key::Key;
use crate::store::redis::Stored;

/// Looks at a suspect this many times before letting it go as a row that keeps changing.
const MAX_LOOKS: u32 = 5;
/// Suspects and outstanding mismatches held at most (each is a name and two JSON texts).
const MAX_HELD: usize = 1000;

/// `consistency` in `stats`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ConsistencyReport {
    pub checked: u64,
    pub mismatched: u64,
    pub oldest_mismatch_ms: u64,
}

/// The checker's counters, read by `stats`.
#[derive(Debug, Default)]
pub struct ConsistencyStats {
    checked: AtomicU64,
    mismatched: AtomicU64,
    /// When the oldest outstanding mismatch was first seen.
    oldest: Mutex<Option<Instant>>,
}

impl ConsistencyStats {
    pub fn report(&self) -> ConsistencyReport {
        let oldest = *self.oldest.lock().expect("never poisoned");
        ConsistencyReport {
            checked: self.checked.load(Relaxed),
            mismatched: self.mismatched.load(Relaxed),
            oldest_mismatch_ms: oldest.map_or(0, |at| at.elapsed().as_millis() as u64),
        }
    }
}

/// Where a sampled entry lives: what a hit would be answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Redis,
    Near,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::Near => "near",
        }
    }
}

/// One look at an entry and its row.
#[derive(Debug, Clone, PartialEq)]
struct Look {
    cached: Live,
    /// The row's version and JSON; `None`: no such row.
    row: Option<(i64, String)>,
}

impl Look {
    fn differs(&self) -> bool {
        !self
            .row
            .as_ref()
            .is_some_and(|(_, json)| same_json(json, &self.cached.json))
    }
}

/// An entry that differed at its first look.
struct Suspect {
    name: Key,
    source: Source,
    first: Look,
    at: Instant,
    looks: u32,
}

/// Runs until `stop`: every second, takes `sample_per_sec` entries, looks again at the suspects
/// whose window has passed, and at the outstanding mismatches.
pub async fn run(service: Arc<Service>, config: ConsistencyConfig, stop: CancellationToken) {
    if config.sample_per_sec == 0 {
        return;
    }
    let window = Duration::from_millis(config.window_ms);
    let cache = service.cache.clone();
    // Every table's entries in turn: users', then each declared table's.
    let tables = cache.tables();
    let mut walking = 0;
    let mut scan = cache.scan_table(tables[walking]);
    let mut names: VecDeque<Key> = VecDeque::new();
    let mut suspects: VecDeque<Suspect> = VecDeque::new();
    // Outstanding mismatches: (name, source) → when first seen.
    let mut outstanding: HashMap<(Key, Source), Instant> = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !(service.health.is_up(Backend::Redis) && service.health.is_up(Backend::Postgres)) {
            continue;
        }
        let n = config.sample_per_sec as usize;
        // Half from the near cache (when it holds anything), the rest from Redis.
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut sample: Vec<(Key, Source)> = cache
            .near_sample(n / 2, seed)
            .into_iter()
            .map(|name| (name, Source::Near))
            .collect();
        // A walk that ends moves on to the next table's; once every table's ended in this tick
        // (few entries), the sample is what it is.
        let mut ended = 0;
        while sample.len() < n {
            if let Some(name) = names.pop_front() {
                sample.push((name, Source::Redis));
                continue;
            }
            match scan.next_page().await {
                Ok(Some(page)) => names.extend(page),
                Ok(None) => {
                    walking = (walking + 1) % tables.len();
                    scan = cache.scan_table(tables[walking]);
                    ended += 1;
                    if ended >= tables.len() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let due: Vec<Suspect> = std::iter::from_fn(|| {
            match suspects
                .front()
                .is_some_and(|s| s.at + window <= Instant::now())
            {
                true => suspects.pop_front(),
                false => None,
            }
        })
        .collect();
        let again: Vec<(Key, Source)> = outstanding.keys().cloned().collect();
        let mut asked: Vec<(Key, Source)> = sample;
        asked.extend(due.iter().map(|s| (s.name.clone(), s.source)));
        asked.extend(again.iter().cloned());
        let Some(looks) = look(&service, &asked).await else {
            continue;
        };
        let (first, rest) = looks.split_at(asked.len() - due.len() - again.len());
        let (later, repeated) = rest.split_at(due.len());
        // First looks: count, and keep what differs as a suspect.
        for ((name, source), look) in asked.iter().zip(first) {
            let Some(look) = look else { continue };
            service.consistency.checked.fetch_add(1, Relaxed);
            if look.differs()
                && suspects.len() < MAX_HELD
                && !outstanding.contains_key(&(name.clone(), *source))
            {
                suspects.push_back(Suspect {
                    name: name.clone(),
                    source: *source,
                    first: look.clone(),
                    at: Instant::now(),
                    looks: 1,
                });
            }
        }
        // Suspects whose window passed: a mismatch, settled, or looked at again.
        for (suspect, now) in due.into_iter().zip(later) {
            let Some(now) = now.clone().filter(Look::differs) else {
                continue;
            };
            let older_than_the_row = suspect
                .first
                .row
                .as_ref()
                .is_some_and(|(version, _)| now.cached.version < *version);
            if older_than_the_row || now == suspect.first {
                service.consistency.mismatched.fetch_add(1, Relaxed);
                let repaired = repair(&service, &suspect.name, suspect.source, &now).await;
                let table = service.tables.name(suspect.name.table());
                tracing::warn!(
                    table,
                    username = %suspect.name.as_str().escape_debug(),
                    source = suspect.source.name(),
                    cached_version = now.cached.version,
                    row_version = now.row.as_ref().map(|(v, _)| *v),
                    window_ms = config.window_ms,
                    repaired,
                    "cache entry differs from its row beyond the convergence window"
                );
                if outstanding.len() < MAX_HELD {
                    outstanding.insert((suspect.name, suspect.source), suspect.at);
                }
            } else if suspect.looks < MAX_LOOKS {
                suspects.push_back(Suspect {
                    first: now,
                    at: Instant::now(),
                    looks: suspect.looks + 1,
                    ..suspect
                });
            }
        }
        // Outstanding mismatches: gone once the entry matches its row (or is gone).
        for (key, now) in again.into_iter().zip(repeated) {
            if now.as_ref().is_none_or(|now| !now.differs()) {
                outstanding.remove(&key);
            }
        }
        *service.consistency.oldest.lock().expect("never poisoned") =
            outstanding.values().min().copied();
    }
}

/// Drops an entry found wrong beyond the window, so that it is read from the database and filled
/// anew: in Redis, replaced by a tombstone one below its row's version (or, with no row, at a
/// fresh horizon), unless a write changed it since; in the near cache, dropped. Whatever version
/// the wrong entry claims (one no row has, written around the daemon, included). Returns whether
/// it was dropped.
async fn repair(service: &Service, key: &Key, source: Source, now: &Look) -> bool {
    match source {
        Source::Near => {
            service.cache.forget_near(key);
            true
        }
        Source::Redis => {
            let version = match &now.row {
                Some((version, _)) => crate::model::entry::version_below(*version),
                None => match service.db.fresh_horizon().await {
                    Ok(horizon) => horizon,
                    Err(_) => return false,
                },
            };
            let replaced = service
                .cache
                .replace_wrong(key, &now.cached.json, version)
                .await;
            replaced.unwrap_or(false)
        }
    }
}

/// Looks at the entries of `asked` and their rows, in one Redis read and one query; `None` per
/// entry that is not a live one (or a row that cannot be served), `None` in all if a backend failed.
async fn look(service: &Service, asked: &[(Key, Source)]) -> Option<Vec<Option<Look>>> {
    if asked.is_empty() {
        return Some(Vec::new());
    }
    let in_redis: Vec<Key> = asked
        .iter()
        .filter(|(_, source)| *source == Source::Redis)
        .map(|(name, _)| name.clone())
        .collect();
    let mut stored = service.cache.get_raw(&in_redis).await.ok()?.into_iter();
    let cached: Vec<Option<Live>> = asked
        .iter()
        .map(|(name, source)| match source {
            Source::Near => service.cache.near_peek(name),
            Source::Redis => match stored.next() {
                Some(Stored::String(value)) => live_version(&value).map(|version| Live {
                    json: value,
                    version,
                }),
                _ => None,
            },
        })
        .collect();
    // Entries in doubt (a failed write awaits repair) are not the checker's to judge.
    let live: Vec<&Key> = asked
        .iter()
        .zip(&cached)
        .filter(|(_, c)| c.is_some())
        .map(|((name, _), _)| name)
        .collect();
    if live.is_empty() {
        return Some(vec![None; asked.len()]);
    }
    let (users, declared): (Vec<&Key>, Vec<&Key>) = live.into_iter().partition(|k| k.is_user());
    let wanted: Vec<&str> = users.iter().map(|k| k.as_str()).collect();
    let found = match wanted.is_empty() {
        true => Default::default(),
        false => service.db.find_users(&wanted).await.ok()?,
    };
    let mut rows: HashMap<Key, (i64, String)> = found
        .users
        .iter()
        .map(|u| (u.key(), (u.version, u.json.clone())))
        .collect();
    // A declared table's row, read as a miss reads it (its entry, compared whole).
    if !declared.is_empty() {
        let (answers, _) = service.read_rows(&declared).await;
        for (key, answer) in declared.iter().zip(answers) {
            if let Some((entry, _)) = answer.ok()? {
                let version = live_version(&entry).unwrap_or_default();
                rows.insert((*key).clone(), (version, entry));
            }
        }
    }
    let broken: Vec<&str> = found
        .broken
        .iter()
        .filter_map(|e| e.username.as_deref())
        .collect();
    Some(
        asked
            .iter()
            .zip(cached)
            .map(|((name, _), cached)| {
                let cached = cached?;
                if broken.contains(&name.as_str()) || !service.cache_trusted_for(name) {
                    return None;
                }
                let row = rows.get(name).cloned();
                Some(Look { cached, row })
            })
            .collect(),
    )
}
