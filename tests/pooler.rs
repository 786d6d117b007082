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
use common::{kind, wait_until, Rpc, TestEnv};

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
    let daemon = env.start_daemon(config.clone()).await;

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
    // Reads of the SQL writer's names fill the cache through the pooler too.
    let mut rpc = daemon.client().await;
    for name in names.iter().filter(|n| n.starts_with("sql")) {
        let answer = rpc.get(name).await;
        assert!(
            answer.get("result").is_some() || kind(&answer) == "not_found",
            "{answer}"
        );
    }
    wait_until(
        "the cache agrees with every row",
        Duration::from_secs(5),
        || async { env.agrees(&names).await },
    )
    .await;
    let report = cacheward::cli::verify::verify(&config)
        .await
        .expect("verify through the pooler");
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    assert!(report.checked > 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_that_refuses_startup_options() {
    through_pgbouncer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_that_drops_startup_options() {
    through_pgbouncer(true).await;
}
