//! What keeps the cache honest when a write-through cannot reach Redis: the names whose entry is
//! in doubt, one state object that owns its counts, and the repair run that brings each entry back
//! in line with its row (or, past the capacity, drops the whole cache behind a fresh fence).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{db_result, Service, ServiceError};
use crate::model::entry::Write;
use crate::model::key::{Key, KeyParts, TableId};
use crate::store::redis::{Look, Watch};
use crate::support::time::{RateLimited, WARN_EVERY};

/// Names queued for repair before the queue gives up on names and clears the whole cache instead.
pub const REPAIR_CAPACITY: usize = 100_000;
/// Names repaired per database query and Redis call.
const REPAIR_BATCH: usize = 500;

/// Names whose Redis entry may be stale because a write-through could not reach Redis. Each name
/// carries the generation it was last queued at, so a repair that raced a newer failure keeps it.
#[derive(Default)]
struct RepairQueue {
    names: HashMap<Key, u64>,
    /// Bumped by every failed write, queued or not.
    generation: u64,
    /// Too many names to track: the whole cache is cleared once Redis is back.
    overflowed: bool,
    /// Slots whose entries cannot be trusted (their data came from another Redis process, or
    /// another node serves them now): dropped as a whole once Redis is back.
    slots: BTreeSet<u16>,
    /// Bumped whenever slots are distrusted.
    slot_generation: u64,
}

/// The repair state, one object that owns its counts: the queue, the overflow, and the read path's
/// lock-free "anything pending?" flag, all changed together under one lock, so `stats`, the read
/// path and the monitor never disagree.
pub struct Repairs {
    state: Mutex<RepairQueue>,
    /// True while the queue holds a name or has overflowed (written under the lock).
    pending: AtomicBool,
    /// Bumped (under the lock) whenever slots are distrusted or the queue overflows: a read that
    /// checked trust before and finds another count once Redis answered may have read what was
    /// distrusted meanwhile (see [`Repairs::distrusts`]).
    distrusts: AtomicU64,
    /// When `cache cleared: redis holds another process's data` was last said.
    cleared_said: Mutex<RateLimited>,
    /// Tables none of whose entries may be read (users' while their capture does not fire: see
    /// `service::schema`). Apart from the queue: nothing is repaired for them, and [`Repairs::any`]
    /// does not count them.
    tables: Mutex<BTreeSet<TableId>>,
    /// True while `tables` holds one (the read path's check, without a lock).
    any_table: AtomicBool,
}

impl Default for Repairs {
    fn default() -> Self {
        Repairs {
            state: Mutex::default(),
            pending: AtomicBool::default(),
            distrusts: AtomicU64::default(),
            cleared_said: Mutex::new(RateLimited::new(WARN_EVERY)),
            tables: Mutex::default(),
            any_table: AtomicBool::default(),
        }
    }
}

