//! Declared tables served (docs/reference.md, "Declared tables"): `get` by key and by lookup,
//! cache-aside; `upsert`, `update` and `delete` write-through, with PostgreSQL's own conversions
//! and errors; out-of-band INSERT, UPDATE (of a lookup, of the key), DELETE and TRUNCATE reach
//! the cached entries through the change stream; a TRUNCATE of one table leaves the others'.

mod common;

use std::time::{Duration, Instant};

use cacheward::config::{Config, TableConfig};
use cacheward::store::pg::{capture, tables};
use common::{kind, Rpc, TestEnv};
use serde_json::{json, Value};

const SCHEMA: &str = "
    CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, plan text,
                           secret text, created_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE orders (region text NOT NULL, id integer NOT NULL, note text,
                         PRIMARY KEY (region, id));
    CREATE TABLE wide (id uuid PRIMARY KEY, n numeric, f double precision, m money, j jsonb,
                       b bytea, i interval, t timestamptz, ts timestamp, a int[], r int4range,
                       x text);";

fn declared(config: &mut Config) {
    let accounts = TableConfig {
        exclude: vec!["secret".into()],
        ..TableConfig::keyed(&["id"]).lookup("by_email", &["email"])
    };
    config.tables.insert("accounts".into(), accounts);
    let orders = TableConfig::keyed(&["region", "id"]);
    config.tables.insert("orders".into(), orders.clone());
    let wide = TableConfig {
        ttl_secs: Some(77),
        ..TableConfig::keyed(&["id"])
    };
    config.tables.insert("wide".into(), wide);
    let frozen = TableConfig {
        source: Some("orders".into()),
        writable: false,
        ..orders
    };
    config.tables.insert("frozen".into(), frozen);
}

/// Servers, the tables made and captured, a daemon serving them.
async fn start() -> (TestEnv, common::Daemon, Config) {
    start_with(|_| {}).await
}

