//! The near cache: live entries held in the daemon's memory (`cache.local_max_bytes`), kept exact
//! by Redis's own invalidations (RESP3 `CLIENT TRACKING`, Guarantee 9 in docs/reference.md).
//!
//! **An entry is only ever kept from a read that Redis tracks for this daemon, and only if nothing
//! invalidated its name since the read was asked for.** Redis remembers which keys a tracking
//! connection read and pushes an `invalidate` message on that connection when any of them changes
//! (a write by anyone, an expiry, an eviction, a FLUSHALL). The messages travel apart from the
//! replies (a channel of their own inside the driver), so a change right after a read may be
//! *handled* before the read's reply is. Hence the [`Ticket`]: taken before the read is queued, it
//! records each name's shard invalidation count and the cache's generation; an entry is inserted
//! only if both are unchanged, under the shard's lock that invalidations also take. A read whose
//! reply is older than an invalidation already handled is therefore never kept, and one whose
//! invalidation is handled later is removed by it.
//!
//! **The whole cache is dropped whenever the invalidation channel is not known to be intact**
//! ([`NearCache::flush`], which also bumps the generation, so every read in flight is refused):
//! a connection lost or replaced (its tracking and its undelivered messages go with it: Redis
//! restarts, failovers, a Sentinel switch, a renewed Cluster connection), Redis coming back up, a
//! resync or drop of the cache, and Redis's own "invalidate everything". A drop of one table's
//! entries (its TRUNCATE, its shape changed) drops that table's only ([`NearCache::flush_table`]).
//!
//! The daemon's own writes invalidate their names before they are sent and again once they are
//! answered (see `Cache::apply`), so a request answered after a write never finds an older entry.
//!
//! Bounded in bytes, split in shards; each evicts by CLOCK (second chance): an entry read since
//! the hand last passed survives one more round, which keeps the hot names of a skewed read
//! pattern (the benchmark's Zipf part measures its hit ratio).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::model::entry::satisfies;
use crate::model::key::{Key, KeyParts, TableId};

/// What an entry costs beyond its name and JSON: the index slot, the ring slot, the allocations.
const ENTRY_OVERHEAD: usize = 96;
/// Shards at most; fewer for a small cache, so that one shard still holds a few entries.
const MAX_SHARDS: usize = 64;
const MIN_SHARD_BYTES: usize = 256 * 1024;

/// A cached user, as the read path answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NearHit {
    pub json: Arc<str>,
    pub version: i64,
}

/// What a read must show to have its answers kept: the generation and, per name, its shard's
/// invalidation count, as they were before the read was queued.
#[derive(Debug)]
pub struct Ticket {
    generation: u64,
    marks: Vec<u64>,
}

/// The near cache's figures for `stats` and metrics.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct NearReport {
    /// `cache.local_max_bytes` (0: off).
    pub max_bytes: u64,
    pub hits: u64,
    pub entries: u64,
    pub bytes: u64,
    pub invalidations: u64,
    pub flushes: u64,
    /// Times one table's entries were dropped, the others' kept.
    pub table_flushes: u64,
}

/// Told of every invalidation the near cache handles, after it handled it: what depends on the
/// same exactness (the Redis-protocol front end's client tracking) hears what it hears.
pub trait Watcher: Send + Sync {
    /// `name` changed, or is about to.
    fn invalidated(&self, name: &Key);
    /// Anything may have changed.
    fn flushed(&self);
    /// Any entry of `table` may have changed (its TRUNCATE, its shape changed); the other tables'
    /// did not.
    fn dropped(&self, table: TableId);
}

pub struct NearCache {
    shards: Box<[Mutex<Shard>]>,
    watcher: std::sync::OnceLock<Arc<dyn Watcher>>,
    hasher: std::collections::hash_map::RandomState,
    shard_bytes: usize,
    generation: AtomicU64,
    hits: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    table_flushes: AtomicU64,
}

#[derive(Default)]
struct Shard {
    /// The ring slot of each entry, found by the entry's hash (see [`NearCache::locate`]).
    index: hashbrown::HashTable<usize>,
    ring: Vec<Option<Entry>>,
    free: Vec<usize>,
    hand: usize,
    bytes: usize,
    /// Invalidations handled in this shard so far (see [`Ticket`]).
    marks: u64,
}