impl Repairs {
    fn lock(&self) -> std::sync::MutexGuard<'_, RepairQueue> {
        self.state.lock().expect("repair lock is never poisoned")
    }

    fn settle(&self, queue: &RepairQueue) {
        let pending = queue.overflowed || !queue.names.is_empty() || !queue.slots.is_empty();
        self.pending.store(pending, Relaxed);
    }

    /// Queues `names`, whose Redis write failed. Past [`REPAIR_CAPACITY`] names the queue gives up
    /// on names: the whole cache will be dropped instead.
    pub fn queue<'a>(&self, names: impl IntoIterator<Item = &'a Key>) {
        let mut queue = self.lock();
        queue.generation += 1;
        if !queue.overflowed {
            let generation = queue.generation;
            for name in names {
                if queue.names.len() >= REPAIR_CAPACITY {
                    tracing::error!(
                        capacity = REPAIR_CAPACITY,
                        "repair queue full: every cached user will be removed once redis is back"
                    );
                    queue.overflowed = true;
                    queue.names.clear();
                    self.distrusts.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                queue.names.insert(name.clone(), generation);
            }
        }
        self.settle(&queue);
    }

    /// Nothing cached in `slots` can be trusted (Redis's data there came from another process: a
    /// restart from persisted data, a promoted replica, a restore; or another node serves them
    /// now): the read path goes to PostgreSQL for their names, and the next repair run drops
    /// their entries behind a fresh fence (see [`Service::run_repairs`]).
    pub fn distrust_slots(&self, slots: impl IntoIterator<Item = u16>) {
        let mut queue = self.lock();
        queue.slot_generation += 1;
        queue.slots.extend(slots);
        self.distrusts.fetch_add(1, Ordering::SeqCst);
        self.settle(&queue);
    }

    /// Nothing cached of `table` is trusted until [`Repairs::trust_table`]: its reads go to
    /// PostgreSQL, and a read on its way now is not served from what it finds in Redis (see
    /// [`Repairs::distrusts`]).
    pub fn distrust_table(&self, table: TableId) {
        let mut tables = self.tables.lock().expect("never poisoned");
        tables.insert(table);
        self.any_table.store(true, Ordering::SeqCst);
        drop(tables);
        self.distrusts.fetch_add(1, Ordering::SeqCst);
    }

    /// `table`'s entries may be read again (what was cached while it was distrusted is gone).
    pub fn trust_table(&self, table: TableId) {
        let mut tables = self.tables.lock().expect("never poisoned");
        tables.remove(&table);
        self.any_table.store(!tables.is_empty(), Ordering::SeqCst);
    }

    /// Whether `table`'s entries may be read (see [`Repairs::distrust_table`]).
    fn table_trusted(&self, table: TableId) -> bool {
        !self.any_table.load(Ordering::SeqCst)
            || !self.tables.lock().expect("never poisoned").contains(&table)
    }

    /// How often trust was withdrawn so far. A read takes it before it checks trust and again
    /// once Redis answered: if it changed, the answer may come from data distrusted while the read
    /// was on its way (a read queued before the monitor's look reached a restarted Redis after
    /// it), and is not served.
    pub fn distrusts(&self) -> u64 {
        self.distrusts.load(Ordering::SeqCst)
    }

    /// The distrusted slots and their generation, to drop and then pass to
    /// [`Repairs::slots_dropped`].
    pub fn untrusted_slots(&self) -> Option<(u64, BTreeSet<u16>)> {
        let queue = self.lock();
        (!queue.slots.is_empty()).then(|| (queue.slot_generation, queue.slots.clone()))
    }

    /// The slots seen at `generation` were dropped: trusted again unless more were distrusted
    /// meanwhile (those are dropped next time, with these).
    pub fn slots_dropped(&self, generation: u64) {
        let mut queue = self.lock();
        if queue.slot_generation == generation {
            queue.slots.clear();
        }
        self.settle(&queue);
    }

    /// Whether anything waits (the read path's check, without a lock).
    pub fn any(&self) -> bool {
        self.pending.load(Relaxed)
    }

    /// Whether Redis may answer for `key`, whose Redis key is in slot `slot()`, as far as repairs
    /// go.
    pub fn trusted(&self, key: &dyn KeyParts, slot: impl FnOnce() -> u16) -> bool {
        if !self.table_trusted(key.table()) {
            return false;
        }
        if !self.any() {
            return true;
        }
        let queue = self.lock();
        !queue.overflowed
            && !queue.names.contains_key(key)
            && (queue.slots.is_empty() || !queue.slots.contains(&slot()))
    }

    /// Names waiting for repair, or the capacity after an overflow: what `stats` reports.
    pub fn count(&self) -> usize {
        let queue = self.lock();
        match queue.overflowed {
            true => REPAIR_CAPACITY,
            false => queue.names.len(),
        }
    }

    /// `Some(generation)` while overflowed: drop the cache, then [`Repairs::dropped`] with it.
    pub fn overflowed(&self) -> Option<u64> {
        let queue = self.lock();
        queue.overflowed.then_some(queue.generation)
    }

    /// The cache was dropped after an overflow seen at `generation`. The overflow is over unless a
    /// write failed meanwhile (its entry may have been written after the drop passed its key).
    pub fn dropped(&self, generation: u64) -> bool {
        let mut queue = self.lock();
        if queue.generation == generation {
            queue.overflowed = false;
        }
        self.settle(&queue);
        !queue.overflowed
    }

    /// Up to `max` queued names with their generations, of those that `may` repair now.
    pub fn batch(&self, max: usize, may: impl Fn(&Key) -> bool) -> Vec<(Key, u64)> {
        self.lock()
            .names
            .iter()
            .filter(|(n, _)| may(n))
            .take(max)
            .map(|(n, g)| (n.clone(), *g))
            .collect()
    }

    /// Forgets the names of `batch` that were not queued again since; returns how many.
    pub fn repaired(&self, batch: &[(Key, u64)]) -> usize {
        let mut queue = self.lock();
        let mut repaired = 0;
        for (name, generation) in batch {
            if queue.names.get(name) == Some(generation) {
                queue.names.remove(name);
                repaired += 1;
            }
        }
        self.settle(&queue);
        repaired
    }
}

