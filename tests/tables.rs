//! Declared tables in the database (docs/reference.md, "Declared tables"): `cacheward migrate`
//! installs each table's capture without changing the table, the capture records every change with
//! a version that grows per key and the old values of changed lookups, writers need no right on
//! anything of cacheward's, every check at start names the table and the key, and
//! `migrate --prune` drops what is no longer declared.

mod common;

use std::process::Command;

use cacheward::config::Config;
use cacheward::model::table::KeyType;
use cacheward::store::pg::capture;
use cacheward::store::pg::tables::{self, TableError};
use common::{DaemonProcess, TestEnv};
use serde_json::json;
use std::time::Duration;

const SCHEMA: &str = "
    CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, plan text,
                           secret text);
    CREATE TABLE orders (region text NOT NULL, id integer NOT NULL, note text,
                         PRIMARY KEY (region, id));
    CREATE TABLE loose (id integer, email text UNIQUE, at timestamptz NOT NULL UNIQUE,
                        code uuid NOT NULL UNIQUE);
    CREATE VIEW accounts_view AS SELECT * FROM accounts;";

const DECLARED: &str = r#"
[tables.accounts]
key = ["id"]
lookups = { by_email = ["email"] }
exclude = ["secret"]

[tables.orders]
source = "public.orders"
key = ["region", "id"]
"#;

/// The environment with the application's tables made.
async fn start() -> TestEnv {
    let env = TestEnv::start().await;
    env.pg().await.batch_execute(SCHEMA).await.expect("schema");
    env
}

