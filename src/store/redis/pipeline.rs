//! The request path's Redis calls: reads and cache-aside fills queue while a pipeline is in
//! flight and go to Redis together, one pipeline per slot group (see [`Requests::run`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::error::{abandoned, decode, CacheError, CacheErrorKind};
use super::near::NearCache;
use super::routing::Router;
use super::scripts::{self, outcomes, Outcome};
use super::tracking::{caching, track, Refusal};
use crate::model::entry::{Live, Write};
use crate::support::workqueue::WorkQueue;

/// Queued calls per pipeline (a read is at most `socket.max_inflight` keys). One pipeline is in
/// flight at a time: that is what orders a read queued after a fill behind it.
const PIPELINE_OPS: usize = 64;

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
pub struct Read {
    pub values: Vec<Option<Live>>,
    pub tracked: Vec<bool>,
}

/// The queue of request-path calls and what sending them needs.
pub struct Requests {
    router: Router,
    near: Option<Arc<NearCache>>,
    ops: WorkQueue<Op>,
    refusal: Refusal,
}

impl Requests {
    pub fn new(router: Router, near: Option<Arc<NearCache>>) -> Requests {
        Requests {
            router,
            near,
            ops: WorkQueue::serial(),
            refusal: Refusal::default(),
        }
    }

    /// Reads `keys` (MGET) behind every call queued before it.
    pub async fn read(self: &Arc<Self>, keys: Vec<String>) -> Result<Read, CacheError> {
        let (reply, answer) = oneshot::channel();
        self.queue(Op::Read { keys, reply });
        answer.await.unwrap_or_else(|_| Err(abandoned()))
    }

    /// Queues `writes` behind the calls already queued and ahead of every read queued after this
    /// call returns; the returned future tells what each write did.
    pub fn fill(
        self: &Arc<Self>,
        writes: Vec<Write>,
    ) -> impl std::future::Future<Output = Result<Vec<Outcome>, CacheError>> {
        let (reply, answer) = oneshot::channel();
        self.queue(Op::Fill { writes, reply });
        async move { answer.await.unwrap_or_else(|_| Err(abandoned())) }
    }

    fn queue(self: &Arc<Self>, op: Op) {
        self.ops.push(op);
        self.start_pipeline();
    }

    fn start_pipeline(self: &Arc<Self>) {
        if let Some(slot) = self.ops.claim() {
            let requests = self.clone();
            tokio::spawn(async move {
                let ops = requests.ops.gather(PIPELINE_OPS).await;
                if !ops.is_empty() {
                    requests.run(ops).await;
                }
                drop(slot);
                requests.start_pipeline();
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
    async fn run(&self, ops: Vec<Op>) {
        /// Where one command's answer goes: the (op, index) of each key an MGET read, or the
        /// writes of one op a fill script carried.
        enum Part {
            /// `CLIENT GETNAME`, first in a pipeline that reads: whether the connection is the one
            /// the monitor confirmed (see `confirm`).
            Name,
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
        let routes = self.router.routes();
        let mut slots: BTreeMap<u16, SlotPipe> = Default::default();
        let mut answers: Vec<(Answer, Option<CacheError>)> = Vec::with_capacity(ops.len());
        for (op, queued) in ops.into_iter().enumerate() {
            match queued {
                Op::Read { keys, reply } => {
                    for (at, key) in keys.iter().enumerate() {
                        let slot = self.router.keys.slot(key);
                        let pipe = slots.entry(slot).or_default();
                        // Never through the Cluster driver: its connections hand pushes to no one
                        // (they speak RESP2, where an invalidation would land in the reply stream).
                        let reaches_near = !self.router.keys.is_cluster()
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
                    // fill in this pipeline reads what the fill replaces (unless the entry held
                    // is as new as the fill: then so is what that read finds).
                    if let Some(near) = &self.near {
                        for write in writes.iter() {
                            near.invalidate_written(write);
                        }
                    }
                    for (slot, at) in self.router.by_slot(writes.iter().map(Write::key)) {
                        let pipe = slots.entry(slot).or_default();
                        let carried: Vec<&Write> = at.iter().map(|&i| &writes[i]).collect();
                        pipe.cmds
                            .push(scripts::apply(&self.router.keys, slot, &carried));
                        pipe.parts.push(Part::Fill(op, at));
                    }
                    let none = vec![Outcome::Refused; writes.len()];
                    answers.push((Answer::Fill(reply, none), None));
                }
            }
        }
        // Which node each slot's pipeline goes to, as the confirmations know it (`None`: the
        // Cluster driver routes it, to a node the monitor may never have looked at).
        let node_of = |slot: u16| -> Option<&str> {
            match &routes {
                _ if !self.router.keys.is_cluster() => Some(""),
                Some(r) => r.owner(slot).map(|p| r.primaries[p].address.as_str()),
                None => None,
            }
        };
        for (_, pipe) in slots.iter_mut() {
            if pipe.parts.iter().any(|p| matches!(p, Part::Read(_))) {
                let mut name = redis::cmd("CLIENT");
                name.arg("GETNAME");
                pipe.cmds.insert(0, name);
                pipe.parts.insert(0, Part::Name);
            }
        }
        let slot_list: Vec<u16> = slots.keys().copied().collect();
        let (parts, cmds): (Vec<_>, Vec<_>) = slots
            .into_iter()
            .map(|(slot, pipe)| (pipe.parts, (slot, pipe.cmds)))
            .unzip();
        let sent = self
            .router
            .send_per_slot_via(cmds, routes.clone(), self.router.timeout)
            .await;
        let nodes = slot_list.into_iter().map(node_of);
        for ((parts, (values, pushed)), node) in parts.into_iter().zip(sent).zip(nodes) {
            let values = match values {
                Ok(values) => values,
                Err(e) => {
                    for part in parts {
                        match part {
                            Part::Name | Part::Track | Part::Caching => {}
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
            // Whether this slot's reads may be answered: a pipeline without reads checks nothing.
            let mut confirmed = true;
            for (part, value) in parts.into_iter().zip(values) {
                let tracked = std::mem::take(&mut caching) && tracking;
                match part {
                    Part::Name => confirmed = self.router.confirmed.accepts(node, &value),
                    Part::Read(targets) if !confirmed => {
                        let e = CacheError::said(
                            CacheErrorKind::Unconfirmed,
                            format!(
                                "the connection to {} was made since the last look",
                                node.filter(|n| !n.is_empty()).unwrap_or("redis")
                            ),
                        );
                        for (op, _) in targets {
                            answers[op].1.get_or_insert_with(|| e.clone());
                        }
                    }
                    Part::Track => {
                        tracking = pushed && value == redis::Value::Okay;
                        if let redis::Value::ServerError(e) = &value {
                            self.refusal.say(e);
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
}
