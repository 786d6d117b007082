//! `update`: a declared table's row, found by its key, gets the given columns (its key's among
//! them, if asked), write-through; answers the row and its version, `not_found` when no row has
//! that key.

use std::sync::Arc;

use super::params::{key_text, take_object, take_string, writable_table, Params};
use super::upsert::RowResult;
use super::{reply, Call};
use crate::rpc::encode::Id;
use crate::rpc::error::RpcError;
use crate::service::Service;

pub fn parse(params: &mut Params) -> Result<Call, RpcError> {
    Ok(Call::Update {
        table: take_string(params, "table")?
            .ok_or_else(|| RpcError::invalid_params("invalid params: missing table"))?,
        key: take_object(params, "key")?,
        set: take_object(params, "set")?,
    })
}

pub async fn run(
    service: &Arc<Service>,
    id: Option<&Id>,
    table: String,
    key: Params,
    set: Params,
) -> Result<Vec<u8>, RpcError> {
    let table = writable_table(service, &table)?;
    let key = key_text(&table, &key, None)?;
    let entry = service.update_row(table, key, set).await?;
    Ok(reply(id, RowResult::of(&entry, None)))
}
