//! Redis: reads of live entries and versioned writes through one Lua script, so that cache-aside
//! fills, write-through sets and (later) CDC applies commute: an older version never overwrites a
//! newer one, whatever order they arrive in.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;
use tokio::sync::oneshot;

use super::connect;
use crate::config::{Config, SecretUrl};
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
    // serde would also read a struct from an array: only an object counts.
    value.trim_start().starts_with('{')
        && serde_json::from_str::<LiveProbe>(value)
            .is_ok_and(|p| p.id.is_some() && p.version.is_some())
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
    conn: ConnectionManager,
    prefix: Arc<str>,
    ttl_secs: u64,
    timeout: Duration,
    /// Request-path calls waiting to go to Redis together.
    ops: Arc<WorkQueue<Op>>,
}

type Reply<T> = oneshot::Sender<Result<T, CacheError>>;

/// A request-path Redis call, queued.
enum Op {
    Read {
        keys: Vec<String>,
        reply: Reply<Vec<Option<String>>>,
    },
    Fill {
        writes: Vec<Write>,
        reply: Reply<Vec<Outcome>>,
    },
}

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

/// The client for `redis.url`, with the certificates of `redis.tls_*` when there are any (the
/// system's roots otherwise).
fn client(config: &Config, url: &SecretUrl) -> Result<redis::Client, CacheError> {
    let bad =
        |e: &dyn std::fmt::Display| CacheError::Down(format!("redis.url {}: {e}", url.redacted()));
    // Dead peers, as for PostgreSQL (see `connect::KEEPALIVE_IDLE`).
    use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
    use redis::IntoConnectionInfo;
    let keepalive = TcpKeepalive::new()
        .with_time(connect::KEEPALIVE_IDLE)
        .with_interval(connect::KEEPALIVE_INTERVAL)
        .with_retries(connect::KEEPALIVE_RETRIES);
    let info = url
        .expose()
        .into_connection_info()
        .map_err(|e| bad(&e))?
        .set_tcp_settings(
            TcpSettings::default()
                .set_nodelay(true)
                .set_keepalive(keepalive)
                .set_user_timeout(connect::TCP_USER_TIMEOUT),
        );
    let r = &config.redis;
    if r.tls_ca_file.is_none() && r.tls_cert_file.is_none() {
        // rediss:// builds its own rustls configuration on the process's provider.
        crate::tls::provider();
        return redis::Client::open(info).map_err(|e| bad(&e));
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| CacheError::Down(format!("{key} {}: {e}", path.display())))
    };
    let root_cert = match &r.tls_ca_file {
        Some(path) => Some(read("redis.tls_ca_file", path)?),
        None => None,
    };
    let client_tls = match (&r.tls_cert_file, &r.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", cert)?,
            client_key: read("redis.tls_key_file", key)?,
        }),
        _ => None,
    };
    crate::tls::provider();
    let certificates = redis::TlsCertificates {
        client_tls,
        root_cert,
    };
    redis::Client::build_with_tls(info, certificates).map_err(|e| {
        let files: Vec<String> = [
            ("redis.tls_ca_file", &r.tls_ca_file),
            ("redis.tls_cert_file", &r.tls_cert_file),
            ("redis.tls_key_file", &r.tls_key_file),
        ]
        .into_iter()
        .filter_map(|(key, path)| Some(format!("{key} {}", path.as_ref()?.display())))
        .collect();
        CacheError::Down(format!("{}: {e}", files.join(", ")))
    })
}

/// `redis.password_file`, read for every new connection: a rotated password needs no restart.
struct PasswordFile {
    username: String,
    path: std::path::PathBuf,
}

impl redis::auth::StreamingCredentialsProvider for PasswordFile {
    fn subscribe(
        &self,
    ) -> std::pin::Pin<
        Box<dyn futures::Stream<Item = redis::RedisResult<redis::auth::BasicAuth>> + Send>,
    > {
        let credentials = crate::secrets::read_password_file(&self.path)
            .map(|password| redis::auth::BasicAuth::new(self.username.clone(), password))
            .map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::AuthenticationFailed,
                    "redis.password_file",
                    e,
                ))
            });
        // One item: the connection being made takes it; nothing re-authenticates later.
        Box::pin(futures::stream::once(async move { credentials }))
    }
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

