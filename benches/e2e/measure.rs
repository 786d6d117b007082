//! How the benchmark measures: alternating slices of concurrent round trips with their latency
//! histograms, the CPU each process spent, resident memory, and one JSON-RPC call.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One measured slice: operations done, latency of each round trip (µs).
pub struct Slice {
    pub ops: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
}

/// Results of one side (daemon or raw) over all its slices.
#[derive(Default)]
pub struct Side {
    pub ops: u64,
    pub elapsed: Duration,
    pub latency: Option<Histogram<u64>>,
    /// CPU the daemon process used meanwhile (clock ticks), for the daemon side.
    pub cpu_ticks: u64,
}

impl Side {
    pub fn add(&mut self, s: Slice) {
        self.ops += s.ops;
        self.elapsed += s.elapsed;
        match &mut self.latency {
            Some(h) => h.add(&s.latency).expect("same bounds"),
            None => self.latency = Some(s.latency),
        }
    }

    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Daemon CPU time (user + system) per operation, in µs.
    pub fn cpu_us_per_op(&self) -> f64 {
        let tick_us = 1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        self.cpu_ticks as f64 * tick_us / self.ops.max(1) as f64
    }

    pub fn quantile_us(&self, q: f64) -> u64 {
        self.latency.as_ref().map_or(0, |h| h.value_at_quantile(q))
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs `connections` workers for `slice`, each calling `round` (one round trip of `depth` ops).
pub async fn measure<F, Fut>(connections: usize, depth: usize, slice: Duration, make: F) -> Slice
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

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
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
pub fn cpu_split(daemon: u32) -> [u64; 4] {
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

pub fn split_us_per_op(ticks: [u64; 4], ops: u64) -> [f64; 4] {
    let tick_us = 1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks.map(|t| t as f64 * tick_us / ops.max(1) as f64)
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub async fn call(socket: &Path, method: &str, params: Value) -> Value {
    match cacheward::cli::client::Client::connect(socket).await {
        Ok(mut c) => c
            .call(method, params)
            .await
            .unwrap_or_else(|e| json!({ "error": e.to_string() })),
        Err(e) => json!({ "error": e.to_string() }),
    }
}
