//! Cluster mode (`redis.mode = "cluster"`) on the harness's six-node Redis Cluster, one cluster
//! for the whole binary, its phases in turn: every request kind with gets pipelined across every
//! slot, CDC, TRUNCATE and `verify`; resharding under load; a failover that loses writes (of
//! users and of a declared table, by key and by lookup); and a primary restarted from a dump older
//! than the slot it anchors on.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cacheward::config::{RedisMode, SecretUrl};
use cacheward::dev::cluster::RedisCluster;
use cacheward::model::entry::is_live;
use cacheward::store::redis::keys::slot_of;
use common::*;
use redis::cluster_async::ClusterConnection;
use serde_json::{json, Value};

/// A cluster-aware connection of the test's own.
async fn connect(cluster: &RedisCluster) -> ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.urls())
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("connect to the cluster")
}

/// What the cluster holds at `user:<name>`, asked through a cluster-aware connection.
async fn cached(conn: &mut ClusterConnection, name: &str) -> Option<String> {
    get_key(conn, &format!("user:{name}")).await
}

/// What the cluster holds at `key`.
async fn get_key(conn: &mut ClusterConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("cluster GET")
}

/// The names whose live entry differs from their row (or is live without one).
async fn disagreeing(env: &TestEnv, conn: &mut ClusterConnection, names: &[String]) -> Vec<String> {
    let mut wrong = Vec::new();
    for name in names {
        let entry = cached(conn, name).await.filter(|v| is_live(v));
        let entry: Option<Value> = entry.map(|v| serde_json::from_str(&v).expect("live JSON"));
        match (entry, env.row_json(name).await) {
            (Some(e), Some(r)) if e != r => wrong.push(name.clone()),
            (Some(_), None) => wrong.push(name.clone()),
            _ => {}
        }
    }
    wrong
}

/// Whether every name's live entry (if any) equals its row, asked on a fresh connection.
async fn agrees(env: &TestEnv, cluster: &RedisCluster, names: &[String]) -> bool {
    disagreeing(env, &mut connect(cluster).await, names)
        .await
        .is_empty()
}

/// Waits (up to 10 s) until [`agrees`] holds.
async fn await_agreement(env: &TestEnv, cluster: &RedisCluster, names: &[String], what: &str) {
    wait_until(what, Duration::from_secs(10), || {
        agrees(env, cluster, names)
    })
    .await;
}

/// Whether the declared table's entry at each of `keys` holds the row at the same index in `rows`,
/// or is not live when that is `None`.
async fn entries_agree(cluster: &RedisCluster, keys: &[String], rows: &[Option<Value>]) -> bool {
    let mut conn = connect(cluster).await;
    for (key, row) in keys.iter().zip(rows) {
        let live = get_key(&mut conn, key).await.filter(|v| is_live(v));
        let live = live.map(|v| serde_json::from_str::<Value>(&v).unwrap()["row"].clone());
        if live.is_some() && live != *row {
            return false;
        }
    }
    true
}

/// Live entries under `user:` on every primary (SCAN on each).
fn live_entries(cluster: &RedisCluster) -> usize {
    live_under(cluster, "user:")
}

/// Live entries under `prefix` on every primary.
fn live_under(cluster: &RedisCluster, prefix: &str) -> usize {
    let mut live = 0;
    for port in cluster.primaries() {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut conn)
            .unwrap();
        for key in keys {
            let value: Option<String> =
                redis::cmd("GET").arg(&key).query(&mut conn).unwrap_or(None);
            live += value.is_some_and(|v| is_live(&v)) as usize;
        }
    }
    live
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// The primaries' ports and the slot ranges each serves, from `CLUSTER SLOTS`.
async fn slot_owners(conn: &mut ClusterConnection) -> Vec<(u16, u16, u16)> {
    let ranges: Vec<Value> =
        {
            let reply: redis::Value = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(conn)
                .await
                .unwrap();
            let redis::Value::Array(ranges) = reply else {
                panic!("CLUSTER SLOTS: {reply:?}")
            };
            ranges
            .into_iter()
            .map(|r| {
                let redis::Value::Array(f) = r else { panic!() };
                let (redis::Value::Int(from), redis::Value::Int(to), redis::Value::Array(node)) =
                    (&f[0], &f[1], &f[2])
                else {
                    panic!()
                };
                let redis::Value::Int(port) = node[1] else { panic!() };
                json!([from, to, port])
            })
            .collect()
        };
    ranges
        .iter()
        .map(|r| {
            (
                r[0].as_u64().unwrap() as u16,
                r[1].as_u64().unwrap() as u16,
                r[2].as_u64().unwrap() as u16,
            )
        })
        .collect()
}

fn owner(owners: &[(u16, u16, u16)], name: &str) -> u16 {
    owner_of(owners, &format!("user:{name}"))
}

