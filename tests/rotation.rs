//! Passwords only in files, rotated while the daemon runs: scram authentication in PostgreSQL (over
//! TLS), an ACL user in Redis. After a rotation and the loss of every backend connection the same
//! daemon recovers within seconds, reading the new passwords for its new connections.

mod common;

use std::time::Duration;

use serde_json::json;

use cacheward::config::SecretUrl;
use cacheward::dev::{PostgresOptions, RedisOptions};
use common::certs::TestCa;
use common::{kind, wait_until, TestEnv};

async fn set_passwords(env: &TestEnv, password: &str) {
    env.pg()
        .await
        .batch_execute(&format!("ALTER ROLE cw_app PASSWORD '{password}'"))
        .await
        .expect("alter role");
    let mut redis = env.redis().await;
    redis::cmd("ACL")
        .arg(&["SETUSER", "cw_app", "on", "resetpass"][..])
        .arg(format!(">{password}"))
        .arg(&["~*", "&*", "+@all"][..])
        .query_async::<()>(&mut redis)
        .await
        .expect("acl setuser");
}

/// Closes every connection the daemon has to both servers.
async fn kill_connections(env: &TestEnv) {
    env.pg()
        .await
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'cw_app'",
        )
        .await
        .expect("terminate");
    let mut redis = env.redis().await;
    redis::cmd("CLIENT")
        .arg(&["KILL", "USER", "cw_app"][..])
        .query_async::<i64>(&mut redis)
        .await
        .expect("client kill");
}

