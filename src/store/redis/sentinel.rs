//! A primary that Sentinel names: asked of the sentinels, checked to be a master, followed on
//! `+switch-master` and whenever the connection breaks or a write is refused as `READONLY`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ConnectionInfo, Pipeline, Value};

use super::bounded;
use super::client::{at_address, connection_info, lost, manager, Pushes};
use crate::config::Config;
use crate::support::time::Backoff;

/// The primary Sentinel names, found by asking the sentinels (`redis.urls`) and asked again
/// whenever the connection breaks, a write is refused as `READONLY` (the primary was demoted), or
/// the health monitor sees the sentinels name another ([`SentinelConn::follow`]).
#[derive(Clone)]
pub struct SentinelConn {
    inner: Arc<SentinelInner>,
}

struct SentinelInner {
    config: Config,
    sentinels: Vec<ConnectionInfo>,
    master: String,
    /// The primary's settings but its address: `redis.url`'s user, password, database, TLS.
    template: Option<ConnectionInfo>,
    /// The primary connected to, where it is, and which connection it is (see
    /// [`SentinelConn::generation`]).
    current: Mutex<Option<(ConnectionManager, String, u64)>>,
    /// How many connections to a primary were made so far.
    made: std::sync::atomic::AtomicU64,
    /// Where the last connection to a primary went, and how many times a connection went to
    /// another server than the one before (see [`SentinelConn::moves`]).
    went: Mutex<(Option<String>, u64)>,
    /// One resolution at a time.
    resolving: tokio::sync::Mutex<()>,
    /// Where the primary's connection hands its push messages (the near cache's).
    pushes: Option<Pushes>,
}

impl SentinelConn {
    pub fn new(config: &Config, pushes: Option<Pushes>) -> Result<SentinelConn, String> {
        let r = &config.redis;
        let master = r
            .sentinel_master
            .clone()
            .ok_or("redis.sentinel_master is not set")?;
        let sentinels = r
            .urls
            .iter()
            .map(|url| connection_info(url, "redis.urls"))
            .collect::<Result<Vec<_>, _>>()?;
        let template = r
            .url
            .as_ref()
            .map(|url| connection_info(url, "redis.url"))
            .transpose()?;
        let template = master_template(template, &sentinels);
        Ok(SentinelConn {
            inner: Arc::new(SentinelInner {
                config: config.clone(),
                sentinels,
                master,
                template,
                current: Mutex::new(None),
                made: Default::default(),
                went: Mutex::default(),
                resolving: tokio::sync::Mutex::new(()),
                pushes,
            }),
        })
    }

    fn current(&self) -> Option<(ConnectionManager, String, u64)> {
        self.inner
            .current
            .lock()
            .expect("sentinel lock is never poisoned")
            .clone()
    }

    /// Where the primary connected to is (`host:port`), if connected.
    pub fn address(&self) -> Option<String> {
        self.current().map(|(_, at, _)| at)
    }

    /// Which connection to a primary is the current one (a number no other has had), if any.
    /// Every move to another primary (or back) makes a new one: what the health monitor judged
    /// of the primary behind one connection says nothing of the server behind the next.
    pub fn generation(&self) -> Option<u64> {
        self.current().map(|(_, _, made)| made)
    }

    /// How many times a connection to a primary went to another server than the connection
    /// before it: writes may have gone to one server that a server connected to later lacks
    /// (the sentinels named one, then another, then the first again).
    pub fn moves(&self) -> u64 {
        self.inner
            .went
            .lock()
            .expect("sentinel lock is never poisoned")
            .1
    }

    /// The connection to the primary, made now if there is none (asking the sentinels).
    pub async fn connect(&self) -> redis::RedisResult<()> {
        self.connection().await.map(drop)
    }