impl Service {
    /// Names waiting for repair (or the capacity, after an overflow).
    pub fn repairs_pending(&self) -> usize {
        self.repairs.count()
    }

    /// The last look at Redis found fences missing (a first start, a Redis restart, a FLUSHALL):
    /// sets them from a horizon drawn now, after they were seen missing, so that every write that
    /// read its row before Redis lost its data is refused (see `Cache::fence_key`). Until then
    /// every live write there is refused. Called by the health monitor.
    pub async fn restore_fences(&self, watch: &Watch) {
        let horizon = match self.db.fresh_horizon().await {
            Ok(horizon) => horizon,
            Err(e) => return tracing::debug!(error = %e, "cannot draw a cache fence yet"),
        };
        let set = self.cache.restore_fences(watch, horizon).await;
        if set > 0 {
            tracing::info!(fence = horizon, slots = set, "cache fence set");
        }
    }

    /// A fence that cannot be right (not a number, or above anything the version sequence has
    /// drawn: someone else wrote it) keeps every change out of the cache; the entries there are
    /// suspect too. The last look's suspects are checked against a horizon drawn now; each forged
    /// fence is set to a fresh horizon and its primary's slots are distrusted (reads go to
    /// PostgreSQL, the entries are dropped behind a fence drawn after). Called by the monitor.
    pub async fn replace_forged_fences(&self, watch: &mut Watch, look: &Look) {
        let mut forged = look.forged;
        if look.suspect {
            match self.db.fresh_horizon().await {
                Ok(drawn) => forged |= self.cache.fences_above(watch, drawn),
                Err(e) => return tracing::debug!(error = %e, "cannot check the cache fence yet"),
            }
        }
        if !forged {
            return;
        }
        let horizon = match self.db.fresh_horizon().await {
            Ok(horizon) => horizon,
            Err(e) => return tracing::debug!(error = %e, "cannot replace the cache fence yet"),
        };
        let slots = self.cache.reset_forged(watch, horizon).await;
        if !slots.is_empty() {
            tracing::warn!(fence = horizon, slots = slots.len(), "cache fence replaced");
            self.repairs.distrust_slots(slots);
        }
    }

    /// Queues for repair the names whose change the change stream passed over (their Redis
    /// primary did not answer): until repaired they are read from PostgreSQL. Called by the
    /// monitor at every look.
    pub fn queue_missed(&self) {
        let missed = self.cache.missed();
        if !missed.is_empty() {
            self.repairs.queue(&missed);
            self.cache.handed_over(&missed);
        }
    }

