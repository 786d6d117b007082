//! `delete`: a user is removed, write-through; answers the version the deletion is known by.

use std::sync::Arc;

use serde::Serialize;

use super::params::{take_username, Params};
use super::{reply, Call};
use crate::rpc::encode::Id;
use crate::rpc::error::RpcError;
use crate::service::{Service, ServiceError};

pub fn parse(params: &mut Params) -> Result<Call, RpcError> {
    Ok(Call::Delete {
        username: take_username(params, "username")?,
    })
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
