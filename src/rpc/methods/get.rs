//! `get`: a user by name (cache-aside), optionally at least `min_version` new; the gets a client
//! pipelined together are answered as one batch.

use std::sync::Arc;

use super::params::{take_username, take_version, Params};
use super::{failed, Call};
use crate::rpc::encode::{self, Id};
use crate::rpc::error::RpcError;
use crate::service::Service;

pub fn parse(params: &mut Params) -> Result<Call, RpcError> {
    Ok(Call::Get {
        username: take_username(params, "username")?,
        min_version: take_version(params, "min_version")?,
    })
}

/// One `get`: its id (`None` for a notification), username and `min_version`.
pub type GetItem = (Option<Id>, String, Option<i64>);

/// Answers gets read together: one Redis read for all of them, one buffer of answer lines (none
/// for a notification, whose id is `None`), in order.
pub async fn batch(service: &Arc<Service>, gets: Vec<GetItem>) -> Vec<u8> {
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
                encode::encode_user_into(&mut out, id, &json, source.as_str())
            }
            (Some(id), Err(error)) => out.extend_from_slice(&encode::encode_error(id, &error)),
        }
    }
    out
}
