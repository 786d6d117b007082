//! The thundering herd: 1 000 connections ask for the same cold user at once; how many SELECTs
//! reach PostgreSQL, and the daemon's memory with 1 000 connections open.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::measure::rss_kib;
use crate::Bench;

/// Runs the herd into `report`; returns the daemon's RSS (KiB) with the 1 000 connections open.
pub async fn run(b: &Bench, pid: u32, report: &mut Value) -> u64 {
    b.admin
        .execute("SELECT pg_stat_statements_reset()", &[])
        .await
        .expect("reset");
    let herd_name = format!("u{}", b.users);
    let _: () = redis::cmd("DEL")
        .arg(format!("user:{herd_name}"))
        .query_async(
            &mut b
                .redis_client
                .get_multiplexed_async_connection()
                .await
                .expect("redis"),
        )
        .await
        .expect("DEL");
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(UnixStream::connect(&b.socket).await.expect("connect"));
    }
    let rss_connections = rss_kib(pid);
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
    let selects: i64 = b
        .admin
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
    rss_connections
}
