//! `GET`, `MGET` and `EXISTS` on the read path: a Redis key names its table by its prefix and its
//! row by the rest (the layout cacheward writes, docs/reference.md), and is answered as the
//! JSON-RPC `get` would be (near cache, Redis, single flight, PostgreSQL and a fill), with the row
//! as a bulk string and nil for a row that does not exist. The reads a client pipelined together
//! are one call to the read path.

use std::sync::Arc;

use bytes::Bytes;

use super::frame::shown;
use super::frame::Reply;
use crate::model::key::Key;
use crate::rpc::methods::params::validate_username;
use crate::service::{Service, ServiceError};

/// The key a Redis key names, or the `-ERR` message saying why it names none.
pub fn resolve(service: &Service, redis_key: &Bytes) -> Result<Key, String> {
    let key = service.cache().key_of(redis_key).ok_or_else(|| {
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
    if key.is_user() {
        validate_username(key.as_str())
            .map_err(|e| invalid(format!("names no user: the username {e}")))?;
        return Ok(key);
    }
    let name = service.tables.name(key.table()).to_owned();
    let table = crate::rpc::methods::params::table(service, &name)
        .map_err(|e| format!("ERR {}", e.message))?;
    table
        .checked_text(key.as_str())
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

/// Reads that a client pipelined: each one's kind, protocol and keys.
#[derive(Default)]
pub struct Reads {
    pub items: Vec<(ReadKind, Reply, std::ops::Range<usize>)>,
    pub keys: Vec<Key>,
}

impl Reads {
    pub fn push(&mut self, kind: ReadKind, reply: Reply, keys: Vec<Key>) {
        let from = self.keys.len();
        self.keys.extend(keys);
        self.items.push((kind, reply, from..self.keys.len()));
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
        for (kind, reply, range) in self.items {
            let answers = &found[range.clone()];
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
        out
    }
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
        Ok((json, _)) if key.is_user() => reply.bulk(out, json.as_bytes()),
        Ok((entry, _)) => match crate::rpc::encode::row_of(entry) {
            Some(row) => reply.bulk(out, row.as_bytes()),
            None => reply.error(out, "ERR the cached entry cannot be read"),
        },
        Err(_) => reply.nil(out),
    }
}
