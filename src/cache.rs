//! Redis: reads of live entries and versioned writes through one Lua script, so that cache-aside
//! fills, write-through sets and (later) CDC applies commute: an older version never overwrites a
//! newer one, whatever order they arrive in.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::batch::Queue;
use crate::config::Config;

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
}

impl From<redis::RedisError> for CacheError {
    fn from(e: redis::RedisError) -> Self {
        if matches!(
            e.kind(),
            redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
        ) {
            CacheError::Server(e.to_string())
        } else {
            CacheError::Down(e.to_string())
        }
    }
}

/// One versioned write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Store the row's JSON unless Redis holds a version at least as new.
    Live {
        username: String,
        version: i64,
        json: String,
    },
    /// Remove the entry, leaving a tombstone that refuses older live writes, unless Redis holds a
    /// newer version. `version` is at least the last version the name's row had.
    Tombstone { username: String, version: i64 },
}

impl Write {
    pub fn username(&self) -> &str {
        match self {
            Write::Live { username, .. } | Write::Tombstone { username, .. } => username,
        }
    }
}

/// The one script every cache write goes through.
///
/// KEYS[i]: the keys. ARGV[1]: TTL in seconds. For key i, ARGV[2i]: the incoming version,
/// ARGV[2i+1]: the live JSON, or "" for a tombstone. What is stored carries its version in a
/// `version` field: a live user JSON, or `{"tombstone":true,"version":N}`. A live write applies when
/// newer than what is stored, a tombstone when at least as new (it removes the row of that very
/// version). A value without a readable version (foreign, corrupt) is overwritten.
/// Returns per key: 1 applied, 0 refused (Redis holds a newer version, or a tombstone of this
/// one), 2 nothing to do (this very version is live there already).
const APPLY_SCRIPT: &str = r#"
local ttl = ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  local incoming = tonumber(ARGV[2 * i])
  local value = ARGV[2 * i + 1]
  local live = value ~= ''
  local apply = true
  local current = redis.pcall('GET', key)
  if type(current) == 'string' then
    local ok, stored = pcall(cjson.decode, current)
    if ok and type(stored) == 'table' then
      local v = tonumber(stored['version'])
      if v then
        if live then apply = incoming > v else apply = incoming >= v end
        if live and incoming == v and stored['tombstone'] == nil then out[i] = 2 end
      end
    end
  end
  if apply then
    if not live then value = '{"tombstone":true,"version":' .. ARGV[2 * i] .. '}' end
    redis.call('SET', key, value, 'EX', ttl)
    out[i] = 1
  elseif out[i] == nil then
    out[i] = 0
  end
end
return out
"#;

/// Only `id` matters: a JSON object with an `id` is a live entry, anything else (a tombstone, a
/// foreign value) is a miss.
#[derive(Deserialize)]
struct LiveProbe {
    id: Option<serde::de::IgnoredAny>,
}

/// Whether a stored value is a live user entry (DESIGN 1.5).
pub fn is_live(value: &str) -> bool {
    // serde would also read a struct from an array: only an object counts.
    value.trim_start().starts_with('{')
        && serde_json::from_str::<LiveProbe>(value).is_ok_and(|p| p.id.is_some())
}

/// The Redis side of the cache: one multiplexed, auto-reconnecting connection shared by all tasks.
#[derive(Clone)]
pub struct Cache {
    conn: ConnectionManager,
    prefix: Arc<str>,
    ttl_secs: u64,
    timeout: Duration,
    /// Request-path calls waiting to go to Redis together.
    ops: Arc<Queue<Op>>,
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

/// What one versioned write found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The same version was live there already (another path wrote it first).
    Current,
    /// Redis held a newer version, or a tombstone of this one: the write was stale.
    Refused,
}

fn outcomes(flags: Vec<i64>) -> Vec<Outcome> {
    flags
        .into_iter()
        .map(|flag| match flag {
            1 => Outcome::Applied,
            2 => Outcome::Current,
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
        let client = redis::Client::open(url.expose())
            .map_err(|e| CacheError::Down(format!("redis.url {}: {e}", url.redacted())))?;
        let timeout = config.redis_timeout();
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Cache {
            conn,
            prefix: config.cache.key_prefix.as_str().into(),
            ttl_secs: config.cache.ttl_secs,
            timeout,
            ops: Arc::new(Queue::new(1)),
        })
    }

    /// The key of a user: `cache.key_prefix` + username.
    pub fn key(&self, username: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + username.len());
        key.push_str(&self.prefix);
        key.push_str(username);
        key
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
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
        cmd.arg(APPLY_SCRIPT).arg(writes.len());
        for write in writes {
            cmd.arg(self.key(write.username()));
        }
        cmd.arg(self.ttl_secs);
        for write in writes {
            match write {
                Write::Live { version, json, .. } => cmd.arg(*version).arg(json.as_str()),
                Write::Tombstone { version, .. } => cmd.arg(*version).arg(""),
            };
        }
        cmd
    }

    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let _: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
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

    /// Gives every entry under the prefix a tombstone at `version`: each entry no newer is dropped,
    /// and no write older than `version` can land afterwards. Returns how many entries it saw.
    pub async fn tombstone_all(&self, version: i64) -> Result<u64, CacheError> {
        let mut seen = 0u64;
        self.scan_names(|names| {
            seen += names.len() as u64;
            let writes: Vec<Write> = names
                .into_iter()
                .map(|username| Write::Tombstone { username, version })
                .collect();
            async move { self.apply(&writes).await.map(|_| ()) }
        })
        .await?;
        Ok(seen)
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

    /// The stored values of `usernames` (live entries, tombstones or foreign values alike).
    pub async fn get_raw(&self, usernames: &[String]) -> Result<Vec<Option<String>>, CacheError> {
        if usernames.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = usernames.iter().map(|u| self.key(u)).collect();
        let mut conn = self.conn.clone();
        self.bounded(redis::cmd("MGET").arg(&keys).query_async(&mut conn))
            .await
    }
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
}
