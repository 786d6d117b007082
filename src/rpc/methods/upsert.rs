//! `upsert`: a declared table's row inserted, or its given columns updated when its key exists
//! (INSERT … ON CONFLICT DO UPDATE), write-through; answers the row, its version and whether it
//! was created.

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::params::{take_object, take_string, writable_table, Params};
use super::{raw, reply, Call};
use crate::rpc::encode::Id;
use crate::rpc::error::RpcError;
use crate::service::Service;

pub fn parse(params: &mut Params) -> Result<Call, RpcError> {
    Ok(Call::Upsert {
        table: take_string(params, "table")?
            .ok_or_else(|| RpcError::invalid_params("invalid params: missing table"))?,
        row: take_object(params, "row")?,
    })
}

/// A declared table's row as answered: ROW and its version.
#[derive(Serialize)]
pub struct RowResult {
    pub row: Box<RawValue>,
    pub version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
}

impl RowResult {
    /// From a stored entry `{"version":N,"row":ROW}`.
    pub fn of(entry: &str, created: Option<bool>) -> RowResult {
        #[derive(serde::Deserialize)]
        struct Entry {
            version: i64,
            row: Box<RawValue>,
        }
        match serde_json::from_str::<Entry>(entry) {
            Ok(e) => RowResult {
                row: e.row,
                version: e.version,
                created,
            },
            Err(_) => RowResult {
                row: raw("null"),
                version: 0,
                created,
            },
        }
    }
}

pub async fn run(
    service: &Arc<Service>,
    id: Option<&Id>,
    table: String,
    row: Params,
) -> Result<Vec<u8>, RpcError> {
    let table = writable_table(service, &table)?;
    let (entry, created) = service.upsert_row(table, row).await?;
    Ok(reply(id, RowResult::of(&entry, Some(created))))
}
