//! A declared table next to users, on one daemon, in alternating slices: daemon gets of cached
//! rows of a table with a composite key (text with `:` and a bigint) against gets of cached
//! users, cell by cell; then cold gets (each key read once: a miss, a database read and a fill)
//! of both. The ratio is the table's throughput over users'.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::common::DaemonProcess;
use crate::hit::{daemon_side, user_params, Params};
use crate::measure::{call, Side};
use crate::Bench;

const TABLE: &str = "
    DROP TABLE IF EXISTS bench_orders;
    CREATE TABLE bench_orders (region text NOT NULL, id bigint NOT NULL, note text NOT NULL,
                               created_at timestamptz NOT NULL DEFAULT now(),
                               PRIMARY KEY (region, id));";

/// The params of a get of `bench_orders` row `(eu:1, id)`.
fn order(id: u64) -> String {
    format!("{{\"table\":\"bench_orders\",\"key\":{{\"region\":\"eu:1\",\"id\":{id}}}}}")
}

fn row_params(ids: Arc<dyn Fn(u64) -> u64 + Send + Sync>) -> Params {
    Arc::new(move |n| order(ids(n)))
}

/// Prints and returns one comparison row.
fn compare(label: &str, cell: (usize, usize), users: &Side, table: &Side) -> Value {
    let ratio = table.throughput() / users.throughput();
    println!(
        "{label:>5} {:>5} {:>5} | {:>12.0} {:>8} {:>8} | {:>12.0} {:>8} {:>8} | {ratio:>6.2}",
        cell.0,
        cell.1,
        users.throughput(),
        users.quantile_us(0.5),
        users.quantile_us(0.99),
        table.throughput(),
        table.quantile_us(0.5),
        table.quantile_us(0.99),
    );
    json!({"connections": cell.0, "depth": cell.1,
        "users": {"ops_per_sec": users.throughput(), "p50_us": users.quantile_us(0.5), "p99_us": users.quantile_us(0.99)},
        "table": {"ops_per_sec": table.throughput(), "p50_us": table.quantile_us(0.5), "p99_us": table.quantile_us(0.99)},
        "ratio": ratio})
}

pub async fn run(b: &Bench, report: &mut Value) {
    b.admin
        .batch_execute(&format!(
            "{TABLE}
             INSERT INTO bench_orders (region, id, note)
                 SELECT 'eu:1', g, 'order ' || g FROM generate_series(1, {}) g;
             ANALYZE bench_orders;",
            b.users
        ))
        .await
        .expect("make bench_orders");
    let dir = b.dir.path().join("tables");
    std::fs::create_dir_all(dir.join("config")).expect("config dir");
    let declared = "[tables.bench_orders]\nkey = [\"region\", \"id\"]\n";
    std::fs::write(dir.join("config/cacheward.toml"), declared).expect("config");
    let mut config = cacheward::config::Config::default();
    config.tables.insert(
        "bench_orders".into(),
        cacheward::config::TableConfig {
            source: None,
            key: vec!["region".into(), "id".into()],
            lookups: Default::default(),
            columns: None,
            exclude: vec![],
            key_prefix: None,
            ttl_secs: None,
            writable: true,
        },
    );
    let mut client = cacheward::store::pg::connect(&b.pg_config)
        .await
        .expect("connect");
    let checked = cacheward::store::pg::tables::resolve_all(&client, &config)
        .await
        .expect("bench_orders checks");
    cacheward::store::pg::tables::install(&mut client, &checked)
        .await
        .expect("capture");
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
        "{:>5} {:>5} {:>5} | {:>12} {:>8} {:>8} | {:>12} {:>8} {:>8} | {:>6}",
        "",
        "conns",
        "depth",
        "users op/s",
        "p50 µs",
        "p99 µs",
        "table op/s",
        "p50 µs",
        "p99 µs",
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
    // Cold: each slice reads keys no slice read before (users and rows past the hot ones).
    let mut misses = Vec::new();
    let span = (b.users - hot) / (2 * b.rounds as u64 + 2);
    for cell in [(1, 1), (16, 1)] {
        let (mut u, mut t) = (Side::default(), Side::default());
        for round in 0..b.rounds as u64 {
            let base = hot + round * span;
            let cold = move |n: u64| base + n % span + 1;
            let users_cold: Params =
                Arc::new(move |n| format!("{{\"username\":\"u{}\"}}", cold(n)));
            let table_cold = row_params(Arc::new(cold));
            daemon_side(&mut u, pid, &socket, cell, b.slice, &users_cold).await;
            daemon_side(&mut t, pid, &socket, cell, b.slice, &table_cold).await;
        }
        misses.push(compare("miss", cell, &u, &t));
    }
    report["declared_table"] = json!({"hit": hits, "miss": misses});
}
