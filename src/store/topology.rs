//! The Redis deployment behind the cache (`redis.mode`): one server, a Cluster, or a primary that
//! Sentinel names. One connection type for all three, where each key of cacheward's lives (the
//! slots), and the nodes the health monitor surveys.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use super::connect;
use crate::config::{Config, RedisMode, SecretUrl};

/// Slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The slot of `key`, as Redis Cluster computes it: CRC16 (XMODEM) of the hash tag (the text
/// between the first `{` and the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot_of(key: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key).unwrap_or(key)) % SLOTS as u16
}

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|b| *b == b'{')?;
    let close = key[open + 1..].iter().position(|b| *b == b'}')?;
    let tag = &key[open + 1..open + 1 + close];
    (!tag.is_empty()).then_some(tag)
}

/// Where cacheward's keys live. A user's key is the prefix and the username; besides those,
/// cacheward keeps a fence (`Cache::fence_key`) and an epoch (`Cache::epoch_key`) next to the
/// entries they guard: one of each on a single server, one of each **per slot** on a Cluster,
/// since a script may only touch keys of one slot, and a slot's fence must move with its entries
/// when the slot moves.
#[derive(Clone)]
pub struct Keys {
    prefix: Arc<str>,
    /// Cluster mode: per slot, the number that puts a fence (an epoch) key in that slot.
    slotted: Option<Arc<SlotKeys>>,
}

struct SlotKeys {
    fence: Box<[u32]>,
    epoch: Box<[u32]>,
}

/// No key of cacheward's can hash to this slot (the prefix carries a hash tag of its own).
const UNUSED: u32 = u32::MAX;

