//! The randomized fault storm for declared tables (Guarantee 10), next to users: daemon clients
//! (gets by key and by lookup, upserts, updates of the key and of a lookup, deletes) and a plain-SQL
//! writer (the same, and TRUNCATEs) play with a few keys of two declared tables while Redis is
//! killed, flushed and frozen, PostgreSQL crashes and the daemon is stopped and started again.
//! Every `get` by key is checked against the
//! commit history (the outbox, with PostgreSQL's commit timestamps): it must show a state of that
//! key that was current at some moment in [sent − allowance, answered]. A Redis client caching on
//! its side (`CLIENT TRACKING` on the daemon's Redis-protocol socket) reads the same keys and
//! lookups; ROW carries no version, so its answers, its own memory's included, are held by their
//! content to the rows' history the soak's own trigger keeps. At the end every key answers its
//! row and `verify` finds nothing.
//!
//! Seeded: `CACHEWARD_SOAK_SEED` (printed, and in every failure), `CACHEWARD_SOAK_SECS` (default 12).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cacheward::cli::client::{Client, ClientError};
use cacheward::config::{Config, TableConfig};
use cacheward::model::table::{encode_key, encode_lookup};
use cacheward::store::pg::{capture, tables};
use common::history::{self, now_us, Rng, Seen, State, COMMITTED_US};
use common::tracked::{self, Answer, Frame};
use common::{Rpc, TestEnv};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = "
    CREATE TABLE items (region text NOT NULL, id integer NOT NULL, n integer NOT NULL,
                        PRIMARY KEY (region, id));
    CREATE TABLE people (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, n integer NOT NULL);
    -- Every row's content as it committed: what a Redis-protocol answer (ROW, no version) is
    -- checked against.
    CREATE TABLE soak_rows (seq bigserial PRIMARY KEY, tbl text NOT NULL, old jsonb, new jsonb,
                            txid bigint NOT NULL DEFAULT txid_current());
    CREATE FUNCTION soak_rows() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            INSERT INTO soak_rows (tbl) VALUES (TG_TABLE_NAME);
        ELSIF TG_OP = 'INSERT' THEN
            INSERT INTO soak_rows (tbl, new) VALUES (TG_TABLE_NAME, to_jsonb(NEW));
        ELSIF TG_OP = 'UPDATE' THEN
            INSERT INTO soak_rows (tbl, old, new) VALUES (TG_TABLE_NAME, to_jsonb(OLD), to_jsonb(NEW));
        ELSE
            INSERT INTO soak_rows (tbl, old) VALUES (TG_TABLE_NAME, to_jsonb(OLD));
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER soak_rows AFTER INSERT OR UPDATE OR DELETE ON items
        FOR EACH ROW EXECUTE FUNCTION soak_rows();
    CREATE TRIGGER soak_rows_truncate AFTER TRUNCATE ON items
        FOR EACH STATEMENT EXECUTE FUNCTION soak_rows();
    CREATE TRIGGER soak_rows AFTER INSERT OR UPDATE OR DELETE ON people
        FOR EACH ROW EXECUTE FUNCTION soak_rows();
    CREATE TRIGGER soak_rows_truncate AFTER TRUNCATE ON people
        FOR EACH STATEMENT EXECUTE FUNCTION soak_rows();";

/// Keys per table: few, so that changes collide.
const KEYS: u64 = 12;

/// An item's region: with the characters the key encoding escapes.
fn region(i: u64) -> String {
    format!("r:{}=x", i % 3)
}

/// The (table, key text) of a row, as the outbox's keys encode to.
fn item_key(region: &str, id: u64) -> (String, String) {
    let id = id.to_string();
    ("items".into(), encode_key(&[region, id.as_str()], true))
}

fn person_key(id: u64) -> (String, String) {
    (
        "people".into(),
        encode_key(&[id.to_string().as_str()], false),
    )
}

#[derive(Debug, Clone)]
struct Observation {
    key: (String, String),
    sent_us: i64,
    answered_us: i64,
    seen: Seen,
}

