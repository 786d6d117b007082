//! Redis: reads of live entries and versioned writes through one Lua script, so that cache-aside
//! fills, write-through sets and (later) CDC applies commute: an older version never overwrites a
//! newer one, whatever order they arrive in.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::oneshot;

use super::near::{NearCache, NearReport};
use super::topology::{self, Conn, Keys, Primary};
use crate::config::{Config, RedisMode};
use crate::user::User;
use crate::workqueue::WorkQueue;

/// Why a Redis call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// Redis cannot be reached or the connection broke.
    #[error("redis unavailable: {0}")]
    Down(String),
    /// The call did not answer within `redis.timeout_ms`: Redis is treated as down for this request.
    #[error("redis timed out after {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error (a script error, a wrong type): a bug or a foreign key.
    #[error("redis error: {0}")]
    Server(String),
    /// Redis has no fence (it lost its data): nothing can be fenced off until the health monitor
    /// sets one again.
    #[error("redis has no cache fence yet (it lost its data); retrying once the fence is set")]
    Unfenced,
}

impl From<redis::RedisError> for CacheError {
    fn from(e: redis::RedisError) -> Self {
        if matches!(
            e.kind(),
            redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
        ) {
            CacheError::Server(e.to_string())
        } else if is_tls(&e) {
            CacheError::Down(format!("TLS: {e}"))
        } else {
            CacheError::Down(e.to_string())
        }
    }
}

/// Whether a TLS failure (a handshake or certificate refused) is behind `e`: said as such, since
/// the driver's text ("received fatal alert: …") does not. The driver keeps its I/O errors behind
/// an opaque `Arc`, so rustls's own wording is what can be recognised.
fn is_tls(e: &redis::RedisError) -> bool {
    const RUSTLS_SAYS: [&str; 5] = [
        "received fatal alert",
        "invalid peer certificate",
        "peer is incompatible",
        "peer misbehaved",
        "TLS handshake",
    ];
    let text = e.to_string();
    RUSTLS_SAYS.iter().any(|says| text.contains(says))
}

/// One versioned write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Store the row's JSON unless Redis holds a version at least as new, or the row was read
    /// before the fence (see [`Cache::fence_key`]).
    Live {
        username: String,
        version: i64,
        json: String,
        /// The version horizon read before the row was: a fence above it refuses the write
        /// (see `Cache::fence_key`).
        read_at: i64,
    },
    /// Remove the entry, leaving a tombstone that refuses older live writes, unless Redis holds a
    /// newer version. `version` is at least the last version the name's row had.
    Tombstone { username: String, version: i64 },
}

impl Write {
    /// The live entry of `user`, whose row was read after the version horizon was `read_at`.
    pub fn live(user: &User, read_at: i64) -> Write {
        Write::Live {
            username: user.username.clone(),
            version: user.version,
            json: user.json.clone(),
            read_at,
        }
    }

    /// A tombstone for `username`: refuses every live write of a version up to `version`.
    pub fn tombstone(username: impl Into<String>, version: i64) -> Write {
        Write::Tombstone {
            username: username.into(),
            version,
        }
    }

    /// A tombstone one version below `user`'s row: removes every older entry and lets this very
    /// row (or a newer one) be filled. What an invalidation writes, and what [`Cache::drop_all`]
    /// turns each live entry into (in Lua: `DROP_SCRIPT`).
    pub fn below(user: &User) -> Write {
        Write::tombstone(user.username.clone(), user.version - 1)
    }

    pub fn username(&self) -> &str {
        match self {
            Write::Live { username, .. } | Write::Tombstone { username, .. } => username,
        }
    }
}

/// The one script every cache write goes through.
///
/// KEYS[1]: the fence. KEYS[i+1]: the key of write i. ARGV[1]: TTL in seconds. Write i takes
/// ARGV[3i-1]: its version, ARGV[3i]: its `read_at` ('' for a tombstone), ARGV[3i+1]: the live
/// JSON ('' for a tombstone). What is stored carries its version in a `version` field: a live user
/// JSON, or `{"tombstone":true,"version":N}`. A live write applies when newer than what is stored
/// and read at or after the fence (`Cache::fence_key`); a tombstone when at least as new (it removes the row of that
/// very version). A value that is not cacheward's (another type, or a string that is neither a live
/// entry nor a tombstone) is left alone.
/// Returns per key: 1 applied, 0 refused (Redis holds a newer version, or a tombstone of this
/// one), 2 nothing to do (this very version is live there already), 3 fenced (read before the
/// fence, or no fence), 4 foreign (the key holds a value that is not cacheward's).
const APPLY_SCRIPT: &str = r#"
local ttl = ARGV[1]
local fence = redis.pcall('GET', KEYS[1])
if type(fence) == 'string' then fence = tonumber(fence) else fence = nil end
local out = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  local n = i - 1
  local incoming = tonumber(ARGV[3 * n - 1])
  local value = ARGV[3 * n + 1]
  local live = value ~= ''
  if live and (fence == nil or tonumber(ARGV[3 * n]) < fence) then
    out[n] = 3
  else
    local current = redis.pcall('GET', key)
    local apply = true
    if type(current) == 'table' then
      out[n] = 4
      apply = false
    elseif type(current) == 'string' then
      local ok, stored = pcall(cjson.decode, current)
      local v = nil
      local tomb = false
      if ok and type(stored) == 'table' then
        v = tonumber(stored['version'])
        tomb = stored['tombstone'] == true
        if not tomb and stored['id'] == nil then v = nil end
      end
      if v == nil then
        out[n] = 4
        apply = false
      elseif live then
        apply = incoming > v
        if incoming == v and not tomb then out[n] = 2 end
      else
        apply = incoming >= v
      end
    end
    if apply then
      if not live then value = '{"tombstone":true,"version":' .. ARGV[3 * n - 1] .. '}' end
      redis.call('SET', key, value, 'EX', ttl)
      out[n] = 1
    elseif out[n] == nil then
      out[n] = 0
    end
  end
end
return out
"#;

/// Sets the fence (KEYS[1]) to ARGV[1] if it is missing; returns the fence. An error if the key
/// holds a value that is not a number (not cacheward's: it is left alone).
const ESTABLISH_FENCE_SCRIPT: &str = r#"
local f = redis.pcall('GET', KEYS[1])
if type(f) == 'table' then return redis.error_reply('fence key holds a value of another type') end
if f == false then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
if tonumber(f) == nil then return redis.error_reply('fence key holds a value that is not a number') end
return tonumber(f)
"#;