impl Keys {
    pub fn new(prefix: &str, cluster: bool) -> Keys {
        Keys {
            prefix: prefix.into(),
            slotted: cluster.then(|| {
                Arc::new(SlotKeys {
                    fence: numbering(prefix, "fence"),
                    epoch: numbering(prefix, "epoch"),
                })
            }),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn is_cluster(&self) -> bool {
        self.slotted.is_some()
    }

    /// The key of a user: the prefix + the username.
    pub fn user(&self, username: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + username.len());
        key.push_str(&self.prefix);
        key.push_str(username);
        key
    }

    /// The slot `key` lives in; 0 for every key on a single server.
    pub fn slot(&self, key: &str) -> u16 {
        match self.slotted {
            Some(_) => slot_of(key.as_bytes()),
            None => 0,
        }
    }

    /// The fence of `slot`'s entries: the prefix itself on a single server (no user's key is:
    /// usernames are never empty), the prefix + NUL + `fence:N` in the slot on a Cluster.
    pub fn fence(&self, slot: u16) -> String {
        match &self.slotted {
            None => self.prefix.to_string(),
            Some(keys) => format!("{}\0fence:{}", self.prefix, keys.fence[slot as usize]),
        }
    }

    /// The epoch of the node holding `slot`: the prefix + NUL + `epoch` (`epoch:N` in the slot on
    /// a Cluster). No username makes either (PostgreSQL's text holds no NUL).
    pub fn epoch(&self, slot: u16) -> String {
        match &self.slotted {
            None => format!("{}\0epoch", self.prefix),
            Some(keys) => format!("{}\0epoch:{}", self.prefix, keys.epoch[slot as usize]),
        }
    }

    /// Whether a key of cacheward's can live in `slot`.
    pub fn in_use(&self, slot: u16) -> bool {
        match &self.slotted {
            None => slot == 0,
            Some(keys) => keys.fence.get(slot as usize).is_some_and(|&n| n != UNUSED),
        }
    }

    /// Every slot a key of cacheward's can live in.
    pub fn slots(&self) -> Vec<u16> {
        (0..SLOTS as u16).filter(|&s| self.in_use(s)).collect()
    }
}

/// For each slot, the smallest N that puts `prefix` NUL `kind:N` in it. A prefix that carries a
/// hash tag of its own puts every key in one slot: that one alone is numbered.
fn numbering(prefix: &str, kind: &str) -> Box<[u32]> {
    let mut table = vec![UNUSED; SLOTS].into_boxed_slice();
    let mut left = SLOTS;
    let mut key = String::new();
    // Coupon collecting: about 170 000 tries number every slot; a tag in the prefix, only one.
    let limit = match hash_tag(prefix.as_bytes()) {
        Some(_) => 1,
        None => 1 << 22,
    };
    for n in 0..limit {
        use std::fmt::Write as _;
        key.clear();
        let _ = write!(key, "{prefix}\0{kind}:{n}");
        let slot = slot_of(key.as_bytes()) as usize;
        if table[slot] == UNUSED {
            table[slot] = n;
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    table
}

/// One connection to whatever `redis.mode` names, multiplexed, reconnecting, shared by all tasks.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConn),
    Sentinel(SentinelConn),
}

/// A Cluster connection that can be made anew. The driver's connection recovers from most
/// topology changes by itself, but after a primary dies it can stall in its slot refresh for many
/// seconds (redis-rs issues 1528, 2092): the health monitor then replaces it ([`Conn::renew`]).
#[derive(Clone)]
pub struct ClusterConn {
    inner: Arc<ClusterInner>,
}

struct ClusterInner {
    client: redis::cluster::ClusterClient,
    config: redis::cluster::ClusterConfig,
    current: Mutex<ClusterConnection>,
    /// What is sent to one primary by address (the request path's per-primary pipelines, the
    /// monitor's looks) goes on a connection of its own to that node, around the driver's routing
    /// task; a slot that moved answers `MOVED`, which fails the call (never redirected).
    nodes: Mutex<std::collections::HashMap<String, ConnectionManager>>,
    /// What a node connection needs besides its address: `redis.url`'s settings, the TLS files,
    /// the password file.
    settings: Config,
    template: ConnectionInfo,
    /// Where node connections hand their push messages (the near cache's).
    pushes: Option<Pushes>,
}

impl ClusterConn {
    /// The connection to the node at `address` (`host:port`), made on first use.
    fn node(&self, address: &str) -> redis::RedisResult<ConnectionManager> {
        let mut nodes = self
            .inner
            .nodes
            .lock()
            .expect("nodes lock is never poisoned");
        if let Some(conn) = nodes.get(address) {
            return Ok(conn.clone());
        }
        let bad = |what: &str, detail: String| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "redis",
                format!("{what}: {detail}"),
            ))
        };
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse().ok()?)))
            .ok_or_else(|| bad("a cluster node address", address.to_owned()))?;
        let info = at_address(Some(&self.inner.template), host, port)?;
        // Bulk calls (a fence per slot) go this way too: the caller bounds each call.
        let conn = manager(&self.inner.settings, info, None, self.inner.pushes.as_ref())
            .map_err(|e| bad(address, e))?;
        nodes.insert(address.to_owned(), conn.clone());
        Ok(conn)
    }

    fn get(&self) -> ClusterConnection {
        self.inner
            .current
            .lock()
            .expect("cluster lock is never poisoned")
            .clone()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => {
                let mut conn = c.get();
                Box::pin(async move { conn.req_packed_command(cmd).await })
            }
            Conn::Sentinel(c) => Box::pin(c.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => {
                let mut conn = c.get();
                Box::pin(async move { conn.req_packed_commands(pipeline, offset, count).await })
            }
            Conn::Sentinel(c) => Box::pin(c.commands(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get().get_db(),
            Conn::Sentinel(_) => 0,
        }
    }
}

/// A primary the health monitor looks at: where it is, which slots it serves (all of them on a
/// single server) and what identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// `host:port`, or `""` on a single server (the connection knows where).
    pub address: String,
    /// The node id on a Cluster (a promoted replica has its own), `""` otherwise.
    pub id: String,
    /// Inclusive slot ranges.
    pub ranges: Vec<(u16, u16)>,
}

impl Primary {
    /// The lowest slot it serves where cacheward keeps keys: where its epoch is kept and its
    /// fence checked. `None`: none of cacheward's keys can live there.
    pub fn anchor(&self, keys: &Keys) -> Option<u16> {
        self.slots(keys).next()
    }

