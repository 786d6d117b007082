//! The live consistency checker (`service::consistency`): it samples cached entries, never counts
//! a change still in flight as a mismatch, and reports an entry that stays wrong.

mod common;

use std::time::{Duration, Instant};

use common::{wait_until, Daemon, TestEnv};
use serde_json::{json, Value};

async fn consistency(daemon: &Daemon) -> Value {
    daemon.stats().await["consistency"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_flight_are_not_mismatches_and_a_wrong_entry_is() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config.consistency.sample_per_sec = 200;
    config.consistency.window_ms = 1200;
    // Out-of-band changes reach Redis only at the next poll, up to half a second later: many are
    // seen in flight (an entry older than its row), none stays so for a whole window.
    config.cdc.notify = false;
    config.cdc.poll_interval_ms = 500;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    let names: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    for name in &names {
        c.call("put", json!({ "username": name })).await;
    }
    // Read twice: in Redis, then in the near cache too.
    c.get_all(&names).await;
    c.get_all(&names).await;

    // A storm of out-of-band changes and writes through the daemon: every entry is in flight for
    // a moment, none for a whole window.
    let pg = env.pg().await;
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let name = &names[round % names.len()];
        pg.execute(
            "UPDATE users SET created_at = now() WHERE username = $1",
            &[name],
        )
        .await
        .unwrap();
        if round % 3 == 0 {
            c.call("rename", json!({"username": name, "new_username": name}))
                .await;
        }
        c.get_all(&names[..5]).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let seen = consistency(&daemon).await;
    assert!(seen["checked"].as_u64().unwrap() >= 40, "{seen}");
    assert_eq!(
        seen["mismatched"],
        json!(0),
        "a change in flight counted: {seen}"
    );
    assert_eq!(seen["oldest_mismatch_ms"], json!(0), "{seen}");

    // An entry written around the daemon, older than its row, stays wrong: a mismatch.
    let row = env.row_json("c7").await.unwrap();
    let mut stale = row.clone();
    stale["version"] = json!(row["version"].as_i64().unwrap() - 1);
    stale["created_at"] = json!("2001-01-01T00:00:00Z");
    let mut redis = env.redis().await;
    let _: () = redis::cmd("SET")
        .arg("user:c7")
        .arg(stale.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    wait_until(
        "the mismatch is reported",
        Duration::from_secs(10),
        || async { consistency(&daemon).await["mismatched"].as_u64().unwrap() >= 1 },
    )
    .await;
    // Repaired by the checker itself: the wrong entry dropped, the row served and cached again,
    // and the mismatch no longer outstanding.
    for (name, forged) in [("c7", None), ("c8", Some(i64::MAX / 2))] {
        if let Some(version) = forged {
            // Written around the daemon with a version no row has: no write ever replaces it.
            let mut wrong = env.row_json(name).await.unwrap();
            wrong["version"] = json!(version);
            wrong["created_at"] = json!("2001-01-01T00:00:00Z");
            let _: () = redis::cmd("SET")
                .arg(format!("user:{name}"))
                .arg(wrong.to_string())
                .query_async(&mut redis)
                .await
                .unwrap();
        }
        wait_until(
            &format!("{name} repaired"),
            Duration::from_secs(10),
            || async {
                let answer = daemon.client().await.get(name).await;
                Some(&answer["result"]["user"]) == env.row_json(name).await.as_ref()
                    && env
                        .cached(name)
                        .await
                        .and_then(|c| serde_json::from_str::<Value>(&c).ok())
                        == env.row_json(name).await
            },
        )
        .await;
    }
    wait_until(
        "no mismatch outstanding",
        Duration::from_secs(10),
        || async { consistency(&daemon).await["oldest_mismatch_ms"] == json!(0) },
    )
    .await;
}
