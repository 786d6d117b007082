//! End-to-end benchmark: the daemon (release binary, its own process) against raw Redis and raw
//! PostgreSQL, measured in the same run, in alternating slices so that machine drift cancels.
//!
//!     cargo bench --bench e2e                      # 200 000 users, 1 s slices x 3 rounds
//!     CACHEWARD_BENCH_USERS=20000 CACHEWARD_BENCH_SLICE_MS=300 cargo bench --bench e2e
//!     CACHEWARD_BENCH_ONLY=hit,miss cargo bench --bench e2e   # parts: hit near miss herd cdc memory trigger cluster
//!     CACHEWARD_BENCH_ONLY=hit CACHEWARD_BENCH_CELLS=1x16,16x1 cargo bench --bench e2e   # some hit cells
//!
//! Measures the hit path (6 cells), the miss path, the thundering herd, CDC lag (1 000 renames/s
//! with NOTIFY and poll-only, then unpaced: as fast as PostgreSQL commits them), daemon memory
//! (idle, 1 000 connections, RSS every 1 M requests), and the trigger cost with pgbench (NOTIFY on
//! and off); then the same hit and miss paths on a 3-primary Redis Cluster against raw
//! cluster-aware GETs, and the cluster's failover repair window. Prints a table and writes
//! target/bench-e2e.json.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cacheward::dev::cluster::RedisCluster;
use cacheward::dev::{Postgres, Redis, RedisOptions};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One measured slice: operations done, latency of each round trip (µs).
struct Slice {
    ops: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

/// Results of one side (daemon or raw) over all its slices.
#[derive(Default)]
struct Side {
    ops: u64,
    elapsed: Duration,
    latency: Option<Histogram<u64>>,
    /// CPU the daemon process used meanwhile (clock ticks), for the daemon side.
    cpu_ticks: u64,
}

impl Side {
    fn add(&mut self, s: Slice) {
        self.ops += s.ops;
        self.elapsed += s.elapsed;
        match &mut self.latency {
            Some(h) => h.add(&s.latency).expect("same bounds"),
            None => self.latency = Some(s.latency),
        }
    }

    fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Daemon CPU time (user + system) per operation, in µs.
    fn cpu_us_per_op(&self) -> f64 {
        let tick_us = 1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        self.cpu_ticks as f64 * tick_us / self.ops.max(1) as f64
    }

