//! `health`: readiness and each backend's state.

use super::reply;
use crate::rpc::encode::Id;
use crate::service::Service;

pub fn run(service: &Service, id: Option<&Id>) -> Vec<u8> {
    reply(id, service.health_report())
}
