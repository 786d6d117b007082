//! Which Redis process and which topology the cached data was written under, look after look:
//! data from another process (a restart from persisted data, a promoted replica, a restore, a
//! primary that took its data from another master) or slots that changed hands may lack the
//! newest writes, so their entries are distrusted before the new epochs are recorded.

use super::admin::NodeState;
use super::cache::Cache;
use super::keys::{Keys, Primary, SLOTS};

/// Which primary (by node id) serves which slot ranges.
pub(super) type Topology = Vec<(String, Vec<(u16, u16)>)>;

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
pub(super) struct Epochs {
    /// The `run_id`s to record, per primary, with their terms (replication ids), once the cache
    /// holds nothing from before them.
    pending: Vec<(Primary, String, Option<String>)>,
    /// Whether `INFO` was refused (said once: a replaced Redis then goes unnoticed).
    unknowable: bool,
    /// Who served which slots at the last look (node ids and ranges).
    topology: Option<Topology>,
    /// The `run_id` each primary (by node id; `""` for the one server) answered with at the last
    /// look.
    seen: std::collections::HashMap<String, String>,
    /// The replication id (`master_replid`) each primary answered with when last seen a master.
    replids: std::collections::HashMap<String, String>,
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
    /// Which primary serves which slots, as [`Epochs::check`] compares them.
    pub(super) fn topology_of(primaries: &[Primary]) -> Topology {
        primaries
            .iter()
            .map(|p| (p.id.clone(), p.ranges.clone()))
            .collect()
    }

