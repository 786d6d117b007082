//! The fence (`Cache::fence_key`): a cache-aside fill that read its rows before a TRUNCATE, or
//! before Redis lost its data (FLUSHALL, a restart), never lands, whether or not its key existed
//! when the event was applied. The races are driven on purpose: the fill is held after its database
//! read until the event has been applied.

mod common;

/// `TRUNCATE` of `subject`'s table; returns the version horizon just after it.
async fn truncate(pg: &tokio_postgres::Client, subject: Subject) -> i64 {
    pg.batch_execute(subject.truncate_sql()).await.unwrap();
    pg.query_one("SELECT last_value FROM cacheward_version_seq", &[])
        .await
        .unwrap()
        .get(0)
}

use std::time::Duration;

use common::subject::{Subject, ORDERS_TOML};
use common::{hold_fills, kind, wait_until, TestEnv};
use serde_json::{json, Value};

/// Waits for a fill to reach the hold.
async fn held(reached: &mut tokio::sync::mpsc::Receiver<()>) {
    tokio::time::timeout(Duration::from_secs(10), reached.recv())
        .await
        .expect("a fill reached the hold within 10 s")
        .expect("the hook is alive");
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("fenced{i:02}")).collect()
}

async fn insert_rows(env: &TestEnv, subject: Subject, names: &[String]) {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    env.pg()
        .await
        .batch_execute(&subject.insert_sql(&names))
        .await
        .unwrap();
}

async fn insert(env: &TestEnv, names: &[String]) {
    env.pg()
        .await
        .execute(
            "INSERT INTO users (username) SELECT unnest($1::text[])",
            &[&names],
        )
        .await
        .unwrap();
}

/// A daemon with one user inserted, its row, and an entry one version older than the row (what a
/// forgery puts in Redis).
struct OneName {
    daemon: common::Daemon,
    client: common::Rpc,
    name: String,
    row: Value,
    older: Value,
}

async fn one_name(env: &TestEnv) -> OneName {
    let daemon = env.start_daemon(env.config()).await;
    let client = daemon.client().await;
    let name = names(1).remove(0);
    insert(env, std::slice::from_ref(&name)).await;
    let row = env.row_json(&name).await.unwrap();
    let mut older = row.clone();
    older["version"] = json!(row["version"].as_i64().unwrap() - 1);
    OneName {
        daemon,
        client,
        name,
        row,
        older,
    }
}

/// The fence's value in Redis.
async fn fence(env: &TestEnv) -> Option<i64> {
    fence_of(env, Subject::Users).await
}

/// The value of the fence `subject`'s TRUNCATE raises.
async fn fence_of(env: &TestEnv, subject: Subject) -> Option<i64> {
    let mut conn = env.redis().await;
    let value: Option<String> = redis::cmd("GET")
        .arg(subject.fence_key())
        .query_async(&mut conn)
        .await
        .unwrap();
    value.map(|v| v.parse().expect("the fence is a number"))
}

/// Pipelines a get of every name on one connection; returns the answers once all came.
fn pipelined_gets(
    socket: std::path::PathBuf,
    names: Vec<String>,
) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move { common::Rpc::connect(&socket).await.get_all(&names).await })
}

/// [`pipelined_gets`] of `subject`'s rows.
fn pipelined_row_gets(
    subject: Subject,
    socket: std::path::PathBuf,
    names: Vec<String>,
) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut c = common::Rpc::connect(&socket).await;
        for (i, name) in names.iter().enumerate() {
            let request =
                json!({"jsonrpc": "2.0", "id": i, "method": "get", "params": subject.params(name)});
            c.send(&request).await;
        }
        let mut answers = Vec::new();
        for _ in &names {
            answers.push(c.recv().await);
        }
        answers
    })
}

/// A daemon whose fills are held, and `n` users it has not cached being read through it, pipelined:
/// every get missed, read its row, and the first fill is held when this returns.
struct Held {
    env: TestEnv,
    names: Vec<String>,
    daemon: common::Daemon,
    gets: tokio::task::JoinHandle<Vec<Value>>,
    reached: tokio::sync::mpsc::Receiver<()>,
    go: std::sync::Arc<tokio::sync::Semaphore>,
}

async fn cold_gets_held(n: usize) -> Held {
    cold_rows_held(Subject::Users, n).await
}

/// [`cold_gets_held`] of `subject`'s rows.
async fn cold_rows_held(subject: Subject, n: usize) -> Held {
    let env = TestEnv::start().await;
    let config = subject.prepare(&env, env.config()).await;
    let names = names(n);
    insert_rows(&env, subject, &names).await;
    let (hooks, mut reached, go) = hold_fills(None);
    let daemon = env.start_daemon_with(config, hooks).await;
    subject.served(&mut daemon.client().await).await;
    let gets = pipelined_row_gets(subject, daemon.socket.clone(), names.clone());
    held(&mut reached).await;
    Held {
        env,
        names,
        daemon,
        gets,
        reached,
        go,
    }
}

