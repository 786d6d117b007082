//! `get`: a user by name, or a declared table's row by key or lookup (cache-aside), optionally
//! at least `min_version` new; the gets a client pipelined together are answered as one batch.

use std::sync::Arc;

use super::params::{self, take_object, take_string, take_username, take_version, Params};
use super::{failed, Call};
use crate::model::key::Key;
use crate::model::registry::Tables;
use crate::rpc::encode::{self, Id};
use crate::rpc::error::RpcError;
use crate::service::Service;

/// What a `get` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(String),
    /// A declared table's row: by its key, or by the lookup named.
    Row {
        table: String,
        lookup: Option<String>,
        key: Params,
    },
    /// A user or a row whose key the request fast path already resolved
    /// (`protocol::parse_line`).
    Key(Key),
}

impl Target {
    /// Whether it names a user (answered as `{"user": …}`), not a declared table's row.
    fn is_user(&self) -> bool {
        match self {
            Target::User(_) => true,
            Target::Row { .. } => false,
            Target::Key(key) => key.is_user(),
        }
    }
}

pub fn parse(params: &mut Params) -> Result<Call, RpcError> {
    let target = match take_string(params, "table")? {
        None => Target::User(take_username(params, "username")?),
        Some(table) => Target::Row {
            table,
            lookup: take_string(params, "lookup")?,
            key: take_object(params, "key")?,
        },
    };
    Ok(Call::Get {
        target,
        min_version: take_version(params, "min_version")?,
    })
}

/// One `get`: its id (`None` for a notification), target and `min_version`.
pub type GetItem = (Option<Id>, Target, Option<i64>);

/// The key `target` names, or why it names none.
pub fn key_of(tables: &Tables, target: &Target) -> Result<Key, RpcError> {
    match target {
        Target::User(name) => Ok(Key::user(name)),
        Target::Key(key) => Ok(key.clone()),
        Target::Row { table, lookup, key } => {
            let table = params::table(tables, table)?;
            let text = params::key_text(&table, key, lookup.as_deref())?;
            Ok(table.key(&text))
        }
    }
}

/// A get of `key` answered from the near cache alone (see `Service::get_near`), its answer
/// line written to `out`; `false` (nothing written) when the read path must answer it.
pub fn near(service: &Service, id: &Id, key: &Key, out: &mut Vec<u8>) -> bool {
    let answer = |json: &str| match key.is_user() {
        true => encode::encode_user_into(out, id, json, "cache"),
        false => encode::encode_row_into(out, id, json, "cache"),
    };
    service.get_near(key, answer).is_some()
}

/// Answers gets read together: one Redis read for all of them, one buffer of answer lines (none
/// for a notification, whose id is `None`), in order.
pub async fn batch(service: &Arc<Service>, gets: Vec<GetItem>) -> Vec<u8> {
    let mut keys = Vec::with_capacity(gets.len());
    let mut min_versions = Vec::with_capacity(gets.len());
    let named: Vec<Result<usize, RpcError>> = gets
        .iter()
        .map(|(_, target, min)| {
            let key = key_of(&service.tables, target)?;
            keys.push(key);
            min_versions.push(*min);
            Ok(keys.len() - 1)
        })
        .collect();
    let mut answers: Vec<Option<_>> = service
        .get_many(&keys, &min_versions)
        .await
        .into_iter()
        .map(Some)
        .collect();
    let mut out = Vec::with_capacity(gets.len() * 256);
    for ((id, target, _), at) in gets.iter().zip(named) {
        let answer = at.and_then(|at| {
            answers[at]
                .take()
                .expect("one answer per key")
                .map_err(RpcError::from)
        });
        if let Err(error) = &answer {
            failed(service, "get", error);
        }
        match (id, answer) {
            (None, _) => {}
            (Some(id), Ok((json, source))) => match target.is_user() {
                true => encode::encode_user_into(&mut out, id, &json, source.as_str()),
                false => encode::encode_row_into(&mut out, id, &json, source.as_str()),
            },
            (Some(id), Err(error)) => out.extend_from_slice(&encode::encode_error(id, &error)),
        }
    }
    out
}
