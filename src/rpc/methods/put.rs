//! `put`: get-or-create a user, write-through; answers the user and whether it was created.

use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::params::{take_username, Params};
use super::{raw, reply, Call};
use crate::rpc::encode::Id;
use crate::rpc::error::RpcError;
use crate::service::{Service, ServiceError};

pub fn parse(params: &mut Params) -> Result<Call, RpcError> {
    Ok(Call::Put {
        username: take_username(params, "username")?,
    })
}

/// The result of `put`.
#[derive(Serialize)]
pub struct PutResult<'a> {
    pub user: &'a RawValue,
    pub created: bool,
}

pub async fn run(
    service: &Arc<Service>,
    id: Option<&Id>,
    username: String,
) -> Result<Vec<u8>, ServiceError> {
    let (json, created) = service.put(username).await?;
    let user = raw(&json);
    Ok(reply(
        id,
        PutResult {
            user: &user,
            created,
        },
    ))
}
