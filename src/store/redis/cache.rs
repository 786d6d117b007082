//! The Redis side of the cache as the service, the CDC worker and the monitor see it: reads of
//! live entries (near cache first), versioned writes, and the administration of cacheward's own
//! keys. Whether Redis is one server, a Cluster or a Sentinel group stays behind this facade.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::admin::NodeState;
use super::confirm::{Confirmations, Confirmed};
use super::conn::{self, Conn};
use super::error::decode;
use super::error::{CacheError, CacheErrorKind};
use super::fenced::Fenced;
use super::keys::{Keys, Primary};
use super::near::NearCache;
use super::pipeline::Requests;
use super::reach::Reach;
use super::routing::Router;
use super::scan::{Scan, Stored};
use super::scripts::{self, outcomes, Outcome};
use super::tracking::listen;
use crate::config::{Config, RedisMode};
use crate::model::entry::{Live, Write};
use crate::model::key::{Key, KeyRef, TableId};

/// The Redis side of the cache: one multiplexed, auto-reconnecting connection shared by all tasks.
#[derive(Clone)]
pub struct Cache {
    router: Router,
    /// Request-path calls waiting to go to Redis together.
    requests: Arc<Requests>,
    /// The near cache (`cache.local_max_bytes`), if on (see `cache_near` for what the rest of
    /// the daemon asks of it).
    pub(super) near: Option<Arc<NearCache>>,
    /// Live writes the fence refused, and the health monitor's alarm: a refusal may mean a fence
    /// that cannot be right, which the monitor then looks at without waiting for its tick.
    pub(super) fenced: Arc<Fenced>,
    /// The primaries down now and the changes that missed them (see [`Reach`]).
    reach: Arc<Reach>,
}

impl Cache {
    /// Prepares the connection; it is made lazily, so a Redis that is down now is not an error.
    /// With the near cache on, a task (spawned here: call it within the runtime) hands it what
    /// Redis pushes.
    pub fn new(config: &Config) -> Result<Cache, CacheError> {
        let near = NearCache::new(config.cache.local_max_bytes).map(Arc::new);
        let (pushes, heard) = match near {
            Some(_) => {
                let (pushes, heard) = tokio::sync::mpsc::unbounded_channel();
                (Some(pushes), Some(heard))
            }
            None => (None, None),
        };
        let conn = conn::connect(config, pushes)
            .map_err(|e| CacheError::said(CacheErrorKind::Config, e))?;
        let tables: Vec<String> = config
            .tables
            .iter()
            .map(|(name, table)| table.prefix(name))
            .collect();
        let ttls = std::iter::once(config.cache.ttl_secs)
            .chain(
                config
                    .tables
                    .values()
                    .map(|t| t.ttl_secs.unwrap_or(config.cache.ttl_secs)),
            )
            .collect();
        let keys = Keys::new(
            &config.cache.key_prefix,
            &tables,
            config.redis.mode == RedisMode::Cluster,
        )
        .with_ttls(ttls);
        if let (Some(near), Some(heard)) = (&near, heard) {
            tokio::spawn(listen(near.clone(), keys.clone(), heard));
        }
        let router = Router::new(conn, keys, config.redis_timeout());
        let fenced = Arc::new(Fenced::new(router.confirmed.alarm().clone()));
        Ok(Cache {
            requests: Arc::new(Requests::new(router.clone(), near.clone())),
            router,
            near,
            fenced,
            reach: Arc::default(),
        })
    }

    pub(super) fn reach(&self) -> &Reach {
        &self.reach
    }

    /// Under Sentinel, drops the connection to the primary (found demoted): the next call asks
    /// the sentinels anew.
    pub(super) fn forget_primary(&self) {
        self.router.conn.forget_primary();
    }

    /// Which connection the calls go through now (see `Conn::generation`).
    pub(super) fn generation(&self) -> Option<u64> {
        self.router.conn.generation()
    }

    /// How many times the connection went to another server (see `Conn::moves`).
    pub(super) fn moves(&self) -> u64 {
        self.router.conn.moves()
    }

    /// Under Sentinel, the connection to the primary, made now if there is none.
    pub(super) async fn connect_primary(&self) -> Result<(), CacheError> {
        self.router.bulk(self.router.conn.connect()).await
    }