/// What a Redis-protocol answer showed: the row's content (ROW carries no version), or none.
#[derive(Debug, Clone)]
struct RowObservation {
    key: String,
    sent_us: i64,
    answered_us: i64,
    row: Option<Value>,
    source: &'static str,
}

/// The Redis keys a row is cached under: its key's, and its lookups'.
fn redis_keys(tbl: &str, row: &Value) -> Vec<String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match tbl {
        "items" => {
            let (region, id) = (text(&row["region"]), text(&row["id"]));
            vec![format!("items:{}", encode_key(&[&region, &id], true))]
        }
        _ => vec![
            format!("people:{}", encode_key(&[&text(&row["id"])], false)),
            format!(
                "people:{}",
                encode_lookup("by_email", &[&text(&row["email"])])
            ),
        ],
    }
}

/// A client caching on its side through the daemon's Redis-protocol socket (`CLIENT TRACKING`):
/// items by key, people by key and by lookup; every answer, its memory's too, is observed.
async fn tracked_client(
    socket: std::path::PathBuf,
    rng: Rng,
    stop: CancellationToken,
    seen: Arc<Mutex<Vec<RowObservation>>>,
) {
    let pick = |rng: &mut Rng| {
        let id = rng.below(KEYS);
        match rng.below(3) {
            0 => format!(
                "items:{}",
                encode_key(&[&region(id), &id.to_string()], true)
            ),
            1 => format!("people:{id}"),
            _ => format!(
                "people:{}",
                encode_lookup("by_email", &[&format!("p{id}@x")])
            ),
        }
    };
    let read = |reply: Frame| match reply {
        Frame::Bulk(row) => Some(Some(serde_json::from_str(&row).expect("ROW JSON"))),
        Frame::Nil => Some(None),
        // An error (a backend down): no claim about the data, nothing cached.
        _ => None,
    };
    let record = |answer: Answer<'_, Option<Value>>| {
        seen.lock().expect("not poisoned").push(RowObservation {
            key: answer.key.to_owned(),
            sent_us: answer.sent_us,
            answered_us: answer.answered_us,
            row: answer.shown.clone(),
            source: answer.source,
        })
    };
    tracked::tracked_client(socket, rng, stop, pick, read, record).await
}

fn config(env: &TestEnv) -> Config {
    let mut config = env.config();
    config
        .tables
        .insert("items".into(), TableConfig::keyed(&["region", "id"]));
    let people = TableConfig::keyed(&["id"]).lookup("by_email", &["email"]);
    config.tables.insert("people".into(), people);
    config.resp.socket = Some(env.dir.path().join("declared-resp.sock"));
    config
}

/// One daemon client: random reads and writes; every get by key is observed.
async fn daemon_client(
    socket: std::path::PathBuf,
    mut rng: Rng,
    stop: CancellationToken,
    seen: Arc<Mutex<Vec<Observation>>>,
) {
    let mut client: Option<Client> = None;
    while !stop.is_cancelled() {
        if client.is_none() {
            client = Client::connect(&socket).await.ok();
        }
        let Some(c) = client.as_mut() else {
            // The daemon is restarting.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let id = rng.below(KEYS);
        let (method, params, key) = match rng.below(10) {
            0..=4 if rng.below(2) == 0 => {
                let r = region(id);
                let key = item_key(&r, id);
                (
                    "get",
                    json!({"table": "items", "key": {"region": r, "id": id}}),
                    Some(key),
                )
            }
            0..=4 => (
                "get",
                json!({"table": "people", "key": {"id": id}}),
                Some(person_key(id)),
            ),
            5 => (
                "get",
                json!({"table": "people", "lookup": "by_email", "key": {"email": format!("p{id}@x")}}),
                None,
            ),
            6 => {
                let r = region(id);
                (
                    "upsert",
                    json!({"table": "items", "row": {"region": r, "id": id, "n": rng.below(100)}}),
                    None,
                )
            }
            7 => (
                "upsert",
                json!({"table": "people", "row": {"id": id, "email": format!("p{}@x", rng.below(KEYS)), "n": 1}}),
                None,
            ),
            8 => (
                "update",
                json!({"table": "people", "key": {"id": id}, "set": {"id": rng.below(KEYS), "n": 2}}),
                None,
            ),
            _ => (
                "delete",
                json!({"table": "people", "key": {"id": id}}),
                None,
            ),
        };
        let sent_us = now_us();
        let answer = tokio::time::timeout(Duration::from_secs(5), c.call(method, params)).await;
        let answered_us = now_us();
        let answer = match answer {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(ClientError::Rpc(error))) => Err(error),
            // A stopping daemon closed the connection (or it stalled): what the lost answer said
            // is not known; the history holds what committed.
            Ok(Err(_)) | Err(_) => {
                client = None;
                continue;
            }
        };
        let Some(key) = key else { continue };
        let seen_now = match answer {
            Ok(result) => Seen::Present(result["version"].as_i64().expect("a version")),
            Err(error) if error["data"]["kind"] == "not_found" => Seen::Absent,
            // unavailable (a backend down), conflict…: nothing said about the row.
            Err(_) => continue,
        };
        seen.lock().expect("not poisoned").push(Observation {
            key,
            sent_us,
            answered_us,
            seen: seen_now,
        });
    }
}

