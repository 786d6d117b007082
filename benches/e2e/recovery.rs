//! How soon `health` says Redis is up once a killed Redis answers again: a daemon of its own on a
//! Redis of its own, killed and started again, `health` asked every millisecond.

use std::time::{Duration, Instant};

use cacheward::dev::{Redis, RedisOptions};
use serde_json::{json, Value};

use crate::common::DaemonProcess;
use crate::measure::call;
use crate::Bench;

/// Kills and restarts `CACHEWARD_BENCH_RECOVERIES` times (10 by default); into `report`.
pub async fn run(b: &Bench, report: &mut Value) {
    let rounds: usize = crate::measure::env_or("CACHEWARD_BENCH_RECOVERIES", 10);
    let mut redis = Redis::start_with(RedisOptions {
        tcp: true,
        ..Default::default()
    })
    .expect("redis");
    let dir = b.dir.path().join("recovery");
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("recovery.sock");
    let url = redis.tcp_url(0).expect("tcp");
    let daemon = DaemonProcess::start(
        &dir,
        &socket,
        &b.db_url,
        &url,
        &[("CACHEWARD__CDC__ENABLED", "false")],
    )
    .await;
    let redis_is = |health: &Value, state: &str| health["redis"] == json!(state);
    let mut took = Vec::new();
    for _ in 0..rounds {
        redis.kill();
        while !redis_is(&call(&socket, "health", Value::Null).await, "down") {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Back once it answers a PING (start_again waits for that).
        redis.start_again().expect("restart redis");
        let back = Instant::now();
        while !redis_is(&call(&socket, "health", Value::Null).await, "up") {
            assert!(back.elapsed() < Duration::from_secs(10), "redis never up");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        took.push(back.elapsed());
    }
    drop(daemon);
    took.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let (p50, max) = (ms(&took[took.len() / 2]), ms(took.last().expect("a round")));
    println!(
        "\nrecovery: redis killed and started again {rounds} times: health says redis up {p50:.1} ms (p50), {max:.1} ms (max) after it answers again (the monitor's tick is 250 ms)"
    );
    report["recovery"] = json!({"rounds": rounds, "p50_ms": p50, "max_ms": max});
}