/// After the held fills were let go and answered: no name has a live entry in Redis, every get
/// answers not found, and `verify` finds nothing.
async fn assert_nothing_stale(env: &TestEnv, daemon: &common::Daemon, names: &[String]) {
    assert_no_stale_row(env, Subject::Users, daemon, names).await;
}

/// [`assert_nothing_stale`] of `subject`'s rows.
async fn assert_no_stale_row(
    env: &TestEnv,
    subject: Subject,
    daemon: &common::Daemon,
    names: &[String],
) {
    if subject == Subject::Users {
        return assert_no_stale_user(env, daemon, names).await;
    }
    let mut c = daemon.client().await;
    for name in names {
        let got = c.call("get", subject.params(name)).await;
        assert_eq!(kind(&got), "not_found", "{name} was removed: {got}");
        let raw = subject.cached(env, name).await;
        assert!(
            !raw.as_deref().is_some_and(cacheward::model::entry::is_live),
            "{name} is cached although its row is gone: {raw:?}"
        );
    }
    let (code, said) = env.verify_tables(ORDERS_TOML);
    assert_eq!(code, Some(0), "verify: {said}");
}

async fn assert_no_stale_user(env: &TestEnv, daemon: &common::Daemon, names: &[String]) {
    let mut c = daemon.client().await;
    for name in names {
        let got = c.get(name).await;
        assert_eq!(kind(&got), "not_found", "{name} was removed: {got}");
    }
    for name in names {
        let raw = env.cached(name).await;
        assert!(
            !raw.as_deref().is_some_and(cacheward::model::entry::is_live),
            "{name} is cached although its row is gone: {raw:?}"
        );
    }
    let verify = env.verify();
    assert!(verify.status.success(), "verify: {verify:?}");
}

/// The issue's reproduction: 30 cold gets read their rows, a TRUNCATE is committed and applied
/// (the scan finds no keys, so it writes no tombstones), then the fills arrive. Without a fence
/// all 30 deleted rows would stay cached for the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_that_read_before_a_truncate_never_land() {
    fills_before_a_truncate(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_table_s_fills_that_read_before_its_truncate_never_land() {
    fills_before_a_truncate(Subject::Orders).await;
}

async fn fills_before_a_truncate(subject: Subject) {
    let Held {
        env,
        names,
        daemon,
        gets,
        reached: _,
        go,
    } = cold_rows_held(subject, 30).await;
    let shared = fence(&env).await.expect("the daemon set a fence");
    let before = fence_of(&env, subject).await.unwrap_or(0);
    let pg = env.pg().await;
    let truncated_at = truncate(&pg, subject).await;
    wait_until(
        "the CDC worker applied the TRUNCATE",
        Duration::from_secs(5),
        || async {
            fence_of(&env, subject)
                .await
                .is_some_and(|f| f > before && f > truncated_at)
        },
    )
    .await;
    if subject != Subject::Users {
        assert_eq!(
            fence(&env).await,
            Some(shared),
            "a declared table's TRUNCATE raises its own fence only"
        );
    }

    go.add_permits(1000);
    let answers = gets.await.unwrap();
    // Answers read before the TRUNCATE come from the database (that is fine: they were current
    // when read); a batch read after it finds nothing.
    for answer in &answers {
        assert!(
            answer["result"]["source"] == json!("db") || kind(answer) == "not_found",
            "{answer}"
        );
    }
    assert_eq!(answers[0]["result"]["source"], json!("db"), "the held read");
    assert_no_stale_row(&env, subject, &daemon, &names).await;
    daemon.stop().await;
}

/// A fill that read a row before it was deleted, held while the delete's tombstone is written and
/// then lost to a FLUSHALL (or a Redis restart): with nothing left in Redis to refuse it, only the
/// fence can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_read_before_redis_lost_its_data_never_lands() {
    let Held {
        env,
        names,
        daemon,
        gets,
        mut reached,
        go,
    } = cold_gets_held(5).await;
    let pg = env.pg().await;
    pg.execute("DELETE FROM users WHERE username = ANY($1)", &[&names])
        .await
        .unwrap();
    wait_until(
        "the deletes reached Redis",
        Duration::from_secs(5),
        || async { env.cached(&names[0]).await.is_some() },
    )
    .await;
    let mut conn = env.redis().await;
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    // Let the health monitor see the missing fence and set a new one, then let the fills go.
    wait_until("a new fence", Duration::from_secs(5), || async {
        fence(&env).await.is_some()
    })
    .await;
    go.add_permits(1000);
    gets.await.unwrap();
    assert_nothing_stale(&env, &daemon, &names).await;

    // The same before the fence is back: fills arriving while Redis has none are refused too.
    let names2: Vec<String> = (0..5).map(|i| format!("flushed{i}")).collect();
    insert(&env, &names2).await;
    // The CDC worker caches the inserted rows; their entries expire, so the gets below miss.
    wait_until(
        "the inserts reached Redis",
        Duration::from_secs(5),
        || async { env.cached(&names2[4]).await.is_some() },
    )
    .await;
    let keys: Vec<String> = names2.iter().map(|n| format!("user:{n}")).collect();
    let _: i64 = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    while reached.try_recv().is_ok() {}
    let gets = pipelined_gets(daemon.socket.clone(), names2.clone());
    held(&mut reached).await;
    pg.execute("DELETE FROM users WHERE username = ANY($1)", &[&names2])
        .await
        .unwrap();
    wait_until(
        "the deletes reached Redis",
        Duration::from_secs(5),
        || async { env.cached(&names2[0]).await.is_some() },
    )
    .await;
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    go.add_permits(1000);
    gets.await.unwrap();
    assert_nothing_stale(&env, &daemon, &names2).await;
    daemon.stop().await;
}

