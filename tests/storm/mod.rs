//! The storm shared by the fault soaks (tests/soak.rs on one Redis, tests/topology_soak.rs on a
//! Redis Cluster and a Sentinel group): daemon clients and plain-SQL writers change and read a
//! small set of users while faults hit the daemons and the servers, and every answer is checked
//! against the commit history (the outbox, with PostgreSQL's commit timestamps): a `get` sent at t0
//! and answered at t1 must show a state of that user that was current at some moment in
//! [t0 - allowance, t1]. Beside the JSON-RPC clients, Redis clients that cache on their side
//! (`CLIENT TRACKING` on the daemon's Redis-protocol socket) are held to the same rule.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::common::history::{self, now_us, Rng, Seen, State, COMMITTED_US};
use crate::common::tracked::{self, Answer, Frame};
use crate::common::TestEnv;

/// The soak's names, picked by the shared generator.
pub trait Names {
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
pub const NAMES: u64 = 48;

pub fn all_names() -> Vec<String> {
    (0..NAMES)
        .flat_map(|i| [format!("soak{i:02}"), format!("calm{i:02}")])
        .collect()
}

/// One answered `get`.
#[derive(Debug, Clone)]
pub struct Observation {
    pub name: String,
    pub sent_us: i64,
    pub answered_us: i64,
    pub seen: Seen,
    pub source: String,
}

/// A JSON-RPC client that reports failures instead of panicking: the daemon may be killed at any
/// moment.
pub struct Client {
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
pub fn calm_names() -> Vec<String> {
    (0..NAMES).map(|i| format!("calm{i:02}")).collect()
}

/// Inserts the calm users that are missing.
pub async fn bring_back(
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
pub async fn read_calm(socket: &Path, seen: &Mutex<Vec<Observation>>) {
    let requests: Vec<(&str, Value)> = (0..NAMES)
        .map(|i| ("get", json!({ "username": format!("calm{i:02}") })))
        .collect();
    if let Some(mut c) = Client::connect(socket).await {
        c.exchange(&requests, seen).await;
    }
}

/// A daemon client: pipelined gets (recorded), puts, renames and deletes, reconnecting whenever
/// the daemon goes away.
pub async fn daemon_client(
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

/// A Redis client caching on its side (`common::tracked`), reading `user:NAME` on the daemon's
/// Redis-protocol socket: every answer, its own memory's included, is recorded and held to the
/// commit history like any other.
pub async fn tracked_client(
    socket: PathBuf,
    rng: Rng,
    stop: CancellationToken,
    seen: Arc<Mutex<Vec<Observation>>>,
) {
    let pick = |rng: &mut Rng| {
        let name = if rng.below(10) < 4 {
            rng.calm()
        } else {
            rng.name()
        };
        format!("user:{name}")
    };
    let read = |reply: Frame| match reply {
        Frame::Bulk(user) => {
            let user: Value = serde_json::from_str(&user).expect("USER JSON");
            Some(Seen::Present(user["version"].as_i64().expect("a version")))
        }
        Frame::Nil => Some(Seen::Absent),
        // An error (a backend down): no claim about the data, nothing cached.
        _ => None,
    };
    let record = |answer: Answer<'_, Seen>| {
        seen.lock().expect("not poisoned").push(Observation {
            name: answer.key.trim_start_matches("user:").to_owned(),
            sent_us: answer.sent_us,
            answered_us: answer.answered_us,
            seen: *answer.shown,
            source: answer.source.into(),
        })
    };
    tracked::tracked_client(socket, rng, stop, pick, read, record).await
}

/// A program changing `users` with plain SQL: inserts, renames, deletes, touches, multi-row
/// updates, transactions held open across others (commit order is not id order), and TRUNCATE.
pub async fn sql_writer(db_url: String, mut rng: Rng, stop: CancellationToken) {
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
pub async fn freezer(
    pids: Arc<Mutex<[u32; 2]>>,
    mut rng: Rng,
    stop: CancellationToken,
) -> Vec<Fault> {
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

/// Every username's states, from the outbox and PostgreSQL's commit timestamps.
pub async fn history(env: &TestEnv) -> HashMap<String, Vec<State>> {
    let rows = env
        .pg()
        .await
        .query(
            &format!(
                "SELECT op, username, old_username, version, {COMMITTED_US}
                 FROM cacheward_outbox ORDER BY id"
            ),
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
pub const STALENESS_US: i64 = 2_000_000;

/// Waits until the CDC worker applies a change made now (a probe row, outside the checked names),
/// 30 s at most: the end of a fault that stopped it.
pub async fn caught_up(env: &TestEnv, n: u64) {
    let caught = caught_up_in(env, n, |key| async move {
        env.cached(&key["user:".len()..]).await
    });
    assert!(
        caught.await,
        "the CDC worker did not catch up within 30 s of a fault"
    );
}

/// [`caught_up`], reading the probe's entry with `cached`, given its Redis key (on a Cluster, a
/// Sentinel master); false if it did not within 30 s.
pub async fn caught_up_in<F, Fut>(env: &TestEnv, n: u64, cached: F) -> bool
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let name = format!("probe{n}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(pg) = cacheward::store::pg::connect(&env.db_url.parse().expect("url")).await {
            // A change each time, not just once: a TRUNCATE may have taken the row, and a fence
            // raised after the change was made (a promoted replica's cache dropped) rightly
            // refuses to apply it: only a change made after the fence shows the worker caught up.
            let _ = pg
                .execute(
                    "INSERT INTO users (username) VALUES ($1)
                     ON CONFLICT (username) DO UPDATE SET username = EXCLUDED.username",
                    &[&name],
                )
                .await;
        }
        if cached(format!("user:{name}"))
            .await
            .is_some_and(|v| cacheward::model::entry::is_live(&v))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A fault, as wall-clock microseconds.
#[derive(Debug, Clone)]
pub struct Fault {
    pub name: &'static str,
    pub began_us: i64,
    pub ended_us: i64,
    /// Whether it stops the CDC worker (then `ended_us` is when it had caught up again).
    pub stalls_cdc: bool,
}

/// How stale `o` may be, given the faults around it: a fault that stops the CDC worker from
/// `began` until it has caught up (`ended`) delays changes by at most that long, so answers during
/// it and up to the staleness bound after it may be that much staler.
pub fn allowance(o: &Observation, faults: &[Fault]) -> i64 {
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
pub fn explained(o: &Observation, states: &[State], allowance_us: i64) -> bool {
    history::explained(o.sent_us, o.answered_us, o.seen, states, allowance_us)
}

/// Checks every answer in `seen` against the commit history, given the `faults`; prints what it
/// found (how many, how stale, from where) and fails on any answer no moment explains.
pub async fn judge(
    env: &TestEnv,
    label: &str,
    seed: u64,
    seen: &Mutex<Vec<Observation>>,
    faults: &[Fault],
) {
    let fault_names: Vec<&str> = faults
        .iter()
        .map(|f| f.name)
        .filter(|name| *name != "daemon frozen briefly")
        .collect();
    eprintln!("{label}: faults injected: {fault_names:?}");
    let history = history(env).await;
    let seen = seen.lock().expect("not poisoned").clone();
    let from_cache = seen.iter().filter(|o| o.source == "cache").count();
    let from_client = seen.iter().filter(|o| o.source == "client cache").count();
    let wrong: Vec<&Observation> = seen
        .iter()
        .filter(|o| {
            let states = history.get(&o.name).map_or(&[][..], Vec::as_slice);
            !explained(o, states, allowance(o, faults))
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
        "{label}: {} answers older than their request: p50 {} ms, p99 {} ms, max {} ms",
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
        "{label}: {} answers checked ({from_cache} from the cache, {from_client} from a tracking client's own memory, {calm_present} calm rows), {} wrong",
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
        eprintln!(
            "{label}: wrong answer {o:?}\n  states around it: {around:?}\n  faults: {during:?}"
        );
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
    if let Some(first) = wrong.iter().min_by_key(|o| o.sent_us) {
        let last = wrong.iter().map(|o| o.answered_us).max().unwrap_or(0);
        let mut sources: HashMap<&str, usize> = HashMap::new();
        for o in &wrong {
            *sources.entry(o.source.as_str()).or_default() += 1;
        }
        eprintln!(
            "{label}: wrong answers from {} to {} µs, by source {sources:?}",
            first.sent_us, last
        );
        print_logs_around(env.dir.path(), label, first.sent_us);
    }
    assert!(
        wrong.is_empty(),
        "{} answers showed a state that was not current while they were in flight (seed {seed}, faults {fault_names:?}): first {:?}",
        wrong.len(),
        wrong.first()
    );
}

/// Starts the storm's clients: four JSON-RPC clients taking turns over `sockets`, a tracked
/// Redis client on each of `resp_sockets`, and two plain-SQL writers on `db_url`; all run until
/// `stop`.
pub fn start_clients(
    sockets: &[PathBuf],
    resp_sockets: &[PathBuf],
    db_url: &str,
    rng: &mut Rng,
    stop: &CancellationToken,
    seen: &Arc<Mutex<Vec<Observation>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut workers = Vec::new();
    for i in 0..4 {
        let socket = sockets[i % sockets.len()].clone();
        let client = daemon_client(socket, Rng(rng.next()), stop.clone(), seen.clone());
        workers.push(tokio::spawn(client));
    }
    for socket in resp_sockets {
        let client = tracked_client(socket.clone(), Rng(rng.next()), stop.clone(), seen.clone());
        workers.push(tokio::spawn(client));
    }
    for _ in 0..2 {
        let writer = sql_writer(db_url.to_owned(), Rng(rng.next()), stop.clone());
        workers.push(tokio::spawn(writer));
    }
    workers
}

/// Before `daemon_log` is created anew by a daemon started again, what the one before wrote is
/// kept beside it (`NAME.log.1`, `.2`, ...), for [`print_logs_around`].
pub fn keep_log(daemon_log: &Path) {
    if !daemon_log.exists() {
        return;
    }
    let kept = (1..)
        .map(|n| PathBuf::from(format!("{}.{n}", daemon_log.display())))
        .find(|path| !path.exists())
        .expect("a free name");
    let _ = std::fs::rename(daemon_log, kept);
}

/// Prints every daemon log line in `dir` (every incarnation's, see [`keep_log`]) written from 10 s
/// before `at_us` (wall-clock microseconds) to 1 s after, and every one that says a check is
/// refused: what the daemons saw around a wrong answer.
pub fn print_logs_around(dir: &Path, label: &str, at_us: i64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let near: Vec<&str> = text
            .lines()
            .filter(|line| {
                let stamp = line.split_whitespace().next().unwrap_or("");
                // And what was said once, whenever: a check found off.
                line.contains("refuses")
                    || chrono::DateTime::parse_from_rfc3339(stamp).is_ok_and(|t| {
                        (at_us - 10_000_000..=at_us + 1_000_000).contains(&t.timestamp_micros())
                    })
            })
            .collect();
        if !near.is_empty() {
            eprintln!(
                "{label}: {} around the first wrong answer:\n{}",
                log.display(),
                near.join("\n")
            );
        }
    }
}
