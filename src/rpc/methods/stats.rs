//! `stats`: the daemon's counters (the stats line's window is not reset by it).

use super::reply;
use crate::rpc::encode::Id;
use crate::service::Service;

pub fn run(service: &Service, id: Option<&Id>) -> Vec<u8> {
    reply(id, service.stats_report(false))
}