    /// Brings every queued name's entry in line with its row (or clears the cache after an
    /// overflow). Returns how many names were repaired. Called by the health monitor while both
    /// backends are up.
    pub async fn run_repairs(&self) -> Result<usize, ServiceError> {
        if !self.repairs.any() {
            return Ok(0);
        }
        let reachable = |slot: u16| self.cache.slot_reachable(slot);
        let untrusted = self
            .repairs
            .untrusted_slots()
            // A primary down keeps them (and the trust) until it answers.
            .filter(|(_, slots)| slots.iter().all(|&s| reachable(s)));
        if let Some((generation, slots)) = untrusted {
            // Every entry there may be stale: a fence at a fresh horizon keeps out every write
            // that read before now, and every entry written before it is dropped.
            let fence = db_result(self.db.fresh_horizon().await, &self.health)?;
            let removed = self
                .cache
                .drop_slots(fence, &slots)
                .await
                .map_err(|e| ServiceError::Redis(Arc::new(e)))?;
            if removed == 0 {
                // A Redis that came back empty (a restart without persistence, a first start):
                // nothing was served that could be stale, nothing to say.
                tracing::debug!(slots = slots.len(), "distrusted slots held no entries");
            } else {
                // A topology that keeps changing (nodes that disagree on who serves what) would
                // say it at every look: said at most every 10 s, with how many drops went unsaid.
                let mut said = self.repairs.cleared_said.lock().expect("never poisoned");
                said.say(|suppressed| {
                    tracing::warn!(
                        removed,
                        slots = slots.len(),
                        suppressed,
                        "cache cleared: redis holds another process's data"
                    )
                });
            }
            self.repairs.slots_dropped(generation);
        }
        if let Some(generation) = self.repairs.overflowed() {
            // Every entry may be stale: a fence at a fresh horizon keeps out every write that read
            // before now, and every entry written before it is dropped.
            let fence = db_result(self.db.fresh_horizon().await, &self.health)?;
            let removed = self
                .cache
                .drop_all(fence)
                .await
                .map_err(|e| ServiceError::Redis(Arc::new(e)))?;
            tracing::warn!(removed, "cache cleared after repair queue overflow");
            if !self.repairs.dropped(generation) {
                // A write failed while the cache was being dropped: drop it again next time.
                return Ok(0);
            }
        }
        let mut repaired = 0;
        loop {
            // The names of a primary down wait until it answers.
            let batch = self
                .repairs
                .batch(REPAIR_BATCH, |key| reachable(self.cache.slot_of(key)));
            if batch.is_empty() {
                break;
            }
            let writes = self.repair_writes(&batch).await?;
            let outcomes = self.cache.apply(&writes).await.map_err(|e| {
                self.cache_failed(&e, "repair");
                ServiceError::Redis(Arc::new(e))
            })?;
            self.stats.count_outcomes(&outcomes);
            repaired += self.repairs.repaired(&batch);
        }
        if repaired > 0 {
            tracing::info!(repaired, "cache entries repaired");
        }
        Ok(repaired)
    }
}