impl Cache {
    /// Prepares the connection; it is made lazily, so a Redis that is down now is not an error.
    pub fn new(config: &Config) -> Result<Cache, CacheError> {
        let url = config
            .redis
            .url
            .as_ref()
            .ok_or_else(|| CacheError::Down("redis.url is not set".into()))?;
        let client = client(config, url)?;
        let timeout = config.redis_timeout();
        let mut manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        if let Some(path) = &config.redis.password_file {
            let username = client
                .get_connection_info()
                .redis_settings()
                .username()
                .unwrap_or("default")
                .to_owned();
            manager_config = manager_config.set_credentials_provider(PasswordFile {
                username,
                path: path.clone(),
            });
        }
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Cache {
            conn,
            prefix: config.cache.key_prefix.as_str().into(),
            ttl_secs: config.cache.ttl_secs,
            timeout,
            ops: Arc::new(WorkQueue::serial()),
        })
    }

    /// The key of a user: `cache.key_prefix` + username.
    pub fn key(&self, username: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + username.len());
        key.push_str(&self.prefix);
        key.push_str(username);
        key
    }

    /// The key of the fence: the prefix itself, which no user's key is (usernames are never
    /// empty).
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
    /// ([`Cache::establish_fence`], by the health monitor), so a write that read before Redis lost
    /// its data is refused too.
    pub fn fence_key(&self) -> String {
        self.prefix.to_string()
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(CacheError::Timeout(self.timeout)),
        }
    }

    /// The live entries of `usernames`, in order. Reads that arrive while another request-path
    /// call is in flight queue and go to Redis together, in one MGET.
    pub async fn get_live_many(
        &self,
        usernames: &[&str],
    ) -> Result<Vec<Option<String>>, CacheError> {
        let (reply, answer) = oneshot::channel();
        self.queue(Op::Read {
            keys: usernames.iter().map(|name| self.key(name)).collect(),
            reply,
        });
        answer.await.unwrap_or_else(|_| Err(abandoned()))
    }

    /// Queues `writes` (cache-aside fills) behind the request-path calls already queued and ahead
    /// of every read queued after this call returns: those reads see the fill without waiting
    /// for it. The returned future tells what each write did.
    pub fn fill(
        &self,
        writes: Vec<Write>,
    ) -> impl std::future::Future<Output = Result<Vec<Outcome>, CacheError>> {
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

    /// Sends queued operations as one pipeline, in queue order; consecutive reads become one
    /// MGET.
    async fn run_pipeline(&self, ops: Vec<Op>) {
        enum Step {
            Reads(Vec<(usize, Reply<Vec<Option<String>>>)>),
            Fill(Reply<Vec<Outcome>>),
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut steps: Vec<Step> = Vec::new();
        let mut mget: Option<redis::Cmd> = None;
        for op in ops {
            match op {
                Op::Read { keys, reply } => {
                    let cmd = mget.get_or_insert_with(|| redis::cmd("MGET"));
                    for key in &keys {
                        cmd.arg(key);
                    }
                    match steps.last_mut() {
                        Some(Step::Reads(replies)) => replies.push((keys.len(), reply)),
                        _ => steps.push(Step::Reads(vec![(keys.len(), reply)])),
                    }
                }
                Op::Fill { writes, reply } => {
                    if let Some(cmd) = mget.take() {
                        pipe.add_command(cmd);
                    }
                    pipe.add_command(self.apply_cmd(&writes));
                    steps.push(Step::Fill(reply));
                }
            }
        }
        if let Some(cmd) = mget.take() {
            pipe.add_command(cmd);
        }
        let mut conn = self.conn.clone();
        let values = match self
            .bounded::<Vec<redis::Value>>(pipe.query_async(&mut conn))
            .await
        {
            Ok(values) if values.len() == steps.len() => values,
            Ok(values) => {
                let e = CacheError::Server(format!(
                    "a pipeline of {} commands answered {} values",
                    steps.len(),
                    values.len()
                ));
                return fail_steps(steps, e);
            }
            Err(e) => return fail_steps(steps, e),
        };
        fn fail_steps(steps: Vec<Step>, e: CacheError) {
            for step in steps {
                match step {
                    Step::Reads(replies) => {
                        for (_, reply) in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                    Step::Fill(reply) => {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        for (step, value) in steps.into_iter().zip(values) {
            match step {
                Step::Reads(replies) => {
                    let values = match decode::<Vec<Option<String>>>(value) {
                        Ok(values) => values,
                        Err(e) => {
                            fail_steps(vec![Step::Reads(replies)], e);
                            continue;
                        }
                    };
                    let mut values = values.into_iter();
                    for (n, reply) in replies {
                        let live = values
                            .by_ref()
                            .take(n)
                            .map(|v| v.filter(|v| is_live(v)))
                            .collect();
                        let _ = reply.send(Ok(live));
                    }
                }
                Step::Fill(reply) => {
                    let _ = reply.send(decode::<Vec<i64>>(value).map(outcomes));
                }
            }
        }
    }

    /// Applies `writes` in one script call; returns what each did.
    pub async fn apply(&self, writes: &[Write]) -> Result<Vec<Outcome>, CacheError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let flags: Vec<i64> = self
            .bounded(self.apply_cmd(writes).query_async(&mut conn))
            .await?;
        Ok(outcomes(flags))
    }

    /// The script call applying `writes`. EVAL with the body rather than EVALSHA: the script is
    /// small, Redis caches it by digest, and no call ever fails with NOSCRIPT (after a restart,
    /// or inside a pipeline).
    fn apply_cmd(&self, writes: &[Write]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(APPLY_SCRIPT)
            .arg(writes.len() + 1)
            .arg(self.fence_key());
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

    /// One SCAN step over the keys under the prefix: the next cursor (0 when done) and the names.
    pub async fn scan_page(&self, cursor: u64) -> Result<(u64, Vec<String>), CacheError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", glob_escape(&self.prefix));
        let (next, keys): (u64, Vec<String>) = self
            .bounded(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut conn),
            )
            .await?;
        let names = keys
            .into_iter()
            .filter_map(|k| k.strip_prefix(&*self.prefix).map(str::to_owned))
            // The prefix alone is the fence, prefix + NUL the epoch: no user's keys.
            .filter(|name| !name.is_empty() && !name.starts_with('\0'))
            .collect();
        Ok((next, names))
    }

    /// Walks every key under the prefix with SCAN (never KEYS), a batch of names at a time.
    pub async fn scan_names<F, Fut>(&self, mut each_batch: F) -> Result<(), CacheError>
    where
        F: FnMut(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<(), CacheError>>,
    {
        let mut cursor = 0;
        loop {
            let (next, names) = self.scan_page(cursor).await?;
            if !names.is_empty() {
                each_batch(names).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Fences off every write that read before `fence` (a horizon drawn after the event that
    /// made the cache untrustworthy: a TRUNCATE, lost history, lost writes), then drops every live
    /// entry under the prefix (see [`Cache::fence_key`]). Returns how many entries it dropped.
    /// Fails, changing nothing, while Redis has no fence: the health monitor sets one first.
    pub async fn drop_all(&self, fence: i64) -> Result<u64, CacheError> {
        self.raise_fence(fence).await?;
        let mut dropped = 0u64;
        let mut cursor = 0;
        loop {
            let (next, names) = self.scan_page(cursor).await?;
            if !names.is_empty() {
                let keys: Vec<String> = names.iter().map(|name| self.key(name)).collect();
                let mut conn = self.conn.clone();
                let n: u64 = self
                    .bounded(
                        redis::cmd("EVAL")
                            .arg(DROP_SCRIPT)
                            .arg(keys.len())
                            .arg(&keys)
                            .arg(self.ttl_secs)
                            .query_async(&mut conn),
                    )
                    .await?;
                dropped += n;
            }
            if next == 0 {
                return Ok(dropped);
            }
            cursor = next;
        }
    }

    /// The fence, or `None` when Redis has none (it lost its data, or was never fenced). Also
    /// the health monitor's liveness check of Redis.
    pub async fn fence(&self) -> Result<Option<i64>, CacheError> {
        let mut conn = self.conn.clone();
        let value: Option<String> = self
            .bounded(
                redis::cmd("GET")
                    .arg(self.fence_key())
                    .query_async(&mut conn),
            )
            .await?;
        match value {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                CacheError::Server(format!(
                    "the fence key {} holds a value that is not cacheward's",
                    self.fence_key()
                ))
            }),
        }
    }

    /// The key that records which Redis process the cached data was written under (its
    /// `run_id`): the prefix, a NUL and `epoch`. No username makes it (PostgreSQL's text holds no
    /// NUL). Data restored from a snapshot, or served by a promoted replica, carries the epoch of
    /// the process that wrote it, which is not the one answering: the writes made since the
    /// snapshot (tombstones, newer versions) may be missing, so nothing cached can be trusted.
    pub fn epoch_key(&self) -> String {
        format!("{}\0epoch", self.prefix)
    }

    /// The `run_id` of the Redis process answering (`None` where `INFO` is not allowed), and the
    /// one recorded at [`Cache::epoch_key`], in one round trip.
    pub async fn epoch(&self) -> Result<(Option<String>, Option<String>), CacheError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.ignore_errors()
            .cmd("INFO")
            .arg("server")
            .cmd("GET")
            .arg(self.epoch_key());
        let (info, recorded): (redis::Value, redis::Value) =
            self.bounded(pipe.query_async(&mut conn)).await?;
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
        Ok((run_id, recorded))
    }

    /// Records `run_id` as the process the cached data is written under.
    pub async fn record_epoch(&self, run_id: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.bounded(
            redis::cmd("SET")
                .arg(self.epoch_key())
                .arg(run_id)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// Redis's `maxmemory-policy`, or `None` where CONFIG is not allowed (managed services, ACLs).
    pub async fn eviction_policy(&self) -> Option<String> {
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self
            .bounded(
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("maxmemory-policy")
                    .query_async(&mut conn),
            )
            .await
            .ok()?;
        reply.into_iter().nth(1)
    }

    /// Sets the fence to `horizon` if Redis has none; returns the fence now in force. `horizon`
    /// must have been drawn after the fence was seen missing.
    pub async fn establish_fence(&self, horizon: i64) -> Result<i64, CacheError> {
        self.fence_script(ESTABLISH_FENCE_SCRIPT, horizon).await
    }

    /// Raises the fence to `fence` (never lowers it).
    async fn raise_fence(&self, fence: i64) -> Result<i64, CacheError> {
        match self.fence_script(RAISE_FENCE_SCRIPT, fence).await? {
            now if now < 0 => Err(CacheError::Unfenced),
            now => Ok(now),
        }
    }

    async fn fence_script(&self, script: &str, value: i64) -> Result<i64, CacheError> {
        let mut conn = self.conn.clone();
        self.bounded(
            redis::cmd("EVAL")
                .arg(script)
                .arg(1)
                .arg(self.fence_key())
                .arg(value)
                .query_async(&mut conn),
        )
        .await
    }

    /// Whether any key exists under the prefix.
    pub async fn any_entry(&self) -> Result<bool, CacheError> {
        let mut found = false;
        self.scan_names(|_| {
            found = true;
            async { Ok(()) }
        })
        .await?;
        Ok(found)
    }

    /// What is stored at the keys of `usernames`: strings as they are (live entries, tombstones,
    /// foreign strings), and whether a key holds another type.
    pub async fn get_raw(&self, usernames: &[String]) -> Result<Vec<Stored>, CacheError> {
        if usernames.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = usernames.iter().map(|u| self.key(u)).collect();
        let mut conn = self.conn.clone();
        let values: Vec<Option<String>> = self
            .bounded(redis::cmd("MGET").arg(&keys).query_async(&mut conn))
            .await?;
        // MGET answers nil for a key of another type: ask those keys their type.
        let absent: Vec<usize> = (0..keys.len()).filter(|&i| values[i].is_none()).collect();
        let mut types: Vec<String> = Vec::new();
        if !absent.is_empty() {
            let mut pipe = redis::pipe();
            for &i in &absent {
                pipe.cmd("TYPE").arg(&keys[i]);
            }
            types = self.bounded(pipe.query_async(&mut conn)).await?;
        }
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
