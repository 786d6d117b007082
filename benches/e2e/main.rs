//! End-to-end benchmark: the daemon (release binary, its own process) against raw Redis and raw
//! PostgreSQL, measured in the same run, in alternating slices so that machine drift cancels.
//!
//!     cargo bench --bench e2e                      # 200 000 users, 1 s slices x 3 rounds
//!     CACHEWARD_BENCH_USERS=20000 CACHEWARD_BENCH_SLICE_MS=300 cargo bench --bench e2e
//!     CACHEWARD_BENCH_ONLY=hit,miss cargo bench --bench e2e   # parts: hit near miss tables herd cdc memory trigger recovery cluster
//!     CACHEWARD_BENCH_ONLY=hit CACHEWARD_BENCH_CELLS=1x16,16x1 cargo bench --bench e2e   # some hit cells
//!
//! Measures the hit path (6 cells), the miss path, the thundering herd, CDC lag (1 000 renames/s
//! with NOTIFY and poll-only, then unpaced: as fast as PostgreSQL commits them), daemon memory
//! (idle, 1 000 connections, RSS every 1 M requests), and the trigger cost with pgbench (NOTIFY on
//! and off); then the same hit and miss paths on a 3-primary Redis Cluster against raw
//! cluster-aware GETs, and the cluster's failover repair window. Prints a table and writes
//! target/bench-e2e.json. One file per part; the daemon processes are the tests' own
//! (`tests/common`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cacheward::dev::{Postgres, Redis, RedisOptions};
use serde_json::{json, Value};
use tempfile::TempDir;

#[path = "../../tests/common/mod.rs"]
mod common;

mod cdc;
mod cluster;
mod herd;
mod hit;
mod measure;
mod memory;
mod miss;
mod near;
mod recovery;
mod resp;
mod tables;
mod trigger;

use common::DaemonProcess;
use measure::{call, env_or, rss_kib};

/// What every part runs on: the servers, the seeded database, the main daemon's socket, the raw
/// side's Redis client, and the run's settings.
pub struct Bench {
    pub users: u64,
    pub slice: Duration,
    pub rounds: usize,
    pub pg: Postgres,
    /// Kept for the run: dropping it stops Redis.
    pub _redis: Redis,
    pub db_url: String,
    pub redis_url: String,
    pub pg_config: tokio_postgres::Config,
    pub admin: tokio_postgres::Client,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub redis_client: redis::Client,
    /// Users `u1..=hot` are cached before the hit path; `hot_name(n)` is round `n`'s.
    pub hot: u64,
    pub hot_name: Arc<dyn Fn(u64) -> String + Send + Sync>,
    /// The hit path's cells (connections × depth).
    pub cells: Vec<(usize, usize)>,
}

