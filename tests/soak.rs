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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::history::{self, now_us, Rng, Seen, State};
use common::{wait_until, DaemonProcess, TestEnv};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// The soak's names, picked by the shared generator.
trait Names {
    fn name(&mut self) -> String;
    fn calm(&mut self) -> String;
}

impl Names for Rng {
    /// A hot name: changed all the time.
    fn name(&mut self) -> String {
        format!("soak{:02}", self.below(NAMES))
    }

    /// A calm name: read often, changed only by a TRUNCATE and a rare `put`, so that a stale entry
    /// left by a race stays there to be seen instead of being overwritten by the next change.
    fn calm(&mut self) -> String {
        format!("calm{:02}", self.below(NAMES))
    }
}

/// How many hot (and calm) usernames the storm plays with: few, so that changes collide.
const NAMES: u64 = 48;

fn all_names() -> Vec<String> {
    (0..NAMES)
        .flat_map(|i| [format!("soak{i:02}"), format!("calm{i:02}")])
        .collect()
}

/// One answered `get`.
#[derive(Debug, Clone)]
struct Observation {
    name: String,
    sent_us: i64,
    answered_us: i64,
    seen: Seen,
    source: String,
}

/// A JSON-RPC client that reports failures instead of panicking: the daemon may be killed at any
/// moment.
struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    next_id: u64,
}

impl Client {
    async fn connect(socket: &Path) -> Option<Client> {
        let stream = UnixStream::connect(socket).await.ok()?;
        let (r, w) = stream.into_split();
        Some(Client {
            reader: BufReader::new(r),
            writer: w,
            next_id: 0,
        })
    }

    /// Sends the requests pipelined; returns each answer with the time it arrived, or `None` if
    /// the connection failed.
    async fn pipeline(&mut self, requests: &[(&str, Value)]) -> Option<Vec<(Value, i64)>> {
        let mut out = Vec::new();
        for (method, params) in requests {
            self.next_id += 1;
            let mut line = serde_json::to_vec(
                &json!({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}),
            )
            .expect("json");
            line.push(b'\n');
            out.extend_from_slice(&line);
        }
        self.writer.write_all(&out).await.ok()?;
        let mut answers = Vec::new();
        for _ in requests {
            let mut line = String::new();
            let read =
                tokio::time::timeout(Duration::from_secs(15), self.reader.read_line(&mut line));
            match read.await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
            answers.push((
                serde_json::from_str(&line).expect("a JSON answer"),
                now_us(),
            ));
        }
        Some(answers)
    }
}

impl Client {
    /// Sends `requests` pipelined and records what every `get` answered; false if the connection
    /// failed.
    async fn exchange(
        &mut self,
        requests: &[(&str, Value)],
        seen: &Mutex<Vec<Observation>>,
    ) -> bool {
        let sent_us = now_us();
        let Some(answers) = self.pipeline(requests).await else {
            return false;
        };
        let mut observed = Vec::new();
        for ((method, params), (answer, answered_us)) in requests.iter().zip(answers) {
            if *method != "get" {
                continue;
            }
            let seen = if let Some(version) = answer["result"]["user"]["version"].as_i64() {
                Seen::Present(version)
            } else if answer["error"]["data"]["kind"] == json!("not_found") {
                Seen::Absent
            } else {
                // Unavailable during a fault: no claim about the data.
                continue;
            };
            observed.push(Observation {
                name: params["username"].as_str().expect("a name").to_owned(),
                sent_us,
                answered_us,
                seen,
                source: answer["result"]["source"].as_str().unwrap_or("").to_owned(),
            });
        }
        seen.lock().expect("not poisoned").extend(observed);
        true
    }
}

/// Every calm name.
fn calm_names() -> Vec<String> {
    (0..NAMES).map(|i| format!("calm{i:02}")).collect()
}

/// Inserts the calm users that are missing.
async fn bring_back(
    pg: &tokio_postgres::Client,
    calm: &[String],
) -> Result<u64, tokio_postgres::Error> {
    pg.execute(
        "INSERT INTO users (username) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        &[&calm],
    )
    .await
}

/// Gets of every calm name, pipelined on a new connection to `socket`, recorded.
async fn read_calm(socket: &Path, seen: &Mutex<Vec<Observation>>) {
    let requests: Vec<(&str, Value)> = (0..NAMES)
        .map(|i| ("get", json!({ "username": format!("calm{i:02}") })))
        .collect();
    if let Some(mut c) = Client::connect(socket).await {
        c.exchange(&requests, seen).await;
    }
}

