//! The Redis-protocol front end against raw Redis, measured by `redis-benchmark` (a load tool
//! nobody here wrote): `GET` of 10 000 cached users (`-r 10000`), cell by cell (`-c` clients ×
//! `-P` pipeline), the front end on its Unix socket with the near cache warm, raw Redis over TCP
//! on 127.0.0.1, in alternating runs. The ratio is the front end's throughput over raw Redis's.

use std::path::Path;

use serde_json::{json, Value};

use crate::measure::{call, env_or};
use crate::Bench;

/// Users `r000000000000` … `r000000009999`: the names `redis-benchmark -r 10000` makes of
/// `r__rand_int__` (twelve digits).
const KEYS: u64 = 10_000;

/// `redis-benchmark`'s CSV line for one run: requests per second and p50 latency in µs.
async fn run(
    target: &[&str],
    command: &[&str],
    clients: usize,
    pipeline: usize,
    requests: u64,
) -> (f64, f64) {
    let out = tokio::process::Command::new("redis-benchmark")
        .args(target)
        .args(["-c", &clients.to_string(), "-P", &pipeline.to_string()])
        .args([
            "-n",
            &requests.to_string(),
            "-r",
            &KEYS.to_string(),
            "--csv",
        ])
        .args(command)
        .output()
        .await
        .expect("redis-benchmark (Debian's redis-tools, installed with redis-server)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("\"{}", command[0])))
        .unwrap_or_else(|| {
            panic!(
                "no result from redis-benchmark: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let fields: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    (
        fields[0],
        fields.get(3).copied().unwrap_or(f64::NAN) * 1000.0,
    )
}

pub async fn part(b: &Bench, resp_socket: &Path, report: &mut Value) {
    b.admin
        .batch_execute(&format!(
            "ALTER TABLE users DISABLE TRIGGER cacheward_capture_insert;
             INSERT INTO users (username) SELECT 'r' || lpad(g::text, 12, '0') FROM generate_series(0, {}) g;
             ALTER TABLE users ENABLE TRIGGER cacheward_capture_insert;",
            KEYS - 1
        ))
        .await
        .expect("seed the benchmark's users");
    // Twice: cached in Redis, then in the near cache.
    for _ in 0..2 {
        for i in 0..KEYS {
            call(&b.socket, "get", json!({ "username": format!("r{i:012}") })).await;
        }
    }
    let port = b
        .redis_url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("redis over TCP: its port")
        .to_owned();
    let raw = ["-h", "127.0.0.1", "-p", port.as_str()];
    let socket = resp_socket.to_string_lossy().into_owned();
    let front = ["-s", socket.as_str()];
    let requests: u64 = env_or("CACHEWARD_BENCH_RESP_REQUESTS", 200_000);
    println!("\nredis-benchmark GET (and MGET of ten keys) of {KEYS} cached users: raw Redis (TCP 127.0.0.1) against the front end (Unix socket, near cache warm)");
    println!(
        "{:>7} {:>4} {:>3} | {:>12} {:>8} | {:>12} {:>8} | {:>6}",
        "", "-c", "-P", "redis op/s", "p50 µs", "front op/s", "p50 µs", "ratio"
    );
    let get = ["GET", "user:r__rand_int__"];
    let mget: Vec<&str> = std::iter::once("MGET")
        .chain(std::iter::repeat_n("user:r__rand_int__", 10))
        .collect();
    // Every GET cell, then MGET in the two that tell per-command from per-key cost.
    let cells = [1, 16, 64].into_iter().flat_map(|c| [(c, 1), (c, 16)]);
    let cells = cells.map(|cell| (&get[..], cell));
    let cells = cells.chain([(&mget[..], (1, 1)), (&mget[..], (16, 16))]);
    let mut rows = Vec::new();
    for (command, (clients, pipeline)) in cells {
        let n = match (clients, pipeline) {
            (1, 1) => requests / 4,
            _ => requests,
        };
        // As many keys read as by the GET cell.
        let n = n / (command.len() as u64 - 1);
        let (mut redis, mut ours) = ((0.0, 0.0), (0.0, 0.0));
        for _ in 0..b.rounds {
            let r = run(&raw, command, clients, pipeline, n).await;
            let f = run(&front, command, clients, pipeline, n).await;
            redis = (redis.0 + r.0, redis.1 + r.1);
            ours = (ours.0 + f.0, ours.1 + f.1);
        }
        let rounds = b.rounds as f64;
        let (redis, ours) = (
            (redis.0 / rounds, redis.1 / rounds),
            (ours.0 / rounds, ours.1 / rounds),
        );
        let ratio = ours.0 / redis.0;
        let label = match command.len() {
            2 => command[0].to_owned(),
            n => format!("{}×{}", command[0], n - 1),
        };
        println!(
            "{label:>7} {clients:>4} {pipeline:>3} | {:>12.0} {:>8.0} | {:>12.0} {:>8.0} | {ratio:>6.2}",
            redis.0, redis.1, ours.0, ours.1
        );
        rows.push(
            json!({"command": label, "clients": clients, "pipeline": pipeline,
            "redis": {"ops_per_sec": redis.0, "p50_us": redis.1},
            "front": {"ops_per_sec": ours.0, "p50_us": ours.1}, "ratio": ratio}),
        );
    }
    report["resp"] = json!(rows);
}
