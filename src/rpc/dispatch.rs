//! A method call → its use case: runs each call on the [`Service`] and encodes its answer line.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::rpc::protocol::{
    self, Call, DeleteResult, ErrorKind, Id, PutResult, RenameResult, RpcError,
};
use crate::service::{Service, ServiceError};

/// One `get`: its id (`None` for a notification), username and `min_version`.
pub type GetItem = (Option<Id>, String, Option<i64>);

/// Answers gets read together: one Redis read for all of them, one buffer of answer lines (none
/// for a notification, whose id is `None`), in order.
pub async fn gets(service: &Arc<Service>, gets: Vec<GetItem>) -> Vec<u8> {
    let names: Vec<&str> = gets.iter().map(|(_, name, _)| name.as_str()).collect();
    let min_versions: Vec<Option<i64>> = gets.iter().map(|&(_, _, min)| min).collect();
    let answers = service.get_many(&names, &min_versions).await;
    let mut out = Vec::with_capacity(gets.len() * 256);
    for ((id, _, _), answer) in gets.iter().zip(answers) {
        let answer = answer.map_err(RpcError::from);
        if let Err(error) = &answer {
            failed(service, "get", error);
        }
        match (id, answer) {
            (None, _) => {}
            (Some(id), Ok((json, source))) => {
                protocol::encode_user_into(&mut out, id, &json, source.as_str())
            }
            (Some(id), Err(error)) => out.extend_from_slice(&protocol::encode_error(id, &error)),
        }
    }
    out
}

/// Answers one call: its answer line, or nothing for a notification (`id` is `None`). A `get` is
/// answered as a batch of one.
pub async fn call(service: &Arc<Service>, id: Option<Id>, call: Call) -> Vec<u8> {
    tracing::debug!(method = call.method(), "request");
    let method = call.method();
    let id = id.as_ref();
    let answer = match call {
        Call::Get {
            username,
            min_version,
        } => return gets(service, vec![(id.cloned(), username, min_version)]).await,
        Call::Put { username } => service.put(username).await.map(|(json, created)| {
            let user = raw(&json);
            reply(
                id,
                PutResult {
                    user: &user,
                    created,
                },
            )
        }),
        Call::Rename {
            username,
            new_username,
        } => service
            .rename(username, new_username)
            .await
            .map(|json| reply(id, RenameResult { user: &raw(&json) })),
        Call::Delete { username } => service.delete(username).await.map(|version| {
            let deleted = DeleteResult {
                deleted: version.is_some(),
                version: version.unwrap_or(0),
            };
            reply(id, deleted)
        }),
        Call::Stats => Ok(reply(id, service.stats_report(false))),
        Call::Health => Ok(reply(id, service.health_report())),
    };
    answer.unwrap_or_else(|e| {
        let error = RpcError::from(e);
        failed(service, method, &error);
        id.map(|id| protocol::encode_error(id, &error))
            .unwrap_or_default()
    })
}

/// A success line for `id`; nothing for a notification.
fn reply(id: Option<&Id>, result: impl serde::Serialize) -> Vec<u8> {
    id.map(|id| protocol::encode_result(id, result))
        .unwrap_or_default()
}

/// A user's JSON as stored, embedded without re-encoding (`null` if it is not JSON).
fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

/// What the client is told of a use case that failed.
impl From<ServiceError> for RpcError {
    fn from(e: ServiceError) -> Self {
        let kind = match &e {
            ServiceError::NotFound(_) => ErrorKind::NotFound,
            ServiceError::Conflict(_) => ErrorKind::Conflict,
            e if e.unavailable() => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        };
        let message = match &e {
            ServiceError::Postgres(_) | ServiceError::Redis(_) if kind == ErrorKind::Internal => {
                format!("internal error: {e}")
            }
            _ => e.to_string(),
        };
        RpcError::new(kind, message)
    }
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
