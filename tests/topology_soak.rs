//! The fault storm (tests/storm) on the topologies production runs. On a Redis Cluster: primaries
//! killed and restarted, frozen past the node timeout and short of it, failed over by `CLUSTER
//! FAILOVER FORCE` and `TAKEOVER` (often after their replication was cut: the promoted replica
//! misses seconds of writes), slots resharded under load, and a primary restarted from an older
//! snapshot. On a Sentinel group: the master killed and restarted, frozen, failed over by
//! `SENTINEL FAILOVER` (often lossy), and sentinels killed. On both, the daemons are killed and
//! frozen meanwhile. Two daemons (one applies the change stream, the other stands by) serve JSON-RPC
//! clients and Redis clients that cache on their side; every answer is checked against the commit
//! history, the cache must converge and `verify` find nothing.
//!
//! Lossy failovers hold the calm users' deletion back from the replica for longer than the staleness
//! bound, so that serving the promoted replica's old entries, even for a moment, is an answer the
//! checker flags.
//!
//! 20 s of each in `cargo test`; `CACHEWARD_SOAK_SECS` and `CACHEWARD_SOAK_SEED` as for the soak
//! (`CACHEWARD_SOAK_SECS=600 cargo test --test topology_soak -- --nocapture`).

mod common;
mod storm;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cacheward::config::{Config, RedisMode, SecretUrl};
use cacheward::dev::cluster::RedisCluster;
use cacheward::dev::sentinel::{RedisSentinels, MASTER};
use common::history::{self, now_us, Rng};
use common::{wait_until, DaemonProcess, TestEnv};
use storm::*;
use tokio_util::sync::CancellationToken;

/// The Redis servers a storm runs on.
enum Servers {
    Cluster(RedisCluster),
    Sentinel(RedisSentinels),
}

impl Servers {
    /// What the daemons are started with: the Redis URL and settings.
    fn daemon_settings(&self) -> (String, Vec<(String, String)>) {
        let common = [
            ("CACHEWARD__CACHE__TTL_SECS", "600".to_owned()),
            ("CACHEWARD__REDIS__TIMEOUT_MS", "500".to_owned()),
        ];
        let mut vars: Vec<(String, String)> =
            common.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        match self {
            Servers::Cluster(cluster) => {
                let urls = cluster.urls();
                vars.push(("CACHEWARD__REDIS__MODE".into(), "cluster".into()));
                vars.push(("CACHEWARD__REDIS__URLS".into(), urls[1..].join(",")));
                (urls[0].clone(), vars)
            }
            Servers::Sentinel(group) => {
                vars.push(("CACHEWARD__REDIS__MODE".into(), "sentinel".into()));
                vars.push((
                    "CACHEWARD__REDIS__URLS".into(),
                    group.sentinel_urls().join(","),
                ));
                vars.push(("CACHEWARD__REDIS__SENTINEL_MASTER".into(), MASTER.into()));
                // Under Sentinel, redis.url lends its settings to the master; its host is unused.
                ("redis://127.0.0.1:1/0".into(), vars)
            }
        }
    }

    /// The configuration `verify` runs with.
    fn config(&self, env: &TestEnv) -> Config {
        let mut config = env.config();
        match self {
            Servers::Cluster(cluster) => {
                let urls = cluster.urls();
                config.redis.mode = RedisMode::Cluster;
                config.redis.url = Some(SecretUrl::new(urls[0].clone()));
                config.redis.urls = urls[1..].iter().cloned().map(SecretUrl::new).collect();
            }
            Servers::Sentinel(group) => common::follow_sentinels(&mut config, group),
        }
        config
    }

    /// The value at `key`, asked of the primary serving it now (`None` when none answers).
    async fn get(&self, key: &str) -> Option<String> {
        // A cluster whose nodes disagree can leave a connection waiting: bounded.
        tokio::time::timeout(Duration::from_secs(2), self.get_now(key))
            .await
            .ok()
            .flatten()
    }

