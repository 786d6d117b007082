//! The hit path: daemon gets of cached users against raw pipelined Redis GETs of the same keys,
//! cell by cell (connections × depth), with the near cache warm and off.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::common::DaemonProcess;
use crate::measure::{call, cpu_ticks, measure, Side};
use crate::Bench;

/// What a get of op `n` asks for: its params object, as JSON text.
pub type Params = Arc<dyn Fn(u64) -> String + Send + Sync>;

/// The params of a get of user `names(n)`.
pub fn user_params(names: &Arc<dyn Fn(u64) -> String + Send + Sync>) -> Params {
    let names = names.clone();
    Arc::new(move |n| format!("{{\"username\":\"{}\"}}", names(n)))
}

/// A pipelining JSON-RPC client: sends `depth` gets, reads `depth` answers.
pub async fn daemon_round(
    socket: PathBuf,
    depth: usize,
    params: Params,
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
        let (state, params) = (state.clone(), params.clone());
        Box::pin(async move {
            let mut guard = state.lock().await;
            let (reader, writer, line, out) = &mut *guard;
            out.clear();
            for i in 0..depth as u64 {
                out.extend_from_slice(
                    format!(
                        "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"get\",\"params\":{}}}\n",
                        params(n + i)
                    )
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
pub async fn daemon_side(
    d: &mut Side,
    pid: u32,
    socket: &Path,
    (connections, depth): (usize, usize),
    slice: Duration,
    params: &Params,
) {
    let cpu = cpu_ticks(pid);
    d.add(
        measure(connections, depth, slice, |_| {
            daemon_round(socket.to_owned(), depth, params.clone())
        })
        .await,
    );
    d.cpu_ticks += cpu_ticks(pid) - cpu;
}

/// Reads users `u1..=hot` through the daemon at `socket` twice (so they are cached in Redis, then
/// in the near cache, whose entries come from tracked Redis reads); returns the name of round
/// `n`'s user among them.
pub async fn warm(socket: &Path, hot: u64) -> Arc<dyn Fn(u64) -> String + Send + Sync> {
    for _ in 0..2 {
        for i in 1..=hot {
            call(socket, "get", json!({ "username": format!("u{i}") })).await;
        }
    }
    Arc::new(move |n| format!("u{}", n % hot + 1))
}

pub fn hit_header() {
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
pub fn hit_row(connections: usize, depth: usize, d: &Side, r: &Side) -> Value {
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

/// One hit-path table: per cell, `rounds` alternating slices of daemon gets (the daemon `pid` at
/// `socket`) and raw pipelined Redis GETs of the same keys.
pub async fn hit_table(
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
            let params = user_params(names);
            daemon_side(&mut d, pid, socket, (connections, depth), slice, &params).await;
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

/// Both hit tables: with the near cache warm (the daemon `pid`), and on a second daemon with it
/// off.
pub async fn run(b: &Bench, pid: u32) -> (Value, Value) {
    println!("\nhit path, near cache warm: daemon get of a cached user vs raw Redis GET (redis crate), same keys");
    let warm = hit_table(
        &b.cells,
        b.rounds,
        b.slice,
        pid,
        &b.socket,
        &b.hot_name,
        &b.redis_client,
    )
    .await;
    // The same with the near cache off: every hit reads Redis.
    let off_socket = b.dir.path().join("bench-off.sock");
    let off = DaemonProcess::serve(
        b.dir.path(),
        &off_socket,
        &b.db_url,
        &b.redis_url,
        &[("CACHEWARD__CACHE__LOCAL_MAX_BYTES", "0")],
    );
    off.wait_ready().await;
    println!("\nhit path, near cache off (cache.local_max_bytes = 0)");
    let off = hit_table(
        &b.cells,
        b.rounds,
        b.slice,
        off.child.id(),
        &off_socket,
        &b.hot_name,
        &b.redis_client,
    )
    .await;
    (warm, off)
}
