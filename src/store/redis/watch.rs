//! What the health monitor learns of Redis each tick, decided where the topology is known: on
//! Sentinel, the primary the sentinels name; every primary looked at (its `run_id`, its epoch, its
//! fence); the slots whose cached entries cannot be trusted any more (a changed topology, data
//! written under another Redis process); the fences to set again; the epochs to record. The
//! monitor acts on a [`Look`] and never sees a primary.

use super::admin::NodeState;
use super::cache::Cache;
use super::confirm::Confirmed;
use super::epochs::Epochs;
use super::error::{CacheError, CacheErrorKind};
use super::keys::Primary;

/// What the monitor keeps between its looks at Redis.
#[derive(Default)]
pub struct Watch {
    epochs: Epochs,
    /// The primaries seen without a fence at the last look.
    unfenced: Vec<Primary>,
    /// The fences seen at the last look (users' and the declared tables' own), by primary, each
    /// with its key.
    fences: Vec<(Primary, String, i64)>,
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
    /// The connection the last look went through (see `Conn::generation`).
    generation: Option<u64>,
    /// How many times the connection had gone to another server at the last look (see
    /// `Conn::moves`).
    moves: u64,
}

/// While a forged fence cannot be replaced (PostgreSQL down), it is said at most this often.
const FORGED_SAY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Watch {
    /// A fence of `primary` at `key` holds something not cacheward's (`reason`).
    fn found_forged(&mut self, primary: &Primary, key: &str, reason: &str) {
        if self.say_forged() {
            tracing::error!(key = %key.escape_debug(), error = %reason, "cache fence forged: the cache there is cleared and the fence set anew");
        }
        if !self.forged.contains(primary) {
            self.forged.push(primary.clone());
        }
    }

    /// A look went through connection `generation`: if the last one went through another, what
    /// was seen of the primary then is forgotten, and what this one finds judged afresh. Under
    /// Sentinel another connection may reach another server: during a failover the sentinels
    /// disagree for a moment and the daemon may move to the old master and back, so a process seen
    /// "again" may have had its cache dropped on the other server in between, not on itself.
    fn through(&mut self, generation: Option<u64>) {
        if self.generation != generation {
            self.epochs.forget_processes();
            self.generation = generation;
        }
    }

    /// Whether the epochs the looks found pending may be recorded through connection `now`: only
    /// through the one the last look went through, on which the drops since then went too (they
    /// are made before the record). Otherwise they are forgotten (recorded nowhere: where they
    /// would land now may not be where the cache was dropped), and the next look judges afresh.
    fn may_record(&mut self, now: Option<u64>) -> bool {
        if now.is_some() && now == self.generation {
            return true;
        }
        self.epochs.forget_processes();
        self.generation = None;
        false
    }

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
        // Every look of this one through one connection (see `Watch::through`).
        if let Err(e) = self.connect_primary().await {
            tracing::debug!(error = %e, "cannot reach the redis primary");
        }
        let generation = self.generation();
        let primaries = self.primaries().await?;
        self.confirm_only(&primaries);
        let topology = Epochs::topology_of(&primaries);
        let looks = primaries.iter().map(|primary| self.look_at(primary));
        let states = futures::future::join_all(looks).await;
        if states.is_empty() {
            return Ok(Look::default());
        }
        if self.generation() != generation {
            // The daemon moved to another primary meanwhile: which server answered is unknown.
            // Nothing is decided or confirmed; the next look, at once, takes the new connection.
            tracing::debug!("the redis primary changed during the look: looking again");
            self.look_alarm().notify_one();
            return Ok(Look::default());
        }
        watch.through(generation);
        // Gone to another server since the last look, and maybe back: writes went there.
        let moves = self.moves();
        let moved = std::mem::replace(&mut watch.moves, moves) != moves;
        let mut failed = None;
        let addresses: Vec<String> = primaries.iter().map(|p| p.address.clone()).collect();
        let mut confirm = Vec::new();
        let mut nodes: Vec<(Primary, NodeState)> = Vec::with_capacity(primaries.len());
        let mut down = Vec::new();
        for (primary, state) in primaries.into_iter().zip(states) {
            let (state, confirmed) = match state {
                Ok((state, _)) if state.replica => {
                    // Demoted (a failover under way): not read until the primary is found anew.
                    tracing::debug!(node = %primary.address, "the redis primary is a replica now");
                    self.forget_primary();
                    failed.get_or_insert_with(|| {
                        CacheError::said(
                            CacheErrorKind::Lost,
                            "the redis primary is a replica now (demoted): looking for the new one",
                        )
                    });
                    down.push(primary);
                    continue;
                }
                Ok(answered) => answered,
                Err(e) => {
                    tracing::debug!(node = %primary.address, error = %e, "redis node does not answer");
                    failed.get_or_insert(e);
                    down.push(primary);
                    continue;
                }
            };
            // Another node answered for it: nothing to confirm there until the next look.
            if let Some(confirmed) = confirmed.filter(|_| !state.elsewhere) {
                confirm.push((primary.address.clone(), confirmed));
            }
            nodes.push((primary, state));
        }
        if let (true, Some(e)) = (nodes.is_empty(), failed) {
            // None answers as a primary: Redis is down.
            return Err(e);
        }
        // One primary down of several (a Cluster): only its slots' reads go to PostgreSQL.
        let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
        self.note_down(&down, &addresses);
        if !watch.policy_checked {
            watch.policy_checked = true;
            if let Some((primary, _)) = nodes.first() {
                warn_if_evicting(self, primary).await;
            }
        }
        let mut distrust = watch.epochs.check(self.keys(), topology, &nodes, moved);
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
        // A drop found a slot without its fence: every primary's missing fences are set.
        let missing = self.fenced.take_missing();
        for (primary, state) in nodes.iter().filter(|(_, state)| !state.elsewhere) {
            match &state.fence {
                Ok(Some(fence)) => {
                    watch
                        .fences
                        .push((primary.clone(), self.fence_key_of(primary), *fence));
                    if missing {
                        watch.unfenced.push(primary.clone());
                    }
                }
                Ok(None) => watch.unfenced.push(primary.clone()),
                // Redis answered: it is up, but a fence key holds something not ours.
                Err(reason) => watch.found_forged(primary, &self.fence_key_of(primary), reason),
            }
            // A table's own fence may be missing (it has had no TRUNCATE); one that cannot be
            // right refuses every write of that table.
            for (key, fence) in &state.table_fences {
                match fence {
                    Ok(Some(fence)) => watch.fences.push((primary.clone(), key.clone(), *fence)),
                    Ok(None) => {}
                    Err(reason) => watch.found_forged(primary, key, reason),
                }
            }
        }
        Ok(Look {
            confirm,
            distrust,
            unfenced: !watch.unfenced.is_empty(),
            suspect: watch.fences.iter().any(|(_, _, f)| *f > watch.drawn),
            forged: !watch.forged.is_empty(),
        })
    }

    /// Marks as forged every primary whose fence at the last look was above `drawn`, a horizon
    /// drawn after that look: no fence of cacheward's is (each was drawn before it was set).
    /// Returns whether any was.
    pub fn fences_above(&self, watch: &mut Watch, drawn: i64) -> bool {
        watch.drawn = watch.drawn.max(drawn);
        for (primary, key, fence) in watch.fences.clone() {
            if fence > drawn {
                if watch.say_forged() {
                    tracing::error!(key = %key.escape_debug(), fence, drawn, "cache fence forged: the cache there is cleared and the fence set anew");
                }
                if !watch.forged.contains(&primary) {
                    watch.forged.push(primary);
                }
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
        if watch.may_record(self.generation()) {
            watch.epochs.record(self).await;
        }
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
    use crate::store::redis::keys::Keys;

    /// The primary Sentinel names, answering as process `run_id` with the epoch `recorded`.
    fn sentinel_primary(run_id: &str, recorded: &str) -> (Primary, NodeState) {
        let primary = Primary::one_server();
        let mut state = super::super::epochs::answered(run_id, Some(&format!("{run_id}-replid")));
        state.recorded = Some(recorded.into());
        state.recorded_term = Some(format!("{recorded}-replid"));
        state.promoted = true;
        (primary, state)
    }

    /// A look at `node` through connection `generation`: the slots it distrusts.
    fn look(watch: &mut Watch, generation: u64, node: &(Primary, NodeState)) -> usize {
        let keys = Keys::new("user:", &[], false);
        watch.through(Some(generation));
        let topology = Epochs::topology_of(std::slice::from_ref(&node.0));
        watch
            .epochs
            .check(&keys, topology, std::slice::from_ref(node), false)
            .len()
    }

    #[test]
    fn a_primary_seen_again_through_another_connection_is_judged_afresh() {
        // A promoted replica `x` still holds the epoch of the master it copied (`y`): distrusted.
        let x = sentinel_primary("x", "y");
        let mut watch = Watch::default();
        assert!(look(&mut watch, 1, &x) > 0);
        // Seen again through the same connection before its epoch is recorded: its drop is under
        // way there, nothing more to distrust.
        assert_eq!(look(&mut watch, 1, &x), 0);
        // The daemon moved to the old master and back (the sentinels disagreed for a moment), so
        // the drop may have gone to the other server: `x` seen through the new connection is
        // distrusted again, as if for the first time.
        assert!(look(&mut watch, 2, &x) > 0);
    }

    #[test]
    fn an_epoch_is_recorded_only_through_the_connection_its_look_went_through() {
        let x = sentinel_primary("x", "y");
        let mut watch = Watch::default();
        assert!(look(&mut watch, 1, &x) > 0);
        assert!(watch.may_record(Some(1)));
        assert!(!watch.epochs.pending_is_empty());
        // Moved meanwhile: the record would land on whatever server the new connection reaches,
        // maybe not where the drop went. It is forgotten, not recorded.
        assert!(!watch.may_record(Some(2)));
        assert!(watch.epochs.pending_is_empty());
        assert!(!watch.may_record(None));
    }
}