    async fn get_now(&self, key: &str) -> Option<String> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        match self {
            Servers::Cluster(cluster) => {
                let client = redis::cluster::ClusterClient::new(cluster.urls()).ok()?;
                let mut conn = client.get_async_connection().await.ok()?;
                cmd.query_async(&mut conn).await.ok()?
            }
            Servers::Sentinel(group) => {
                let port = tokio::task::block_in_place(|| group.primary())?;
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                cmd.query_async(&mut conn).await.ok()?
            }
        }
    }

    /// Waits (blocking, up to 30 s) until the servers serve again: every slot covered and every
    /// replica in sync; a master the sentinels name, with its replica in sync.
    fn settle(&self) {
        tokio::task::block_in_place(|| match self {
            Servers::Cluster(cluster) => {
                // A resharding cut short by a failover leaves slots open, as in production:
                // closed the way an operator would.
                if cluster.await_state_ok(Duration::from_secs(5)).is_err()
                    || cluster.has_open_slots()
                {
                    let fixed = cluster.fix();
                    eprintln!("cluster: redis-cli --cluster fix: {fixed:?}");
                }
                let _ = cluster.await_state_ok(Duration::from_secs(30));
                let _ = cluster.await_replicas_synced(Duration::from_secs(30));
            }
            Servers::Sentinel(group) => {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while std::time::Instant::now() < deadline {
                    let said = group.sentinels_say();
                    let synced = group.replica().is_some_and(|r| {
                        group
                            .ask(r, "INFO replication")
                            .contains("master_link_status:up")
                    });
                    if said.is_some() && said == group.primary() && synced {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
    }
}

/// A storm's daemons: two, on the same servers, each serving the Redis protocol too.
struct Daemons {
    env_dir: PathBuf,
    db_url: String,
    redis_url: String,
    vars: Vec<Vec<(String, String)>>,
    sockets: Vec<PathBuf>,
    running: Vec<DaemonProcess>,
}

impl Daemons {
    fn spawn(&self, i: usize) -> DaemonProcess {
        let vars: Vec<(&str, &str)> = self.vars[i]
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        storm::keep_log(&self.sockets[i].with_extension("log"));
        DaemonProcess::serve(
            &self.env_dir,
            &self.sockets[i],
            &self.db_url,
            &self.redis_url,
            &vars,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_storm_on_a_redis_cluster_serves_nothing_the_history_does_not_explain() {
    let cluster = tokio::task::block_in_place(RedisCluster::start).expect("start the cluster");
    storm("cluster storm", Servers::Cluster(cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_storm_on_a_sentinel_group_serves_nothing_the_history_does_not_explain() {
    let group = tokio::task::block_in_place(RedisSentinels::start).expect("start sentinels");
    storm("sentinel storm", Servers::Sentinel(group)).await;
}

async fn storm(label: &str, mut servers: Servers) {
    let (seed, secs) = history::soak_settings(label, 20);
    let mut rng = Rng(seed);
    let mut env = TestEnv::start().await;
    history::keep_history(&mut env).await;
    let calm = calm_names();
    bring_back(&env.pg().await, &calm).await.unwrap();

    let (redis_url, settings) = servers.daemon_settings();
    let names = ["storm-a", "storm-b"];
    let sockets: Vec<PathBuf> = names
        .iter()
        .map(|n| env.dir.path().join(format!("{n}.sock")))
        .collect();
    let resp_sockets: Vec<PathBuf> = names
        .iter()
        .map(|n| env.dir.path().join(format!("{n}-resp.sock")))
        .collect();
    let vars = resp_sockets
        .iter()
        .map(|resp| {
            let mut vars = settings.clone();
            vars.push(("CACHEWARD__RESP__SOCKET".into(), resp.display().to_string()));
            vars
        })
        .collect();
    let mut daemons = Daemons {
        env_dir: env.dir.path().to_owned(),
        db_url: env.db_url.clone(),
        redis_url,
        vars,
        sockets,
        running: Vec::new(),
    };
    daemons.running = (0..2).map(|i| daemons.spawn(i)).collect();
    for daemon in &daemons.running {
        daemon.wait_ready().await;
    }

    let stop = CancellationToken::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let workers = start_clients(
        &daemons.sockets,
        &resp_sockets,
        &env.db_url,
        &mut rng,
        &stop,
        &seen,
    );
    let pids = Arc::new(Mutex::new([
        daemons.running[0].child.id(),
        daemons.running[1].child.id(),
    ]));
    let freezes = tokio::spawn(freezer(pids.clone(), Rng(rng.next()), stop.clone()));

    // One kind of fault only, by its number (0-9), to chase one of them.
    let pinned: Option<u64> = std::env::var("CACHEWARD_STORM_FAULT")
        .ok()
        .and_then(|v| v.parse().ok());
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut faults: Vec<Fault> = Vec::new();
    let mut probes = 0;
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1200))).await;
        let pause = Duration::from_millis(100 + rng.below(400));
        // When the fault began: a fault that prepares first (the calm users cached and deleted
        // on a cut-off primary) moves it to the failover itself, so that the answers after it
        // are allowed no more staleness than the failover explains.
        let mut began_us = now_us();
        let fault = rng.below(10);
        let (name, stalls_cdc) = match pinned.unwrap_or(fault) {
            8 => {
                let which = rng.below(2) as usize;
                let (sig, within) = match rng.below(2) {
                    0 => (libc::SIGKILL, 5),
                    _ => (libc::SIGTERM, 15),
                };
                let daemon = &mut daemons.running[which];
                daemon.signal(sig);
                daemon.wait_exit(Duration::from_secs(within));
                let again = daemons.spawn(which);
                pids.lock().expect("not poisoned")[which] = again.child.id();
                daemons.running[which] = again;
                ("daemon killed and restarted", true)
            }
            9 => {
                let daemon = &daemons.running[rng.below(2) as usize];
                daemon.signal(libc::SIGSTOP);
                tokio::time::sleep(pause).await;
                daemon.signal(libc::SIGCONT);
                ("daemon frozen", true)
            }
            n => {
                let sockets = daemons.sockets.clone();
                let fault = match &mut servers {
                    Servers::Cluster(cluster) => {
                        cluster_fault(n, cluster, &env, &mut rng, &sockets, &seen, &mut began_us)
                            .await
                    }
                    Servers::Sentinel(group) => {
                        sentinel_fault(n, group, &env, &mut rng, &sockets, &seen, &mut began_us)
                            .await
                    }
                };
                (fault, true)
            }
        };
        eprintln!("{label}: {name} ({} ms)", (now_us() - began_us) / 1000);
        servers.settle();
        if stalls_cdc {
            probes += 1;
            let servers = &servers;
            let caught = caught_up_in(&env, probes, |key| async move { servers.get(&key).await });
            if !caught.await {
                for daemon in &daemons.running {
                    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!(
                        "{label}: {}:\n{}",
                        daemon.log.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                panic!(
                    "{label} (seed {seed}): the CDC worker did not catch up within 30 s of: {name}"
                );
            }
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
    for daemon in &daemons.running {
        daemon.wait_ready().await;
    }
    let all = all_names();
    wait_until(
        &format!("convergence after the {label} (seed {seed})"),
        Duration::from_secs(15),
        || async {
            for name in &all {
                let entry = servers.get(&format!("user:{name}")).await;
                let live = entry
                    .filter(|v| cacheward::model::entry::is_live(v))
                    .map(|v| serde_json::from_str::<serde_json::Value>(&v).expect("JSON"));
                let row = env.row_json(name).await;
                if live.is_some() && live != row {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let report = cacheward::cli::verify::verify(&servers.config(&env), false)
        .await
        .expect("verify");
    assert!(
        report.mismatches.is_empty(),
        "verify after the {label} (seed {seed}): {:?}",
        report.mismatches
    );
    judge(&env, label, seed, &seen, &faults).await;
    for mut daemon in daemons.running {
        daemon.signal(libc::SIGTERM);
        daemon.wait_exit(Duration::from_secs(15));
    }
}

/// The calm users are back and cached through both daemons: entries a replica then holds too.
async fn calm_cached(env: &TestEnv, sockets: &[PathBuf], seen: &Mutex<Vec<Observation>>) {
    let pg = env.pg().await;
    let _ = bring_back(&pg, &calm_names()).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    for socket in sockets {
        read_calm(socket, seen).await;
    }
    // Replicated (the replicas are in sync, and 100 ms is ages on one machine).
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The calm users deleted: their tombstones are what a replica cut off from its primary, or an
/// older snapshot, lacks. Then a wait past the staleness bound, so that an old entry served
/// afterwards is an answer the checker flags.
async fn calm_deleted(env: &TestEnv) {
    let pg = env.pg().await;
    let _ = pg
        .execute(
            "DELETE FROM users WHERE username = ANY($1)",
            &[&calm_names()],
        )
        .await;
    tokio::time::sleep(Duration::from_micros(STALENESS_US as u64 + 500_000)).await;
}

/// Reads every calm user through both daemons every 10 ms for `how_long`, in the background:
/// started before a failover, it reads through the moment the daemons move to the promoted node.
fn calm_read_throughout(
    sockets: &[PathBuf],
    seen: &Arc<Mutex<Vec<Observation>>>,
    how_long: Duration,
) -> tokio::task::JoinHandle<()> {
    let (sockets, seen) = (sockets.to_vec(), seen.clone());
    tokio::spawn(async move {
        let until = std::time::Instant::now() + how_long;
        while std::time::Instant::now() < until {
            for socket in &sockets {
                read_calm(socket, &seen).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Past the staleness bound, every calm user is read through both daemons: an entry the deletion
/// did not reach would answer for a user that is gone.
async fn calm_read_again(sockets: &[PathBuf], seen: &Mutex<Vec<Observation>>) {
    tokio::time::sleep(Duration::from_micros(STALENESS_US as u64 + 300_000)).await;
    for socket in sockets {
        read_calm(socket, seen).await;
    }
}

/// One Cluster fault (`n` < 8); returns its name.
async fn cluster_fault(
    n: u64,
    cluster: &mut RedisCluster,
    env: &TestEnv,
    rng: &mut Rng,
    sockets: &[PathBuf],
    seen: &Arc<Mutex<Vec<Observation>>>,
    began_us: &mut i64,
) -> &'static str {
    let primaries = tokio::task::block_in_place(|| cluster.primaries());
    let Some(&primary) = primaries.get(rng.below(primaries.len().max(1) as u64) as usize) else {
        return "no primary to fault";
    };
    let node = cluster.node(primary).expect("a node of the cluster");
    match n {
        0 => {
            // A primary without a replica (failovers moved them) leaves its slots uncovered
            // until it is back: then it comes back at once.
            let replica = tokio::task::block_in_place(|| cluster.replica_of(primary));
            cluster.kill(node);
            // Or it is back before its replica took over: it loads the file its last full sync
            // as a replica left, if any (Redis keeps it), whose slots may be fewer than it serves
            // now, and keeps its slots.
            let early = replica.is_some() && rng.below(3) == 0;
            if early {
                tokio::time::sleep(Duration::from_millis(100 + rng.below(900))).await;
            } else {
                tokio::time::sleep(Duration::from_millis(2000 + rng.below(1000))).await;
            }
            tokio::task::block_in_place(|| {
                if let Some(replica) = replica.filter(|_| !early) {
                    // The failure takes the node timeout to spread: until the replica says it is
                    // the primary, the cluster may still say `ok`.
                    let deadline = std::time::Instant::now() + Duration::from_secs(30);
                    while !cluster.ask(replica, "ROLE").contains("master")
                        && std::time::Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let _ = cluster.await_state_ok(Duration::from_secs(30));
                }
                cluster.start_again(node).expect("restart the node");
            });
            match (replica.is_some(), early) {
                (true, false) => "primary killed, replica promoted, old primary back as a replica",
                (true, true) => "primary killed and back before its replica took over",
                (false, _) => "primary without a replica killed and restarted",
            }
        }
        1 if rng.below(2) == 0 => {
            // Short of the node timeout (1.5 s) or past it.
            let frozen = Duration::from_millis(300 + rng.below(2500));
            cluster.pause(node);
            tokio::time::sleep(frozen).await;
            cluster.resume(node);
            "primary frozen"
        }
        1 => {
            // A partial outage: frozen past the node timeout, its replica kept from taking over,
            // the others serving on.
            tokio::task::block_in_place(|| cluster.hold_failover(primary, true));
            cluster.pause(node);
            tokio::time::sleep(Duration::from_millis(2000 + rng.below(2000))).await;
            cluster.resume(node);
            tokio::task::block_in_place(|| {
                let _ = cluster.await_no_failure_flags(Duration::from_secs(30));
                cluster.hold_failover(primary, false);
            });
            "primary frozen past the node timeout, its replica kept from taking over"
        }
        2..=4 => {
            let Some(replica) = tokio::task::block_in_place(|| cluster.replica_of(primary)) else {
                return "no replica to promote";
            };
            let lossy = rng.below(3) != 0;
            if lossy {
                calm_cached(env, sockets, seen).await;
                let _ = tokio::task::block_in_place(|| cluster.cut_replication(primary));
                calm_deleted(env).await;
            }
            let how = if n == 4 { "TAKEOVER" } else { "FORCE" };
            let reads = lossy.then(|| calm_read_throughout(sockets, seen, Duration::from_secs(2)));
            *began_us = now_us();
            tokio::task::block_in_place(|| {
                cluster.ask(replica, &format!("CLUSTER FAILOVER {how}"));
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !cluster.ask(replica, "ROLE").contains("master")
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                // The old primary, now a replica, lets replicas sync from it again.
                cluster.ask(primary, "ACL SETUSER replication on");
            });
            if let Some(reads) = reads {
                let _ = reads.await;
                calm_read_again(sockets, seen).await;
            }
            match (n == 4, lossy) {
                (false, false) => "CLUSTER FAILOVER FORCE",
                (false, true) => "CLUSTER FAILOVER FORCE to a replica cut off for seconds",
                (true, false) => "CLUSTER FAILOVER TAKEOVER",
                (true, true) => "CLUSTER FAILOVER TAKEOVER of a replica cut off for seconds",
            }
        }
        5 | 6 => {
            let Some(&to) = primaries.iter().find(|&&p| p != primary) else {
                return "no primary to reshard to";
            };
            let slots = 50 + rng.below(200) as u32;
            match tokio::task::block_in_place(|| cluster.reshard(primary, to, slots)) {
                Ok(()) => "slots resharded under load",
                Err(_) => "a resharding refused or cut short",
            }
        }
        _ => {
            // Restarted from an older snapshot before its replica takes over: what was written
            // since (the calm users' tombstones) is gone, the fences are not.
            let dir = env.dir.path().to_owned();
            calm_cached(env, sockets, seen).await;
            let snapshot = tokio::task::block_in_place(|| cluster.snapshot(primary, &dir));
            let Ok(snapshot) = snapshot else {
                return "no snapshot taken";
            };
            calm_deleted(env).await;
            *began_us = now_us();
            tokio::task::block_in_place(|| cluster.restart_from(node, &snapshot))
                .expect("restart from the snapshot");
            calm_read_again(sockets, seen).await;
            "primary restarted from an older snapshot"
        }
    }
}

/// One Sentinel fault (`n` < 8); returns its name.
async fn sentinel_fault(
    n: u64,
    group: &mut RedisSentinels,
    env: &TestEnv,
    rng: &mut Rng,
    sockets: &[PathBuf],
    seen: &Arc<Mutex<Vec<Observation>>>,
    began_us: &mut i64,
) -> &'static str {
    let Some(primary) = tokio::task::block_in_place(|| group.primary()) else {
        return "no master to fault";
    };
    match n {
        0 | 1 => {
            group.kill(primary);
            tokio::task::block_in_place(|| {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while std::time::Instant::now() < deadline
                    && !(group.sentinels_say().is_some_and(|p| p != primary)
                        && group.primary().is_some())
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                group.start_again(primary).expect("restart the old master");
            });
            "master killed, replica promoted, old master back as a replica"
        }
        2..=4 => {
            let lossy = rng.below(3) != 0;
            if lossy {
                calm_cached(env, sockets, seen).await;
                let _ = tokio::task::block_in_place(|| group.cut_replication());
                calm_deleted(env).await;
            }
            let reads = lossy.then(|| calm_read_throughout(sockets, seen, Duration::from_secs(2)));
            *began_us = now_us();
            tokio::task::block_in_place(|| {
                let _ = group.force_failover();
                let deadline = std::time::Instant::now() + Duration::from_secs(15);
                while group.primary() == Some(primary) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                group.ask(primary, "ACL SETUSER replication on");
            });
            if let Some(reads) = reads {
                let _ = reads.await;
                calm_read_again(sockets, seen).await;
                "SENTINEL FAILOVER to a replica cut off for seconds"
            } else {
                "SENTINEL FAILOVER"
            }
        }
        5 => {
            let which = rng.below(cacheward::dev::sentinel::SENTINELS as u64) as usize;
            group.kill_sentinel(which);
            tokio::time::sleep(Duration::from_millis(300 + rng.below(1500))).await;
            tokio::task::block_in_place(|| group.start_sentinel_again(which))
                .expect("restart the sentinel");
            "a sentinel killed and restarted"
        }
        _ => {
            // Short of down-after-milliseconds (1 s) or past it.
            let frozen = Duration::from_millis(300 + rng.below(2000));
            group.freeze(primary, true);
            tokio::time::sleep(frozen).await;
            group.freeze(primary, false);
            "master frozen"
        }
    }
}