/// A daemon client: pipelined gets (recorded), puts, renames and deletes, reconnecting whenever
/// the daemon goes away.
async fn daemon_client(
    socket: PathBuf,
    mut rng: Rng,
    stop: CancellationToken,
    seen: Arc<Mutex<Vec<Observation>>>,
) {
    let mut client: Option<Client> = None;
    while !stop.is_cancelled() {
        let Some(c) = client.as_mut() else {
            client = Client::connect(&socket).await;
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            continue;
        };
        let op = rng.below(100);
        let requests: Vec<(&str, Value)> = match op {
            0..=59 => (0..1 + rng.below(8))
                .map(|_| {
                    let name = if rng.below(10) < 4 {
                        rng.calm()
                    } else {
                        rng.name()
                    };
                    ("get", json!({ "username": name }))
                })
                .collect(),
            60..=74 => {
                let name = if rng.below(50) == 0 {
                    rng.calm()
                } else {
                    rng.name()
                };
                vec![("put", json!({ "username": name }))]
            }
            75..=84 => vec![(
                "rename",
                json!({"username": rng.name(), "new_username": rng.name()}),
            )],
            _ => vec![("delete", json!({"username": rng.name()}))],
        };
        if !c.exchange(&requests, &seen).await {
            client = None;
            continue;
        }
        if rng.below(4) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
        }
    }
}

/// One RESP3 frame as the tracked client reads it.
enum Frame {
    Push(Vec<Frame>),
    Array(Vec<Frame>),
    Bulk(String),
    Nil,
    Other,
}

impl Frame {
    /// The keys an `invalidate` push names: `Some(None)` for all of them (a flush), `None` when
    /// this is not one.
    fn invalidated(self) -> Option<Option<Vec<String>>> {
        let Frame::Push(mut parts) = self else {
            return None;
        };
        match parts.pop() {
            Some(Frame::Array(keys)) => Some(Some(
                keys.into_iter()
                    .filter_map(|k| match k {
                        Frame::Bulk(k) => Some(k),
                        _ => None,
                    })
                    .collect(),
            )),
            _ => Some(None),
        }
    }
}

/// Reads one RESP3 frame; `None` when the connection fails.
fn read_frame<'a>(
    r: &'a mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Frame>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        let n: i64 = rest.parse().unwrap_or(0);
        Some(match kind {
            "$" if n >= 0 => {
                let mut buf = vec![0u8; n as usize + 2];
                tokio::io::AsyncReadExt::read_exact(r, &mut buf)
                    .await
                    .ok()?;
                Frame::Bulk(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
            }
            "$" | "_" => Frame::Nil,
            ">" | "*" | "%" | "~" => {
                let count = if kind == "%" { 2 * n } else { n };
                let mut items = Vec::new();
                for _ in 0..count {
                    items.push(read_frame(r).await?);
                }
                match kind {
                    ">" => Frame::Push(items),
                    _ => Frame::Array(items),
                }
            }
            _ => Frame::Other,
        })
    })
}