    /// Where the sentinels say the primary is: the first sentinel that answers.
    pub async fn ask_sentinels(&self) -> redis::RedisResult<(String, u16)> {
        let timeout = self
            .inner
            .config
            .redis_timeout()
            .max(Duration::from_millis(250));
        let mut last = None;
        for sentinel in &self.inner.sentinels {
            let asked = async {
                // Its answer bounded: a sentinel that sends more is dropped (see `bounded`).
                let (mut conn, driver) = bounded::connection(&self.inner.config, sentinel).await?;
                let mut ask = redis::cmd("SENTINEL");
                ask.arg("get-master-addr-by-name").arg(&self.inner.master);
                let ask = ask.query_async::<Option<(String, u16)>>(&mut conn);
                tokio::select! {
                    answer = ask => answer,
                    () = driver => Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "the sentinel's connection ended",
                    ))),
                }
            };
            match tokio::time::timeout(timeout, asked).await {
                Ok(Ok(Some(address))) => return Ok(address),
                Ok(Ok(None)) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "the sentinels know no master named",
                        self.inner.master.clone(),
                    )))
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "a sentinel did not answer in time",
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no sentinels"))
        }))
    }

    /// The connection to the primary, resolved through the sentinels when there is none.
    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some((conn, _, _)) = self.current() {
            return Ok(conn);
        }
        let _one = self.inner.resolving.lock().await;
        if let Some((conn, _, _)) = self.current() {
            return Ok(conn);
        }
        let (host, port) = self.ask_sentinels().await?;
        self.connect_to(&host, port).await
    }

    async fn connect_to(&self, host: &str, port: u16) -> redis::RedisResult<ConnectionManager> {
        let address = format!("{host}:{port}");
        let info = at_address(self.inner.template.as_ref(), host, port)?;
        let timeout = Some(self.inner.config.redis_timeout());
        let pushes = self.inner.pushes.as_ref();
        let mut conn = manager(&self.inner.config, info, timeout, pushes).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "redis", e))
        })?;
        // The sentinels may still name a demoted primary for a moment: only a master will do.
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        let is_master = matches!(role.first(), Some(Value::BulkString(b)) if b == b"master")
            || matches!(role.first(), Some(Value::SimpleString(s)) if s == "master");
        if !is_master {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the sentinels named a server that is not a master",
                address,
            )));
        }
        {
            let mut went = self
                .inner
                .went
                .lock()
                .expect("sentinel lock is never poisoned");
            if went.0.as_ref().is_some_and(|before| *before != address) {
                went.1 += 1;
            }
            went.0 = Some(address.clone());
        }
        let made = self
            .inner
            .made
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        *self
            .inner
            .current
            .lock()
            .expect("sentinel lock is never poisoned") = Some((conn.clone(), address, made));
        Ok(conn)
    }

    /// Drops the connection after `e` if it says the primary is gone or demoted.
    fn after(&self, e: &redis::RedisError) {
        let demoted = e.code() == Some("READONLY");
        if demoted || e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
            self.forget();
        }
    }

    /// Drops the connection to the primary (and, with it, the near cache): the next call asks
    /// the sentinels where the primary is.
    pub fn forget(&self) {
        let was = self
            .inner
            .current
            .lock()
            .expect("sentinel lock is never poisoned")
            .take();
        if was.is_some() {
            lost(&self.inner.pushes);
        }
    }

    /// Asks the sentinels where the primary is and moves there if it is not where this connection
    /// goes (the health monitor's check, every tick: `+switch-master` seen by polling). Returns
    /// the primary's address.
    pub async fn follow(&self) -> redis::RedisResult<String> {
        let (host, port) = self.ask_sentinels().await?;
        let address = format!("{host}:{port}");
        if self.current().is_some_and(|(_, at, _)| at != address) {
            tracing::warn!(master = %address, "sentinel names a new redis master: following it");
            self.forget();
        }
        Ok(address)
    }

    /// Listens for `+switch-master` on the sentinels (one at a time, the next when one fails)
    /// until `stop`: when one names this master, the connection is dropped at once and the next
    /// call asks the sentinels where the primary is now. [`SentinelConn::follow`] is the fallback.
    pub async fn watch(self, stop: tokio_util::sync::CancellationToken) {
        use futures::StreamExt;
        let master = self.inner.master.clone();
        let mut switches = Switches::default();
        loop {
            for sentinel in &self.inner.sentinels {
                let subscribed = async {
                    let mut pubsub = bounded::pubsub(&self.inner.config, sentinel).await.ok()?;
                    pubsub.subscribe("+switch-master").await.ok()?;
                    Some(pubsub.into_on_message())
                };
                let timeout = Duration::from_secs(1);
                let Ok(Some(mut messages)) = tokio::time::timeout(timeout, subscribed).await else {
                    continue;
                };
                loop {
                    let message = tokio::select! {
                        _ = stop.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    // "<name> <old-ip> <old-port> <new-ip> <new-port>"
                    let text: String = message.get_payload().unwrap_or_default();
                    let words: Vec<&str> = text.split(' ').collect();
                    if let [name, _, _, ip, port] = words[..] {
                        let now_at = self.current().map(|(_, address, _)| address);
                        let named = format!("{ip}:{port}");
                        if name == master && switches.follow(&named, now_at.as_deref()) {
                            tracing::warn!(master = %named, suppressed = switches.take_unsaid(), "sentinel names a new redis master: following it");
                            self.forget();
                        }
                    }
                }
            }
            if !Backoff::fixed(Duration::from_secs(1)).wait(&stop).await {
                return;
            }
        }
    }

    pub async fn command(&self, cmd: &Cmd) -> redis::RedisResult<Value> {
        let mut conn = self.connection().await?;
        let result = conn.req_packed_command(cmd).await;
        match &result {
            Err(e) => self.after(e),
            Ok(Value::ServerError(e)) if e.code() == "READONLY" => self.forget(),
            Ok(_) => {}
        }
        result
    }

    pub async fn commands(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        let mut conn = self.connection().await?;
        let result = conn.req_packed_commands(pipeline, offset, count).await;
        match &result {
            Err(e) => self.after(e),
            Ok(values) => {
                if values
                    .iter()
                    .any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY"))
                {
                    self.forget();
                }
            }
        }
        result
    }
}

