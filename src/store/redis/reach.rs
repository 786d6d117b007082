//! Partial outages on a Cluster: the primaries the last look found not answering, whose slots'
//! reads go to PostgreSQL while every other primary keeps serving from the cache; and the change
//! stream's writes that could not reach them, whose names are read from PostgreSQL until the
//! repairs have rewritten them from their rows (once their primary answers again).
//!
//! A missed name stays here until the health monitor has handed it to the repairs
//! ([`Cache::missed`], then [`Cache::handed_over`]), so that no moment passes where neither holds
//! it back: a primary that answers again never serves what the change stream could not write.
//! What the rest of the daemon sees of it are `Cache`'s methods in `partial`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

use super::keys::Primary;
use crate::model::entry::Write;
use crate::model::key::{Key, KeyParts};

/// Past this many missed names the change stream stops passing writes over (it waits for the
/// primary, as for any Redis outage): the repairs would give up on names past their capacity.
pub const MISSED_CAPACITY: usize = 50_000;

/// What does not reach Redis now: see the module's documentation.
#[derive(Default)]
pub struct Reach {
    /// True while a primary is unreachable or a name missed (written under the lock): the read
    /// path's check, without a lock.
    pub(super) any: AtomicBool,
    state: Mutex<ReachState>,
}

#[derive(Default)]
struct ReachState {
    /// The primaries that did not answer at the last look, by address, with their slots.
    down: BTreeMap<String, Vec<(u16, u16)>>,
    /// Their slots (only those where cacheward keeps keys).
    slots: BTreeSet<u16>,
    /// Names whose change the change stream could not write (their primary did not answer).
    missed: HashSet<Key>,
    /// Slots whose changes the change stream (this daemon's or another's) passed over and has
    /// not applied yet, as stored with its cursor: held back from Redis even where their primary
    /// answers this daemon.
    held: BTreeSet<u16>,
}

/// Which primaries stopped answering, and which answer again, since the look before.
#[derive(Debug, Default, PartialEq)]
pub struct Changed {
    pub down: Vec<String>,
    pub back: Vec<String>,
}

impl Reach {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReachState> {
        self.state.lock().expect("reach lock is never poisoned")
    }

    fn settle(&self, state: &ReachState) {
        let any = !state.slots.is_empty() || !state.missed.is_empty() || !state.held.is_empty();
        self.any.store(any, Relaxed);
    }

    /// Whether Redis may answer for `key` (in slot `slot()`): its primary answered at the last
    /// look and no change of it was passed over.
    pub fn reachable(&self, key: &dyn KeyParts, slot: impl FnOnce() -> u16) -> bool {
        if !self.any.load(Relaxed) {
            return true;
        }
        let state = self.lock();
        if state.missed.contains(key) {
            return false;
        }
        if state.slots.is_empty() && state.held.is_empty() {
            return true;
        }
        let slot = slot();
        !state.slots.contains(&slot) && !state.held.contains(&slot)
    }

    /// Whether `slot`'s primary answered at the last look and no change of it waits to be applied.
    pub fn slot_reachable(&self, slot: u16) -> bool {
        if !self.any.load(Relaxed) {
            return true;
        }
        let state = self.lock();
        !state.slots.contains(&slot) && !state.held.contains(&slot)
    }

    /// Whether holding `held` would release slots held now.
    pub fn releases(&self, held: &BTreeSet<u16>) -> bool {
        self.any.load(Relaxed) && self.lock().held.iter().any(|s| !held.contains(s))
    }

    /// The slots the change stream passed over and has not applied yet are `held` (all of them,
    /// as last stored).
    pub fn hold(&self, held: BTreeSet<u16>) {
        let mut state = self.lock();
        state.held = held;
        self.settle(&state);
    }

