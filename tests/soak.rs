//! The randomized fault soak: daemon clients and plain-SQL writers change and read a small set of
//! users while faults of every kind the other tests inject hit the daemon, Redis and PostgreSQL.
//! Every answer is checked against the commit history (the outbox, with PostgreSQL's commit
//! timestamps): a `get` sent at t0 and answered at t1 must show a state of that user that was
//! current at some moment in [t0, t1]. Beside the JSON-RPC clients, a Redis client per daemon
//! caches on its side (`CLIENT TRACKING` on the Redis-protocol socket): what it answers from its
//! own memory is held to the same rule. At the end the cache must converge and `verify` find
//! nothing.
//!
//! Seeded and replayable (as far as timing allows): `CACHEWARD_SOAK_SEED` (printed on every run,
//! and in every failure), `CACHEWARD_SOAK_SECS` (default 20; the long run is 180:
//! `CACHEWARD_SOAK_SECS=180 cargo test --test soak -- --nocapture`).

mod common;
mod storm;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::history::{self, now_us, Rng, Seen, State};
use common::{wait_until, DaemonProcess, TestEnv};
use storm::*;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// A slow, jittery network between a daemon and Redis: a Unix-socket proxy that holds every chunk
/// for a random 0-`max_delay_ms` ms, in order, both ways. Returns its socket path.
fn jittery_proxy(dir: &Path, upstream: PathBuf, mut rng: Rng, max_delay_ms: u64) -> PathBuf {
    let path = dir.join("redis-proxy.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind the proxy");
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = UnixStream::connect(&upstream).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            for (from, to, seed) in [
                (
                    Box::new(client_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    Box::new(server_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    rng.next(),
                ),
                (Box::new(server_read), Box::new(client_write), rng.next()),
            ] {
                tokio::spawn(pump(from, to, Rng(seed), max_delay_ms));
            }
        }
    });
    path
}

