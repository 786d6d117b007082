//! The near cache's own figures (staleness after a direct change, the hit ratio under a skewed
//! read pattern) and the live consistency checker's cost.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::DaemonProcess;
use crate::hit::{daemon_round, user_params};
use crate::measure::{call, cpu_ticks, env_or, histogram, measure, Side};

/// The near cache's own figures: how long after a direct change in Redis a get may still answer
/// the old value (the invalidation's delivery), and the hit ratio of a small near cache under a
/// skewed (Zipf) read pattern, against the best a cache of its size could do.
pub async fn near_part(
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
            daemon_round(small_socket.clone(), 16, user_params(&zipf_name))
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
pub async fn checker_cost(dir: &Path, db_url: &str, redis_url: &str) -> Value {
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
    let (on_pid, off_pid) = (on.child.id(), off.child.id());
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