    /// The slots it serves where cacheward's keys can live.
    pub fn slots<'a>(&'a self, keys: &'a Keys) -> impl Iterator<Item = u16> + 'a {
        self.ranges
            .iter()
            .flat_map(|&(from, to)| from..=to)
            .filter(|&s| keys.in_use(s))
    }
}

impl Conn {
    /// Replaces a Cluster connection with a new one (see [`ClusterConn`]); true if it did.
    pub fn renew(&self) -> bool {
        let Conn::Cluster(c) = self else {
            return false;
        };
        let c = &c.inner;
        let fresh = c
            .client
            .get_pending_async_connection_with_config(c.config.clone());
        *c.current.lock().expect("cluster lock is never poisoned") = fresh;
        c.nodes
            .lock()
            .expect("nodes lock is never poisoned")
            .clear();
        lost(&c.pushes);
        true
    }

    /// The primaries: the one server (standalone, Sentinel's current master), or every Cluster
    /// primary as `CLUSTER SLOTS` says, sorted by their first slot.
    pub async fn primaries(&mut self) -> redis::RedisResult<Vec<Primary>> {
        let Conn::Cluster(conn) = self else {
            return Ok(vec![Primary {
                address: String::new(),
                id: String::new(),
                ranges: vec![(0, (SLOTS - 1) as u16)],
            }]);
        };
        let reply = conn
            .get()
            .req_packed_command(redis::cmd("CLUSTER").arg("SLOTS"))
            .await?;
        parse_cluster_slots(reply)
    }

    /// Sends `pipeline` to `primary` (on a Cluster, by its address: its commands may name keys of
    /// several of its slots, each command one slot's).
    pub async fn on(
        &mut self,
        primary: &Primary,
        pipeline: &Pipeline,
    ) -> redis::RedisResult<Vec<Value>> {
        let count = pipeline.cmd_iter().count();
        match self {
            Conn::Cluster(conn) => {
                let mut node = conn.node(&primary.address)?;
                node.req_packed_commands(pipeline, 0, count).await
            }
            other => other.req_packed_commands(pipeline, 0, count).await,
        }
    }

    /// Sends one command to `primary` (see [`Conn::on`]).
    pub async fn on_one(&mut self, primary: &Primary, cmd: &Cmd) -> redis::RedisResult<Value> {
        match self {
            Conn::Cluster(conn) => conn.node(&primary.address)?.req_packed_command(cmd).await,
            other => other.req_packed_command(cmd).await,
        }
    }
}

/// The primaries of a `CLUSTER SLOTS` answer, sorted by their first slot; an error names what in
/// the answer is not as Redis writes it (it is never trusted to index the slot tables).
fn parse_cluster_slots(reply: Value) -> redis::RedisResult<Vec<Primary>> {
    let bad = |what: &str| {
        redis::RedisError::from((redis::ErrorKind::Parse, "CLUSTER SLOTS", what.to_owned()))
    };
    let Value::Array(ranges) = reply else {
        return Err(bad("not an array"));
    };
    let mut primaries: Vec<Primary> = Vec::new();
    for range in ranges {
        let Value::Array(fields) = range else {
            return Err(bad("a range is not an array"));
        };
        let (Some(Value::Int(from)), Some(Value::Int(to)), Some(Value::Array(node))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return Err(bad("a range lacks its bounds or its primary"));
        };
        let text = |v: Option<&Value>| match v {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => String::new(),
        };
        let (host, id) = (text(node.first()), text(node.get(2)));
        let Some(Value::Int(port)) = node.get(1) else {
            return Err(bad("a primary lacks its port"));
        };
        let address = format!("{host}:{port}");
        let slot = |n: i64| u16::try_from(n).ok().filter(|&s| (s as usize) < SLOTS);
        let range = match (slot(*from), slot(*to)) {
            (Some(from), Some(to)) if from <= to => (from, to),
            _ => return Err(bad("a range is not within slots 0-16383")),
        };
        match primaries.iter_mut().find(|p| p.id == id) {
            Some(p) => p.ranges.push(range),
            None => primaries.push(Primary {
                address,
                id,
                ranges: vec![range],
            }),
        }
    }
    for p in &mut primaries {
        p.ranges.sort_unstable();
    }
    primaries.sort_by_key(|p| p.ranges.first().copied());
    Ok(primaries)
}