async fn pump(
    mut from: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    mut to: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    mut rng: Rng,
    max_delay_ms: u64,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        tokio::time::sleep(Duration::from_millis(rng.below(max_delay_ms + 1))).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_fault_storm_every_answer_matches_the_commit_history() {
    let (seed, secs) = history::soak_settings("soak", 20);
    let mut rng = Rng(seed);
    let mut env = TestEnv::start().await;
    history::keep_history(&mut env).await;

    let calm = calm_names();
    bring_back(&env.pg().await, &calm).await.unwrap();
    // Two daemons on one database and cache, as a sidecar fleet runs: one applies the change
    // stream, the other stands by, and either may be frozen with a fill in flight while the other
    // applies changes.
    // The second reaches Redis over a slow, jittery network.
    let proxy = jittery_proxy(env.dir.path(), env.redis.socket(), Rng(rng.next()), 40);
    let proxied_url = format!("redis+unix://{}?db=3", proxy.display());
    let daemon_vars = [
        vec![("CACHEWARD__CACHE__TTL_SECS", "600")],
        vec![
            ("CACHEWARD__CACHE__TTL_SECS", "600"),
            ("REDIS_URL", proxied_url.as_str()),
            // Its Redis URL differs, so it would apply the stream as a cache of its own.
            ("CACHEWARD__CDC__ENABLED", "false"),
        ],
    ];
    let names = ["soak-a", "soak-b"];
    // Each serves the Redis protocol too, for clients that cache on their side.
    let resp_sockets: Vec<PathBuf> = names
        .iter()
        .map(|n| env.dir.path().join(format!("{n}-resp.sock")))
        .collect();
    let resp_paths: Vec<String> = resp_sockets
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let daemon_vars: Vec<Vec<(&str, &str)>> = daemon_vars
        .into_iter()
        .zip(&resp_paths)
        .map(|(mut vars, path)| {
            vars.push(("CACHEWARD__RESP__SOCKET", path.as_str()));
            vars
        })
        .collect();
    let mut daemons: Vec<DaemonProcess> = (0..2)
        .map(|i| DaemonProcess::spawn_with(&env, names[i], &daemon_vars[i]))
        .collect();
    for daemon in &daemons {
        daemon.wait_ready().await;
    }
    let stop = CancellationToken::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sockets: Vec<PathBuf> = daemons.iter().map(|d| d.socket.clone()).collect();
    let workers = start_clients(&sockets, &resp_sockets, &env.db_url, &mut rng, &stop, &seen);

    let pids = Arc::new(Mutex::new([daemons[0].child.id(), daemons[1].child.id()]));
    let freezes = tokio::spawn(freezer(pids.clone(), Rng(rng.next()), stop.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut faults: Vec<Fault> = Vec::new();
    let mut probes = 0;
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(700 + rng.below(1500))).await;
        // The TRUNCATE race (8) three times as often as the others: it needs many tries.
        let fault = match rng.below(13) {
            10 | 11 => 8,
            12 => 10,
            other => other,
        };
        let pause = Duration::from_millis(100 + rng.below(400));
        let began_us = now_us();
        let which = rng.below(2) as usize;
        let name = match fault {
            0 => history::inject(&mut env, history::Fault::RedisRestart, pause).await,
            1 => history::inject(&mut env, history::Fault::RedisFlush, pause).await,
            2 => {
                // Entries expiring (TTL) or evicted.
                let mut conn = env.redis().await;
                let keys: Vec<String> = (0..8).map(|_| format!("user:{}", rng.name())).collect();
                let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                "keys expired"
            }
            3 => history::inject(&mut env, history::Fault::RedisFrozen, pause).await,
            4 => {
                let daemon = &daemons[which];
                daemon.signal(libc::SIGSTOP);
                tokio::time::sleep(pause).await;
                daemon.signal(libc::SIGCONT);
                "daemon frozen"
            }
            5 | 6 => {
                let (sig, within, name) = match fault {
                    5 => (libc::SIGKILL, 5, "daemon killed and restarted"),
                    _ => (libc::SIGTERM, 15, "daemon stopped and restarted"),
                };
                let daemon = &mut daemons[which];
                daemon.signal(sig);
                daemon.wait_exit(Duration::from_secs(within));
                keep_log(&daemon.log);
                *daemon = DaemonProcess::spawn_with(&env, names[which], &daemon_vars[which]);
                pids.lock().expect("not poisoned")[which] = daemon.child.id();
                name
            }
            7 => history::inject(&mut env, history::Fault::PostgresCrash, pause).await,
            8 => {
                // The reproduction, four times: the calm users are there and cached, their
                // entries expire, the daemon behind the slow proxy is asked for all of them, and a
                // TRUNCATE lands while its fills (which read before it) are on the way. Past the
                // staleness bound they are read again: a fill that landed after the TRUNCATE was
                // applied would answer for a user that no longer exists.
                let calm = calm_names();
                let keys: Vec<String> = calm.iter().map(|n| format!("user:{n}")).collect();
                if let Ok(pg) =
                    cacheward::store::pg::connect(&env.db_url.parse().expect("url")).await
                {
                    let mut conn = env.redis().await;
                    for _ in 0..4 {
                        let _ = bring_back(&pg, &calm).await;
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        let _: Result<i64, _> =
                            redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                        let slow = daemons[1].socket.clone();
                        let recorded = seen.clone();
                        let reads = tokio::spawn(async move { read_calm(&slow, &recorded).await });
                        tokio::time::sleep(Duration::from_micros(rng.below(80_000))).await;
                        let _ = pg.batch_execute("TRUNCATE users").await;
                        let _ = reads.await;
                        let past_staleness = STALENESS_US as u64 + 300_000;
                        tokio::time::sleep(Duration::from_micros(past_staleness)).await;
                        read_calm(&daemons[0].socket, &seen).await;
                    }
                }
                "calm entries expired, read through the slow proxy, TRUNCATE"
            }
            10 => {
                // Redis comes back with an older state (a restart from persisted data, a
                // failover): what was written since the snapshot is gone, the fence is not. The
                // calm users are cached when the snapshot is taken and deleted before the restart:
                // their tombstones are lost, and past the staleness bound they are read again.
                let calm = calm_names();
                let pg = cacheward::store::pg::connect(&env.db_url.parse().expect("url"))
                    .await
                    .ok();
                if let Some(pg) = &pg {
                    let _ = bring_back(pg, &calm).await;
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    read_calm(&daemons[0].socket, &seen).await;
                }
                let mut conn = env.redis().await;
                let saved: Result<(), _> = redis::cmd("SAVE").query_async(&mut conn).await;
                let snapshot = env.dir.path().join("older.rdb");
                let copied = std::fs::copy(env.redis.dir().join("dump.rdb"), &snapshot);
                if let Some(pg) = &pg {
                    let _ = pg
                        .execute("DELETE FROM users WHERE username = ANY($1)", &[&calm])
                        .await;
                }
                tokio::time::sleep(pause + Duration::from_millis(300)).await;
                env.redis.kill();
                if saved.is_ok() && copied.is_ok() {
                    let _ = std::fs::copy(&snapshot, env.redis.dir().join("dump.rdb"));
                }
                env.redis.start_again().expect("restart redis");
                // Loaded: a later "restarted empty" must not find it.
                let _ = std::fs::remove_file(env.redis.dir().join("dump.rdb"));
                tokio::time::sleep(Duration::from_micros(STALENESS_US as u64 + 300_000)).await;
                read_calm(&daemons[0].socket, &seen).await;
                read_calm(&daemons[1].socket, &seen).await;
                "redis restarted from an older snapshot"
            }
            _ => {
                let pg = env.pg().await;
                let _ = pg
                    .batch_execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name LIKE 'cacheward%' AND pid <> pg_backend_pid()",
                    )
                    .await;
                "daemon's connections terminated"
            }
        };
        // A fault that stops the CDC worker lasts until the worker has demonstrably caught up
        // again: only then do answers go back to being held to the normal staleness bound.
        let stalls_cdc = matches!(fault, 3..=7 | 9);
        if stalls_cdc {
            probes += 1;
            caught_up(&env, probes).await;
        }
        faults.push(Fault {
            name,
            began_us,
            ended_us: now_us(),
            stalls_cdc,
        });
    }
    stop.cancel();
    faults.extend(freezes.await.expect("freezer"));
    for worker in workers {
        worker.await.expect("worker");
    }

    // Quiet: the cache converges and verify agrees.
    for daemon in &daemons {
        daemon.wait_ready().await;
    }
    let names = all_names();
    wait_until(
        &format!("convergence after the storm (seed {seed})"),
        Duration::from_secs(10),
        || env.agrees(&names),
    )
    .await;
    let verify = env.verify();
    assert!(
        verify.status.success(),
        "verify after the storm (seed {seed}): {}",
        String::from_utf8_lossy(&verify.stdout)
    );

    storm::judge(&env, "soak", seed, &seen, &faults).await;
    for mut daemon in daemons {
        daemon.signal(libc::SIGTERM);
        daemon.wait_exit(Duration::from_secs(15));
    }
}

