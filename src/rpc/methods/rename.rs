//! `rename`: a user gets a new name, write-through (the old name's entry becomes a tombstone).

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::params::{take_username, Params};
use super::{raw, reply, Call};
use crate::rpc::encode::Id;
use crate::rpc::error::RpcError;
use crate::service::{Service, ServiceError};

pub fn parse(params: &mut Params) -> Result<Call, RpcError> {
    Ok(Call::Rename {
        username: take_username(params, "username")?,
        new_username: take_username(params, "new_username")?,
    })
}

/// The result of `rename`.
#[derive(Serialize)]
pub struct RenameResult<'a> {
    pub user: &'a RawValue,
}

pub async fn run(
    service: &Arc<Service>,
    id: Option<&Id>,
    username: String,
    new_username: String,
) -> Result<Vec<u8>, ServiceError> {
    let json = service.rename(username, new_username).await?;
    Ok(reply(id, RenameResult { user: &raw(&json) }))
}