impl Service {
    /// The writes that repair `batch`: each key's current row, or a tombstone at a horizon read
    /// after the rows (at least any version a missing row had). A row that cannot be served gets
    /// a tombstone, like a missing one: nothing stale stays cached for it.
    async fn repair_writes(&self, batch: &[(Key, u64)]) -> Result<Vec<Write>, ServiceError> {
        let (users, rows): (Vec<&Key>, Vec<&Key>) =
            batch.iter().map(|(key, _)| key).partition(|k| k.is_user());
        let mut writes = Vec::with_capacity(batch.len());
        let mut horizon = None;
        if !users.is_empty() {
            let names: Vec<&str> = users.iter().map(|k| k.as_str()).collect();
            let (found, after) = db_result(self.db.current_rows(&names).await, &self.health)?;
            writes.extend(found.users.iter().map(|u| Write::live(u, found.read_at)));
            horizon = Some(after);
        }
        if !rows.is_empty() {
            let (answers, found) = self.read_rows(&rows).await;
            if let Some(Err(e)) = answers.into_iter().find(|a| a.is_err()) {
                return Err(e);
            }
            writes.extend(found);
            let after = db_result(self.db.fresh_horizon().await, &self.health)?;
            horizon = Some(horizon.map_or(after, |h: i64| h.max(after)));
        }
        let horizon = horizon.unwrap_or_default();
        for (key, _) in batch {
            if !writes.iter().any(|w| w.key() == key) {
                writes.push(Write::tombstone(key.clone(), horizon));
            }
        }
        Ok(writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<const N: usize>(names: [&str; N]) -> Vec<Key> {
        names.map(Key::user).to_vec()
    }

    #[test]
    fn repairs_own_their_counts() {
        let repairs = Repairs::default();
        assert!(!repairs.any() && repairs.trusted(&Key::user("a"), || 0));
        repairs.queue(&keys(["a", "b"]));
        assert!(
            repairs.any()
                && !repairs.trusted(&Key::user("a"), || 0)
                && repairs.trusted(&Key::user("c"), || 0)
        );
        assert_eq!(repairs.count(), 2);
        let batch = repairs.batch(10, |_| true);
        // "a" fails again while the batch is repaired: it stays.
        repairs.queue(&keys(["a"]));
        assert_eq!(repairs.repaired(&batch), 1);
        assert_eq!(repairs.count(), 1);
        assert!(!repairs.trusted(&Key::user("a"), || 0) && repairs.trusted(&Key::user("b"), || 0));
    }

    #[test]
    fn an_overflow_is_counted_as_the_capacity_until_the_cache_is_dropped() {
        let repairs = Repairs::default();
        let names: Vec<Key> = (0..=REPAIR_CAPACITY)
            .map(|i| Key::user(&format!("u{i}")))
            .collect();
        repairs.queue(&names);
        // The count `stats` reports and the one the shutdown warning uses are one and the same.
        assert_eq!(repairs.count(), REPAIR_CAPACITY);
        assert!(!repairs.trusted(&Key::user("anyone"), || 0));
        let generation = repairs.overflowed().expect("overflowed");
        // A write fails while the cache is being dropped: the overflow stands.
        repairs.queue(&keys(["late"]));
        assert!(!repairs.dropped(generation));
        assert_eq!(repairs.count(), REPAIR_CAPACITY);
        let generation = repairs.overflowed().expect("still overflowed");
        assert!(repairs.dropped(generation));
        assert_eq!(repairs.count(), 0);
        assert!(!repairs.any() && repairs.trusted(&Key::user("anyone"), || 0));
    }

    #[test]
    fn a_distrusted_table_is_not_trusted_until_trusted_again_and_is_no_repair() {
        let repairs = Repairs::default();
        let before = repairs.distrusts();
        repairs.distrust_table(TableId::USERS);
        assert_ne!(
            repairs.distrusts(),
            before,
            "reads on their way are not served"
        );
        assert!(!repairs.trusted(&Key::user("a"), || 0));
        assert!(
            repairs.trusted(&Key::new(TableId(1), "1"), || 0),
            "another table"
        );
        assert!(!repairs.any() && repairs.count() == 0, "nothing to repair");
        repairs.trust_table(TableId::USERS);
        assert!(repairs.trusted(&Key::user("a"), || 0));
    }

    #[test]
    fn distrusted_slots_are_not_trusted_until_dropped() {
        let repairs = Repairs::default();
        repairs.queue(&keys(["a"]));
        repairs.distrust_slots([7, 9]);
        assert!(!repairs.trusted(&Key::user("b"), || 7), "a distrusted slot");
        assert!(repairs.trusted(&Key::user("b"), || 8), "another slot");
        assert_eq!(repairs.count(), 1, "only names count as pending repairs");
        let (generation, slots) = repairs.untrusted_slots().expect("slots to drop");
        assert_eq!(slots.into_iter().collect::<Vec<_>>(), [7, 9]);
        // More slots are distrusted while these are dropped: they all stay.
        repairs.distrust_slots([8]);
        repairs.slots_dropped(generation);
        assert!(!repairs.trusted(&Key::user("b"), || 7) && !repairs.trusted(&Key::user("b"), || 8));
        let (generation, _) = repairs.untrusted_slots().expect("still to drop");
        repairs.slots_dropped(generation);
        assert!(repairs.trusted(&Key::user("b"), || 7) && repairs.untrusted_slots().is_none());
        assert!(
            !repairs.trusted(&Key::user("a"), || 7),
            "the name is still queued"
        );
    }
}