/// A Redis client caching on its side, as redis-py's client-side cache does: `CLIENT TRACKING
/// ON` over RESP3 on the daemon's Redis-protocol socket, `GET user:NAME` answered from its own
/// memory while no `invalidate` push named the key, every push it has received applied before
/// it serves from memory, everything dropped when the connection goes. Every answer, its own
/// memory's included, is recorded and held to the commit history like any other.
async fn tracked_client(
    socket: PathBuf,
    mut rng: Rng,
    stop: CancellationToken,
    seen: Arc<Mutex<Vec<Observation>>>,
) {
    while !stop.is_cancelled() {
        let Ok(stream) = UnixStream::connect(&socket).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (r, mut w) = stream.into_split();
        let (frames, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut r = BufReader::new(r);
            while let Some(frame) = read_frame(&mut r).await {
                if frames.send(frame).is_err() {
                    break;
                }
            }
        });
        if w.write_all(b"HELLO 3\r\nCLIENT TRACKING ON\r\n")
            .await
            .is_err()
        {
            continue;
        }
        // The two replies.
        let mut handshake = 0;
        while handshake < 2 {
            match tokio::time::timeout(Duration::from_secs(15), heard.recv()).await {
                Ok(Some(Frame::Push(_))) => {}
                Ok(Some(_)) => handshake += 1,
                _ => break,
            }
        }
        if handshake < 2 {
            reader.abort();
            continue;
        }
        let mut cache: HashMap<String, Seen> = HashMap::new();
        let apply = |cache: &mut HashMap<String, Seen>, keys: Option<Vec<String>>| match keys {
            Some(keys) => {
                for key in keys {
                    cache.remove(key.strip_prefix("user:").unwrap_or(&key));
                }
            }
            None => cache.clear(),
        };
        'connection: while !stop.is_cancelled() {
            // Pushes first, as redis-py reads them before it serves from its cache.
            loop {
                match heard.try_recv() {
                    Ok(frame) => {
                        if let Some(keys) = frame.invalidated() {
                            apply(&mut cache, keys);
                        }
                    }
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(_) => break 'connection,
                }
            }
            let name = if rng.below(10) < 4 {
                rng.calm()
            } else {
                rng.name()
            };
            if let Some(held) = cache.get(&name) {
                let now = now_us();
                seen.lock().expect("not poisoned").push(Observation {
                    name,
                    sent_us: now,
                    answered_us: now,
                    seen: *held,
                    source: "client cache".into(),
                });
            } else {
                let sent_us = now_us();
                if w.write_all(format!("GET user:{name}\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
                let reply = loop {
                    match tokio::time::timeout(Duration::from_secs(15), heard.recv()).await {
                        Ok(Some(frame @ Frame::Push(_))) => {
                            apply(&mut cache, frame.invalidated().expect("a push"))
                        }
                        Ok(Some(reply)) => break reply,
                        _ => break 'connection,
                    }
                };
                let answered_us = now_us();
                let held = match reply {
                    Frame::Bulk(user) => {
                        let user: Value = serde_json::from_str(&user).expect("USER JSON");
                        Seen::Present(user["version"].as_i64().expect("a version"))
                    }
                    Frame::Nil => Seen::Absent,
                    // An error (a backend down): no claim about the data, nothing cached.
                    _ => continue,
                };
                seen.lock().expect("not poisoned").push(Observation {
                    name: name.clone(),
                    sent_us,
                    answered_us,
                    seen: held,
                    source: "resp".into(),
                });
                cache.insert(name, held);
            }
            tokio::time::sleep(Duration::from_micros(rng.below(3000))).await;
        }
        reader.abort();
    }
}

/// A program changing `users` with plain SQL: inserts, renames, deletes, touches, multi-row
/// updates, transactions held open across others (commit order is not id order), and TRUNCATE.
async fn sql_writer(db_url: String, mut rng: Rng, stop: CancellationToken) {
    let pg: tokio_postgres::Config = db_url.parse().expect("url");
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.is_cancelled() {
        let Some(c) = client.as_ref().filter(|c| !c.is_closed()) else {
            client = cacheward::store::pg::connect(&pg).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        };
        let (a, b) = (rng.name(), rng.name());
        let op = rng.below(1000);
        let result = match op {
            0..=249 => c
                .execute(
                    "INSERT INTO users (username) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&a],
                )
                .await
                .map(drop),
            250..=449 => c
                .execute("UPDATE users SET username = $2 WHERE username = $1", &[&a, &b])
                .await
                .map(drop),
            450..=599 => c
                .execute("DELETE FROM users WHERE username = $1", &[&a])
                .await
                .map(drop),
            600..=799 => c
                .execute(
                    "UPDATE users SET created_at = created_at + interval '1 second' WHERE username = ANY($1)",
                    &[&vec![a.clone(), b.clone()]],
                )
                .await
                .map(drop),
            800..=998 => {
                // Held open while others commit around it.
                let hold = Duration::from_millis(20 + rng.below(300));
                let db_url = db_url.clone();
                tokio::spawn(async move {
                    let pg: tokio_postgres::Config = db_url.parse().expect("url");
                    let Ok(c) = cacheward::store::pg::connect(&pg).await else {
                        return;
                    };
                    let _ = c
                        .batch_execute(&format!(
                            "BEGIN; UPDATE users SET created_at = now() WHERE username = '{a}'"
                        ))
                        .await;
                    tokio::time::sleep(hold).await;
                    let _ = c.batch_execute("COMMIT").await;
                });
                Ok(())
            }
            _ => {
                // Now and then the whole table goes, and the calm names come back.
                let calm = calm_names();
                let again = rng.below(2) == 0;
                c.batch_execute("TRUNCATE users").await.and(match again {
                    true => bring_back(c, &calm).await.map(drop),
                    false => Ok(()),
                })
            }
        };
        if let Err(e) = result {
            if e.code().is_none() {
                client = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
    }
}

/// Freezes a random daemon for a few milliseconds, often: a paused process (a GC pause, a noisy
/// neighbour, a slow network) holding a fill after its database read while the other daemon
/// applies changes. Returns the freezes, as faults.
async fn freezer(pids: Arc<Mutex<[u32; 2]>>, mut rng: Rng, stop: CancellationToken) -> Vec<Fault> {
    let mut freezes = Vec::new();
    while !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(30 + rng.below(200))).await;
        let pid = pids.lock().expect("not poisoned")[rng.below(2) as usize] as i32;
        let began_us = now_us();
        // SAFETY: signals to our own children's pids (a pid replaced meanwhile is another child
        // of ours: still harmless).
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        tokio::time::sleep(Duration::from_millis(5 + rng.below(60))).await;
        unsafe { libc::kill(pid, libc::SIGCONT) };
        freezes.push(Fault {
            name: "daemon frozen briefly",
            began_us,
            ended_us: now_us(),
            stalls_cdc: true,
        });
    }
    freezes
}

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

