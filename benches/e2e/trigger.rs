//! The capture's cost to writers: pgbench UPDATE throughput with and without it, for `users` (its
//! version column and capture trigger) and for a declared table of the same shape (its capture
//! keeps versions in a side table: no column added to the application's table).

use std::path::Path;
use std::process::Command;

use cacheward::dev::Postgres;
use serde_json::{json, Value};

use crate::measure::env_or;
use crate::Bench;

/// Runs pgbench (4 clients) updating random rows of `table` (ids 1..=`rows`) for `secs`;
/// returns its tps.
pub fn pgbench(pg: &Postgres, dir: &Path, table: &str, rows: u64, secs: u64) -> f64 {
    let script = dir.join("update.sql");
    std::fs::write(
        &script,
        format!(
            "\\set id random(1, {rows})\nUPDATE {table} SET created_at = now() WHERE id = :id;\n"
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

/// The declared table measured beside `users`: the same columns and rows, its capture installed
/// as `cacheward migrate` installs it.
async fn declare(b: &Bench) {
    b.admin
        .batch_execute(
            "DROP TABLE IF EXISTS bench_accounts;
             CREATE TABLE bench_accounts (id bigint PRIMARY KEY, username text NOT NULL UNIQUE,
                                          created_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO bench_accounts SELECT id, username, created_at FROM users;
             ANALYZE bench_accounts;",
        )
        .await
        .expect("make bench_accounts");
    let mut config = cacheward::config::Config::default();
    config.tables.insert(
        "bench_accounts".into(),
        cacheward::config::TableConfig::keyed(&["id"]).lookup("by_username", &["username"]),
    );
    crate::tables::capture(b, &config).await;
}

/// Out-of-band UPDATE throughput with the capture (NOTIFY on, poll-only) and without it, for
/// `users` and for a declared table, in alternating runs; into `report`.
pub async fn run(b: &Bench, report: &mut Value) {
    let secs: u64 = env_or("CACHEWARD_BENCH_PGBENCH_SECS", 5);
    declare(b).await;
    let mut tps: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let triggers = |table: &str, on: bool| {
        let verb = if on { "ENABLE" } else { "DISABLE" };
        let name = match table {
            "users" => "cacheward_capture_update",
            _ => "cacheward_bench_accounts_update",
        };
        format!("ALTER TABLE {table} {verb} TRIGGER {name}")
    };
    for _ in 0..b.rounds.max(2) {
        for table in ["users", "bench_accounts"] {
            let runs = [
                ("without trigger", triggers(table, false)),
                (
                    "trigger, notify",
                    format!(
                        "{}; UPDATE cacheward_cdc_settings SET notify = true",
                        triggers(table, true)
                    ),
                ),
                (
                    "trigger, poll-only",
                    "UPDATE cacheward_cdc_settings SET notify = false".to_owned(),
                ),
            ];
            for (label, sql) in runs {
                b.admin.batch_execute(&sql).await.expect("switch trigger");
                let label = label_of(table, label);
                let run = pgbench(&b.pg, b.dir.path(), table, b.users, secs);
                tps.entry(label).or_default().push(run);
            }
        }
    }
    b.admin
        .batch_execute("UPDATE cacheward_cdc_settings SET notify = true")
        .await
        .expect("notify back on");
    let mean = |label: &str| tps[label].iter().sum::<f64>() / tps[label].len() as f64;
    println!(
        "\ntrigger cost: pgbench, 4 clients, UPDATE of a random row, {secs} s runs, alternating"
    );
    let mut costs = serde_json::Map::new();
    for table in ["users", "bench_accounts"] {
        let base = mean(label_of(table, "without trigger"));
        for label in ["without trigger", "trigger, notify", "trigger, poll-only"] {
            let label = label_of(table, label);
            println!(
                "{label:>36}: {:>9.0} tps  ratio {:.2}",
                mean(label),
                mean(label) / base
            );
            costs.insert(
                label.into(),
                json!({"tps": mean(label), "ratio": mean(label) / base}),
            );
        }
    }
    report["trigger_cost"] = Value::Object(costs);
}

/// The report's label of a run: users' as they always were, the declared table's prefixed.
fn label_of(table: &str, label: &'static str) -> &'static str {
    match (table, label) {
        ("users", label) => label,
        (_, "without trigger") => "declared table, without capture",
        (_, "trigger, notify") => "declared table, capture, notify",
        (_, _) => "declared table, capture, poll-only",
    }
}