    /// Looks at what `nodes` answered (the primaries of `topology` that did); returns the slots
    /// whose cached entries cannot be trusted. `moved`: under Sentinel, the connection went to
    /// another server since the last look (and maybe back).
    pub(super) fn check(
        &mut self,
        keys: &Keys,
        topology: Topology,
        nodes: &[(Primary, NodeState)],
        moved: bool,
    ) -> Vec<u16> {
        let mut distrust = Vec::new();
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
        let mut kept: std::collections::HashMap<String, Kept> = nodes
            .iter()
            .filter(|(_, state)| !state.elsewhere && state.run_id.is_some())
            .map(|(primary, state)| (primary.id.clone(), Kept::of(state)))
            .collect();
        // A primary that did not answer keeps what was last seen of it.
        for (id, before) in &self.last {
            let serves = self
                .topology
                .as_ref()
                .is_some_and(|t| t.iter().any(|(p, _)| p == id));
            if serves && !nodes.iter().any(|(p, _)| &p.id == id) {
                kept.insert(id.clone(), before.clone());
            }
        }
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
            // The same process with another replication id took its data from elsewhere in
            // between (made a replica of a master that lacked writes, then promoted again): its
            // epoch may even be its own, copied back.
            let replid_before = match &state.replid {
                Some(now) => self.replids.insert(primary.id.clone(), now.clone()),
                None => None,
            };
            if same_process && replid_before.is_some_and(|before| Some(before) != state.replid) {
                distrust.extend(primary.slots(keys));
                if matches!(state.fence, Ok(Some(_))) {
                    tracing::warn!(
                        run_id = %run_id,
                        node = %primary.address,
                        "redis primary took its data from another since the last look (demoted and promoted again): dropping its cached entries, reads go to postgres until then"
                    );
                }
                self.pend(primary, run_id, state);
                continue;
            }
            // Its own epoch counts only from the term it was recorded in: a primary demoted since
            // (a failover), made a replica that could not sync (cut off), and promoted again holds
            // its own epoch from its first term over data that lacks every write of the other's.
            let own_epoch = state.recorded.as_ref() == Some(run_id);
            let same_term = match (&state.replid, &state.recorded_term) {
                (None, _) => true,
                (Some(now), Some(then)) => now == then,
                // Recorded with no term (by an older cacheward): a primary never promoted since
                // it started has had one term only.
                (Some(_), None) => !state.promoted,
            };
            if own_epoch && same_term && moved {
                // Its own, in this term; but since the last look the daemon was connected to
                // another server, and what it wrote there this one lacks.
                distrust.extend(primary.slots(keys));
                if matches!(state.fence, Ok(Some(_))) {
                    tracing::warn!(
                        run_id = %run_id,
                        node = %primary.address,
                        "redis primary is one the daemon left for another since the last look (the sentinels named another, then this one): dropping its cached entries, reads go to postgres until then"
                    );
                }
                self.pend(primary, run_id, state);
                continue;
            }
            if (own_epoch && same_term)
                || self
                    .pending
                    .iter()
                    .any(|(p, id, term)| p == primary && id == run_id && *term == state.replid)
            {
                continue;
            }
            if own_epoch {
                distrust.extend(primary.slots(keys));
                if matches!(state.fence, Ok(Some(_))) {
                    tracing::warn!(
                        run_id = %run_id,
                        node = %primary.address,
                        "redis primary's data is from an earlier term of it (demoted and promoted again since its epoch was recorded): dropping its cached entries, reads go to postgres until then"
                    );
                }
                self.pend(primary, run_id, state);
                continue;
            }
            if same_process {
                // The process answered at the last look too: its anchor slot moved (the epoch
                // there is another primary's, or none), its data did not change hands.
                self.pend(primary, run_id, state);
                continue;
            }
            let kept = last
                .get(&primary.id)
                .is_some_and(|before| before.holds_all_of(state));
            let fenced = matches!(state.fence, Ok(Some(_)));
            if kept && fenced {
                tracing::info!(
                    run_id = %run_id,
                    recorded = state.recorded.as_deref().unwrap_or(""),
                    node = %primary.address,
                    "redis restarted with every write on disk: the cache is kept"
                );
            } else {
                // Without a fence at its anchor too: Redis lost everything there, or (on a
                // Cluster) it restarted from a dump older than the slot it anchors on now, whose
                // other slots hold the entries of then. Nothing to drop costs a scan of nothing,
                // and the drop says what it removed.
                distrust.extend(primary.slots(keys));
                if fenced {
                    tracing::warn!(
                        run_id = %run_id,
                        recorded = state.recorded.as_deref().unwrap_or(""),
                        node = %primary.address,
                        "redis holds data written under another redis process: dropping every cached entry, reads go to postgres until then"
                    );
                }
            }
            self.pend(primary, run_id, state);
        }
        // Only primaries that serve slots now are remembered (node ids come from the Cluster's
        // answers: a churning or hostile one must not grow these). One that serves again later is
        // a process not seen before, judged as such (its slots changed hands anyway).
        let serves = |id: &String| {
            self.topology
                .as_ref()
                .is_some_and(|t| t.iter().any(|(p, _)| p == id))
        };
        self.seen.retain(|id, _| serves(id));
        self.replids.retain(|id, _| serves(id));
        distrust
    }

    /// Records `run_id` (and the term `state` answered in) as `primary`'s epoch once the cache
    /// holds nothing from before it.
    fn pend(&mut self, primary: &Primary, run_id: &str, state: &NodeState) {
        self.pending.retain(|(p, _, _)| p != primary);
        self.pending
            .push((primary.clone(), run_id.to_owned(), state.replid.clone()));
    }

    /// Forgets the processes seen behind the primaries (and their replication ids) and the epochs
    /// not recorded yet: the next look judges what it finds as if for the first time (see
    /// `Watch::through`). What was seen of the topology and the last looks' restarts is kept.
    pub(super) fn forget_processes(&mut self) {
        self.seen.clear();
        self.replids.clear();
        self.pending.clear();
    }

    #[cfg(test)]
    pub(super) fn pending_is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Records the pending epochs (once nothing from before them is trusted any more).
    pub(super) async fn record(&mut self, cache: &Cache) {
        let mut left = Vec::new();
        for (primary, run_id, term) in self.pending.drain(..) {
            if let Err(e) = cache.record_epoch(&primary, &run_id, term.as_deref()).await {
                tracing::debug!(error = %e, "cannot record the redis epoch yet");
                left.push((primary, run_id, term));
            }
        }
        self.pending = left;
    }
}

