//! A Redis Cluster behind the cache: the driver's connection (renewable, since its recovery can
//! stall after a primary dies), the daemon's own connection to each node, and `CLUSTER SLOTS`
//! read without trusting it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionInfo, Value};

use super::client::{
    at_address, certificates, connection_info, lost, manager, tcp_settings, tls_files_failed,
    Password, Pushes,
};
use super::keys::{Primary, SLOTS};
use crate::config::Config;

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
    /// The cluster connection of `redis.url` and `redis.urls` (the seeds), made lazily.
    pub fn new(config: &Config, pushes: Option<Pushes>) -> Result<ClusterConn, String> {
        let r = &config.redis;
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
        if let Some(password) = Password::of(config, &first) {
            builder = builder.set_credentials_provider(password);
        }
        crate::support::tls::provider();
        if let Some(certificates) = certificates(config)? {
            builder = builder.certs(certificates);
        }
        let client = builder.build().map_err(|e| tls_files_failed(config, &e))?;
        let settings = config.clone();
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(timeout.max(Duration::from_millis(250)))
            .set_response_timeout(timeout);
        let current = client.get_pending_async_connection_with_config(config.clone());
        Ok(ClusterConn {
            inner: Arc::new(ClusterInner {
                client,
                config,
                current: Mutex::new(current),
                nodes: Mutex::default(),
                settings,
                template: first,
                pushes,
            }),
        })
    }

    /// Replaces the driver's connection and forgets every node connection (see [`ClusterConn`]).
    pub fn renew(&self) {
        let c = &self.inner;
        let fresh = c
            .client
            .get_pending_async_connection_with_config(c.config.clone());
        *c.current.lock().expect("cluster lock is never poisoned") = fresh;
        c.nodes
            .lock()
            .expect("nodes lock is never poisoned")
            .clear();
        lost(&c.pushes);
    }

    /// Every primary as `CLUSTER SLOTS` says, sorted by their first slot.
    pub async fn primaries(&self) -> redis::RedisResult<Vec<Primary>> {
        let reply = self
            .get()
            .req_packed_command(redis::cmd("CLUSTER").arg("SLOTS"))
            .await?;
        parse_cluster_slots(reply)
    }

    /// [`ClusterConn::primaries`] as the node at `address` answers it.
    pub async fn primaries_at(&self, address: &str) -> redis::RedisResult<Vec<Primary>> {
        let reply = self
            .node(address)?
            .req_packed_command(redis::cmd("CLUSTER").arg("SLOTS"))
            .await?;
        parse_cluster_slots(reply)
    }

    /// The connection to the node at `address` (`host:port`), made on first use.
    pub fn node(&self, address: &str) -> redis::RedisResult<ConnectionManager> {
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

    pub fn get(&self) -> ClusterConnection {
        self.inner
            .current
            .lock()
            .expect("cluster lock is never poisoned")
            .clone()
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
    }
}