/// A plain-SQL writer: the same keys, out of band, and now and then a TRUNCATE of items.
async fn sql_writer(db_url: String, mut rng: Rng, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(pg) = cacheward::store::pg::connect(&db_url.parse().expect("url")).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !stop.is_cancelled() {
            let id = rng.below(KEYS) as i64;
            let other = rng.below(KEYS) as i64;
            let sql = match rng.below(40) {
                0 => "TRUNCATE items".to_owned(),
                1..=10 => format!(
                    "INSERT INTO items VALUES ('{}', {id}, {other}) ON CONFLICT (region, id) DO UPDATE SET n = items.n + 1",
                    region(id as u64)
                ),
                11..=14 => format!("DELETE FROM items WHERE id = {id}"),
                15..=24 => format!(
                    "INSERT INTO people VALUES ({id}, 'p{other}@x', 0) ON CONFLICT DO NOTHING"
                ),
                25..=30 => format!("UPDATE people SET n = n + 1 WHERE id = {id}"),
                31..=33 => format!("UPDATE people SET email = 'p{other}@x' WHERE id = {id}"),
                34..=36 => format!("UPDATE people SET id = {other} WHERE id = {id}"),
                _ => format!("DELETE FROM people WHERE id = {id}"),
            };
            // Unique violations are part of the game; a broken connection ends this one.
            if let Err(e) = pg.batch_execute(&sql).await {
                if e.is_closed() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.below(8))).await;
        }
    }
}

/// Every declared key's states, from the outbox and PostgreSQL's commit timestamps.
async fn history(env: &TestEnv) -> HashMap<(String, String), Vec<State>> {
    let rows = env
        .pg()
        .await
        .query(
            &format!(
                "SELECT op, tbl, row_key, old_key, version, {COMMITTED_US}
                 FROM cacheward_outbox WHERE tbl IS NOT NULL ORDER BY id"
            ),
            &[],
        )
        .await
        .expect("read the history");
    let mut states: HashMap<(String, String), Vec<State>> = HashMap::new();
    let mut truncates: Vec<(String, i64, i64)> = Vec::new();
    for row in rows {
        let op: String = row.get(0);
        let tbl: String = row.get(1);
        let row_key: Option<Vec<String>> = row.get(2);
        let old_key: Option<Vec<String>> = row.get(3);
        let version: i64 = row.get(4);
        let committed_us: i64 = row.get(5);
        let plain = tbl == "items";
        let text = |parts: &Vec<String>| {
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            encode_key(&parts, plain)
        };
        if op == "truncate" {
            truncates.push((tbl, committed_us, version));
            continue;
        }
        for (parts, present) in [(row_key, true), (old_key, false)] {
            if let Some(parts) = parts {
                states
                    .entry((tbl.clone(), text(&parts)))
                    .or_default()
                    .push(State {
                        committed_us,
                        version,
                        present,
                    });
            }
        }
    }
    for id in 0..KEYS {
        states.entry(item_key(&region(id), id)).or_default();
    }
    for ((tbl, _), list) in states.iter_mut() {
        for (truncated, committed_us, version) in &truncates {
            if truncated == tbl {
                list.push(State {
                    committed_us: *committed_us,
                    version: *version,
                    present: false,
                });
            }
        }
        list.sort_by_key(|s| (s.committed_us, s.version, s.present));
    }
    states
}

