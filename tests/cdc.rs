//! Out-of-band SQL reaches Redis (Guarantees 1 and 2 in docs/reference.md): every kind of change, commit order
//! different from id order, and the daemon, its connections and Redis failing meanwhile.

mod common;

use std::time::{Duration, Instant};

use cacheward::config::CdcMode;
use common::subject::Subject;
use common::{kind, wait_until, DaemonProcess, Rpc, TestEnv};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Guarantee 1: within 1 s once writes stop.
const CONVERGE: Duration = Duration::from_secs(1);

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn live(env: &TestEnv, name: &str) -> Option<Value> {
    env.cached(name)
        .await
        .filter(|v| cacheward::model::entry::is_live(v))
        .map(|v| serde_json::from_str(&v).unwrap())
}

/// The commit-order tests rename `a` to `a2` in the transaction that commits last: once it has,
/// the old name is gone from Redis and the new one holds the row.
/// The id of the newest outbox row.
async fn last_outbox_id(env: &TestEnv) -> i64 {
    let pg = env.pg().await;
    let row = pg.query_one("SELECT max(id) FROM cacheward_outbox", &[]);
    row.await.unwrap().get(0)
}

async fn renamed_a_reaches_redis(env: &TestEnv) {
    wait_until("A applied after all", CONVERGE, || async {
        live(env, "a").await.is_none() && live(env, "a2").await == env.row_json("a2").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_rename_delete_and_truncate_each_converge() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let pg = env.pg().await;
    let mut c = daemon.client().await;

    pg.execute("INSERT INTO users (username) VALUES ('oob')", &[])
        .await
        .unwrap();
    wait_until("insert makes the key live", CONVERGE, || async {
        live(&env, "oob").await.is_some() && live(&env, "oob").await == env.row_json("oob").await
    })
    .await;
    assert_eq!(c.get("oob").await["result"]["source"], json!("cache"));

    pg.execute(
        "UPDATE users SET username = 'oob2' WHERE username = 'oob'",
        &[],
    )
    .await
    .unwrap();
    wait_until("rename moves the key", CONVERGE, || async {
        live(&env, "oob").await.is_none() && live(&env, "oob2").await == env.row_json("oob2").await
    })
    .await;
    assert_eq!(kind(&c.get("oob").await), "not_found");
    assert_eq!(c.get("oob2").await["result"]["source"], json!("cache"));

    pg.execute("DELETE FROM users WHERE username = 'oob2'", &[])
        .await
        .unwrap();
    wait_until("delete removes the key", CONVERGE, || async {
        live(&env, "oob2").await.is_none()
    })
    .await;
    assert_eq!(kind(&c.get("oob2").await), "not_found");

    for name in ["t1", "t2"] {
        c.call("put", json!({"username": name})).await;
    }
    pg.execute("TRUNCATE users", &[]).await.unwrap();
    wait_until("truncate drops every cached user", CONVERGE, || async {
        live(&env, "t1").await.is_none() && live(&env, "t2").await.is_none()
    })
    .await;
    assert_eq!(kind(&c.get("t1").await), "not_found");
    // A name inserted after the TRUNCATE is cached normally.
    pg.execute("INSERT INTO users (username) VALUES ('t1')", &[])
        .await
        .unwrap();
    wait_until("re-inserted after truncate", CONVERGE, || async {
        live(&env, "t1").await.is_some()
    })
    .await;

    let stats = daemon.stats().await;
    assert!(stats["cdc"]["applied"].as_u64().unwrap() >= 5, "{stats}");
    assert!(stats["cdc"]["batches"].as_u64().unwrap() >= 4, "{stats}");
    assert!(
        stats["cdc"]["lag_ms"]["max"].as_u64().unwrap()
            >= stats["cdc"]["lag_ms"]["p50"].as_u64().unwrap()
    );
    let health = daemon.health().await;
    assert_eq!(health["cdc"]["listening"], json!(true));
    assert!(health["cdc"]["cursor"].as_i64().unwrap() > 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_after_a_later_numbered_one_is_applied() {
    committed_after_a_later_numbered_one(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_table_s_change_committed_after_a_later_numbered_one_is_applied() {
    committed_after_a_later_numbered_one(Subject::Orders).await;
}

async fn committed_after_a_later_numbered_one(subject: Subject) {
    let env = TestEnv::start().await;
    let config = subject.prepare(&env, env.config()).await;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    subject.served(&mut c).await;
    subject.put(&mut c, &["a", "b"]).await;

    // A takes the lower outbox id and stays open.
    let mut held = env.pg().await;
    let a = held.transaction().await.unwrap();
    a.execute(&subject.rename_sql("a", "a2"), &[])
        .await
        .unwrap();
    // B takes a higher id and commits first.
    env.pg()
        .await
        .execute(&subject.rename_sql("b", "b2"), &[])
        .await
        .unwrap();
    wait_until("the applier passed B", CONVERGE, || async {
        subject.live(&env, "b2").await.is_some()
    })
    .await;
    let a_id = last_outbox_id(&env).await;
    // The cursor is stored right after Redis took the batch.
    wait_until("the cursor moved past A's slot", CONVERGE, || async {
        daemon.health().await["cdc"]["cursor"].as_i64().unwrap() >= a_id
    })
    .await;
    assert!(
        subject.live(&env, "a").await.is_some(),
        "A is not applied yet: it has not committed"
    );

    a.commit().await.unwrap();
    subject.renamed(&env, "a", "a2").await;
    assert_eq!(kind(&c.call("get", subject.params("a")).await), "not_found");
    daemon.stop().await;
}

/// The same race with the transaction ids the other way round: the late committer has the newer
/// transaction id, newer than every completed one, so a snapshot does not list it as running
/// (its xmax is "latest completed + 1"), and yet it took the lower outbox id. Here the batch that
/// sees B follows a busy one (the applier draws its own transaction id with the snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_with_a_newer_transaction_id_than_any_finished_one_is_applied() {
    late_commit_with_a_newer_transaction_id(Subject::Users, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_table_s_late_commit_with_a_newer_transaction_id_is_applied() {
    late_commit_with_a_newer_transaction_id(Subject::Orders, false).await;
}

/// The same, with the applier idle before B commits (it draws its own transaction id only once
/// it has found changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_with_a_newer_transaction_id_is_applied_after_an_idle_poll() {
    late_commit_with_a_newer_transaction_id(Subject::Users, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_table_s_late_commit_with_a_newer_transaction_id_is_applied_after_an_idle_poll()
{
    late_commit_with_a_newer_transaction_id(Subject::Orders, true).await;
}

async fn late_commit_with_a_newer_transaction_id(subject: Subject, idle_first: bool) {
    let env = TestEnv::start().await;
    let mut config = subject.prepare(&env, env.config()).await;
    config.cdc.poll_interval_ms = 50;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    subject.served(&mut c).await;
    subject.put(&mut c, &["a", "b"]).await;
    if idle_first {
        // Polls every 50 ms: once the puts' changes are applied, the batches find nothing.
        wait_until("the puts' changes applied", CONVERGE, || async {
            daemon.stats().await["cdc"]["applied"].as_u64() >= Some(2)
        })
        .await;
        let before = daemon.stats().await["cdc"].clone();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = daemon.stats().await["cdc"].clone();
        // It went on reading the outbox (every 50 ms) and found nothing to apply: idle.
        let polls = |cdc: &serde_json::Value| cdc["polls"].as_u64().unwrap();
        assert!(polls(&after) >= polls(&before) + 3, "{before} {after}");
        assert_eq!(after["batches"], before["batches"], "idle since");
    }
    let (mut a_conn, mut b_conn) = (env.pg().await, env.pg().await);
    let b = b_conn.transaction().await.unwrap();
    let a = a_conn.transaction().await.unwrap();
    let xid = |row: tokio_postgres::Row| row.get::<_, String>(0).parse::<u64>().unwrap();
    // B draws its transaction id first, A the next one.
    let b_xid = xid(b
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap());
    let a_xid = xid(a
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap());
    assert!(a_xid > b_xid);
    // A takes the lower outbox id, B the higher; B commits, A stays open.
    a.execute(&subject.rename_sql("a", "a2"), &[])
        .await
        .unwrap();
    b.execute(&subject.rename_sql("b", "b2"), &[])
        .await
        .unwrap();
    b.commit().await.unwrap();
    wait_until("the applier passed B", CONVERGE, || async {
        subject.live(&env, "b2").await.is_some()
    })
    .await;
    assert!(
        subject.live(&env, "a").await.is_some(),
        "A has not committed yet"
    );

    a.commit().await.unwrap();
    subject.renamed(&env, "a", "a2").await;
    daemon.stop().await;
}

/// A consumer's first start with an empty cache begins at the outbox head; a transaction in flight
/// then, holding a row below the head, must still be applied when it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_in_flight_when_a_cache_first_starts_is_applied() {
    let env = TestEnv::start().await;
    let pg = env.pg().await;
    pg.batch_execute("INSERT INTO users (username) VALUES ('a'), ('b')")
        .await
        .unwrap();
    let mut held = env.pg().await;
    let a = held.transaction().await.unwrap();
    a.execute("UPDATE users SET username = 'a2' WHERE username = 'a'", &[])
        .await
        .unwrap();
    pg.execute("UPDATE users SET username = 'b2' WHERE username = 'b'", &[])
        .await
        .unwrap();

    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    // Cached while A is open: the row as it was before A (the fill is queued behind the answer,
    // so another connection may look before it lands).
    assert_eq!(c.get("a").await["result"]["source"], json!("db"));
    wait_until("a filled while A is open", CONVERGE, || async {
        live(&env, "a").await.is_some()
    })
    .await;

    a.commit().await.unwrap();
    renamed_a_reaches_redis(&env).await;
    assert_eq!(kind(&c.get("a").await), "not_found");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_in_a_replica_session_are_applied() {
    changes_in_a_replica_session(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_table_s_changes_made_in_a_replica_session_are_applied() {
    changes_in_a_replica_session(Subject::Orders).await;
}

/// `session_replication_role = replica` (a bulk load skipping foreign-key checks, pg_restore, a
/// logical replication subscriber's apply worker) skips every trigger not enabled ALWAYS: the
/// captures are, so what such a session changes reaches the cache, users' versions drawn as ever.
async fn changes_in_a_replica_session(subject: Subject) {
    let env = TestEnv::start().await;
    subject.prepare(&env, env.config()).await;
    let daemon = DaemonProcess::spawn(&env, "cdc");
    daemon.wait_ready().await;
    let rows = ["k0", "k1", "k2", "k3"];
    let mut c = Rpc::connect(&daemon.socket).await;
    subject.served(&mut c).await;
    subject.put(&mut c, &rows).await;
    let changes = [
        subject.rename_sql("k0", "k0-renamed"),
        subject.delete_sql("k1"),
        subject.touch_sql("k2"),
        subject.insert_sql(&["k4"]),
    ];
    env.pg()
        .await
        .batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {}; COMMIT",
            changes.join(";")
        ))
        .await
        .unwrap();
    let all = ["k0", "k1", "k2", "k3", "k4", "k0-renamed"];
    wait_until(
        "the replica session's changes in the cache within 3 s",
        Duration::from_secs(3),
        || async { subject.agrees(&env, &all).await },
    )
    .await;
    // And so the daemon answers.
    let answer = subject.get(&mut c, "k0-renamed").await;
    assert!(answer.get("result").is_some(), "{answer}");
    assert!(subject.get(&mut c, "k0").await.get("error").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_daemon_was_killed_are_applied_after_restart() {
    changes_while_killed(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_table_s_changes_made_while_the_daemon_was_killed_are_applied_after_restart() {
    changes_while_killed(Subject::Orders).await;
}

async fn changes_while_killed(subject: Subject) {
    let env = TestEnv::start().await;
    subject.prepare(&env, env.config()).await;
    let mut daemon = DaemonProcess::spawn(&env, "cdc");
    daemon.wait_ready().await;
    let rows: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    let mut c = Rpc::connect(&daemon.socket).await;
    subject.served(&mut c).await;
    subject.put(&mut c, &rows).await;
    drop(c);
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit(Duration::from_secs(5));

    let mut changes = vec![
        subject.rename_sql("k0", "k0-renamed"),
        subject.rename_sql("k1", "k1-renamed"),
    ];
    changes.extend(["k2", "k3", "k4"].map(|n| subject.delete_sql(n)));
    changes.extend(["k5", "k6", "k7", "k8", "k9"].map(|n| subject.touch_sql(n)));
    env.pg()
        .await
        .batch_execute(&changes.join(";"))
        .await
        .unwrap();
    let mut all = rows.clone();
    all.extend(["k0-renamed", "k1-renamed"]);
    assert!(
        !subject.agrees(&env, &all).await,
        "the cache is stale before the restart"
    );

    let daemon = DaemonProcess::spawn(&env, "cdc2");
    daemon.wait_ready().await;
    wait_until(
        "no stale entry within 3 s",
        Duration::from_secs(3),
        || async { subject.agrees(&env, &all).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_lose_nothing() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    let mut all = Vec::new();
    for i in 0..10 {
        c.call("put", json!({"username": format!("t{i}")})).await;
        all.push(format!("t{i}"));
        all.push(format!("t{i}-x"));
    }

    let stop = CancellationToken::new();
    let killer = tokio::spawn({
        let (stop, pg) = (stop.clone(), env.pg().await);
        async move {
            let mut kills = 0;
            while !stop.is_cancelled() {
                let killed: i64 = pg
                    .query_one(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'cacheward%'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                kills += killed;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            kills
        }
    });
    let pg = env.pg().await;
    for round in 0..40 {
        let i = round % 10;
        let (from, to) = if (round / 10) % 2 == 0 {
            (format!("t{i}"), format!("t{i}-x"))
        } else {
            (format!("t{i}-x"), format!("t{i}"))
        };
        pg.execute(
            "UPDATE users SET username = $2 WHERE username = $1",
            &[&from, &to],
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.cancel();
    let kills = killer.await.unwrap();
    assert!(kills >= 3, "connections were terminated ({kills})");
    wait_until(
        "converged after the reconnects",
        Duration::from_secs(5),
        || async { env.agrees(&all).await },
    )
    .await;
    assert!(daemon.stats().await["cdc"]["reconnects"].as_u64().unwrap() >= 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_a_persistent_redis_was_down_are_applied_when_it_returns() {
    changes_while_redis_was_down(500).await;
}

/// In batches of one change each batch is full, so the next is read while Redis applies it: the
/// apply refused, that read is dropped and the cursor stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_redis_was_down_are_applied_when_it_returns_in_batches_of_one() {
    changes_while_redis_was_down(1).await;
}

async fn changes_while_redis_was_down(batch_size: usize) {
    let mut env = TestEnv::start_persistent().await;
    let mut config = env.config();
    config.cdc.batch_size = batch_size;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    for name in ["r1", "r2", "r3"] {
        c.call("put", json!({"username": name})).await;
    }
    env.redis.kill();
    env.pg()
        .await
        .batch_execute(
            "UPDATE users SET username = 'r1-new' WHERE username = 'r1';
             DELETE FROM users WHERE username = 'r2';
             UPDATE users SET created_at = '2001-01-01' WHERE username = 'r3';",
        )
        .await
        .unwrap();
    let cursor = daemon.health().await["cdc"]["cursor"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        daemon.health().await["cdc"]["cursor"].as_i64().unwrap(),
        cursor,
        "Redis down: the cursor stays"
    );

    env.redis.start_again().unwrap();
    let all = names(&["r1", "r2", "r3", "r1-new"]);
    wait_until(
        "no stale entry survives the outage",
        Duration::from_secs(3),
        || async { env.agrees(&all).await },
    )
    .await;
    // The restarted Redis runs as another process, so its data is distrusted and dropped (see
    // tests/fence.rs); either way the change made while it was down is what a get answers.
    assert_eq!(
        c.get("r3").await["result"]["user"]["created_at"],
        json!("2001-01-01T00:00:00.000000Z")
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_alone_converges_when_notifications_are_lost() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config.cdc.poll_interval_ms = 100;
    let daemon = env.start_daemon(config).await;
    let pg = env.pg().await;
    // The trigger now notifies a channel nobody listens on.
    pg.execute(
        "UPDATE cacheward_cdc_settings SET channel = 'nobody_listens'",
        &[],
    )
    .await
    .unwrap();
    pg.execute("INSERT INTO users (username) VALUES ('polled')", &[])
        .await
        .unwrap();
    wait_until("applied by the poll", CONVERGE, || async {
        live(&env, "polled").await.is_some()
    })
    .await;
    daemon.stop().await;

    // cdc.notify = false: the daemon tells the trigger not to notify at all.
    let mut config = env.config();
    config.cdc.notify = false;
    config.cdc.poll_interval_ms = 100;
    let daemon = env.start_daemon(config).await;
    wait_until("setting written", CONVERGE, || async {
        let row = env
            .pg()
            .await
            .query_one("SELECT notify FROM cacheward_cdc_settings", &[])
            .await
            .unwrap();
        !row.get::<_, bool>(0)
    })
    .await;
    pg.execute(
        "UPDATE users SET username = 'polled2' WHERE username = 'polled'",
        &[],
    )
    .await
    .unwrap();
    wait_until("applied by the poll", CONVERGE, || async {
        live(&env, "polled").await.is_none() && live(&env, "polled2").await.is_some()
    })
    .await;
    daemon.stop().await;
}

/// The worker's own writes (its cursor, its lease, the transaction id an early batch draws) never
/// wait for a flush or a standby: on a server whose every commit waits for a synchronous standby
/// that never answers, a change committed by a session that does not wait still reaches Redis.
/// (A worker that waited would hang at its lease, or at its first batch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_never_waits_for_its_own_commits_to_be_flushed() {
    let env = TestEnv::start().await;
    // Started first: the request path's own writes (the cache's fence, a write-through) do wait,
    // as they must.
    let daemon = env.start_daemon(env.config()).await;
    let pg = env.pg().await;
    // The harness's server commits without waiting (synchronous_commit=off on its command line):
    // this database's sessions wait, as production ones do, for a standby that never comes. The
    // worker's session is cut, so that the next one is such a session.
    for statement in [
        "ALTER DATABASE cw SET synchronous_commit = on",
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "SELECT pg_reload_conf()",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'cacheward-cdc'",
    ] {
        pg.batch_execute(statement).await.unwrap();
    }
    let writer = env.pg().await;
    writer
        .batch_execute("SET synchronous_commit = local")
        .await
        .unwrap();
    for (i, name) in ["flushed", "flushed2", "flushed3"].iter().enumerate() {
        let sql = match i {
            0 => "INSERT INTO users (username) VALUES ('flushed')".to_owned(),
            _ => format!("UPDATE users SET username = '{name}' WHERE username LIKE 'flushed%'"),
        };
        writer.batch_execute(&sql).await.unwrap();
        wait_until(
            "the change reaches Redis",
            Duration::from_secs(5),
            || async { live(&env, name).await.is_some() },
        )
        .await;
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_and_out_of_band_writers_race_then_verify_finds_nothing() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let pg = env.pg().await;
    for i in 0..20 {
        pg.execute(
            "INSERT INTO users (username) VALUES ($1)",
            &[&format!("s{i}")],
        )
        .await
        .unwrap();
    }
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for w in 0..2 {
        let (stop, pg) = (stop.clone(), env.pg().await);
        tasks.push(tokio::spawn(async move {
            let mut n: u64 = w;
            while !stop.is_cancelled() {
                let i = n % 20;
                // Rename back and forth, and touch rows in place.
                pg.execute(
                    "UPDATE users SET username = CASE WHEN username LIKE '%-x' THEN left(username, -2) ELSE username || '-x' END
                     WHERE username IN ($1, $2)",
                    &[&format!("s{i}"), &format!("s{i}-x")],
                )
                .await
                .unwrap();
                pg.execute("UPDATE users SET created_at = now() WHERE id = $1", &[&((n % 20 + 1) as i64)])
                    .await
                    .unwrap();
                n += 2;
            }
        }));
    }
    for r in 0..4u64 {
        let (stop, socket) = (stop.clone(), daemon.socket.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Rpc::connect(&socket).await;
            let mut n = r;
            while !stop.is_cancelled() {
                let name = if n % 2 == 0 {
                    format!("s{}", n % 20)
                } else {
                    format!("s{}-x", n % 20)
                };
                let answer = c.get(&name).await;
                assert!(
                    answer["result"].is_object() || kind(&answer) == "not_found",
                    "{answer}"
                );
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    for t in tasks {
        t.await.expect("no task failed");
    }
    let mut all = Vec::new();
    for i in 0..20 {
        all.push(format!("s{i}"));
        all.push(format!("s{i}-x"));
    }
    wait_until("quiesced", CONVERGE, || async { env.agrees(&all).await }).await;
    let out = env.verify();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "verify found mismatches:\n{text}");
    assert!(text.contains(" 0 mismatches"), "{text}");

    // Corrupt one entry by hand, with a version no write can beat: verify must name it.
    let mut redis = env.redis().await;
    let mut row = match env.row_json("s0").await {
        Some(row) => row,
        None => env.row_json("s0-x").await.unwrap(),
    };
    let key_name = row["username"].as_str().unwrap().to_owned();
    row["created_at"] = json!("1999-01-01T00:00:00.000000Z");
    row["version"] = json!(1_000_000_000_000i64);
    let _: () = redis::cmd("SET")
        .arg(format!("user:{key_name}"))
        .arg(row.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    let out = env.verify();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("mismatch user:{key_name}:")),
        "{text}"
    );
    assert!(text.contains(" 1 mismatches"), "{text}");
    // `--repair` drops it (a version no write can beat is no obstacle): the daemon then answers
    // the row, and a verify after finds nothing.
    let out = env.verify_and_repair();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("mismatch user:{key_name}:"))
            && text.contains("; repaired: dropped"),
        "{text}"
    );
    assert!(text.contains(" 1 mismatches (1 repaired)"), "{text}");
    let mut c = daemon.client().await;
    let answer = c.call("get", json!({ "username": key_name })).await;
    assert_eq!(
        Some(&answer["result"]["user"]),
        env.row_json(&key_name).await.as_ref(),
        "{answer}"
    );
    let out = env.verify();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_wider_than_a_notify_payload_round_trips() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "wide"})).await;
    let pg = env.pg().await;
    // A schema change while the daemon runs: its prepared statements must cope.
    pg.batch_execute("ALTER TABLE users ADD COLUMN bio text")
        .await
        .unwrap();
    let bio = "x".repeat(12_000);
    pg.execute("UPDATE users SET bio = $1 WHERE username = 'wide'", &[&bio])
        .await
        .unwrap();
    wait_until("the wide row reached Redis", CONVERGE, || async {
        live(&env, "wide")
            .await
            .is_some_and(|v| v["bio"] == json!(bio))
    })
    .await;
    let cached = env.cached("wide").await.unwrap();
    assert!(cached.len() > 8000);
    let got = c.get("wide").await;
    assert_eq!(
        got["result"]["user"]["bio"],
        json!(bio),
        "every column is served"
    );
    assert_eq!(got["result"]["source"], json!("cache"));
    // Cold reads and writes after the schema change work too.
    pg.execute(
        "INSERT INTO users (username, bio) VALUES ('wide2', 'short')",
        &[],
    )
    .await
    .unwrap();
    let mut redis = env.redis().await;
    let _: () = redis::cmd("DEL")
        .arg("user:wide2")
        .query_async(&mut redis)
        .await
        .unwrap();
    let cold = c.get("wide2").await;
    assert_eq!(cold["result"]["user"]["bio"], json!("short"), "{cold}");
    let put = c.call("put", json!({"username": "wide3"})).await;
    assert_eq!(put["result"]["user"]["bio"], Value::Null, "{put}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_outbox_rows_are_pruned_and_a_daemon_left_behind_resyncs() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config.cdc.retention_secs = 1;
    config.cdc.poll_interval_ms = 100;
    let daemon = env.start_daemon(config.clone()).await;
    let pg = env.pg().await;
    let mut c = daemon.client().await;
    for name in ["p1", "p2", "p3"] {
        c.call("put", json!({"username": name})).await;
    }
    wait_until("outbox pruned", Duration::from_secs(5), || async {
        let rows: i64 = pg
            .query_one("SELECT count(*) FROM cacheward_outbox", &[])
            .await
            .unwrap()
            .get(0);
        rows == 0
    })
    .await;
    daemon.stop().await;

    // While it is away, changes happen and are pruned before it returns.
    pg.batch_execute(
        "UPDATE users SET username = 'p1-moved' WHERE username = 'p1';
         DELETE FROM users WHERE username = 'p2';",
    )
    .await
    .unwrap();
    pg.batch_execute(
        "WITH gone AS (DELETE FROM cacheward_outbox RETURNING id)
         UPDATE cacheward_cdc_settings SET pruned_upto = (SELECT max(id) FROM gone)",
    )
    .await
    .unwrap();
    assert!(live(&env, "p1").await.is_some(), "stale before the restart");

    let daemon = env.start_daemon(config).await;
    let all = names(&["p1", "p2", "p3", "p1-moved"]);
    wait_until("resynced", Duration::from_secs(3), || async {
        env.agrees(&all).await
    })
    .await;
    assert_eq!(daemon.stats().await["cdc"]["resyncs"], json!(1));
    let mut c = daemon.client().await;
    assert_eq!(kind(&c.get("p1").await), "not_found");
    assert_eq!(c.get("p3").await["result"]["user"]["username"], json!("p3"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_mode_only_removes() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config.cdc.mode = CdcMode::Invalidate;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "inv"})).await;
    let pg = env.pg().await;
    pg.execute(
        "UPDATE users SET created_at = '2002-02-02' WHERE username = 'inv'",
        &[],
    )
    .await
    .unwrap();
    pg.execute("INSERT INTO users (username) VALUES ('inv-new')", &[])
        .await
        .unwrap();
    wait_until("the changed key removed", CONVERGE, || async {
        live(&env, "inv").await.is_none()
    })
    .await;
    assert!(
        live(&env, "inv-new").await.is_none(),
        "invalidate never writes a value"
    );
    let first = c.get("inv").await;
    assert_eq!(first["result"]["source"], json!("db"));
    assert_eq!(
        first["result"]["user"]["created_at"],
        json!("2002-02-02T00:00:00.000000Z")
    );
    assert_eq!(
        c.get("inv").await["result"]["source"],
        json!("cache"),
        "the current row can be cached again"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_and_the_worker_comes_back_by_itself() {
    let mut env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "pgr"})).await;
    env.pg.stop();
    wait_until("worker noticed", Duration::from_secs(5), || async {
        daemon.health().await["cdc"]["listening"] == json!(false)
    })
    .await;
    env.pg.start_again().unwrap();
    wait_until(
        "worker listening again",
        Duration::from_secs(10),
        || async { daemon.health().await["cdc"]["listening"] == json!(true) },
    )
    .await;
    env.pg()
        .await
        .execute(
            "UPDATE users SET username = 'pgr2' WHERE username = 'pgr'",
            &[],
        )
        .await
        .unwrap();
    let all = names(&["pgr", "pgr2"]);
    wait_until("change after the restart applied", CONVERGE, || async {
        env.agrees(&all).await && live(&env, "pgr").await.is_none()
    })
    .await;
    assert!(daemon.stats().await["cdc"]["reconnects"].as_u64().unwrap() >= 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_stats_line_carries_cdc_lag() {
    let env = TestEnv::start().await;
    let daemon = DaemonProcess::spawn_with(
        &env,
        "stats",
        &[
            ("CACHEWARD__LOG__STATS_INTERVAL_SECS", "1"),
            ("CACHEWARD__LOG__FORMAT", "json"),
        ],
    );
    daemon.wait_ready().await;
    // A first start with an empty cache begins at the outbox head: insert after it.
    wait_until("the worker listens", Duration::from_secs(5), || async {
        daemon.logs().contains("cdc listening")
    })
    .await;
    env.pg()
        .await
        .execute("INSERT INTO users (username) VALUES ('lagged')", &[])
        .await
        .unwrap();
    wait_until(
        "a stats line with applied changes",
        Duration::from_secs(5),
        || async {
            daemon.logs().lines().any(|line| {
                let v: Value = serde_json::from_str(line).unwrap_or_default();
                v["message"] == json!("stats")
                    && v["cdc_applied"].as_u64() >= Some(1)
                    && v["cdc_lag_max_ms"].is_u64()
            })
        },
    )
    .await;
}

/// Users' capture turned off (`ALTER TABLE users DISABLE TRIGGER …`): the daemon says so at once,
/// naming the trigger, and from then on reads users from PostgreSQL, so a change made meanwhile
/// (which passes the cache by) is served at once; once the capture fires again every cached user
/// is dropped, and only then is the cache read again. Without the drop the stale entry would stay
/// for good (the live checker, which would find it in time, is off here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_capture_turned_off_is_said_and_its_return_drops_every_cached_user() {
    let env = TestEnv::start().await;
    let listen = format!("127.0.0.1:{}", cacheward::dev::free_port().unwrap());
    let daemon = DaemonProcess::spawn_with(
        &env,
        "capture",
        &[
            ("CACHEWARD__CONSISTENCY__SAMPLE_PER_SEC", "0"),
            ("CACHEWARD__METRICS__LISTEN", &listen),
        ],
    );
    daemon.wait_ready().await;
    let firing = || async {
        common::sample(
            &common::scrape(&listen, "/metrics").await,
            "cacheward_capture_firing{table=\"users\"}",
        )
    };
    assert_eq!(firing().await, 1.0);
    let mut c = Rpc::connect(&daemon.socket).await;
    let pg = env.pg().await;
    pg.batch_execute("INSERT INTO users (username) VALUES ('kept'), ('steady')")
        .await
        .unwrap();
    wait_until("cached", CONVERGE, || async {
        live(&env, "kept").await.is_some() && live(&env, "steady").await.is_some()
    })
    .await;
    // Served from the cache (and its near copy) while the capture fires.
    for _ in 0..2 {
        assert_eq!(c.get("steady").await["result"]["source"], json!("cache"));
    }
    let off = "ALTER TABLE users DISABLE TRIGGER cacheward_capture_update";
    until_said(&pg, off, &daemon, "users capture not firing").await;
    let logs = daemon.logs();
    assert!(
        logs.contains("trigger cacheward_capture_update on users is disabled"),
        "{logs}"
    );
    assert_eq!(firing().await, 0.0);
    pg.batch_execute("UPDATE users SET username = 'moved' WHERE username = 'kept'")
        .await
        .unwrap();
    // The stale entry is still in Redis, and never served: every user is read from PostgreSQL.
    assert!(live(&env, "kept").await.is_some());
    for _ in 0..2 {
        assert_eq!(kind(&c.get("kept").await), "not_found");
        assert_eq!(c.get("moved").await["result"]["source"], json!("db"));
        assert_eq!(c.get("steady").await["result"]["source"], json!("db"));
    }
    let on = "ALTER TABLE users ENABLE ALWAYS TRIGGER cacheward_capture_update";
    until_said(
        &pg,
        on,
        &daemon,
        "users capture firing again: cached users dropped",
    )
    .await;
    // Every cached user dropped (those filled while it was off too).
    assert!(live(&env, "kept").await.is_none() && live(&env, "steady").await.is_none());
    assert_eq!(firing().await, 1.0);
    assert_eq!(kind(&c.get("kept").await), "not_found");
    // Trusted again: a read fills the cache, and the next is answered from it.
    served_from_the_cache_again(&mut c, "moved").await;
}

/// Runs `sql`, then waits until the daemon's log says `said`.
async fn until_said(pg: &tokio_postgres::Client, sql: &str, daemon: &DaemonProcess, said: &str) {
    pg.batch_execute(sql).await.unwrap();
    wait_until(said, Duration::from_secs(5), || async {
        daemon.logs().contains(said)
    })
    .await;
}

/// Reads `name` until the cache answers it (a read after a drop fills it; the next hits).
async fn served_from_the_cache_again(c: &mut Rpc, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.get(name).await["result"]["source"] != json!("cache") {
        assert!(
            Instant::now() < deadline,
            "{name} never served from the cache again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `users` table renamed away: its capture can no longer be trusted to reach the cache (the
/// table the daemon reads is not the one whose changes are captured), so it is said, and no user
/// is answered from the cache until the table is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_renamed_away_is_said_and_no_user_is_answered_from_the_cache() {
    let env = TestEnv::start().await;
    let daemon = DaemonProcess::spawn_with(
        &env,
        "renamed",
        &[("CACHEWARD__CONSISTENCY__SAMPLE_PER_SEC", "0")],
    );
    daemon.wait_ready().await;
    let mut c = Rpc::connect(&daemon.socket).await;
    let pg = env.pg().await;
    pg.batch_execute("INSERT INTO users (username) VALUES ('here')")
        .await
        .unwrap();
    wait_until("cached", CONVERGE, || async {
        live(&env, "here").await.is_some()
    })
    .await;
    assert_eq!(c.get("here").await["result"]["source"], json!("cache"));
    let away = "ALTER TABLE users RENAME TO users_away";
    until_said(&pg, away, &daemon, "table users is missing").await;
    for _ in 0..2 {
        let answer = c.get("here").await;
        assert_ne!(answer["result"]["source"], json!("cache"), "{answer}");
    }
    let back = "ALTER TABLE users_away RENAME TO users";
    until_said(
        &pg,
        back,
        &daemon,
        "users capture firing again: cached users dropped",
    )
    .await;
    served_from_the_cache_again(&mut c, "here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_applied_late_is_warned_about_and_the_recovery_said() {
    let env = TestEnv::start().await;
    let daemon = DaemonProcess::spawn(&env, "lag");
    daemon.wait_ready().await;
    // A change captured now and committed 5.5 s later reaches Redis more than 5 s after it was made.
    let mut held = env.pg().await;
    let slow = held.transaction().await.unwrap();
    slow.execute("INSERT INTO users (username) VALUES ('slow')", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5500)).await;
    slow.commit().await.unwrap();
    wait_until("cdc lagging", Duration::from_secs(5), || async {
        daemon.logs().contains("cdc lagging")
    })
    .await;
    env.pg()
        .await
        .execute("INSERT INTO users (username) VALUES ('quick')", &[])
        .await
        .unwrap();
    wait_until("cdc caught up", Duration::from_secs(5), || async {
        daemon.logs().contains("cdc caught up")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_per_cache_and_a_standby_takes_over() {
    let env = TestEnv::start().await;
    let first = env.start_daemon(env.config()).await;
    let mut second_config = env.config();
    second_config.socket.path = env.dir.path().join("second.sock");
    second_config.cdc.poll_interval_ms = 100;
    let second = env.start_daemon(second_config).await;
    wait_until("the first leads", CONVERGE, || async {
        first.health().await["cdc"]["listening"] == json!(true)
    })
    .await;
    assert_eq!(
        second.health().await["cdc"]["listening"],
        json!(false),
        "the second stands by"
    );

    first.stop().await;
    wait_until("the standby takes over", Duration::from_secs(3), || async {
        second.health().await["cdc"]["listening"] == json!(true)
    })
    .await;
    env.pg()
        .await
        .execute("INSERT INTO users (username) VALUES ('taken-over')", &[])
        .await
        .unwrap();
    wait_until("applied by the new leader", CONVERGE, || async {
        live(&env, "taken-over").await.is_some()
    })
    .await;
    second.stop().await;
}

/// A half-open CDC connection: its PostgreSQL backend frozen (SIGSTOP), so the socket stays open
/// and nothing answers. The worker's lease heartbeat times out, it reconnects and takes its own
/// lease back within seconds (a session lock would stay with the frozen backend), and every change
/// made meanwhile is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_cdc_connection_is_replaced_within_seconds_and_nothing_is_lost() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let pg = env.pg().await;
    pg.execute("INSERT INTO users (username) VALUES ('before-freeze')", &[])
        .await
        .unwrap();
    wait_until("applied before the freeze", CONVERGE, || async {
        live(&env, "before-freeze").await.is_some()
    })
    .await;
    let backend: i32 = pg
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'cacheward-cdc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // SAFETY: kill(2) on the CDC session's server process.
    unsafe { libc::kill(backend, libc::SIGSTOP) };
    let frozen_at = std::time::Instant::now();
    for i in 0..20 {
        pg.execute(
            "INSERT INTO users (username) VALUES ($1)",
            &[&format!("frozen{i}")],
        )
        .await
        .unwrap();
    }
    // Heartbeat (1 s) + the call bound (statement timeout + 1 s) + a reconnect: 6 s is ample.
    wait_until(
        "every change made during the freeze applied",
        Duration::from_secs(6),
        || async {
            for i in 0..20 {
                if live(&env, &format!("frozen{i}")).await.is_none() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let took = frozen_at.elapsed();
    let stats = daemon.stats().await;
    assert!(stats["cdc"]["reconnects"].as_u64().unwrap() >= 1, "{stats}");
    // The frozen backend still holds its session: only a lease let the worker go on.
    unsafe { libc::kill(backend, libc::SIGCONT) };
    pg.execute("INSERT INTO users (username) VALUES ('after-thaw')", &[])
        .await
        .unwrap();
    wait_until("applied after the thaw", CONVERGE, || async {
        live(&env, "after-thaw").await.is_some()
    })
    .await;
    eprintln!("frozen CDC connection replaced, changes applied after {took:?}");
    daemon.stop().await;
}

/// `cdc.enabled = false`: the daemon never runs the CDC worker, never holds a CDC connection, and a
/// leader that goes away (it gives its lease up at once, so a standby would take over within a
/// poll) is not replaced by it; its reads and writes work as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_cdc_disabled_never_competes_for_the_stream() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config.cdc.poll_interval_ms = 100;
    let leader = env.start_daemon(config.clone()).await;
    config.cdc.enabled = false;
    config.socket.path = env.dir.path().join("sidecar.sock");
    let sidecar = env.start_daemon(config).await;
    // The leader applies the stream while both run.
    env.pg()
        .await
        .execute("INSERT INTO users (username) VALUES ('applied')", &[])
        .await
        .unwrap();
    wait_until("the leader applies", CONVERGE, || async {
        live(&env, "applied").await.is_some()
    })
    .await;
    let cdc_sessions = || async {
        let row = env
            .pg()
            .await
            .query_one(
                "SELECT (SELECT count(*) FROM cacheward_cdc_leases)
                      + (SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cacheward-cdc')",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    assert_eq!(cdc_sessions().await, 2, "the leader's lease and session");
    leader.stop().await;
    let mut c = sidecar.client().await;
    assert!(c.call("put", json!({"username": "side"})).await["result"]["created"] == json!(true));
    // Five polls: a standby would have taken the released lease by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sidecar.health().await["cdc"]["listening"], json!(false));
    assert_eq!(
        cdc_sessions().await,
        0,
        "no daemon holds the CDC lease or a CDC session"
    );
    env.pg()
        .await
        .execute("INSERT INTO users (username) VALUES ('unapplied')", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        live(&env, "unapplied").await,
        None,
        "nobody applies the stream"
    );
    assert_eq!(c.get("side").await["result"]["source"], json!("cache"));
    sidecar.stop().await;
}

/// The rows of a finished pending transaction are looked up by outbox id range, one index scan
/// per transaction, never by reading through the whole outbox: otherwise every batch after a
/// busy one costs time in proportion to the retained outbox (30 ms at 300 000 rows), and the
/// applier falls behind the writers it is meant to keep pace with. Checked by the outbox rows
/// the query touches, in both of PostgreSQL's plan modes for a prepared statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rows_are_read_by_id_range_whatever_the_outbox_size() {
    let env = TestEnv::start().await;
    let pg = large_outbox_with(
        &env,
        &format!(
            "PREPARE late(text[], bigint[], bigint[], bigint) AS {}",
            cacheward::cdc::statements::late_query()
        ),
    )
    .await;
    // Two finished transactions, each with 500 ids to look through.
    let execute = "EXECUTE late(ARRAY['123', '456'],
                     ARRAY[100000, 150000]::bigint[], ARRAY[100500, 150500]::bigint[], 500)";
    for (mode, plan) in plans_in_both_modes(&pg, execute).await {
        let touched = outbox_rows_touched(&plan[0]["Plan"]);
        assert!(
            touched <= 2 * 2 * 500,
            "{mode}: {touched} outbox rows read: {plan}"
        );
    }
}

/// The users a batch's changes name are read with the changes, in the same round trip (the
/// names derived in SQL from the same outbox rows): by the outbox's primary key and the users'
/// unique index, whatever either table's size, in both plan modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_a_batch_names_are_read_by_index_whatever_the_table_sizes() {
    let env = TestEnv::start().await;
    let setup = env.pg().await;
    setup
        .batch_execute(
            "INSERT INTO users (username) SELECT 'n' || g FROM generate_series(1, 50000) g;
             ANALYZE users;",
        )
        .await
        .unwrap();
    let sequence = cacheward::cdc::statements::outbox_sequence(&setup)
        .await
        .unwrap();
    let pg = large_outbox_with(
        &env,
        &format!(
            "PREPARE batch(bigint, bigint, text[], bigint[], bigint[], bool) AS {}",
            cacheward::cdc::statements::batch_query(sequence)
        ),
    )
    .await;
    // 500 fresh changes after id 40 000 (users n40001..), and a finished transaction's 500.
    let execute = "EXECUTE batch(40000, 500, ARRAY['123'], ARRAY[10000]::bigint[],
                                 ARRAY[10500]::bigint[], true)";
    for (mode, plan) in plans_in_both_modes(&pg, execute).await {
        let outbox = outbox_rows_touched(&plan[0]["Plan"]);
        assert!(
            outbox <= 2 * 2 * 500,
            "{mode}: {outbox} outbox rows read: {plan}"
        );
        let users = rows_touched(&plan[0]["Plan"], "users", "users_username_key");
        assert!(users <= 2 * 500, "{mode}: {users} users read: {plan}");
    }
    // And the rows are those of the names: 500 fresh ones (the late transaction is not the
    // inserts' own, so it names nobody), then the batch's own row.
    let found = pg.query(execute, &[]).await.unwrap();
    assert_eq!(found.len(), 501);
    let batch: serde_json::Value = serde_json::from_str(found[500].get(0)).unwrap();
    assert_eq!(batch["fresh"].as_array().map(Vec::len), Some(500));
    assert!(batch["xid"].is_string(), "{batch}");
}

/// Pruning looks at the oldest chunk of the outbox by primary key, never at the whole outbox: it
/// runs every minute on the CDC worker's connection, and a scan of a day's retained changes
/// would stall the applier each time. Checked, like the late-row lookup, by the rows touched,
/// both with nothing old enough to delete and with a full chunk deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_reads_one_chunk_of_the_outbox_whatever_its_size() {
    const CHUNK: i64 = 1000;
    let env = TestEnv::start().await;
    let mut pg = large_outbox_with(
        &env,
        &format!(
            "PREPARE prune(float8, bigint, bigint) AS {}",
            cacheward::cdc::outbox::PRUNE_QUERY
        ),
    )
    .await;
    for mode in ["force_generic_plan", "force_custom_plan"] {
        for (retention, deleted) in [(86400.0, 0), (0.0, CHUNK)] {
            let tx = pg.transaction().await.unwrap();
            tx.batch_execute(&format!("SET LOCAL plan_cache_mode = {mode}"))
                .await
                .unwrap();
            let plan: Value = tx
                .query_one(
                    &format!(
                        "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE prune({retention}, 150000, {CHUNK})"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            let left: i64 = tx
                .query_one("SELECT count(*) FROM cacheward_outbox", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(left, 200000 - deleted, "{mode}, retention {retention}");
            let touched = outbox_rows_touched(&plan[0]["Plan"]);
            assert!(
                touched <= 3 * CHUNK as u64,
                "{mode}, retention {retention}: {touched} outbox rows read: {plan}"
            );
            tx.rollback().await.unwrap();
        }
    }
}

/// A session on an outbox of 200 000 rows (ids 1..=200 000, analyzed), with `prepare` run.
async fn large_outbox_with(env: &TestEnv, prepare: &str) -> tokio_postgres::Client {
    let pg = env.pg().await;
    pg.batch_execute(
        "INSERT INTO cacheward_outbox (op, username, version)
             SELECT 'insert', 'n' || g, g FROM generate_series(1, 200000) g;
         ANALYZE cacheward_outbox;",
    )
    .await
    .unwrap();
    pg.batch_execute(prepare).await.unwrap();
    pg
}

/// `EXPLAIN ANALYZE` of `execute` (a prepared statement's EXECUTE) in each of PostgreSQL's plan
/// modes for prepared statements, with the mode's name.
async fn plans_in_both_modes(
    pg: &tokio_postgres::Client,
    execute: &str,
) -> Vec<(&'static str, Value)> {
    let mut plans = Vec::new();
    for mode in ["force_generic_plan", "force_custom_plan"] {
        pg.batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {execute}");
        plans.push((mode, pg.query_one(&explain, &[]).await.unwrap().get(0)));
    }
    plans
}

/// Rows that the plan's scans of the outbox read (returned or filtered out), over all loops.
fn outbox_rows_touched(node: &Value) -> u64 {
    rows_touched(node, "cacheward_outbox", "cacheward_outbox_pkey")
}

/// Rows that the plan's scans of `relation` (or of its `index`) read, returned or filtered out,
/// over all loops.
fn rows_touched(node: &Value, relation: &str, index: &str) -> u64 {
    let on = node["Relation Name"] == json!(relation) || node["Index Name"] == json!(index);
    let count = |key: &str| node[key].as_f64().unwrap_or(0.0);
    let own = if on {
        ((count("Actual Rows") + count("Rows Removed by Filter")) * count("Actual Loops")) as u64
    } else {
        0
    };
    let children = node["Plans"].as_array().map_or(0, |plans| {
        plans
            .iter()
            .map(|plan| rows_touched(plan, relation, index))
            .sum::<u64>()
    });
    own + children
}

/// The lease table is input like any other: a row forged to run until the year 9999 (or left by
/// a clock stepped back) does not hold the stream up; the worker takes it over and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_lease_does_not_stop_the_stream() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let pg = env.pg().await;
    pg.batch_execute(
        "UPDATE cacheward_cdc_leases SET holder = 'forged', expires_at = '9999-01-01'",
    )
    .await
    .unwrap();
    wait_until(
        "the forged lease taken over",
        Duration::from_secs(5),
        || async {
            let holder: String = pg
                .query_one("SELECT holder FROM cacheward_cdc_leases", &[])
                .await
                .unwrap()
                .get(0);
            holder != "forged"
        },
    )
    .await;
    pg.execute("INSERT INTO users (username) VALUES ('after-forgery')", &[])
        .await
        .unwrap();
    wait_until(
        "applied by the worker that took it",
        CONVERGE * 3,
        || async { live(&env, "after-forgery").await.is_some() },
    )
    .await;
    daemon.stop().await;
}

/// Any role may `NOTIFY` the channel. A flood of notifications that bring nothing costs a bounded
/// number of outbox reads (after a run of empty ones, the next is heeded only after a gap), and a
/// change made during the flood is still applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_notifications_costs_bounded_reads_and_hides_no_change() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let polls = || async { daemon.stats().await["cdc"]["polls"].as_u64().unwrap() };
    let before = polls().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..3)
        .map(|_| {
            let (stop, url) = (stop.clone(), env.db_url.clone());
            tokio::spawn(async move {
                let pg = cacheward::store::pg::connect(&url.parse().unwrap())
                    .await
                    .unwrap();
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    pg.batch_execute("NOTIFY cacheward_users").await.unwrap();
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // A real change in the middle of it.
    env.pg()
        .await
        .execute(
            "INSERT INTO users (username) VALUES ('amid-the-flood')",
            &[],
        )
        .await
        .unwrap();
    wait_until("the change is applied", Duration::from_secs(5), || async {
        env.cached("amid-the-flood")
            .await
            .is_some_and(|v| cacheward::model::entry::is_live(&v))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for flooder in flooders {
        sent += flooder.await.unwrap();
    }
    let reads = polls().await - before;
    assert!(sent > 2000, "the flood was a flood: {sent} notifications");
    // About 2 s at one read per 50 ms at most, plus the runs before each gap and the change.
    assert!(
        reads < 300,
        "{sent} notifications cost {reads} outbox reads"
    );
    daemon.stop().await;
}

/// A full batch (batches of one change here), or a notification during an apply, has the next
/// batch read while Redis applies the last. With a declared table configured, a batch of users'
/// changes leaves that read's transaction open for the next batch to end: a stream longer than a
/// lease renewal, drained batch after batch, loses nothing, moves the cursor to its end, and never
/// fails the session (a renewal or a store sent inside that read-only transaction would: `cannot
/// execute UPDATE in a read-only transaction`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_read_a_batch_ahead_loses_nothing_and_keeps_its_session() {
    let env = TestEnv::start().await;
    let mut config = Subject::Orders.prepare(&env, env.config()).await;
    config.cdc.batch_size = 1;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    Subject::Orders.served(&mut c).await;
    let names: Vec<String> = (0..8).map(|i| format!("ahead{i}")).collect();
    for name in &names {
        c.call("put", json!({"username": name})).await;
    }
    // Two sessions changing users faster than batches of one drain them, for two lease renewals.
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (url, names) = (env.db_url.clone(), names.clone());
            tokio::spawn(async move {
                let pg = cacheward::store::pg::connect(&url.parse().unwrap())
                    .await
                    .unwrap();
                let started = Instant::now();
                let mut changes = 0usize;
                while started.elapsed() < Duration::from_millis(2200) {
                    let name = &names[(changes * 2 + w) % names.len()];
                    pg.execute(
                        "UPDATE users SET created_at = created_at - interval '1 second' WHERE username = $1",
                        &[name],
                    )
                    .await
                    .unwrap();
                    changes += 1;
                }
                changes
            })
        })
        .collect();
    let mut changes = 0;
    for writer in writers {
        changes += writer.await.unwrap();
    }
    assert!(changes > 1000, "a stream: {changes} changes");
    let last = last_outbox_id(&env).await;
    wait_until(
        "the cursor at the stream's end",
        Duration::from_secs(10),
        || async { daemon.health().await["cdc"]["cursor"].as_i64() == Some(last) },
    )
    .await;
    assert!(env.agrees(&names).await, "every change applied");
    let cdc = &daemon.stats().await["cdc"];
    assert_eq!(
        cdc["reconnects"],
        json!(0),
        "the session never failed: {cdc}"
    );
    daemon.stop().await;
}