/// The port of the primary serving Redis key `key`.
fn owner_of(owners: &[(u16, u16, u16)], key: &str) -> u16 {
    let slot = slot_of(key.as_bytes());
    owners
        .iter()
        .find(|(from, to, _)| (*from..=*to).contains(&slot))
        .expect("every slot is served")
        .2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daemon_on_a_redis_cluster_stays_exact_through_resharding_and_a_lossy_failover() {
    let env = TestEnv::start().await;
    // On the test's own thread: the nodes die with the thread that started them.
    let mut cluster = RedisCluster::start().expect("start the cluster");
    let urls = cluster.urls();
    let mut config = env.config();
    config.redis.mode = RedisMode::Cluster;
    config.redis.url = Some(SecretUrl::new(urls[0].clone()));
    config.redis.urls = urls[1..].iter().cloned().map(SecretUrl::new).collect();
    config.redis.timeout_ms = 500;
    // A declared table next to users, with a lookup.
    declare_accounts(&env, &mut config).await;
    check_reaches_every_primary_from_one_seed(&cluster, &config).await;
    let daemon = env.start_daemon(config.clone()).await;
    let mut conn = connect(&cluster).await;
    let pg = env.pg().await;

    // 1. Every request kind. Rows written by plain SQL reach the cache through CDC, each to its
    // own slot's primary.
    let people = names("c", 300);
    pg.execute(
        "INSERT INTO users (username) SELECT 'c' || g FROM generate_series(0, 299) g",
        &[],
    )
    .await
    .unwrap();
    let slots: BTreeSet<u16> = people
        .iter()
        .map(|n| slot_of(format!("user:{n}").as_bytes()))
        .collect();
    assert!(
        slots.len() > 250,
        "the names span the slots of every primary"
    );
    wait_until("CDC filled every slot", Duration::from_secs(10), || async {
        live_entries(&cluster) == people.len()
    })
    .await;
    // Gets pipelined on one connection, spanning every slot: all hits, all exact, in order.
    let mut client = daemon.client().await;
    for answer in client.get_all(&people).await {
        assert_eq!(answer["result"]["source"], json!("cache"), "{answer}");
        let name = answer["result"]["user"]["username"].as_str().unwrap();
        assert_eq!(
            Some(answer["result"]["user"].clone()),
            env.row_json(name).await
        );
    }
    // Cold reads fill every slot, and a read right after each answer sees its fill. The near cache
    // holds every name now: Redis's invalidations of the deletes reach the daemon on its own
    // connections, after the deletes' replies reach the test, so the test waits for them.
    let invalidations = || async {
        daemon.stats().await["near_cache"]["invalidations"]
            .as_u64()
            .unwrap()
    };
    let before = invalidations().await;
    for name in people.iter().take(40) {
        redis::cmd("DEL")
            .arg(format!("user:{name}"))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    wait_until(
        "the deletes' invalidations",
        Duration::from_secs(10),
        || async { invalidations().await - before >= 40 },
    )
    .await;
    let first = client.get_all(&people[..40]).await;
    assert!(
        first.iter().all(|a| a["result"]["source"] == json!("db")),
        "{first:?}"
    );
    let again = client.get_all(&people[..40]).await;
    assert!(
        again
            .iter()
            .all(|a| a["result"]["source"] == json!("cache")),
        "read-your-fill on every node"
    );
    // The near cache kept what the first pipelined read found on every node (tracked on each
    // node's own connection): those gets cost no round trip.
    let near_hits = || async { daemon.stats().await["near_cache"]["hits"].as_u64().unwrap() };
    let before = near_hits().await;
    client.get_all(&people[40..]).await;
    assert_eq!(near_hits().await - before, people.len() as u64 - 40);
    // Write-through: create, rename, delete, each read back at once.
    let put = client.call("put", json!({"username": "c-new"})).await;
    assert_eq!(put["result"]["created"], json!(true));
    let renamed = client
        .call(
            "rename",
            json!({"username": "c1", "new_username": "c1-renamed"}),
        )
        .await;
    let version = renamed["result"]["user"]["version"].as_i64().unwrap();
    assert_eq!(
        client.get("c1").await["error"]["data"]["kind"],
        json!("not_found")
    );
    let got = client.get("c1-renamed").await;
    assert_eq!(
        got["result"]["user"]["version"],
        json!(version),
        "{got} {renamed}"
    );
    assert_eq!(
        client.call("delete", json!({"username": "c2"})).await["result"]["deleted"],
        json!(true)
    );
    assert_eq!(
        client.get("c2").await["error"]["data"]["kind"],
        json!("not_found")
    );
    // Out-of-band updates reach every slot through CDC.
    pg.batch_execute(
        "UPDATE users SET created_at = created_at - interval '1 day' WHERE username LIKE 'c%'",
    )
    .await
    .unwrap();
    let mut everyone = people.clone();
    everyone.extend(["c-new".to_owned(), "c1-renamed".to_owned()]);
    await_agreement(&env, &cluster, &everyone, "CDC updated every slot").await;
    let verified = cluster_verify(&env, &urls[2]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("0 mismatches"),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    // TRUNCATE drops every entry on every primary.
    pg.batch_execute("TRUNCATE users").await.unwrap();
    wait_until(
        "TRUNCATE reached every primary",
        Duration::from_secs(10),
        || async { live_entries(&cluster) == 0 },
    )
    .await;
    assert_eq!(
        client.get("c5").await["error"]["data"]["kind"],
        json!("not_found")
    );
    // health and stats see the cluster as the one Redis it is to clients.
    let health = daemon.health().await;
    assert_eq!(health["redis"], json!("up"), "{health}");
    assert_eq!(health["ready"], json!(true));
    let stats = daemon.stats().await;
    assert!(stats["cache_hits"].as_u64().unwrap() >= 340, "{stats}");
    assert!(stats["cdc"]["applied"].as_u64().unwrap() >= 300, "{stats}");

    // 1b. A declared table: its rows and their lookups' copies spread over the slots (a lookup
    // mostly in another slot than its row's key), kept by CDC; gets by key and by lookup; a write
    // through the daemon; a TRUNCATE of the table that leaves users' entries alone.
    client.call("put", json!({"username": "keeper"})).await;
    // (A write right after the TRUNCATE above read its horizon before the fence: the get fills.)
    client.get("keeper").await;
    assert_eq!(
        client.get("keeper").await["result"]["source"],
        json!("cache")
    );
    pg.execute(
        "INSERT INTO accounts SELECT g, 'a' || g || '@x', 'free' FROM generate_series(1, 200) g",
        &[],
    )
    .await
    .unwrap();
    wait_until(
        "CDC filled the table's keys and lookups",
        Duration::from_secs(10),
        || async { live_under(&cluster, "accounts:") == 400 },
    )
    .await;
    let apart = (1..=200)
        .filter(|i| {
            slot_of(format!("accounts:{i}").as_bytes())
                != slot_of(format!("accounts:by_email=a{i}@x").as_bytes())
        })
        .count();
    assert!(apart > 190, "lookups live apart from their rows: {apart}");
    for i in [1, 77, 200] {
        let by_key = client
            .call("get", json!({"table": "accounts", "key": {"id": i}}))
            .await;
        let by_email = client
            .call("get", json!({"table": "accounts", "lookup": "by_email", "key": {"email": format!("a{i}@x")}}))
            .await;
        assert_eq!(by_key["result"]["source"], json!("cache"), "{by_key}");
        assert_eq!(
            by_key["result"], by_email["result"],
            "the copy carries the row's version"
        );
    }
    let moved = client
        .call(
            "update",
            json!({"table": "accounts", "key": {"id": 77}, "set": {"email": "moved@x"}}),
        )
        .await;
    assert_eq!(moved["result"]["row"]["email"], json!("moved@x"), "{moved}");
    let old = client
        .call(
            "get",
            json!({"table": "accounts", "lookup": "by_email", "key": {"email": "a77@x"}}),
        )
        .await;
    assert_eq!(old["error"]["data"]["kind"], json!("not_found"), "{old}");
    // A primary whose anchor slot keeps its fence but another slot lost its own (as one restarted
    // from a snapshot older than slots it serves now): the TRUNCATE's drop finds it missing, the
    // monitor sets it, and the drop goes through (else the change stream waits on it for good).
    let owners = slot_owners(&mut conn).await;
    let (first, _, port) = owners[0];
    let fences = cacheward::store::redis::keys::Keys::new("user:", &[], true);
    let removed: i64 = redis::cmd("DEL")
        .arg(fences.fence(first + 1))
        .query_async(&mut direct(port).await)
        .await
        .unwrap();
    assert_eq!(removed, 1, "the fence of slot {} was there", first + 1);
    pg.batch_execute("TRUNCATE accounts").await.unwrap();
    wait_until(
        "the table's TRUNCATE reached every primary",
        Duration::from_secs(10),
        || async { live_under(&cluster, "accounts:") == 0 },
    )
    .await;
    assert_eq!(
        client.get("keeper").await["result"]["source"],
        json!("cache"),
        "users' entries stay"
    );

    // 2. Resharding under a read/write load: slots move between primaries while the daemon
    // reads, writes and applies CDC; afterwards every entry equals its row.
    let movers = names("m", 200);
    pg.execute(
        "INSERT INTO users (username) SELECT 'm' || g FROM generate_series(0, 199) g",
        &[],
    )
    .await
    .unwrap();
    client.get_all(&movers).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, socket, db_url, movers) = (
            stop.clone(),
            daemon.socket.clone(),
            env.db_url.clone(),
            movers.clone(),
        );
        tokio::spawn(async move {
            let mut client = Rpc::connect(&socket).await;
            let pg: tokio_postgres::Config = db_url.parse().unwrap();
            let pg = cacheward::store::pg::connect(&pg).await.unwrap();
            let mut round = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = &movers[round % movers.len()];
                match round % 4 {
                    0 => {
                        pg.execute(
                            "UPDATE users SET created_at = now() WHERE username = $1",
                            &[name],
                        )
                        .await
                        .unwrap();
                    }
                    1 => {
                        client.call("delete", json!({"username": name})).await;
                    }
                    2 => {
                        client.call("put", json!({"username": name})).await;
                    }
                    _ => {
                        client.get(name).await;
                    }
                }
                round += 1;
            }
            round
        })
    };
    let primaries = cluster.primaries();
    let (from, to) = (primaries[0], primaries[1]);
    let moved = {
        let cluster = &cluster;
        tokio::task::block_in_place(|| cluster.reshard(from, to, 300))
    };
    moved.expect("reshard");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = load.await.unwrap();
    assert!(
        rounds > 100,
        "the load ran through the resharding ({rounds} rounds)"
    );
    await_agreement(
        &env,
        &cluster,
        &movers,
        "every entry equals its row after resharding",
    )
    .await;
    let verified = cluster_verify(&env, &urls[0]);
    assert!(String::from_utf8_lossy(&verified.stdout).contains("0 mismatches"));

    // 2b. A partial outage: one primary frozen, its replica kept from taking over, the cluster
    // serving the rest. Only that primary's names go to PostgreSQL; the others stay cached and
    // keep getting changes; once it is back, no read answers a change it missed.
    partial_outage(&env, &cluster, &daemon).await;
    // 2c. Again, with the daemon stopped during the outage and another started.
    let daemon = partial_outage_across_a_restart(&env, &cluster, daemon, config.clone()).await;
    // 2d. Again, seen by a second daemon that reads the same cache while the worker that passed
    // the changes over is gone.
    let daemon = partial_outage_seen_by_another_daemon(&env, &cluster, daemon, config).await;
    let mut client = daemon.client().await;

    // 3. A failover that loses writes. The replica of one primary is cut off, the daemon writes
    // newer versions and tombstones to that primary's keys, the primary dies, and the stale
    // replica is promoted: the daemon must not serve what it holds, and must repair it.
    let mut conn = connect(&cluster).await;
    let owners = slot_owners(&mut conn).await;
    let victim = owners[0].2;
    let doomed: Vec<String> = names("f", 400)
        .into_iter()
        .filter(|n| owner(&owners, n) == victim)
        .take(40)
        .collect();
    assert!(
        doomed.len() >= 20,
        "names on the victim's slots: {}",
        doomed.len()
    );
    // Names the other primaries serve: a failover of the victim must leave their entries alone.
    let keepers: Vec<String> = names("k", 100)
        .into_iter()
        .filter(|n| owner(&owners, n) != victim)
        .take(20)
        .collect();
    for name in doomed.iter().chain(&keepers) {
        client.call("put", json!({"username": name})).await;
    }
    // Declared rows too: ten whose key lives on the victim, ten whose lookup's copy does (their
    // key elsewhere), cached by CDC.
    pg.execute(
        "INSERT INTO accounts SELECT g, 'f' || g || '@x', 'free' FROM generate_series(1001, 1400) g",
        &[],
    )
    .await
    .unwrap();
    let by_key = |i: &i64| format!("accounts:{i}");
    let by_email = |i: &i64| format!("accounts:by_email=f{i}@x");
    let on_victim = |key: String| owner_of(&owners, &key) == victim;
    let mut accounts: Vec<i64> = (1001..=1400)
        .filter(|i| on_victim(by_key(i)))
        .take(10)
        .collect();
    accounts.extend(
        (1001..=1400)
            .filter(|i| !on_victim(by_key(i)) && on_victim(by_email(i)))
            .take(10),
    );
    assert_eq!(accounts.len(), 20, "accounts on the victim's slots");
    let victim_keys: Vec<String> = accounts
        .iter()
        .map(|i| match on_victim(by_key(i)) {
            true => by_key(i),
            false => by_email(i),
        })
        .collect();
    wait_until(
        "CDC cached the accounts",
        Duration::from_secs(10),
        || async {
            let mut conn = connect(&cluster).await;
            for key in &victim_keys {
                if !get_key(&mut conn, key).await.is_some_and(|v| is_live(&v)) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let kept: Vec<Option<String>> = {
        let mut conn = connect(&cluster).await;
        let mut kept = Vec::new();
        for name in &keepers {
            kept.push(cached(&mut conn, name).await);
        }
        kept
    };
    assert!(kept.iter().all(|v| v.as_deref().is_some_and(is_live)));
    client.get_all(&doomed).await;
    let replica = cluster
        .replica_of(victim)
        .expect("the victim has a replica");
    // Replication is asynchronous: let the replica catch up with the entries, then cut it off.
    redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query_async::<i64>(&mut direct(victim).await)
        .await
        .unwrap();
    cluster.cut_replication(victim).unwrap();
    // Newer versions (out-of-band updates, through CDC) and deletions (tombstones).
    let rows = outdate(&env, &mut client, &doomed).await;
    await_agreement(
        &env,
        &cluster,
        &doomed,
        "the primary holds the newest versions",
    )
    .await;
    // The same for the accounts.
    let table_rows = outdate_accounts(&env, &mut client, &accounts).await;
    let victim_rows: Vec<Option<Value>> = table_rows
        .iter()
        .step_by(2)
        .map(|(_, r)| r.clone())
        .collect();
    wait_until(
        "the primary holds the accounts' newest versions",
        Duration::from_secs(10),
        || entries_agree(&cluster, &victim_keys, &victim_rows),
    )
    .await;
    // The replica really lacks them: what it would serve is stale.
    let mut stale = 0;
    let mut on_replica = direct(replica).await;
    redis::cmd("READONLY")
        .query_async::<()>(&mut on_replica)
        .await
        .unwrap();
    for name in &doomed {
        let held: Option<String> = redis::cmd("GET")
            .arg(format!("user:{name}"))
            .query_async(&mut on_replica)
            .await
            .unwrap();
        let held: Option<Value> = held
            .filter(|v| is_live(v))
            .map(|v| serde_json::from_str(&v).unwrap());
        stale += (held.is_some() && held != env.row_json(name).await) as usize;
    }
    assert_eq!(
        stale,
        doomed.len(),
        "the replica holds the old version of every name"
    );
    for key in &victim_keys {
        let held: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut on_replica)
            .await
            .unwrap();
        assert!(
            held.is_some_and(|v| is_live(&v) && v.contains("\"free\"")),
            "the replica holds the old version of {key}"
        );
    }
    let killed_at = Instant::now();
    cluster.kill(cluster.node(victim).unwrap());
    // Through the failover the daemon answers every get with the row (or not_found), never with
    // the promoted replica's older entry, and soon every entry equals its row again.
    let repaired_after = through_failover_with(
        &mut client,
        &doomed,
        &rows,
        &table_rows,
        killed_at,
        || async {
            cluster.primaries().len() == 3
                && agrees(&env, &cluster, &doomed).await
                && entries_agree(&cluster, &victim_keys, &victim_rows).await
        },
    )
    .await;
    eprintln!("failover: every entry equal to its row {repaired_after:?} after the kill");
    // Only the slots that changed hands were dropped: the other primaries' entries are untouched.
    let mut conn = connect(&cluster).await;
    for (name, before) in keepers.iter().zip(&kept) {
        assert_eq!(
            cached(&mut conn, name).await,
            *before,
            "{name}, on a primary that did not fail over"
        );
    }
    assert_eq!(cluster.primaries().len(), 3, "the replica was promoted");

    // 4. A primary killed and restarted at once (before a replica could take over) from a dump
    // older than the slot it anchors on now: nothing of what it holds is served.
    restart_from_a_dump_older_than_its_anchor(&env, &mut cluster, &daemon).await;
    daemon.stop().await;
}

/// A primary restarts from a dump taken before slots below its own moved to it (as a node does
/// from the file its last full sync left): its anchor slot (its lowest, where its epoch and fence
/// are looked at) has no fence there, as if Redis had lost everything, but its other slots hold
/// the entries of then, older than writes made since. Nothing of them may be served: the daemon
/// answers every get with the row, and soon every entry equals its row.
async fn restart_from_a_dump_older_than_its_anchor(
    env: &TestEnv,
    cluster: &mut RedisCluster,
    daemon: &Daemon,
) {
    // The node killed before is back (a replica now): a resharding needs every node.
    for node in 0..cluster.ports().len() {
        cluster.start_again(node).expect("start the node again");
    }
    cluster
        .await_state_ok(Duration::from_secs(30))
        .expect("the cluster is whole");
    let mut conn = connect(cluster).await;
    let owners = slot_owners(&mut conn).await;
    let lowest = owners.iter().min_by_key(|(from, _, _)| *from).unwrap().2;
    let victim = owners.iter().map(|o| o.2).find(|&p| p != lowest).unwrap();
    let doomed: Vec<String> = names("o", 400)
        .into_iter()
        .filter(|n| owner(&owners, n) == victim)
        .take(30)
        .collect();
    assert!(doomed.len() >= 20, "names on the victim: {}", doomed.len());
    let mut client = daemon.client().await;
    for name in &doomed {
        client.call("put", json!({"username": name})).await;
    }
    client.get_all(&doomed).await;
    await_agreement(env, cluster, &doomed, "every name cached").await;
    let snapshot = cluster
        .snapshot(victim, env.dir.path())
        .expect("the victim's dump");
    // The lowest slots move to the victim: its anchor is now a slot the dump lacks.
    cluster
        .reshard(lowest, victim, 20)
        .expect("reshard below the victim's slots");
    let anchor = slot_owners(&mut conn)
        .await
        .into_iter()
        .filter(|(_, _, port)| *port == victim)
        .map(|(from, _, _)| from)
        .min()
        .unwrap();
    assert!(
        doomed
            .iter()
            .all(|n| slot_of(format!("user:{n}").as_bytes()) != anchor),
        "the names live in slots the dump holds"
    );
    // Newer versions and tombstones, which the dump lacks.
    let rows = outdate(env, &mut client, &doomed).await;
    await_agreement(
        env,
        cluster,
        &doomed,
        "the victim holds the newest versions",
    )
    .await;
    let node = cluster.node(victim).unwrap();
    let killed_at = Instant::now();
    cluster
        .restart_from(node, &snapshot)
        .expect("restart from the dump");
    let cluster = &*cluster;
    let repaired_after = through_failover(&mut client, &doomed, &rows, killed_at, || async {
        agrees(env, cluster, &doomed).await
    })
    .await;
    eprintln!("restart from an old dump: every entry equal to its row {repaired_after:?} after it");
}

/// `check --connect` seeded by one node reaches every primary the cluster names and probes its
/// user's rights there: a right one primary lacks (ACL users are per node) is named, with the
/// node and the rule that grants it.
async fn check_reaches_every_primary_from_one_seed(
    cluster: &RedisCluster,
    config: &cacheward::config::Config,
) {
    let acl = |port: u16, rules: &'static [&'static str]| async move {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("checker")
            .arg(rules)
            .query_async::<()>(&mut direct(port).await)
            .await
            .unwrap();
    };
    for &port in cluster.ports() {
        acl(port, &["on", ">pw", "~*", "&*", "+@all"]).await;
    }
    let seed = cluster.ports()[0];
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3);
    let lacking = *primaries.iter().find(|&&p| p != seed).unwrap();
    acl(lacking, &["-type"]).await;
    let mut checked = config.clone();
    checked.redis.url = Some(SecretUrl::new(format!(
        "redis://checker:pw@127.0.0.1:{seed}"
    )));
    checked.redis.urls = Vec::new();
    let found = cacheward::cli::check::backends(&checked).await;
    let problems = found.problems_with("redis");
    // One line per prefix (users', the declared table's), each naming the node and the rule.
    assert_eq!(problems.len(), 2, "{found:#?}");
    for (problem, prefix) in problems.iter().zip(["user:", "accounts:"]) {
        assert!(
            problem.contains(&format!("127.0.0.1:{lacking}"))
                && problem.contains(&format!("ACL SETUSER checker +type '~{prefix}*'")),
            "{found:#?}"
        );
    }
    for port in primaries {
        assert!(
            found
                .ok
                .iter()
                .any(|ok| ok.contains(&format!(":{port}")) && ok.ends_with("reached")),
            "primary {port} not reached: {found:#?}"
        );
    }
    for &port in cluster.ports() {
        redis::cmd("ACL")
            .arg("DELUSER")
            .arg("checker")
            .query_async::<()>(&mut direct(port).await)
            .await
            .unwrap();
    }
}