/// [`start`], the daemon's configuration adjusted by `adjust`.
async fn start_with(adjust: impl FnOnce(&mut Config)) -> (TestEnv, common::Daemon, Config) {
    let env = TestEnv::start().await;
    let mut config = env.config();
    declared(&mut config);
    adjust(&mut config);
    let mut pg = env.pg().await;
    pg.batch_execute(SCHEMA).await.unwrap();
    let checked = tables::resolve_all(&pg, &config).await.unwrap();
    capture::install(&mut pg, &checked).await.unwrap();
    pg.batch_execute(
        "INSERT INTO accounts (id, email, plan, secret) VALUES (1, 'a@x', 'free', 's1'), (2, 'b@x', 'pro', 's2');
         INSERT INTO orders VALUES ('e:u=1', 7, 'n7'), ('w', 8, 'n8');",
    )
    .await
    .unwrap();
    let daemon = env.start_daemon(config.clone()).await;
    let mut client = daemon.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    // Unavailable until the daemon has checked each table against the catalog (one by one).
    let probes = [
        json!({"table": "accounts", "key": {"id": 1}}),
        json!({"table": "frozen", "key": {"region": "w", "id": 8}}),
        json!({"table": "orders", "key": {"region": "w", "id": 8}}),
        json!({"table": "wide", "key": {"id": "00000000-0000-0000-0000-000000000000"}}),
    ];
    for probe in probes {
        while kind(&get(&mut client, probe.clone()).await) == "unavailable" {
            assert!(Instant::now() < deadline, "{probe} was never checked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (env, daemon, config)
}

async fn get(client: &mut Rpc, params: Value) -> Value {
    client.call("get", params).await
}

/// Gets each of `params` twice: each row is then in Redis and in the near cache.
async fn warm(client: &mut Rpc, params: &[&Value]) {
    for _ in 0..2 {
        for p in params {
            row(client, (*p).clone()).await.unwrap();
        }
    }
}

/// The row a get answered, or its error kind.
async fn row(client: &mut Rpc, params: Value) -> Result<(Value, String), String> {
    let answer = get(client, params).await;
    match answer.get("result") {
        Some(result) => Ok((
            result["row"].clone(),
            result["source"].as_str().unwrap().to_owned(),
        )),
        None => Err(kind(&answer).to_owned()),
    }
}

/// Whether one get of `params` was answered from the near cache (its hits rose by one).
async fn near_hit(client: &mut Rpc, params: &Value) -> bool {
    let hits = |stats: Value| stats["result"]["near_cache"]["hits"].as_u64().unwrap();
    let before = hits(client.call("stats", json!({})).await);
    let answer = client.call("get", params.clone()).await;
    assert!(answer.get("result").is_some(), "{answer}");
    hits(client.call("stats", json!({})).await) == before + 1
}

async fn cached(env: &TestEnv, key: &str) -> Option<Value> {
    let mut conn = env.redis().await;
    let value: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    value.map(|v| serde_json::from_str(&v).unwrap())
}

/// The text Redis holds at `key`.
async fn cached_text(env: &TestEnv, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut env.redis().await)
        .await
        .unwrap()
}

/// Waits until `get` answers `want` (a row's `plan`, or an error kind) for `params`.
async fn converges(client: &mut Rpc, params: Value, want: Result<&str, &str>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = row(client, params.clone()).await;
        let done = match (&got, want) {
            (Ok((row, _)), Ok(plan)) => {
                plan == "__any__" || row["plan"] == json!(plan) || row["note"] == json!(plan)
            }
            (Err(kind), Err(wanted)) => kind == wanted,
            _ => false,
        };
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{params} never answered {want:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_read_through_the_cache_by_key_and_by_lookup() {
    let (env, daemon, _) = start().await;
    let mut client = daemon.client().await;
    let by_key = json!({"table": "accounts", "key": {"id": "2"}});
    let (row2, source) = row(&mut client, by_key.clone()).await.unwrap();
    assert_eq!(source, "db");
    assert_eq!(row2["email"], "b@x");
    assert!(
        row2.get("secret").is_none(),
        "an excluded column is never served: {row2}"
    );
    let stamp = row2["created_at"].as_str().unwrap();
    assert!(stamp.ends_with('Z') && stamp.len() == 27, "{stamp}");
    let (again, source) = row(&mut client, by_key).await.unwrap();
    assert_eq!((again, source.as_str()), (row2.clone(), "cache"));
    let entry = cached(&env, "accounts:2").await.expect("filled");
    assert_eq!(entry["row"], row2);
    assert!(entry["version"].is_i64());
    // By lookup: its own entry, a copy carrying the row's version.
    let by_email = json!({"table": "accounts", "lookup": "by_email", "key": {"email": "b@x"}});
    assert_eq!(row(&mut client, by_email.clone()).await.unwrap().1, "db");
    assert_eq!(
        row(&mut client, by_email).await.unwrap(),
        (row2, "cache".into())
    );
    assert_eq!(
        cached(&env, "accounts:by_email=b@x").await.unwrap()["version"],
        entry["version"]
    );
    let stats = daemon.stats().await;
    let counted = &stats["tables"]["accounts"];
    assert_eq!(
        (
            counted["cache_hits"].as_u64(),
            counted["cache_misses"].as_u64()
        ),
        (Some(2), Some(3)),
        "{stats}"
    );
    // A composite key with `:` and `=` in its text.
    let order = json!({"table": "orders", "key": {"region": "e:u=1", "id": 7}});
    assert_eq!(
        row(&mut client, order.clone()).await.unwrap().0["note"],
        "n7"
    );
    assert_eq!(row(&mut client, order).await.unwrap().1, "cache");
    assert!(cached(&env, "orders:e%3Au%3D1:7").await.is_some());
    // Misses and bad requests.
    for (params, wanted) in [
        (json!({"table": "accounts", "key": {"id": 99}}), "not_found"),
        (json!({"table": "nope", "key": {"id": 1}}), "invalid_params"),
        (
            json!({"table": "accounts", "key": {"id": "x"}}),
            "invalid_params",
        ),
        (
            json!({"table": "accounts", "key": {"email": "a@x"}}),
            "invalid_params",
        ),
        (
            json!({"table": "accounts", "lookup": "by_nothing", "key": {"id": 1}}),
            "invalid_params",
        ),
        (json!({"table": "accounts"}), "invalid_params"),
    ] {
        assert_eq!(
            row(&mut client, params.clone()).await,
            Err(wanted.into()),
            "{params}"
        );
    }
    let answer = get(
        &mut client,
        json!({"table": "accounts", "key": {"id": "x"}}),
    )
    .await;
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"id\""),
        "the column is named: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_band_changes_reach_every_cached_key_of_the_row() {
    let (env, daemon, _) = start().await;
    let mut client = daemon.client().await;
    let id1 = json!({"table": "accounts", "key": {"id": 1}});
    let email_a = json!({"table": "accounts", "lookup": "by_email", "key": {"email": "a@x"}});
    let email_c = json!({"table": "accounts", "lookup": "by_email", "key": {"email": "c@x"}});
    warm(&mut client, &[&id1, &email_a]).await;
    assert_eq!(row(&mut client, email_a.clone()).await.unwrap().1, "cache");
    let pg = env.pg().await;
    // A plain update: both the key's and the lookup's entries follow.
    pg.batch_execute("UPDATE accounts SET plan = 'pro' WHERE id = 1")
        .await
        .unwrap();
    converges(&mut client, id1.clone(), Ok("pro")).await;
    converges(&mut client, email_a.clone(), Ok("pro")).await;
    // The lookup's value changes: the old lookup key names no row any more.
    pg.batch_execute("UPDATE accounts SET email = 'c@x' WHERE id = 1")
        .await
        .unwrap();
    converges(&mut client, email_a.clone(), Err("not_found")).await;
    converges(&mut client, email_c.clone(), Ok("pro")).await;
    // The key changes: the old key is gone, the new one serves the row.
    pg.batch_execute("UPDATE accounts SET id = 11 WHERE id = 1")
        .await
        .unwrap();
    converges(&mut client, id1.clone(), Err("not_found")).await;
    converges(
        &mut client,
        json!({"table": "accounts", "key": {"id": 11}}),
        Ok("pro"),
    )
    .await;
    // An insert of a key a tombstone covers, then a delete.
    pg.batch_execute("INSERT INTO accounts (id, email, plan) VALUES (1, 'a@x', 'new')")
        .await
        .unwrap();
    converges(&mut client, id1.clone(), Ok("new")).await;
    converges(&mut client, email_a.clone(), Ok("new")).await;
    pg.batch_execute("DELETE FROM accounts WHERE id = 1")
        .await
        .unwrap();
    converges(&mut client, id1.clone(), Err("not_found")).await;
    converges(&mut client, email_a, Err("not_found")).await;
    // Settled: nothing stale in Redis either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let entry = cached(&env, "accounts:1").await;
    assert!(
        entry.as_ref().is_none_or(|e| e.get("tombstone").is_some()),
        "{entry:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_of_one_table_drops_only_its_entries() {
    let (env, daemon, _) = start().await;
    let mut client = daemon.client().await;
    let order = json!({"table": "orders", "key": {"region": "w", "id": 8}});
    let account = json!({"table": "accounts", "key": {"id": 2}});
    let user = json!({"username": "keeper"});
    client.call("put", user.clone()).await;
    warm(&mut client, &[&order, &account]).await;
    client.call("get", user.clone()).await;
    let fence = |key: &'static str| {
        let env = &env;
        async move {
            let value: Option<String> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut env.redis().await)
                .await
                .unwrap();
            value.map(|v| v.parse::<i64>().unwrap())
        }
    };
    let shared = fence("user:").await.expect("users' fence");
    // Held in the near cache, all three: a read of each is a near hit.
    for params in [&order, &account, &user] {
        let mut held = false;
        for _ in 0..50 {
            if near_hit(&mut client, params).await {
                held = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(held, "{params} never held in the near cache");
    }
    let near_before = client.call("stats", json!({})).await["result"]["near_cache"].clone();
    let pg = env.pg().await;
    pg.batch_execute("TRUNCATE orders").await.unwrap();
    converges(&mut client, order.clone(), Err("not_found")).await;
    // The near cache dropped the table's entries only: users' and accounts' are still held.
    for params in [&account, &user] {
        assert!(near_hit(&mut client, params).await, "{params} dropped");
    }
    let near = client.call("stats", json!({})).await["result"]["near_cache"].clone();
    assert_eq!(near["flushes"], near_before["flushes"], "{near}");
    // Both tables whose source is `orders` (it and `frozen`), before and after each drop.
    assert_eq!(
        near["table_flushes"].as_u64().unwrap(),
        near_before["table_flushes"].as_u64().unwrap() + 4,
        "{near}"
    );
    // Only the table's own fence rose: fills of users and of other tables are not refused.
    assert!(fence("orders:\0fence").await.is_some_and(|f| f > shared));
    assert_eq!(fence("user:").await, Some(shared), "users' fence untouched");
    assert_eq!(
        row(&mut client, account).await.unwrap().1,
        "cache",
        "accounts kept"
    );
    let answer = client.call("get", user).await;
    assert_eq!(answer["result"]["source"], "cache", "users kept: {answer}");
    // Rows inserted after the TRUNCATE are cached again.
    pg.batch_execute("INSERT INTO orders VALUES ('w', 8, 'again')")
        .await
        .unwrap();
    converges(&mut client, order.clone(), Ok("again")).await;
    row(&mut client, order.clone()).await.unwrap();
    assert_eq!(row(&mut client, order).await.unwrap().1, "cache");
}

/// A declared table's own fence forged (above anything the version sequence drew, or not a
/// number) is found at the monitor's next look and set anew, as users' is: it would otherwise
/// refuse every write of the table for good, and the table would be read from PostgreSQL only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_table_fence_is_found_and_set_anew() {
    let (env, daemon, _) = start().await;
    let mut client = daemon.client().await;
    let order = json!({"table": "orders", "key": {"region": "w", "id": 8}});
    let pg = env.pg().await;
    for (round, forgery) in ["9223372036854775807", "notanumber"]
        .into_iter()
        .enumerate()
    {
        warm(&mut client, &[&order]).await;
        env.redis_set("orders:\0fence", forgery).await;
        let note = format!("forged {round}");
        pg.execute(
            "UPDATE orders SET note = $1 WHERE region = 'w' AND id = 8",
            &[&note],
        )
        .await
        .unwrap();
        converges(&mut client, order.clone(), Ok(&note)).await;
        let what = format!("{forgery}: the fence set anew, the row cached again");
        common::wait_until(&what, Duration::from_secs(5), || async {
            let fence = cached_text(&env, "orders:\0fence").await;
            let set_anew = fence
                .as_deref()
                .and_then(|f| f.parse::<i64>().ok())
                .is_some_and(|f| f < i64::MAX);
            let mut client = daemon.client().await;
            let (row, source) = row(&mut client, order.clone()).await.unwrap();
            set_anew && source == "cache" && row["note"] == json!(note)
        })
        .await;
    }
}

/// Redis values are input like any other: an entry written around the daemon with members beside
/// `version` and `row` (here a `source` of its own) is served as its row and version, and the
/// answer holds `row`, `version` and `source` once each, whether it comes from Redis or from the
/// near cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_written_around_the_daemon_beside_a_row_never_reach_the_answer() {
    let (env, daemon, _) = start().await;
    let mut client = daemon.client().await;
    let account = json!({"table": "accounts", "key": {"id": 1}});
    warm(&mut client, &[&account]).await;
    let entry = cached(&env, "accounts:1").await.unwrap();
    let forged = format!(
        r#"{{"version":{},"row":{},"source":"db","x":{{"y":1}}}}"#,
        entry["version"], entry["row"]
    );
    env.redis_set("accounts:1", &forged).await;
    // The near cache hears of the SET (tracking) well within this.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "get", "params": account});
    for read in ["from redis", "from the near cache"] {
        client.send(&request).await;
        let line = client.recv_line().await;
        let answer: Value = serde_json::from_str(&line).unwrap();
        let result = answer["result"].as_object().unwrap();
        let members: Vec<&str> = result.keys().map(String::as_str).collect();
        assert_eq!(members, ["row", "version", "source"], "{read}: {line}");
        assert_eq!(line.matches(r#""source""#).count(), 1, "{read}: {line}");
        assert_eq!(result["row"], entry["row"], "{read}: {line}");
        assert_eq!(result["source"], "cache", "{read}: {line}");
    }
}

/// Outbox rows are input like any other: one forged with a key its table's columns cannot hold,
/// a key array no key can be (a NULL part, two dimensions) or lookups nested past any JSON
/// parser's depth is skipped (and said), and costs neither its batch (the row changed beside it is applied) nor
/// its table (served on, from the cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_key_in_the_outbox_is_skipped_and_its_batch_applied() {
    // No consistency checker: it would repair what a stopped stream left stale.
    let (env, daemon, _) = start_with(|c| c.consistency.sample_per_sec = 0).await;
    let mut client = daemon.client().await;
    let order = json!({"table": "orders", "key": {"region": "w", "id": 8}});
    warm(&mut client, &[&order]).await;
    let pg = env.pg().await;
    pg.batch_execute(
        "BEGIN;
         INSERT INTO cacheward_outbox (op, tbl, row_key, version)
             VALUES ('update', 'orders', ARRAY['w', 'not a number'], 1),
                    ('update', 'orders', ARRAY['w', '99999999999'], 1),
                    ('update', 'orders', ARRAY['w', ' 8'], 1),
                    ('update', 'orders', ARRAY['w', NULL], 1),
                    ('update', 'orders', '{{w,8},{w,9}}'::text[], 1);
         INSERT INTO cacheward_outbox (op, tbl, row_key, old_lookups, version)
             VALUES ('update', 'orders', ARRAY['w', '8'],
                     (repeat('[', 300) || repeat(']', 300))::jsonb, 1);
         UPDATE orders SET note = 'after' WHERE region = 'w' AND id = 8;
         COMMIT;",
    )
    .await
    .unwrap();
    converges(&mut client, order.clone(), Ok("after")).await;
    // Its table was never taken for unreadable, nor the stream started over.
    let stats = daemon.stats().await;
    assert_eq!(stats["cdc"]["reconnects"], 0, "{stats}");
    row(&mut client, order.clone()).await.unwrap();
    assert_eq!(row(&mut client, order.clone()).await.unwrap().1, "cache");
    // The stream goes on past them: the next change is applied too.
    pg.batch_execute("UPDATE orders SET note = 'later' WHERE region = 'w' AND id = 8")
        .await
        .unwrap();
    converges(&mut client, order.clone(), Ok("later")).await;
    assert_eq!(row(&mut client, order).await.unwrap().1, "cache");
    assert_eq!(daemon.health().await["cdc"]["listening"], json!(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_through_postgresql_then_redis_with_postgresqls_errors() {
    let (env, daemon, _) = start().await;
    let mut client = daemon.client().await;
    let result = |answer: &Value| answer["result"].clone();
    // Created: the entry is cached at once, with the version the answer carries.
    let made = client
        .call(
            "upsert",
            json!({"table": "accounts", "row": {"id": 5, "email": "e@x", "plan": "free"}}),
        )
        .await;
    assert_eq!(result(&made)["created"], true, "{made}");
    let version = result(&made)["version"].as_i64().unwrap();
    assert!(version > 0);
    let (got, source) = row(&mut client, json!({"table": "accounts", "key": {"id": 5}}))
        .await
        .unwrap();
    assert_eq!(
        (got["plan"].as_str(), source.as_str()),
        (Some("free"), "cache")
    );
    assert_eq!(
        cached(&env, "accounts:by_email=e@x").await.unwrap()["version"],
        version
    );
    // Again: the given columns change, the others stay. (As INSERT … ON CONFLICT has it, the
    // row given must satisfy NOT NULL even when it updates.)
    let again = client
        .call(
            "upsert",
            json!({"table": "accounts", "row": {"id": 5, "email": "e@x", "plan": "pro"}}),
        )
        .await;
    assert_eq!(result(&again)["created"], false, "{again}");
    assert_eq!(result(&again)["row"]["plan"], "pro");
    assert_eq!(
        result(&again)["row"]["created_at"],
        result(&made)["row"]["created_at"]
    );
    assert!(result(&again)["version"].as_i64().unwrap() > version);
    // Update of the key and of a lookup: the old ones name no row at once.
    let moved = client
        .call(
            "update",
            json!({"table": "accounts", "key": {"id": 5}, "set": {"id": 6, "email": "f@x"}}),
        )
        .await;
    assert_eq!(result(&moved)["row"]["id"], 6, "{moved}");
    let newest = result(&moved)["version"].as_i64().unwrap();
    for (params, wanted) in [
        (
            json!({"table": "accounts", "key": {"id": 5}}),
            Err("not_found".to_owned()),
        ),
        (
            json!({"table": "accounts", "lookup": "by_email", "key": {"email": "e@x"}}),
            Err("not_found".to_owned()),
        ),
    ] {
        assert_eq!(
            row(&mut client, params).await.map(|_| ()),
            wanted.map(|_: String| ())
        );
    }
    let read = get(&mut client, json!({"table": "accounts", "lookup": "by_email", "key": {"email": "f@x"}, "min_version": newest})).await;
    assert_eq!(result(&read)["row"]["id"], 6, "{read}");
    assert!(result(&read)["version"].as_i64().unwrap() >= newest);
    // PostgreSQL's conversions and errors, each naming what was wrong.
    let cases = [
        (
            "upsert",
            json!({"table": "accounts", "row": {"id": 7, "email": "g@x", "created_at": "not a time"}}),
            "invalid_params",
            "created_at",
        ),
        (
            "upsert",
            json!({"table": "accounts", "row": {"id": 7}}),
            "invalid_params",
            "email",
        ),
        (
            "upsert",
            json!({"table": "accounts", "row": {"id": 7, "email": "b@x"}}),
            "conflict",
            "accounts",
        ),
        (
            "upsert",
            json!({"table": "accounts", "row": {"id": 7, "email": "g@x", "secret": "s"}}),
            "invalid_params",
            "secret",
        ),
        (
            "upsert",
            json!({"table": "accounts", "row": {"email": "g@x"}}),
            "invalid_params",
            "id",
        ),
        (
            "update",
            json!({"table": "accounts", "key": {"id": 99}, "set": {"plan": "x"}}),
            "not_found",
            "accounts",
        ),
        (
            "update",
            json!({"table": "accounts", "key": {"id": 6}, "set": {"plan": "p", "id": "six"}}),
            "invalid_params",
            "\"id\"",
        ),
        (
            "upsert",
            json!({"table": "frozen", "row": {"region": "w", "id": 1}}),
            "forbidden",
            "frozen",
        ),
        (
            "delete",
            json!({"table": "frozen", "key": {"region": "w", "id": 8}}),
            "forbidden",
            "frozen",
        ),
    ];
    for (method, params, wanted, named) in cases {
        let answer = client.call(method, params.clone()).await;
        assert_eq!(kind(&answer), wanted, "{method} {params}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{method} {params}: {message}");
    }
    // A value PostgreSQL converts: any form it accepts.
    let converted = client
        .call("upsert", json!({"table": "accounts", "row": {"id": "7", "email": "g@x", "created_at": "2025-01-02 03:04:05+02"}}))
        .await;
    assert_eq!(
        result(&converted)["row"]["created_at"],
        "2025-01-02T01:04:05.000000Z",
        "{converted}"
    );
    // Delete: the row and its lookup are gone from the cache at once.
    let gone = client
        .call("delete", json!({"table": "accounts", "key": {"id": 6}}))
        .await;
    assert_eq!(result(&gone)["deleted"], true, "{gone}");
    assert!(result(&gone)["version"].as_i64().unwrap() > newest);
    assert_eq!(
        row(&mut client, json!({"table": "accounts", "key": {"id": 6}})).await,
        Err("not_found".into())
    );
    assert_eq!(
        row(
            &mut client,
            json!({"table": "accounts", "lookup": "by_email", "key": {"email": "f@x"}})
        )
        .await,
        Err("not_found".into())
    );
    let again = client
        .call("delete", json!({"table": "accounts", "key": {"id": 6}}))
        .await;
    assert_eq!(result(&again), json!({"deleted": false, "version": 0}));
    let stats = daemon.stats().await;
    assert!(
        stats["tables"]["accounts"]["writes"].as_u64() >= Some(5),
        "{stats}"
    );
    // The frozen table still reads.
    assert!(row(
        &mut client,
        json!({"table": "frozen", "key": {"region": "w", "id": 8}})
    )
    .await
    .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_legal_value_is_served_as_postgresql_renders_it_and_wide_rows_are_not_cached() {
    let (env, daemon, _) = start().await;
    let mut client = daemon.client().await;
    let pg = env.pg().await;
    let huge = "y".repeat(2 * 1024 * 1024);
    pg.execute(
        "INSERT INTO wide VALUES
           ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'NaN', '-Infinity', '-92233720368547758.08',
            '{\"deep\": [[[1]]], \"n\": 1e300}', '\\x00ff', '1 year 2 mons -3 days',
            'infinity', '2025-11-02 01:43:23.0386', '{1,NULL,3}', '[1,5)', 'small'),
           ('b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 1e-300, 'NaN', 0, 'null', '', '0', '-infinity',
            '0044-03-15 12:00:00 BC', '{}', 'empty', $1)",
        &[&huge],
    )
    .await
    .unwrap();
    // PostgreSQL's own JSON of the row, timestamps normalized as USER's are.
    let expected = |id: &'static str| {
        let pg = &pg;
        async move {
            let text: String = pg
                .query_one(
                    "SELECT row_to_json(w)::text FROM wide w WHERE id = $1::text::uuid",
                    &[&id],
                )
                .await
                .unwrap()
                .get(0);
            let mut value: Value = serde_json::from_str(&text).unwrap();
            value["ts"] = match id.starts_with('a') {
                true => json!("2025-11-02T01:43:23.038600Z"),
                false => value["ts"].clone(),
            };
            value
        }
    };
    let small = json!({"table": "wide", "key": {"id": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"}});
    let (got, source) = row(&mut client, small.clone()).await.unwrap();
    assert_eq!(source, "db");
    assert_eq!(got, expected("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").await);
    assert_eq!(row(&mut client, small).await.unwrap().1, "cache");
    // Its table's TTL.
    let mut conn = env.redis().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg("wide:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=77).contains(&ttl), "{ttl}");
    let ttl: i64 = redis::cmd("TTL")
        .arg("accounts:1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 77, "accounts keep cache.ttl_secs: {ttl}");
    // Over cache.max_entry_bytes: served, never cached, counted.
    let big = json!({"table": "wide", "key": {"id": "b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}});
    for _ in 0..2 {
        let (got, source) = row(&mut client, big.clone()).await.unwrap();
        assert_eq!(source, "db");
        assert_eq!(got["x"].as_str().map(str::len), Some(huge.len()));
        assert_eq!(got, expected("b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").await);
    }
    let held = cached(&env, "wide:b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").await;
    assert!(
        held.as_ref().is_none_or(|v| v.get("tombstone").is_some()),
        "never a live entry: {held:?}"
    );
    assert!(daemon.stats().await["rows_too_large"].as_u64() >= Some(2));
    // A change to it leaves nothing cached either.
    pg.batch_execute("UPDATE wide SET f = 1 WHERE x <> 'small'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = cached(&env, "wide:b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").await;
    assert!(
        left.as_ref().is_none_or(|v| v.get("tombstone").is_some()),
        "{left:?}"
    );
}

/// Runs the `cacheward` client with `args` against `socket`: its exit code and what it printed.
fn cli(socket: &std::path::Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cacheward"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the client");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let printed = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code(), printed, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_reads_and_writes_declared_tables_with_column_value_pairs() {
    let (_env, _daemon, config) = start().await;
    let socket = config.socket.path.as_path();
    let (code, printed, _) = cli(socket, &["get", "--table", "accounts", "id=1"]);
    assert_eq!(
        (code, printed["row"]["email"].as_str()),
        (Some(0), Some("a@x"))
    );
    let (code, printed, _) = cli(
        socket,
        &[
            "get",
            "--table",
            "accounts",
            "--lookup",
            "by_email",
            "email=a@x",
        ],
    );
    assert_eq!((code, printed["row"]["id"].as_i64()), (Some(0), Some(1)));
    let (code, printed, _) = cli(
        socket,
        &[
            "upsert",
            "--table",
            "orders",
            "region=e:u=2",
            "id=9",
            "note=new",
        ],
    );
    assert_eq!(
        (code, printed["created"].as_bool()),
        (Some(0), Some(true)),
        "{printed}"
    );
    let (code, printed, _) = cli(
        socket,
        &[
            "update",
            "--table",
            "orders",
            "region=e:u=2",
            "id=9",
            "--set",
            "note=changed",
        ],
    );
    assert_eq!(
        (code, printed["row"]["note"].as_str()),
        (Some(0), Some("changed"))
    );
    let (code, printed, _) = cli(
        socket,
        &["delete", "--table", "orders", "region=e:u=2", "id=9"],
    );
    assert_eq!((code, printed["deleted"].as_bool()), (Some(0), Some(true)));
    let (code, _, said) = cli(
        socket,
        &["get", "--table", "orders", "region=e:u=2", "id=9"],
    );
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("no row"), "{said}");
    let (code, _, said) = cli(socket, &["get", "--table", "accounts", "id"]);
    assert_eq!(code, Some(1));
    assert!(said.contains("COLUMN=VALUE"), "{said}");
    // Users as before.
    let (code, printed, _) = cli(socket, &["put", "ann"]);
    assert_eq!(
        (code, printed["user"]["username"].as_str()),
        (Some(0), Some("ann"))
    );
    let (code, _, said) = cli(socket, &["get", "ann", "bob"]);
    assert_eq!(code, Some(1), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_while_running_reach_the_cache_and_a_dropped_table_stalls_no_other() {
    let listen = format!("127.0.0.1:{}", cacheward::dev::free_port().unwrap());
    let metrics = listen.parse().unwrap();
    let (env, daemon, _) = start_with(|config| config.metrics.listen = Some(metrics)).await;
    // Whether the metrics say the table's changes are captured.
    let firing = |table: &'static str| {
        let listen = listen.clone();
        async move {
            let text = common::scrape(&listen, "/metrics").await;
            common::sample(
                &text,
                &format!("cacheward_capture_firing{{table=\"{table}\"}}"),
            )
        }
    };
    assert_eq!(firing("orders").await, 1.0);
    let mut client = daemon.client().await;
    let account = json!({"table": "accounts", "key": {"id": 2}});
    let order = json!({"table": "orders", "key": {"region": "w", "id": 8}});
    warm(&mut client, &[&account, &order]).await;
    assert_eq!(row(&mut client, account.clone()).await.unwrap().1, "cache");
    let pg = env.pg().await;
    // A column added: the cached entry of the old shape goes, the new column is served.
    pg.batch_execute("ALTER TABLE accounts ADD COLUMN region text NOT NULL DEFAULT 'eu'")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (got, _) = row(&mut client, account.clone()).await.unwrap();
        if got["region"] == "eu" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the added column never reached the cache: {got}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let entry = cached(&env, "accounts:2").await;
    assert!(
        entry
            .as_ref()
            .is_none_or(|e| e.get("tombstone").is_some() || e["row"]["region"] == "eu"),
        "no entry of the old shape: {entry:?}"
    );
    // The change stream reads the new shape too (its statement for the table prepared again).
    pg.batch_execute("UPDATE accounts SET region = 'us' WHERE id = 2")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let entry = cached(&env, "accounts:2").await;
        if entry.as_ref().is_some_and(|e| e["row"]["region"] == "us") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cdc never wrote the new shape: {entry:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A column dropped: never served again.
    pg.batch_execute("ALTER TABLE accounts DROP COLUMN plan")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (got, _) = row(&mut client, account.clone()).await.unwrap_or_default();
        if got.is_object() && got.get("plan").is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped column is still served: {got}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A capture trigger made to fire in replica sessions only: the application's changes would
    // pass the cache by, so the table is unavailable (never served stale) until it fires again.
    pg.batch_execute("ALTER TABLE orders ENABLE REPLICA TRIGGER cacheward_orders_update")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while row(&mut client, order.clone()).await != Err("unavailable".into()) {
        assert!(
            Instant::now() < deadline,
            "a table whose capture does not fire is still served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(firing("orders").await, 0.0);
    pg.batch_execute("ALTER TABLE orders ENABLE ALWAYS TRIGGER cacheward_orders_update")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while row(&mut client, order.clone()).await.is_err() {
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A table dropped: unavailable; the others go on, their changes applied.
    pg.batch_execute("DROP TABLE orders").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while row(&mut client, order.clone()).await != Err("unavailable".into()) {
        assert!(Instant::now() < deadline, "a dropped table is still served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(firing("orders").await, 0.0);
    assert_eq!(firing("accounts").await, 1.0);
    assert_eq!(firing("users").await, 1.0);
    pg.batch_execute("UPDATE accounts SET email = 'moved@x' WHERE id = 2")
        .await
        .unwrap();
    converges(
        &mut client,
        json!({"table": "accounts", "lookup": "by_email", "key": {"email": "moved@x"}}),
        Ok("__any__"),
    )
    .await;
    // Made again and captured again: served again.
    pg.batch_execute(SCHEMA.split(';').nth(1).unwrap())
        .await
        .unwrap();
    let mut config = env.config();
    declared(&mut config);
    let mut admin = env.pg().await;
    let checked = tables::resolve_all(&admin, &config).await.unwrap();
    capture::install(&mut admin, &checked).await.unwrap();
    pg.batch_execute("INSERT INTO orders VALUES ('w', 8, 'back')")
        .await
        .unwrap();
    converges(&mut client, order, Ok("back")).await;
    assert_eq!(firing("orders").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_compares_every_table_s_entries_and_lookups_with_their_rows() {
    let (env, daemon, _) = start().await;
    let mut client = daemon.client().await;
    for params in [
        json!({"table": "accounts", "key": {"id": 1}}),
        json!({"table": "accounts", "lookup": "by_email", "key": {"email": "b@x"}}),
        json!({"table": "orders", "key": {"region": "e:u=1", "id": 7}}),
    ] {
        row(&mut client, params).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let toml = "[tables.accounts]\nkey = [\"id\"]\nlookups = { by_email = [\"email\"] }\n\
                exclude = [\"secret\"]\n[tables.orders]\nkey = [\"region\", \"id\"]\n\
                [tables.wide]\nkey = [\"id\"]\nttl_secs = 77\n\
                [tables.frozen]\nsource = \"orders\"\nkey = [\"region\", \"id\"]\nwritable = false\n";
    let verify = || env.verify_tables(toml);
    let (code, said) = verify();
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("checked 5 cached entries: 0 mismatches"),
        "{said}"
    );
    // A lookup's copy made stale behind cacheward's back, and an entry for a row that is gone.
    let stale = r#"{"version":1,"row":{"id":2,"email":"b@x","plan":"old"}}"#;
    env.redis_set("accounts:by_email=b@x", stale).await;
    let ghost = r#"{"version":1,"row":{"region":"nowhere","id":1}}"#;
    env.redis_set("orders:nowhere:1", ghost).await;
    // And one under a key no row can have (`x` is no bigint): compared like any, not a failure.
    env.redis_set("orders:nowhere:x", ghost).await;
    let (code, said) = verify();
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("mismatch accounts:by_email=b@x"), "{said}");
    assert!(
        said.contains("mismatch orders:nowhere:1") && said.contains("(no row)"),
        "{said}"
    );
    assert!(said.contains("mismatch orders:nowhere:x"), "{said}");
    // `--repair` drops all three; the lookup then answers its row, and nothing is left to find.
    let (code, said) = env.verify_tables_with(toml, &["--repair"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("3 mismatches (3 repaired)"), "{said}");
    let by_email = json!({"table": "accounts", "lookup": "by_email", "key": {"email": "b@x"}});
    let (answer, _) = row(&mut client, by_email).await.unwrap();
    assert_eq!(answer["plan"], json!("pro"), "{answer}");
    let (code, said) = verify();
    assert_eq!(code, Some(0), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_checker_samples_declared_tables_and_reports_an_entry_that_stays_wrong() {
    let (env, daemon, _) = start_with(|config| {
        config.consistency.sample_per_sec = 200;
        config.consistency.window_ms = 300;
        // Every hit reads Redis: the wrong value written there is what gets sampled and served.
        config.cache.local_max_bytes = 0;
    })
    .await;
    let mut client = daemon.client().await;
    let (good, _) = row(
        &mut client,
        json!({"table": "orders", "key": {"region": "w", "id": 8}}),
    )
    .await
    .unwrap();
    let entry = cached(&env, "orders:w:8").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let quiet = daemon.stats().await["consistency"].clone();
    assert!(quiet["checked"].as_u64() >= Some(1), "{quiet}");
    assert_eq!(
        quiet["mismatched"], 0,
        "a correct entry is no mismatch: {quiet}"
    );
    // The same version, another row: written behind cacheward's back.
    let mut wrong = entry.clone();
    wrong["row"]["note"] = json!("tampered");
    let mut conn = env.redis().await;
    let () = redis::cmd("SET")
        .arg("orders:w:8")
        .arg(wrong.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    // Beside it, an entry under a key no row can have (`x` is no bigint), sampled with it: it
    // names no row (its read must not fail the look, and with it every key sampled beside it).
    let () = redis::cmd("SET")
        .arg("orders:w:x")
        .arg(entry.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = daemon.stats().await["consistency"].clone();
        if seen["mismatched"].as_u64() >= Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the wrong entries were never both reported: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both repaired: neither is served as it was written.
    let tampered = cached(&env, "orders:w:8").await;
    assert!(
        tampered.as_ref().is_none_or(|v| v["row"] != wrong["row"]),
        "{tampered:?}"
    );
    let junk = cached(&env, "orders:w:x").await;
    assert!(junk.as_ref().is_none_or(|v| v["row"].is_null()), "{junk:?}");
    assert_eq!(good["note"], "n8");
}

/// A text key may be empty: its entry is the table's prefix alone, an entry like any other (for
/// `users` the prefix alone is the fence, but usernames are never empty). A TRUNCATE drops it,
/// `verify` compares it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_text_key_is_an_entry_like_any_other() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config
        .tables
        .insert("tags".into(), TableConfig::keyed(&["name"]));
    let mut pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE tags (name text PRIMARY KEY, n integer NOT NULL);
         INSERT INTO tags VALUES ('', 1), ('a', 2);",
    )
    .await
    .unwrap();
    let checked = tables::resolve_all(&pg, &config).await.unwrap();
    capture::install(&mut pg, &checked).await.unwrap();
    let daemon = env.start_daemon(config).await;
    let mut client = daemon.client().await;
    let empty = json!({"table": "tags", "key": {"name": ""}});
    let deadline = Instant::now() + Duration::from_secs(10);
    while kind(&get(&mut client, empty.clone()).await) == "unavailable" {
        assert!(Instant::now() < deadline, "tags never checked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(row(&mut client, empty.clone()).await.unwrap().1, "cache");
    assert_eq!(
        cached(&env, "tags:").await,
        Some(json!({"version": 0, "row": {"name": "", "n": 1}}))
    );
    // verify sees it: made stale behind cacheward's back, it is a mismatch.
    let toml = "[tables.tags]\nkey = [\"name\"]\n";
    env.redis_set("tags:", r#"{"version":0,"row":{"name":"","n":99}}"#)
        .await;
    let (code, said) = env.verify_tables(toml);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("mismatch tags:"), "{said}");
    // A TRUNCATE drops it with the table's other entries.
    row(&mut client, json!({"table": "tags", "key": {"name": "a"}}))
        .await
        .unwrap();
    pg.batch_execute("TRUNCATE tags").await.unwrap();
    converges(&mut client, empty, Err("not_found")).await;
    let raw: Option<String> = redis::cmd("GET")
        .arg("tags:")
        .query_async(&mut env.redis().await)
        .await
        .unwrap();
    assert!(
        !raw.as_deref().is_some_and(cacheward::model::entry::is_live),
        "the empty key's entry survived the TRUNCATE: {raw:?}"
    );
}

/// A daemon that starts behind changes made while none ran applies them only once its tables are
/// checked: passed over (as a table not served), its rows would get tombstones at their keys and
/// their lookups' copies would stay as they were — a stale lookup answered until its TTL (the
/// declared soak found one after a daemon restart).
#[tokio::test]
async fn changes_read_before_the_tables_are_checked_wait_for_the_check_lookups_included() {
    let (env, daemon, config) = start().await;
    let mut client = daemon.client().await;
    let by_email = json!({"table": "accounts", "lookup": "by_email", "key": {"email": "a@x"}});
    warm(&mut client, &[&by_email]).await;
    assert_eq!(
        cached(&env, "accounts:by_email=a@x").await.unwrap()["row"]["plan"],
        "free"
    );
    drop(client);
    daemon.stop().await;
    env.pg()
        .await
        .batch_execute("UPDATE accounts SET plan = 'team' WHERE id = 1")
        .await
        .unwrap();
    // The next daemon's table check is held until released.
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let held = release.clone();
    let hooks = cacheward::service::Hooks {
        before_table_check: Some(std::sync::Arc::new(move |_| {
            let held = held.clone();
            Box::pin(async move {
                held.acquire().await.unwrap().forget();
            })
        })),
        ..Default::default()
    };
    let daemon = env.start_daemon_with(config, hooks).await;
    // The change stream runs meanwhile: it must not pass the change over, nor hold a
    // transaction open from one try to the next (its old snapshot would serve the next read,
    // whose version horizon is newer than the rows it reads, and hold back vacuum meanwhile).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let held_open: i64 = env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE application_name = 'cacheward-cdc'
                AND xact_start < now() - interval '300 milliseconds'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held_open, 0, "the change stream kept a transaction open");
    release.add_permits(1_000_000);
    let mut client = daemon.client().await;
    converges(&mut client, by_email.clone(), Ok("team")).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while cached(&env, "accounts:by_email=a@x")
        .await
        .is_some_and(|entry| entry["row"]["plan"] != "team")
    {
        assert!(Instant::now() < deadline, "the lookup's copy stayed stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
}

/// Runs `cacheward ARGS` with `env` (and nothing of the test's own CACHEWARD_/URL variables):
/// its exit code and what it printed.
fn cacheward(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cacheward"));
    command.args(args).env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("CACHEWARD__") || key == "DATABASE_URL" || key == "REDIS_URL" {
            command.env_remove(key);
        }
    }
    let out = command.envs(env.iter().copied()).output().expect("run");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), said)
}

#[tokio::test]
async fn check_names_every_wrong_section_and_what_the_backends_lack() {
    let env = TestEnv::start().await;
    let dir = env.dir.path();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    // Two wrong sections: both named, exit 1.
    let bad = file(
        "bad.toml",
        "[socket]\nmax_connections = 0\n[cdc]\nbatch_size = 0\n",
    );
    let typos = file(
        "typos.toml",
        "[socket]\nmax_conections = 1\n[cahce]\nttl_secs = 1\n",
    );
    let (code, said) = cacheward(&["check", "--config", &typos], &[]);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("`socket.max_conections`") && said.contains("`cahce`"),
        "{said}"
    );
    let (code, said) = cacheward(&["check", "--config", &bad], &[]);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("socket.max_connections") && said.contains("cdc.batch_size"),
        "{said}"
    );
    // A right one: exit 0, without reaching anything.
    let good = file("good.toml", "[tables.things]\nkey = [\"id\"]\n");
    let (code, said) = cacheward(&["check", "--config", &good], &[]);
    assert_eq!((code, said.trim()), (Some(0), "config: ok"));
    // A database nothing was installed in: the migrations are named, with what to run.
    env.pg()
        .await
        .batch_execute("CREATE DATABASE check_fresh")
        .await
        .unwrap();
    let (base, query) = env.db_url.split_once('?').unwrap();
    let fresh = format!("{}/check_fresh?{query}", base.rsplit_once('/').unwrap().0);
    let backends = [
        ("DATABASE_URL", fresh.as_str()),
        ("REDIS_URL", env.redis_url.as_str()),
    ];
    let (code, said) = cacheward(&["check", "--connect", "--config", &good], &backends);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("migrations not applied: 1 (users)") && said.contains("cacheward migrate"),
        "{said}"
    );
    assert!(
        said.contains("postgres: reached") && said.contains("reached"),
        "{said}"
    );
    // Migrated, with the declared table's capture: nothing to say but what holds.
    let (fresh_pg, connection) = tokio_postgres::connect(&fresh, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    fresh_pg
        .batch_execute("CREATE TABLE things (id bigint PRIMARY KEY, n integer)")
        .await
        .unwrap();
    let (code, said) = cacheward(&["check", "--connect", "--config", &good], &backends);
    assert_eq!(code, Some(1), "{said}");
    let (code, migrated) = cacheward(&["migrate", "--config", &good], &backends);
    assert_eq!(code, Some(0), "{migrated}");
    let (code, said) = cacheward(&["check", "--connect", "--config", &good], &backends);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("table things: capture installed"), "{said}");
    assert!(said.contains("users' capture installed"), "{said}");
    assert!(said.contains("has the rights the daemon needs"), "{said}");
    // A capture trigger disabled (the table's capture is not installed: `migrate` installs it
    // again), another enabled the default way (it would not fire in a replica session: named
    // with the statement that puts it right, which does).
    fresh_pg
        .batch_execute(
            "ALTER TABLE things DISABLE TRIGGER cacheward_things_update;
             ALTER TABLE users ENABLE TRIGGER cacheward_capture_insert;",
        )
        .await
        .unwrap();
    let (code, said) = cacheward(&["check", "--connect", "--config", &good], &backends);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("table things: its capture is not installed (3 of its 4 triggers are there and firing): run `cacheward migrate`"),
        "{said}"
    );
    let fix = "postgres: users' capture: trigger cacheward_capture_insert on users does not fire in replica sessions (session_replication_role = replica): ALTER TABLE users ENABLE ALWAYS TRIGGER cacheward_capture_insert";
    assert!(said.contains(fix), "{said}");
    let statement = fix.rsplit_once(": ").unwrap().1;
    fresh_pg.batch_execute(statement).await.unwrap();
    let (code, migrated) = cacheward(&["migrate", "--config", &good], &backends);
    assert_eq!(code, Some(0), "{migrated}");
    let (code, said) = cacheward(&["check", "--connect", "--config", &good], &backends);
    assert_eq!(code, Some(0), "{said}");
    // Captures installed before migration 7 fired in origin sessions only: it makes them fire
    // always, users' and every declared table's.
    fresh_pg
        .batch_execute(
            "ALTER TABLE things ENABLE TRIGGER cacheward_things_insert, ENABLE TRIGGER cacheward_things_truncate;
             ALTER TABLE users ENABLE TRIGGER cacheward_users_version;
             DELETE FROM cacheward_migrations WHERE version = 7;",
        )
        .await
        .unwrap();
    let (code, said) = cacheward(&["check", "--connect", "--config", &good], &backends);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("migrations not applied: 7"), "{said}");
    let (code, migrated) = cacheward(&["migrate", "--config", &good], &backends);
    assert_eq!(code, Some(0), "{migrated}");
    let (code, said) = cacheward(&["check", "--connect", "--config", &good], &backends);
    assert_eq!(code, Some(0), "{said}");
    let modes = fresh_pg
        .query(
            "SELECT tgname::text, tgenabled::text FROM pg_trigger
             WHERE tgname LIKE 'cacheward%' AND tgrelid IN ('users'::regclass, 'things'::regclass)",
            &[],
        )
        .await
        .unwrap();
    let modes: Vec<(String, String)> = modes.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(modes.len(), 9, "{modes:?}");
    assert!(modes.iter().all(|(_, mode)| mode == "A"), "{modes:?}");
    // A role with some of the daemon's rights only: each missing one named with its GRANT.
    fresh_pg
        .batch_execute(
            "CREATE ROLE check_runtime LOGIN;
             GRANT SELECT, INSERT, UPDATE, DELETE ON users TO check_runtime;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO check_runtime;",
        )
        .await
        .unwrap();
    let as_runtime = fresh.replacen("postgres@", "check_runtime@", 1);
    let limited = [
        ("DATABASE_URL", as_runtime.as_str()),
        ("REDIS_URL", env.redis_url.as_str()),
    ];
    let (code, said) = cacheward(&["check", "--connect", "--config", &good], &limited);
    assert_eq!(code, Some(1), "{said}");
    for grant in [
        "lacks DELETE on cacheward_outbox: GRANT DELETE ON TABLE cacheward_outbox TO \"check_runtime\";",
        "GRANT USAGE ON SEQUENCE cacheward_version_seq TO \"check_runtime\";",
        "GRANT INSERT ON TABLE public.things TO \"check_runtime\";",
    ] {
        assert!(said.contains(grant), "{grant} in {said}");
    }
    assert!(!said.contains("ON TABLE users"), "{said}");
    // The capture dropped behind cacheward's back: named, with the remedy.
    fresh_pg
        .batch_execute("DROP TRIGGER cacheward_things_update ON things")
        .await
        .unwrap();
    let (code, said) = cacheward(&["check", "--connect", "--config", &good], &backends);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("problem: table things: its capture is not installed"),
        "{said}"
    );
    // A Redis user that may read cacheward's keys but not write them, nor run scripts.
    let () = redis::cmd("ACL")
        .arg(&[
            "SETUSER", "checker", "on", ">pw", "~*", "+ping", "+get", "+mget", "+type",
        ])
        .arg(&["+scan", "+info", "+client", "+hello", "+auth", "+select"])
        .query_async(&mut env.redis().await)
        .await
        .unwrap();
    let as_checker = format!("{}&user=checker&pass=pw", env.redis_url);
    let (code, said) = cacheward(
        &["check", "--connect", "--config", &good],
        &[
            ("DATABASE_URL", fresh.as_str()),
            ("REDIS_URL", as_checker.as_str()),
        ],
    );
    assert_eq!(code, Some(1), "{said}");
    for refused in [
        "user checker may not write keys under 'user:' (SET)",
        "ACL SETUSER checker +set '~user:*'",
        "user checker may not write keys under 'things:' from a script (EVAL)",
        "ACL SETUSER checker +eval '~things:*'",
    ] {
        assert!(said.contains(refused), "{refused} in {said}");
    }
    assert!(!said.contains("may not read keys"), "{said}");
    // A Redis nobody listens on.
    let port = cacheward::dev::free_port().unwrap();
    let nowhere = format!("redis://127.0.0.1:{port}");
    let (code, said) = cacheward(
        &["check", "--connect", "--config", &good],
        &[
            ("DATABASE_URL", fresh.as_str()),
            ("REDIS_URL", nowhere.as_str()),
        ],
    );
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains(&format!("redis redis://127.0.0.1:{port}: cannot reach")),
        "{said}"
    );
    // Unreachable backends whose URLs carry passwords: named, the passwords never printed.
    let pg_nowhere = format!("postgresql://someone:pg-Secret-9@127.0.0.1:{port}/db");
    let redis_nowhere = format!("redis://:redis-Secret-9@127.0.0.1:{port}");
    let (code, said) = cacheward(
        &["check", "--connect", "--config", &good],
        &[
            ("DATABASE_URL", pg_nowhere.as_str()),
            ("REDIS_URL", redis_nowhere.as_str()),
        ],
    );
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("problem: postgres: cannot connect") && said.contains("cannot reach"),
        "{said}"
    );
    assert!(!said.contains("Secret-9"), "a password was printed: {said}");
}