/// The checker itself: an answer showing a state superseded well before the request is flagged;
/// one superseded while it was in flight, or within the allowance, is not.
#[test]
fn the_checker_flags_answers_no_moment_explains() {
    let state = |committed_us, version, present| State {
        committed_us,
        version,
        present,
    };
    let states = [
        state(1_000_000, 5, true),
        state(2_000_000, 9, true),
        state(3_000_000, 9, false),
    ];
    let o = |sent_us, answered_us, seen| Observation {
        name: "n".into(),
        sent_us,
        answered_us,
        seen,
        source: "cache".into(),
    };
    let ok = |o: &Observation| explained(o, &states, 500_000);
    assert!(ok(&o(1_500_000, 1_500_100, Seen::Present(5))));
    assert!(
        ok(&o(2_400_000, 2_400_100, Seen::Present(5))),
        "within the allowance"
    );
    assert!(
        !ok(&o(2_600_000, 2_600_100, Seen::Present(5))),
        "superseded 0.6 s before"
    );
    assert!(
        ok(&o(500_000, 600_000, Seen::Absent)),
        "before the first insert"
    );
    assert!(!ok(&o(1_600_000, 1_600_100, Seen::Absent)));
    assert!(
        !ok(&o(800_000, 900_000, Seen::Present(5))),
        "not committed yet"
    );
    assert!(
        ok(&o(800_000, 1_000_100, Seen::Present(5))),
        "committed while in flight"
    );
    assert!(ok(&o(3_100_000, 3_100_100, Seen::Absent)));
    assert!(
        !ok(&o(3_600_000, 3_600_100, Seen::Present(9))),
        "deleted 0.6 s before"
    );
    assert!(
        !ok(&o(2_500_000, 2_500_100, Seen::Present(7))),
        "never a state"
    );
}
