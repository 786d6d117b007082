//! The miss path: daemon gets of users never asked for before against the raw SELECT of the same
//! shape; where the CPU goes on each side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::hit::{daemon_round, user_params};
use crate::measure::{cpu_split, env_or, measure, split_us_per_op, Side};
use crate::Bench;

/// The raw side of the miss path: one prepared SELECT of the shape the daemon runs, per round, of
/// user `n % users + 1`.
pub async fn select_round(
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

/// The miss path on `miss_conns` connections (`CACHEWARD_BENCH_MISS_CONNS`, 16 by default): users
/// from `hot + 1` on, each asked for once, against the raw SELECT; into `report`.
pub async fn run(b: &Bench, pid: u32, report: &mut Value) {
    // Miss path: each daemon get names a user never requested before (so never cached), vs a raw
    // prepared SELECT of the same shape; 16 connections.
    let (hot, users, rounds, slice) = (b.hot, b.users, b.rounds, b.slice);
    let total = users;
    let (next_cold, cold_name) = cold_names(hot, users);
    // 16 connections, as issue 4 sets it; CACHEWARD_BENCH_MISS_CONNS for other loads.
    let miss_conns: usize = env_or("CACHEWARD_BENCH_MISS_CONNS", 16);
    let (mut d, mut r) = (Side::default(), Side::default());
    let (mut d_split, mut r_split) = ([0u64; 4], [0u64; 4]);
    for _ in 0..rounds {
        let cpu = cpu_split(pid);
        d.add(
            measure(miss_conns, 1, slice, |_| {
                daemon_round(b.socket.clone(), 1, user_params(&cold_name))
            })
            .await,
        );
        let after = cpu_split(pid);
        d.cpu_ticks += after[0] - cpu[0];
        (0..4).for_each(|i| d_split[i] += after[i] - cpu[i]);
        r.add(
            measure(miss_conns, 1, slice, |_| {
                select_round(b.pg_config.clone(), total)
            })
            .await,
        );
        let end = cpu_split(pid);
        (0..4).for_each(|i| r_split[i] += end[i] - after[i]);
    }
    {
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
}

/// Names of users never asked for before, one per call, from `u{hot + 1}` on (wrapping past
/// `users`), and the counter of the next one (how many were used).
pub fn cold_names(
    hot: u64,
    users: u64,
) -> (Arc<AtomicU64>, Arc<dyn Fn(u64) -> String + Send + Sync>) {
    let next = Arc::new(AtomicU64::new(hot + 1));
    let counter = next.clone();
    let name = Arc::new(move |_| {
        format!(
            "u{}",
            (next.fetch_add(1, Ordering::Relaxed) - 1) % users + 1
        )
    });
    (counter, name)
}