/// Runs `cacheward migrate` with `toml` as the configuration; returns what it printed.
fn migrate(env: &TestEnv, toml: &str, args: &[&str]) -> String {
    let file = env.dir.path().join("tables.toml");
    std::fs::write(&file, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cacheward"))
        .arg("migrate")
        .args(args)
        .arg("--config")
        .arg(&file)
        .env("DATABASE_URL", &env.db_url)
        .output()
        .expect("run cacheward migrate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "migrate failed: {text}");
    text
}

fn config(env: &TestEnv, toml: &str) -> Config {
    let file = env.dir.path().join("check.toml");
    std::fs::write(&file, toml).unwrap();
    let overrides = cacheward::config::Overrides {
        file: Some(file),
        ..Default::default()
    };
    let mut config =
        Config::load_from(&overrides, &Default::default(), env.dir.path()).expect("config loads");
    config.postgres.url = env.config().postgres.url;
    config
}

/// Every column of the application's tables, as information_schema describes them.
async fn columns(env: &TestEnv) -> Vec<String> {
    env.pg()
        .await
        .query(
            "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
                    || ' ' || coalesce(column_default, '-')
             FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name IN ('accounts', 'orders', 'loose')
             ORDER BY table_name, ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_installs_each_capture_once_and_changes_no_application_table() {
    let env = start().await;
    let before = columns(&env).await;
    let said = migrate(&env, DECLARED, &[]);
    assert!(
        said.contains("installed the capture of: accounts, orders"),
        "{said}"
    );
    assert_eq!(
        columns(&env).await,
        before,
        "migrate changed an application table"
    );
    let pg = env.pg().await;
    pg.batch_execute("INSERT INTO accounts VALUES (1, 'a@x', 'free', 's')")
        .await
        .unwrap();
    let star = pg.query_one("SELECT * FROM accounts", &[]).await.unwrap();
    assert_eq!(star.len(), 4, "SELECT * returns what it did");
    // Again: nothing left to do.
    let said = migrate(&env, DECLARED, &[]);
    assert!(!said.contains("installed"), "{said}");
    // A table added to the configuration: just its capture.
    let more = format!("{DECLARED}\n[tables.loose]\nkey = [\"code\"]\n");
    let said = migrate(&env, &more, &[]);
    assert!(said.contains("installed the capture of: loose"), "{said}");
    for table in tables::resolve_all(&pg, &config(&env, &more))
        .await
        .unwrap()
    {
        capture::installed(&pg, &table).await.unwrap();
    }
    assert_eq!(columns(&env).await, before);
}

/// (op, tbl, row_key, old_key, old_lookups, version) of every outbox row of a declared table.
async fn changes(
    env: &TestEnv,
) -> Vec<(
    String,
    String,
    Option<Vec<String>>,
    Option<Vec<String>>,
    Option<serde_json::Value>,
    i64,
)> {
    env.pg()
        .await
        .query(
            "SELECT op, tbl, row_key, old_key, old_lookups, version FROM cacheward_outbox
             WHERE tbl IS NOT NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

async fn version_of(env: &TestEnv, tbl: &str, key: &[&str]) -> Option<i64> {
    let key: Vec<String> = key.iter().map(|k| k.to_string()).collect();
    env.pg()
        .await
        .query_opt(
            "SELECT version FROM cacheward_row_versions WHERE tbl = $1 AND key = $2",
            &[&tbl, &key],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_captured_with_a_growing_version_by_a_writer_without_rights() {
    let env = start().await;
    migrate(&env, DECLARED, &[]);
    let pg = env.pg().await;
    pg.batch_execute(include_str!("../sql/roles.sql"))
        .await
        .unwrap();
    pg.batch_execute("GRANT ALL ON accounts, orders TO cacheward_writer")
        .await
        .unwrap();
    let writer_url = env.db_url.replacen("postgres@", "cacheward_writer@", 1);
    let writer = cacheward::store::pg::connect(&writer_url.parse().unwrap())
        .await
        .unwrap();
    let k = |s: &str| Some(vec![s.to_owned()]);
    writer
        .batch_execute(
            "INSERT INTO accounts VALUES (1, 'a@x', 'free', 's'), (2, 'b@x', 'pro', 's');
             INSERT INTO orders VALUES ('e:u=1', 7, 'n');
             UPDATE accounts SET plan = 'pro' WHERE id = 1;
             UPDATE accounts SET email = 'c@x' WHERE id = 2;
             UPDATE accounts SET id = 3 WHERE id = 1;
             UPDATE accounts SET plan = 'none' WHERE false;
             DELETE FROM accounts WHERE id = 2;
             TRUNCATE orders;",
        )
        .await
        .expect("a writer with rights on its tables only");
    let seen = changes(&env).await;
    let shape: Vec<_> = seen
        .iter()
        .map(|(op, tbl, key, old, lookups, _)| {
            (
                op.as_str(),
                tbl.as_str(),
                key.clone(),
                old.clone(),
                lookups.clone(),
            )
        })
        .collect();
    let by = |e: &str| Some(json!({ "by_email": [e] }));
    assert_eq!(
        shape,
        vec![
            ("insert", "accounts", k("1"), None, None),
            ("insert", "accounts", k("2"), None, None),
            (
                "insert",
                "orders",
                Some(vec!["e:u=1".into(), "7".into()]),
                None,
                None
            ),
            // Nothing a lookup holds changed.
            ("update", "accounts", k("1"), None, Some(json!({}))),
            // The old email's lookup key is named.
            ("update", "accounts", k("2"), None, by("b@x")),
            // A changed key: the new key lives, the old one and its lookups are gone.
            ("update", "accounts", k("3"), None, None),
            ("update", "accounts", None, k("1"), by("a@x")),
            ("delete", "accounts", None, k("2"), by("c@x")),
            ("truncate", "orders", None, None, None),
        ],
        "{seen:?}"
    );
    let versions: Vec<i64> = seen.iter().map(|c| c.5).collect();
    assert!(
        versions[..8].windows(2).all(|w| w[0] < w[1]),
        "versions grow: {versions:?}"
    );
    // The side table keeps each live key's latest version, and forgets gone keys.
    assert_eq!(
        version_of(&env, "accounts", &["3"]).await,
        Some(versions[5])
    );
    assert_eq!(version_of(&env, "accounts", &["1"]).await, None);
    assert_eq!(version_of(&env, "accounts", &["2"]).await, None);
    assert_eq!(
        version_of(&env, "orders", &["e:u=1", "7"]).await,
        None,
        "truncated"
    );
    // The writer can neither read nor forge cacheward's tables.
    for sql in [
        "SELECT * FROM cacheward_row_versions",
        "INSERT INTO cacheward_outbox (op, tbl, version) VALUES ('truncate', 'accounts', 1)",
    ] {
        assert!(writer.batch_execute(sql).await.is_err(), "{sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_at_start_names_the_table_and_the_key() {
    let env = start().await;
    let pg = env.pg().await;
    let cases = [
        ("source = \"nowhere\"\nkey = [\"id\"]", "tables.t.source"),
        (
            "source = \"accounts_view\"\nkey = [\"id\"]",
            "tables.t.source",
        ),
        ("source = \"accounts\"\nkey = [\"plan\"]", "tables.t.key"),
        ("source = \"accounts\"\nkey = [\"nope\"]", "tables.t.key"),
        ("source = \"loose\"\nkey = [\"email\"]", "tables.t.key"),
        ("source = \"loose\"\nkey = [\"id\"]", "tables.t.key"),
        (
            "source = \"accounts\"\nkey = [\"id\"]\nlookups = { by_plan = [\"plan\"] }",
            "tables.t.lookups.by_plan",
        ),
        (
            "source = \"accounts\"\nkey = [\"id\"]\nexclude = [\"nope\"]",
            "tables.t.exclude",
        ),
        (
            "source = \"accounts\"\nkey = [\"id\"]\ncolumns = [\"id\", \"nope\"]",
            "tables.t.columns",
        ),
        ("source = \"orders\"\nkey = [\"id\"]", "tables.t.key"),
        // Unique and NOT NULL, but a timestamp's text is not canonical (it follows TimeZone).
        ("source = \"loose\"\nkey = [\"at\"]", "tables.t.key"),
    ];
    for (section, key) in cases {
        let c = config(&env, &format!("[tables.t]\n{section}\n"));
        let error = tables::resolve_all(&pg, &c)
            .await
            .expect_err(section)
            .to_string();
        assert!(
            error.starts_with("table t: ") && error.contains(&format!("`{key}`")),
            "{section}: {error}"
        );
    }
    // Declared but not migrated: the check names `cacheward migrate`.
    let c = config(&env, DECLARED);
    let declared = tables::resolve_all(&pg, &c).await.unwrap();
    let error = capture::installed(&pg, &declared[0]).await.unwrap_err();
    assert!(matches!(error, TableError::NotInstalled { .. }), "{error}");
    assert!(error.to_string().contains("cacheward migrate"), "{error}");
    migrate(&env, DECLARED, &[]);
    capture::installed(&pg, &declared[0]).await.unwrap();
    // A lookup declared after the capture was made: the capture is outdated until migrate.
    let fewer = DECLARED.replace("lookups = { by_email = [\"email\"] }", "");
    let c = config(&env, &fewer);
    let changed = tables::resolve_all(&pg, &c).await.unwrap();
    let error = capture::installed(&pg, &changed[0])
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("key and lookups as declared now"), "{error}");
    // A trigger gone (dropped by hand), disabled, or made to fire in replica sessions only (the
    // application's writes pass it by): not installed either, until migrate puts it back.
    for broken in [
        "DROP TRIGGER cacheward_accounts_update ON accounts",
        "ALTER TABLE accounts DISABLE TRIGGER cacheward_accounts_update",
        "ALTER TABLE accounts ENABLE REPLICA TRIGGER cacheward_accounts_update",
    ] {
        pg.batch_execute(broken).await.unwrap();
        let error = capture::installed(&pg, &declared[0])
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("3 of its 4 triggers"), "{broken}: {error}");
        migrate(&env, DECLARED, &[]);
        capture::installed(&pg, &declared[0]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_of_tables_no_longer_declared_stay_until_prune() {
    let env = start().await;
    migrate(&env, DECLARED, &[]);
    let only_orders = "[tables.orders]\nkey = [\"region\", \"id\"]\n";
    let said = migrate(&env, only_orders, &[]);
    assert!(
        said.contains("left in place") && said.contains("accounts"),
        "{said}"
    );
    let pg = env.pg().await;
    let triggers = |table: &'static str| {
        let pg = &pg;
        async move {
            pg.query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname LIKE 'cacheward%'",
                &[&table],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    assert_eq!(triggers("accounts").await, 4);
    let said = migrate(&env, only_orders, &["--prune"]);
    assert!(said.contains("dropped the capture of: accounts"), "{said}");
    assert_eq!(triggers("accounts").await, 0);
    assert_eq!(triggers("orders").await, 4);
    pg.batch_execute("INSERT INTO accounts VALUES (9, 'z@x', 'free', 's')")
        .await
        .unwrap();
    assert!(
        changes(&env).await.is_empty(),
        "no capture left on accounts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_texts_computed_in_rust_are_postgresqls_own() {
    let env = start().await;
    let pg = env.pg().await;
    let cases: &[(KeyType, &str, serde_json::Value)] = &[
        (KeyType::Int8, "bigint", json!(" -0042 ")),
        (KeyType::Int8, "bigint", json!("+7")),
        (KeyType::Int4, "integer", json!(2147483647)),
        (KeyType::Int2, "smallint", json!("-32768")),
        (
            KeyType::Uuid,
            "uuid",
            json!("{A0EEBC99-9C0B4EF8-BB6D6BB9-BD380A11}"),
        ),
        (
            KeyType::Uuid,
            "uuid",
            json!("a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11"),
        ),
        (KeyType::Text, "text", json!(" a:b=c% ")),
    ];
    for (kind, sql_type, value) in cases {
        let ours = kind.canonical(value).unwrap();
        let direct: String = pg
            .query_one(
                &format!("SELECT ($1::text)::{sql_type}::text"),
                &[&value
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| value.to_string())],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(ours, direct, "{value} as {sql_type}");
    }
    for (kind, sql_type, value) in [
        (KeyType::Int4, "integer", "2147483648"),
        (KeyType::Uuid, "uuid", "a0e-ebc999c0b4ef8bb6d6bb9bd380a11"),
        (KeyType::Uuid, "uuid", "a0eebc999c0b4ef8bb6d6bb9bd380a11-"),
    ] {
        assert!(kind.canonical(&json!(value)).is_err(), "{value}");
        let theirs = pg
            .query_one(&format!("SELECT ($1::text)::{sql_type}::text"), &[&value])
            .await;
        assert!(theirs.is_err(), "PostgreSQL takes {value} as {sql_type}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stops_on_a_table_it_cannot_serve_naming_it_and_what_to_run() {
    let env = start().await;
    // The daemon reads config/cacheward.toml under its working directory.
    std::fs::create_dir_all(env.dir.path().join("config")).unwrap();
    std::fs::write(env.dir.path().join("config/cacheward.toml"), DECLARED).unwrap();
    let mut daemon = DaemonProcess::spawn(&env, "unmigrated");
    let status = daemon.wait_exit(Duration::from_secs(20));
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains("a declared table cannot be served")
            && logs.contains("table accounts")
            && logs.contains("cacheward migrate"),
        "{logs}"
    );
    migrate(&env, DECLARED, &[]);
    let mut daemon = DaemonProcess::spawn(&env, "migrated");
    daemon.wait_ready().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "{}",
        daemon.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_does_not_declare_a_captured_table_says_it_passes_its_changes_over() {
    let env = start().await;
    migrate(&env, DECLARED, &[]);
    // This daemon declares no table (no config file in its directory), and applies the stream.
    let daemon = DaemonProcess::spawn(&env, "undeclared");
    daemon.wait_ready().await;
    env.pg()
        .await
        .batch_execute("INSERT INTO accounts VALUES (5, 'e@x', 'free', 's')")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !daemon
        .logs()
        .contains("cdc passes over changes of a table this daemon does not declare")
    {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        daemon.logs().contains("table=accounts"),
        "{}",
        daemon.logs()
    );
}