/// Waits until a write of `name` goes through and its read is answered from the cache: both
/// servers took the daemon's new connections.
async fn writes_and_cached_reads(daemon: &common::Daemon, name: &str) {
    wait_until(
        "writes and cached reads",
        Duration::from_secs(10),
        || async {
            let mut client = daemon.client().await;
            let put = client.call("put", json!({ "username": name })).await;
            put.get("result").is_some()
                && client.get(name).await["result"]["source"] == json!("cache")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_passwords_are_read_for_new_connections_without_a_restart() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path(), "ca");
    let pg = PostgresOptions {
        tls: Some(ca.server("pg", None)),
        tcp_auth: Some("scram-sha-256".into()),
        ..Default::default()
    };
    let env = TestEnv::start_servers(pg, RedisOptions::default()).await;
    env.pg()
        .await
        .batch_execute("CREATE ROLE cw_app LOGIN SUPERUSER")
        .await
        .unwrap();
    set_passwords(&env, "first-secret").await;
    let secrets = tempfile::tempdir().unwrap();
    let (pg_file, redis_file) = (
        secrets.path().join("pg-password"),
        secrets.path().join("redis-password"),
    );
    std::fs::write(&pg_file, "first-secret\n").unwrap();
    std::fs::write(&redis_file, "first-secret").unwrap();

    let mut config = env.config();
    let port = env.pg.tcp_port().unwrap();
    config.postgres.url = Some(SecretUrl::new(format!(
        "postgresql://cw_app@localhost:{port}/cw?hostaddr=127.0.0.1&sslmode=require"
    )));
    config.postgres.password_file = Some(pg_file.clone());
    config.redis.url = Some(SecretUrl::new(format!("{}&user=cw_app", env.redis.url(3))));
    config.redis.password_file = Some(redis_file.clone());
    let daemon = env.start_daemon(config).await;
    let mut client = daemon.client().await;
    client.call("put", json!({"username": "before"})).await;
    assert_eq!(
        client.get("before").await["result"]["source"],
        json!("cache")
    );

    // Rotate: the old passwords stop working, the files hold the new ones, every connection goes.
    set_passwords(&env, "second-secret").await;
    std::fs::write(&pg_file, "second-secret\n").unwrap();
    std::fs::write(&redis_file, "second-secret\n").unwrap();
    kill_connections(&env).await;

    writes_and_cached_reads(&daemon, "after").await;
    // The health monitor says so at its next check (every 250 ms).
    wait_until("both backends up again", Duration::from_secs(2), || async {
        let health = daemon.health().await;
        (health["postgres"].clone(), health["redis"].clone()) == (json!("up"), json!("up"))
    })
    .await;
    // The connections in use now authenticated with the new passwords (the old ones are refused).
    let pool: i64 = env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'cw_app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(pool >= 1, "the daemon is connected again");

    // Mid-rotation the files are gone for a moment: new connections to both servers use the
    // password read last (one behaviour for both files), so nothing is lost meanwhile.
    std::fs::remove_file(&pg_file).unwrap();
    std::fs::remove_file(&redis_file).unwrap();
    kill_connections(&env).await;
    writes_and_cached_reads(&daemon, "during").await;
    daemon.stop().await;
}

/// The Redis ACL that docs/operations.md gives (its `ACL SETUSER` line, read from the file) is
/// enough for everything the daemon does to Redis: reads, the write script, CDC, a TRUNCATE's drop
/// (SCAN), the fence, `verify`; and it reaches no key outside the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_redis_acl_is_all_the_daemon_needs() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let line = docs
        .lines()
        .find(|l| l.trim_start().starts_with("ACL SETUSER cacheward "))
        .expect("docs/operations.md gives the ACL");
    let rules: Vec<String> = line
        .split_whitespace()
        .skip(2)
        .map(|rule| match rule {
            ">PASSWORD" => ">acl-secret".to_owned(),
            "~user:*" => "~user:*".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    let env = TestEnv::start().await;
    let mut admin = env.redis().await;
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&rules)
        .query_async::<()>(&mut admin)
        .await
        .expect("the documented ACL is valid");
    let mut config = env.config();
    config.redis.url = Some(SecretUrl::new(format!(
        "{}&user=cacheward&pass=acl-secret",
        env.redis.url(3)
    )));
    let daemon = env.start_daemon(config.clone()).await;
    let mut client = daemon.client().await;
    client.call("put", json!({"username": "a1"})).await;
    assert_eq!(client.get("a1").await["result"]["source"], json!("cache"));
    // The near cache works under it (CLIENT TRACKING allowed): later reads are near hits.
    for _ in 0..3 {
        client.get("a1").await;
    }
    let near = daemon.stats().await["near_cache"]["hits"].as_u64().unwrap();
    assert!(near > 0, "the near cache answered");
    let renamed = client
        .call("rename", json!({"username": "a1", "new_username": "a2"}))
        .await;
    assert!(renamed.get("result").is_some(), "{renamed}");
    let pg = env.pg().await;
    pg.execute("INSERT INTO users (username) VALUES ('a3')", &[])
        .await
        .unwrap();
    wait_until("CDC applied", Duration::from_secs(3), || async {
        env.cached("a3").await.is_some()
    })
    .await;
    pg.execute("TRUNCATE users", &[]).await.unwrap();
    wait_until(
        "the TRUNCATE dropped every entry",
        Duration::from_secs(3),
        || async {
            let mut client = daemon.client().await;
            kind(&client.get("a2").await) == "not_found"
        },
    )
    .await;
    client.call("put", json!({"username": "a4"})).await;
    let report = cacheward::cli::verify::verify(&config, false)
        .await
        .expect("verify under the ACL");
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    let stats = daemon.stats().await;
    assert_eq!(
        stats["errors"],
        json!(1),
        "only the expected not_found: {stats}"
    );
    let health = daemon.health().await;
    assert_eq!(health["redis"], json!("up"), "{health}");
    // The monitor names the connections it looked at (CLIENT SETNAME allowed): reads are checked
    // to come from them.
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(
        clients
            .lines()
            .any(|c| c.contains(" name=cacheward-") && c.contains(" user=cacheward ")),
        "{clients}"
    );
    // The epoch check runs under the ACL too (INFO allowed): the epoch is recorded.
    wait_until(
        "the redis epoch recorded",
        Duration::from_secs(3),
        || async { env.epoch().await.is_some() },
    )
    .await;
    daemon.stop().await;
}
