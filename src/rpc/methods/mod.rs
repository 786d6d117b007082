//! The methods, one file each (mini-redis's `cmd/`): how its parameters are read (`parse`), which
//! use case it runs and how its answer is encoded (`run`). This file holds what they share: the
//! [`Call`] they parse into, the dispatch of a call to its method, and the error accounting.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::encode::{self, Id};
use super::error::{ErrorKind, RpcError};
use crate::service::Service;

pub mod delete;
pub mod get;
pub mod health;
pub mod params;
pub mod put;
pub mod rename;
pub mod stats;
pub mod update;
pub mod upsert;

/// The methods, as `method_not_found` lists them.
const METHODS: &str = "get, put, rename, delete, upsert, update, stats, health";

/// A method call with its checked parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Get {
        target: get::Target,
        /// Read-your-writes: the answer must reflect a state at least this new (docs/reference.md, "Read-your-writes").
        min_version: Option<i64>,
    },
    Put {
        username: String,
    },
    Rename {
        username: String,
        new_username: String,
    },
    Delete {
        username: String,
    },
    /// A declared table's row, inserted or updated.
    Upsert {
        table: String,
        row: Map<String, Value>,
    },
    /// A declared table's row, updated by its key.
    Update {
        table: String,
        key: Map<String, Value>,
        set: Map<String, Value>,
    },
    /// A declared table's row, deleted by its key.
    DeleteRow {
        table: String,
        key: Map<String, Value>,
    },
    Stats,
    Health,
}

impl Call {
    /// Whether the call changes data (a read-only peer may not make it).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Call::Put { .. }
                | Call::Rename { .. }
                | Call::Delete { .. }
                | Call::Upsert { .. }
                | Call::Update { .. }
                | Call::DeleteRow { .. }
        )
    }

    pub fn method(&self) -> &'static str {
        match self {
            Call::Get { .. } => "get",
            Call::Put { .. } => "put",
            Call::Rename { .. } => "rename",
            Call::Delete { .. } | Call::DeleteRow { .. } => "delete",
            Call::Upsert { .. } => "upsert",
            Call::Update { .. } => "update",
            Call::Stats => "stats",
            Call::Health => "health",
        }
    }
}

/// Reads `params` for `method`: an object of named parameters, each known to the method.
pub fn parse(method: &str, params: Option<Value>) -> Result<Call, RpcError> {
    let mut params = match params {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(RpcError::invalid_params(format!(
                "invalid params: params must be an object of named parameters, got {}",
                params::type_name(&other)
            )))
        }
    };
    let call = match method {
        "get" => get::parse(&mut params)?,
        "put" => put::parse(&mut params)?,
        "rename" => rename::parse(&mut params)?,
        "delete" => delete::parse(&mut params)?,
        "upsert" => upsert::parse(&mut params)?,
        "update" => update::parse(&mut params)?,
        "stats" => Call::Stats,
        "health" => Call::Health,
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(RpcError::new(
                ErrorKind::MethodNotFound,
                format!("method not found: \"{shown}\" (methods: {METHODS})"),
            ));
        }
    };
    if let Some(extra) = params.keys().next() {
        return Err(RpcError::invalid_params(format!(
            "invalid params: unknown parameter \"{extra}\" for {method}"
        )));
    }
    Ok(call)
}

/// Answers one call: its answer line, or nothing for a notification (`id` is `None`). A `get` is
/// answered as a batch of one ([`get::batch`]).
pub async fn run(service: &Arc<Service>, id: Option<Id>, call: Call) -> Vec<u8> {
    tracing::debug!(method = call.method(), "request");
    let method = call.method();
    let id = id.as_ref();
    let answer = match call {
        Call::Get {
            target,
            min_version,
        } => return get::batch(service, vec![(id.cloned(), target, min_version)]).await,
        Call::Put { username } => put::run(service, id, username)
            .await
            .map_err(RpcError::from),
        Call::Rename {
            username,
            new_username,
        } => rename::run(service, id, username, new_username)
            .await
            .map_err(RpcError::from),
        Call::Delete { username } => delete::run(service, id, username)
            .await
            .map_err(RpcError::from),
        Call::Upsert { table, row } => upsert::run(service, id, table, row).await,
        Call::Update { table, key, set } => update::run(service, id, table, key, set).await,
        Call::DeleteRow { table, key } => delete::run_row(service, id, table, key).await,
        Call::Stats => Ok(stats::run(service, id)),
        Call::Health => Ok(health::run(service, id)),
    };
    answer.unwrap_or_else(|error| {
        failed(service, method, &error);
        id.map(|id| encode::encode_error(id, &error))
            .unwrap_or_default()
    })
}

/// A success line for `id`; nothing for a notification.
fn reply(id: Option<&Id>, result: impl serde::Serialize) -> Vec<u8> {
    id.map(|id| encode::encode_result(id, result))
        .unwrap_or_default()
}

/// A user's JSON as stored, embedded without re-encoding (`null` if it is not JSON).
fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

/// Counts and logs (at debug) a request that failed.
pub fn failed(service: &Service, method: &str, error: &RpcError) {
    service.stats.errors.fetch_add(1, Relaxed);
    tracing::debug!(
        method,
        kind = error.kind.name(),
        message = %error.message,
        "request failed"
    );
}