/// What `+switch-master` messages are acted on: a hostile or broken sentinel may send them by
/// the million. One naming where the connection already goes changes nothing; the others drop
/// the connection (and the near cache) at most once per [`SWITCH_GAP`] (the monitor asks the
/// sentinels every 250 ms anyway, so no real switch is missed for long), and are said with how
/// many were not.
#[derive(Default)]
struct Switches {
    last: Option<std::time::Instant>,
    unsaid: u64,
}

/// The least time between two switches followed.
const SWITCH_GAP: Duration = Duration::from_millis(500);

impl Switches {
    /// Whether to follow a switch to `named` while the connection goes to `now_at`.
    fn follow(&mut self, named: &str, now_at: Option<&str>) -> bool {
        if now_at == Some(named) || self.last.is_some_and(|at| at.elapsed() < SWITCH_GAP) {
            self.unsaid += 1;
            return false;
        }
        self.last = Some(std::time::Instant::now());
        true
    }

    fn take_unsaid(&mut self) -> u64 {
        std::mem::take(&mut self.unsaid)
    }
}

/// The settings the primary is reached with: `redis.url`'s when set (its host unused); else,
/// when the sentinels are reached over TLS, TLS with no user of its own, so that a password
/// (`redis.password_file`) never crosses the network in the clear where the sentinels' did not.
fn master_template(
    template: Option<ConnectionInfo>,
    sentinels: &[ConnectionInfo],
) -> Option<ConnectionInfo> {
    template.or_else(|| {
        let tls = sentinels
            .iter()
            .find(|s| matches!(s.addr(), redis::ConnectionAddr::TcpTls { .. }))?;
        Some(
            tls.clone()
                .set_redis_settings(redis::RedisConnectionInfo::default()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(url: &str) -> ConnectionInfo {
        redis::IntoConnectionInfo::into_connection_info(url).unwrap()
    }

    #[test]
    fn a_flood_of_switches_is_followed_at_most_every_half_second() {
        let mut switches = Switches::default();
        // Where the connection already goes: nothing to do.
        assert!(!switches.follow("10.0.0.1:6379", Some("10.0.0.1:6379")));
        assert!(switches.follow("10.0.0.2:6379", Some("10.0.0.1:6379")));
        let followed = (0..100_000)
            .filter(|i| switches.follow(&format!("10.0.{}.{}:6379", i / 250, i % 250), None))
            .count();
        assert_eq!(followed, 0, "a flood within the gap is not followed");
        assert_eq!(switches.take_unsaid(), 100_001);
        switches.last = Some(std::time::Instant::now() - SWITCH_GAP);
        assert!(switches.follow("10.0.0.3:6379", None));
    }

    /// A sentinel that answers every request with 50 MB: the daemon reads no more than the
    /// bound, drops the connection (the sentinel's write of the rest fails), and says why.
    #[tokio::test]
    async fn a_sentinel_that_answers_too_much_is_dropped_at_the_bound() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hostile = tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = peer.read(&mut request).await;
            const ANSWER: usize = 50 << 20;
            peer.write_all(format!("${ANSWER}\r\n").as_bytes()).await?;
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..ANSWER / chunk.len() {
                peer.write_all(&chunk).await?;
            }
            Ok::<(), std::io::Error>(())
        });
        let mut config = Config::default();
        config.redis.mode = crate::config::RedisMode::Sentinel;
        config.redis.urls = vec![crate::config::SecretUrl::new(format!(
            "redis://127.0.0.1:{port}"
        ))];
        config.redis.sentinel_master = Some("m".into());
        config.redis.timeout_ms = 5_000;
        let sentinels = SentinelConn::new(&config, None).unwrap();
        let e = sentinels.ask_sentinels().await.unwrap_err();
        assert!(e.to_string().contains("more than 65536 bytes"), "{e}");
        // The daemon hung up long before the 50 MB were sent.
        let written = tokio::time::timeout(Duration::from_secs(10), hostile)
            .await
            .expect("the hostile sentinel finishes")
            .unwrap();
        assert!(written.is_err(), "the whole answer was taken");
    }

    #[test]
    fn the_primary_is_reached_over_tls_when_the_sentinels_are() {
        let tls = |i: &ConnectionInfo| matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. });
        let sentinels = [info("rediss://s:pw@sentinel1:26379")];
        let template = master_template(None, &sentinels);
        let primary =
            crate::store::redis::client::at_address(template.as_ref(), "10.0.0.5", 6379).unwrap();
        assert!(tls(&primary), "{:?}", primary.addr());
        // The sentinels' user and password are theirs alone.
        assert_eq!(primary.redis_settings().username(), None);
        assert_eq!(primary.redis_settings().password(), None);
        // Plain sentinels, no redis.url: plain; redis.url set: its settings, whatever the sentinels'.
        let plain = master_template(None, &[info("redis://sentinel1:26379")]);
        let primary = crate::store::redis::client::at_address(plain.as_ref(), "h", 1).unwrap();
        assert!(!tls(&primary));
        let given = master_template(Some(info("redis://u:p@ignored:1")), &sentinels);
        let primary = crate::store::redis::client::at_address(given.as_ref(), "h", 1).unwrap();
        assert!(!tls(&primary) && primary.redis_settings().username() == Some("u"));
    }
}
