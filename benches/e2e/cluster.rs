//! The daemon in cluster mode against raw cluster-aware GETs, and the failover repair window.

use std::time::{Duration, Instant};

use cacheward::dev::cluster::RedisCluster;
use serde_json::{json, Value};

use crate::common::DaemonProcess;
use crate::hit::{daemon_round, daemon_side, hit_header, hit_row, user_params, warm};
use crate::measure::{call, measure, Side};
use crate::miss::{cold_names, select_round};

/// The daemon in cluster mode on the harness's Redis Cluster (3 primaries with a replica each, all
/// on this machine): the hit path against raw cluster-aware GETs (a round of `depth` GETs sent at
/// once on one cluster connection, routed by slot), the miss path against the same SELECT, and the
/// failover repair window (SIGKILL of a primary until the daemon serves its keys from the cache
/// again).
pub async fn cluster_part(
    db_url: &str,
    pg_config: &tokio_postgres::Config,
    users: u64,
    hot: u64,
    slice: Duration,
    rounds: usize,
) -> Value {
    // The CDC part renamed users u1.. away: this part reads them, so they exist again (without
    // a capture of each: the daemon below reads them from the table).
    let admin = cacheward::store::pg::connect(pg_config)
        .await
        .expect("connect");
    admin
        .batch_execute(&format!(
            "ALTER TABLE users DISABLE TRIGGER cacheward_capture_insert;
             INSERT INTO users (username) SELECT 'u' || g FROM generate_series(1, {users}) g
                 ON CONFLICT (username) DO NOTHING;
             ALTER TABLE users ENABLE TRIGGER cacheward_capture_insert;"
        ))
        .await
        .expect("users u1.. again");
    // On the main thread: the nodes die with the thread that started them.
    let mut cluster = RedisCluster::start().expect("cluster");
    let urls = cluster.urls();
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("cluster.sock");
    let seeds = urls[1..].join(",");
    let settings = [
        ("CACHEWARD__REDIS__MODE", "cluster"),
        ("CACHEWARD__REDIS__URLS", seeds.as_str()),
    ];
    let daemon = DaemonProcess::start(dir.path(), &socket, db_url, &urls[0], &settings).await;
    let pid = daemon.child.id();
    let hot_name = warm(&socket, hot).await;
    let raw = redis::cluster::ClusterClient::new(urls.clone())
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("connect to the cluster");
    println!(
        "\ncluster (3 primaries + 3 replicas, TCP 127.0.0.1): daemon get vs raw cluster-aware GET"
    );
    hit_header();
    let mut hits = Vec::new();
    for (connections, depth) in [(1, 1), (16, 1), (16, 16)] {
        let (mut d, mut r) = (Side::default(), Side::default());
        for _ in 0..rounds {
            daemon_side(
                &mut d,
                pid,
                &socket,
                (connections, depth),
                slice,
                &user_params(&hot_name),
            )
            .await;
            r.add(
                measure(connections, depth, slice, |_| {
                    let (conn, names) = (raw.clone(), hot_name.clone());
                    async move {
                        Box::new(move |n: u64| {
                            let (conn, names) = (conn.clone(), names.clone());
                            Box::pin(async move {
                                let gets = (0..depth as u64).map(|i| {
                                    let mut conn = conn.clone();
                                    let key = format!("user:{}", names(n + i));
                                    async move {
                                        redis::cmd("GET")
                                            .arg(key)
                                            .query_async::<Option<String>>(&mut conn)
                                            .await
                                            .expect("GET")
                                    }
                                });
                                futures::future::join_all(gets).await;
                            })
                                as futures::future::BoxFuture<'static, ()>
                        })
                            as Box<dyn FnMut(u64) -> futures::future::BoxFuture<'static, ()> + Send>
                    }
                })
                .await,
            );
        }
        hits.push(hit_row(connections, depth, &d, &r));
    }

    // Miss path: users this daemon never read, 16 connections, vs the same SELECT.
    let (_, cold_name) = cold_names(hot, users);
    let (mut d, mut r) = (Side::default(), Side::default());
    for _ in 0..rounds {
        d.add(
            measure(16, 1, slice, |_| {
                daemon_round(socket.clone(), 1, user_params(&cold_name))
            })
            .await,
        );
        r.add(measure(16, 1, slice, |_| select_round(pg_config.clone(), users)).await);
    }
    let miss_ratio = d.throughput() / r.throughput();
    println!(
        "miss path (16 connections): daemon {:.0} op/s (p99 {} µs) vs raw SELECT {:.0} op/s (p99 {} µs): ratio {miss_ratio:.2}",
        d.throughput(), d.quantile_us(0.99), r.throughput(), r.quantile_us(0.99)
    );
    let miss = json!({"daemon_ops_per_sec": d.throughput(), "select_ops_per_sec": r.throughput(), "ratio": miss_ratio});

    // The failover repair window: the primary of u1's slot dies; its replica is promoted with
    // what it had; the daemon answers from PostgreSQL until it has distrusted and dropped the
    // cache, then fills and hits again.
    let slot = cacheward::store::redis::keys::slot_of(b"user:u1");
    let owner = cluster
        .primaries()
        .into_iter()
        .find(|&port| {
            let Ok(mut conn) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection())
            else {
                return false;
            };
            redis::cmd("CLUSTER")
                .arg("COUNTKEYSINSLOT")
                .arg(slot)
                .query::<i64>(&mut conn)
                .is_ok_and(|n| n > 0)
        })
        .expect("the owner of u1's slot");
    let row = call(&socket, "get", json!({"username": "u1"})).await["user"].clone();
    let killed = Instant::now();
    cluster.kill(cluster.node(owner).expect("a node"));
    let (mut promoted, mut from_cache, mut stale, mut failed) = (None, None, 0, 0);
    while killed.elapsed() < Duration::from_secs(30) && from_cache.is_none() {
        let answer = call(&socket, "get", json!({"username": "u1"})).await;
        match answer.get("error") {
            Some(_) => failed += 1,
            None => stale += (answer["user"] != row) as u32,
        }
        if promoted.is_none() && cluster.primaries().len() == 3 {
            promoted = Some(killed.elapsed());
        }
        if promoted.is_some() && answer["source"] == json!("cache") {
            from_cache = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    println!(
        "failover: primary SIGKILLed; replica promoted after {:.2} s; the daemon served the key from the cache again after {:.2} s (from PostgreSQL meanwhile); answers that differed from the row: {stale}, errors: {failed}",
        secs(promoted),
        secs(from_cache)
    );
    json!({"hit": hits, "miss": miss,
           "failover": {"promoted_secs": secs(promoted), "cached_again_secs": secs(from_cache), "wrong_answers": stale, "errors": failed}})
}