/// The settings every connection gets: dead peers are noticed as for PostgreSQL (see
/// `connect::KEEPALIVE_IDLE`), and nothing waits for Nagle.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
    let keepalive = TcpKeepalive::new()
        .with_time(connect::KEEPALIVE_IDLE)
        .with_interval(connect::KEEPALIVE_INTERVAL)
        .with_retries(connect::KEEPALIVE_RETRIES);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(connect::TCP_USER_TIMEOUT)
}

/// `url` as connection settings, with [`tcp_settings`].
fn connection_info(url: &SecretUrl, key: &str) -> Result<ConnectionInfo, String> {
    url.expose()
        .into_connection_info()
        .map(|info| info.set_tcp_settings(tcp_settings()))
        .map_err(|e| format!("{key} {}: {e}", url.redacted()))
}

/// The certificates of `redis.tls_*`, when any is set (the system's roots otherwise).
fn certificates(config: &Config) -> Result<Option<redis::TlsCertificates>, String> {
    let r = &config.redis;
    if r.tls_ca_file.is_none() && r.tls_cert_file.is_none() {
        return Ok(None);
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{key} {}: {e}", path.display()))
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
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// What a failure to build a client with the `redis.tls_*` files says: which files.
fn tls_files_failed(config: &Config, e: &dyn std::fmt::Display) -> String {
    let r = &config.redis;
    let files: Vec<String> = [
        ("redis.tls_ca_file", &r.tls_ca_file),
        ("redis.tls_cert_file", &r.tls_cert_file),
        ("redis.tls_key_file", &r.tls_key_file),
    ]
    .into_iter()
    .filter_map(|(key, path)| Some(format!("{key} {}", path.as_ref()?.display())))
    .collect();
    format!("{}: {e}", files.join(", "))
}

/// The settings of `template` (user, password, database, TLS or not) for the server at
/// `host:port`, with [`tcp_settings`].
fn at_address(
    template: Option<&ConnectionInfo>,
    host: &str,
    port: u16,
) -> redis::RedisResult<ConnectionInfo> {
    let tls = template.is_some_and(|t| matches!(t.addr(), redis::ConnectionAddr::TcpTls { .. }));
    let addr = match tls {
        true => redis::ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        },
        false => redis::ConnectionAddr::Tcp(host.to_owned(), port),
    };
    let info = match template {
        Some(template) => template.clone().set_addr(addr),
        None => addr.into_connection_info()?,
    };
    Ok(info.set_tcp_settings(tcp_settings()))
}

/// A client for one server at `info`, with the certificates of `redis.tls_*`.
fn single_client(config: &Config, info: ConnectionInfo) -> Result<redis::Client, String> {
    crate::tls::provider();
    match certificates(config)? {
        None => redis::Client::open(info).map_err(|e| e.to_string()),
        Some(certificates) => redis::Client::build_with_tls(info, certificates)
            .map_err(|e| tls_files_failed(config, &e)),
    }
}

/// `redis.password_file`, read for every new connection: a rotated password needs no restart.
#[derive(Clone)]
struct PasswordFile {
    username: String,
    path: std::path::PathBuf,
}

impl PasswordFile {
    fn of(config: &Config, info: &ConnectionInfo) -> Option<PasswordFile> {
        let path = config.redis.password_file.clone()?;
        let username = info
            .redis_settings()
            .username()
            .unwrap_or("default")
            .to_owned();
        Some(PasswordFile { username, path })
    }
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

/// Where the near cache hears from Redis (`store::near`): the push messages of every connection
/// that may carry a tracked read (`invalidate`), and the news that one was lost or replaced
/// (`Disconnection`, from the driver or from [`lost`]).
pub type Pushes = tokio::sync::mpsc::UnboundedSender<redis::PushInfo>;

/// Tells the near cache a connection that may have carried tracked reads is gone: whatever Redis
/// would have told it there is lost.
fn lost(pushes: &Option<Pushes>) {
    if let Some(pushes) = pushes {
        let _ = pushes.send(redis::PushInfo {
            kind: redis::PushKind::Disconnection,
            data: Vec::new(),
        });
    }
}

/// A lazily made, reconnecting connection to one server at `info`; its calls time out after
/// `response_timeout` (`None`: only the caller's own bound applies). With `pushes`, it speaks
/// RESP3 and hands its push messages there.
fn manager(
    config: &Config,
    info: ConnectionInfo,
    response_timeout: Option<Duration>,
    pushes: Option<&Pushes>,
) -> Result<ConnectionManager, String> {
    let password = PasswordFile::of(config, &info);
    let info = match pushes {
        Some(_) => {
            let resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info.set_redis_settings(resp3)
        }
        None => info,
    };
    let client = single_client(config, info)?;
    let timeout = config.redis_timeout();
    let mut manager_config = ConnectionManagerConfig::new()
        .set_response_timeout(response_timeout)
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500));
    if let Some(password) = password {
        manager_config = manager_config.set_credentials_provider(password);
    }
    if let Some(pushes) = pushes {
        manager_config = manager_config.set_push_sender(pushes.clone());
    }
    ConnectionManager::new_lazy_with_config(client, manager_config).map_err(|e| e.to_string())
}