/// Phase 2b of the test above (see there).
async fn partial_outage(env: &TestEnv, cluster: &RedisCluster, daemon: &Daemon) {
    let Outage {
        owners,
        victim,
        on_victim,
        elsewhere,
        ..
    } = Outage::prepare(env, cluster, daemon, "o").await;
    let pg = env.pg().await;
    let mut client = daemon.client().await;
    let versions = |answers: &[Value]| -> Vec<i64> {
        answers
            .iter()
            .map(|a| a["result"]["user"]["version"].as_i64().unwrap_or(-1))
            .collect()
    };
    let before = versions(&client.get_all(&on_victim).await);

    freeze(cluster, daemon, victim).await;
    // Past the node timeout: the others mark it failed and serve on (full coverage not required).
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let health = daemon.health().await;
    assert_eq!(health["redis"], json!("up"), "{health}");
    // The others answer from the cache, the victim's names from PostgreSQL.
    let sources = |answers: &[Value]| -> BTreeSet<String> {
        answers
            .iter()
            .map(|a| a["result"]["source"].as_str().unwrap_or("error").to_owned())
            .collect()
    };
    assert_eq!(
        sources(&client.get_all(&elsewhere).await),
        BTreeSet::from(["cache".to_owned()])
    );
    assert_eq!(
        sources(&client.get_all(&on_victim).await),
        BTreeSet::from(["db".to_owned()])
    );
    // Changes while it is frozen: the others' entries get them, the victim's cannot.
    let missed_before = daemon.stats().await["cdc"]["missed"].as_u64().unwrap();
    pg.batch_execute(
        "UPDATE users SET created_at = created_at - interval '1 day' WHERE username LIKE 'o%'",
    )
    .await
    .unwrap();
    let deleted = on_victim[0].clone();
    assert_eq!(
        client.call("delete", json!({"username": deleted})).await["result"]["deleted"],
        json!(true)
    );
    let rows = |names: &[String]| {
        let names = names.to_vec();
        async move {
            let mut rows = Vec::new();
            for name in &names {
                rows.push(env.row_json(name).await);
            }
            rows
        }
    };
    let current = |answers: &[Value], rows: &[Option<Value>]| {
        answers.iter().zip(rows).all(|(a, row)| match row {
            Some(row) => a["result"]["user"] == *row,
            None => a["error"]["data"]["kind"] == json!("not_found"),
        })
    };
    let elsewhere_rows = rows(&elsewhere).await;
    wait_until(
        "the others' entries got the changes, served from the cache",
        Duration::from_secs(10),
        || async {
            let mut client = daemon.client().await;
            let answers = client.get_all(&elsewhere).await;
            current(&answers, &elsewhere_rows)
                && sources(&answers) == BTreeSet::from(["cache".to_owned()])
        },
    )
    .await;
    let victim_rows = rows(&on_victim).await;
    let answers = client.get_all(&on_victim).await;
    assert!(current(&answers, &victim_rows), "{answers:?}");
    assert_eq!(sources(&answers[1..]), BTreeSet::from(["db".to_owned()]));
    let missed = daemon.stats().await["cdc"]["missed"].as_u64().unwrap() - missed_before;
    assert!(missed >= on_victim.len() as u64 - 1, "missed {missed}");
    // Another primary's fence forged meanwhile: its entries are dropped and it serves again, the
    // frozen one notwithstanding (the drop walks only the primaries it concerns).
    let other = owners.iter().map(|o| o.2).find(|&p| p != victim).unwrap();
    let anchor = owners
        .iter()
        .filter(|o| o.2 == other)
        .map(|o| o.0)
        .min()
        .unwrap();
    let fence = cacheward::store::redis::keys::Keys::new("user:", &[], true).fence(anchor);
    redis::cmd("SET")
        .arg(&fence)
        .arg("forged")
        .query_async::<()>(&mut direct(other).await)
        .await
        .unwrap();
    let on_other: Vec<String> = elsewhere
        .iter()
        .filter(|n| owner(&owners, n) == other)
        .cloned()
        .collect();
    // Distrusted and dropped (read from PostgreSQL at least once), then cached again.
    for (what, source, all) in [
        ("the forged primary's names distrusted", "db", false),
        ("the forged primary's names cached again", "cache", true),
    ] {
        wait_until(what, Duration::from_secs(10), || async {
            let answers = daemon.client().await.get_all(&on_other).await;
            let from = |a: &Value| a["result"]["source"] == json!(source);
            match all {
                true => answers.iter().all(from),
                false => answers.iter().any(from),
            }
        })
        .await;
    }
    let health = daemon.health().await;
    assert!(
        health["redis_unreachable"]
            .as_array()
            .is_some_and(|d| d.len() == 1),
        "the victim was down all along: {health}"
    );

    // Back: from its first answer on, no read answers what it missed (every old version is
    // older than its row now), and its names come back to the cache.
    cluster.resume(cluster.node(victim).unwrap());
    let thawed = Instant::now();
    let mut served_from_cache = false;
    while thawed.elapsed() < Duration::from_secs(10) {
        let answers = client.get_all(&on_victim).await;
        for ((answer, row), old) in answers.iter().zip(&victim_rows).zip(&before) {
            let version = answer["result"]["user"]["version"].as_i64().unwrap_or(-1);
            assert_ne!(
                version, *old,
                "a change the primary missed was served: {answer} (row {row:?})"
            );
        }
        assert!(current(&answers, &victim_rows), "{answers:?}");
        if answers[1..]
            .iter()
            .all(|a| a["result"]["source"] == json!("cache"))
            && daemon.health().await["redis_unreachable"] == json!([])
        {
            served_from_cache = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(served_from_cache, "the victim's names are cached again");
    let mut on_node = direct(victim).await;
    for (name, row) in on_victim.iter().zip(&victim_rows).skip(1) {
        let entry: Option<String> = redis::cmd("GET")
            .arg(format!("user:{name}"))
            .query_async(&mut on_node)
            .await
            .unwrap();
        let entry: Value = serde_json::from_str(&entry.expect("repaired")).unwrap();
        assert_eq!(Some(entry), *row, "{name} repaired on its primary");
    }
    end_outage(cluster, victim);
}

/// A primary to freeze, its replica kept from taking over, and 120 users (named by a prefix),
/// inserted and cached: those it serves, and the others.
struct Outage {
    owners: Vec<(u16, u16, u16)>,
    victim: u16,
    on_victim: Vec<String>,
    elsewhere: Vec<String>,
}

impl Outage {
    async fn prepare(
        env: &TestEnv,
        cluster: &RedisCluster,
        daemon: &Daemon,
        prefix: &str,
    ) -> Outage {
        let owners = slot_owners(&mut connect(cluster).await).await;
        let victim = owners.last().unwrap().2;
        cluster.hold_failover(victim, true);
        let everyone = names(prefix, 120);
        env.pg()
            .await
            .execute(
                "INSERT INTO users (username) SELECT $1 || g FROM generate_series(0, 119) g",
                &[&prefix],
            )
            .await
            .unwrap();
        let (on_victim, elsewhere): (Vec<String>, Vec<String>) = everyone
            .iter()
            .cloned()
            .partition(|n| owner(&owners, n) == victim);
        assert!(on_victim.len() >= 15 && elsewhere.len() >= 15);
        wait_until("every name cached", Duration::from_secs(10), || async {
            let answers = daemon.client().await.get_all(&everyone).await;
            answers
                .iter()
                .all(|a| a["result"]["source"] == json!("cache"))
        })
        .await;
        Outage {
            owners,
            victim,
            on_victim,
            elsewhere,
        }
    }
}

/// Freezes the primary at port `victim` and waits for `daemon`'s health to name it.
async fn freeze(cluster: &RedisCluster, daemon: &Daemon, victim: u16) {
    cluster.pause(cluster.node(victim).unwrap());
    wait_until(
        "health names the frozen primary",
        Duration::from_secs(10),
        || async {
            let health = daemon.health().await;
            health["redis_unreachable"].as_array().is_some_and(|down| {
                down.iter()
                    .any(|d| d.as_str().unwrap().ends_with(&format!(":{victim}")))
            })
        },
    )
    .await;
}

/// After a thaw: its replica may take over again only once no node flags it failed (else it
/// would), and the cluster is whole again.
fn end_outage(cluster: &RedisCluster, victim: u16) {
    cluster
        .await_no_failure_flags(Duration::from_secs(20))
        .expect("the thawed primary is no longer flagged");
    cluster.hold_failover(victim, false);
    cluster
        .await_state_ok(Duration::from_secs(20))
        .expect("the cluster is whole again");
}

/// The changes a frozen primary missed are durable: the daemon whose CDC worker passed them over
/// is stopped while the primary is still frozen and another is started; once the primary is
/// back, its names are served from the cache at their rows' versions (the new daemon replays
/// them from the cursor stored before them; with the newer cursor stored, it would serve what the
/// primary held before the outage for good).
async fn partial_outage_across_a_restart(
    env: &TestEnv,
    cluster: &RedisCluster,
    daemon: Daemon,
    config: cacheward::config::Config,
) -> Daemon {
    let Outage {
        victim, on_victim, ..
    } = Outage::prepare(env, cluster, &daemon, "r").await;
    changes_passed_over(env, cluster, &daemon, victim, "r", on_victim.len()).await;
    // Past a store of the cursor (at most 50 ms after a batch), then stopped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.stop().await;
    let daemon = env.start_daemon(config).await;
    cluster.resume(cluster.node(victim).unwrap());
    let mut rows = Vec::new();
    for name in &on_victim {
        rows.push(env.row_json(name).await);
    }
    served_from_the_cache(&daemon, &on_victim, &rows).await;
    end_outage(cluster, victim);
    daemon
}

/// Freezes the primary at port `victim`, changes every user named with `prefix`, and waits until
/// `daemon`'s CDC worker has passed over the `count` changes of the primary's names.
async fn changes_passed_over(
    env: &TestEnv,
    cluster: &RedisCluster,
    daemon: &Daemon,
    victim: u16,
    prefix: &str,
    count: usize,
) {
    freeze(cluster, daemon, victim).await;
    let missed = || async { daemon.stats().await["cdc"]["missed"].as_u64().unwrap() };
    let missed_before = missed().await;
    env.pg()
        .await
        .execute(
            "UPDATE users SET created_at = created_at - interval '1 day' WHERE username LIKE $1",
            &[&format!("{prefix}%")],
        )
        .await
        .unwrap();
    wait_until(
        "the frozen primary's changes passed over",
        Duration::from_secs(10),
        || async { missed().await - missed_before >= count as u64 },
    )
    .await;
}

/// Waits until `daemon` answers every one of `names` from the cache at its row (`rows`).
async fn served_from_the_cache(daemon: &Daemon, names: &[String], rows: &[Option<Value>]) {
    wait_until(
        "the frozen primary's names served from the cache at their rows' versions",
        Duration::from_secs(15),
        || async {
            let answers = daemon.client().await.get_all(names).await;
            answers.iter().zip(rows).all(|(a, row)| {
                a["result"]["source"] == json!("cache")
                    && Some(&a["result"]["user"]) == row.as_ref()
            })
        },
    )
    .await;
}

/// The changes a frozen primary missed are known to every daemon on the cache, not only to the one
/// whose CDC worker passed them over: that worker stores their slots with its cursor, and a second
/// daemon (no CDC worker of its own, the names in its near cache) holds those slots back once the
/// primary answers it again, until a worker has applied them. Here the worker's daemon is stopped
/// during the outage, so nothing applies them until another starts: without the stored slots the
/// second daemon would answer what the primary held before the outage for as long as that lasts.
async fn partial_outage_seen_by_another_daemon(
    env: &TestEnv,
    cluster: &RedisCluster,
    daemon: Daemon,
    config: cacheward::config::Config,
) -> Daemon {
    let Outage {
        victim, on_victim, ..
    } = Outage::prepare(env, cluster, &daemon, "s").await;
    let mut reader_config = config.clone();
    reader_config.cdc.enabled = false;
    reader_config.socket.path = config.socket.path.with_file_name("reader.sock");
    reader_config.metrics.listen = None;
    reader_config.resp = Default::default();
    let reader = env.start_daemon(reader_config).await;
    let old_rows: Vec<Value> = reader
        .client()
        .await
        .get_all(&on_victim)
        .await
        .iter()
        .map(|a| a["result"]["user"].clone())
        .collect();
    changes_passed_over(env, cluster, &daemon, victim, "s", on_victim.len()).await;
    let pg = env.pg().await;
    wait_until(
        "the slots passed over stored with the cursor",
        Duration::from_secs(10),
        || async {
            let stored: Vec<Vec<i32>> = pg
                .query("SELECT missed_slots FROM cacheward_cdc_cursors", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            stored.iter().any(|slots| !slots.is_empty())
        },
    )
    .await;
    daemon.stop().await;
    let mut rows = Vec::new();
    for name in &on_victim {
        rows.push(env.row_json(name).await);
    }
    // Back, with no CDC worker running: once the reader has looked at the primary again (no read
    // of it meanwhile: a read from PostgreSQL would fill its entry anew), it answers the rows,
    // never what the primary missed.
    cluster.resume(cluster.node(victim).unwrap());
    wait_until(
        "the reader looked at the thawed primary",
        Duration::from_secs(10),
        || async { reader.health().await["redis_unreachable"] == json!([]) },
    )
    .await;
    let looked = Instant::now();
    let mut client = reader.client().await;
    while looked.elapsed() < Duration::from_millis(1000) {
        let answers = client.get_all(&on_victim).await;
        for ((answer, row), old) in answers.iter().zip(&rows).zip(&old_rows) {
            assert_ne!(
                &answer["result"]["user"], old,
                "the reader served what the primary missed: {answer}"
            );
            assert_eq!(Some(&answer["result"]["user"]), row.as_ref(), "{answer}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A worker starts again: it applies them, and the reader serves them from the cache.
    let daemon = env.start_daemon(config).await;
    served_from_the_cache(&reader, &on_victim, &rows).await;
    reader.stop().await;
    end_outage(cluster, victim);
    daemon
}

async fn direct(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `cacheward verify` in cluster mode, seeded by one node.
fn cluster_verify(env: &TestEnv, seed: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cacheward"))
        .arg("verify")
        .current_dir(env.dir.path())
        .env("DATABASE_URL", &env.db_url)
        .env("REDIS_URL", seed)
        .env("CACHEWARD__REDIS__MODE", "cluster")
        .output()
        .expect("run cacheward verify")
}
