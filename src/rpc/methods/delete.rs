//! `delete`: a user, or a declared table's row by its key, is removed, write-through; answers the
//! version the deletion is known by.

use std::sync::Arc;

use serde::Serialize;

use super::params::{key_text, take_object, take_string, take_username, writable_table, Params};
use super::{reply, Call};
use crate::rpc::encode::Id;
use crate::rpc::error::RpcError;
use crate::service::{Service, ServiceError};

pub fn parse(params: &mut Params) -> Result<Call, RpcError> {
    Ok(match take_string(params, "table")? {
        None => Call::Delete {
            username: take_username(params, "username")?,
        },
        Some(table) => Call::DeleteRow {
            table,
            key: take_object(params, "key")?,
        },
    })
}

/// `delete` of a declared table's row.
pub async fn run_row(
    service: &Arc<Service>,
    id: Option<&Id>,
    table: String,
    key: Params,
) -> Result<Vec<u8>, RpcError> {
    let table = writable_table(service, &table)?;
    let key = key_text(&table, &key, None)?;
    let version = service.delete_row(table, key).await?;
    Ok(reply(
        id,
        DeleteResult {
            deleted: version.is_some(),
            version: version.unwrap_or(0),
        },
    ))
}

/// The result of `delete`.
#[derive(Serialize)]
pub struct DeleteResult {
    pub deleted: bool,
    /// The version the deletion is known by; 0 when nothing was deleted.
    pub version: i64,
}

pub async fn run(
    service: &Arc<Service>,
    id: Option<&Id>,
    username: String,
) -> Result<Vec<u8>, ServiceError> {
    let version = service.delete(username).await?;
    let deleted = DeleteResult {
        deleted: version.is_some(),
        version: version.unwrap_or(0),
    };
    Ok(reply(id, deleted))
}