    /// The primaries that did not answer at the last look are `down` (their slots are those of
    /// `in_use`), of `primaries` (the addresses of all); returns which changed (one that is no
    /// primary any more is neither down nor back: a failover replaced it).
    pub fn set_down(
        &self,
        down: &[Primary],
        primaries: &[&str],
        in_use: impl Fn(u16) -> bool,
    ) -> Changed {
        let mut state = self.lock();
        let now: BTreeMap<String, Vec<(u16, u16)>> = down
            .iter()
            .map(|p| (p.address.clone(), p.ranges.clone()))
            .collect();
        let changed = Changed {
            down: now
                .keys()
                .filter(|a| !state.down.contains_key(*a))
                .cloned()
                .collect(),
            back: state
                .down
                .keys()
                .filter(|a| !now.contains_key(*a) && primaries.contains(&a.as_str()))
                .cloned()
                .collect(),
        };
        if changed != Changed::default() || now != state.down {
            state.slots = now
                .values()
                .flatten()
                .flat_map(|&(from, to)| from..=to)
                .filter(|&s| in_use(s))
                .collect();
            state.down = now;
        }
        self.settle(&state);
        changed
    }

    /// The primaries that did not answer at the last look, by address.
    pub fn down(&self) -> Vec<String> {
        if !self.any.load(Relaxed) {
            return Vec::new();
        }
        self.lock().down.keys().cloned().collect()
    }

    /// Of `writes` (in slots `slots`), those whose primary is down now: their names are missed
    /// from now on (held back from Redis until repaired). `None` when none is, or when too many
    /// names would be missed.
    pub(super) fn miss(&self, writes: &[Write], slots: &[u16]) -> Option<Vec<usize>> {
        if !self.any.load(Relaxed) {
            return None;
        }
        let mut state = self.lock();
        let missed: Vec<usize> = (0..writes.len())
            .filter(|&i| state.slots.contains(&slots[i]))
            .collect();
        let new = missed
            .iter()
            .filter(|&&i| !state.missed.contains(writes[i].key()))
            .count();
        if missed.is_empty() || state.missed.len() + new > MISSED_CAPACITY {
            return None;
        }
        for &i in &missed {
            state.missed.insert(writes[i].key().clone());
        }
        self.settle(&state);
        Some(missed)
    }

    pub(super) fn missed(&self) -> Vec<Key> {
        if !self.any.load(Relaxed) {
            return Vec::new();
        }
        self.lock().missed.iter().cloned().collect()
    }

    pub(super) fn handed_over(&self, names: &[Key]) {
        let mut state = self.lock();
        for name in names {
            state.missed.remove(name);
        }
        self.settle(&state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(address: &str, from: u16, to: u16) -> Primary {
        Primary {
            address: address.into(),
            id: address.into(),
            ranges: vec![(from, to)],
        }
    }

    #[test]
    fn a_down_primary_holds_back_its_slots_and_what_it_missed_until_handed_over() {
        let reach = Reach::default();
        let ann = Key::user("ann");
        assert!(reach.reachable(&ann, || 7));
        let changed = reach.set_down(&[primary("a:1", 0, 9)], &["a:1", "b:1"], |_| true);
        assert_eq!(changed.down, vec!["a:1".to_owned()]);
        assert!(!reach.reachable(&ann, || 7) && reach.reachable(&ann, || 10));
        assert!(!reach.slot_reachable(9) && reach.slot_reachable(10));
        let writes = vec![
            Write::Tombstone {
                key: ann.clone(),
                version: 3,
            },
            Write::Tombstone {
                key: Key::user("bob"),
                version: 4,
            },
        ];
        assert_eq!(reach.miss(&writes, &[7, 12]), Some(vec![0]));
        assert_eq!(reach.miss(&writes, &[12, 13]), None);
        // Back: its slots answer, but ann's change was passed over and is held back still.
        let changed = reach.set_down(&[], &["a:1", "b:1"], |_| true);
        assert_eq!(changed.back, vec!["a:1".to_owned()]);
        assert!(!reach.reachable(&ann, || 7) && reach.reachable(&Key::user("cid"), || 7));
        let missed = reach.missed();
        assert_eq!(missed, vec![ann.clone()]);
        reach.handed_over(&missed);
        assert!(reach.reachable(&ann, || 7) && reach.down().is_empty());
        // Replaced by a failover: not back, just gone.
        reach.set_down(&[primary("a:1", 0, 9)], &["a:1", "b:1"], |_| true);
        let changed = reach.set_down(&[], &["c:1", "b:1"], |_| true);
        assert_eq!(changed, Changed::default());
        assert!(reach.slot_reachable(7));
    }
}