/// Every username's states, from the outbox and PostgreSQL's commit timestamps.
async fn history(env: &TestEnv) -> HashMap<String, Vec<State>> {
    let rows = env
        .pg()
        .await
        .query(
            "SELECT op, username, old_username, version,
                    (extract(epoch FROM pg_xact_commit_timestamp(
                        ((txid::text::numeric % 4294967296)::bigint)::text::xid)) * 1000000)::bigint
             FROM cacheward_outbox ORDER BY id",
            &[],
        )
        .await
        .expect("read the history");
    let mut states: HashMap<String, Vec<State>> = HashMap::new();
    let mut truncates = Vec::new();
    for row in rows {
        let op: String = row.get(0);
        let username: Option<String> = row.get(1);
        let old: Option<String> = row.get(2);
        let version: i64 = row.get(3);
        let committed_us: i64 = row.get(4);
        let mut push = |name: String, present| {
            states.entry(name).or_default().push(State {
                committed_us,
                version,
                present,
            })
        };
        match op.as_str() {
            "truncate" => truncates.push((committed_us, version)),
            "delete" => push(old.expect("a delete names its row"), false),
            _ => {
                push(username.expect("an insert or update names its row"), true);
                if let Some(old) = old {
                    push(old, false);
                }
            }
        }
    }
    for name in all_names() {
        let list = states.entry(name).or_default();
        for &(committed_us, version) in &truncates {
            list.push(State {
                committed_us,
                version,
                present: false,
            });
        }
    }
    for list in states.values_mut() {
        list.sort_by_key(|s| (s.committed_us, s.version, s.present));
    }
    states
}

/// How stale an answer may be: out-of-band changes reach Redis through the CDC worker, so a cached
/// entry may show a state superseded this shortly before the request. Guarantee 1 (docs/reference.md) says 1 s
/// once writes stop; in the storm, with two debug-build daemons, writers and faults on two cores,
/// the CDC worker is given twice that (measured: answers up to 1.35 s old right after faults).
/// Also covers a commit becoming visible a moment after its timestamp is taken.
const STALENESS_US: i64 = 2_000_000;

/// Waits until the CDC worker applies a change made now (a probe row, outside the checked names),
/// 30 s at most: the end of a fault that stopped it.
async fn caught_up(env: &TestEnv, n: u64) {
    let name = format!("probe{n}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(pg) = cacheward::store::pg::connect(&env.db_url.parse().expect("url")).await {
            // Again each time: a TRUNCATE may have taken it.
            let _ = pg
                .execute(
                    "INSERT INTO users (username) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&name],
                )
                .await;
        }
        if env
            .cached(&name)
            .await
            .is_some_and(|v| cacheward::model::entry::is_live(&v))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the CDC worker did not catch up within 30 s of a fault");
}

/// A fault, as wall-clock microseconds.
#[derive(Debug, Clone)]
struct Fault {
    name: &'static str,
    began_us: i64,
    ended_us: i64,
    /// Whether it stops the CDC worker (then `ended_us` is when it had caught up again).
    stalls_cdc: bool,
}