    fn quantile_us(&self, q: f64) -> u64 {
        self.latency.as_ref().map_or(0, |h| h.value_at_quantile(q))
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs `connections` workers for `slice`, each calling `round` (one round trip of `depth` ops).
async fn measure<F, Fut>(connections: usize, depth: usize, slice: Duration, make: F) -> Slice
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<
        Output = Box<dyn FnMut(u64) -> futures::future::BoxFuture<'static, ()> + Send>,
    >,
{
    let mut workers = Vec::new();
    let ops = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    for c in 0..connections {
        let mut round = make(c).await;
        let ops = ops.clone();
        workers.push(tokio::spawn(async move {
            let mut latency = histogram();
            let mut n = c as u64 * 1_000_003;
            while start.elapsed() < slice {
                let t = Instant::now();
                round(n).await;
                latency.saturating_record(t.elapsed().as_micros() as u64);
                ops.fetch_add(depth as u64, Ordering::Relaxed);
                n += depth as u64;
            }
            latency
        }));
    }
    let mut latency = histogram();
    for w in workers {
        latency.add(w.await.expect("worker")).expect("same bounds");
    }
    Slice {
        ops: ops.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        latency,
    }
}

/// A pipelining JSON-RPC client: sends `depth` gets, reads `depth` answers.
async fn daemon_round(
    socket: PathBuf,
    depth: usize,
    names: Arc<dyn Fn(u64) -> String + Send + Sync>,
) -> Box<dyn FnMut(u64) -> futures::future::BoxFuture<'static, ()> + Send> {
    let stream = UnixStream::connect(&socket)
        .await
        .expect("connect to daemon");
    let (r, w) = stream.into_split();
    let state = Arc::new(tokio::sync::Mutex::new((
        BufReader::new(r),
        w,
        String::new(),
        Vec::new(),
    )));
    Box::new(move |n| {
        let (state, names) = (state.clone(), names.clone());
        Box::pin(async move {
            let mut guard = state.lock().await;
            let (reader, writer, line, out) = &mut *guard;
            out.clear();
            for i in 0..depth as u64 {
                out.extend_from_slice(
                    format!("{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"get\",\"params\":{{\"username\":\"{}\"}}}}\n", names(n + i))
                        .as_bytes(),
                );
            }
            writer.write_all(out).await.expect("write");
            for _ in 0..depth {
                line.clear();
                reader.read_line(line).await.expect("read");
                debug_assert!(line.contains("\"result\""), "{line}");
            }
        })
    })
}

/// One slice of `depth`-deep pipelined gets through the daemon on `connections` connections, and
/// the daemon's CPU meanwhile, added to `d`.
async fn daemon_side(
    d: &mut Side,
    pid: u32,
    socket: &Path,
    (connections, depth): (usize, usize),
    slice: Duration,
    names: &Arc<dyn Fn(u64) -> String + Send + Sync>,
) {
    let cpu = cpu_ticks(pid);
    d.add(
        measure(connections, depth, slice, |_| {
            daemon_round(socket.to_owned(), depth, names.clone())
        })
        .await,
    );
    d.cpu_ticks += cpu_ticks(pid) - cpu;
}

/// Reads users `u1..=hot` through the daemon at `socket` twice (so they are cached in Redis, then
/// in the near cache, whose entries come from tracked Redis reads); returns the name of round
/// `n`'s user among them.
async fn warm(socket: &Path, hot: u64) -> Arc<dyn Fn(u64) -> String + Send + Sync> {
    for _ in 0..2 {
        for i in 1..=hot {
            call(socket, "get", json!({ "username": format!("u{i}") })).await;
        }
    }
    Arc::new(move |n| format!("u{}", n % hot + 1))
}

fn hit_header() {
    println!(
        "{:>5} {:>5} | {:>12} {:>8} {:>8} {:>9} | {:>12} {:>8} {:>8} | {:>6}",
        "conns",
        "depth",
        "daemon op/s",
        "p50 µs",
        "p99 µs",
        "cpu µs/op",
        "redis op/s",
        "p50 µs",
        "p99 µs",
        "ratio"
    );
}

/// Prints one cell of a hit-path table (daemon side `d`, raw side `r`); returns it as JSON.
fn hit_row(connections: usize, depth: usize, d: &Side, r: &Side) -> Value {
    let ratio = d.throughput() / r.throughput();
    println!(
        "{connections:>5} {depth:>5} | {:>12.0} {:>8} {:>8} {:>9.2} | {:>12.0} {:>8} {:>8} | {ratio:>6.2}",
        d.throughput(), d.quantile_us(0.5), d.quantile_us(0.99), d.cpu_us_per_op(), r.throughput(), r.quantile_us(0.5), r.quantile_us(0.99)
    );
    json!({"connections": connections, "depth": depth,
        "daemon": {"ops_per_sec": d.throughput(), "p50_us": d.quantile_us(0.5), "p99_us": d.quantile_us(0.99), "cpu_us_per_op": d.cpu_us_per_op()},
        "redis": {"ops_per_sec": r.throughput(), "p50_us": r.quantile_us(0.5), "p99_us": r.quantile_us(0.99)},
        "ratio": ratio})
}

/// The near cache's own figures: how long after a direct change in Redis a get may still answer
/// the old value (the invalidation's delivery), and the hit ratio of a small near cache under a
/// skewed (Zipf) read pattern, against the best a cache of its size could do.
async fn near_part(
    socket: &Path,
    dir: &Path,
    db_url: &str,
    redis_url: &str,
    redis_client: &redis::Client,
    hot: u64,
) -> Value {
    let trials: u64 = env_or("CACHEWARD_BENCH_STALENESS_TRIALS", 2000);
    let keys = 100.min(hot);
    let mut redis = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut client = cacheward::cli::client::Client::connect(socket)
        .await
        .expect("connect");
    let get = async |client: &mut cacheward::cli::client::Client, name: &str| -> Value {
        client
            .call("get", json!({ "username": name }))
            .await
            .expect("get")
    };
    let mut delivery = histogram();
    let mut stale_after_ack = 0u64;
    let near_before = call(socket, "stats", Value::Null).await["near_cache"]["hits"]
        .as_u64()
        .unwrap_or(0);
    for trial in 0..trials {
        let name = format!("u{}", trial % keys + 1);
        let mut user = get(&mut client, &name).await["user"].clone();
        get(&mut client, &name).await;
        let version = 1_000_000_000 + trial as i64;
        user["version"] = json!(version);
        let _: () = redis::cmd("SET")
            .arg(format!("user:{name}"))
            .arg(user.to_string())
            .query_async(&mut redis)
            .await
            .expect("SET");
        let acked = Instant::now();
        loop {
            let answer = get(&mut client, &name).await;
            if answer["user"]["version"] == json!(version) {
                delivery.saturating_record(acked.elapsed().as_micros() as u64);
                break;
            }
            stale_after_ack += 1;
        }
    }
    let near_hits = call(socket, "stats", Value::Null).await["near_cache"]["hits"]
        .as_u64()
        .unwrap_or(0)
        - near_before;
    for i in 1..=keys {
        let _: () = redis::cmd("DEL")
            .arg(format!("user:u{i}"))
            .query_async(&mut redis)
            .await
            .expect("DEL");
    }
    let (p50, p99, max) = (
        delivery.value_at_quantile(0.5),
        delivery.value_at_quantile(0.99),
        delivery.max(),
    );
    println!(
        "\nnear cache staleness: {trials} direct SETs in Redis, then gets until the new value is answered: \
         from the SET's acknowledgement to that answer p50 {p50} µs, p99 {p99} µs, max {max} µs \
         (one get round trip included); {stale_after_ack} answers of the old value after the \
         acknowledgement; {near_hits} near hits meanwhile"
    );

    // Zipf: a near cache of 1/8 of the hot set's bytes, reads skewed over the hot set.
    let skew: f64 = env_or("CACHEWARD_BENCH_ZIPF_S", 0.99);
    let entry_bytes = 330u64; // the JSON (~200 bytes), the name twice, the entry's overhead
    let budget = (hot * entry_bytes / 8).max(4096);
    let small_socket = dir.join("bench-small.sock");
    let budget_text = budget.to_string();
    let small = DaemonProcess::start(
        dir,
        &small_socket,
        db_url,
        redis_url,
        &[("CACHEWARD__CACHE__LOCAL_MAX_BYTES", budget_text.as_str())],
    )
    .await;
    // Over the hot users the staleness part left alone (u101 and up).
    let weights: Vec<f64> = (1..=hot.saturating_sub(keys).max(1))
        .map(|k| 1.0 / (k as f64).powf(skew))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(weights.len());
    let mut sum = 0.0;
    for w in &weights {
        sum += w / total;
        cumulative.push(sum);
    }
    let cumulative = Arc::new(cumulative);
    let zipf_name: Arc<dyn Fn(u64) -> String + Send + Sync> = {
        let cumulative = cumulative.clone();
        Arc::new(move |n| {
            // splitmix64 of the round's number: a uniform draw, then the inverse CDF.
            let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            let rank = cumulative
                .partition_point(|&c| c < u)
                .min(cumulative.len() - 1);
            format!("u{}", rank + 101)
        })
    };
    let stats = |s: Value| {
        (
            s["requests"].as_u64().unwrap_or(0),
            s["near_cache"]["hits"].as_u64().unwrap_or(0),
            s["near_cache"]["entries"].as_u64().unwrap_or(0),
        )
    };
    // One pass to let the cache settle, one measured.
    let mut zipf = Side::default();
    for measured in [false, true] {
        let (requests, hits, _) = stats(call(&small_socket, "stats", Value::Null).await);
        let slice = measure(16, 16, Duration::from_secs(2), |_| {
            daemon_round(small_socket.clone(), 16, zipf_name.clone())
        })
        .await;
        let (requests_after, hits_after, entries) =
            stats(call(&small_socket, "stats", Value::Null).await);
        if measured {
            let ratio = (hits_after - hits) as f64 / (requests_after - requests).max(1) as f64;
            // The best any cache holding as many entries could do: the most popular ones.
            let best = cumulative[(entries as usize).clamp(1, cumulative.len()) - 1];
            zipf.add(slice);
            println!(
                "near cache under Zipf (s = {skew}) over {hot} users, {budget} bytes ({entries} entries): \
                 near hit ratio {ratio:.3}, the {entries} most popular users hold {best:.3} of the reads; {:.0} gets/s",
                zipf.throughput()
            );
            drop(small);
            let checker = checker_cost(dir, db_url, redis_url).await;
            return json!({"staleness_us": {"p50": p50, "p99": p99, "max": max, "trials": trials,
                    "stale_answers_after_ack": stale_after_ack, "near_hits": near_hits},
                "zipf": {"s": skew, "users": hot, "max_bytes": budget, "entries": entries,
                    "hit_ratio": ratio, "best_possible": best, "gets_per_sec": zipf.throughput()},
                "checker": checker});
        }
    }
    unreachable!("the measured pass returns")
}

/// The consistency checker's cost at its default rate: two idle daemons on the same backends (CDC
/// off in both, so neither applies the change stream), one with the checker and one without; the
/// difference in their CPU over the same seconds, as a share of one core.
async fn checker_cost(dir: &Path, db_url: &str, redis_url: &str) -> Value {
    let secs: u64 = env_or("CACHEWARD_BENCH_CHECKER_SECS", 10);
    let (on_socket, off_socket) = (
        dir.join("bench-check-on.sock"),
        dir.join("bench-check-off.sock"),
    );
    let quiet = ("CACHEWARD__CDC__ENABLED", "false");
    let on = DaemonProcess::start(dir, &on_socket, db_url, redis_url, &[quiet]).await;
    let off = DaemonProcess::start(
        dir,
        &off_socket,
        db_url,
        redis_url,
        &[quiet, ("CACHEWARD__CONSISTENCY__SAMPLE_PER_SEC", "0")],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (on_pid, off_pid) = (on.0.id(), off.0.id());
    let (on_before, off_before) = (cpu_ticks(on_pid), cpu_ticks(off_pid));
    let checked_before = call(&on_socket, "stats", Value::Null).await["consistency"]["checked"]
        .as_u64()
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (on_ticks, off_ticks) = (
        cpu_ticks(on_pid) - on_before,
        cpu_ticks(off_pid) - off_before,
    );
    let checked = call(&on_socket, "stats", Value::Null).await["consistency"]["checked"]
        .as_u64()
        .unwrap_or(0)
        - checked_before;
    let tick = 1.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = |ticks: u64| ticks as f64 * tick / secs as f64 * 100.0;
    let cost = share(on_ticks) - share(off_ticks);
    println!(
        "consistency checker at its default rate: {checked} entries checked in {secs} s; idle daemon CPU \
         {:.2} % of a core with it, {:.2} % without: the checker costs {cost:.2} % of a core",
        share(on_ticks),
        share(off_ticks)
    );
    json!({"secs": secs, "checked": checked, "cpu_percent_with": share(on_ticks),
        "cpu_percent_without": share(off_ticks), "cost_percent_of_a_core": cost})
}

/// One hit-path table: per cell, `rounds` alternating slices of daemon gets (the daemon `pid` at
/// `socket`) and raw pipelined Redis GETs of the same keys.
async fn hit_table(
    cells: &[(usize, usize)],
    rounds: usize,
    slice: Duration,
    pid: u32,
    socket: &Path,
    names: &Arc<dyn Fn(u64) -> String + Send + Sync>,
    redis_client: &redis::Client,
) -> Value {
    hit_header();
    let mut rows = Vec::new();
    for &(connections, depth) in cells {
        let (mut d, mut r) = (Side::default(), Side::default());
        for _ in 0..rounds {
            daemon_side(&mut d, pid, socket, (connections, depth), slice, names).await;
            r.add(
                measure(connections, depth, slice, |_| {
                    let (client, names) = (redis_client.clone(), names.clone());
                    async move {
                        let conn = client
                            .get_multiplexed_async_connection()
                            .await
                            .expect("redis");
                        Box::new(move |n: u64| {
                            let (mut conn, names) = (conn.clone(), names.clone());
                            Box::pin(async move {
                                let mut pipe = redis::pipe();
                                for i in 0..depth as u64 {
                                    pipe.cmd("GET").arg(format!("user:{}", names(n + i)));
                                }
                                let _: Vec<Option<String>> =
                                    pipe.query_async(&mut conn).await.expect("GET");
                            })
                                as futures::future::BoxFuture<'static, ()>
                        })
                            as Box<dyn FnMut(u64) -> futures::future::BoxFuture<'static, ()> + Send>
                    }
                })
                .await,
            );
        }
        rows.push(hit_row(connections, depth, &d, &r));
    }
    json!(rows)
}

/// The raw side of the miss path: one prepared SELECT of the shape the daemon runs, per round, of
/// user `n % users + 1`.
async fn select_round(
    pg_config: tokio_postgres::Config,
    users: u64,
) -> Box<dyn FnMut(u64) -> futures::future::BoxFuture<'static, ()> + Send> {
    let client = Arc::new(cacheward::store::pg::connect(&pg_config).await.expect("pg"));
    let stmt = client
        .prepare("SELECT u.*, row_to_json(u)::text FROM users u WHERE u.username = $1")
        .await
        .expect("prepare");
    Box::new(move |n: u64| {
        let (client, stmt) = (client.clone(), stmt.clone());
        Box::pin(async move {
            let name = format!("u{}", n % users + 1);
            client.query_opt(&stmt, &[&name]).await.expect("select");
        }) as futures::future::BoxFuture<'static, ()>
    })
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// CPU used so far (clock ticks) by the daemon, this benchmark process, Redis and PostgreSQL (every
/// postgres process, plus the postmaster's waited-for children: backends of closed connections).
fn cpu_split(daemon: u32) -> [u64; 4] {
    let mut split = [cpu_ticks(daemon), cpu_ticks(std::process::id()), 0, 0];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let slot = match head.rsplit_once('(').map(|(_, comm)| comm) {
            Some("redis-server") => 2,
            Some("postgres") => 3,
            _ => continue,
        };
        // utime, stime, cutime, cstime: fields 14-17 (the first after the name is field 3).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        split[slot] += (11..15)
            .filter_map(|i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
            .sum::<u64>();
    }
    split
}

fn split_us_per_op(ticks: [u64; 4], ops: u64) -> [f64; 4] {
    let tick_us = 1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks.map(|t| t as f64 * tick_us / ops.max(1) as f64)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn call(socket: &Path, method: &str, params: Value) -> Value {
    match cacheward::cli::client::Client::connect(socket).await {
        Ok(mut c) => c
            .call(method, params)
            .await
            .unwrap_or_else(|e| json!({ "error": e.to_string() })),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

struct DaemonProcess(Child);

impl DaemonProcess {
    /// The release binary serving `socket`, with `settings` as extra environment; returns once
    /// it is ready.
    async fn start(
        dir: &Path,
        socket: &Path,
        db_url: &str,
        redis_url: &str,
        settings: &[(&str, &str)],
    ) -> DaemonProcess {
        let daemon = DaemonProcess(
            Command::new(env!("CARGO_BIN_EXE_cacheward"))
                .arg("serve")
                .current_dir(dir)
                .env("DATABASE_URL", db_url)
                .env("REDIS_URL", redis_url)
                .env("CACHEWARD__SOCKET__PATH", socket)
                .env("CACHEWARD__LOG__LEVEL", "warn")
                .envs(settings.iter().copied())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn daemon"),
        );
        let start = Instant::now();
        while call(socket, "health", Value::Null).await["ready"] != json!(true) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon not ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
            "CREATE EXTENSION pg_stat_statements;
             ALTER TABLE users DISABLE TRIGGER cacheward_capture_insert;
             INSERT INTO users (username) SELECT 'u' || g FROM generate_series(1, {users}) g;
             ALTER TABLE users ENABLE TRIGGER cacheward_capture_insert;
             ANALYZE users;"
        ))
        .await
        .expect("seed");
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
    let daemon = DaemonProcess::start(dir.path(), &socket, &db_url, &redis_url, &[]).await;
    let pid = daemon.0.id();
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
    let hot_name = warm(&socket, hot).await;
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
    if want("hit") {
        println!("\nhit path, near cache warm: daemon get of a cached user vs raw Redis GET (redis crate), same keys");
        report["hit"] = hit_table(
            &cells,
            rounds,
            slice,
            pid,
            &socket,
            &hot_name,
            &redis_client,
        )
        .await;
        // The same with the near cache off: every hit reads Redis.
        let off_socket = dir.path().join("bench-off.sock");
        let off = DaemonProcess::start(
            dir.path(),
            &off_socket,
            &db_url,
            &redis_url,
            &[("CACHEWARD__CACHE__LOCAL_MAX_BYTES", "0")],
        )
        .await;
        println!("\nhit path, near cache off (cache.local_max_bytes = 0)");
        report["hit_near_off"] = hit_table(
            &cells,
            rounds,
            slice,
            off.0.id(),
            &off_socket,
            &hot_name,
            &redis_client,
        )
        .await;
    }
    if want("near") {
        report["near"] =
            near_part(&socket, dir.path(), &db_url, &redis_url, &redis_client, hot).await;
    }

    // Miss path: each daemon get names a user never requested before (so never cached), vs a raw
    // prepared SELECT of the same shape; 16 connections.
    let next_cold = Arc::new(AtomicU64::new(hot + 1));
    let total = users;
    let cold_name: Arc<dyn Fn(u64) -> String + Send + Sync> = {
        let next = next_cold.clone();
        Arc::new(move |_| {
            format!(
                "u{}",
                (next.fetch_add(1, Ordering::Relaxed) - 1) % total + 1
            )
        })
    };
    // 16 connections, as issue 4 sets it; CACHEWARD_BENCH_MISS_CONNS for other loads.
    let miss_conns: usize = env_or("CACHEWARD_BENCH_MISS_CONNS", 16);
    let (mut d, mut r) = (Side::default(), Side::default());
    let (mut d_split, mut r_split) = ([0u64; 4], [0u64; 4]);
    for _ in 0..if want("miss") { rounds } else { 0 } {
        let cpu = cpu_split(pid);
        d.add(
            measure(miss_conns, 1, slice, |_| {
                daemon_round(socket.clone(), 1, cold_name.clone())
            })
            .await,
        );
        let after = cpu_split(pid);
        d.cpu_ticks += after[0] - cpu[0];
        (0..4).for_each(|i| d_split[i] += after[i] - cpu[i]);
        r.add(
            measure(miss_conns, 1, slice, |_| {
                select_round(pg_config.clone(), total)
            })
            .await,
        );
        let end = cpu_split(pid);
        (0..4).for_each(|i| r_split[i] += end[i] - after[i]);
    }
    if want("miss") {
        let consumed = next_cold.load(Ordering::Relaxed) - hot - 1;
        let miss_ratio = d.throughput() / r.throughput();
        println!("\nmiss path ({miss_conns} connections): daemon {:.0} op/s (p99 {} µs, cpu {:.1} µs/op) vs raw SELECT {:.0} op/s (p99 {} µs): ratio {miss_ratio:.2}{}",
        d.throughput(), d.quantile_us(0.99), d.cpu_us_per_op(), r.throughput(), r.quantile_us(0.99),
        if consumed > users - hot { " (WARNING: ran out of cold users; raise CACHEWARD_BENCH_USERS)" } else { "" });
        let [dd, dc, dr, dp] = split_us_per_op(d_split, d.ops);
        let [_, rc, rr, rp] = split_us_per_op(r_split, r.ops);
        println!("  CPU µs/op, daemon side: daemon {dd:.1} + client {dc:.1} + redis {dr:.1} + postgres {dp:.1} = {:.1}; raw side: client {rc:.1} + redis {rr:.1} + postgres {rp:.1} = {:.1}",
            dd + dc + dr + dp, rc + rr + rp);
        report["miss_cpu_us_per_op"] = json!({"daemon_side": {"daemon": dd, "client": dc, "redis": dr, "postgres": dp},
            "raw_side": {"client": rc, "redis": rr, "postgres": rp}});
        report["miss"] = json!({"connections": miss_conns, "daemon_ops_per_sec": d.throughput(), "daemon_cpu_us_per_op": d.cpu_us_per_op(), "raw_ops_per_sec": r.throughput(), "ratio": miss_ratio});
    }

    // Herd: 1000 connections get the same cold user at once.
    let mut rss_connections = 0;
    if want("herd") {
        admin
            .execute("SELECT pg_stat_statements_reset()", &[])
            .await
            .expect("reset");
        let herd_name = format!("u{}", users);
        let _: () = redis::cmd("DEL")
            .arg(format!("user:{herd_name}"))
            .query_async(
                &mut redis_client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("redis"),
            )
            .await
            .expect("DEL");
        let mut conns = Vec::new();
        for _ in 0..1000 {
            conns.push(UnixStream::connect(&socket).await.expect("connect"));
        }
        rss_connections = rss_kib(pid);
        let line = format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"get\",\"params\":{{\"username\":\"{herd_name}\"}}}}\n");
        let herd_start = Instant::now();
        let mut waiters = Vec::new();
        for mut stream in conns {
            let line = line.clone();
            waiters.push(tokio::spawn(async move {
                stream.write_all(line.as_bytes()).await.expect("write");
                let mut answer = String::new();
                BufReader::new(stream)
                    .read_line(&mut answer)
                    .await
                    .expect("read");
                herd_start.elapsed()
            }));
        }
        let mut slowest = Duration::ZERO;
        for w in waiters {
            slowest = slowest.max(w.await.expect("herd"));
        }
        let selects: i64 = admin
            .query_one(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
             WHERE query LIKE 'SELECT u.*, row_to_json(u)::text FROM users u WHERE u.username = %'
               AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .expect("pg_stat_statements")
            .get(0);
        println!(
            "\nherd: 1000 concurrent cold gets ran {selects} select(s); slowest answer {} ms",
            slowest.as_millis()
        );
        report["herd"] = json!({"selects": selects, "slowest_ms": slowest.as_millis() as u64});
    }

    // CDC: out-of-band renames at a fixed rate from 4 connections; lag from the commit returning to
    // the new key's keyspace notification in Redis.
    // CDC renames users u1.. in three runs: paced with NOTIFY, paced poll-only (with a second
    // daemon, below), and unpaced; each run takes its own names.
    let rate: u64 = env_or("CACHEWARD_BENCH_CDC_RATE", 1000);
    let seconds: u64 = env_or("CACHEWARD_BENCH_CDC_SECS", 10);
    let paced_names = 1..=(rate * seconds).min(users);
    let poll_names = paced_names.end() + 1..=(paced_names.end() + rate * seconds).min(users);
    // The rest: half unpaced with the daemon running, half committed while it is stopped.
    let middle = poll_names.end() + (users - poll_names.end()) / 2;
    let max_names = poll_names.end() + 1..=middle;
    let backlog_names = middle + 1..=users;
    if want("cdc") {
        let paced = cdc_lag(
            &pg_config,
            &redis_client,
            Some(rate),
            seconds,
            paced_names,
            "c",
            None,
        )
        .await;
        println!(
            "\ncdc: {rate} renames/s for {seconds} s from 4 connections: {}",
            paced.summary()
        );
        report["cdc"] = paced.json();
        // The highest rate: 4 connections renaming as fast as PostgreSQL commits them.
        let seconds: u64 = env_or("CACHEWARD_BENCH_CDC_MAX_SECS", 5);
        if !max_names.is_empty() {
            let max = cdc_lag(
                &pg_config,
                &redis_client,
                None,
                seconds,
                max_names,
                "m",
                None,
            )
            .await;
            println!("cdc: unpaced renames for {seconds} s from 4 connections (as fast as PostgreSQL commits): {}", max.summary());
            report["cdc_max"] = max.json();
            // Headroom: how fast the applier drains a backlog, against that commit rate.
            if !backlog_names.is_empty() {
                let backlog = cdc_lag(
                    &pg_config,
                    &redis_client,
                    None,
                    seconds,
                    backlog_names,
                    "b",
                    Some(pid),
                )
                .await;
                let drain_rate =
                    backlog.changes as f64 / backlog.drained_in.as_secs_f64().max(1e-3);
                println!(
                    "cdc: backlog of {} renames committed while the daemon was stopped, applied in {:.2} s once it resumed: {drain_rate:.0}/s, {:.1}x the unpaced commit rate; lost {}",
                    backlog.changes, backlog.drained_in.as_secs_f64(), drain_rate / max.rate(), backlog.lost
                );
                report["cdc_backlog"] = json!({"changes": backlog.changes, "drained_secs": backlog.drained_in.as_secs_f64(),
                    "rate": drain_rate, "vs_unpaced": drain_rate / max.rate(), "lost": backlog.lost});
            }
        }
    }

    if want("memory") {
        // Hot gets (16 connections x depth 16) in steps of 1 M requests; RSS after each.
        let mut series = Vec::new();
        let requests = |v: Value| v["requests"].as_u64().unwrap_or(0);
        for _ in 0..4 {
            let start = requests(call(&socket, "stats", Value::Null).await);
            while requests(call(&socket, "stats", Value::Null).await) < start + 1_000_000 {
                measure(16, 16, Duration::from_millis(250), |_| {
                    daemon_round(socket.clone(), 16, hot_name.clone())
                })
                .await;
            }
            series.push(json!({"requests": requests(call(&socket, "stats", Value::Null).await), "rss_kib": rss_kib(pid)}));
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

    let rss_after = rss_kib(pid);
    let requests = call(&socket, "stats", Value::Null).await["requests"].clone();
    println!("\nmemory (RSS): idle {} KiB, with 1000 connections {} KiB, after {requests} requests {} KiB", rss_idle, rss_connections, rss_after);
    report["memory_kib"] = json!({"idle": rss_idle, "connections_1000": rss_connections, "after": rss_after, "requests": requests});

    drop(daemon);
    if want("cdc") && !poll_names.is_empty() {
        // Poll-only: a daemon with cdc.notify = false (the trigger stops notifying) and a short
        // poll, as recommended for write-heavy databases.
        let poll_ms = "20";
        let _polling = DaemonProcess::start(
            dir.path(),
            &socket,
            &db_url,
            &redis_url,
            &[
                ("CACHEWARD__CDC__NOTIFY", "false"),
                ("CACHEWARD__CDC__POLL_INTERVAL_MS", poll_ms),
            ],
        )
        .await;
        let polled = cdc_lag(
            &pg_config,
            &redis_client,
            Some(rate),
            seconds,
            poll_names,
            "p",
            None,
        )
        .await;
        println!(
            "cdc, poll-only (cdc.notify = false, poll_interval_ms = {poll_ms}): {rate} renames/s for {seconds} s: {}",
            polled.summary()
        );
        report["cdc_poll_only"] = polled.json();
        let pending: Vec<i32> = admin
            .query(
                "SELECT jsonb_array_length(pending) FROM cacheward_cdc_cursors",
                &[],
            )
            .await
            .expect("cursors")
            .iter()
            .map(|r| r.get(0))
            .collect();
        println!("cdc cursors' pending transactions after the runs: {pending:?}");
        admin
            .batch_execute("UPDATE cacheward_cdc_settings SET notify = true")
            .await
            .expect("notify again");
    }
    // Trigger cost: out-of-band UPDATE throughput with the capture trigger (NOTIFY on, poll-only)
    // and without it, in alternating runs.
    if want("trigger") {
        let secs: u64 = env_or("CACHEWARD_BENCH_PGBENCH_SECS", 5);
        let mut tps: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        for _ in 0..rounds.max(2) {
            for (label, sql) in [
            ("without trigger", "ALTER TABLE users DISABLE TRIGGER cacheward_capture_update"),
            ("trigger, notify", "ALTER TABLE users ENABLE TRIGGER cacheward_capture_update; UPDATE cacheward_cdc_settings SET notify = true"),
            ("trigger, poll-only", "UPDATE cacheward_cdc_settings SET notify = false"),
        ] {
            admin.batch_execute(sql).await.expect("switch trigger");
            tps.entry(label).or_default().push(pgbench(&pg, dir.path(), users, secs));
        }
        }
        let mean = |label: &str| tps[label].iter().sum::<f64>() / tps[label].len() as f64;
        let base = mean("without trigger");
        println!(
        "\ntrigger cost: pgbench, 4 clients, UPDATE of a random user, {secs} s runs, alternating"
    );
        let mut costs = serde_json::Map::new();
        for label in ["without trigger", "trigger, notify", "trigger, poll-only"] {
            println!(
                "{label:>20}: {:>9.0} tps  ratio {:.2}",
                mean(label),
                mean(label) / base
            );
            costs.insert(
                label.into(),
                json!({"tps": mean(label), "ratio": mean(label) / base}),
            );
        }
        report["trigger_cost"] = Value::Object(costs);
    }

    if want("cluster") {
        report["cluster"] = cluster_part(&db_url, &pg_config, users, hot, slice, rounds).await;
    }

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-e2e.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("json"))
        .expect("write report");
    println!("\nwritten to {}", out.display());
}

/// The daemon in cluster mode on the harness's Redis Cluster (3 primaries with a replica each, all
/// on this machine): the hit path against raw cluster-aware GETs (a round of `depth` GETs sent at
/// once on one cluster connection, routed by slot), the miss path against the same SELECT, and the
/// failover repair window (SIGKILL of a primary until the daemon serves its keys from the cache
/// again).
async fn cluster_part(
    db_url: &str,
    pg_config: &tokio_postgres::Config,
    users: u64,
    hot: u64,
    slice: Duration,
    rounds: usize,
) -> Value {
    // The CDC part renamed users u1.. away: this part reads them, so they exist again (without
    // a capture of each: the daemon below reads them from the table).
    let admin = cacheward::store::pg::connect(pg_config)
        .await
        .expect("connect");
    admin
        .batch_execute(&format!(
            "ALTER TABLE users DISABLE TRIGGER cacheward_capture_insert;
             INSERT INTO users (username) SELECT 'u' || g FROM generate_series(1, {users}) g
                 ON CONFLICT (username) DO NOTHING;
             ALTER TABLE users ENABLE TRIGGER cacheward_capture_insert;"
        ))
        .await
        .expect("users u1.. again");
    // On the main thread: the nodes die with the thread that started them.
    let mut cluster = RedisCluster::start().expect("cluster");
    let urls = cluster.urls();
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("cluster.sock");
    let seeds = urls[1..].join(",");
    let settings = [
        ("CACHEWARD__REDIS__MODE", "cluster"),
        ("CACHEWARD__REDIS__URLS", seeds.as_str()),
    ];
    let daemon = DaemonProcess::start(dir.path(), &socket, db_url, &urls[0], &settings).await;
    let pid = daemon.0.id();
    let hot_name = warm(&socket, hot).await;
    let raw = redis::cluster::ClusterClient::new(urls.clone())
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("connect to the cluster");
    println!(
        "\ncluster (3 primaries + 3 replicas, TCP 127.0.0.1): daemon get vs raw cluster-aware GET"
    );
    hit_header();
    let mut hits = Vec::new();
    for (connections, depth) in [(1, 1), (16, 1), (16, 16)] {
        let (mut d, mut r) = (Side::default(), Side::default());
        for _ in 0..rounds {
            daemon_side(&mut d, pid, &socket, (connections, depth), slice, &hot_name).await;
            r.add(
                measure(connections, depth, slice, |_| {
                    let (conn, names) = (raw.clone(), hot_name.clone());
                    async move {
                        Box::new(move |n: u64| {
                            let (conn, names) = (conn.clone(), names.clone());
                            Box::pin(async move {
                                let gets = (0..depth as u64).map(|i| {
                                    let mut conn = conn.clone();
                                    let key = format!("user:{}", names(n + i));
                                    async move {
                                        redis::cmd("GET")
                                            .arg(key)
                                            .query_async::<Option<String>>(&mut conn)
                                            .await
                                            .expect("GET")
                                    }
                                });
                                futures::future::join_all(gets).await;
                            })
                                as futures::future::BoxFuture<'static, ()>
                        })
                            as Box<dyn FnMut(u64) -> futures::future::BoxFuture<'static, ()> + Send>
                    }
                })
                .await,
            );
        }
        hits.push(hit_row(connections, depth, &d, &r));
    }

    // Miss path: users this daemon never read, 16 connections, vs the same SELECT.
    let next_cold = Arc::new(AtomicU64::new(hot + 1));
    let cold_name: Arc<dyn Fn(u64) -> String + Send + Sync> = {
        let next = next_cold.clone();
        Arc::new(move |_| {
            format!(
                "u{}",
                (next.fetch_add(1, Ordering::Relaxed) - 1) % users + 1
            )
        })
    };
    let (mut d, mut r) = (Side::default(), Side::default());
    for _ in 0..rounds {
        d.add(
            measure(16, 1, slice, |_| {
                daemon_round(socket.clone(), 1, cold_name.clone())
            })
            .await,
        );
        r.add(measure(16, 1, slice, |_| select_round(pg_config.clone(), users)).await);
    }
    let miss_ratio = d.throughput() / r.throughput();
    println!(
        "miss path (16 connections): daemon {:.0} op/s (p99 {} µs) vs raw SELECT {:.0} op/s (p99 {} µs): ratio {miss_ratio:.2}",
        d.throughput(), d.quantile_us(0.99), r.throughput(), r.quantile_us(0.99)
    );
    let miss = json!({"daemon_ops_per_sec": d.throughput(), "select_ops_per_sec": r.throughput(), "ratio": miss_ratio});

    // The failover repair window: the primary of u1's slot dies; its replica is promoted with
    // what it had; the daemon answers from PostgreSQL until it has distrusted and dropped the
    // cache, then fills and hits again.
    let slot = cacheward::store::redis::keys::slot_of(b"user:u1");
    let owner = cluster
        .primaries()
        .into_iter()
        .find(|&port| {
            let Ok(mut conn) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection())
            else {
                return false;
            };
            redis::cmd("CLUSTER")
                .arg("COUNTKEYSINSLOT")
                .arg(slot)
                .query::<i64>(&mut conn)
                .is_ok_and(|n| n > 0)
        })
        .expect("the owner of u1's slot");
    let row = call(&socket, "get", json!({"username": "u1"})).await["user"].clone();
    let killed = Instant::now();
    cluster.kill(cluster.node(owner).expect("a node"));
    let (mut promoted, mut from_cache, mut stale, mut failed) = (None, None, 0, 0);
    while killed.elapsed() < Duration::from_secs(30) && from_cache.is_none() {
        let answer = call(&socket, "get", json!({"username": "u1"})).await;
        match answer.get("error") {
            Some(_) => failed += 1,
            None => stale += (answer["user"] != row) as u32,
        }
        if promoted.is_none() && cluster.primaries().len() == 3 {
            promoted = Some(killed.elapsed());
        }
        if promoted.is_some() && answer["source"] == json!("cache") {
            from_cache = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    println!(
        "failover: primary SIGKILLed; replica promoted after {:.2} s; the daemon served the key from the cache again after {:.2} s (from PostgreSQL meanwhile); answers that differed from the row: {stale}, errors: {failed}",
        secs(promoted),
        secs(from_cache)
    );
    json!({"hit": hits, "miss": miss,
           "failover": {"promoted_secs": secs(promoted), "cached_again_secs": secs(from_cache), "wrong_answers": stale, "errors": failed}})
}

/// Renames users `u1..` to `c1..` at `rate` per second for `seconds`, and times each new key's
/// appearance in Redis (keyspace notifications). Returns the lag histogram (µs) and how many
/// renames never showed up.
async fn cdc_lag(
    pg: &tokio_postgres::Config,
    redis_client: &redis::Client,
    rate: Option<u64>,
    seconds: u64,
    names: std::ops::RangeInclusive<u64>,
    prefix: &'static str,
    stopped_daemon: Option<u32>,
) -> CdcRun {
    use futures::StreamExt;
    use std::collections::HashMap;
    let mut conn = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("K$")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    let mut pubsub = redis_client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .psubscribe(format!("__keyspace@*__:user:{prefix}*"))
        .await
        .expect("psubscribe");
    let seen: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let listener = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let key = msg
                    .get_channel_name()
                    .rsplit(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().unwrap().entry(key).or_insert_with(Instant::now);
            }
        }
    });
    let committed: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    // Stopped (SIGSTOP) while the writers run, the daemon finds the whole run as a backlog.
    let signal = |signal| {
        if let Some(pid) = stopped_daemon {
            // SAFETY: kill(2) on the daemon's pid; no memory is involved.
            unsafe { libc::kill(pid as i32, signal) };
        }
    };
    signal(libc::SIGSTOP);
    let start = Instant::now();
    let mut writers = Vec::new();
    let first = *names.start();
    let last = *names.end();
    for w in 0..4u64 {
        let (pg, committed) = (pg.clone(), committed.clone());
        writers.push(tokio::spawn(async move {
            let client = cacheward::store::pg::connect(&pg).await.expect("pg");
            let stmt = client
                .prepare("UPDATE users SET username = $2 WHERE username = $1")
                .await
                .expect("prepare");
            let mut i = first + w;
            while i <= last && start.elapsed() < Duration::from_secs(seconds) {
                if let Some(rate) = rate {
                    // Paced: the n-th change is due at n / rate seconds.
                    let due = start + Duration::from_secs_f64((i - first) as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let (from, to) = (format!("u{i}"), format!("{prefix}{i}"));
                client.execute(&stmt, &[&from, &to]).await.expect("update");
                committed.lock().unwrap().insert(to, Instant::now());
                i += 4;
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let elapsed = start.elapsed();
    let resumed = Instant::now();
    signal(libc::SIGCONT);
    // Until every change showed up, or 15 s, then a little longer for stragglers.
    let expected = committed.lock().unwrap().len();
    while seen.lock().unwrap().len() < expected && resumed.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    listener.abort();
    let drained_in = seen
        .lock()
        .unwrap()
        .values()
        .max()
        .map_or(Duration::ZERO, |last| {
            last.saturating_duration_since(resumed)
        });
    let mut lag = histogram();
    let mut unseen = Vec::new();
    {
        let seen = seen.lock().unwrap();
        for (name, at) in committed.lock().unwrap().iter() {
            match seen.get(name) {
                Some(visible) => {
                    lag.saturating_record(visible.saturating_duration_since(*at).as_micros() as u64)
                }
                None => unseen.push(format!("user:{name}")),
            }
        }
    }
    // A change whose notification never came may still have reached Redis (a dropped
    // notification): only a key that is missing now is lost.
    let mut lost = 0;
    for keys in unseen.chunks(1000) {
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .expect("MGET");
        for (key, value) in keys.iter().zip(values) {
            if !value
                .as_deref()
                .is_some_and(cacheward::model::entry::is_live)
            {
                eprintln!("cdc: {key} never reached Redis: {value:?}");
                let client = cacheward::store::pg::connect(pg).await.expect("pg");
                let name = key.trim_start_matches("user:");
                for row in client
                    .query("SELECT id, txid::text, changed_at::text FROM cacheward_outbox WHERE username = $1", &[&name])
                    .await
                    .expect("outbox")
                {
                    let (id, txid, at): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
                    let around: Vec<(i64, String)> = client
                        .query("SELECT id, txid::text FROM cacheward_outbox WHERE id BETWEEN $1::bigint - 3 AND $1::bigint + 3 ORDER BY id", &[&id])
                        .await
                        .expect("around")
                        .iter()
                        .map(|r| (r.get(0), r.get(1)))
                        .collect();
                    eprintln!("  outbox id {id} txid {txid} at {at}; around: {around:?}");
                }
                lost += 1;
            }
        }
    }
    let changes = committed.lock().unwrap().len() as u64;
    CdcRun {
        changes,
        elapsed,
        lag,
        lost,
        drained_in,
    }
}

/// Out-of-band changes committed, and how long each took to show in Redis.
struct CdcRun {
    changes: u64,
    elapsed: Duration,
    lag: Histogram<u64>,
    lost: u64,
    /// From the daemon resuming (or the last commit) to the last change showing in Redis.
    drained_in: Duration,
}

impl CdcRun {
    fn rate(&self) -> f64 {
        self.changes as f64 / self.elapsed.as_secs_f64()
    }

    fn summary(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        format!(
            "{} changes at {:.0}/s: lag p50 {} ms, p99 {} ms, max {} ms; lost {}",
            self.changes,
            self.rate(),
            ms(self.lag.value_at_quantile(0.5)),
            ms(self.lag.value_at_quantile(0.99)),
            ms(self.lag.max()),
            self.lost
        )
    }

    fn json(&self) -> Value {
        json!({"changes": self.changes, "rate": self.rate(), "lost": self.lost,
            "lag_us": {"p50": self.lag.value_at_quantile(0.5), "p99": self.lag.value_at_quantile(0.99), "max": self.lag.max()}})
    }
}

/// Runs pgbench (4 clients) updating random users for `secs`; returns its tps.
fn pgbench(pg: &Postgres, dir: &Path, users: u64, secs: u64) -> f64 {
    let script = dir.join("update.sql");
    std::fs::write(
        &script,
        format!(
            "\\set id random(1, {users})\nUPDATE users SET created_at = now() WHERE id = :id;\n"
        ),
    )
    .expect("write pgbench script");
    let out = Command::new(cacheward::dev::pg_tool("pgbench").expect("pgbench"))
        .args([
            "-n",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-U",
            "postgres",
            "-p",
            "5432",
            "-h",
        ])
        .arg(pg.dir())
        .arg("-f")
        .arg(&script)
        .arg("bench")
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no tps in pgbench output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}
