//! Read-your-writes across daemons (docs/reference.md, "Read-your-writes"): a client that wrote through one daemon reads its
//! write through any other by passing the answered version as `min_version`, with no sleep, even
//! while the cache lags the database.

mod common;

use common::{kind, Daemon, Rpc, TestEnv};
use serde_json::{json, Value};

async fn daemon(env: &TestEnv, name: &str) -> Daemon {
    let mut config = env.config();
    config.socket.path = env.dir.path().join(format!("{name}.sock"));
    env.start_daemon(config).await
}

async fn get_at(c: &mut Rpc, username: &str, min_version: i64) -> Value {
    c.call(
        "get",
        json!({"username": username, "min_version": min_version}),
    )
    .await
}

fn version(user: &Value) -> i64 {
    user["version"].as_i64().expect("a version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_daemon_is_read_through_the_others_while_redis_lags() {
    let env = TestEnv::start().await;
    let (a, b, c) = (
        daemon(&env, "a").await,
        daemon(&env, "b").await,
        daemon(&env, "c").await,
    );
    let (mut a, mut b, mut c) = (a.client().await, b.client().await, c.client().await);

    // Redis keeps up: the cached entry qualifies (a put's own version is the state it answers),
    // and nothing reads the database.
    let ann = a.call("put", json!({"username": "ann"})).await["result"]["user"].clone();
    let seen = get_at(&mut b, "ann", version(&ann)).await;
    assert_eq!(seen["result"], json!({"user": ann, "source": "cache"}));
    for name in ["bob", "cat", "dan"] {
        a.call("put", json!({"username": name})).await;
        assert_eq!(b.get(name).await["result"]["source"], json!("cache"));
    }

    // Redis stops taking writes (as under a partition between the writer and Redis): the writer's
    // Redis half times out, the database half is answered, every other daemon's cache lags.
    let mut redis = env.redis().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(20_000)
        .arg("WRITE")
        .query_async(&mut redis)
        .await
        .unwrap();

    let deleted = a.call("delete", json!({"username": "bob"})).await["result"].clone();
    assert_eq!(deleted["deleted"], json!(true), "{deleted}");
    let renamed = a
        .call("rename", json!({"username": "cat", "new_username": "cy"}))
        .await["result"]["user"]
        .clone();
    let back = a
        .call("rename", json!({"username": "dan", "new_username": "di"}))
        .await;
    assert!(back["result"].is_object(), "{back}");
    let dan = a
        .call("rename", json!({"username": "di", "new_username": "dan"}))
        .await["result"]["user"]
        .clone();

    // The hazard is real: without min_version, a daemon answers from the lagging cache.
    assert_eq!(c.get("bob").await["result"]["source"], json!("cache"));
    assert_eq!(c.get("cat").await["result"]["source"], json!("cache"));
    assert!(version(&c.get("dan").await["result"]["user"]) < version(&dan));

    // With it, every other daemon answers the write, at once.
    for other in [&mut b, &mut c] {
        let bob = get_at(other, "bob", deleted["version"].as_i64().unwrap()).await;
        assert_eq!(kind(&bob), "not_found", "a deletion read back: {bob}");
        let cat = get_at(other, "cat", version(&renamed)).await;
        assert_eq!(
            kind(&cat),
            "not_found",
            "a rename's old name read back: {cat}"
        );
        let cy = get_at(other, "cy", version(&renamed)).await;
        assert_eq!(
            cy["result"]["user"], renamed,
            "a rename's new name read back"
        );
        let read = get_at(other, "dan", version(&dan)).await;
        assert_eq!(read["result"], json!({"user": dan, "source": "db"}));
    }
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut redis)
        .await
        .unwrap();

    // A name taken again after a deletion has a version above the deletion's.
    let again = a.call("put", json!({"username": "bob"})).await["result"]["user"].clone();
    assert!(version(&again) >= deleted["version"].as_i64().unwrap());
    let bob = get_at(&mut b, "bob", deleted["version"].as_i64().unwrap()).await;
    assert_eq!(bob["result"]["user"], again);
}
