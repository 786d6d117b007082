//! What the health monitor learns of Redis each tick, decided where the topology is known: on
//! Sentinel, the primary the sentinels name; every primary looked at (its `run_id`, its epoch, its
//! fence); the slots whose cached entries cannot be trusted any more (a changed topology, data
//! written under another Redis process); the fences to set again; the epochs to record. The
//! monitor acts on a [`Look`] and never sees a primary.

use super::admin::NodeState;
use super::cache::Cache;
use super::confirm::Confirmed;
use super::error::CacheError;
use super::keys::{Keys, Primary, SLOTS};

/// What the monitor keeps between its looks at Redis.
#[derive(Default)]
pub struct Watch {
    epochs: Epochs,
    /// The primaries seen without a fence at the last look.
    unfenced: Vec<Primary>,
    /// The fences seen at the last look, by primary.
    fences: Vec<(Primary, i64)>,
    /// The primaries whose fence cannot be right: not a number, or above anything the version
    /// sequence has drawn (see [`Cache::fences_above`]).
    forged: Vec<Primary>,
    /// The highest horizon known drawn from the version sequence: a fence above it is looked at.
    drawn: i64,
    /// The cache's id seen at the last look (one server, Sentinel): another one, or none, means
    /// the database was swapped (`SWAPDB`) or the key rewritten.
    cache_id: Option<String>,
    /// When `cache fence forged` was last said (at most every [`FORGED_SAY_EVERY`]).
    forged_said: Option<std::time::Instant>,
    /// Whether Redis's eviction policy was looked at (once, at the first contact).
    policy_checked: bool,
}

/// While a forged fence cannot be replaced (PostgreSQL down), it is said at most this often.
const FORGED_SAY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Watch {
    /// Whether to say `cache fence forged` now; if so, it counts as said.
    fn say_forged(&mut self) -> bool {
        let due = self
            .forged_said
            .is_none_or(|at| at.elapsed() >= FORGED_SAY_EVERY);
        if due {
            self.forged_said = Some(std::time::Instant::now());
        }
        due
    }
}

/// What one look at Redis found, in the terms the daemon acts on.
#[derive(Debug, Default)]
pub struct Look {
    /// Slots whose cached entries cannot be trusted: drop them before Redis answers for them.
    pub distrust: Vec<u16>,
    /// Some primary has no fence (a first start, a restart, a FLUSHALL): draw a horizon now and
    /// hand it to [`Cache::restore_fences`].
    pub unfenced: bool,
    /// Some fence is above the highest horizon known drawn: draw one now and hand it to
    /// [`Cache::fences_above`] (above that too, it is forged).
    pub suspect: bool,
    /// Some fence holds a value that is not a number: draw a horizon and hand it to
    /// [`Cache::reset_forged`].
    pub forged: bool,
    /// The connections named by this look, to confirm ([`Cache::confirm`]) once the rest is
    /// acted on.
    pub confirm: Vec<(String, Confirmed)>,
}