/// Every Redis key's states by content, from the soak's own trigger (`soak_rows`) and PostgreSQL's
/// commit timestamps: a state's version is its `seq`, whose row is in the second map.
async fn row_history(env: &TestEnv) -> (HashMap<String, Vec<State>>, HashMap<i64, Value>) {
    let rows = env
        .pg()
        .await
        .query(
            &format!(
                "SELECT seq, tbl, old, new, {COMMITTED_US}
                 FROM soak_rows ORDER BY seq"
            ),
            &[],
        )
        .await
        .expect("read the rows' history");
    let mut states: HashMap<String, Vec<State>> = HashMap::new();
    let mut contents = HashMap::new();
    let mut truncates = Vec::new();
    for row in rows {
        let (seq, tbl): (i64, String) = (row.get(0), row.get(1));
        let (old, new): (Option<Value>, Option<Value>) = (row.get(2), row.get(3));
        let committed_us: i64 = row.get(4);
        let state = |present| State {
            committed_us,
            version: seq,
            present,
        };
        if old.is_none() && new.is_none() {
            truncates.push((format!("{tbl}:"), state(false)));
            continue;
        }
        let now = new.as_ref().map_or(vec![], |n| redis_keys(&tbl, n));
        for key in old.as_ref().map_or(vec![], |o| redis_keys(&tbl, o)) {
            if !now.contains(&key) {
                states.entry(key).or_default().push(state(false));
            }
        }
        for key in now {
            states.entry(key).or_default().push(state(true));
        }
        if let Some(new) = new {
            contents.insert(seq, new);
        }
    }
    for (key, list) in states.iter_mut() {
        for (prefix, truncate) in &truncates {
            if key.starts_with(prefix.as_str()) {
                list.push(truncate.clone());
            }
        }
        list.sort_by_key(|s| (s.committed_us, s.version));
    }
    (states, contents)
}

