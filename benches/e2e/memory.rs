//! The daemon's memory over hot gets: its RSS after every million requests.

use std::time::Duration;

use serde_json::{json, Value};

use crate::hit::{daemon_round, user_params};
use crate::measure::{call, measure, rss_kib};
use crate::Bench;

/// Hot gets in steps of 1 M requests, the daemon `pid`'s RSS after each; into `report`.
pub async fn run(b: &Bench, pid: u32, report: &mut Value) {
    // Hot gets (16 connections x depth 16) in steps of 1 M requests; RSS after each.
    let mut series = Vec::new();
    let requests = |v: Value| v["requests"].as_u64().unwrap_or(0);
    for _ in 0..4 {
        let start = requests(call(&b.socket, "stats", Value::Null).await);
        while requests(call(&b.socket, "stats", Value::Null).await) < start + 1_000_000 {
            measure(16, 16, Duration::from_millis(250), |_| {
                daemon_round(b.socket.clone(), 16, user_params(&b.hot_name))
            })
            .await;
        }
        series.push(json!({"requests": requests(call(&b.socket, "stats", Value::Null).await), "rss_kib": rss_kib(pid)}));
    }
    println!(
        "\nmemory over hot gets: {}",
        series
            .iter()
            .map(|p| format!("{} KiB after {} requests", p["rss_kib"], p["requests"]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    report["memory_series"] = json!(series);
}
