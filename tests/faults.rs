//! Guarantee 4, degraded not down: Redis and PostgreSQL killed, stopped, frozen and restarted under
//! traffic; the daemon keeps answering what it can, leaves nothing stale, and recovers by itself.
//! The outages run over users and over a declared table alike (`common::subject`).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use cacheward::config::Config;
use common::subject::Subject;
use common::{kind, wait_until, Daemon, Rpc, TestEnv};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Reads row `name` in a loop until stopped; every read must answer `row`. Returns (reads, from
/// cache).
fn hammer(
    socket: PathBuf,
    subject: Subject,
    name: &'static str,
    row: Value,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(u32, u32)> {
    tokio::spawn(async move {
        let mut c = Rpc::connect(&socket).await;
        let (mut reads, mut cached) = (0, 0);
        while !stop.is_cancelled() {
            let r = subject.get(&mut c, name).await;
            assert_eq!(subject.answered(&r), row, "read failed mid-fault: {r}");
            reads += 1;
            cached += u32::from(r["result"]["source"] == json!("cache"));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (reads, cached)
    })
}

/// A daemon serving `subject` in `env`, and a client of it.
async fn serving(env: &TestEnv, subject: Subject, config: Config) -> (Daemon, Rpc) {
    let config = subject.prepare(env, config).await;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    subject.served(&mut c).await;
    (daemon, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_traffic() {
    redis_killed_and_restarted(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_traffic_of_a_declared_table() {
    redis_killed_and_restarted(Subject::Orders).await;
}

async fn redis_killed_and_restarted(subject: Subject) {
    let mut env = TestEnv::start().await;
    let (daemon, mut c) = serving(&env, subject, env.config()).await;
    subject.put(&mut c, &["steady"]).await;
    let steady = subject.row_json(&env, "steady").await.unwrap();
    let stop = CancellationToken::new();
    let reader = hammer(
        daemon.socket.clone(),
        subject,
        "steady",
        steady.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    env.redis.kill();
    // Until the daemon hears its connection drop, the near cache may still answer (exactly: a dead
    // Redis changes nothing); then reads fall back to PostgreSQL.
    let started = std::time::Instant::now();
    loop {
        let during = subject.get(&mut c, "steady").await;
        assert_eq!(subject.answered(&during), steady, "{during}");
        if during["result"]["source"] == json!("db") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "reads fall back to PostgreSQL: {during}"
        );
    }
    let (method, params) = subject.put_call("while-down");
    let put = c.call(method, params).await;
    assert_eq!(
        put["result"]["created"],
        json!(true),
        "writes succeed without Redis: {put}"
    );
    let (method, params) = subject.rename_call("while-down", "renamed-down");
    let renamed = c.call(method, params).await;
    assert_eq!(
        subject.answered(&renamed),
        subject.row_json(&env, "renamed-down").await.unwrap(),
        "{renamed}"
    );
    wait_until(
        "health reports redis down",
        Duration::from_secs(5),
        || async {
            let h = daemon.health().await;
            h["redis"] == json!("down") && h["postgres"] == json!("up") && h["ready"] == json!(true)
        },
    )
    .await;

    env.redis.start_again().expect("restart redis");
    wait_until(
        "health reports redis up",
        Duration::from_secs(5),
        || async { daemon.health().await["redis"] == json!("up") },
    )
    .await;
    wait_until(
        "reads come from the cache again",
        Duration::from_secs(5),
        || async {
            let answer = subject.get(&mut daemon.client().await, "steady").await;
            answer["result"]["source"] == json!("cache")
        },
    )
    .await;
    let moved = subject.get(&mut c, "renamed-down").await;
    assert_eq!(
        subject.answered(&moved),
        subject.row_json(&env, "renamed-down").await.unwrap(),
        "{moved}"
    );
    assert_eq!(kind(&subject.get(&mut c, "while-down").await), "not_found");

    stop.cancel();
    let (reads, cached) = reader.await.expect("every read succeeded");
    assert!(
        reads > cached && cached > 0,
        "reads={reads} cached={cached}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_while_redis_was_down_leave_no_stale_entry_behind() {
    writes_while_redis_was_down(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_declared_table_while_redis_was_down_leave_no_stale_entry_behind() {
    writes_while_redis_was_down(Subject::Orders).await;
}

async fn writes_while_redis_was_down(subject: Subject) {
    // A Redis that keeps its data across the outage, as production ones do.
    let mut env = TestEnv::start_persistent().await;
    let (daemon, mut c) = serving(&env, subject, env.config()).await;
    for name in ["moved", "removed", "kept"] {
        subject.put(&mut c, &[name]).await;
        assert!(subject.live(&env, name).await.is_some());
    }

    env.redis.kill();
    subject.rename(&mut c, "moved", "moved-to").await;
    assert!(subject.delete(&mut c, "removed").await);
    assert_eq!(
        daemon.stats().await["repairs_pending"],
        json!(3),
        "three keys in doubt"
    );

    // Redis comes back with the old entries for `moved` and `removed` still in it.
    env.redis.start_again().expect("restart redis");
    assert!(
        subject.live(&env, "moved").await.is_some(),
        "the old entry persisted"
    );

    // Never served from the stale entries, not even before the repair ran.
    assert_eq!(kind(&subject.get(&mut c, "moved").await), "not_found");
    assert_eq!(kind(&subject.get(&mut c, "removed").await), "not_found");
    wait_until("repairs done", Duration::from_secs(5), || async {
        daemon.stats().await["repairs_pending"] == json!(0)
    })
    .await;
    for name in ["moved", "removed"] {
        let raw = subject.cached(&env, name).await;
        assert!(
            subject.live(&env, name).await.is_none(),
            "{name} still live in Redis: {raw:?}"
        );
    }
    // The restarted Redis runs as another process: its data is distrusted and dropped as a whole
    // (tests/fence.rs), so an entry is either gone or equal to its row.
    assert!(
        subject
            .agrees(&env, &["moved", "removed", "kept", "moved-to"])
            .await
    );
    for name in ["kept", "moved-to"] {
        let answer = subject.get(&mut c, name).await;
        assert_eq!(
            subject.answered(&answer),
            subject.row_json(&env, name).await.unwrap(),
            "{answer}"
        );
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_costs_a_timeout_not_an_error() {
    frozen_redis(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_costs_a_declared_table_a_timeout_not_an_error() {
    frozen_redis(Subject::Orders).await;
}

async fn frozen_redis(subject: Subject) {
    let env = TestEnv::start().await;
    let (daemon, mut c) = serving(&env, subject, env.config()).await;
    subject.put(&mut c, &["icy"]).await;

    env.redis.pause();
    let started = std::time::Instant::now();
    let r = subject.get(&mut c, "icy").await;
    assert_eq!(r["result"]["source"], json!("db"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by redis.timeout_ms"
    );
    let (method, params) = subject.put_call("icy2");
    let put = c.call(method, params).await;
    assert_eq!(put["result"]["created"], json!(true), "{put}");
    wait_until(
        "health reports redis down",
        Duration::from_secs(5),
        || async { daemon.health().await["redis"] == json!("down") },
    )
    .await;
    env.redis.resume();
    wait_until("redis back", Duration::from_secs(5), || async {
        daemon.health().await["redis"] == json!("up")
    })
    .await;
    wait_until(
        "icy2 repaired into the cache",
        Duration::from_secs(5),
        || async {
            let answer = subject.get(&mut daemon.client().await, "icy2").await;
            answer["result"]["source"] == json!("cache")
        },
    )
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_mid_traffic() {
    postgres_stopped_and_restarted(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_mid_traffic_of_a_declared_table() {
    postgres_stopped_and_restarted(Subject::Orders).await;
}

async fn postgres_stopped_and_restarted(subject: Subject) {
    let mut env = TestEnv::start().await;
    let config = subject.prepare(&env, env.config()).await;
    env.pg()
        .await
        .batch_execute(&subject.insert_sql(&["cold"]))
        .await
        .unwrap();
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    subject.served(&mut c).await;
    subject.put(&mut c, &["warm"]).await;
    let warm = subject.row_json(&env, "warm").await.unwrap();
    let stop = CancellationToken::new();
    let reader = hammer(daemon.socket.clone(), subject, "warm", warm, stop.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;

    env.pg.stop();
    assert_eq!(
        subject.get(&mut c, "warm").await["result"]["source"],
        json!("cache"),
        "cached reads are served"
    );
    for (method, params) in [
        subject.put_call("new"),
        subject.rename_call("warm", "x"),
        ("delete", subject.params("warm")),
        ("get", subject.params("cold")),
    ] {
        let r = c.call(method, params).await;
        assert_eq!(r["error"]["code"], json!(-32003), "{method} -> {r}");
        assert_eq!(kind(&r), "unavailable");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("postgres"),
            "{r}"
        );
    }
    wait_until(
        "health reports postgres down",
        Duration::from_secs(5),
        || async {
            let h = daemon.health().await;
            h["postgres"] == json!("down") && h["redis"] == json!("up") && h["ready"] == json!(true)
        },
    )
    .await;

    env.pg.start_again().expect("restart postgres");
    wait_until("writes work again", Duration::from_secs(10), || async {
        let (method, params) = subject.put_call("new");
        daemon.client().await.call(method, params).await["result"]["created"] == json!(true)
    })
    .await;
    assert_eq!(
        subject.get(&mut c, "cold").await["result"]["source"],
        json!("db")
    );
    assert_eq!(daemon.health().await["postgres"], json!("up"));

    stop.cancel();
    let (reads, cached) = reader.await.expect("every cached read succeeded");
    assert_eq!(
        reads, cached,
        "all reads of a cached row came from the cache"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_statement_times_out_as_unavailable() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config.postgres.statement_timeout_ms = 300;
    let daemon = env.start_daemon(config).await;
    let lock = env.lock_users().await;

    let mut c = daemon.client().await;
    let r = c.call("put", json!({"username": "blocked"})).await;
    assert_eq!(kind(&r), "unavailable", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("timeout"),
        "{r}"
    );
    lock.release().await;
    assert_eq!(
        c.call("put", json!({"username": "blocked"})).await["result"]["created"],
        json!(true)
    );
    assert_eq!(
        daemon.health().await["postgres"],
        json!("up"),
        "a slow query is not an outage"
    );
    daemon.stop().await;
}

/// At the first contact, an `allkeys-*` eviction policy is warned about (it could evict a
/// tombstone, a newer entry or the fence); the default `noeviction` is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_warned_about() {
    let env = TestEnv::start().await;
    let quiet = common::DaemonProcess::spawn(&env, "noeviction");
    quiet.wait_ready().await;
    let mut conn = env.redis().await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut conn)
        .await
        .unwrap();
    let loud = common::DaemonProcess::spawn(&env, "allkeys");
    loud.wait_ready().await;
    let warning = "redis may evict what keeps the cache exact";
    assert!(!quiet.logs().contains(warning), "{}", quiet.logs());
    assert!(loud.logs().contains(warning), "{}", loud.logs());
    assert!(loud.logs().contains("allkeys-lru"), "{}", loud.logs());
}