impl Cache {
    /// One look at Redis, as the monitor takes it every tick. An error when a primary does not
    /// answer: Redis is down then, and reads go to PostgreSQL until it answers or is replaced, so a
    /// promoted replica's data is never read before its epoch was looked at.
    pub async fn look(&self, watch: &mut Watch) -> Result<Look, CacheError> {
        if let Err(e) = self.follow_sentinels().await {
            tracing::debug!(error = %e, "cannot ask the sentinels");
        }
        let primaries = self.primaries().await?;
        self.confirm_only(&primaries);
        let looks = primaries.iter().map(|primary| self.look_at(primary));
        let states = futures::future::try_join_all(looks).await?;
        let mut confirm = Vec::new();
        let mut nodes: Vec<(Primary, NodeState)> = Vec::with_capacity(primaries.len());
        for (primary, (state, confirmed)) in primaries.into_iter().zip(states) {
            // Another node answered for it: nothing to confirm there until the next look.
            if let Some(confirmed) = confirmed.filter(|_| !state.elsewhere) {
                confirm.push((primary.address.clone(), confirmed));
            }
            nodes.push((primary, state));
        }
        if !watch.policy_checked {
            watch.policy_checked = true;
            if let Some((primary, _)) = nodes.first() {
                warn_if_evicting(self, primary).await;
            }
        }
        let mut distrust = watch.epochs.check(self.keys(), &nodes);
        if !self.keys().is_cluster() {
            if let Some((primary, state)) = nodes.iter().find(|(_, s)| !s.elsewhere) {
                let before = watch.cache_id.take();
                if before.is_some() && state.cache_id != before {
                    tracing::warn!(
                        before = before.as_deref().unwrap_or(""),
                        now = state.cache_id.as_deref().unwrap_or(""),
                        "redis database holds another cache (SWAPDB, or the id key rewritten): dropping every cached entry, reads go to postgres until then"
                    );
                    distrust.extend(primary.slots(self.keys()));
                    self.flush_near();
                }
                // The id is made at the first look if there is none yet, so that the next look
                // has one to compare with.
                watch.cache_id = match &state.cache_id {
                    Some(id) => Some(id.clone()),
                    None => self.cache_id().await.ok(),
                };
            }
        }
        watch.unfenced.clear();
        watch.fences.clear();
        watch.forged.clear();
        for (primary, state) in nodes.iter().filter(|(_, state)| !state.elsewhere) {
            match &state.fence {
                Ok(Some(fence)) => watch.fences.push((primary.clone(), *fence)),
                Ok(None) => watch.unfenced.push(primary.clone()),
                // Redis answered: it is up, but a fence key holds something not ours.
                Err(reason) => {
                    if watch.say_forged() {
                        let key = self.fence_key_of(primary);
                        tracing::error!(key = %key.escape_debug(), error = %reason, "cache fence forged: the cache there is cleared and the fence set anew");
                    }
                    watch.forged.push(primary.clone());
                }
            }
        }
        Ok(Look {
            confirm,
            distrust,
            unfenced: !watch.unfenced.is_empty(),
            suspect: watch.fences.iter().any(|(_, f)| *f > watch.drawn),
            forged: !watch.forged.is_empty(),
        })
    }

    /// Marks as forged every primary whose fence at the last look was above `drawn`, a horizon
    /// drawn after that look: no fence of cacheward's is (each was drawn before it was set).
    /// Returns whether any was.
    pub fn fences_above(&self, watch: &mut Watch, drawn: i64) -> bool {
        watch.drawn = watch.drawn.max(drawn);
        for (primary, fence) in watch.fences.clone() {
            if fence > drawn {
                if watch.say_forged() {
                    let key = self.fence_key_of(&primary);
                    tracing::error!(key = %key.escape_debug(), fence, drawn, "cache fence forged: the cache there is cleared and the fence set anew");
                }
                watch.forged.push(primary);
            }
        }
        !watch.forged.is_empty()
    }

    /// Sets the fences of the primaries the last look found forged to `horizon` (drawn after that
    /// look), in every slot they serve; returns those slots, whose entries cannot be trusted (a
    /// forged fence may have let stale writes in). A primary that cannot be reached now is tried
    /// at the next look.
    pub async fn reset_forged(&self, watch: &Watch, horizon: i64) -> Vec<u16> {
        let mut slots = Vec::new();
        for primary in &watch.forged {
            match self.reset_fences(primary, horizon).await {
                Ok(reset) => slots.extend(reset),
                Err(e) => tracing::debug!(error = %e, "cannot reset the cache fence yet"),
            }
        }
        slots
    }