/// A row's first version is 1, and a drop leaves a tombstone one below it: version 0. That
/// tombstone is cacheward's like any other: the row fills again once read after the fence, and
/// verify finds nothing foreign. (Counted foreign, it kept the key out of the cache until its TTL
/// and failed verify: found by the seeded soak, after a Redis restored from an older snapshot.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_first_version_leaves_a_tombstone_that_is_cacheward_s() {
    use cacheward::model::entry::{tombstone_json, Write};
    use cacheward::model::key::Key;
    use cacheward::store::redis::{Cache, Outcome};
    let env = TestEnv::start().await;
    let cache = Cache::new(&env.config()).unwrap();
    let primary = &cache.primaries().await.unwrap()[0];
    assert_eq!(cache.establish_fences(primary, 10).await.unwrap(), 1);
    let first = |read_at| Write::Live {
        key: Key::user("first"),
        version: 1,
        json: r#"{"id":1,"username":"first","version":1}"#.into(),
        read_at,
    };
    assert_eq!(
        cache.apply(&[first(10)]).await.unwrap(),
        vec![Outcome::Applied]
    );
    assert_eq!(cache.drop_all(15).await.unwrap(), 1);
    assert_eq!(env.cached("first").await, Some(tombstone_json(0)));
    assert_eq!(
        cache.apply(&[first(14)]).await.unwrap(),
        vec![Outcome::Fenced],
        "read before the drop's fence"
    );
    assert_eq!(
        cache.apply(&[first(15)]).await.unwrap(),
        vec![Outcome::Applied],
        "read after it: the row fills again"
    );
    assert_eq!(cache.drop_all(20).await.unwrap(), 1);
    let verify = env.verify();
    let said = String::from_utf8_lossy(&verify.stdout).into_owned()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && said.contains(" 0 foreign values"),
        "verify: {said}"
    );
}