/// Raises the fence (KEYS[1]) to ARGV[1] if it is lower; returns the fence, or -1 when it is
/// missing (Redis lost its data: only a horizon drawn after that was seen may set it).
const RAISE_FENCE_SCRIPT: &str = r#"
local f = redis.pcall('GET', KEYS[1])
if type(f) ~= 'string' or tonumber(f) == nil then return -1 end
if tonumber(ARGV[1]) > tonumber(f) then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return tonumber(f)
"#;

/// Drops the live entries of KEYS (cacheward's own only): each becomes a tombstone one version
/// below its own ([`Write::below`]), so that no older write can land, while a fill that reads the
/// row after the fence may. ARGV[1]: TTL. Returns how many it dropped.
const DROP_SCRIPT: &str = r#"
local dropped = 0
for _, key in ipairs(KEYS) do
  local current = redis.pcall('GET', key)
  if type(current) == 'string' then
    local ok, stored = pcall(cjson.decode, current)
    if ok and type(stored) == 'table' and stored['tombstone'] == nil and stored['id'] ~= nil then
      local v = tonumber(stored['version'])
      if v then
        redis.call('SET', key, '{"tombstone":true,"version":' .. string.format('%d', v - 1) .. '}', 'EX', ARGV[1])
        dropped = dropped + 1
      end
    end
  end
end
return dropped
"#;

/// A live entry as the read path looks at it: a JSON object with an `id` and an integer
/// `version`. Anything else (a tombstone, a foreign value) is a miss.
#[derive(Deserialize)]
struct LiveProbe {
    id: Option<serde::de::IgnoredAny>,
    version: Option<i64>,
}

/// Whether a stored value is a live user entry (DESIGN 1.5) written by cacheward.
pub fn is_live(value: &str) -> bool {
    live_version(value).is_some()
}

/// The version of a stored value that is a live user entry; `None` for anything else.
pub fn live_version(value: &str) -> Option<i64> {
    // serde would also read a struct from an array: only an object counts.
    if !value.trim_start().starts_with('{') {
        return None;
    }
    let probe = serde_json::from_str::<LiveProbe>(value).ok()?;
    probe.id.and(probe.version)
}

/// A live entry as read from Redis: the user's JSON as stored, and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub json: String,
    pub version: i64,
}

impl Live {
    /// `value` if it is a live entry.
    pub fn of(value: String) -> Option<Live> {
        let version = live_version(&value)?;
        Some(Live {
            json: value,
            version,
        })
    }
}

/// Whether a stored value is cacheward's: a live entry or a tombstone.
pub fn is_ours(value: &str) -> bool {
    #[derive(Deserialize)]
    struct Tombstone {
        tombstone: bool,
        version: i64,
    }
    is_live(value)
        || (value.trim_start().starts_with('{')
            && serde_json::from_str::<Tombstone>(value)
                .is_ok_and(|t| t.tombstone && t.version != 0))
}

/// The Redis side of the cache: one multiplexed, auto-reconnecting connection shared by all tasks.
#[derive(Clone)]
pub struct Cache {
    conn: Conn,
    keys: Keys,
    /// Which primary serves which slot, on a Cluster (see [`Cache::send_per_slot`]).
    routes: Arc<std::sync::Mutex<Option<Arc<Routes>>>>,
    ttl_secs: u64,
    timeout: Duration,
    /// Request-path calls waiting to go to Redis together.
    ops: Arc<WorkQueue<Op>>,
    /// The near cache (`cache.local_max_bytes`), if on.
    near: Option<Arc<NearCache>>,
    /// Whether Redis refusing `CLIENT TRACKING` was said (once).
    tracking_refused: Arc<std::sync::atomic::AtomicBool>,
}

type Reply<T> = oneshot::Sender<Result<T, CacheError>>;

/// A request-path Redis call, queued.
enum Op {
    Read {
        keys: Vec<String>,
        reply: Reply<Read>,
    },
    Fill {
        writes: Vec<Write>,
        reply: Reply<Vec<Outcome>>,
    },
}

/// What a queued read found, per key: the live entry, and whether Redis tracks the read for the
/// near cache (it went on a connection that hands its pushes to it, right behind a `CLIENT
/// TRACKING ON` that was answered `OK`).
struct Read {
    values: Vec<Option<Live>>,
    tracked: Vec<bool>,
}

/// Hands the near cache what Redis pushes: `invalidate` drops the names it lists (everything when
/// it lists none: a FLUSHALL, a FLUSHDB); a connection lost or replaced drops everything.
async fn listen(
    near: Arc<NearCache>,
    prefix: String,
    mut heard: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
) {
    while let Some(push) = heard.recv().await {
        match push.kind {
            redis::PushKind::Invalidate => match push.data.first() {
                Some(redis::Value::Array(keys)) => {
                    for key in keys {
                        let name = match key {
                            redis::Value::BulkString(key) => key.strip_prefix(prefix.as_bytes()),
                            _ => None,
                        };
                        // Not a user's key (cacheward's fence or epoch, or another program's).
                        if let Some(Ok(name)) = name.map(std::str::from_utf8) {
                            near.invalidate(name);
                        }
                    }
                }
                _ => near.flush(),
            },
            redis::PushKind::Disconnection => near.flush(),
            _ => {}
        }
    }
}

/// `CLIENT TRACKING ON OPTIN NOLOOP`: Redis tells this connection of every change to a key it
/// read right after a `CLIENT CACHING YES` ([`caching`]: the request path's MGETs, and nothing
/// else), except the changes it makes itself.
///
/// OPTIN: without it every key the versioned-write script reads is tracked too, Redis's tracking
/// table grows with every name the daemon ever wrote, and each script call got 5 times slower
/// (a CDC backlog drained at 10 k/s instead of 65 k/s). NOLOOP: every write of a user's key the
/// daemon makes invalidates the near cache's entry itself, before it is sent and once it is
/// answered (`Cache::apply`, `Cache::fill`; a drop flushes everything), so it need not hear of it
/// again.
fn track() -> redis::Cmd {
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("TRACKING").arg("ON").arg("OPTIN").arg("NOLOOP");
    cmd
}

/// `CLIENT CACHING YES`: the next command's keys are tracked (see [`track`]).
fn caching() -> redis::Cmd {
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("CACHING").arg("YES");
    cmd
}

/// What one slot's commands answered, and whether they went on a connection whose pushes reach
/// the near cache.
type Sent = (Result<Vec<redis::Value>, CacheError>, bool);

