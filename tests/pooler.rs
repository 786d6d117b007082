//! `postgres.url` through PgBouncer in `pool_mode = transaction` (a pool of two server connections
//! for eight daemon connections), the CDC worker on a direct `cdc.url`: a concurrent mixed
//! workload answers without an error, every change converges, and `verify` (through the pooler)
//! finds nothing. Run with a PgBouncer that refuses the startup options and with one that drops
//! them: the daemon finds out either way.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use cacheward::config::SecretUrl;
use cacheward::dev::PgBouncer;
use common::{kind, wait_until, DaemonProcess, Rpc, TestEnv};

/// What the daemon says once it found out that `postgres.url` leads to a pooler.
const DETECTED: &str = "postgres is reached through a transaction-mode pooler";

/// Put, get, rename, get and (every other name) delete: each answer must be a success.
async fn workload(socket: std::path::PathBuf, client: usize) -> Vec<String> {
    let mut rpc = Rpc::connect(&socket).await;
    let mut names = Vec::new();
    for i in 0..25 {
        let (name, renamed) = (format!("c{client}n{i}"), format!("c{client}r{i}"));
        let answers: Vec<Value> = vec![
            rpc.call("put", json!({"username": name})).await,
            rpc.get(&name).await,
            rpc.call("rename", json!({"username": name, "new_username": renamed}))
                .await,
            rpc.get(&renamed).await,
        ];
        for answer in &answers {
            assert!(answer.get("result").is_some(), "{name}: {answer}");
        }
        if i % 2 == 0 {
            let deleted = rpc.call("delete", json!({"username": renamed})).await;
            assert_eq!(deleted["result"]["deleted"], json!(true), "{deleted}");
            let gone = rpc.get(&renamed).await;
            assert_eq!(kind(&gone), "not_found", "{gone}");
        }
        names.extend([name, renamed]);
    }
    names
}

async fn through_pgbouncer(ignore_options: bool) {
    let env = TestEnv::start().await;
    let bouncer = PgBouncer::start(&env.pg, 2, ignore_options).expect("start pgbouncer");
    let mut config = env.config();
    config.postgres.url = Some(SecretUrl::new(bouncer.url("cw")));
    config.postgres.pool_size = 8;
    config.cdc.url = Some(SecretUrl::new(env.db_url.clone()));
    // As a process: what it logs tells whether it found out about the pooler.
    let pooled = bouncer.url("cw");
    let daemon = DaemonProcess::spawn_with(
        &env,
        "pooled",
        &[
            ("DATABASE_URL", pooled.as_str()),
            ("CACHEWARD__POSTGRES__POOL_SIZE", "8"),
            ("CACHEWARD__CDC__URL", env.db_url.as_str()),
        ],
    );
    daemon.wait_ready().await;

    // Out-of-band SQL meanwhile, on a direct connection: the CDC worker applies it.
    let writer = tokio::spawn({
        let pg = env.pg().await;
        async move {
            let mut names = Vec::new();
            for i in 0..40 {
                let name = format!("sql{i}");
                pg.execute("INSERT INTO users (username) VALUES ($1)", &[&name])
                    .await
                    .unwrap();
                if i % 3 == 0 {
                    pg.execute("DELETE FROM users WHERE username = $1", &[&name])
                        .await
                        .unwrap();
                }
                names.push(name);
            }
            names
        }
    });
    let clients: Vec<_> = (0..8)
        .map(|c| tokio::spawn(workload(daemon.socket.clone(), c)))
        .collect();
    let mut names = writer.await.unwrap();
    for client in clients {
        names.extend(client.await.unwrap());
    }
    // Reads of the SQL writer's names fill the cache through the pooler too: every third was
    // deleted again, the others exist.
    let mut rpc = Rpc::connect(&daemon.socket).await;
    for (i, name) in names.iter().filter(|n| n.starts_with("sql")).enumerate() {
        let answer = rpc.get(name).await;
        match i % 3 {
            0 => assert_eq!(kind(&answer), "not_found", "{name}: {answer}"),
            _ => assert_eq!(
                answer["result"]["user"]["username"],
                json!(name),
                "{answer}"
            ),
        }
    }
    wait_until(
        "the cache agrees with every row",
        Duration::from_secs(5),
        || async { env.agrees(&names).await },
    )
    .await;
    let report = cacheward::cli::verify::verify(&config, false)
        .await
        .expect("verify through the pooler");
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    assert!(report.checked > 0);
    // It found out, once, and said why.
    let logs = daemon.logs();
    assert_eq!(logs.matches(DETECTED).count(), 1, "{logs}");
    let why = match ignore_options {
        false => "it refused the startup options",
        true => "a prepared statement vanished",
    };
    assert!(logs.contains(why), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_that_refuses_startup_options() {
    through_pgbouncer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_that_drops_startup_options() {
    through_pgbouncer(true).await;
}

/// With the pooler at `postgres.url` and no `cdc.url`, the CDC worker cannot have its session:
/// it says so once, naming what to set, and stops instead of reconnecting forever; the request
/// path goes on through the pooler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdc_worker_behind_a_pooler_stops_and_says_to_set_cdc_url() {
    let env = TestEnv::start().await;
    let bouncer = PgBouncer::start(&env.pg, 2, false).expect("start pgbouncer");
    let pooled = bouncer.url("cw");
    let daemon =
        DaemonProcess::spawn_with(&env, "no-cdc-url", &[("DATABASE_URL", pooled.as_str())]);
    common::ready_at(&daemon.socket).await;
    let mut rpc = Rpc::connect(&daemon.socket).await;
    assert!(rpc
        .call("put", json!({"username": "p1"}))
        .await
        .get("result")
        .is_some());
    wait_until("the cdc worker stopped", Duration::from_secs(5), || async {
        daemon
            .logs()
            .contains("cdc stopped: the configuration cannot work")
    })
    .await;
    // Long enough for several reconnects at the worker's back-off (100 ms, doubling).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let logs = daemon.logs();
    assert_eq!(logs.matches("cdc stopped").count(), 1, "{logs}");
    assert!(logs.contains("set cdc.url"), "{logs}");
    assert!(!logs.contains("cdc reconnecting"), "{logs}");
    let health = rpc.call("health", Value::Null).await;
    assert_eq!(
        health["result"]["cdc"]["listening"],
        json!(false),
        "{health}"
    );
    let stats = rpc.call("stats", Value::Null).await;
    assert_eq!(stats["result"]["cdc"]["reconnects"], json!(0), "{stats}");
    assert_eq!(
        rpc.get("p1").await["result"]["user"]["username"],
        json!("p1")
    );
}
