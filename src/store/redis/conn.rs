//! One connection to whatever `redis.mode` names (one server, a Cluster, a primary that Sentinel
//! names), multiplexed, reconnecting, shared by all tasks; and the primaries behind it.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::client::{connection_info, manager, Pushes};
use super::cluster::ClusterConn;
use super::keys::Primary;
use super::sentinel::SentinelConn;
use crate::config::{Config, RedisMode};

/// One connection to whatever `redis.mode` names, multiplexed, reconnecting, shared by all tasks.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConn),
    Sentinel(SentinelConn),
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

impl Conn {
    /// Replaces a Cluster connection with a new one (see [`ClusterConn`]); true if it did.
    pub fn renew(&self) -> bool {
        match self {
            Conn::Cluster(c) => {
                c.renew();
                true
            }
            _ => false,
        }
    }

    /// Under Sentinel, drops the connection to the primary (it was found demoted): the next call
    /// asks the sentinels where the primary is now. Elsewhere nothing: the topology is read anew
    /// at each look.
    pub fn forget_primary(&self) {
        if let Conn::Sentinel(c) = self {
            c.forget();
        }
    }

    /// Which connection carries the calls (see [`SentinelConn::generation`]): under Sentinel the
    /// current one's number (`None` while there is none); elsewhere always the same, since the
    /// one server and each Cluster node stay at their addresses.
    pub fn generation(&self) -> Option<u64> {
        match self {
            Conn::Sentinel(c) => c.generation(),
            _ => Some(0),
        }
    }

    /// Under Sentinel, how many times the connection went to another server (see
    /// [`SentinelConn::moves`]); elsewhere 0.
    pub fn moves(&self) -> u64 {
        match self {
            Conn::Sentinel(c) => c.moves(),
            _ => 0,
        }
    }

    /// Under Sentinel, connects to the primary now if there is no connection; elsewhere nothing
    /// (connections are made as they are used).
    pub async fn connect(&self) -> redis::RedisResult<()> {
        match self {
            Conn::Sentinel(c) => c.connect().await,
            _ => Ok(()),
        }
    }

    /// Which server `primary` is across its restarts: the node id on a Cluster, the address of
    /// the master Sentinel named (connected to now), empty for the one server.
    pub fn server_of(&self, primary: &Primary) -> String {
        match self {
            Conn::Sentinel(c) => c.address().unwrap_or_default(),
            _ => primary.id.clone(),
        }
    }

    /// The primaries: the one server (standalone, Sentinel's current master), or every Cluster
    /// primary as `CLUSTER SLOTS` says, sorted by their first slot.
    pub async fn primaries(&mut self) -> redis::RedisResult<Vec<Primary>> {
        let Conn::Cluster(conn) = self else {
            return Ok(vec![Primary::one_server()]);
        };
        conn.primaries().await
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
        RedisMode::Cluster => ClusterConn::new(config, pushes).map(Conn::Cluster),
        RedisMode::Sentinel => SentinelConn::new(config, pushes).map(Conn::Sentinel),
    }
}