/// Waits until the CDC worker applies a change made now (a probe row outside the checked keys).
async fn caught_up(env: &TestEnv, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(pg) = cacheward::store::pg::connect(&env.db_url.parse().expect("url")).await {
            // A change each time (see tests/storm's `caught_up_in`): one made before a fence that
            // refuses it shows nothing.
            let _ = pg
                .batch_execute(&format!(
                    "INSERT INTO items VALUES ('probe', {n}, 0)
                     ON CONFLICT (region, id) DO UPDATE SET n = items.n + 1"
                ))
                .await;
        }
        let mut conn = env.redis().await;
        let value: Option<String> = redis::cmd("GET")
            .arg(format!("items:probe:{n}"))
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        if value.is_some_and(|v| cacheward::model::entry::is_live(&v)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the CDC worker did not catch up within 30 s of a fault");
}

/// How stale an answer may be once the CDC worker runs (as in tests/soak.rs).
const STALENESS_US: i64 = 2_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_tables_stay_exact_through_a_seeded_storm_of_writes_and_faults() {
    let (seed, secs) = history::soak_settings("declared soak", 12);
    let mut rng = Rng(seed);
    let mut env = TestEnv::start().await;
    history::keep_history(&mut env).await;
    let mut pg = env.pg().await;
    pg.batch_execute(SCHEMA).await.unwrap();
    let config = config(&env);
    let checked = tables::resolve_all(&pg, &config).await.unwrap();
    capture::install(&mut pg, &checked).await.unwrap();
    drop(pg);
    let mut daemon = env.start_daemon(config.clone()).await;
    let sync: String = env
        .pg()
        .await
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        sync, "on",
        "the history needs every acknowledged commit to survive a crash"
    );
    let socket = daemon.socket.clone();
    let stop = CancellationToken::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (s, stop, seen) = (socket.clone(), stop.clone(), seen.clone());
        workers.push(tokio::spawn(daemon_client(s, Rng(rng.next()), stop, seen)));
    }
    let rows_seen = Arc::new(Mutex::new(Vec::new()));
    let resp_socket = config
        .resp
        .socket
        .clone()
        .expect("the Redis-protocol socket");
    workers.push(tokio::spawn(tracked_client(
        resp_socket,
        Rng(rng.next()),
        stop.clone(),
        rows_seen.clone(),
    )));
    workers.push(tokio::spawn(sql_writer(
        env.db_url.clone(),
        Rng(rng.next()),
        stop.clone(),
    )));

    let deadline = Instant::now() + Duration::from_secs(secs);
    // (began, caught up): while the CDC worker is stopped, answers may be that much staler.
    let mut faults: Vec<(&str, i64, i64)> = Vec::new();
    let mut probes = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
        let began = now_us();
        let pause = Duration::from_millis(100 + rng.below(300));
        let name = match rng.below(5) {
            4 => {
                // Stopped (its connections drained and closed, the change stream's lease given
                // up) and started again: it resumes the stream where the outbox says.
                daemon.stop().await;
                tokio::time::sleep(pause).await;
                daemon = env.start_daemon(config.clone()).await;
                "daemon stopped and restarted"
            }
            n => {
                let fault = [
                    history::Fault::RedisRestart,
                    history::Fault::RedisFlush,
                    history::Fault::RedisFrozen,
                    history::Fault::PostgresCrash,
                ][n as usize];
                history::inject(&mut env, fault, pause).await
            }
        };
        probes += 1;
        caught_up(&env, probes).await;
        faults.push((name, began, now_us()));
    }
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    eprintln!(
        "declared soak faults: {:?}",
        faults.iter().map(|f| f.0).collect::<Vec<_>>()
    );

    // Every answer against the history.
    let history = history(&env).await;
    let observations = seen.lock().expect("not poisoned").clone();
    assert!(
        observations.len() > 100,
        "too few answers: {}",
        observations.len()
    );
    // While a fault lasts, and until the CDC worker has caught up with it, answers may be as
    // stale as the fault is long.
    let allowance = |sent_us: i64| {
        faults
            .iter()
            .filter(|(_, began, ended)| sent_us >= *began && sent_us <= ended + STALENESS_US)
            .map(|(_, began, ended)| sent_us.min(*ended) - began)
            .max()
            .unwrap_or(0)
            + STALENESS_US
    };
    let mut unexplained = Vec::new();
    for o in &observations {
        let allowance = allowance(o.sent_us);
        let states = history.get(&o.key).map(Vec::as_slice).unwrap_or(&[]);
        if !history::explained(o.sent_us, o.answered_us, o.seen, states, allowance) {
            let drawn = match o.seen {
                Seen::Present(v) => env
                    .pg()
                    .await
                    .query(
                        "SELECT op || ' ' || tbl || ' ' || coalesce(row_key::text, '-') || ' ' || coalesce(old_key::text, '-') FROM cacheward_outbox WHERE version = $1",
                        &[&v],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>(),
                Seen::Absent => vec![],
            };
            let near: Vec<&State> = states
                .iter()
                .filter(|s| (s.committed_us - o.sent_us).abs() < 600_000)
                .collect();
            let rel: Vec<String> = near
                .iter()
                .map(|s| {
                    format!(
                        "{:+}ms v{} {}",
                        (s.committed_us - o.sent_us) / 1000,
                        s.version,
                        s.present
                    )
                })
                .collect();
            let around: Vec<String> = faults
                .iter()
                .map(|(n, b, e)| {
                    format!(
                        "{n} {:+}ms..{:+}ms",
                        (b - o.sent_us) / 1000,
                        (e - o.sent_us) / 1000
                    )
                })
                .collect();
            unexplained.push(format!("{:?} {:?} took {}us; its version in the outbox: {drawn:?}; states near: {rel:?}; faults: {around:?}", o.key, o.seen, o.answered_us - o.sent_us));
        }
    }
    assert!(
        unexplained.is_empty(),
        "seed {seed}: {} of {} answers no moment explains:\n{}",
        unexplained.len(),
        observations.len(),
        unexplained
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Every Redis-protocol answer, a tracking client's own memory's included, by its content.
    let (row_states, contents) = row_history(&env).await;
    let rows_seen = rows_seen.lock().expect("not poisoned").clone();
    let from_memory = rows_seen
        .iter()
        .filter(|o| o.source == "client cache")
        .count();
    let wrong: Vec<String> = rows_seen
        .iter()
        .filter(|o| {
            let states = row_states.get(&o.key).map(Vec::as_slice).unwrap_or(&[]);
            let shows = |s: &State| match &o.row {
                None => !s.present,
                Some(row) => s.present && contents.get(&s.version) == Some(row),
            };
            let (sent, answered) = (o.sent_us, o.answered_us);
            !history::explained_by(
                sent,
                answered,
                states,
                allowance(sent),
                o.row.is_none(),
                shows,
            )
        })
        .map(|o| {
            let states = row_states.get(&o.key).map(Vec::as_slice).unwrap_or(&[]);
            let near: Vec<String> = states
                .iter()
                .filter(|s| (s.committed_us - o.sent_us).abs() < 600_000)
                .map(|s| {
                    let row = contents.get(&s.version).filter(|_| s.present);
                    format!("{:+}ms {row:?}", (s.committed_us - o.sent_us) / 1000)
                })
                .collect();
            format!(
                "{} from the {} showed {:?} (took {} us); states near: {near:?}",
                o.key,
                o.source,
                o.row,
                o.answered_us - o.sent_us
            )
        })
        .collect();
    eprintln!(
        "declared soak: {} answers by version, {} by the Redis protocol ({from_memory} from a tracking client's own memory)",
        observations.len(),
        rows_seen.len()
    );
    assert!(
        wrong.is_empty(),
        "seed {seed}: {} of {} Redis-protocol answers no moment explains:\n{}",
        wrong.len(),
        rows_seen.len(),
        wrong.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        rows_seen.len() > 100 && from_memory > 0,
        "too few Redis-protocol answers: {} ({from_memory} from a client's memory)",
        rows_seen.len()
    );

    // Converged: every key answers its row, and verify finds nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pg = env.pg().await;
    let mut client = Rpc::connect(&socket).await;
    for id in 0..KEYS as i64 {
        for (params, sql) in [
            (
                json!({"table": "people", "key": {"id": id}}),
                format!("SELECT coalesce(max(v.version), -1) FROM people p LEFT JOIN cacheward_row_versions v ON v.tbl = 'people' AND v.key = ARRAY[p.id::text] WHERE p.id = {id}"),
            ),
            (
                json!({"table": "items", "key": {"region": region(id as u64), "id": id}}),
                format!("SELECT coalesce(max(coalesce(v.version, 0)), -1) FROM items i LEFT JOIN cacheward_row_versions v ON v.tbl = 'items' AND v.key = ARRAY[i.region, i.id::text] WHERE i.id = {id} AND i.region = '{}'", region(id as u64)),
            ),
        ] {
            let want: i64 = pg.query_one(&sql, &[]).await.unwrap().get(0);
            let answer: Value = client.call("get", params.clone()).await;
            let got = answer["result"]["version"].as_i64().unwrap_or(-1);
            assert_eq!(got, want.max(-1), "seed {seed}: {params} answered {answer}");
        }
    }
    let (code, said) = env.verify_tables(
        "[tables.items]\nkey = [\"region\", \"id\"]\n\
         [tables.people]\nkey = [\"id\"]\nlookups = { by_email = [\"email\"] }\n",
    );
    assert_eq!(code, Some(0), "seed {seed}: verify found:\n{said}");
    daemon.stop().await;
}