/// A primary that answered with `run_id` and `replid` (its epoch too, recorded in this term),
/// fenced: for the tests here and `watch`'s.
#[cfg(test)]
pub(super) fn answered(run_id: &str, replid: Option<&str>) -> NodeState {
    NodeState {
        run_id: Some(run_id.into()),
        recorded: Some(run_id.into()),
        recorded_term: replid.map(str::to_owned),
        fence: Ok(Some(1)),
        table_fences: Vec::new(),
        elsewhere: false,
        cache_id: None,
        name: None,
        named: false,
        durable: false,
        promoted: false,
        replica: false,
        replid: replid.map(str::to_owned),
        beat: None,
        at: String::new(),
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
                    (primary, answered("r", None))
                })
                .collect()
        };
        let mut epochs = Epochs::default();
        let mut distrusted = 0;
        let said = crate::support::captured::logs(|| {
            // Slots move look after look (10 at a time), then nothing more for a while.
            for moved in [0, 10, 20, 30, 30, 30, 30, 30, 30] {
                let nodes = nodes(moved);
                let primaries: Vec<Primary> = nodes.iter().map(|(p, _)| p.clone()).collect();
                let topology = Epochs::topology_of(&primaries);
                distrusted += epochs.check(&keys, topology, &nodes, false).len();
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

    #[test]
    fn the_same_process_with_another_replication_id_is_distrusted() {
        let keys = Keys::new("user:", &[], false);
        let primary = Primary::one_server();
        let state = |replid: &str| answered("a", Some(replid));
        let mut epochs = Epochs::default();
        let mut look = |replid: &str| {
            let nodes = vec![(primary.clone(), state(replid))];
            let topology = Epochs::topology_of(std::slice::from_ref(&primary));
            epochs.check(&keys, topology, &nodes, false).len()
        };
        assert_eq!(look("r1"), 0);
        assert_eq!(look("r1"), 0, "a primary that kept its lineage is trusted");
        // Its epoch is its own (copied back from the master it synced from): not enough.
        assert_eq!(look("r2"), 1, "the one server's slot, distrusted");
        assert_eq!(look("r2"), 0);
    }

    #[test]
    fn a_primary_promoted_again_over_its_own_epoch_from_an_earlier_term_is_distrusted() {
        // Its epoch was recorded in its first term (replication id r1); since, it was demoted by a
        // failover, could not sync from the new master (cut off), and was promoted again (r2). No
        // look remembers it (the last ones were at the other server, or the daemon is new): only
        // what it holds tells.
        let keys = Keys::new("user:", &[], false);
        let primary = Primary::one_server();
        let look = |epochs: &mut Epochs, state: NodeState| {
            let topology = Epochs::topology_of(std::slice::from_ref(&primary));
            let nodes = [(primary.clone(), state)];
            let mut distrusted = 0;
            crate::support::captured::logs(|| {
                distrusted = epochs.check(&keys, topology, &nodes, false).len();
            });
            distrusted
        };
        let again = || {
            let mut state = answered("x", Some("r2"));
            state.recorded_term = Some("r1".into());
            state
        };
        let mut epochs = Epochs::default();
        assert_eq!(look(&mut epochs, again()), 1, "distrusted");
        assert_eq!(look(&mut epochs, again()), 0, "its drop is under way");
        assert_eq!(
            epochs.pending[0].2.as_deref(),
            Some("r2"),
            "recorded in this term"
        );
        // Recorded in this term: trusted, by any daemon.
        assert_eq!(look(&mut Epochs::default(), answered("x", Some("r2"))), 0);
        // The replication id unknown (INFO refused): the epoch alone.
        let mut unknown = answered("x", None);
        unknown.recorded_term = Some("r1".into());
        assert_eq!(look(&mut Epochs::default(), unknown), 0);
        // Recorded by a cacheward that kept no term: trusted if never promoted since its start
        // (one term only), distrusted once if it was.
        let legacy = |promoted: bool| {
            let mut state = answered("x", Some("r2"));
            state.recorded_term = None;
            state.promoted = promoted;
            state
        };
        assert_eq!(look(&mut Epochs::default(), legacy(false)), 0);
        assert_eq!(look(&mut Epochs::default(), legacy(true)), 1);
    }

    #[test]
    fn a_primary_the_daemon_left_for_another_and_came_back_to_is_distrusted() {
        // Its own epoch, in this term: a master the sentinels named again after naming another
        // for a while (it was never demoted). What the daemon wrote on the other, it lacks.
        let keys = Keys::new("user:", &[], false);
        let primary = Primary::one_server();
        let topology = Epochs::topology_of(std::slice::from_ref(&primary));
        let nodes = [(primary.clone(), answered("m", Some("r")))];
        let mut epochs = Epochs::default();
        assert_eq!(
            epochs.check(&keys, topology.clone(), &nodes, false).len(),
            0
        );
        let mut distrusted = 0;
        crate::support::captured::logs(|| {
            distrusted = epochs.check(&keys, topology.clone(), &nodes, true).len();
        });
        assert_eq!(distrusted, 1, "moved away and back: distrusted");
    }

    #[test]
    fn a_new_process_without_a_fence_at_its_anchor_is_distrusted_all_the_same() {
        // A Cluster primary restarted from a dump older than the slot it anchors on now (a
        // resharding moved lower slots to it since): no fence and no epoch there, as if Redis had
        // lost everything, but its other slots hold the entries of then.
        let keys = Keys::new("user:", &[], true);
        let primary = Primary {
            address: "n:1".into(),
            id: "n".into(),
            ranges: vec![(0, 19), (5461, 10922)],
        };
        let topology = Epochs::topology_of(std::slice::from_ref(&primary));
        let mut epochs = Epochs::default();
        let nodes = [(primary.clone(), answered("before", Some("r")))];
        assert!(epochs
            .check(&keys, topology.clone(), &nodes, false)
            .is_empty());
        let mut restarted = answered("after", Some("r2"));
        restarted.recorded = None;
        restarted.recorded_term = None;
        restarted.fence = Ok(None);
        let nodes = [(primary.clone(), restarted)];
        let distrusted = epochs.check(&keys, topology, &nodes, false);
        assert_eq!(
            distrusted.len(),
            primary.slots(&keys).count(),
            "every slot it serves"
        );
    }

    #[test]
    fn only_the_primaries_serving_now_are_remembered() {
        let keys = Keys::new("user:", &[], true);
        let mut epochs = Epochs::default();
        // A thousand primaries come and go (a churning or hostile Cluster), two at a time.
        for i in 0..1000 {
            let nodes: Vec<(Primary, NodeState)> = [(0, 8191), (8192, 16383)]
                .into_iter()
                .enumerate()
                .map(|(half, range)| {
                    let id = format!("n{i}-{half}");
                    let primary = Primary {
                        address: id.clone(),
                        id,
                        ranges: vec![range],
                    };
                    (primary, answered("r", Some("l")))
                })
                .collect();
            let primaries: Vec<Primary> = nodes.iter().map(|(p, _)| p.clone()).collect();
            let topology = Epochs::topology_of(&primaries);
            crate::support::captured::logs(|| {
                epochs.check(&keys, topology, &nodes, false);
            });
        }
        assert_eq!(epochs.seen.len(), 2);
        assert_eq!(epochs.replids.len(), 2);
        assert!(epochs.seen.contains_key("n999-0") && epochs.seen.contains_key("n999-1"));
    }
}
