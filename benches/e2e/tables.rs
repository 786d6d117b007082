//! A declared table next to users, on one daemon, in alternating slices: daemon gets of cached
//! rows of a table with a composite key (text with `:` and a bigint) against gets of cached
//! users, cell by cell; then cold gets (each key read once: a miss, a database read and a fill)
//! of both. The ratio is the table's throughput over users'.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use cacheward::config::TableConfig;

use crate::common::DaemonProcess;
use crate::hit::{daemon_side, user_params, Params};
use crate::measure::{call, cpu_split, split_us_per_op, Side};
use crate::Bench;

const TABLE: &str = "
    DROP TABLE IF EXISTS bench_orders, bench_a, bench_b;
    CREATE TABLE bench_orders (region text NOT NULL, id bigint NOT NULL, note text NOT NULL,
                               created_at timestamptz NOT NULL DEFAULT now(),
                               PRIMARY KEY (region, id));
    CREATE TABLE bench_a (id bigint PRIMARY KEY, n integer NOT NULL);
    CREATE TABLE bench_b (id bigint PRIMARY KEY, n integer NOT NULL);";

/// The three tables the CDC lag run changes, with the statement that changes row `$1` of each and
/// the Redis key (after the prefix) it lands on.
const LAGGED: [(&str, &str); 3] = [
    (
        "UPDATE bench_orders SET note = note || '.' WHERE region = 'eu:1' AND id = $1",
        "bench_orders:eu%3A1:",
    ),
    ("UPDATE bench_a SET n = n + 1 WHERE id = $1", "bench_a:"),
    ("UPDATE bench_b SET n = n + 1 WHERE id = $1", "bench_b:"),
];

/// Installs the capture of every table `config` declares, as `cacheward migrate` does.
pub async fn capture(b: &Bench, config: &cacheward::config::Config) {
    let mut client = cacheward::store::pg::connect(&b.pg_config)
        .await
        .expect("connect");
    let checked = cacheward::store::pg::tables::resolve_all(&client, config)
        .await
        .expect("the declared tables check");
    cacheward::store::pg::capture::install(&mut client, &checked)
        .await
        .expect("install the captures");
}

/// The params of a get of `bench_orders` row `(eu:1, id)`.
fn order(id: u64) -> String {
    format!("{{\"table\":\"bench_orders\",\"key\":{{\"region\":\"eu:1\",\"id\":{id}}}}}")
}

fn row_params(ids: Arc<dyn Fn(u64) -> u64 + Send + Sync>) -> Params {
    Arc::new(move |n| order(ids(n)))
}

/// The daemon at `socket`'s database queries and cache hits so far (its `stats`).
async fn counts(socket: &std::path::Path) -> [u64; 2] {
    let stats = call(socket, "stats", json!({})).await;
    let count = |name: &str| stats[name].as_u64().expect("stats count it");
    [count("db_queries"), count("cache_hits")]
}

/// Numbers from `from` down, one per call, never below `floor` (where the keys run out).
fn countdown(from: u64, floor: u64) -> Arc<dyn Fn(u64) -> u64 + Send + Sync> {
    let next = AtomicU64::new(from);
    Arc::new(move |_| next.fetch_sub(1, Ordering::Relaxed).max(floor + 1))
}

/// Prints and returns one comparison row.
fn compare(label: &str, cell: (usize, usize), users: &Side, table: &Side) -> Value {
    let ratio = table.throughput() / users.throughput();
    println!(
        "{label:>5} {:>5} {:>5} | {:>12.0} {:>8} {:>8} {:>7.1} | {:>12.0} {:>8} {:>8} {:>7.1} | {ratio:>6.2}",
        cell.0,
        cell.1,
        users.throughput(),
        users.quantile_us(0.5),
        users.quantile_us(0.99),
        users.cpu_us_per_op(),
        table.throughput(),
        table.quantile_us(0.5),
        table.quantile_us(0.99),
        table.cpu_us_per_op(),
    );
    json!({"connections": cell.0, "depth": cell.1,
        "users": {"ops_per_sec": users.throughput(), "p50_us": users.quantile_us(0.5), "p99_us": users.quantile_us(0.99), "daemon_cpu_us_per_op": users.cpu_us_per_op()},
        "table": {"ops_per_sec": table.throughput(), "p50_us": table.quantile_us(0.5), "p99_us": table.quantile_us(0.99), "daemon_cpu_us_per_op": table.cpu_us_per_op()},
        "ratio": ratio})
}

