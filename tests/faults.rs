//! Guarantee 4, degraded not down: Redis and PostgreSQL killed, stopped, frozen and restarted under
//! traffic; the daemon keeps answering what it can, leaves nothing stale, and recovers by itself.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use cacheward::dev::RedisOptions;
use common::{kind, wait_until, Rpc, TestEnv};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Reads `username` in a loop until stopped; every read must succeed. Returns (reads, from cache).
fn hammer(
    socket: PathBuf,
    username: &'static str,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(u32, u32)> {
    tokio::spawn(async move {
        let mut c = Rpc::connect(&socket).await;
        let (mut reads, mut cached) = (0, 0);
        while !stop.is_cancelled() {
            let r = c.get(username).await;
            assert_eq!(
                r["result"]["user"]["username"],
                json!(username),
                "read failed mid-fault: {r}"
            );
            reads += 1;
            cached += u32::from(r["result"]["source"] == json!("cache"));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (reads, cached)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_traffic() {
    let mut env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "steady"})).await;
    let stop = CancellationToken::new();
    let reader = hammer(daemon.socket.clone(), "steady", stop.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;

    env.redis.kill();
    // Until the daemon hears its connection drop, the near cache may still answer (exactly: a dead
    // Redis changes nothing); then reads fall back to PostgreSQL.
    let steady = env.row_json("steady").await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let during = c.get("steady").await;
        assert_eq!(during["result"]["user"], steady, "{during}");
        if during["result"]["source"] == json!("db") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "reads fall back to PostgreSQL: {during}"
        );
    }
    let put = c.call("put", json!({"username": "while-down"})).await;
    assert_eq!(
        put["result"]["created"],
        json!(true),
        "writes succeed without Redis: {put}"
    );
    let renamed = c
        .call(
            "rename",
            json!({"username": "while-down", "new_username": "renamed-down"}),
        )
        .await;
    assert_eq!(renamed["result"]["user"]["username"], json!("renamed-down"));
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
            daemon.client().await.get("steady").await["result"]["source"] == json!("cache")
        },
    )
    .await;
    assert_eq!(
        c.get("renamed-down").await["result"]["user"]["username"],
        json!("renamed-down")
    );
    assert_eq!(kind(&c.get("while-down").await), "not_found");

    stop.cancel();
    let (reads, cached) = reader.await.expect("every read succeeded");
    assert!(
        reads > cached && cached > 0,
        "reads={reads} cached={cached}"
    );
    daemon.stop().await;
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|n| n.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_while_redis_was_down_leave_no_stale_entry_behind() {
    // A Redis that keeps its data across the outage, as production ones do.
    let mut env = TestEnv::start_with(RedisOptions {
        persistent: true,
        ..Default::default()
    })
    .await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    for name in ["moved", "removed", "kept"] {
        c.call("put", json!({"username": name})).await;
        assert!(env.cached(name).await.is_some());
    }

    env.redis.kill();
    c.call(
        "rename",
        json!({"username": "moved", "new_username": "moved-to"}),
    )
    .await;
    assert_eq!(
        c.call("delete", json!({"username": "removed"})).await["result"]["deleted"],
        json!(true)
    );
    assert_eq!(
        daemon.stats().await["repairs_pending"],
        json!(3),
        "three names in doubt"
    );

    // Redis comes back with the old entries for `moved` and `removed` still in it.
    env.redis.start_again().expect("restart redis");
    assert!(cacheward::model::entry::is_live(
        &env.cached("moved").await.expect("persisted")
    ));

    // Never served from the stale entries, not even before the repair ran.
    assert_eq!(kind(&c.get("moved").await), "not_found");
    assert_eq!(kind(&c.get("removed").await), "not_found");
    wait_until("repairs done", Duration::from_secs(5), || async {
        daemon.stats().await["repairs_pending"] == json!(0)
    })
    .await;
    for name in ["moved", "removed"] {
        let raw = env.cached(name).await.unwrap_or_default();
        assert!(
            !cacheward::model::entry::is_live(&raw),
            "{name} still live in Redis: {raw}"
        );
    }
    // The restarted Redis runs as another process: its data is distrusted and dropped as a whole
    // (tests/fence.rs), so an entry is either gone or equal to its row.
    assert!(
        env.agrees(&names(&["moved", "removed", "kept", "moved-to"]))
            .await
    );
    for name in ["kept", "moved-to"] {
        let answer = c.get(name).await;
        assert_eq!(
            answer["result"]["user"],
            env.row_json(name).await.unwrap(),
            "{answer}"
        );
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_costs_a_timeout_not_an_error() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "icy"})).await;

    env.redis.pause();
    let started = std::time::Instant::now();
    let r = c.get("icy").await;
    assert_eq!(r["result"]["source"], json!("db"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by redis.timeout_ms"
    );
    let put = c.call("put", json!({"username": "icy2"})).await;
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
        || async { daemon.client().await.get("icy2").await["result"]["source"] == json!("cache") },
    )
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_mid_traffic() {
    let mut env = TestEnv::start().await;
    env.pg()
        .await
        .execute("INSERT INTO users (username) VALUES ('cold')", &[])
        .await
        .unwrap();
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "warm"})).await;
    let stop = CancellationToken::new();
    let reader = hammer(daemon.socket.clone(), "warm", stop.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;

    env.pg.stop();
    assert_eq!(
        c.get("warm").await["result"]["source"],
        json!("cache"),
        "cached reads are served"
    );
    for (method, params) in [
        ("put", json!({"username": "new"})),
        ("rename", json!({"username": "warm", "new_username": "x"})),
        ("delete", json!({"username": "warm"})),
        ("get", json!({"username": "cold"})),
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
        daemon
            .client()
            .await
            .call("put", json!({"username": "new"}))
            .await["result"]["created"]
            == json!(true)
    })
    .await;
    assert_eq!(c.get("cold").await["result"]["source"], json!("db"));
    assert_eq!(daemon.health().await["postgres"], json!("up"));

    stop.cancel();
    let (reads, cached) = reader.await.expect("every cached read succeeded");
    assert_eq!(
        reads, cached,
        "all reads of a cached user came from the cache"
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
