//! The near cache (`cache.local_max_bytes`, Guarantee 9 in docs/reference.md): hits from the daemon's
//! memory, kept exact by Redis's invalidations. A change made in Redis directly, by out-of-band
//! SQL, by a FLUSHALL, or lost with a Redis restart never leaves an older answer behind for longer
//! than the invalidation's delivery.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Rpc, TestEnv};
use serde_json::{json, Value};

/// How long after Redis acknowledged a change a get may still answer what it replaced, in these
/// tests. The delivery itself takes well under a millisecond (the benchmark measures it); the
/// margin is for a loaded test machine.
const BOUND: Duration = Duration::from_millis(100);

async fn near(daemon: &Daemon) -> Value {
    daemon.stats().await["near_cache"].clone()
}

async fn near_hits(daemon: &Daemon) -> u64 {
    near(daemon).await["hits"].as_u64().unwrap()
}

/// Gets `name` until `done` says the answer is the one expected; returns how long it took.
async fn answered_within(
    c: &mut Rpc,
    name: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let answer = c.get(name).await;
        if done(&answer) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{name} still answers {answer} after {limit:?}"
        );
    }
}

async fn set_raw(env: &TestEnv, name: &str, value: &Value) {
    let mut redis = env.redis().await;
    let _: () = redis::cmd("SET")
        .arg(format!("user:{name}"))
        .arg(value.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// Deletes `user`'s key in Redis directly; then the database answers it, within the bound.
async fn deleted_in_redis(env: &TestEnv, c: &mut Rpc, user: &Value) {
    let name = user["username"].as_str().unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("user:{name}"))
        .query_async(&mut env.redis().await)
        .await
        .unwrap();
    answered_within(c, name, BOUND, |a| a["result"]["user"] == *user).await;
}

/// Changes `name`'s row with out-of-band SQL (a new version); returns the row.
async fn touch(env: &TestEnv, name: &str) -> Value {
    env.pg()
        .await
        .execute(
            "UPDATE users SET username = username WHERE username = $1",
            &[&name],
        )
        .await
        .unwrap();
    env.row_json(name).await.unwrap()
}

/// Gets `name` until the near cache answers it (a get after a tracked read of it). After a
/// FLUSHDB that takes a moment: the health monitor restores the fence before anything is filled.
async fn warm(daemon: &Daemon, c: &mut Rpc, name: &str) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let before = near_hits(daemon).await;
        assert!(c.get(name).await["result"].is_object());
        if near_hits(daemon).await > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{name} never answered from the near cache: {}",
        near(daemon).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_around_the_daemon_reach_its_near_cache_at_once() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    let ann = c.call("put", json!({"username": "ann"})).await["result"]["user"].clone();
    warm(&daemon, &mut c, "ann").await;
    let stats = near(&daemon).await;
    assert_eq!(stats["entries"], json!(1), "{stats}");
    assert!(stats["bytes"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["max_bytes"], json!(64 * 1024 * 1024));

    // Another program writes the key in Redis directly.
    let mut foreign = ann.clone();
    foreign["version"] = json!(ann["version"].as_i64().unwrap() + 1000);
    foreign["note"] = json!("written around the daemon");
    set_raw(&env, "ann", &foreign).await;
    let took = answered_within(&mut c, "ann", BOUND, |a| a["result"]["user"] == foreign).await;
    eprintln!("a direct SET answered after {took:?}");
    assert!(near(&daemon).await["invalidations"].as_u64().unwrap() >= 1);

    // Deleted in Redis: the database answers.
    warm(&daemon, &mut c, "ann").await;
    let mut redis = env.redis().await;
    deleted_in_redis(&env, &mut c, &ann).await;

    // Everything flushed: "invalidate everything".
    warm(&daemon, &mut c, "ann").await;
    set_raw(&env, "ann", &foreign).await;
    warm(&daemon, &mut c, "ann").await;
    let flushes = near(&daemon).await["flushes"].as_u64().unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut redis).await.unwrap();
    answered_within(&mut c, "ann", BOUND, |a| a["result"]["user"] == ann).await;
    assert!(near(&daemon).await["flushes"].as_u64().unwrap() > flushes);

    // Out-of-band SQL: the change stream writes Redis, Redis tells the near cache.
    warm(&daemon, &mut c, "ann").await;
    let row = touch(&env, "ann").await;
    assert_ne!(row, ann);
    answered_within(&mut c, "ann", Duration::from_secs(5), |a| {
        a["result"]["user"] == row
    })
    .await;
    // ... and the answer stays: nothing older comes back from memory.
    for _ in 0..50 {
        assert_eq!(c.get("ann").await["result"]["user"], row);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_storm_of_direct_changes_no_answer_is_older_than_redis_beyond_the_bound() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    let hot = c.call("put", json!({"username": "hot"})).await["result"]["user"].clone();
    let base = hot["version"].as_i64().unwrap();
    // (version, when Redis acknowledged it)
    let acked: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::new(Mutex::new(vec![(base, Instant::now())]));
    let writer = {
        let (acked, mut redis, hot) = (acked.clone(), env.redis().await, hot.clone());
        tokio::spawn(async move {
            for v in 1..=1500 {
                let mut value = hot.clone();
                value["version"] = json!(base + v);
                let _: () = redis::cmd("SET")
                    .arg("user:hot")
                    .arg(value.to_string())
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                acked.lock().unwrap().push((base + v, Instant::now()));
                if v % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let (mut answers, mut late) = (0u64, Vec::new());
    while !writer.is_finished() {
        let asked = Instant::now();
        let answer = c.get("hot").await;
        let version = answer["result"]["user"]["version"].as_i64().unwrap();
        // The newest version Redis had acknowledged BOUND before the get was asked.
        let settled = acked
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, at)| *at + BOUND <= asked)
            .map(|(v, _)| *v);
        if settled.is_some_and(|settled| version < settled) {
            late.push((version, settled));
        }
        answers += 1;
    }
    writer.await.unwrap();
    let hits = near_hits(&daemon).await;
    eprintln!(
        "{answers} answers, {hits} from the near cache, {} late",
        late.len()
    );
    assert!(
        late.is_empty(),
        "answers older than Redis beyond {BOUND:?}: {late:?}"
    );
    assert!(hits > 0, "the near cache answered some");
    // Once the storm is over, the last value is what is answered.
    let last = base + 1500;
    answered_within(&mut c, "hot", BOUND, |a| {
        a["result"]["user"]["version"] == json!(last)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_redis_could_not_tell_while_it_was_gone_is_never_answered_from_memory() {
    let mut env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    let ann = c.call("put", json!({"username": "ann"})).await["result"]["user"].clone();
    warm(&daemon, &mut c, "ann").await;

    // The daemon's connections are cut, and the key changes before it has tracking again: no
    // invalidation will ever come for the entry read on the lost connection. (Guarantee 9: once
    // the daemon has heard of the loss, the invalidation that completes. A get that reaches it
    // first, the loss still unread on its socket, may be answered from memory: on a loaded
    // machine it did.)
    let flushes = near(&daemon).await["flushes"].as_u64().unwrap();
    let mut redis = env.redis().await;
    let mut foreign = ann.clone();
    foreign["version"] = json!(ann["version"].as_i64().unwrap() + 1000);
    let _: () = redis::pipe()
        .cmd("CLIENT")
        .arg("KILL")
        .arg("SKIPME")
        .arg("yes")
        .arg("TYPE")
        .arg("normal")
        .ignore()
        .cmd("SET")
        .arg("user:ann")
        .arg(foreign.to_string())
        .ignore()
        .query_async(&mut redis)
        .await
        .unwrap();
    common::wait_until("the loss heard", Duration::from_secs(5), || async {
        near(&daemon).await["flushes"].as_u64().unwrap() > flushes
    })
    .await;
    // Until the daemon has looked at its new connection, reads go to PostgreSQL (the row, which
    // is no older than the entry); never to the entry held from the lost one. How soon the look
    // comes depends on the machine's load (CI runs these tests side by side): bounded loosely.
    answered_within(&mut c, "ann", Duration::from_secs(5), |a| {
        let (user, source) = (&a["result"]["user"], &a["result"]["source"]);
        assert!(*user == foreign || *source == "db", "{a}");
        *user == foreign
    })
    .await;
    for _ in 0..50 {
        assert_eq!(c.get("ann").await["result"]["user"], foreign);
    }
    deleted_in_redis(&env, &mut c, &ann).await;
    warm(&daemon, &mut c, "ann").await;

    // Redis dies; the row changes meanwhile; Redis comes back empty.
    env.redis.kill();
    let row = touch(&env, "ann").await;
    assert_ne!(row, ann);
    env.redis.start_again().expect("restart redis");
    common::wait_until("redis up again", Duration::from_secs(10), || async {
        daemon.health().await["redis"] == json!("up")
    })
    .await;
    for _ in 0..50 {
        let answer = c.get("ann").await;
        assert_eq!(answer["result"]["user"], row, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_of_zero_bytes_is_off() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config.cache.local_max_bytes = 0;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "ann"})).await;
    for _ in 0..5 {
        assert_eq!(c.get("ann").await["result"]["source"], json!("cache"));
    }
    let stats = near(&daemon).await;
    assert_eq!(
        stats,
        json!({"max_bytes": 0, "hits": 0, "entries": 0, "bytes": 0, "invalidations": 0, "flushes": 0, "table_flushes": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_redis_does_not_track_are_never_kept() {
    // An ACL without CLIENT TRACKING / CLIENT CACHING: every read answers, none is kept.
    let env = TestEnv::start().await;
    let mut admin = env.redis().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("untracked")
        .arg("on")
        .arg(">untracked-secret")
        .arg("resetkeys")
        .arg("~user:*")
        .arg("+@all")
        .arg("-client")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut config = env.config();
    config.redis.url = Some(cacheward::config::SecretUrl::new(format!(
        "{}&user=untracked&pass=untracked-secret",
        env.redis.url(3)
    )));
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "ann"})).await;
    for _ in 0..10 {
        assert_eq!(c.get("ann").await["result"]["source"], json!("cache"));
    }
    let stats = near(&daemon).await;
    assert_eq!(
        (stats["hits"].clone(), stats["entries"].clone()),
        (json!(0), json!(0)),
        "{stats}"
    );
}