/// A live write with no fence in Redis, or one that read before the fence, is refused; a
/// tombstone always applies; the fence only rises; a key holding something that is not
/// cacheward's is left alone and reported as foreign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_script_honours_the_fence_and_leaves_foreign_values_alone() {
    use cacheward::model::entry::Write;
    use cacheward::model::key::Key;
    use cacheward::store::redis::{Cache, Outcome};
    let env = TestEnv::start().await;
    let cache = Cache::new(&env.config()).unwrap();
    let live = |name: &str, version: i64, read_at: i64| Write::Live {
        key: Key::user(name),
        version,
        json: format!(r#"{{"id":1,"username":"{name}","version":{version}}}"#),
        read_at,
    };
    assert_eq!(
        cache.apply(&[live("a", 5, 100)]).await.unwrap(),
        vec![Outcome::Fenced],
        "no fence: Redis may have lost a tombstone"
    );
    let primary = &cache.primaries().await.unwrap()[0];
    assert_eq!(cache.establish_fences(primary, 10).await.unwrap(), 1);
    assert_eq!(
        cache.establish_fences(primary, 20).await.unwrap(),
        0,
        "set once"
    );
    assert_eq!(env.cached("").await.as_deref(), Some("10"));
    assert_eq!(
        cache
            .apply(&[
                live("a", 5, 9),
                live("b", 5, 10),
                Write::tombstone(Key::user("c"), 3)
            ])
            .await
            .unwrap(),
        vec![Outcome::Fenced, Outcome::Applied, Outcome::Applied]
    );
    // The tombstone the script stored is the one the Rust rule builds (model::entry).
    use cacheward::model::entry::{tombstone_json, version_below};
    assert_eq!(env.cached("c").await, Some(tombstone_json(3)));
    // Dropping everything at a higher fence: b's entry goes, and a write read before it is refused.
    assert_eq!(cache.drop_all(15).await.unwrap(), 1);
    // drop.lua builds its tombstone in Lua: the same text, one version below the entry's.
    assert_eq!(
        env.cached("b").await,
        Some(tombstone_json(version_below(5)))
    );
    assert_eq!(
        cache.apply(&[live("b", 5, 14)]).await.unwrap(),
        vec![Outcome::Fenced]
    );
    assert_eq!(
        cache.apply(&[live("b", 5, 15)]).await.unwrap(),
        vec![Outcome::Applied],
        "the current row, read after the fence, fills again"
    );
    assert_eq!(
        cache.drop_all(12).await.unwrap(),
        1,
        "the fence never falls"
    );
    assert_eq!(fence(&env).await, Some(15));

    // Foreign values under the prefix: another type, a plain string, JSON that is not ours (also
    // when it looks almost like an entry: a null id, a tombstone of a fractional version — model::entry's rule,
    // which the scripts' entry.lua must agree with).
    let mut conn = env.redis().await;
    let () = redis::cmd("HSET")
        .arg("user:hash")
        .arg("f")
        .arg("v")
        .query_async::<i64>(&mut conn)
        .await
        .map(|_| ())
        .unwrap();
    for (key, value) in [
        ("user:plain", "hello"),
        ("user:json", r#"{"name":"x"}"#),
        ("user:number", "42"),
        ("user:nullid", r#"{"id":null,"version":5}"#),
        ("user:fraction", r#"{"tombstone":true,"version":1.5}"#),
        ("user:rownull", r#"{"row":null,"version":5}"#),
        ("user:rowtext", r#"{"row":"x","version":5}"#),
    ] {
        let () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let foreign = [
        "hash", "plain", "json", "number", "nullid", "fraction", "rownull", "rowtext",
    ];
    let writes: Vec<Write> = foreign
        .iter()
        .flat_map(|name| [live(name, 50, 20), Write::tombstone(Key::user(name), 60)])
        .collect();
    assert_eq!(
        cache.apply(&writes).await.unwrap(),
        vec![Outcome::Foreign; 2 * foreign.len()]
    );
    assert_eq!(cache.drop_all(30).await.unwrap(), 0);
    let values: (Option<String>, Option<String>, Option<String>) = redis::cmd("MGET")
        .arg("user:plain")
        .arg("user:json")
        .arg("user:number")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        values,
        (
            Some("hello".into()),
            Some(r#"{"name":"x"}"#.into()),
            Some("42".into())
        )
    );
    let kind: String = redis::cmd("TYPE")
        .arg("user:hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "hash");
    for (key, value) in [
        ("nullid", r#"{"id":null,"version":5}"#),
        ("fraction", r#"{"tombstone":true,"version":1.5}"#),
    ] {
        assert_eq!(
            env.cached(key).await.as_deref(),
            Some(value),
            "{key} left alone"
        );
    }

    // A declared table's entry ({"version","row"}) is live to the scripts as to model::entry: an
    // older write is refused, a newer one lands, a drop leaves a tombstone below it.
    let table_entry = r#"{"version":40,"row":{"id":1}}"#;
    let () = redis::cmd("SET")
        .arg("user:tabled")
        .arg(table_entry)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(cacheward::model::entry::is_live(table_entry));
    assert_eq!(
        cache.apply(&[live("tabled", 39, 40)]).await.unwrap(),
        vec![Outcome::Refused]
    );
    assert_eq!(
        cache
            .apply(&[Write::tombstone(Key::user("tabled"), 41)])
            .await
            .unwrap(),
        vec![Outcome::Applied]
    );

    // verify names every foreign key, and prints a hostile username escaped: an ESC/BEL sequence
    // in a key must not reach the operator's terminal.
    let () = redis::cmd("SET")
        .arg("user:evil\u{1b}]0;pwned\u{7}")
        .arg(r#"{"id":1,"username":"evil","version":1}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = env.verify();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    for name in foreign {
        assert!(
            text.contains(&format!("foreign user:{name}:")),
            "{name} not reported:\n{text}"
        );
    }
    assert!(text.contains("8 foreign values"), "{text}");
    assert!(
        text.contains("mismatch user:evil\\u{1b}]0;pwned\\u{7}:"),
        "{text}"
    );
    assert!(
        !out.stdout.contains(&0x1b) && !out.stdout.contains(&0x07),
        "{text:?}"
    );
}

/// The fence holds across a kill between a TRUNCATE's commit and its application: the applying
/// daemon is frozen, the TRUNCATE commits, the daemon is SIGKILLed and started again, and only then
/// applies it; meanwhile a fill that read before the TRUNCATE waits in another daemon (a sidecar
/// with the CDC worker off) and arrives last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_holds_across_a_kill_between_a_truncate_and_its_application() {
    fence_across_a_kill(Subject::Users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_holds_across_a_kill_between_a_declared_table_s_truncate_and_its_application() {
    fence_across_a_kill(Subject::Orders).await;
}

async fn fence_across_a_kill(subject: Subject) {
    let env = TestEnv::start().await;
    let mut config = subject.prepare(&env, env.config()).await;
    let names = names(10);
    insert_rows(&env, subject, &names).await;
    let mut leader = common::DaemonProcess::spawn(&env, "leader");
    leader.wait_ready().await;
    let (hooks, mut reached, go) = hold_fills(None);
    config.cdc.enabled = false;
    let sidecar = env.start_daemon_with(config, hooks).await;
    subject.served(&mut sidecar.client().await).await;

    let gets = pipelined_row_gets(subject, sidecar.socket.clone(), names.clone());
    held(&mut reached).await;
    leader.signal(libc::SIGSTOP);
    let pg = env.pg().await;
    let truncated_at = truncate(&pg, subject).await;
    leader.signal(libc::SIGKILL);
    leader.wait_exit(Duration::from_secs(5));
    assert!(
        fence_of(&env, subject)
            .await
            .is_none_or(|f| f <= truncated_at),
        "the killed daemon did not apply the TRUNCATE"
    );
    let leader = common::DaemonProcess::spawn(&env, "leader");
    leader.wait_ready().await;
    wait_until(
        "the restarted daemon applied the TRUNCATE",
        Duration::from_secs(10),
        || async {
            fence_of(&env, subject)
                .await
                .is_some_and(|f| f > truncated_at)
        },
    )
    .await;

    go.add_permits(1000);
    gets.await.unwrap();
    assert_no_stale_row(&env, subject, &sidecar, &names).await;
    sidecar.stop().await;
    drop(leader);
}

/// Redis restored from an older snapshot (a restart from persisted data, a promoted replica, a
/// restore from backup: its data misses the newest writes, here a rename's tombstone) with the
/// fence still there: the daemon sees that the data was written under another Redis process,
/// answers from PostgreSQL and drops every entry behind a fresh fence. The stale entry is never
/// served, not even before the monitor's first look at the new process (see `confirm`; before
/// that, it was served for up to a monitor interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restored_from_an_older_snapshot_is_not_trusted() {
    let mut env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "snap"})).await;
    assert_eq!(c.get("snap").await["result"]["source"], json!("cache"));
    let mut redis = env.redis().await;
    redis::cmd("SAVE")
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    let backup = env.dir.path().join("old.rdb");
    std::fs::copy(env.redis.dir().join("dump.rdb"), &backup).unwrap();
    // A newer write the snapshot lacks: `snap` is gone from PostgreSQL, a tombstone in Redis.
    let renamed = c
        .call(
            "rename",
            json!({"username": "snap", "new_username": "snap2"}),
        )
        .await;
    assert!(renamed.get("result").is_some(), "{renamed}");
    assert_eq!(kind(&c.get("snap").await), "not_found");

    env.redis.kill();
    std::fs::copy(&backup, env.redis.dir().join("dump.rdb")).unwrap();
    env.redis.start_again().unwrap();
    let back = std::time::Instant::now();
    let stale = env.cached("snap").await;
    assert!(
        stale
            .as_deref()
            .is_some_and(cacheward::model::entry::is_live),
        "the restored data holds the old entry: {stale:?}"
    );
    // Ask every 5 ms: note the last time the stale entry was served.
    let mut last_stale: Option<Duration> = None;
    while back.elapsed() < Duration::from_secs(2) {
        let mut c = daemon.client().await;
        let answer = c.get("snap").await;
        if answer["result"]["source"] == json!("cache") {
            last_stale = Some(back.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Not even before the monitor's first look at the new process: the daemon's connection to
    // it was made after the kill, and answers nothing until looked at.
    assert!(
        last_stale.is_none(),
        "served from the stale snapshot {last_stale:?} after Redis came back"
    );
    assert_eq!(kind(&c.get("snap").await), "not_found");
    assert!(env.agrees(&["snap".into(), "snap2".into()]).await);
    let cached = env.cached("snap").await;
    assert!(
        !cached
            .as_deref()
            .is_some_and(cacheward::model::entry::is_live),
        "the stale entry was dropped: {cached:?}"
    );
    daemon.stop().await;
}

/// A primary demoted by a failover (made a replica of a server with an older copy of its data,
/// its clients killed, as Sentinel does) and promoted again: the same process all along, its epoch
/// even its own (copied back), but not its data. No get answers from the copy: not while it is a
/// replica, not after it is a primary again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_demoted_and_promoted_again_serves_nothing_from_the_copy_it_took() {
    use cacheward::dev::redis::{Redis, RedisOptions};
    let tcp = RedisOptions {
        tcp: true,
        ..Default::default()
    };
    let env = TestEnv::start_with(tcp.clone()).await;
    let copy = Redis::start_with(tcp).expect("start the second redis");
    // `redis://127.0.0.1:PORT/0`.
    let port = |url: Option<String>| {
        let url = url.expect("tcp");
        url.trim_start_matches("redis://127.0.0.1:")
            .trim_end_matches("/0")
            .to_owned()
    };
    let (primary_port, copy_port) = (port(env.redis.tcp_url(0)), port(copy.tcp_url(0)));
    let daemon = env.start_daemon(env.config()).await;
    let names: Vec<String> = (0..20).map(|i| format!("demoted{i}")).collect();
    let mut c = daemon.client().await;
    for name in &names {
        c.call("put", json!({"username": name})).await;
    }
    wait_until("every name cached", Duration::from_secs(10), || async {
        let mut c = daemon.client().await;
        c.get_all(&names)
            .await
            .iter()
            .all(|a| a["result"]["source"] == json!("cache"))
    })
    .await;
    // The copy: a replica of the primary until it holds everything (the epoch key too), then
    // cut off.
    let mut to_copy = redis::Client::open(copy.url(0))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info = |conn: redis::aio::MultiplexedConnection| async move {
        let mut conn = conn;
        redis::cmd("INFO")
            .arg("replication")
            .query_async::<String>(&mut conn)
            .await
            .unwrap_or_default()
    };
    redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(&primary_port)
        .query_async::<()>(&mut to_copy)
        .await
        .unwrap();
    wait_until("the copy is in sync", Duration::from_secs(10), || {
        let replication = info(to_copy.clone());
        async move { replication.await.contains("master_link_status:up") }
    })
    .await;
    redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async::<()>(&mut to_copy)
        .await
        .unwrap();
    // Deleted through the daemon: tombstones on the primary, live entries in the copy.
    for name in &names {
        c.call("delete", json!({"username": name})).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let socket = daemon.socket.clone();
        let names = names.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut served = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut c = common::Rpc::connect(&socket).await;
                for answer in c.get_all(&names).await {
                    if answer.get("result").is_some() {
                        served.push((started.elapsed(), answer));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            served
        })
    };
    // Demoted, as Sentinel does it: made a replica and its clients killed in one transaction;
    // it then loads the copy.
    let sentinel_like = |target: Option<(&str, &str)>| {
        let mut pipe = redis::pipe();
        pipe.atomic();
        match target {
            Some((host, port)) => pipe.cmd("REPLICAOF").arg(host).arg(port),
            None => pipe.cmd("REPLICAOF").arg("NO").arg("ONE"),
        };
        pipe.cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal");
        pipe
    };
    let mut primary = env.redis().await;
    let _ = sentinel_like(Some(("127.0.0.1", &copy_port)))
        .query_async::<()>(&mut primary)
        .await;
    wait_until(
        "the demoted primary loaded the copy",
        Duration::from_secs(10),
        || async {
            let info = info(env.redis().await).await;
            info.contains("role:slave") && info.contains("master_link_status:up")
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut primary = env.redis().await;
    let _ = sentinel_like(None).query_async::<()>(&mut primary).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = reader.await.unwrap();
    assert!(
        served.is_empty(),
        "a deleted user was served: {:?}",
        served.first()
    );
    assert!(env.agrees(&names).await);
    daemon.stop().await;
}

/// The epoch key holding a value of another type (put there by someone else): the daemon
/// distrusts the data once, overwrites the key with its epoch, and serves from the cache again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_value_at_the_epoch_key_is_replaced() {
    let env = TestEnv::start().await;
    let mut redis = env.redis().await;
    redis::cmd("RPUSH")
        .arg("user:\0epoch")
        .arg("not-a-run-id")
        .query_async::<i64>(&mut redis)
        .await
        .unwrap();
    let daemon = env.start_daemon(env.config()).await;
    wait_until(
        "the epoch key overwritten",
        Duration::from_secs(3),
        || async {
            let mut redis = env.redis().await;
            let kind: String = redis::cmd("TYPE")
                .arg("user:\0epoch")
                .query_async(&mut redis)
                .await
                .unwrap();
            kind == "string"
        },
    )
    .await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "after-foreign"})).await;
    assert_eq!(
        c.get("after-foreign").await["result"]["source"],
        json!("cache")
    );
    daemon.stop().await;
}

/// A row may have columns of any name, `tombstone` and `version`-like ones included: its entry is
/// still a live entry to every script (an object with an id is live, whatever else it holds), so a
/// TRUNCATE drops it like any other and no stale row is answered after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_a_tombstone_column_is_dropped_like_any_other() {
    let env = TestEnv::start().await;
    let pg = env.pg().await;
    pg.batch_execute("ALTER TABLE users ADD COLUMN tombstone boolean NOT NULL DEFAULT true")
        .await
        .unwrap();
    let mut config = env.config();
    // Reads go to Redis each time: what Redis holds is what is answered.
    config.cache.local_max_bytes = 0;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "marked"})).await;
    let cached = c.get("marked").await;
    assert_eq!(cached["result"]["source"], json!("cache"), "{cached}");
    assert_eq!(
        cached["result"]["user"]["tombstone"],
        json!(true),
        "{cached}"
    );
    truncate(&pg, Subject::Users).await;
    wait_until("the truncate applied", Duration::from_secs(5), || async {
        let mut c = daemon.client().await;
        kind(&c.get("marked").await) == "not_found"
    })
    .await;
    // Dropped, not left live: Redis holds a tombstone for it now.
    let raw = env.cached("marked").await;
    assert!(
        !raw.as_deref().is_some_and(cacheward::model::entry::is_live),
        "{raw:?}"
    );
    daemon.stop().await;
}

/// The audit's fence forgeries: from any client allowed the prefix, the fence key is set to a
/// number above anything the version sequence has drawn, to something that is not a number, or
/// deleted, and every row is changed at once. No answer may stay at the old version: a write the
/// fence refuses drops the older entry it would have replaced, and the daemon replaces a forged
/// fence (counting what it refused meanwhile) so the cache fills again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_or_deleted_fence_never_keeps_a_stale_entry_served() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut client = daemon.client().await;
    let names = names(10);
    insert(&env, &names).await;
    let pg = env.pg().await;
    for forgery in [Some("9223372036854775807"), Some("notanumber"), None] {
        // Warm: every name cached at its current version.
        for name in &names {
            client.get(name).await;
        }
        for name in &names {
            assert_eq!(client.get(name).await["result"]["source"], json!("cache"));
        }
        let mut redis = env.redis().await;
        let mut forge = match forgery {
            Some(_) => redis::cmd("SET"),
            None => redis::cmd("DEL"),
        };
        forge.arg("user:");
        if let Some(value) = forgery {
            forge.arg(value);
        }
        forge.query_async::<()>(&mut redis).await.unwrap();
        // Every row changes (a new version each), at once.
        pg.execute(
            "UPDATE users SET username = username WHERE username = ANY($1)",
            &[&names],
        )
        .await
        .unwrap();
        wait_until(
            &format!("every answer at the new version after {forgery:?}"),
            Duration::from_secs(3),
            || async {
                for name in &names {
                    let answer = daemon.client().await.get(name).await;
                    if Some(&answer["result"]["user"]) != env.row_json(name).await.as_ref() {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        // The fence is the daemon's again, and the cache fills.
        wait_until(
            &format!("the fence replaced after {forgery:?}"),
            Duration::from_secs(3),
            || async {
                let fence: Option<String> = redis::cmd("GET")
                    .arg("user:")
                    .query_async(&mut env.redis().await)
                    .await
                    .unwrap();
                fence
                    .and_then(|f| f.parse::<i64>().ok())
                    .is_some_and(|f| f < i64::MAX)
            },
        )
        .await;
        let name = &names[0];
        wait_until(
            &format!("the cache fills again after {forgery:?}"),
            Duration::from_secs(3),
            || async {
                let mut c = daemon.client().await;
                c.get(name).await;
                c.get(name).await["result"]["source"] == json!("cache")
            },
        )
        .await;
        // And nothing answers older than its row from then on.
        for name in &names {
            let answer = client.get(name).await;
            assert_eq!(
                Some(&answer["result"]["user"]),
                env.row_json(name).await.as_ref(),
                "{name} after {forgery:?}"
            );
        }
    }
    let refused = daemon.stats().await["fenced_writes_refused"]
        .as_u64()
        .unwrap();
    assert!(refused >= 10, "refused writes are counted: {refused}");
    daemon.stop().await;
}

/// Two caches on one Redis server, in two databases, and an operator swaps them (`SWAPDB`): the
/// database the daemon reads now holds the other cache's entries, under the same server's epoch
/// and a fence of their own, older than the rows. None is served: the swap is seen (the cache's
/// id there is another) and every entry dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_database_is_not_trusted() {
    let env = TestEnv::start().await;
    let OneName {
        daemon,
        mut client,
        name,
        row,
        older: mut old,
    } = one_name(&env).await;
    let name = &name;
    client.get(name).await;
    assert_eq!(client.get(name).await["result"]["source"], json!("cache"));
    let get = |db: u32, key: &'static str| {
        let url = env.redis.url(db);
        async move {
            let mut conn = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    wait_until("the cache has an id", Duration::from_secs(5), || async {
        get(3, "user:\0id").await.is_some()
    })
    .await;
    // The other cache, in database 4: this server's epoch, a fence, an id of its own, and an
    // entry of the same name older than its row.
    old["created_at"] = json!("2001-01-01T00:00:00Z");
    let mut other = redis::Client::open(env.redis.url(4))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::pipe()
        .cmd("SET")
        .arg("user:\0epoch")
        .arg(get(3, "user:\0epoch").await.expect("an epoch"))
        .cmd("SET")
        .arg("user:")
        .arg(get(3, "user:").await.expect("a fence"))
        .cmd("SET")
        .arg("user:\0id")
        .arg("0123456789abcdef0123456789abcdef")
        .cmd("SET")
        .arg(format!("user:{name}"))
        .arg(old.to_string())
        .query_async::<()>(&mut other)
        .await
        .unwrap();
    redis::cmd("SWAPDB")
        .arg(3)
        .arg(4)
        .query_async::<()>(&mut other)
        .await
        .unwrap();
    wait_until(
        "the swapped-in entry is never served",
        Duration::from_secs(3),
        || async { daemon.client().await.get(name).await["result"]["user"] == row },
    )
    .await;
    for _ in 0..20 {
        assert_eq!(client.get(name).await["result"]["user"], row);
    }
    daemon.stop().await;
}

/// A foreign value at the cache's id (not an id: a 1 MB string, or another type) is replaced by a
/// fresh id at the next look, and the cache distrusted as after a swap: an entry put beside it is
/// dropped. Before, a string stayed there (looked at whole every 250 ms) and was taken for the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_value_at_the_cache_id_is_replaced_and_the_cache_distrusted() {
    let env = TestEnv::start().await;
    let OneName {
        daemon,
        mut client,
        name,
        row,
        older: old,
    } = one_name(&env).await;
    let name = &name;
    let old_text = old.to_string();
    let mut redis = env.redis().await;
    let id = || async {
        let mut redis = env.redis().await;
        redis::cmd("GET")
            .arg("user:\0id")
            .query_async::<Option<String>>(&mut redis)
            .await
            .ok()
            .flatten()
    };
    wait_until("the cache has an id", Duration::from_secs(5), || async {
        id().await.is_some()
    })
    .await;
    for foreign in ["string", "list"] {
        let before = id().await.expect("an id");
        client.get(name).await;
        // The foreign value and an entry older than its row, at once.
        let mut tamper = redis::pipe();
        tamper.atomic().cmd("DEL").arg("user:\0id");
        match foreign {
            "string" => tamper.cmd("SET").arg("user:\0id").arg("x".repeat(1 << 20)),
            _ => tamper.cmd("RPUSH").arg("user:\0id").arg(&before),
        };
        tamper.cmd("SET").arg(format!("user:{name}")).arg(&old_text);
        tamper.query_async::<()>(&mut redis).await.unwrap();
        wait_until(
            &format!("a fresh id over the foreign {foreign}"),
            Duration::from_secs(5),
            || async {
                let mut redis = env.redis().await;
                let now: Result<Option<String>, _> = redis::cmd("GET")
                    .arg("user:\0id")
                    .query_async(&mut redis)
                    .await;
                matches!(now, Ok(Some(now)) if now.len() == 32 && now != before)
            },
        )
        .await;
        wait_until(
            "the entry put beside it dropped",
            Duration::from_secs(5),
            || async { env.cached(name).await.is_none_or(|entry| entry != old_text) },
        )
        .await;
        assert_eq!(client.get(name).await["result"]["user"], row);
    }
    daemon.stop().await;
}

/// The `run_id` of the Redis process answering now.
async fn run_id(env: &TestEnv) -> String {
    let mut redis = env.redis().await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut redis)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Waits until the daemon has recorded the Redis process answering now as its epoch: the monitor
/// has looked at it and acted on what it found.
async fn epoch_recorded(env: &TestEnv) {
    let now = run_id(env).await;
    wait_until("the new epoch recorded", Duration::from_secs(5), || async {
        env.epoch().await.as_deref() == Some(now.as_str())
    })
    .await;
}

/// A Redis that keeps every write on disk before answering (`appendonly yes`, `appendfsync
/// always`) and restarts (here after SIGKILL) lost nothing: the daemon keeps its cache, every
/// entry served from it again. The same Redis restarted from an older copy of its append-only
/// files is distrusted all the same (its heartbeat is behind the last look's): the entry it
/// lacks a tombstone for is never served, and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_restarts_with_every_write_on_disk_keeps_its_cache_and_no_other() {
    let mut env = TestEnv::start_persistent().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    let names: Vec<String> = (0..10).map(|i| format!("durable{i}")).collect();
    for name in &names {
        c.call("put", json!({"username": name})).await;
        assert_eq!(c.get(name).await["result"]["source"], json!("cache"));
    }
    let held: Vec<Option<String>> =
        futures::future::join_all(names.iter().map(|n| env.cached(n))).await;
    epoch_recorded(&env).await;

    env.redis.kill();
    env.redis.start_again().unwrap();
    epoch_recorded(&env).await;
    // A look or two more: a distrusted cache would be dropped by now.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let now: Vec<Option<String>> =
        futures::future::join_all(names.iter().map(|n| env.cached(n))).await;
    assert_eq!(now, held, "every entry kept as it was");
    for name in &names {
        assert_eq!(
            c.get(name).await["result"]["source"],
            json!("cache"),
            "{name} served from the kept cache"
        );
    }

    // An older copy of the same files, restored: a rename's tombstone is missing from it.
    let aof = env.redis.dir().join("appendonlydir");
    let copy = env.dir.path().join("older-appendonlydir");
    copy_dir(&aof, &copy);
    let renamed = c
        .call(
            "rename",
            json!({"username": "durable0", "new_username": "renamed0"}),
        )
        .await;
    assert!(renamed.get("result").is_some(), "{renamed}");
    // The monitor looks again (its heartbeat rises past the copy's).
    tokio::time::sleep(Duration::from_millis(600)).await;
    env.redis.kill();
    std::fs::remove_dir_all(&aof).unwrap();
    copy_dir(&copy, &aof);
    env.redis.start_again().unwrap();
    assert!(
        env.cached("durable0")
            .await
            .as_deref()
            .is_some_and(cacheward::model::entry::is_live),
        "the older copy holds the renamed user's entry"
    );
    let back = std::time::Instant::now();
    while back.elapsed() < Duration::from_secs(1) {
        let answer = c.get("durable0").await;
        assert_eq!(kind(&answer), "not_found", "{answer}");
    }
    epoch_recorded(&env).await;
    wait_until(
        "the stale entry dropped",
        Duration::from_secs(3),
        || async {
            !env.cached("durable0")
                .await
                .as_deref()
                .is_some_and(cacheward::model::entry::is_live)
        },
    )
    .await;
    daemon.stop().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
