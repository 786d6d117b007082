//! Many daemons, one database and one cache (a sidecar fleet): one of them applies the change
//! stream, the others stand by. The applier's death (SIGKILL) or silence (SIGSTOP: as good as a
//! partition, its lease is not renewed) hands the stream to a stand-by within the documented bound
//! (`cdc::lease::LEASE` + one retry: 5 s), nothing is lost; a daemon with `cdc.enabled = false`
//! never takes it.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use cacheward::cdc::lease;
use common::{DaemonProcess, Rpc, TestEnv};

/// The documented hand-over bound.
const HANDOVER: Duration = Duration::from_secs(5);

async fn listening(daemon: &DaemonProcess) -> bool {
    Rpc::connect(&daemon.socket)
        .await
        .call("health", Value::Null)
        .await["result"]["cdc"]["listening"]
        == json!(true)
}

/// Inserts `name` with SQL and waits until its entry is live in Redis; returns how long it took.
async fn applied_after(env: &TestEnv, name: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    env.pg()
        .await
        .execute("INSERT INTO users (username) VALUES ($1)", &[&name])
        .await
        .unwrap();
    loop {
        let cached = env.cached(name).await;
        if cached.is_some_and(|v| cacheward::model::entry::is_live(&v)) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{name} not applied within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_moves_to_a_stand_by_within_the_bound_and_loses_nothing() {
    assert!(lease::LEASE + lease::HEARTBEAT <= HANDOVER);
    let env = TestEnv::start().await;
    let fast_poll = [("CACHEWARD__CDC__POLL_INTERVAL_MS", "100")];
    let mut first = DaemonProcess::spawn_with(&env, "first", &fast_poll);
    first.wait_ready().await;
    let second = DaemonProcess::spawn_with(&env, "second", &fast_poll);
    let sidecar = DaemonProcess::spawn_with(
        &env,
        "sidecar",
        &[
            ("CACHEWARD__CDC__ENABLED", "false"),
            ("CACHEWARD__CDC__POLL_INTERVAL_MS", "100"),
        ],
    );
    second.wait_ready().await;
    sidecar.wait_ready().await;
    assert!(listening(&first).await && !listening(&second).await && !listening(&sidecar).await);
    applied_after(&env, "before", Duration::from_secs(1)).await;

    // The applier dies: the stand-by takes over once its lease has expired.
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(5));
    let took = applied_after(&env, "after-kill", HANDOVER + Duration::from_secs(1)).await;
    eprintln!("applier killed: next change applied after {took:?}");
    assert!(listening(&second).await);

    // A new stand-by joins; then the applier goes silent (frozen, as good as partitioned from
    // PostgreSQL: it renews nothing). The stand-by takes over within the bound; the sidecar never
    // competes.
    let third = DaemonProcess::spawn_with(&env, "third", &fast_poll);
    third.wait_ready().await;
    assert!(!listening(&third).await);
    second.signal(libc::SIGSTOP);
    let took = applied_after(&env, "after-freeze", HANDOVER + Duration::from_secs(1)).await;
    eprintln!("applier frozen: next change applied after {took:?}");
    assert!(listening(&third).await && !listening(&sidecar).await);

    // The frozen applier thaws: it lost its lease, so it stores no cursor and stands by; the
    // stream goes on, nothing lost.
    second.signal(libc::SIGCONT);
    for i in 0..10 {
        applied_after(&env, &format!("thawed{i}"), Duration::from_secs(2)).await;
    }
    let appliers = [&second, &third, &sidecar];
    let mut listening_now = Vec::new();
    for daemon in appliers {
        listening_now.push(listening(daemon).await);
    }
    assert_eq!(
        listening_now,
        [false, true, false],
        "one applier, the new one"
    );
}

/// The CDC worker's identities (the audit's shared lease): the consumer is the cache's id, kept
/// in Redis, so that two daemons reaching one Redis by two URLs share one applier (before: two
/// appliers on one cache, one per URL text), and a daemon on another cache gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_applier_per_cache_however_its_redis_is_named() {
    let env = TestEnv::start().await;
    // One Redis, two names for it (its socket's path spelled two ways).
    let socket = env.redis.socket();
    let other_name = format!(
        "redis+unix://{}/./{}?db=3",
        socket.parent().unwrap().display(),
        socket.file_name().unwrap().to_string_lossy()
    );
    assert_ne!(other_name, env.redis_url);
    let first = DaemonProcess::spawn_with(&env, "first", &[]);
    first.wait_ready().await;
    let dir = env.dir.path();
    let second_socket = dir.join("second.sock");
    let second = DaemonProcess::serve(dir, &second_socket, &env.db_url, &other_name, &[]);
    second.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        listening(&first).await != listening(&second).await,
        "exactly one applier for one cache"
    );

    // Another cache (another Redis): an applier of its own.
    let other = cacheward::dev::Redis::start().expect("another redis");
    let third_socket = dir.join("third.sock");
    let third = DaemonProcess::serve(dir, &third_socket, &env.db_url, &other.url(3), &[]);
    third.wait_ready().await;
    assert!(
        listening(&third).await,
        "a cache of its own, an applier of its own"
    );
    drop((first, second, third));
}