/// Database `bench` on `pg`, migrated, with users `u1..=users` (inserted past the capture: the
/// outbox starts empty): its URL, config and an admin session.
pub async fn seeded(
    pg: &Postgres,
    users: u64,
) -> (String, tokio_postgres::Config, tokio_postgres::Client) {
    let db_url = pg.create_database("bench").await.expect("database");
    let pg_config: tokio_postgres::Config = db_url.parse().expect("url");
    let mut admin = cacheward::store::pg::connect(&pg_config)
        .await
        .expect("connect");
    cacheward::store::pg::migrate(&mut admin)
        .await
        .expect("migrate");
    admin
        .batch_execute(&format!(
            "ALTER TABLE users DISABLE TRIGGER cacheward_capture_insert;
             INSERT INTO users (username) SELECT 'u' || g FROM generate_series(1, {users}) g;
             ALTER TABLE users ENABLE ALWAYS TRIGGER cacheward_capture_insert;
             ANALYZE users;"
        ))
        .await
        .expect("seed");
    (db_url, pg_config, admin)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let users: u64 = env_or("CACHEWARD_BENCH_USERS", 200_000);
    let slice = Duration::from_millis(env_or("CACHEWARD_BENCH_SLICE_MS", 1000));
    let rounds: usize = env_or("CACHEWARD_BENCH_ROUNDS", 3);
    // CACHEWARD_BENCH_ONLY=hit,miss,herd,cdc,trigger runs just those parts (all by default).
    let only = std::env::var("CACHEWARD_BENCH_ONLY").ok();
    let want = |part: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|p| p.trim() == part))
    };

    // CACHEWARD_BENCH_REDIS=unix reaches Redis over its Unix socket instead of TCP on 127.0.0.1
    // (production reaches Redis over a network: TCP is the default, for both sides).
    let over_tcp = std::env::var("CACHEWARD_BENCH_REDIS").map_or(true, |t| t != "unix");
    let pg = Postgres::start().expect("postgres");
    let redis = Redis::start_with(RedisOptions {
        tcp: true,
        ..Default::default()
    })
    .expect("redis");
    let (db_url, pg_config, admin) = seeded(&pg, users).await;
    admin
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .await
        .expect("pg_stat_statements");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("bench.sock");
    let redis_url = match over_tcp {
        true => redis.tcp_url(0).expect("tcp"),
        false => redis.url(0),
    };
    let transport = if over_tcp {
        "TCP 127.0.0.1"
    } else {
        "a Unix socket"
    };
    println!("Redis reached over {transport} by the daemon and the raw side alike");
    let resp_socket = dir.path().join("resp.sock");
    let daemon = DaemonProcess::start(
        dir.path(),
        &socket,
        &db_url,
        &redis_url,
        &[("CACHEWARD__RESP__SOCKET", &resp_socket.to_string_lossy())],
    )
    .await;
    let pid = daemon.child.id();
    let rss_idle = rss_kib(pid);
    let mut report = json!({
        "machine": { "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                     "cpu": std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines()
                         .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())) },
        "users": users,
        "redis_transport": transport,
    });

    // Hit path: the first HOT users are cached; daemon get vs raw Redis GET of the same keys.
    const HOT: u64 = 10_000;
    let hot = HOT.min(users);
    let hot_name = hit::warm(&socket, hot).await;
    let redis_client = redis::Client::open(redis_url.as_str()).expect("redis url");
    // CACHEWARD_BENCH_CELLS=1x16,16x1 runs just those cells.
    let cells: Vec<(usize, usize)> = match std::env::var("CACHEWARD_BENCH_CELLS") {
        Ok(list) => list
            .split(',')
            .map(|cell| {
                let (c, d) = cell.trim().split_once('x').expect("cells look like 16x1");
                (c.parse().expect("connections"), d.parse().expect("depth"))
            })
            .collect(),
        Err(_) => vec![(1, 1), (1, 16), (16, 1), (16, 16), (64, 1), (64, 16)],
    };
    let b = Bench {
        users,
        slice,
        rounds,
        pg,
        _redis: redis,
        db_url,
        redis_url,
        pg_config,
        admin,
        dir,
        socket,
        redis_client,
        hot,
        hot_name,
        cells,
    };
    if want("hit") {
        let (warm, off) = hit::run(&b, pid).await;
        report["hit"] = warm;
        report["hit_near_off"] = off;
    }
    if want("near") {
        report["near"] = near::near_part(
            &b.socket,
            b.dir.path(),
            &b.db_url,
            &b.redis_url,
            &b.redis_client,
            b.hot,
        )
        .await;
    }
    if want("resp") {
        resp::part(&b, &resp_socket, &mut report).await;
    }
    if want("miss") {
        miss::run(&b, pid, &mut report).await;
    }
    if want("tables") {
        tables::run(&b, &mut report).await;
    }
    let rss_connections = match want("herd") {
        true => herd::run(&b, pid, &mut report).await,
        false => 0,
    };
    let runs = cdc::Runs::of(b.users);
    if want("cdc") {
        cdc::run(&b, &runs, pid, &mut report).await;
    }
    if want("memory") {
        memory::run(&b, pid, &mut report).await;
    }
    let rss_after = rss_kib(pid);
    let requests = call(&b.socket, "stats", Value::Null).await["requests"].clone();
    println!("\nmemory (RSS): idle {} KiB, with 1000 connections {} KiB, after {requests} requests {} KiB", rss_idle, rss_connections, rss_after);
    report["memory_kib"] = json!({"idle": rss_idle, "connections_1000": rss_connections, "after": rss_after, "requests": requests});

    drop(daemon);
    if want("cdc") && !runs.poll.is_empty() {
        cdc::poll_only(&b, &runs, &mut report).await;
    }
    if want("cdc") && !runs.paced.is_empty() {
        cdc::durable(&runs, &mut report).await;
    }
    if want("tables") {
        tables::cdc(&b, &mut report).await;
    }
    if want("trigger") {
        trigger::run(&b, &mut report).await;
    }
    if want("recovery") {
        recovery::run(&b, &mut report).await;
    }
    if want("cluster") {
        report["cluster"] =
            cluster::cluster_part(&b.db_url, &b.pg_config, b.users, b.hot, b.slice, b.rounds).await;
    }

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-e2e.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("json"))
        .expect("write report");
    println!("\nwritten to {}", out.display());
}