struct Entry {
    name: Key,
    /// Its name's hash, which picked its shard and finds it in the shard's index.
    hash: u64,
    json: Arc<str>,
    version: i64,
    /// Read since the hand last passed.
    visited: bool,
}

impl Entry {
    fn cost(&self) -> usize {
        cost(self.name.as_str(), &self.json)
    }
}

fn cost(name: &str, json: &str) -> usize {
    2 * name.len() + json.len() + ENTRY_OVERHEAD
}

impl NearCache {
    /// A near cache of at most `max_bytes`; `None` for 0 (off).
    pub fn new(max_bytes: u64) -> Option<NearCache> {
        if max_bytes == 0 {
            return None;
        }
        let max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let shards = (max_bytes / MIN_SHARD_BYTES).clamp(1, MAX_SHARDS);
        Some(NearCache {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            watcher: std::sync::OnceLock::new(),
            hasher: Default::default(),
            shard_bytes: max_bytes / shards,
            generation: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            table_flushes: AtomicU64::new(0),
        })
    }

    /// `name`'s hash and its shard, locked: the shard is picked from the hash's middle bits (the
    /// index uses its low bits for a bucket, its top 7 as a tag), computed once per lookup.
    fn locate(&self, name: &dyn KeyParts) -> (u64, MutexGuard<'_, Shard>) {
        let hash = self.hasher.hash_one(name);
        let at = ((hash >> 32) as usize) % self.shards.len();
        let shard = self.shards[at]
            .lock()
            .expect("near cache lock is never poisoned");
        (hash, shard)
    }

    /// The entry of `name`, if held and at least `min_version` new.
    pub fn get(&self, name: &Key, min_version: Option<i64>) -> Option<NearHit> {
        self.with(name, min_version, |json, version| NearHit {
            json: json.clone(),
            version,
        })
    }

    /// `answer` of the entry of `name` (its JSON and version), if held and at least `min_version`
    /// new: run under its shard's lock, so that nothing is copied or counted but what it makes.
    pub fn with<R>(
        &self,
        name: &dyn KeyParts,
        min_version: Option<i64>,
        answer: impl FnOnce(&Arc<str>, i64) -> R,
    ) -> Option<R> {
        let (hash, mut shard) = self.locate(name);
        let at = shard.find(hash, name)?;
        let entry = shard.ring[at].as_mut().expect("indexed slots are full");
        if !satisfies(entry.version, min_version) {
            return None;
        }
        entry.visited = true;
        let answered = answer(&entry.json, entry.version);
        drop(shard);
        self.hits.fetch_add(1, Relaxed);
        Some(answered)
    }

    /// The entry of `name` as held, without counting a hit or marking it read (the consistency
    /// checker's look).
    pub fn peek(&self, name: &Key) -> Option<NearHit> {
        let (hash, shard) = self.locate(name);
        let at = shard.find(hash, name)?;
        let entry = shard.ring[at].as_ref().expect("indexed slots are full");
        Some(NearHit {
            json: entry.json.clone(),
            version: entry.version,
        })
    }