/// How stale `o` may be, given the faults around it: a fault that stops the CDC worker from
/// `began` until it has caught up (`ended`) delays changes by at most that long, so answers during
/// it and up to the staleness bound after it may be that much staler.
fn allowance(o: &Observation, faults: &[Fault]) -> i64 {
    faults
        .iter()
        .filter(|f| {
            f.stalls_cdc && o.sent_us >= f.began_us && o.sent_us <= f.ended_us + STALENESS_US
        })
        .map(|f| o.sent_us.min(f.ended_us) - f.began_us)
        .max()
        .unwrap_or(0)
        + STALENESS_US
}

/// Whether `o` shows a state that was current at some moment in [sent - allowance, answered].
fn explained(o: &Observation, states: &[State], allowance_us: i64) -> bool {
    history::explained(o.sent_us, o.answered_us, o.seen, states, allowance_us)
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
    let mut workers = Vec::new();
    for i in 0..4 {
        workers.push(tokio::spawn(daemon_client(
            daemons[i % 2].socket.clone(),
            Rng(rng.next()),
            stop.clone(),
            seen.clone(),
        )));
    }
    for socket in &resp_sockets {
        workers.push(tokio::spawn(tracked_client(
            socket.clone(),
            Rng(rng.next()),
            stop.clone(),
            seen.clone(),
        )));
    }
    for _ in 0..2 {
        workers.push(tokio::spawn(sql_writer(
            env.db_url.clone(),
            Rng(rng.next()),
            stop.clone(),
        )));
    }

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
    let fault_names: Vec<&str> = faults
        .iter()
        .map(|f| f.name)
        .filter(|name| *name != "daemon frozen briefly")
        .collect();
    eprintln!("soak: faults injected: {fault_names:?}");

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

    let history = history(&env).await;
    let seen = seen.lock().expect("not poisoned").clone();
    let from_cache = seen.iter().filter(|o| o.source == "cache").count();
    let from_client = seen.iter().filter(|o| o.source == "client cache").count();
    let wrong: Vec<&Observation> = seen
        .iter()
        .filter(|o| {
            let states = history.get(&o.name).map_or(&[][..], Vec::as_slice);
            !explained(o, states, allowance(o, &faults))
        })
        .collect();
    // How stale the answers were (0: current when sent), for the record.
    let mut stale_ms: Vec<i64> = seen
        .iter()
        .filter(|o| !explained(o, history.get(&o.name).map_or(&[][..], Vec::as_slice), 0))
        .map(|o| {
            let states = history.get(&o.name).map_or(&[][..], Vec::as_slice);
            (1..=60)
                .map(|step| step * 50_000)
                .find(|&allow| explained(o, states, allow))
                .unwrap_or(3_000_000)
                / 1000
        })
        .collect();
    stale_ms.sort_unstable();
    eprintln!(
        "soak: {} answers older than their request: p50 {} ms, p99 {} ms, max {} ms",
        stale_ms.len(),
        stale_ms.get(stale_ms.len() / 2).unwrap_or(&0),
        stale_ms.get(stale_ms.len() * 99 / 100).unwrap_or(&0),
        stale_ms.last().unwrap_or(&0)
    );
    let calm_present = seen
        .iter()
        .filter(|o| o.name.starts_with("calm") && o.seen != Seen::Absent)
        .count();
    eprintln!(
        "soak: {} answers checked ({from_cache} from the cache, {from_client} from a tracking client's own memory, {calm_present} calm rows), {} wrong",
        seen.len(),
        wrong.len()
    );
    for o in wrong.iter().take(10) {
        let around: Vec<&State> = history
            .get(&o.name)
            .into_iter()
            .flatten()
            .filter(|s| {
                (o.sent_us - 3_000_000..=o.answered_us + 1_000_000).contains(&s.committed_us)
            })
            .collect();
        let during: Vec<&Fault> = faults
            .iter()
            .filter(|f| f.began_us <= o.answered_us && f.ended_us + STALENESS_US >= o.sent_us)
            .collect();
        eprintln!("soak: wrong answer {o:?}\n  states around it: {around:?}\n  faults: {during:?}");
    }
    assert!(
        seen.len() > 100,
        "the storm answered too little: {}",
        seen.len()
    );
    assert!(from_cache > 0, "nothing was answered from the cache");
    assert!(
        from_client > 0,
        "no tracking client answered from its own memory"
    );
    assert!(
        wrong.is_empty(),
        "{} answers showed a state that was not current while they were in flight (seed {seed}, faults {fault_names:?}): first {:?}",
        wrong.len(),
        wrong.first()
    );
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