pub async fn run(b: &Bench, report: &mut Value) {
    b.admin
        .batch_execute(&format!(
            "{TABLE}
             INSERT INTO bench_orders (region, id, note)
                 SELECT 'eu:1', g, 'order ' || g FROM generate_series(1, {n}) g;
             INSERT INTO bench_a SELECT g, 0 FROM generate_series(1, {n}) g;
             INSERT INTO bench_b SELECT g, 0 FROM generate_series(1, {n}) g;
             ANALYZE bench_orders, bench_a, bench_b;",
            n = b.users
        ))
        .await
        .expect("make bench_orders");
    let dir = b.dir.path().join("tables");
    std::fs::create_dir_all(dir.join("config")).expect("config dir");
    let declared = "[tables.bench_orders]\nkey = [\"region\", \"id\"]\n\
                    [tables.bench_a]\nkey = [\"id\"]\n[tables.bench_b]\nkey = [\"id\"]\n";
    std::fs::write(dir.join("config/cacheward.toml"), declared).expect("config");
    let mut config = cacheward::config::Config::default();
    config
        .tables
        .insert("bench_orders".into(), TableConfig::keyed(&["region", "id"]));
    for name in ["bench_a", "bench_b"] {
        config
            .tables
            .insert(name.into(), TableConfig::keyed(&["id"]));
    }
    capture(b, &config).await;
    let socket = dir.join("tables.sock");
    let daemon = DaemonProcess::start(&dir, &socket, &b.db_url, &b.redis_url, &[]).await;
    let pid = daemon.child.id();
    // Warm both: Redis, then the near cache.
    for _ in 0..2 {
        for i in 1..=b.hot {
            call(&socket, "get", json!({ "username": format!("u{i}") })).await;
            let params: Value = serde_json::from_str(&order(i)).expect("params");
            let answer = call(&socket, "get", params).await;
            assert!(answer.get("row").is_some(), "{answer}");
        }
    }
    let hot = b.hot;
    let users_hot = user_params(&b.hot_name);
    let table_hot = row_params(Arc::new(move |n| n % hot + 1));
    println!("\ndeclared table next to users, one daemon: gets of cached rows (near cache warm)");
    println!(
        "{:>5} {:>5} {:>5} | {:>12} {:>8} {:>8} {:>7} | {:>12} {:>8} {:>8} {:>7} | {:>6}",
        "",
        "conns",
        "depth",
        "users op/s",
        "p50 µs",
        "p99 µs",
        "cpu µs",
        "table op/s",
        "p50 µs",
        "p99 µs",
        "cpu µs",
        "ratio"
    );
    let mut hits = Vec::new();
    for &cell in &b.cells {
        let (mut u, mut t) = (Side::default(), Side::default());
        for _ in 0..b.rounds {
            daemon_side(&mut u, pid, &socket, cell, b.slice, &users_hot).await;
            daemon_side(&mut t, pid, &socket, cell, b.slice, &table_hot).await;
        }
        hits.push(compare("hit", cell, &u, &t));
    }
    // Cold: every get names a key no get named before, counted down from the last row (away from
    // the users the miss part reads upward from `hot + 1`), in slices short enough not to run out.
    // The daemon's own counters tell how many gets it answered from the cache meanwhile (none, if
    // the slices are all misses) and how many keys each database query read.
    let mut misses = Vec::new();
    let slice = b.slice / 4;
    let (next_user, next_row) = (countdown(b.users, hot), countdown(b.users, hot));
    for cell in [(1, 1), (16, 1)] {
        let (mut u, mut t) = (Side::default(), Side::default());
        let (mut user_counts, mut table_counts) = ([0, 0], [0, 0]);
        let (mut user_cpu, mut table_cpu) = ([0u64; 4], [0u64; 4]);
        for _ in 0..b.rounds {
            let user = next_user.clone();
            let users_cold: Params =
                Arc::new(move |n| format!("{{\"username\":\"u{}\"}}", user(n)));
            let table_cold = row_params(next_row.clone());
            let (before, cpu_before) = (counts(&socket).await, cpu_split(pid));
            daemon_side(&mut u, pid, &socket, cell, slice, &users_cold).await;
            let (between, cpu_between) = (counts(&socket).await, cpu_split(pid));
            daemon_side(&mut t, pid, &socket, cell, slice, &table_cold).await;
            let (after, cpu_after) = (counts(&socket).await, cpu_split(pid));
            for i in 0..2 {
                user_counts[i] += between[i] - before[i];
                table_counts[i] += after[i] - between[i];
            }
            for i in 0..4 {
                user_cpu[i] += cpu_between[i] - cpu_before[i];
                table_cpu[i] += cpu_after[i] - cpu_between[i];
            }
        }
        let mut row = compare("miss", cell, &u, &t);
        let per_query =
            |side: &Side, [queries, _]: [u64; 2]| side.ops as f64 / queries.max(1) as f64;
        row["users"]["keys_per_query"] = json!(per_query(&u, user_counts));
        row["table"]["keys_per_query"] = json!(per_query(&t, table_counts));
        row["users"]["cache_hits"] = json!(user_counts[1]);
        row["table"]["cache_hits"] = json!(table_counts[1]);
        println!(
            "      keys per database query: users {:.2}, table {:.2}{}",
            per_query(&u, user_counts),
            per_query(&t, table_counts),
            match user_counts[1] + table_counts[1] {
                0 => String::new(),
                hits => format!(" (WARNING: {hits} gets were hits; raise CACHEWARD_BENCH_USERS)"),
            }
        );
        let [ud, uc, ur, up] = split_us_per_op(user_cpu, u.ops);
        let [td, tc, tr, tp] = split_us_per_op(table_cpu, t.ops);
        println!(
            "      CPU µs/op, daemon + client + redis + postgres: users {ud:.1} + {uc:.1} + {ur:.1} + {up:.1}, table {td:.1} + {tc:.1} + {tr:.1} + {tp:.1}"
        );
        row["users"]["cpu_us_per_op"] =
            json!({"daemon": ud, "client": uc, "redis": ur, "postgres": up});
        row["table"]["cpu_us_per_op"] =
            json!({"daemon": td, "client": tc, "redis": tr, "postgres": tp});
        misses.push(row);
    }
    report["declared_table"] = json!({"hit": hits, "miss": misses});
    drop(daemon);
}