    /// Forgets the confirmations of `down` (see `confirm`): once they answer again, they are
    /// looked at before they answer reads.
    pub(super) fn forget_confirmed(&self, down: &[Primary]) {
        let down: Vec<&str> = down.iter().map(|p| p.address.as_str()).collect();
        self.router.confirmed.forget(&down);
    }

    /// Live writes refused by a fence so far (a fill that read before a TRUNCATE; every write
    /// while a fence is missing or wrong).
    pub fn fenced_refused(&self) -> u64 {
        self.fenced.refused()
    }

    /// Notified when the health monitor should look before its tick (one permit however many): a
    /// write was refused by a fence (which may be wrong), or a read by a connection not looked at
    /// since it was made.
    pub fn look_alarm(&self) -> &tokio::sync::Notify {
        &self.fenced.alarm
    }

    /// The key of the entry a Redis key holds, if it is one: under a table's prefix, not a
    /// fence or epoch of cacheward's.
    pub fn key_of(&self, redis_key: &[u8]) -> Option<Key> {
        self.router.keys.key_of(redis_key)
    }

    /// [`Cache::key_of`], borrowed from `redis_key`.
    pub fn key_ref_of<'a>(&self, redis_key: &'a [u8]) -> Option<KeyRef<'a>> {
        self.router.keys.key_ref_of(redis_key)
    }

    /// The Redis key of an entry: `cache.key_prefix` + its key (a user's: the username).
    pub fn redis_key(&self, key: &Key) -> String {
        self.router.keys.entry(key)
    }

    /// The prefix of `table`'s Redis keys.
    pub fn prefix_of(&self, table: TableId) -> &str {
        self.router.keys.prefix_of(table)
    }

    /// Where this cache's keys live.
    pub(super) fn keys(&self) -> &Keys {
        &self.router.keys
    }

    /// The slot of a user's key (0 for every key but on a Cluster).
    pub fn slot_of(&self, key: &Key) -> u16 {
        self.router.slot_of(key)
    }

    /// The fence guarding the entries of `slot` (one for all on a single server: the prefix
    /// itself, which no user's key is, since usernames are never empty; one per slot on a
    /// Cluster, kept in that slot, so that it moves with the entries it guards).
    ///
    /// A tombstone only guards a key that exists when it is written: a TRUNCATE, a resync, a
    /// repair overflow, a Redis restart or a FLUSHALL would each leave nothing to refuse a
    /// cache-aside fill (or a write-through, or a CDC batch) that read its row before them and
    /// lands after. So every live write carries `read_at`, the version horizon (`last_value` of
    /// `cacheward_version_seq`) read before its row, and Redis keeps one number here: a live write
    /// with `read_at` below it, or arriving while it is missing (Redis lost its data), is refused.
    /// Raising it to a horizon drawn after an event ([`Cache::drop_all`]) refuses every write that
    /// read before the event; the entries written before the raise are then dropped by a scan. A
    /// missing fence is set again only from a horizon drawn after it was seen missing
    /// ([`Cache::establish_fences`], by the health monitor), so a write that read before Redis
    /// lost its data is refused too.
    pub fn fence_key(&self, slot: u16) -> String {
        self.router.keys.fence(slot)
    }

    /// The fence the health monitor checks on `primary`: the one at its anchor slot.
    pub(super) fn fence_key_of(&self, primary: &Primary) -> String {
        self.fence_key(primary.anchor(&self.router.keys).unwrap_or(0))
    }

    /// The key that records which Redis process the cached data of a primary was written under
    /// (its `run_id`), kept in the primary's anchor slot ([`Primary::anchor`]). Data restored from
    /// a snapshot, or served by a promoted replica, carries the epoch of the process that wrote
    /// it, which is not the one answering: the writes made since the snapshot (tombstones, newer
    /// versions) may be missing, so nothing cached there can be trusted.
    pub fn epoch_key(&self, slot: u16) -> String {
        self.router.keys.epoch(slot)
    }

    /// The live entries of `keys` at least as new as their `min_versions` entry (an older one
    /// is `None`), in order: from the near cache where it holds one, else from Redis. Reads that arrive while
    /// another request-path call is in flight queue and go to Redis together, in one MGET per
    /// slot; what Redis tracks of them is kept in the near cache (see `store::redis::near`).
    pub async fn get_live_many(
        &self,
        keys: &[Key],
        min_versions: &[Option<i64>],
    ) -> Result<Vec<Option<Live>>, CacheError> {
        let mut found: Vec<Option<Live>> = vec![None; keys.len()];
        let asked: Vec<usize> = match &self.near {
            None => (0..keys.len()).collect(),
            Some(near) => (0..keys.len())
                .filter(|&i| {
                    let min_version = min_versions.get(i).copied().flatten();
                    let Some(hit) = near.get(&keys[i], min_version) else {
                        return true;
                    };
                    found[i] = Some(Live {
                        json: hit.json.to_string(),
                        version: hit.version,
                    });
                    false
                })
                .collect(),
        };
        if asked.is_empty() {
            return Ok(found);
        }
        let names: Vec<&Key> = asked.iter().map(|&i| &keys[i]).collect();
        // Taken before the read is queued: an invalidation handled from now on refuses its reply.
        let ticket = self.near.as_ref().map(|near| near.ticket(&names));
        let redis_keys = names.iter().map(|key| self.redis_key(key)).collect();
        let read = self.requests.read(redis_keys).await?;
        for (at, ((&i, value), tracked)) in
            asked.iter().zip(read.values).zip(read.tracked).enumerate()
        {
            if let (Some(near), Some(ticket), Some(live), true) =
                (&self.near, &ticket, &value, tracked)
            {
                near.keep(ticket, at, names[at], &live.json, live.version);
            }
            let min_version = min_versions.get(i).copied().flatten();
            found[i] = value.filter(|live| live.satisfies(min_version));
        }
        Ok(found)
    }

    /// Queues `writes` (cache-aside fills) behind the request-path calls already queued and ahead
    /// of every read queued after this call returns: those reads see the fill without waiting
    /// for it. The returned future tells what each write did.
    pub fn fill(
        &self,
        writes: Vec<Write>,
    ) -> impl std::future::Future<Output = Result<Vec<Outcome>, CacheError>> {
        // A near entry older than the fill must not answer the gets that follow this one's answer.
        self.invalidate_near_of(&writes);
        let fill = self.requests.fill(writes);
        let fenced = self.fenced.clone();
        async move {
            let outcomes = fill.await;
            if let Ok(outcomes) = &outcomes {
                fenced.count(outcomes);
            }
            outcomes
        }
    }

    /// Applies `writes` in one script call per slot (all at once); returns what each did.
    /// The near cache's entries of their names are invalidated before the writes are sent and
    /// again once they are answered (or failed): a read that raced them is never kept.
    pub async fn apply(&self, writes: &[Write]) -> Result<Vec<Outcome>, CacheError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        self.invalidate_near_of(writes);
        let applied = self.apply_now(writes).await;
        self.invalidate_near_of(writes);
        applied
    }

    async fn apply_now(&self, writes: &[Write]) -> Result<Vec<Outcome>, CacheError> {
        let slots = self.router.by_slot(writes.iter().map(Write::key));
        let cmds = slots
            .iter()
            .map(|(&slot, at)| {
                let carried: Vec<&Write> = at.iter().map(|&i| &writes[i]).collect();
                let keys = &self.router.keys;
                (slot, vec![scripts::apply(keys, slot, &carried)])
            })
            .collect();
        let mut all = vec![Outcome::Refused; writes.len()];
        for ((_, at), answer) in slots
            .into_iter()
            .zip(self.router.send_per_slot(cmds, self.router.timeout).await)
        {
            let value = answer?.pop().expect("one command, one answer");
            for (i, outcome) in at.into_iter().zip(outcomes(decode(value)?)) {
                all[i] = outcome;
            }
        }
        self.fenced.count(&all);
        Ok(all)
    }

    /// The primaries: the one server, or every Cluster primary (see [`Conn::primaries`]).
    pub async fn primaries(&self) -> Result<Vec<Primary>, CacheError> {
        self.router.primaries().await
    }

    /// A walk over every key under the prefix with SCAN (never KEYS), on every primary.
    pub fn scan(&self) -> Scan<'_> {
        self.router.scan()
    }

    /// Every table whose keys this cache knows: users, then the declared ones.
    pub fn tables(&self) -> Vec<TableId> {
        self.router.keys.tables()
    }

    /// [`Cache::scan`] of one table's keys.
    pub fn scan_table(&self, table: TableId) -> Scan<'_> {
        self.router.scan_table(table)
    }

    /// Fences off every write that read before `fence` (a horizon drawn after the event that
    /// made the cache untrustworthy: a TRUNCATE, lost history, lost writes), then drops every live
    /// entry under the prefix (see [`Cache::fence_key`]). Returns how many entries it dropped.
    /// Fails, changing nothing, while Redis has no fence: the health monitor sets one first.
    pub async fn drop_all(&self, fence: i64) -> Result<u64, CacheError> {
        let tables = self.router.keys.tables();
        self.drop_where(fence, |_| true, &tables).await
    }

    /// [`Cache::drop_all`] for the users' entries only (users' TRUNCATE): every fence is raised,
    /// declared tables' entries stay.
    pub async fn drop_users(&self, fence: i64) -> Result<u64, CacheError> {
        self.drop_where(fence, |_| true, &[TableId::USERS]).await
    }

    /// [`Cache::drop_all`] for one declared table's entries only (its TRUNCATE, its shape
    /// changed): its own fences are raised (`Keys::table_fence`), users' and the other tables'
    /// entries and fills are left alone.
    pub async fn drop_table(&self, fence: i64, table: TableId) -> Result<u64, CacheError> {
        self.drop_where(fence, |_| true, &[table]).await
    }

    /// [`Cache::drop_all`] for the entries of `slots` only (on one server, slot 0 is every
    /// entry): their fences are raised to `fence`, then their entries dropped.
    pub async fn drop_slots(&self, fence: i64, slots: &BTreeSet<u16>) -> Result<u64, CacheError> {
        let tables = self.router.keys.tables();
        self.drop_where(fence, |slot| slots.contains(&slot), &tables)
            .await
    }

    async fn drop_where(
        &self,
        fence: i64,
        within: impl Fn(u16) -> bool + Sync,
        tables: &[TableId],
    ) -> Result<u64, CacheError> {
        // Before, so that nothing read meanwhile is kept; after, so that nothing the drop's
        // invalidations have not reached yet is served.
        let flush = || match (&self.near, tables) {
            (Some(near), [table]) => near.flush_table(*table),
            _ => self.flush_near(),
        };
        flush();
        let dropped = self.router.drop_where(fence, within, tables).await;
        flush();
        if dropped
            .as_ref()
            .is_err_and(|e| e.kind() == CacheErrorKind::Unfenced)
        {
            self.fenced.missing_seen();
        }
        dropped
    }

    /// What the health monitor looks at on `primary`, in one round trip: its `run_id`, the epoch
    /// recorded there, and its fence. When the connection that answered is not the one confirmed
    /// (see `confirm`), it is looked at again and named in the same pipeline: the name to confirm
    /// once the monitor has acted on the look comes with it.
    pub(super) async fn look_at(
        &self,
        primary: &Primary,
    ) -> Result<(NodeState, Option<Confirmed>), CacheError> {
        let mut state = self.router.look_at(primary, None).await?;
        let confirmations = &self.router.confirmed;
        if confirmations.still(&primary.address, state.name.as_deref()) {
            state.at = self.router.conn.server_of(primary);
            return Ok((state, None));
        }
        let name = Confirmations::fresh_name();
        let mut state = self.router.look_at(primary, Some(&name)).await?;
        state.at = self.router.conn.server_of(primary);
        let confirmed = match state.named {
            true => Confirmed::Name(name),
            false => Confirmed::Ungated,
        };
        Ok((state, Some(confirmed)))
    }

    /// Lets the connections named by a look (`confirmed`) answer reads.
    pub(super) fn confirm(&self, confirmed: Vec<(String, Confirmed)>) {
        self.router.confirmed.confirm(confirmed);
    }

    /// Forgets the confirmations of every node but `primaries`.
    pub(super) fn confirm_only(&self, primaries: &[Primary]) {
        let current: Vec<&str> = primaries.iter().map(|p| p.address.as_str()).collect();
        self.router.confirmed.keep_only(&current);
    }

    /// Records `run_id` as the process the cached data of `primary` is written under, in `term`
    /// (see `Router::record_epoch`).
    pub(super) async fn record_epoch(
        &self,
        primary: &Primary,
        run_id: &str,
        term: Option<&str>,
    ) -> Result<(), CacheError> {
        self.router.record_epoch(primary, run_id, term).await
    }

    /// The `maxmemory-policy` of `primary`, or `None` where CONFIG is not allowed (managed
    /// services, ACLs).
    pub(super) async fn eviction_policy(&self, primary: &Primary) -> Option<String> {
        self.router.eviction_policy(primary).await
    }

    /// Sets every missing fence of `primary` to `horizon`; returns how many it set. `horizon`
    /// must have been drawn after a fence was seen missing.
    pub async fn establish_fences(
        &self,
        primary: &Primary,
        horizon: i64,
    ) -> Result<usize, CacheError> {
        self.router.establish_fences(primary, horizon).await
    }

    /// See [`Router::reset_fences`].
    pub(super) async fn reset_fences(
        &self,
        primary: &Primary,
        horizon: i64,
    ) -> Result<Vec<u16>, CacheError> {
        self.router.reset_fences(primary, horizon).await
    }

    /// Takes the cache as it is now (the dev seed's first write): sets every missing fence from
    /// `horizon`, drawn just before, and records each primary's `run_id` as its epoch.
    pub async fn claim(&self, horizon: i64) -> Result<(), CacheError> {
        for primary in self.primaries().await? {
            self.establish_fences(&primary, horizon).await?;
            let state = self.router.look_at(&primary, None).await?;
            if let Some(run_id) = state.run_id {
                self.record_epoch(&primary, &run_id, state.replid.as_deref())
                    .await?;
            }
        }
        Ok(())
    }

    /// Cluster mode: replaces the connection with a new one (see `topology::ClusterConn`); true
    /// if it did.
    pub fn renew_connection(&self) -> bool {
        self.router.conn.renew()
    }

    /// Sentinel mode: the task that follows `+switch-master` until `stop` (see
    /// `topology::SentinelConn::watch`).
    pub fn watch_sentinels(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        match &self.router.conn {
            Conn::Sentinel(sentinel) => Some(sentinel.clone().watch(stop)),
            _ => None,
        }
    }

    /// Sentinel mode: asks the sentinels where the primary is, and moves there if it moved.
    pub async fn follow_sentinels(&self) -> Result<(), CacheError> {
        match &self.router.conn {
            Conn::Sentinel(sentinel) => self.router.bulk(sentinel.follow()).await.map(drop),
            _ => Ok(()),
        }
    }

    /// Whether any key exists under the prefix.
    pub async fn any_entry(&self) -> Result<bool, CacheError> {
        self.router.any_entry().await
    }

    /// What is stored at the Redis keys of `keys`: strings as they are (live entries,
    /// tombstones, foreign strings), and whether a key holds another type.
    pub async fn get_raw(&self, keys: &[Key]) -> Result<Vec<Stored>, CacheError> {
        self.router.get_raw(keys).await
    }

    /// The id of the cache this Redis holds (prefix + NUL + `id`, a random id stored by the
    /// first daemon that asks): the CDC worker's consumer, so that daemons on one cache share
    /// one change stream however they reach it (two URLs to one server), and daemons on two
    /// caches never do. A Redis that lost its data gets a new one.
    pub async fn cache_id(&self) -> Result<String, CacheError> {
        let keys = &self.router.keys;
        let key = keys.cache_id();
        let slot = match keys.is_cluster() {
            true => super::keys::slot_of(key.as_bytes()),
            false => 0,
        };
        let cmd = scripts::cache_id(key, &crate::support::ids::random_id());
        self.one_in_slot(slot, cmd).await
    }

    /// Sends `cmd`, whose keys are all in `slot`, and decodes its answer.
    async fn one_in_slot<T: redis::FromRedisValue>(
        &self,
        slot: u16,
        cmd: redis::Cmd,
    ) -> Result<T, CacheError> {
        let answer = self
            .router
            .send_per_slot(vec![(slot, vec![cmd])], self.router.timeout)
            .await
            .pop()
            .expect("one slot, one answer")?;
        decode::<T>(answer.into_iter().next().expect("one command, one answer"))
    }

    /// Replaces the entry of `key` with a tombstone of `version` if Redis still holds exactly
    /// `found` there (a write since makes the replacement moot), and drops the near entry. The
    /// consistency checker's repair of an entry it found wrong beyond the window: a lost change,
    /// or a value written around the daemon (a version no row has included). Returns whether
    /// it replaced it.
    pub async fn replace_wrong(
        &self,
        key: &Key,
        found: &str,
        version: i64,
    ) -> Result<bool, CacheError> {
        let keys = &self.router.keys;
        let cmd = scripts::replace(
            keys.entry(key),
            found,
            &crate::model::entry::tombstone_json(version),
            keys.ttl(key.table()),
        );
        let replaced = self
            .one_in_slot::<i64>(self.router.slot_of(key), cmd)
            .await?
            == 1;
        self.forget_near(key);
        Ok(replaced)
    }
}
