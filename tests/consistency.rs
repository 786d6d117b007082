//! The guarantees that make the cache trustworthy, with the races driven on purpose: no stale
//! fill (guarantee 3), one query per cold key (guarantee 6), and the schema's versions.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cacheward::service::hooks::{FillHook, Hooks};
use common::subject::Subject;
use common::{hold_fills, kind, wait_until, Rpc, TestEnv};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_read_before_a_delete_and_reinsert_cannot_overwrite_the_new_row() {
    fill_before_delete_and_reinsert(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_table_s_fill_that_read_before_a_delete_and_reinsert_cannot_overwrite_the_new_row(
) {
    fill_before_delete_and_reinsert(Subject::Orders).await;
}

async fn fill_before_delete_and_reinsert(subject: Subject) {
    let env = TestEnv::start().await;
    let config = subject.prepare(&env, env.config()).await;
    env.pg()
        .await
        .execute(&subject.insert_sql(&["racer"]), &[])
        .await
        .unwrap();
    let old = subject.row_json(&env, "racer").await.unwrap();
    let (hooks, mut reached, go) = hold_fills(Some(&subject.key_text("racer")));
    let daemon = env.start_daemon_with(config, hooks).await;
    let mut writer = daemon.client().await;
    subject.served(&mut writer).await;

    // Reader: misses, reads the old row, and is held before writing Redis.
    let socket = daemon.socket.clone();
    let reader = tokio::spawn(async move {
        Rpc::connect(&socket)
            .await
            .call("get", subject.params("racer"))
            .await
    });
    reached.recv().await.expect("fill reached the pause");

    // Meanwhile the row is deleted and a new one takes its key.
    assert!(subject.delete(&mut writer, "racer").await);
    subject.put(&mut writer, &["racer"]).await;
    let new = subject.row_json(&env, "racer").await.unwrap();
    assert_ne!(new, old);

    // Now the stale fill runs.
    go.add_permits(1);
    let stale_read = reader.await.unwrap();
    assert_eq!(
        subject.answered(&stale_read),
        old,
        "the paused read answers what it read"
    );

    assert_eq!(
        subject.live(&env, "racer").await,
        Some(new.clone()),
        "the newer row survives the late fill"
    );
    assert_eq!(
        daemon.stats().await["stale_writes_refused"],
        json!(1),
        "the refused fill is counted"
    );
    let again = writer.call("get", subject.params("racer")).await;
    assert_eq!(
        (subject.answered(&again), &again["result"]["source"]),
        (new, &json!("cache"))
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_read_before_a_rename_cannot_resurrect_the_old_name() {
    fill_before_rename(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_table_s_fill_that_read_before_a_key_change_cannot_resurrect_the_old_key() {
    fill_before_rename(Subject::Orders).await;
}

async fn fill_before_rename(subject: Subject) {
    let env = TestEnv::start().await;
    let config = subject.prepare(&env, env.config()).await;
    env.pg()
        .await
        .execute(&subject.insert_sql(&["before"]), &[])
        .await
        .unwrap();
    let (hooks, mut reached, go) = hold_fills(Some(&subject.key_text("before")));
    let daemon = env.start_daemon_with(config, hooks).await;
    let mut writer = daemon.client().await;
    subject.served(&mut writer).await;

    let socket = daemon.socket.clone();
    let reader = tokio::spawn(async move {
        Rpc::connect(&socket)
            .await
            .call("get", subject.params("before"))
            .await
    });
    reached.recv().await.expect("fill reached the pause");
    subject.rename(&mut writer, "before", "after").await;
    go.add_permits(1);
    reader.await.unwrap();

    let raw = subject
        .cached(&env, "before")
        .await
        .expect("a tombstone is left");
    assert!(
        !cacheward::model::entry::is_live(&raw),
        "old key must not be live again: {raw}"
    );
    assert_eq!(
        kind(&writer.call("get", subject.params("before")).await),
        "not_found"
    );
    assert_eq!(
        writer.call("get", subject.params("after")).await["result"]["source"],
        json!("cache")
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_gets_share_one_database_query() {
    let env = TestEnv::start().await;
    let pg = env.pg().await;
    pg.execute("INSERT INTO users (username) VALUES ('herd')", &[])
        .await
        .unwrap();
    let daemon = env.start_daemon(env.config()).await;
    pg.execute("SELECT pg_stat_statements_reset()", &[])
        .await
        .unwrap();

    // Hold the table so the first select blocks, and every other get piles up behind it.
    let lock = env.lock_users().await;

    const CONNECTIONS: usize = 10;
    const PER_CONNECTION: usize = 20;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut c = daemon.client().await;
        let mut batch = Vec::new();
        for i in 0..PER_CONNECTION {
            batch.extend(
                serde_json::to_vec(
                    &json!({"jsonrpc":"2.0","id":i,"method":"get","params":{"username":"herd"}}),
                )
                .unwrap(),
            );
            batch.push(b'\n');
        }
        c.send_raw(&batch).await;
        clients.push(c);
    }
    wait_until(
        "all 200 gets missed the cache",
        Duration::from_secs(10),
        || async {
            daemon.stats().await["cache_misses"].as_u64()
                == Some((CONNECTIONS * PER_CONNECTION) as u64)
        },
    )
    .await;
    lock.release().await;

    let mut users = Vec::new();
    for c in &mut clients {
        for _ in 0..PER_CONNECTION {
            let r = c.recv().await;
            assert_eq!(r["result"]["source"], json!("db"), "{r}");
            users.push(r["result"]["user"].clone());
        }
    }
    let calls: i64 = pg
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND query LIKE 'SELECT u.*, row_to_json(u)::text FROM users u WHERE u.username = %'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(calls, 1, "200 concurrent cold gets ran the select once");
    let row = env.row_json("herd").await.unwrap();
    assert!(users.iter().all(|u| *u == row));
    assert_eq!(daemon.stats().await["db_queries"], json!(1));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_that_queue_behind_a_running_read_are_read_in_one_query() {
    let env = TestEnv::start().await;
    let pg = env.pg().await;
    pg.execute(
        "INSERT INTO users (username) SELECT 'cold' || g FROM generate_series(1, 10) g",
        &[],
    )
    .await
    .unwrap();
    let mut config = env.config();
    config.postgres.pool_size = 4; // one loader
    let daemon = env.start_daemon(config).await;

    // The first read blocks on the lock; the other nine misses queue behind it.
    let lock = env.lock_users().await;
    let mut readers = Vec::new();
    for i in 1..=10 {
        let socket = daemon.socket.clone();
        readers.push(tokio::spawn(async move {
            Rpc::connect(&socket).await.get(&format!("cold{i}")).await
        }));
    }
    wait_until("all ten gets missed", Duration::from_secs(10), || async {
        daemon.stats().await["cache_misses"].as_u64() == Some(10)
    })
    .await;
    lock.release().await;
    for (i, reader) in readers.into_iter().enumerate() {
        let answer = reader.await.unwrap();
        assert_eq!(answer["result"]["source"], json!("db"), "{answer}");
        assert_eq!(
            answer["result"]["user"],
            env.row_json(&format!("cold{}", i + 1)).await.unwrap()
        );
    }
    let queries = daemon.stats().await["db_queries"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&queries),
        "ten cold gets, one loader: the read in progress and one batch, got {queries} queries"
    );
    for i in 1..=10 {
        let cached = env.cached(&format!("cold{i}")).await.expect("filled");
        assert!(cacheward::model::entry::is_live(&cached));
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_plain_sql_keeps_working() {
    let env = TestEnv::start().await;
    let mut pg = env.pg().await;
    assert_eq!(
        cacheward::store::pg::migrate(&mut pg).await.unwrap(),
        Vec::<i32>::new(),
        "second run applies nothing"
    );
    let recorded: i64 = pg
        .query_one("SELECT count(*) FROM cacheward_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded as usize, cacheward::store::pg::MIGRATIONS.len());

    pg.execute("INSERT INTO users (username) VALUES ('x')", &[])
        .await
        .unwrap();
    let v1 = version_of(&pg, "x").await.unwrap();
    pg.execute("UPDATE users SET username = 'y' WHERE username = 'x'", &[])
        .await
        .unwrap();
    let v2 = version_of(&pg, "y").await.unwrap();
    assert!(v2 > v1, "an update bumps the version");
    pg.execute("DELETE FROM users WHERE username = 'y'", &[])
        .await
        .unwrap();
    pg.execute("INSERT INTO users (username, version) VALUES ('y', 1)", &[])
        .await
        .unwrap();
    let v3 = version_of(&pg, "y").await.unwrap();
    assert!(
        v3 > v2,
        "a re-inserted name gets a larger version, whatever the INSERT says"
    );
}

async fn version_of(pg: &tokio_postgres::Client, name: &str) -> Option<i64> {
    pg.query_opt("SELECT version FROM users WHERE username = $1", &[&name])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_missed_just_before_a_fill_does_not_query_again() {
    let env = TestEnv::start().await;
    let pg = env.pg().await;
    pg.execute("INSERT INTO users (username) VALUES ('late')", &[])
        .await
        .unwrap();
    // The first get pauses before its fill; the second pauses between its miss and joining.
    let (fill_hooks, mut fill_reached, fill_go) = hold_fills(Some("late"));
    let (miss_tx, mut miss_reached) = mpsc::channel(1);
    let miss_go = Arc::new(Semaphore::new(0));
    let misses = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let after_miss: FillHook = {
        let (miss_go, misses) = (miss_go.clone(), misses.clone());
        Arc::new(move |_name: String| {
            let (reached, go, misses) = (miss_tx.clone(), miss_go.clone(), misses.clone());
            Box::pin(async move {
                if misses.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    reached.send(()).await.expect("test is waiting");
                    go.acquire().await.expect("never closed").forget();
                }
            })
        })
    };
    let hooks = Hooks {
        after_miss: Some(after_miss),
        ..fill_hooks
    };
    let daemon = env.start_daemon_with(env.config(), hooks).await;
    pg.execute("SELECT pg_stat_statements_reset()", &[])
        .await
        .unwrap();

    let socket = daemon.socket.clone();
    let first = tokio::spawn(async move { Rpc::connect(&socket).await.get("late").await });
    fill_reached.recv().await.expect("first get read the row");
    let socket = daemon.socket.clone();
    let second = tokio::spawn(async move { Rpc::connect(&socket).await.get("late").await });
    miss_reached
        .recv()
        .await
        .expect("second get missed the cache");
    // Two permits: a broken single flight would start a second fill, and must fail the
    // assertions below rather than hang.
    fill_go.add_permits(2);
    assert_eq!(first.await.unwrap()["result"]["source"], json!("db"));
    miss_go.add_permits(1);
    let late = second.await.unwrap();
    assert_eq!(
        late["result"]["source"],
        json!("cache"),
        "read the fill instead: {late}"
    );
    assert_eq!(daemon.stats().await["db_queries"], json!(1));
    daemon.stop().await;
}

/// A get sent after a miss was answered finds the fill in Redis, even while other connections
/// keep Redis pipelines in flight: the fill is queued ahead of the read and pipelines reach Redis
/// in queue order. A fill sent on another path (or pipelines racing) lets a second get miss and
/// query the database again; this load catches that in some runs, not in every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_after_a_miss_is_answered_reads_the_fill_while_redis_is_busy() {
    const NAMES: usize = 200;
    let env = TestEnv::start().await;
    let pg = env.pg().await;
    pg.execute(
        &format!(
            "INSERT INTO users (username) SELECT 'busy' || g FROM generate_series(1, {NAMES}) g"
        ),
        &[],
    )
    .await
    .unwrap();
    pg.execute("INSERT INTO users (username) VALUES ('hot')", &[])
        .await
        .unwrap();
    let daemon = env.start_daemon(env.config()).await;
    daemon.client().await.get("hot").await;

    // Background readers keep request-path pipelines going the whole time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (socket, stop) = (daemon.socket.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut c = Rpc::connect(&socket).await;
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(c.get("hot").await["result"]["source"], json!("cache"));
                reads += 1;
            }
            reads
        }));
    }
    let queries_before = daemon.stats().await["db_queries"].as_u64().unwrap();
    let (mut first, mut second) = (daemon.client().await, daemon.client().await);
    for i in 1..=NAMES {
        let name = format!("busy{i}");
        assert_eq!(first.get(&name).await["result"]["source"], json!("db"));
        let again = second.get(&name).await;
        assert_eq!(again["result"]["source"], json!("cache"), "{name}: {again}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        assert!(task.await.unwrap() > 0, "the background readers ran");
    }
    let queries = daemon.stats().await["db_queries"].as_u64().unwrap() - queries_before;
    assert_eq!(queries, NAMES as u64, "one database read per name");
    daemon.stop().await;
}

/// The versioned write script tells a stale write (refused) from one whose version is live there
/// already (nothing to do): only the first is counted as a stale write refused, so a write-through
/// that the CDC worker beat to Redis with the same row is not reported as a race the version
/// check saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_script_tells_stale_writes_from_ones_already_there() {
    use cacheward::model::entry::Write;
    use cacheward::model::key::Key;
    use cacheward::store::redis::{Cache, Outcome};
    let env = TestEnv::start().await;
    let cache = Cache::new(&env.config()).unwrap();
    cache.claim(1).await.unwrap();
    let live = |version: i64| Write::Live {
        key: Key::user("v"),
        version,
        json: format!(r#"{{"id":1,"username":"v","version":{version}}}"#),
        read_at: 1,
    };
    let tombstone = |version: i64| Write::tombstone(Key::user("v"), version);
    for (write, expected) in [
        (live(5), Outcome::Applied),
        (live(5), Outcome::Current),
        (live(4), Outcome::Refused),
        (tombstone(5), Outcome::Applied),
        (live(5), Outcome::Refused),
        (live(6), Outcome::Applied),
    ] {
        let outcome = cache.apply(std::slice::from_ref(&write)).await.unwrap();
        assert_eq!(outcome, vec![expected], "{write:?}");
    }

    // Through the daemon: a second put of an existing user writes the version already there.
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    for created in [true, false] {
        let put = c.call("put", json!({"username": "twice"})).await;
        assert_eq!(put["result"]["created"], json!(created), "{put}");
    }
    assert_eq!(daemon.stats().await["stale_writes_refused"], json!(0));
    daemon.stop().await;
}
