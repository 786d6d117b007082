//! The capture trigger's cost to writers: pgbench UPDATE throughput with and without it.

use std::path::Path;
use std::process::Command;

use cacheward::dev::Postgres;
use serde_json::{json, Value};

use crate::measure::env_or;
use crate::Bench;

/// Runs pgbench (4 clients) updating random users for `secs`; returns its tps.
pub fn pgbench(pg: &Postgres, dir: &Path, users: u64, secs: u64) -> f64 {
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

/// Out-of-band UPDATE throughput with the capture trigger (NOTIFY on, poll-only) and without it,
/// in alternating runs; into `report`.
pub async fn run(b: &Bench, report: &mut Value) {
    let secs: u64 = env_or("CACHEWARD_BENCH_PGBENCH_SECS", 5);
    let mut tps: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for _ in 0..b.rounds.max(2) {
        for (label, sql) in [
        ("without trigger", "ALTER TABLE users DISABLE TRIGGER cacheward_capture_update"),
        ("trigger, notify", "ALTER TABLE users ENABLE TRIGGER cacheward_capture_update; UPDATE cacheward_cdc_settings SET notify = true"),
        ("trigger, poll-only", "UPDATE cacheward_cdc_settings SET notify = false"),
    ] {
        b.admin.batch_execute(sql).await.expect("switch trigger");
        tps.entry(label).or_default().push(pgbench(&b.pg, b.dir.path(), b.users, secs));
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