    /// Sets the missing fences the last look found to `horizon`, which must have been drawn after
    /// that look (so that every write that read its row before Redis lost its data is refused).
    /// Returns how many it set; a primary that cannot be reached now is tried at the next look.
    pub async fn restore_fences(&self, watch: &Watch, horizon: i64) -> usize {
        let mut set = 0;
        for primary in &watch.unfenced {
            match self.establish_fences(primary, horizon).await {
                Ok(n) => set += n,
                Err(e) => tracing::debug!(error = %e, "cannot set the cache fence yet"),
            }
        }
        set
    }

    /// Lets the connections `look` named answer reads: call once what it found is acted on
    /// (distrusted slots handed to the repairs).
    pub fn confirm_looked(&self, look: &mut Look) {
        self.confirm(std::mem::take(&mut look.confirm));
    }

    /// Records the epochs the looks found pending: call once the cache holds nothing from before
    /// them (no repair pending).
    pub async fn record_epochs(&self, watch: &mut Watch) {
        watch.epochs.record(self).await;
    }
}

/// Which primary (by node id) serves which slot ranges.
type Topology = Vec<(String, Vec<(u16, u16)>)>;

/// The slots served by another primary (or by none, or newly by one) in `now` than in `before`.
fn changed_hands(before: &Topology, now: &Topology) -> Vec<u16> {
    fn owners(topology: &Topology) -> Vec<Option<&str>> {
        let mut owner = vec![None; SLOTS];
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
    /// A change of topology under way (a resharding moves slots look after look): said once when
    /// it starts and once when it settles, not at every look.
    changing: Option<Changing>,
    /// What the last look found of each primary (by node id; `""` for the one server): whether a
    /// process that replaced it may keep the cache (see [`Kept`]).
    last: std::collections::HashMap<String, Kept>,
}

/// What a restarted Redis must show for its data to be kept rather than distrusted: the process it
/// replaced kept every write on disk before answering (`appendonly yes`, `appendfsync always`),
/// so did it, it is the same server (node id, the address Sentinel names), no replica promoted
/// since it started, and its heartbeat is above the one the replaced process answered at the last
/// look (a restore of an older file, or of a copy, is not). Anything else is distrusted.
#[derive(Clone, Debug, PartialEq)]
struct Kept {
    durable: bool,
    at: String,
    beat: Option<i64>,
}

impl Kept {
    fn of(state: &NodeState) -> Kept {
        Kept {
            durable: state.durable,
            at: state.at.clone(),
            beat: state.beat,
        }
    }

    /// Whether `now`, another process, holds every write the process seen as `self` answered.
    fn holds_all_of(&self, now: &NodeState) -> bool {
        self.durable
            && now.durable
            && !now.promoted
            && self.at == now.at
            && matches!((self.beat, now.beat), (Some(then), Some(now)) if now > then)
    }
}

/// A change of topology under way: since when, how many slots changed hands so far, and how many
/// looks in a row found nothing more.
struct Changing {
    since: std::time::Instant,
    slots: usize,
    stable: u32,
}

/// Looks in a row without a change after which a change of topology is said to have settled.
const SETTLED_AFTER: u32 = 4;

impl Epochs {
    /// Looks at what `nodes` answered; returns the slots whose cached entries cannot be trusted.
    fn check(&mut self, keys: &Keys, nodes: &[(Primary, NodeState)]) -> Vec<u16> {
        let mut distrust = Vec::new();
        let topology: Topology = nodes
            .iter()
            .map(|(p, _)| (p.id.clone(), p.ranges.clone()))
            .collect();
        if let Some(seen) = self.topology.as_ref().filter(|seen| **seen != topology) {
            let changed = changed_hands(seen, &topology);
            match &mut self.changing {
                None => {
                    tracing::warn!(
                        primaries = topology.len(),
                        slots = changed.len(),
                        "redis cluster topology changed (a failover, or slots moved): dropping the cached entries of the slots that changed hands, reads of those go to postgres until then"
                    );
                    self.changing = Some(Changing {
                        since: std::time::Instant::now(),
                        slots: changed.len(),
                        stable: 0,
                    });
                }
                Some(under_way) => {
                    tracing::debug!(
                        slots = changed.len(),
                        "redis cluster topology still changing"
                    );
                    under_way.slots += changed.len();
                    under_way.stable = 0;
                }
            }
            distrust.extend(changed);
            self.pending.clear();
        } else if let Some(under_way) = &mut self.changing {
            under_way.stable += 1;
            if under_way.stable >= SETTLED_AFTER {
                tracing::info!(
                    primaries = topology.len(),
                    slots = under_way.slots,
                    took_ms = under_way.since.elapsed().as_millis() as u64,
                    "redis cluster topology settled"
                );
                self.changing = None;
            }
        }
        self.topology = Some(topology);
        let kept = nodes
            .iter()
            .filter(|(_, state)| !state.elsewhere && state.run_id.is_some())
            .map(|(primary, state)| (primary.id.clone(), Kept::of(state)))
            .collect();
        let last = std::mem::replace(&mut self.last, kept);
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
            let kept = last
                .get(&primary.id)
                .is_some_and(|before| before.holds_all_of(state));
            if kept && matches!(state.fence, Ok(Some(_))) {
                tracing::info!(
                    run_id = %run_id,
                    recorded = state.recorded.as_deref().unwrap_or(""),
                    node = %primary.address,
                    "redis restarted with every write on disk: the cache is kept"
                );
            } else if matches!(state.fence, Ok(Some(_))) {
                tracing::warn!(
                    run_id = %run_id,
                    recorded = state.recorded.as_deref().unwrap_or(""),
                    node = %primary.address,
                    "redis holds data written under another redis process: dropping every cached entry, reads go to postgres until then"
                );
                distrust.extend(primary.slots(keys));
            }
            // Without a fence Redis lost everything there, which the fence already handles.
            self.pending.retain(|(p, _)| p != primary);
            self.pending.push((primary.clone(), run_id.clone()));
        }
        distrust
    }

    /// Records the pending epochs (once nothing from before them is trusted any more).
    async fn record(&mut self, cache: &Cache) {
        let mut left = Vec::new();
        for (primary, run_id) in self.pending.drain(..) {
            if let Err(e) = cache.record_epoch(&primary, &run_id).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resharding_is_said_once_when_it_starts_and_once_when_it_settles() {
        let keys = Keys::new("user:", &[], true);
        let nodes = |moved: u16| -> Vec<(Primary, NodeState)> {
            let mut third = vec![(10923, 16383)];
            if moved > 0 {
                third.insert(0, (0, moved - 1));
            }
            let ranges = [vec![(moved, 5460)], vec![(5461, 10922)], third];
            ranges
                .into_iter()
                .enumerate()
                .map(|(i, ranges)| {
                    let primary = Primary {
                        address: format!("n{i}"),
                        id: format!("n{i}"),
                        ranges,
                    };
                    let state = NodeState {
                        run_id: Some("r".into()),
                        recorded: Some("r".into()),
                        fence: Ok(Some(1)),
                        elsewhere: false,
                        cache_id: None,
                        name: None,
                        named: false,
                        durable: false,
                        promoted: false,
                        beat: None,
                        at: String::new(),
                    };
                    (primary, state)
                })
                .collect()
        };
        let mut epochs = Epochs::default();
        let mut distrusted = 0;
        let said = crate::support::captured::logs(|| {
            // Slots move look after look (10 at a time), then nothing more for a while.
            for moved in [0, 10, 20, 30, 30, 30, 30, 30, 30] {
                distrusted += epochs.check(&keys, &nodes(moved)).len();
            }
        });
        assert_eq!(
            distrusted, 30,
            "every slot that changed hands is distrusted"
        );
        assert_eq!(said.matches("topology changed").count(), 1, "{said}");
        assert_eq!(said.matches("topology settled").count(), 1, "{said}");
        assert!(said.contains("slots=30"), "{said}");
    }

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