/// The connection `redis.mode` asks for, made lazily: a Redis that is down now is not an error.
/// With `pushes`, the connections that carry the request path's reads (the one server, each
/// Cluster node, Sentinel's primary) speak RESP3 and hand their push messages there.
pub fn connect(config: &Config, pushes: Option<Pushes>) -> Result<Conn, String> {
    let r = &config.redis;
    match r.mode {
        RedisMode::Standalone => {
            let url = r.url.as_ref().ok_or("redis.url is not set")?;
            let info = connection_info(url, "redis.url")?;
            manager(config, info, Some(config.redis_timeout()), pushes.as_ref()).map(Conn::Single)
        }
        RedisMode::Cluster => {
            let seeds = r
                .url
                .iter()
                .map(|url| connection_info(url, "redis.url"))
                .chain(r.urls.iter().map(|url| connection_info(url, "redis.urls")))
                .collect::<Result<Vec<_>, _>>()?;
            let first = seeds.first().ok_or("redis.url is not set")?.clone();
            let timeout = config.redis_timeout();
            let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
                .tcp_settings(tcp_settings())
                .connection_timeout(timeout.max(Duration::from_millis(250)))
                .response_timeout(timeout)
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(200);
            if let Some(password) = PasswordFile::of(config, &first) {
                builder = builder.set_credentials_provider(password);
            }
            crate::tls::provider();
            if let Some(certificates) = certificates(config)? {
                builder = builder.certs(certificates);
            }
            let client = builder.build().map_err(|e| tls_files_failed(config, &e))?;
            let settings = config.clone();
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(timeout.max(Duration::from_millis(250)))
                .set_response_timeout(timeout);
            let current = client.get_pending_async_connection_with_config(config.clone());
            Ok(Conn::Cluster(ClusterConn {
                inner: Arc::new(ClusterInner {
                    client,
                    config,
                    current: Mutex::new(current),
                    nodes: Mutex::default(),
                    settings,
                    template: first,
                    pushes,
                }),
            }))
        }
        RedisMode::Sentinel => SentinelConn::new(config, pushes).map(Conn::Sentinel),
    }
}

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
    /// The primary connected to, and where it is.
    current: Mutex<Option<(ConnectionManager, String)>>,
    /// One resolution at a time.
    resolving: tokio::sync::Mutex<()>,
    /// Where the primary's connection hands its push messages (the near cache's).
    pushes: Option<Pushes>,
}

impl SentinelConn {
    fn new(config: &Config, pushes: Option<Pushes>) -> Result<SentinelConn, String> {
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
        Ok(SentinelConn {
            inner: Arc::new(SentinelInner {
                config: config.clone(),
                sentinels,
                master,
                template,
                current: Mutex::new(None),
                resolving: tokio::sync::Mutex::new(()),
                pushes,
            }),
        })
    }