    /// Up to `n` names held, picked spread over the shards from `seed` (the consistency checker's
    /// sample).
    pub fn sample(&self, n: usize, seed: u64) -> Vec<Key> {
        let mut names = Vec::with_capacity(n);
        let mut state = seed | 1;
        for _ in 0..n * 2 {
            if names.len() == n {
                break;
            }
            // xorshift64: cheap, and good enough to spread the picks.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let shard = &self.shards[(state as usize) % self.shards.len()];
            let shard = shard.lock().expect("near cache lock is never poisoned");
            if shard.ring.is_empty() {
                continue;
            }
            let at = (state >> 32) as usize % shard.ring.len();
            if let Some(entry) = &shard.ring[at] {
                names.push(entry.name.clone());
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// Taken before a read of `names` is queued; see [`NearCache::keep`].
    pub fn ticket(&self, names: &[&Key]) -> Ticket {
        let generation = self.generation.load(Relaxed);
        Ticket {
            generation,
            marks: names
                .iter()
                .map(|name| self.locate(*name).1.marks)
                .collect(),
        }
    }

    /// Keeps what a tracked read found for `names[at]` (the `at` of its ticket), unless the
    /// cache was flushed or the name's shard saw an invalidation since the ticket was taken.
    /// Returns whether it was kept.
    pub fn keep(&self, ticket: &Ticket, at: usize, name: &Key, json: &str, version: i64) -> bool {
        let size = cost(name.as_str(), json);
        if size > self.shard_bytes {
            return false;
        }
        let (hash, mut shard) = self.locate(name);
        // Read under the shard's lock: a flush bumps the generation before it empties the shards,
        // so an entry kept here with the old generation is emptied by it.
        if self.generation.load(Relaxed) != ticket.generation || shard.marks != ticket.marks[at] {
            return false;
        }
        shard.remove(hash, name);
        while shard.bytes + size > self.shard_bytes {
            shard.evict_one();
        }
        let entry = Entry {
            name: name.clone(),
            hash,
            json: json.into(),
            version,
            visited: false,
        };
        let at = match shard.free.pop() {
            Some(at) => at,
            None => {
                shard.ring.push(None);
                shard.ring.len() - 1
            }
        };
        shard.bytes += size;
        shard.ring[at] = Some(entry);
        let Shard { index, ring, .. } = &mut *shard;
        index.insert_unique(hash, at, |&at| ring[at].as_ref().map_or(0, |e| e.hash));
        true
    }

    /// Redis says `name` changed (or the daemon is about to change it): drops its entry and
    /// refuses every read of its shard asked for before now.
    pub fn invalidate(&self, name: &Key) {
        let (hash, mut shard) = self.locate(name);
        shard.marks += 1;
        shard.remove(hash, name);
        drop(shard);
        self.invalidations.fetch_add(1, Relaxed);
        if let Some(watcher) = self.watcher.get() {
            watcher.invalidated(name);
        }
    }

    /// [`NearCache::invalidate_older`] for what `write` leaves.
    pub fn invalidate_written(&self, write: &crate::model::entry::Write) {
        let tombstone = matches!(write, crate::model::entry::Write::Tombstone { .. });
        self.invalidate_older(write.key(), write.version(), tombstone);
    }

    /// [`NearCache::invalidate`], unless the entry held is at least as new as a write of
    /// `version` leaves it (newer than a tombstone of `version`, which removes that very
    /// version): such a write changes nothing the entry says. Without an entry, it invalidates
    /// (a read on its way may hold an older value).
    fn invalidate_older(&self, name: &Key, version: i64, tombstone: bool) {
        let (hash, shard) = self.locate(name);
        let held = shard
            .find(hash, name)
            .and_then(|at| shard.ring[at].as_ref());
        let current = held.is_some_and(|e| match tombstone {
            true => e.version > version,
            false => e.version >= version,
        });
        drop(shard);
        if !current {
            self.invalidate(name);
        }
    }

    /// Tells `watcher` of every invalidation and flush from now on; `false` if one is set already.
    pub fn watch(&self, watcher: Arc<dyn Watcher>) -> bool {
        self.watcher.set(watcher).is_ok()
    }

    /// Drops every entry and refuses every read asked for before now.
    pub fn flush(&self) {
        self.generation.fetch_add(1, Relaxed);
        for shard in self.shards.iter() {
            let mut shard = shard.lock().expect("near cache lock is never poisoned");
            *shard = Shard {
                marks: shard.marks + 1,
                ..Shard::default()
            };
        }
        self.flushes.fetch_add(1, Relaxed);
        if let Some(watcher) = self.watcher.get() {
            watcher.flushed();
        }
    }

    /// [`NearCache::flush`] of `table`'s entries only: users' and the other tables' stay (a
    /// TRUNCATE of one table must not send every reader of the others back to Redis, nor every
    /// tracking client of the front end back to the daemon). Every read asked for before now is
    /// refused all the same: telling them apart would cost more than the fills it saves.
    pub fn flush_table(&self, table: TableId) {
        self.generation.fetch_add(1, Relaxed);
        for shard in self.shards.iter() {
            let mut shard = shard.lock().expect("near cache lock is never poisoned");
            shard.marks += 1;
            let doomed: Vec<(usize, u64)> = (shard.ring.iter().enumerate())
                .filter_map(|(at, e)| Some((at, e.as_ref()?)))
                .filter(|(_, e)| e.name.table() == table)
                .map(|(at, e)| (at, e.hash))
                .collect();
            for (at, hash) in doomed {
                shard.unindex(hash, at);
                shard.take(at);
            }
        }
        self.table_flushes.fetch_add(1, Relaxed);
        if let Some(watcher) = self.watcher.get() {
            watcher.dropped(table);
        }
    }

    pub fn report(&self) -> NearReport {
        let (mut entries, mut bytes) = (0u64, 0u64);
        for shard in self.shards.iter() {
            let shard = shard.lock().expect("near cache lock is never poisoned");
            entries += shard.index.len() as u64;
            bytes += shard.bytes as u64;
        }
        NearReport {
            max_bytes: (self.shard_bytes * self.shards.len()) as u64,
            hits: self.hits.load(Relaxed),
            entries,
            bytes,
            invalidations: self.invalidations.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            table_flushes: self.table_flushes.load(Relaxed),
        }
    }
}

impl Shard {
    /// The ring slot of `name`, whose hash is `hash`.
    fn find(&self, hash: u64, name: &dyn KeyParts) -> Option<usize> {
        let ring = &self.ring;
        let named = |&at: &usize| {
            ring[at]
                .as_ref()
                .is_some_and(|e| e.hash == hash && (&e.name as &dyn KeyParts) == name)
        };
        self.index.find(hash, named).copied()
    }

    fn remove(&mut self, hash: u64, name: &dyn KeyParts) {
        if let Some(at) = self.find(hash, name) {
            self.unindex(hash, at);
            self.take(at);
        }
    }

    /// Drops ring slot `at` (of an entry whose hash is `hash`) from the index.
    fn unindex(&mut self, hash: u64, at: usize) {
        if let Ok(found) = self.index.find_entry(hash, |&i| i == at) {
            found.remove();
        }
    }

    fn take(&mut self, at: usize) {
        if let Some(entry) = self.ring[at].take() {
            self.bytes -= entry.cost();
            self.free.push(at);
        }
    }

    /// Moves the hand to the first entry not read since it last passed, giving the others their
    /// second chance, and evicts it.
    fn evict_one(&mut self) {
        debug_assert!(self.bytes > 0);
        loop {
            if self.hand >= self.ring.len() {
                self.hand = 0;
            }
            let at = self.hand;
            self.hand += 1;
            let visited = match &mut self.ring[at] {
                None => continue,
                Some(entry) => std::mem::replace(&mut entry.visited, false),
            };
            if !visited {
                if let Some(hash) = self.ring[at].as_ref().map(|e| e.hash) {
                    self.unindex(hash, at);
                }
                self.take(at);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> Key {
        Key::user(name)
    }

    fn user(version: i64) -> String {
        format!(r#"{{"id":1,"username":"a","version":{version}}}"#)
    }

    #[test]
    fn a_read_is_kept_only_if_nothing_invalidated_it_since_it_was_asked() {
        let near = NearCache::new(1 << 20).unwrap();
        let ticket = near.ticket(&[&k("a")]);
        assert!(near.keep(&ticket, 0, &k("a"), &user(1), 1));
        assert_eq!(near.get(&k("a"), None).unwrap().version, 1);

        // The change after the read was handled before its reply: the reply is never kept.
        let ticket = near.ticket(&[&k("a")]);
        near.invalidate(&k("a"));
        assert!(near.get(&k("a"), None).is_none(), "invalidated");
        assert!(!near.keep(&ticket, 0, &k("a"), &user(1), 1));
        assert!(near.get(&k("a"), None).is_none());

        // A flush refuses every read asked for before it.
        let ticket = near.ticket(&[&k("a"), &k("b")]);
        near.flush();
        assert!(!near.keep(&ticket, 1, &k("b"), &user(2), 2));
        let ticket = near.ticket(&[&k("b")]);
        assert!(near.keep(&ticket, 0, &k("b"), &user(2), 2));
        near.flush();
        assert!(near.get(&k("b"), None).is_none());
        let report = near.report();
        assert_eq!((report.entries, report.bytes, report.flushes), (0, 0, 2));
    }

    #[test]
    fn a_table_flush_drops_that_tables_entries_only_and_refuses_every_read_in_flight() {
        #[derive(Default)]
        struct Heard(Mutex<Vec<String>>);
        impl Watcher for Heard {
            fn invalidated(&self, name: &Key) {
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("key {}", name.as_str()));
            }
            fn flushed(&self) {
                self.0.lock().unwrap().push("all".into());
            }
            fn dropped(&self, table: TableId) {
                self.0.lock().unwrap().push(format!("table {}", table.0));
            }
        }
        let near = NearCache::new(1 << 20).unwrap();
        let heard = Arc::new(Heard::default());
        assert!(near.watch(heard.clone()));
        let (orders, accounts) = (TableId(1), TableId(2));
        let names: Vec<Key> = (0..200)
            .flat_map(|i| {
                let text = format!("k{i}");
                [k(&text), Key::new(orders, &text), Key::new(accounts, &text)]
            })
            .collect();
        for name in &names {
            let ticket = near.ticket(&[name]);
            assert!(near.keep(&ticket, 0, name, &user(1), 1));
        }
        let in_flight = near.ticket(&[&k("late")]);
        near.flush_table(orders);
        for name in &names {
            let held = near.get(name, None).is_some();
            assert_eq!(held, name.table() != orders, "{:?}", name.as_str());
        }
        // A read of any table asked for before it is not kept (it may have read a dropped row).
        assert!(!near.keep(&in_flight, 0, &k("late"), &user(1), 1));
        let report = near.report();
        assert_eq!(
            (report.entries, report.flushes, report.table_flushes),
            (400, 0, 1)
        );
        let kept = names.iter().filter(|n| n.table() != orders);
        let bytes: usize = kept.map(|n| cost(n.as_str(), &user(1))).sum();
        assert_eq!(report.bytes, bytes as u64);
        assert_eq!(*heard.0.lock().unwrap(), ["table 1"]);
        // Its slots are used again.
        for name in names.iter().filter(|n| n.table() == orders) {
            let ticket = near.ticket(&[name]);
            assert!(near.keep(&ticket, 0, name, &user(2), 2));
        }
        assert_eq!(near.report().entries, 600);
    }

    #[test]
    fn bytes_stay_within_the_bound_and_read_entries_get_a_second_chance() {
        let near = NearCache::new(64 * 1024).unwrap();
        let json = user(1);
        let per = cost("name-0000", &json);
        let fits = 64 * 1024 / per;
        for i in 0..fits {
            let name = format!("name-{i:04}");
            let ticket = near.ticket(&[&k(&name)]);
            assert!(near.keep(&ticket, 0, &k(&name), &json, 1));
        }
        assert_eq!(near.report().entries as usize, fits);
        // Read a few: they survive the next insertions; the unread oldest go first.
        for i in 0..4 {
            near.get(&k(&format!("name-{i:04}")), None).unwrap();
        }
        for i in fits..fits + 8 {
            let name = format!("name-{i:04}");
            let ticket = near.ticket(&[&k(&name)]);
            assert!(near.keep(&ticket, 0, &k(&name), &json, 1));
            assert!(near.report().bytes as usize <= 64 * 1024);
        }
        for i in 0..4 {
            assert!(
                near.get(&k(&format!("name-{i:04}")), None).is_some(),
                "read: kept"
            );
        }
        assert!(
            near.get(&k("name-0004"), None).is_none(),
            "unread: evicted first"
        );
        // An entry larger than a shard is never held.
        let huge = "x".repeat(70 * 1024);
        let ticket = near.ticket(&[&k("big")]);
        assert!(!near.keep(&ticket, 0, &k("big"), &huge, 1));
        assert!(NearCache::new(0).is_none());
    }
}
