//! Least privilege (docs/reference.md, "Database schema"; Guarantee 8): programs that write `users` need no right on
//! cacheward's objects and cannot forge its change stream; `serve` and `verify` run as a role with
//! only the grants of `sql/roles.sql`; outbox rows that the capture trigger cannot have written
//! (forged by a role that may insert there) never stop the stream or fence the cache off.

mod common;

use std::time::Duration;

use common::{kind, wait_until, TestEnv};
use serde_json::json;
use tokio_postgres::error::SqlState;

const ROLES: &str = include_str!("../sql/roles.sql");

/// A client of the test database logged in as `role`.
async fn connect_as(env: &TestEnv, role: &str) -> tokio_postgres::Client {
    let url = env.db_url.replacen("postgres@", &format!("{role}@"), 1);
    cacheward::store::pg::connect(&url.parse().expect("url"))
        .await
        .expect("connect")
}

async fn live(env: &TestEnv, name: &str) -> bool {
    env.cached(name)
        .await
        .is_some_and(|v| cacheward::model::entry::is_live(&v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_need_no_rights_on_cacheward_and_the_daemon_runs_as_the_runtime_role() {
    let env = TestEnv::start().await;
    env.pg()
        .await
        .batch_execute(ROLES)
        .await
        .expect("roles.sql");
    let mut config = env.config();
    let runtime_url = env.db_url.replacen("postgres@", "cacheward_runtime@", 1);
    config.postgres.url = Some(cacheward::config::SecretUrl::new(runtime_url.clone()));
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    assert_eq!(kind(&c.call("put", json!({"username": "rt"})).await), "");
    assert_eq!(
        kind(
            &c.call("rename", json!({"username": "rt", "new_username": "rt2"}))
                .await
        ),
        ""
    );
    assert_eq!(c.get("rt2").await["result"]["source"], json!("cache"));

    // A writer changes users with plain SQL: every change reaches Redis.
    let writer = connect_as(&env, "cacheward_writer").await;
    writer
        .batch_execute(
            "INSERT INTO users (username) VALUES ('w1'), ('w2');
             UPDATE users SET username = 'w3' WHERE username = 'w2';
             DELETE FROM users WHERE username = 'rt2';",
        )
        .await
        .expect("a writer writes users");
    wait_until(
        "the writer's changes reached Redis",
        Duration::from_secs(5),
        || async { live(&env, "w1").await && live(&env, "w3").await && !live(&env, "rt2").await },
    )
    .await;
    assert_eq!(kind(&c.get("rt2").await), "not_found");
    writer
        .batch_execute("TRUNCATE users")
        .await
        .expect("a writer truncates");
    wait_until(
        "the TRUNCATE reached Redis",
        Duration::from_secs(5),
        || async { !live(&env, "w1").await },
    )
    .await;

    // ... and may touch nothing of cacheward's.
    for statement in [
        "INSERT INTO cacheward_outbox (op, version) VALUES ('truncate', 9223372036854775000)",
        "DELETE FROM cacheward_outbox",
        "UPDATE cacheward_cdc_settings SET notify = false",
        "INSERT INTO cacheward_cdc_cursors (consumer, position) VALUES ('x', 0)",
        "SELECT nextval('cacheward_version_seq')",
        "SELECT setval('cacheward_version_seq', 9223372036854775000)",
        "SELECT * FROM cacheward_migrations",
        "SELECT cacheward_capture()",
    ] {
        let e = writer.batch_execute(statement).await.expect_err(statement);
        assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{statement}: {e}"
        );
    }
    // The runtime role has no DDL.
    let runtime = connect_as(&env, "cacheward_runtime").await;
    for statement in [
        "ALTER TABLE users ADD COLUMN x int",
        "DROP TABLE cacheward_outbox",
        "CREATE TABLE cacheward_x (a int)",
    ] {
        let e = runtime.batch_execute(statement).await.expect_err(statement);
        assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{statement}: {e}"
        );
    }

    // verify runs as the runtime role.
    let out = std::process::Command::new(common::BIN)
        .arg("verify")
        .current_dir(env.dir.path())
        .env("DATABASE_URL", &runtime_url)
        .env("REDIS_URL", &env.redis_url)
        .output()
        .unwrap();
    assert!(out.status.success(), "verify as the runtime role: {out:?}");
    daemon.stop().await;
}

/// Outbox rows the trigger cannot have written: an id past the identity's last value, a version
/// newer than the sequence ever drew (a TRUNCATE that would fence every entry off for good), an
/// infinite timestamp, an unknown op. Each is skipped; the changes after them are applied and the
/// cache is neither dropped nor fenced off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_outbox_rows_neither_stop_the_stream_nor_fence_the_cache_off() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    assert_eq!(kind(&c.call("put", json!({"username": "kept"})).await), "");
    let pg = env.pg().await;
    pg.batch_execute(
        "INSERT INTO cacheward_outbox (op, version) VALUES ('truncate', 4611686018427387904);
         INSERT INTO cacheward_outbox (op, username, version, changed_at)
             VALUES ('update', 'kept', 1, 'infinity'), ('update', 'kept', 1, '-infinity');
         INSERT INTO cacheward_outbox (op, username, version) VALUES ('bogus', 'kept', 1);
         INSERT INTO cacheward_outbox (op, version) VALUES ('delete', 1);
         INSERT INTO cacheward_outbox (id, op, version) OVERRIDING SYSTEM VALUE
             VALUES (9223372036854775807, 'truncate', 1);",
    )
    .await
    .unwrap();
    pg.execute("INSERT INTO users (username) VALUES ('after-forgery')", &[])
        .await
        .unwrap();
    wait_until(
        "a change after the forged rows is applied",
        Duration::from_secs(5),
        || async { live(&env, "after-forgery").await },
    )
    .await;
    assert!(
        live(&env, "kept").await,
        "the forged TRUNCATE dropped nothing"
    );
    let mut conn = env.redis().await;
    let fence: i64 = redis::cmd("GET")
        .arg("user:")
        .query_async::<String>(&mut conn)
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        fence < 1_000_000,
        "the fence was raised by a forged version: {fence}"
    );
    // A daemon starting afresh on this outbox does not jump to the forged id either.
    daemon.stop().await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
    let daemon = env.start_daemon(env.config()).await;
    pg.execute("INSERT INTO users (username) VALUES ('after-restart')", &[])
        .await
        .unwrap();
    wait_until(
        "applied after a fresh start",
        Duration::from_secs(5),
        || async { live(&env, "after-restart").await },
    )
    .await;
    let position = daemon.health().await["cdc"]["cursor"].as_i64().unwrap();
    assert!(
        position < 1_000_000,
        "the cursor jumped to a forged id: {position}"
    );
    daemon.stop().await;
}