/// The CDC lag part, once the main daemon (which declares no table, and would hold the change
/// stream's lease) is gone: a daemon declaring the three tables applies the stream.
pub async fn cdc(b: &Bench, report: &mut Value) {
    let dir = b.dir.path().join("tables");
    let socket = dir.join("tables.sock");
    let daemon = DaemonProcess::start(&dir, &socket, &b.db_url, &b.redis_url, &[]).await;
    // The lease the stopped daemon held expires first: wait until a change reaches Redis.
    let mut conn = b
        .redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let started = std::time::Instant::now();
    loop {
        b.admin
            .batch_execute("UPDATE bench_a SET n = n + 1 WHERE id = 1")
            .await
            .expect("probe");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let at: Option<String> = redis::cmd("GET")
            .arg("bench_a:1")
            .query_async(&mut conn)
            .await
            .expect("GET");
        if at.is_some() || started.elapsed() > std::time::Duration::from_secs(30) {
            break;
        }
    }
    // Rows no earlier part touched: past the ones the hit and miss slices read.
    report["declared_table_cdc"] = lag(b, b.users / 2 + 1).await;
    drop(daemon);
}

/// CDC lag with changes spread over three declared tables: 4 connections, 1 000 changes/s in all
/// for 5 s, each change to a row no other change touches (ids from `first`), timed from its commit
/// to its key's appearance in Redis (keyspace notifications).
async fn lag(b: &Bench, first: u64) -> Value {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};
    let (rate, seconds) = (1000u64, 5u64);
    let (seen, listener) = crate::cdc::watch_keys(&b.redis_client, "bench_*").await;
    let committed: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let start = Instant::now();
    let total = rate * seconds;
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (pg, committed) = (b.pg_config.clone(), committed.clone());
        writers.push(tokio::spawn(async move {
            let client = cacheward::store::pg::connect(&pg).await.expect("pg");
            let mut statements = Vec::new();
            for (sql, _) in LAGGED {
                statements.push(client.prepare(sql).await.expect("prepare"));
            }
            let mut i = w;
            while i < total {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let table = (i % 3) as usize;
                let id = (first + i / 3) as i64;
                client
                    .execute(&statements[table], &[&id])
                    .await
                    .expect("update");
                let key = format!("{}{id}", LAGGED[table].1);
                committed.lock().unwrap().insert(key, Instant::now());
                i += 4;
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let expected = committed.lock().unwrap().len();
    while seen.lock().unwrap().len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    listener.abort();
    let mut lag = crate::measure::histogram();
    let mut lost = 0;
    {
        let seen = seen.lock().unwrap();
        for (key, at) in committed.lock().unwrap().iter() {
            match seen.get(key) {
                Some(visible) => {
                    lag.saturating_record(visible.saturating_duration_since(*at).as_micros() as u64)
                }
                None => lost += 1,
            }
        }
    }
    let ms = |q: f64| lag.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "cdc over three declared tables, {rate} changes/s for {seconds} s from 4 connections \
         (commit → key in Redis): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} changes, {lost} not seen",
        ms(0.5),
        ms(0.99),
        lag.max() as f64 / 1000.0,
        expected
    );
    json!({"rate": rate, "seconds": seconds, "changes": expected, "p50_ms": ms(0.5),
           "p99_ms": ms(0.99), "max_ms": lag.max() as f64 / 1000.0, "not_seen": lost})
}
