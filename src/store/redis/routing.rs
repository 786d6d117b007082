//! Where a command goes: each slot's commands in order, as few pipelines as the topology allows
//! (one on a single server, one per primary on a Cluster whose slot owners the health monitor has
//! seen), every call bounded in time. The topology varies here and in `conn`, nowhere above.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::confirm::Confirmations;
use super::conn::Conn;
use super::error::{CacheError, CacheErrorKind};
use super::keys::{Keys, Primary, Routes};
use crate::model::key::Key;
use crate::support::time::within;

/// What one slot's commands answered, and whether they went on a connection whose pushes reach
/// the near cache.
pub type Sent = (Result<Vec<redis::Value>, CacheError>, bool);

/// Bulk calls (a fence per slot, a drop per scan page) get this many request timeouts.
pub const BULK_TIMEOUTS: u32 = 20;

/// The connection, where keys live, and which primary serves which slot.
#[derive(Clone)]
pub struct Router {
    pub conn: Conn,
    pub keys: Keys,
    /// Which primary serves which slot, on a Cluster (see [`Router::send_per_slot`]).
    routes: Arc<Mutex<Option<Arc<Routes>>>>,
    /// `redis.timeout_ms`: the bound of every request-path call.
    pub timeout: Duration,
    /// Which nodes' connections the request path may take answers from.
    pub confirmed: Arc<Confirmations>,
}

impl Router {
    pub fn new(conn: Conn, keys: Keys, timeout: Duration) -> Router {
        Router {
            conn,
            keys,
            routes: Arc::default(),
            timeout,
            confirmed: Arc::default(),
        }
    }

    /// `call`, bounded by `redis.timeout_ms`.
    pub fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> impl std::future::Future<Output = Result<T, CacheError>> {
        within(self.timeout, call, CacheError::timeout)
    }

    /// `call`, bounded by `redis.timeout_ms` × [`BULK_TIMEOUTS`].
    pub fn bulk<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> impl std::future::Future<Output = Result<T, CacheError>> {
        within(self.timeout * BULK_TIMEOUTS, call, CacheError::timeout)
    }

    /// The slot of an entry's Redis key (0 for every key but on a Cluster).
    pub fn slot_of(&self, key: &Key) -> u16 {
        self.keys.slot(&self.keys.entry(key))
    }

    /// The positions of `keys` by the slot of their Redis key, in slot order (one group on a
    /// single server).
    pub fn by_slot<'a>(&self, keys: impl Iterator<Item = &'a Key>) -> BTreeMap<u16, Vec<usize>> {
        let mut slots: BTreeMap<u16, Vec<usize>> = Default::default();
        for (i, key) in keys.enumerate() {
            slots.entry(self.slot_of(key)).or_default().push(i);
        }
        slots
    }

    /// The primaries: the one server, or every Cluster primary (see [`Conn::primaries`]); on a
    /// Cluster, what they serve becomes the routes.
    pub async fn primaries(&self) -> Result<Vec<Primary>, CacheError> {
        let mut conn = self.conn.clone();
        let primaries = match (self.bounded(conn.primaries()).await, &self.conn) {
            (Ok(primaries), _) => primaries,
            // The driver asked a node that does not answer: ask the others known.
            (Err(e), Conn::Cluster(cluster)) => {
                let known = self.routes().map_or_else(Vec::new, |r| r.primaries.clone());
                let mut asked = None;
                for primary in &known {
                    if let Ok(answer) = self.bounded(cluster.primaries_at(&primary.address)).await {
                        asked = Some(answer);
                        break;
                    }
                }
                asked.ok_or(e)?
            }
            (Err(e), _) => return Err(e),
        };
        if self.keys.is_cluster() {
            let routes = Routes::new(&primaries);
            *self.routes.lock().expect("routes lock is never poisoned") = Some(Arc::new(routes));
        }
        Ok(primaries)
    }

    /// Which primary serves which slot, as last seen ([`Router::primaries`]); `None` but on a
    /// Cluster that was looked at.
    pub fn routes(&self) -> Option<Arc<Routes>> {
        self.routes
            .lock()
            .expect("routes lock is never poisoned")
            .clone()
    }

    /// Sends `pipeline` to `primary`, bounded by `bound`.
    pub async fn on(
        &self,
        primary: &Primary,
        pipeline: &redis::Pipeline,
        bound: Duration,
    ) -> Result<Vec<redis::Value>, CacheError> {
        let mut conn = self.conn.clone();
        within(bound, conn.on(primary, pipeline), CacheError::timeout).await
    }

    /// Sends one command to `primary`, bounded by `redis.timeout_ms`.
    pub async fn on_one(
        &self,
        primary: &Primary,
        cmd: &redis::Cmd,
    ) -> Result<redis::Value, CacheError> {
        let mut conn = self.conn.clone();
        self.bounded(conn.on_one(primary, cmd)).await
    }

    /// Sends each slot's commands in order, as few pipelines as the topology allows: on a
    /// Cluster whose slot owners the health monitor has seen, one pipeline per primary (its
    /// slots' commands one after another; each command names keys of one slot), all at once;
    /// otherwise one per slot (the driver routes each). One server: one pipeline. Answers per
    /// slot, in the order given; a pipeline that failed fails each of its slots.
    pub async fn send_per_slot(
        &self,
        slots: Vec<(u16, Vec<redis::Cmd>)>,
        timeout: Duration,
    ) -> Vec<Result<Vec<redis::Value>, CacheError>> {
        let sent = self.send_per_slot_via(slots, self.routes(), timeout).await;
        sent.into_iter().map(|(answer, _)| answer).collect()
    }

    /// [`Router::send_per_slot`], also telling per slot whether its pipeline went on a connection
    /// that hands its pushes to the near cache (the one server, Sentinel's primary, a Cluster
    /// node's own connection; not the Cluster driver's).
    pub async fn send_per_slot_via(
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
                        within(
                            timeout,
                            conn.on(&r.primaries[p], &pipeline),
                            CacheError::timeout,
                        )
                        .await
                    }
                    _ => {
                        let query = pipeline.query_async::<Vec<redis::Value>>(&mut conn);
                        within(timeout, query, CacheError::timeout).await
                    }
                };
                let answered = answered.and_then(|values| match values.len() == total {
                    true => Ok(values),
                    false => Err(CacheError::said(
                        CacheErrorKind::Server,
                        format!(
                            "a pipeline of {total} commands answered {} values",
                            values.len()
                        ),
                    )),
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
}
