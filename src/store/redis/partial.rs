//! The `Cache`'s face of partial outages (see [`reach`](super::reach)): which names Redis may
//! answer for, the change stream's writes that pass over a primary down, and what the health
//! monitor says and hands to the repairs.

use std::sync::atomic::Ordering::Relaxed;

use super::cache::Cache;
use super::error::CacheError;
use super::keys::Primary;
use crate::model::entry::Write;
use crate::model::key::{Key, KeyParts};

impl Cache {
    /// Whether Redis may answer for `key` as far as partial outages go (see
    /// [`Reach`](super::reach::Reach)).
    pub fn reachable(&self, key: &dyn KeyParts) -> bool {
        self.reach()
            .reachable(key, || self.slot_of(&Key::new(key.table(), key.text())))
    }

    /// Whether this is a Redis Cluster (a change can be passed over for some slots only).
    pub fn is_cluster(&self) -> bool {
        self.keys().is_cluster()
    }

    /// Holds back from Redis the slots whose changes the change stream passed over and has not
    /// applied yet (`slots`, as its worker stored them: see `cdc::cursor::Missed`). Released
    /// slots are served again, the near cache emptied first (what it holds of them may predate
    /// what was missed).
    pub fn hold_slots(&self, slots: std::collections::BTreeSet<u16>) {
        if self.reach().releases(&slots) {
            self.flush_near();
        }
        self.reach().hold(slots);
    }

    /// Whether the primary of `slot` answered at the last look (missed names aside).
    pub fn slot_reachable(&self, slot: u16) -> bool {
        self.reach().slot_reachable(slot)
    }

    /// A call found a node down (refused, lost). On a Cluster that is one primary of several:
    /// the monitor is woken to look at once (then only that primary's slots go to PostgreSQL)
    /// and `false` is returned; elsewhere it is Redis itself, and `true` says so.
    pub fn node_failed(&self) -> bool {
        if self.keys().is_cluster() {
            self.look_alarm().notify_one();
            return false;
        }
        true
    }

    /// Whether a fill of the name `key()` may go to Redis: its primary answered at the last
    /// look (a fill to one that did not only waits out its timeout, and lands, if ever, when the
    /// primary wakes: the repairs decide what it holds then).
    pub fn may_fill(&self, key: impl FnOnce() -> Key) -> bool {
        !self.reach().any.load(Relaxed) || self.slot_reachable(self.slot_of(&key()))
    }

    /// The primaries that did not answer at the last look (`host:port`).
    pub fn unreachable(&self) -> Vec<String> {
        self.reach().down()
    }

    /// [`Cache::apply`] for the change stream: the writes that go to a primary the last look
    /// found down are passed over, their names missed (read from PostgreSQL until repaired), and
    /// the others applied, so one primary down does not stop the stream for the rest. A failure
    /// is tried once more if a primary was found down meanwhile. Returns how many were passed
    /// over, and their slots.
    pub async fn apply_or_miss(&self, writes: &[Write]) -> Result<(usize, Vec<u16>), CacheError> {
        let mut failed = None;
        if !self.reach().any.load(Relaxed) {
            // Every primary answered at the last look: all go, nothing copied.
            match self.apply(writes).await {
                Ok(_) => return Ok((0, Vec::new())),
                Err(e) => failed = Some(e),
            }
        }
        let slots: Vec<u16> = writes.iter().map(|w| self.slot_of(w.key())).collect();
        let mut missed = Vec::new();
        loop {
            match self.reach().miss(writes, &slots) {
                Some(now) if now.len() > missed.len() => {
                    // Anything that read an older entry of theirs is told, as for any write.
                    self.invalidate_near_of(now.iter().map(|&i| &writes[i]));
                    missed = now;
                }
                _ => {
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
            }
            let rest: Vec<Write>;
            let to_apply = match missed.is_empty() {
                true => writes,
                false => {
                    rest = (0..writes.len())
                        .filter(|i| missed.binary_search(i).is_err())
                        .map(|i| writes[i].clone())
                        .collect();
                    &rest
                }
            };
            match self.apply(to_apply).await {
                Ok(_) => {
                    let mut passed: Vec<u16> = missed.iter().map(|&i| slots[i]).collect();
                    passed.sort_unstable();
                    passed.dedup();
                    return Ok((missed.len(), passed));
                }
                Err(e) => failed = Some(e),
            }
        }
    }

    /// The names the change stream passed over, to hand to the repairs (then
    /// [`Cache::handed_over`]).
    pub fn missed(&self) -> Vec<Key> {
        self.reach().missed()
    }

    /// `names`, from [`Cache::missed`], are queued for repair: the repairs hold them back now.
    pub fn handed_over(&self, names: &[Key]) {
        self.reach().handed_over(names);
    }

    /// Records the primaries a look found not answering (`down`, of `primaries`), says which
    /// stopped or started answering, and forgets the confirmations of those down (a primary back
    /// is looked at again before it answers reads).
    pub(super) fn note_down(&self, down: &[Primary], primaries: &[&str]) {
        let keys = self.keys();
        let changed = self.reach().set_down(down, primaries, |s| keys.in_use(s));
        for node in &changed.down {
            tracing::warn!(node = %node, "redis node unreachable: reads of its slots go to postgres, the others keep serving from the cache");
        }
        for node in &changed.back {
            tracing::info!(node = %node, "redis node answers again");
        }
        if !down.is_empty() {
            self.forget_confirmed(down);
        }
    }
}