/// Queued calls per pipeline (a read is at most `socket.max_inflight` keys). One pipeline is in
/// flight at a time: that is what orders a read queued after a fill behind it.
const PIPELINE_OPS: usize = 64;

fn abandoned() -> CacheError {
    CacheError::Down("the Redis call was abandoned".into())
}

fn decode<T: redis::FromRedisValue>(value: redis::Value) -> Result<T, CacheError> {
    if let redis::Value::ServerError(e) = value {
        return Err(CacheError::Server(e.to_string()));
    }
    redis::from_redis_value(value).map_err(|e| CacheError::Server(e.to_string()))
}

/// What one versioned write found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The same version was live there already (another path wrote it first).
    Current,
    /// Redis held a newer version, or a tombstone of this one: the write was stale.
    Refused,
    /// The row was read before the fence, or Redis has no fence (it lost its data): the write may
    /// be stale and was refused (see [`Cache::fence_key`]).
    Fenced,
    /// The key holds a value that is not cacheward's: it was left alone.
    Foreign,
}

fn outcomes(flags: Vec<i64>) -> Vec<Outcome> {
    flags
        .into_iter()
        .map(|flag| match flag {
            1 => Outcome::Applied,
            2 => Outcome::Current,
            3 => Outcome::Fenced,
            4 => Outcome::Foreign,
            _ => Outcome::Refused,
        })
        .collect()
}

/// The Cluster's primaries and, per slot, which of them serves it (as `CLUSTER SLOTS` said).
struct Routes {
    primaries: Vec<Primary>,
    owner: Box<[u16]>,
}

impl Routes {
    fn new(primaries: &[Primary]) -> Routes {
        let mut owner = vec![u16::MAX; topology::SLOTS].into_boxed_slice();
        for (p, primary) in primaries.iter().enumerate() {
            for &(from, to) in &primary.ranges {
                for slot in from..=to.min(topology::SLOTS as u16 - 1) {
                    owner[slot as usize] = p as u16;
                }
            }
        }
        Routes {
            primaries: primaries.to_vec(),
            owner,
        }
    }

    fn owner(&self, slot: u16) -> Option<usize> {
        match self.owner.get(slot as usize) {
            Some(&p) if p != u16::MAX => Some(p as usize),
            _ => None,
        }
    }
}

/// What the health monitor finds on one primary, in one round trip.
#[derive(Debug)]
pub struct NodeState {
    /// Its `run_id` (`None` where `INFO` is not allowed).
    pub run_id: Option<String>,
    /// The `run_id` recorded at its epoch key (see [`Cache::epoch_key`]).
    pub recorded: Option<String>,
    /// Its fence (the one at its anchor slot): `None` when missing (it lost its data); an error
    /// when the key holds a value that is not cacheward's.
    pub fence: Result<Option<i64>, String>,
    /// Another node answered (the anchor slot moved while the monitor looked): nothing of the
    /// above is this primary's; the next look tells.
    pub elsewhere: bool,
}

