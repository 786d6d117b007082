//! `GET`, `MGET` and `EXISTS` on the read path: a Redis key names its table by its prefix and its
//! row by the rest (the layout cacheward writes, docs/reference.md), and is answered as the
//! JSON-RPC `get` would be (near cache, Redis, single flight, PostgreSQL and a fill), with the row
//! as a bulk string and nil for a row that does not exist. The reads a client pipelined together
//! are one call to the read path.

use std::sync::Arc;

use bytes::Bytes;

use super::frame::shown;
use super::frame::Reply;
use crate::model::key::{Key, KeyRef, TableId};
use crate::rpc::methods::params::validate_username;
use crate::service::{Service, ServiceError};

/// The key a Redis key names, or the `-ERR` message saying why it names none.
pub fn resolve(service: &Service, redis_key: &Bytes) -> Result<Key, String> {
    resolve_ref(service, redis_key).map(KeyRef::to_key)
}

/// The keys Redis keys name, or the `-ERR` message of the first that names none.
pub fn resolve_all(service: &Service, redis_keys: &[Bytes]) -> Result<Vec<Key>, String> {
    redis_keys.iter().map(|k| resolve(service, k)).collect()
}

/// [`resolve`], borrowed from `redis_key` (nothing allocated unless it names no key).
pub fn resolve_ref<'a>(service: &Service, redis_key: &'a [u8]) -> Result<KeyRef<'a>, String> {
    let key = service.cache().key_ref_of(redis_key).ok_or_else(|| {
        format!(
            "ERR key '{}' is under no table's prefix (users: '{}'{})",
            shown(redis_key),
            service.cache().redis_key(&Key::user("")),
            service
                .tables
                .names()
                .iter()
                .map(|n| format!(", {n}"))
                .collect::<String>(),
        )
    })?;
    let invalid = |why: String| format!("ERR key '{}' {why}", shown(redis_key));
    if key.table == TableId::USERS {
        validate_username(key.text)
            .map_err(|e| invalid(format!("names no user: the username {e}")))?;
        return Ok(key);
    }
    let name = service.tables.name(key.table).to_owned();
    let table = crate::rpc::methods::params::table(&service.tables, &name)
        .map_err(|e| format!("ERR {}", e.message))?;
    table
        .checked_text(key.text)
        .map_err(|e| match e.column.is_empty() {
            true => invalid(format!("names no row of table {name}: {}", e.reason)),
            false => invalid(format!(
                "names no row of table {name}: key column {:?} {}",
                e.column, e.reason
            )),
        })?;
    Ok(key)
}

/// What a read asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    Get,
    Mget,
    Exists,
}

/// Reads that a client pipelined: each one's kind, protocol, keys, and whether its client
/// caches the answer.
#[derive(Default)]
pub struct Reads {
    pub items: Vec<(ReadKind, Reply, std::ops::Range<usize>, bool)>,
    pub keys: Vec<Key>,
    /// Where the tracked answers that nothing is known to watch are voided: the connection's
    /// tracking sink, which writes them after these answers (or redirects them).
    pub voids: Option<Arc<super::tracking::Sink>>,
}