    fn current(&self) -> Option<(ConnectionManager, String)> {
        self.inner
            .current
            .lock()
            .expect("sentinel lock is never poisoned")
            .clone()
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
                let client = single_client(&self.inner.config, sentinel.clone()).map_err(|e| {
                    redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "sentinel", e))
                })?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.inner.master)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
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
        if let Some((conn, _)) = self.current() {
            return Ok(conn);
        }
        let _one = self.inner.resolving.lock().await;
        if let Some((conn, _)) = self.current() {
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
        *self
            .inner
            .current
            .lock()
            .expect("sentinel lock is never poisoned") = Some((conn.clone(), address));
        Ok(conn)
    }

    /// Drops the connection after `e` if it says the primary is gone or demoted.
    fn after(&self, e: &redis::RedisError) {
        let demoted = e.code() == Some("READONLY");
        if demoted || e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
            self.forget();
        }
    }

    fn forget(&self) {
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
        if self.current().is_some_and(|(_, at)| at != address) {
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
        loop {
            for sentinel in &self.inner.sentinels {
                let subscribed = async {
                    let client = single_client(&self.inner.config, sentinel.clone()).ok()?;
                    let mut pubsub = client.get_async_pubsub().await.ok()?;
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
                        if name == master {
                            tracing::warn!(master = %format!("{ip}:{port}"), "sentinel names a new redis master: following it");
                            self.forget();
                        }
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn command(&self, cmd: &Cmd) -> redis::RedisResult<Value> {
        let mut conn = self.connection().await?;
        let result = conn.req_packed_command(cmd).await;
        match &result {
            Err(e) => self.after(e),
            Ok(Value::ServerError(e)) if e.code() == "READONLY" => self.forget(),
            Ok(_) => {}
        }
        result
    }

    async fn commands(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_slots_answer_is_checked_before_it_is_used() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let range = |from: i64, to: i64, port: i64, id: &str| {
            Value::Array(vec![
                Value::Int(from),
                Value::Int(to),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(port), bulk(id)]),
            ])
        };
        let primaries = parse_cluster_slots(Value::Array(vec![
            range(5461, 16383, 7001, "b"),
            range(0, 100, 7000, "a"),
            range(101, 5460, 7000, "a"),
        ]))
        .unwrap();
        assert_eq!(primaries.len(), 2);
        assert_eq!(primaries[0].address, "127.0.0.1:7000");
        assert_eq!(primaries[0].ranges, [(0, 100), (101, 5460)]);
        for hostile in [
            Value::Array(vec![range(0, 16384, 7000, "a")]),
            Value::Array(vec![range(-1, 5, 7000, "a")]),
            Value::Array(vec![range(9, 5, 7000, "a")]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(5)])]),
            Value::Array(vec![bulk("nonsense")]),
            bulk("not an array"),
        ] {
            let e = parse_cluster_slots(hostile).unwrap_err();
            assert!(e.to_string().contains("CLUSTER SLOTS"), "{e}");
        }
        // A slot past the table is not cacheward's, rather than a panic.
        assert!(!Keys::new("user:", true).in_use(u16::MAX));
    }

    #[test]
    fn slots_are_computed_as_redis_cluster_does() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    #[test]
    fn every_slot_gets_a_fence_and_an_epoch_key_of_its_own() {
        let keys = Keys::new("user:", true);
        for slot in [0u16, 1, 5461, 10923, 16383] {
            assert_eq!(slot_of(keys.fence(slot).as_bytes()), slot);
            assert_eq!(slot_of(keys.epoch(slot).as_bytes()), slot);
            assert!(keys.fence(slot).starts_with("user:\0"));
        }
        assert_eq!(keys.slots().len(), SLOTS);
        // A prefix with a hash tag puts every key in one slot.
        let tagged = Keys::new("{users}:", true);
        let slot = slot_of(b"users");
        assert_eq!(tagged.slots(), vec![slot]);
        assert_eq!(slot_of(tagged.fence(slot).as_bytes()), slot);
        assert_eq!(tagged.slot(&tagged.user("anyone")), slot);
        // One server: one fence, the prefix.
        let single = Keys::new("user:", false);
        assert_eq!(single.fence(single.slot("user:a")), "user:");
        assert_eq!(single.epoch(0), "user:\0epoch");
    }
}