/// Bulk calls (a fence per slot, a drop per scan page) get this many request timeouts.
const BULK_TIMEOUTS: u32 = 20;

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
        let conn = topology::connect(config, pushes).map_err(CacheError::Down)?;
        let keys = Keys::new(
            &config.cache.key_prefix,
            config.redis.mode == RedisMode::Cluster,
        );
        if let (Some(near), Some(heard)) = (&near, heard) {
            tokio::spawn(listen(near.clone(), keys.prefix().to_owned(), heard));
        }
        Ok(Cache {
            conn,
            keys,
            routes: Default::default(),
            ttl_secs: config.cache.ttl_secs,
            timeout: config.redis_timeout(),
            ops: Arc::new(WorkQueue::serial()),
            near,
            tracking_refused: Default::default(),
        })
    }

    /// The near cache's figures (all zero when it is off).
    pub fn near_report(&self) -> NearReport {
        self.near
            .as_ref()
            .map(|near| near.report())
            .unwrap_or_default()
    }

    /// The near cache's entry of `username`, if it holds one (no hit counted).
    pub fn near_peek(&self, username: &str) -> Option<Live> {
        let hit = self.near.as_ref()?.peek(username)?;
        Some(Live {
            json: hit.json.to_string(),
            version: hit.version,
        })
    }

    /// Up to `n` usernames the near cache holds, spread by `seed`.
    pub fn near_sample(&self, n: usize, seed: u64) -> Vec<String> {
        self.near
            .as_ref()
            .map_or_else(Vec::new, |near| near.sample(n, seed))
    }

    /// Drops the near cache (Redis came back up: what it said meanwhile may be lost).
    pub fn flush_near(&self) {
        if let Some(near) = &self.near {
            near.flush();
        }
    }

    /// Says once that Redis refuses `CLIENT TRACKING`: nothing it reads can be kept then.
    fn tracking_refused(&self, e: &redis::ServerError) {
        if !self
            .tracking_refused
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "redis refuses CLIENT TRACKING: the near cache keeps nothing; allow it in the ACL (docs/operations.md)");
        }
    }

    /// Invalidates the near cache's entries of `usernames` (the daemon writes them).
    fn invalidate_near<'a>(&self, usernames: impl Iterator<Item = &'a str>) {
        if let Some(near) = &self.near {
            for name in usernames {
                near.invalidate(name);
            }
        }
    }

    /// The key of a user: `cache.key_prefix` + username.
    pub fn key(&self, username: &str) -> String {
        self.keys.user(username)
    }

    /// The slots `primary` serves where cacheward keeps keys (slot 0 alone on one server).
    pub fn slots_of(&self, primary: &Primary) -> Vec<u16> {
        primary.slots(&self.keys).collect()
    }

    /// The slot of a user's key (0 for every key but on a Cluster).
    pub fn slot_of(&self, username: &str) -> u16 {
        self.keys.slot(&self.key(username))
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
        self.keys.fence(slot)
    }

    /// The fence the health monitor checks on `primary`: the one at its anchor slot.
    pub fn fence_key_of(&self, primary: &Primary) -> String {
        self.fence_key(primary.anchor(&self.keys).unwrap_or(0))
    }

    /// The key that records which Redis process the cached data of a primary was written under
    /// (its `run_id`), kept in the primary's anchor slot ([`Primary::anchor`]). Data restored from
    /// a snapshot, or served by a promoted replica, carries the epoch of the process that wrote
    /// it, which is not the one answering: the writes made since the snapshot (tombstones, newer
    /// versions) may be missing, so nothing cached there can be trusted.
    pub fn epoch_key(&self, slot: u16) -> String {
        self.keys.epoch(slot)
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CacheError> {
        self.bounded_by(self.timeout, f).await
    }

    async fn bounded_by<T>(
        &self,
        timeout: Duration,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout(timeout, f).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(CacheError::Timeout(timeout)),
        }
    }

    /// The live entries of `usernames` at least as new as their `min_versions` entry (an older one
    /// is `None`), in order: from the near cache where it holds one, else from Redis. Reads that arrive while
    /// another request-path call is in flight queue and go to Redis together, in one MGET per
    /// slot; what Redis tracks of them is kept in the near cache (see `store::near`).
    pub async fn get_live_many(
        &self,
        usernames: &[&str],
        min_versions: &[Option<i64>],
    ) -> Result<Vec<Option<Live>>, CacheError> {
        let mut found: Vec<Option<Live>> = vec![None; usernames.len()];
        let asked: Vec<usize> = match &self.near {
            None => (0..usernames.len()).collect(),
            Some(near) => (0..usernames.len())
                .filter(|&i| {
                    let min_version = min_versions.get(i).copied().flatten();
                    let Some(hit) = near.get(usernames[i], min_version) else {
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
        let names: Vec<&str> = asked.iter().map(|&i| usernames[i]).collect();
        // Taken before the read is queued: an invalidation handled from now on refuses its reply.
        let ticket = self.near.as_ref().map(|near| near.ticket(&names));
        let (reply, answer) = oneshot::channel();
        self.queue(Op::Read {
            keys: names.iter().map(|name| self.key(name)).collect(),
            reply,
        });
        let read = answer.await.unwrap_or_else(|_| Err(abandoned()))?;
        for (at, ((&i, value), tracked)) in
            asked.iter().zip(read.values).zip(read.tracked).enumerate()
        {
            if let (Some(near), Some(ticket), Some(live), true) =
                (&self.near, &ticket, &value, tracked)
            {
                near.keep(ticket, at, names[at], &live.json, live.version);
            }
            let min_version = min_versions.get(i).copied().flatten();
            found[i] = value.filter(|live| min_version.is_none_or(|min| live.version >= min));
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
        self.invalidate_near(writes.iter().map(Write::username));
        let (reply, answer) = oneshot::channel();
        self.queue(Op::Fill { writes, reply });
        async move { answer.await.unwrap_or_else(|_| Err(abandoned())) }
    }

    fn queue(&self, op: Op) {
        self.ops.push(op);
        self.start_pipeline();
    }

    fn start_pipeline(&self) {
        if let Some(slot) = self.ops.claim() {
            let cache = self.clone();
            tokio::spawn(async move {
                let ops = cache.ops.gather(PIPELINE_OPS).await;
                if !ops.is_empty() {
                    cache.run_pipeline(ops).await;
                }
                drop(slot);
                cache.start_pipeline();
            });
        }
    }

    /// Sends queued operations as one pipeline per slot (one in all on a single server), each in
    /// queue order; consecutive reads of a slot become one MGET.
    ///
    /// Read-your-fill per node: a fill and a read queued after it either go in one batch, where
    /// the read's key is in the fill's slot's pipeline behind it (one slot is served by one node,
    /// which runs a pipeline in order), or in a later batch, which starts only once every
    /// pipeline of this one was answered.
    async fn run_pipeline(&self, ops: Vec<Op>) {
        /// Where one command's answer goes: the (op, index) of each key an MGET read, or the
        /// writes of one op a fill script carried.
        enum Part {
            /// `CLIENT TRACKING ON ...`, ahead of a slot's first read when the near cache is on.
            Track,
            /// `CLIENT CACHING YES`, right ahead of each of those reads.
            Caching,
            Read(Vec<(usize, usize)>),
            Fill(usize, Vec<usize>),
        }
        #[derive(Default)]
        struct SlotPipe {
            cmds: Vec<redis::Cmd>,
            parts: Vec<Part>,
        }
        enum Answer {
            Read(Reply<Read>, Read),
            Fill(Reply<Vec<Outcome>>, Vec<Outcome>),
        }
        // One look at the slot owners for the whole batch: a slot that carries `CLIENT TRACKING ON`
        // is sent where that look says.
        let routes = self.routes();
        let mut slots: std::collections::BTreeMap<u16, SlotPipe> = Default::default();
        let mut answers: Vec<(Answer, Option<CacheError>)> = Vec::with_capacity(ops.len());
        for (op, queued) in ops.into_iter().enumerate() {
            match queued {
                Op::Read { keys, reply } => {
                    for (at, key) in keys.iter().enumerate() {
                        let slot = self.keys.slot(key);
                        let pipe = slots.entry(slot).or_default();
                        // Never through the Cluster driver: its connections hand pushes to no one
                        // (they speak RESP2, where an invalidation would land in the reply stream).
                        let reaches_near = !self.keys.is_cluster()
                            || routes.as_ref().is_some_and(|r| r.owner(slot).is_some());
                        let tracking = self.near.is_some() && reaches_near;
                        if tracking && !matches!(pipe.parts.first(), Some(Part::Track)) {
                            pipe.cmds.insert(0, track());
                            pipe.parts.insert(0, Part::Track);
                        }
                        if !matches!(pipe.parts.last(), Some(Part::Read(_))) {
                            if tracking {
                                pipe.cmds.push(caching());
                                pipe.parts.push(Part::Caching);
                            }
                            pipe.cmds.push(redis::cmd("MGET"));
                            pipe.parts.push(Part::Read(Vec::new()));
                        }
                        pipe.cmds.last_mut().expect("pushed above").arg(key);
                        if let Some(Part::Read(targets)) = pipe.parts.last_mut() {
                            targets.push((op, at));
                        }
                    }
                    let read = Read {
                        values: vec![None; keys.len()],
                        tracked: vec![false; keys.len()],
                    };
                    answers.push((Answer::Read(reply, read), None));
                }
                Op::Fill { writes, reply } => {
                    // Refuses the near cache every read asked for before now: one ahead of the
                    // fill in this pipeline reads what the fill replaces.
                    self.invalidate_near(writes.iter().map(Write::username));
                    for (slot, at) in self.by_slot(writes.iter().map(|w| w.username())) {
                        let pipe = slots.entry(slot).or_default();
                        let carried: Vec<&Write> = at.iter().map(|&i| &writes[i]).collect();
                        pipe.cmds.push(self.apply_cmd(slot, &carried));
                        pipe.parts.push(Part::Fill(op, at));
                    }
                    let none = vec![Outcome::Refused; writes.len()];
                    answers.push((Answer::Fill(reply, none), None));
                }
            }
        }
        let (parts, cmds): (Vec<_>, Vec<_>) = slots
            .into_iter()
            .map(|(slot, pipe)| (pipe.parts, (slot, pipe.cmds)))
            .unzip();
        let sent = self.send_per_slot_via(cmds, routes, self.timeout).await;
        for (parts, (values, pushed)) in parts.into_iter().zip(sent) {
            let values = match values {
                Ok(values) => values,
                Err(e) => {
                    for part in parts {
                        match part {
                            Part::Track | Part::Caching => {}
                            Part::Read(targets) => {
                                for (op, _) in targets {
                                    answers[op].1.get_or_insert_with(|| e.clone());
                                }
                            }
                            Part::Fill(op, _) => {
                                answers[op].1.get_or_insert_with(|| e.clone());
                            }
                        }
                    }
                    continue;
                }
            };
            // Whether this slot's connection tracks for the near cache, and the next read.
            let (mut tracking, mut caching) = (false, false);
            for (part, value) in parts.into_iter().zip(values) {
                let tracked = std::mem::take(&mut caching) && tracking;
                match part {
                    Part::Track => {
                        tracking = pushed && value == redis::Value::Okay;
                        if let redis::Value::ServerError(e) = &value {
                            self.tracking_refused(e);
                        }
                    }
                    Part::Caching => caching = value == redis::Value::Okay,
                    Part::Read(targets) => match decode::<Vec<Option<String>>>(value) {
                        Ok(found) => {
                            for ((op, at), value) in targets.into_iter().zip(found) {
                                if let Answer::Read(_, read) = &mut answers[op].0 {
                                    read.values[at] = value.and_then(Live::of);
                                    read.tracked[at] = tracked;
                                }
                            }
                        }
                        Err(e) => {
                            for (op, _) in targets {
                                answers[op].1.get_or_insert_with(|| e.clone());
                            }
                        }
                    },
                    Part::Fill(op, at) => match decode::<Vec<i64>>(value).map(outcomes) {
                        Ok(found) => {
                            if let Answer::Fill(_, outcomes) = &mut answers[op].0 {
                                for (i, outcome) in at.into_iter().zip(found) {
                                    outcomes[i] = outcome;
                                }
                            }
                        }
                        Err(e) => {
                            answers[op].1.get_or_insert(e);
                        }
                    },
                }
            }
        }
        for (answer, failed) in answers {
            match answer {
                Answer::Read(reply, read) => {
                    let _ = reply.send(failed.map_or(Ok(read), Err));
                }
                Answer::Fill(reply, outcomes) => {
                    let _ = reply.send(failed.map_or(Ok(outcomes), Err));
                }
            }
        }
    }

    /// The positions of `usernames` by the slot of their key, in slot order (one group on a
    /// single server).
    fn by_slot<'a>(
        &self,
        usernames: impl Iterator<Item = &'a str>,
    ) -> std::collections::BTreeMap<u16, Vec<usize>> {
        let mut slots: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
        for (i, name) in usernames.enumerate() {
            slots
                .entry(self.keys.slot(&self.key(name)))
                .or_default()
                .push(i);
        }
        slots
    }

    /// Applies `writes` in one script call per slot (all at once); returns what each did.
    /// The near cache's entries of their names are invalidated before the writes are sent and
    /// again once they are answered (or failed): a read that raced them is never kept.
    pub async fn apply(&self, writes: &[Write]) -> Result<Vec<Outcome>, CacheError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        self.invalidate_near(writes.iter().map(Write::username));
        let applied = self.apply_now(writes).await;
        self.invalidate_near(writes.iter().map(Write::username));
        applied
    }

    async fn apply_now(&self, writes: &[Write]) -> Result<Vec<Outcome>, CacheError> {
        let slots = self.by_slot(writes.iter().map(|w| w.username()));
        let cmds = slots
            .iter()
            .map(|(&slot, at)| {
                let carried: Vec<&Write> = at.iter().map(|&i| &writes[i]).collect();
                (slot, vec![self.apply_cmd(slot, &carried)])
            })
            .collect();
        let mut all = vec![Outcome::Refused; writes.len()];
        for ((_, at), answer) in slots
            .into_iter()
            .zip(self.send_per_slot(cmds, self.timeout).await)
        {
            let value = answer?.pop().expect("one command, one answer");
            for (i, outcome) in at.into_iter().zip(outcomes(decode(value)?)) {
                all[i] = outcome;
            }
        }
        Ok(all)
    }

    /// Sends each slot's commands in order, as few pipelines as the topology allows: on a
    /// Cluster whose slot owners the health monitor has seen, one pipeline per primary (its
    /// slots' commands one after another; each command names keys of one slot), all at once;
    /// otherwise one per slot (the driver routes each). One server: one pipeline. Answers per
    /// slot, in the order given; a pipeline that failed fails each of its slots.
    async fn send_per_slot(
        &self,
        slots: Vec<(u16, Vec<redis::Cmd>)>,
        timeout: Duration,
    ) -> Vec<Result<Vec<redis::Value>, CacheError>> {
        let sent = self.send_per_slot_via(slots, self.routes(), timeout).await;
        sent.into_iter().map(|(answer, _)| answer).collect()
    }

    /// [`Cache::send_per_slot`], also telling per slot whether its pipeline went on a connection
    /// that hands its pushes to the near cache (the one server, Sentinel's primary, a Cluster
    /// node's own connection; not the Cluster driver's).
    async fn send_per_slot_via(
        &self,
        slots: Vec<(u16, Vec<redis::Cmd>)>,
        routes: Option<Arc<Routes>>,
        timeout: Duration,
    ) -> Vec<Sent> {
        // (primary, the positions of its slots in `slots`); no primary: the driver routes.
        let mut groups: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
        for (i, (slot, _)) in slots.iter().enumerate() {
            match routes.as_ref().and_then(|r| r.owner(*slot)) {
                Some(p) => match groups.iter_mut().find(|(g, _)| *g == Some(p)) {
                    Some((_, members)) => members.push(i),
                    None => groups.push((Some(p), vec![i])),
                },
                None => groups.push((None, vec![i])),
            }
        }
        let n = slots.len();
        let mut cmds: Vec<Option<Vec<redis::Cmd>>> =
            slots.into_iter().map(|(_, cmds)| Some(cmds)).collect();
        let sent = groups.into_iter().map(|(primary, members)| {
            let mut pipeline = redis::pipe();
            pipeline.ignore_errors();
            let mut counts = Vec::with_capacity(members.len());
            for &i in &members {
                let taken = cmds[i].take().unwrap_or_default();
                counts.push(taken.len());
                for cmd in taken {
                    pipeline.add_command(cmd);
                }
            }
            let (mut conn, routes) = (self.conn.clone(), routes.clone());
            async move {
                let total: usize = counts.iter().sum();
                let answered = match (primary, &routes) {
                    (Some(p), Some(r)) => {
                        self.bounded_by(timeout, conn.on(&r.primaries[p], &pipeline))
                            .await
                    }
                    _ => {
                        let query = pipeline.query_async::<Vec<redis::Value>>(&mut conn);
                        self.bounded_by(timeout, query).await
                    }
                };
                let answered = answered.and_then(|values| match values.len() == total {
                    true => Ok(values),
                    false => Err(CacheError::Server(format!(
                        "a pipeline of {total} commands answered {} values",
                        values.len()
                    ))),
                });
                let pushed = primary.is_some() || !self.keys.is_cluster();
                (members, counts, answered, pushed)
            }
        });
        let mut out: Vec<Option<Sent>> = (0..n).map(|_| None).collect();
        for (members, counts, answered, pushed) in futures::future::join_all(sent).await {
            match answered {
                Ok(values) => {
                    let mut values = values.into_iter();
                    for (i, n) in members.into_iter().zip(counts) {
                        out[i] = Some((Ok(values.by_ref().take(n).collect()), pushed));
                    }
                }
                Err(e) => {
                    for i in members {
                        out[i] = Some((Err(e.clone()), pushed));
                    }
                }
            }
        }
        out.into_iter()
            .map(|answer| answer.expect("every slot was sent"))
            .collect()
    }

    /// Which primary serves which slot, as last seen ([`Cache::primaries`]); `None` but on a
    /// Cluster that was looked at.
    fn routes(&self) -> Option<Arc<Routes>> {
        self.routes
            .lock()
            .expect("routes lock is never poisoned")
            .clone()
    }

    /// The script call applying `writes`, all of whose keys are in `slot`. EVAL with the body
    /// rather than EVALSHA: the script is small, Redis caches it by digest, and no call ever fails
    /// with NOSCRIPT (after a restart, a failover, or inside a pipeline).
    fn apply_cmd(&self, slot: u16, writes: &[&Write]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(APPLY_SCRIPT)
            .arg(writes.len() + 1)
            .arg(self.fence_key(slot));
        for write in writes {
            cmd.arg(self.key(write.username()));
        }
        cmd.arg(self.ttl_secs);
        for write in writes {
            match write {
                Write::Live {
                    version,
                    json,
                    read_at,
                    ..
                } => cmd.arg(*version).arg(*read_at).arg(json.as_str()),
                Write::Tombstone { version, .. } => cmd.arg(*version).arg("").arg(""),
            };
        }
        cmd
    }

    /// The primaries: the one server, or every Cluster primary (see [`Conn::primaries`]).
    pub async fn primaries(&self) -> Result<Vec<Primary>, CacheError> {
        let mut conn = self.conn.clone();
        let primaries = self.bounded(conn.primaries()).await?;
        if self.keys.is_cluster() {
            let routes = Routes::new(&primaries);
            *self.routes.lock().expect("routes lock is never poisoned") = Some(Arc::new(routes));
        }
        Ok(primaries)
    }

    /// A walk over every key under the prefix with SCAN (never KEYS), on every primary.
    pub fn scan(&self) -> Scan<'_> {
        Scan {
            cache: self,
            pattern: format!("{}*", glob_escape(self.keys.prefix())),
            primaries: None,
            at: None,
        }
    }

    /// Fences off every write that read before `fence` (a horizon drawn after the event that
    /// made the cache untrustworthy: a TRUNCATE, lost history, lost writes), then drops every live
    /// entry under the prefix (see [`Cache::fence_key`]). Returns how many entries it dropped.
    /// Fails, changing nothing, while Redis has no fence: the health monitor sets one first.
    pub async fn drop_all(&self, fence: i64) -> Result<u64, CacheError> {
        self.drop_where(fence, |_| true).await
    }

    /// [`Cache::drop_all`] for the entries of `slots` only (on one server, slot 0 is every
    /// entry): their fences are raised to `fence`, then their entries dropped.
    pub async fn drop_slots(&self, fence: i64, slots: &BTreeSet<u16>) -> Result<u64, CacheError> {
        self.drop_where(fence, |slot| slots.contains(&slot)).await
    }

    async fn drop_where(
        &self,
        fence: i64,
        within: impl Fn(u16) -> bool,
    ) -> Result<u64, CacheError> {
        self.flush_near();
        let dropped = self.drop_now(fence, within).await;
        self.flush_near();
        dropped
    }

    async fn drop_now(&self, fence: i64, within: impl Fn(u16) -> bool) -> Result<u64, CacheError> {
        for primary in self.primaries().await? {
            let slots: Vec<u16> = primary.slots(&self.keys).filter(|&s| within(s)).collect();
            for now in self
                .fence_scripts(&primary, &slots, RAISE_FENCE_SCRIPT, fence)
                .await?
            {
                if now < 0 {
                    return Err(CacheError::Unfenced);
                }
            }
        }
        let mut dropped = 0u64;
        let mut scan = self.scan();
        while let Some(names) = scan.next_page().await? {
            let cmds = self
                .by_slot(names.iter().map(String::as_str))
                .into_iter()
                .filter(|(slot, _)| within(*slot))
                .map(|(slot, at)| {
                    let mut drop = redis::cmd("EVAL");
                    drop.arg(DROP_SCRIPT).arg(at.len());
                    for i in at {
                        drop.arg(self.key(&names[i]));
                    }
                    drop.arg(self.ttl_secs);
                    (slot, vec![drop])
                })
                .collect();
            let bound = self.timeout * BULK_TIMEOUTS;
            for answer in self.send_per_slot(cmds, bound).await {
                for value in answer? {
                    dropped += decode::<u64>(value)?;
                }
            }
        }
        Ok(dropped)
    }

    /// Runs a fence script (ARGV[1] = `value`) on the fence of each of `slots`, all served by
    /// `primary`, in one pipeline; returns what each answered.
    async fn fence_scripts(
        &self,
        primary: &Primary,
        slots: &[u16],
        script: &str,
        value: i64,
    ) -> Result<Vec<i64>, CacheError> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for &slot in slots {
            pipe.cmd("EVAL")
                .arg(script)
                .arg(1)
                .arg(self.fence_key(slot))
                .arg(value);
        }
        let mut conn = self.conn.clone();
        let values = self
            .bounded_by(self.timeout * BULK_TIMEOUTS, conn.on(primary, &pipe))
            .await?;
        values.into_iter().map(decode).collect()
    }

    /// What the health monitor looks at on `primary`, in one round trip: its `run_id`, the epoch
    /// recorded there, and its fence.
    pub async fn look_at(&self, primary: &Primary) -> Result<NodeState, CacheError> {
        let anchor = primary.anchor(&self.keys).unwrap_or(0);
        let mut pipe = redis::pipe();
        pipe.cmd("INFO")
            .arg("server")
            .cmd("GET")
            .arg(self.epoch_key(anchor))
            .cmd("GET")
            .arg(self.fence_key(anchor));
        if self.keys.is_cluster() {
            // A slot that moved makes the driver send the whole pipeline to its new owner: the
            // node id tells who answered.
            pipe.cmd("CLUSTER").arg("MYID");
        }
        let mut conn = self.conn.clone();
        let mut values = self.bounded(conn.on(primary, &pipe)).await?;
        let elsewhere = match self.keys.is_cluster() {
            true => values
                .pop()
                .and_then(|id| redis::from_redis_value::<String>(id).ok())
                .is_none_or(|id| id != primary.id),
            false => false,
        };
        // The anchor slot is moving or moved away: the epoch and fence there are not this
        // primary's to judge now.
        let elsewhere = elsewhere
            || values.iter().any(|v| {
                matches!(v, redis::Value::ServerError(e)
                    if matches!(e.code(), "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN"))
            });
        let [info, recorded, fence]: [redis::Value; 3] =
            values.try_into().map_err(|v: Vec<_>| {
                CacheError::Server(format!("3 commands answered {} values", v.len()))
            })?;
        // Anything but a string there (another type, put by someone else) records nothing: the
        // data is distrusted once and the key overwritten.
        let recorded = redis::from_redis_value::<Option<String>>(recorded).unwrap_or(None);
        let run_id = match info {
            redis::Value::ServerError(_) => None,
            info => redis::from_redis_value::<String>(info)
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("run_id:"))
                        .map(|id| id.trim().to_owned())
                }),
        };
        let fence = match fence {
            redis::Value::ServerError(e) => Err(e.to_string()),
            value => match redis::from_redis_value::<Option<String>>(value) {
                Ok(None) => Ok(None),
                Ok(Some(v)) => v
                    .parse()
                    .map(Some)
                    .map_err(|_| "the fence key holds a value that is not cacheward's".to_owned()),
                Err(_) => Err("the fence key holds a value of another type".to_owned()),
            },
        };
        Ok(NodeState {
            run_id,
            recorded,
            fence,
            elsewhere,
        })
    }

    /// Records `run_id` as the process the cached data of `primary` is written under.
    pub async fn record_epoch(&self, primary: &Primary, run_id: &str) -> Result<(), CacheError> {
        let anchor = primary.anchor(&self.keys).unwrap_or(0);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.epoch_key(anchor)).arg(run_id);
        let mut conn = self.conn.clone();
        let values = self.bounded(conn.on(primary, &pipe)).await?;
        values.into_iter().try_for_each(decode::<()>)
    }

    /// The `maxmemory-policy` of `primary`, or `None` where CONFIG is not allowed (managed
    /// services, ACLs).
    pub async fn eviction_policy(&self, primary: &Primary) -> Option<String> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let value = self.bounded(conn.on_one(primary, &cmd)).await.ok()?;
        // A map in RESP3 (the near cache's connections), a flat list in RESP2.
        match value {
            redis::Value::Map(pairs) => pairs
                .into_iter()
                .next()
                .and_then(|(_, policy)| decode(policy).ok()),
            value => decode::<Vec<String>>(value).ok()?.into_iter().nth(1),
        }
    }

    /// Sets every missing fence of `primary` to `horizon`; returns how many it set. `horizon`
    /// must have been drawn after a fence was seen missing.
    pub async fn establish_fences(
        &self,
        primary: &Primary,
        horizon: i64,
    ) -> Result<usize, CacheError> {
        let slots = self.slots_of(primary);
        let now = self
            .fence_scripts(primary, &slots, ESTABLISH_FENCE_SCRIPT, horizon)
            .await?;
        Ok(now.into_iter().filter(|&f| f == horizon).count())
    }

    /// Takes the cache as it is now (the dev seed's first write): sets every missing fence from
    /// `horizon`, drawn just before, and records each primary's `run_id` as its epoch.
    pub async fn claim(&self, horizon: i64) -> Result<(), CacheError> {
        for primary in self.primaries().await? {
            self.establish_fences(&primary, horizon).await?;
            if let Some(run_id) = self.look_at(&primary).await?.run_id {
                self.record_epoch(&primary, &run_id).await?;
            }
        }
        Ok(())
    }

    /// Cluster mode: replaces the connection with a new one (see `topology::ClusterConn`); true
    /// if it did.
    pub fn renew_connection(&self) -> bool {
        self.conn.renew()
    }

    /// Sentinel mode: the task that follows `+switch-master` until `stop` (see
    /// `topology::SentinelConn::watch`).
    pub fn watch_sentinels(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        match &self.conn {
            Conn::Sentinel(sentinel) => Some(sentinel.clone().watch(stop)),
            _ => None,
        }
    }

    /// Sentinel mode: asks the sentinels where the primary is, and moves there if it moved.
    pub async fn follow_sentinels(&self) -> Result<(), CacheError> {
        match &self.conn {
            Conn::Sentinel(sentinel) => {
                let follow = sentinel.follow();
                self.bounded_by(self.timeout * BULK_TIMEOUTS, follow)
                    .await
                    .map(drop)
            }
            _ => Ok(()),
        }
    }

    /// Whether any key exists under the prefix.
    pub async fn any_entry(&self) -> Result<bool, CacheError> {
        let mut scan = self.scan();
        while let Some(names) = scan.next_page().await? {
            if !names.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// What is stored at the keys of `usernames`: strings as they are (live entries, tombstones,
    /// foreign strings), and whether a key holds another type.
    pub async fn get_raw(&self, usernames: &[String]) -> Result<Vec<Stored>, CacheError> {
        if usernames.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = usernames.iter().map(|u| self.key(u)).collect();
        let mut conn = self.conn.clone();
        // One MGET; a Cluster connection splits it by slot.
        let values: Vec<Option<String>> = self
            .bounded_by(
                self.timeout * BULK_TIMEOUTS,
                redis::cmd("MGET").arg(&keys).query_async(&mut conn),
            )
            .await?;
        // MGET answers nil for a key of another type: ask those keys their type.
        let absent: Vec<usize> = (0..keys.len()).filter(|&i| values[i].is_none()).collect();
        let types = futures::future::join_all(absent.iter().map(|&i| {
            let mut conn = self.conn.clone();
            let key = &keys[i];
            async move {
                self.bounded(redis::cmd("TYPE").arg(key).query_async::<String>(&mut conn))
                    .await
            }
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<String>, _>>()?;
        let mut types = absent.into_iter().zip(types).peekable();
        Ok(values
            .into_iter()
            .enumerate()
            .map(|(i, value)| match value {
                Some(text) => Stored::String(text),
                None => match types.next_if(|(at, _)| *at == i) {
                    Some((_, kind)) if kind != "none" && kind != "string" => Stored::Other,
                    _ => Stored::Missing,
                },
            })
            .collect())
    }
}

/// A SCAN over every primary, page by page (see [`Cache::scan`]).
pub struct Scan<'a> {
    cache: &'a Cache,
    pattern: String,
    /// The primaries not walked yet (asked for at the first page).
    primaries: Option<std::vec::IntoIter<Primary>>,
    /// The primary being walked and the cursor to go on from.
    at: Option<(Primary, u64)>,
}

impl Scan<'_> {
    /// The names of the next page (perhaps none), or `None` once every primary was walked.
    pub async fn next_page(&mut self) -> Result<Option<Vec<String>>, CacheError> {
        let cache = self.cache;
        if self.primaries.is_none() {
            self.primaries = Some(cache.primaries().await?.into_iter());
        }
        let (primary, cursor) = loop {
            if let Some(at) = self.at.take() {
                break at;
            }
            match self.primaries.as_mut().and_then(Iterator::next) {
                Some(p) if p.anchor(&cache.keys).is_some() => break (p, 0),
                Some(_) => continue,
                None => return Ok(None),
            }
        };
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let mut conn = cache.conn.clone();
        let value = cache.bounded(conn.on_one(&primary, &scan)).await?;
        let (next, keys): (u64, Vec<String>) = decode(value)?;
        if next != 0 {
            self.at = Some((primary, next));
        }
        let prefix = cache.keys.prefix();
        Ok(Some(
            keys.into_iter()
                .filter_map(|k| k.strip_prefix(prefix).map(str::to_owned))
                // The prefix alone is a fence, prefix + NUL a fence or an epoch: no user's.
                .filter(|name| !name.is_empty() && !name.starts_with('\0'))
                .collect(),
        ))
    }
}

/// What a key holds, as `verify` looks at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Missing,
    String(String),
    /// A hash, a list, a set…: not cacheward's.
    Other,
}

/// Keys asked for per SCAN step.
const SCAN_COUNT: usize = 1000;

/// Escapes Redis glob metacharacters so that a prefix matches only itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hostile_pushes_drop_what_they_name_or_everything_never_more_than_theirs() {
        use redis::{PushInfo, PushKind, Value};
        let near = Arc::new(NearCache::new(1 << 20).unwrap());
        let hold = |name: &str| {
            let ticket = near.ticket(&[name]);
            assert!(near.keep(&ticket, 0, name, r#"{"id":1,"version":1}"#, 1));
        };
        // Hands `pushes` to the near cache and waits until they are all handled.
        let hear = |pushes: Vec<(PushKind, Vec<Value>)>| {
            let (sender, heard) = tokio::sync::mpsc::unbounded_channel();
            for (kind, data) in pushes {
                sender.send(PushInfo { kind, data }).unwrap();
            }
            listen(near.clone(), "user:".into(), heard)
        };
        let keys = |keys: &[&[u8]]| {
            let keys = keys.iter().map(|k| Value::BulkString(k.to_vec())).collect();
            vec![Value::Array(keys)]
        };
        hold("ann");
        hold("bob");
        // Keys of others, not strings, not UTF-8, the prefix alone: nothing of ours is named.
        let mut odd = keys(&[b"other:ann", b"user:\xff\xfe", b"user:"]);
        if let Value::Array(keys) = &mut odd[0] {
            keys.extend([Value::Int(5), Value::Nil]);
        }
        hear(vec![
            (PushKind::Invalidate, odd),
            (PushKind::Message, keys(&[b"user:ann"])),
            (PushKind::Other("invalidate".into()), keys(&[b"user:ann"])),
        ])
        .await;
        assert!(near.get("ann", None).is_some() && near.get("bob", None).is_some());
        // One of ours: that one only.
        hear(vec![(PushKind::Invalidate, keys(&[b"user:ann"]))]).await;
        assert!(near.get("ann", None).is_none() && near.get("bob", None).is_some());
        // An invalidation that names no keys in the expected shape, a lost connection: all goes.
        for data in [vec![Value::Nil], vec![], vec![Value::Int(1)]] {
            hold("ann");
            hear(vec![(PushKind::Invalidate, data)]).await;
            assert_eq!(near.report().entries, 0);
        }
        hold("ann");
        hear(vec![(PushKind::Disconnection, vec![])]).await;
        assert_eq!(near.report().entries, 0);
    }

    #[test]
    fn live_entries_are_objects_with_an_id() {
        assert!(is_live(
            r#"{"id":1,"username":"a","created_at":"x","version":3}"#
        ));
        assert!(!is_live(r#"{"tombstone":true,"version":3}"#));
        assert!(!is_live("garbage"));
        assert!(!is_live("[1]"));
        assert!(!is_live(r#"{"id":null,"username":"a"}"#));
    }

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(glob_escape("user:"), "user:");
        assert_eq!(glob_escape("a*b?[c]"), "a\\*b\\?\\[c\\]");
    }

    #[test]
    fn tombstones_carry_the_removed_version_or_one_below_the_current_row() {
        let user = User {
            username: "a".into(),
            version: 7,
            json: "{}".into(),
        };
        // A deletion's tombstone refuses the deleted row itself (and everything older).
        assert_eq!(
            Write::tombstone("a", 7),
            Write::Tombstone {
                username: "a".into(),
                version: 7
            }
        );
        // An invalidation's (or a drop's) lets the current row be filled again.
        assert_eq!(Write::below(&user), Write::tombstone("a", 6));
        assert_eq!(
            Write::live(&user, 3),
            Write::Live {
                username: "a".into(),
                version: 7,
                json: "{}".into(),
                read_at: 3
            }
        );
    }
}