impl Reads {
    pub fn push(&mut self, kind: ReadKind, reply: Reply, keys: Vec<Key>, tracked: bool) {
        let from = self.keys.len();
        self.keys.extend(keys);
        self.items
            .push((kind, reply, from..self.keys.len(), tracked));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Runs them as one read of every key; their answers, in order.
    pub async fn run(self, service: &Arc<Service>) -> Vec<u8> {
        let found = match self.keys.is_empty() {
            true => Vec::new(),
            false => {
                service
                    .get_many(&self.keys, &vec![None; self.keys.len()])
                    .await
            }
        };
        let mut out = Vec::with_capacity(self.keys.len() * 128);
        // Answers a tracking client caches that nothing is known to watch: voided behind their
        // replies (see `resp::tracking`).
        let mut unwatched = Vec::new();
        for (kind, reply, range, tracked) in self.items {
            let answers = &found[range.clone()];
            if tracked {
                for (key, answer) in self.keys[range.clone()].iter().zip(answers) {
                    if !watched(service, key, answer) {
                        unwatched.push(bytes::Bytes::from(service.cache().redis_key(key)));
                    }
                }
            }
            // A backend that failed fails the whole command, as one error.
            if let Some(Err(e)) = answers.iter().find(|a| matches!(a, Err(e) if !missing(e))) {
                reply.error(&mut out, &format!("ERR {e}"));
                continue;
            }
            match kind {
                ReadKind::Exists => {
                    let n = answers.iter().filter(|a| a.is_ok()).count();
                    reply.int(&mut out, n as i64);
                }
                ReadKind::Get => value(reply, &mut out, &self.keys[range.start], &answers[0]),
                ReadKind::Mget => {
                    reply.array(&mut out, answers.len());
                    for (key, answer) in self.keys[range].iter().zip(answers) {
                        value(reply, &mut out, key, answer);
                    }
                }
            }
        }
        if let (false, Some(voids)) = (unwatched.is_empty(), &self.voids) {
            unwatched.dedup();
            service
                .stats
                .resp
                .invalidations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            voids.owe(super::tracking::Push::Keys(unwatched));
        }
        out
    }
}

/// Whether what a tracked read answered is known to be watched: the near cache holds exactly it
/// (it keeps only what Redis tracks for this daemon, and drops it at any change), so a change
/// after it will be heard. A row that does not exist, one read from the database, one the near
/// cache no longer (or never) held as answered is not; nor is any of a key the cache is not
/// trusted for (users' while their capture does not fire: a change would not be heard).
fn watched(
    service: &Service,
    key: &Key,
    answer: &Result<(String, crate::service::Source), ServiceError>,
) -> bool {
    match answer {
        Ok(_) if !service.cache_trusted_for(key) => false,
        Ok((json, _)) => service
            .cache()
            .near_peek(key)
            .is_some_and(|held| held.json == *json),
        Err(_) => false,
    }
}

/// A `GET` of `key` answered from the near cache alone (see [`Service::get_near`]), written to
/// `out`; `false` (nothing written) when the read path must answer it. An answer the near cache
/// holds is watched (see `resp::tracking`): nothing is owed behind it.
pub fn get_near(service: &Service, reply: Reply, key: KeyRef, out: &mut Vec<u8>) -> bool {
    let users = key.table == TableId::USERS;
    service
        .get_near(&key, |json| live(reply, out, users, json))
        .is_some()
}

/// An `MGET` or `EXISTS` of `redis_keys` answered from the near cache alone, written to `out`,
/// when it holds every one of them (each key borrowed from the request, nothing allocated);
/// `false` (nothing written) when any is the read path's to answer — one it lacks, or one that
/// names no key (whose error the general path words).
pub fn many_near(
    service: &Service,
    kind: ReadKind,
    reply: Reply,
    redis_keys: &[Bytes],
    out: &mut Vec<u8>,
) -> bool {
    let start = out.len();
    let held = |key: &Bytes, out: &mut Vec<u8>| match resolve_ref(service, key) {
        Ok(key) if kind == ReadKind::Exists => service.get_near(&key, |_| ()).is_some(),
        Ok(key) => get_near(service, reply, key, out),
        Err(_) => false,
    };
    if kind != ReadKind::Exists {
        reply.array(out, redis_keys.len());
    }
    if !redis_keys.iter().all(|key| held(key, out)) {
        out.truncate(start);
        return false;
    }
    if kind == ReadKind::Exists {
        reply.int(out, redis_keys.len() as i64);
    }
    true
}

/// Whether the read path's error says only that the row does not exist.
fn missing(e: &ServiceError) -> bool {
    matches!(
        e,
        ServiceError::NotFound(_) | ServiceError::RowNotFound { .. }
    )
}

/// One key's answer: USER for a user, ROW for a declared table's row, nil when none.
fn value(
    reply: Reply,
    out: &mut Vec<u8>,
    key: &Key,
    answer: &Result<(String, crate::service::Source), ServiceError>,
) {
    match answer {
        Ok((json, _)) => live(reply, out, key.is_user(), json),
        Err(_) => reply.nil(out),
    }
}

/// A row's answer from what the read path answers for it: USER as it is, ROW cut out of an entry.
fn live(reply: Reply, out: &mut Vec<u8>, user: bool, json: &str) {
    if user {
        return reply.bulk(out, json.as_bytes());
    }
    match crate::rpc::encode::row_of(json) {
        Some(row) => reply.bulk(out, row.as_bytes()),
        None => reply.error(out, "ERR the cached entry cannot be read"),
    }
}
