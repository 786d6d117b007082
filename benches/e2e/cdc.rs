//! CDC lag: out-of-band renames at a fixed rate and unpaced, with NOTIFY and poll-only, timed
//! from the commit to the new key's appearance in Redis; and how fast a backlog drains.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use cacheward::dev::{Postgres, PostgresOptions, Redis, RedisOptions};

use crate::common::DaemonProcess;
use crate::measure::{env_or, histogram};
use crate::Bench;

/// Which users each CDC run renames (`u1..`): paced with NOTIFY (twice: the second time with
/// PostgreSQL's own floor measured beside it), paced poll-only, then the rest
/// split between an unpaced run and a backlog committed while the daemon is stopped.
pub struct Runs {
    pub rate: u64,
    pub seconds: u64,
    pub paced: std::ops::RangeInclusive<u64>,
    /// Paced again, each rename also telling a client of the bench's own (see [`cdc_lag`]).
    pub floor: std::ops::RangeInclusive<u64>,
    pub poll: std::ops::RangeInclusive<u64>,
    pub max: std::ops::RangeInclusive<u64>,
    pub backlog: std::ops::RangeInclusive<u64>,
}

/// How a run's renames are made: `rate` per second (as fast as PostgreSQL commits when `None`)
/// for `seconds`, from `connections` sessions.
pub struct Load {
    pub rate: Option<u64>,
    pub seconds: u64,
    pub connections: u64,
}

impl Load {
    /// Four sessions renaming as fast as PostgreSQL commits, for `seconds`.
    pub fn unpaced(seconds: u64) -> Load {
        Load {
            rate: None,
            seconds,
            connections: 4,
        }
    }
}

impl Runs {
    /// Four sessions renaming at the runs' rate for their seconds.
    pub fn load(&self) -> Load {
        Load {
            rate: Some(self.rate),
            seconds: self.seconds,
            connections: 4,
        }
    }

    pub fn of(users: u64) -> Runs {
        let rate: u64 = env_or("CACHEWARD_BENCH_CDC_RATE", 1000);
        let seconds: u64 = env_or("CACHEWARD_BENCH_CDC_SECS", 10);
        let paced = 1..=(rate * seconds).min(users);
        let floor = paced.end() + 1..=(paced.end() + rate * seconds).min(users);
        let poll = floor.end() + 1..=(floor.end() + rate * seconds).min(users);
        // The rest: half unpaced with the daemon running, half committed while it is stopped.
        let middle = poll.end() + (users - poll.end()) / 2;
        Runs {
            rate,
            seconds,
            max: poll.end() + 1..=middle,
            backlog: middle + 1..=users,
            paced,
            floor,
            poll,
        }
    }
}

/// Paced renames with NOTIFY, then unpaced ones, then a backlog drained after the daemon `pid`
/// resumes; into `report`.
pub async fn run(b: &Bench, runs: &Runs, pid: u32, report: &mut Value) {
    let paced = cdc_lag(
        &b.pg_config,
        &b.redis_client,
        runs.load(),
        runs.paced.clone(),
        "c",
        Alongside::Nothing,
    )
    .await;
    println!(
        "\ncdc: {} renames/s for {} s from 4 connections: {}",
        runs.rate,
        runs.seconds,
        paced.summary()
    );
    report["cdc"] = paced.json();
    // The same again, each rename also notifying a client of the bench's own in its transaction:
    // how long PostgreSQL takes to tell any LISTENing client of a commit, under the same load —
    // the part of the lag no change consumer can take off.
    if !runs.floor.is_empty() {
        let floored = cdc_lag(
            &b.pg_config,
            &b.redis_client,
            runs.load(),
            runs.floor.clone(),
            "f",
            Alongside::Floor,
        )
        .await;
        println!(
            "cdc: the same, with a LISTENing client of the bench's own told of each commit beside it: {}",
            floored.summary()
        );
        report["cdc_floor"] = floored.json();
    }
    // The highest rate: 4 connections renaming as fast as PostgreSQL commits them.
    let seconds: u64 = env_or("CACHEWARD_BENCH_CDC_MAX_SECS", 5);
    if !runs.max.is_empty() {
        let max = cdc_lag(
            &b.pg_config,
            &b.redis_client,
            Load::unpaced(seconds),
            runs.max.clone(),
            "m",
            Alongside::Nothing,
        )
        .await;
        println!("cdc: unpaced renames for {seconds} s from 4 connections (as fast as PostgreSQL commits): {}", max.summary());
        report["cdc_max"] = max.json();
        // Headroom: how fast the applier drains a backlog, against that commit rate.
        if !runs.backlog.is_empty() {
            let backlog = cdc_lag(
                &b.pg_config,
                &b.redis_client,
                Load::unpaced(seconds),
                runs.backlog.clone(),
                "b",
                Alongside::StoppedDaemon(pid),
            )
            .await;
            let drain_rate = backlog.changes as f64 / backlog.drained_in.as_secs_f64().max(1e-3);
            println!(
                    "cdc: backlog of {} renames committed while the daemon was stopped, applied in {:.2} s once it resumed: {drain_rate:.0}/s, {:.1}x the unpaced commit rate; lost {}",
                    backlog.changes, backlog.drained_in.as_secs_f64(), drain_rate / max.rate(), backlog.lost
                );
            report["cdc_backlog"] = json!({"changes": backlog.changes, "drained_secs": backlog.drained_in.as_secs_f64(),
                    "rate": drain_rate, "vs_unpaced": drain_rate / max.rate(), "lost": backlog.lost});
        }
    }
}

/// Paced renames through a daemon with `cdc.notify = false` and a short poll, as recommended for
/// write-heavy databases (the main daemon is stopped by now); into `report`.
pub async fn poll_only(b: &Bench, runs: &Runs, report: &mut Value) {
    // Poll-only: a daemon with cdc.notify = false (the trigger stops notifying) and a short
    // poll, as recommended for write-heavy databases.
    let poll_ms = "20";
    let _polling = DaemonProcess::start(
        b.dir.path(),
        &b.socket,
        &b.db_url,
        &b.redis_url,
        &[
            ("CACHEWARD__CDC__NOTIFY", "false"),
            ("CACHEWARD__CDC__POLL_INTERVAL_MS", poll_ms),
        ],
    )
    .await;
    let polled = cdc_lag(
        &b.pg_config,
        &b.redis_client,
        runs.load(),
        runs.poll.clone(),
        "p",
        Alongside::Nothing,
    )
    .await;
    println!(
        "cdc, poll-only (cdc.notify = false, poll_interval_ms = {poll_ms}): {} renames/s for {} s: {}",
        runs.rate,
        runs.seconds,
        polled.summary()
    );
    report["cdc_poll_only"] = polled.json();
    let pending: Vec<i32> = b
        .admin
        .query(
            "SELECT jsonb_array_length(pending) FROM cacheward_cdc_cursors",
            &[],
        )
        .await
        .expect("cursors")
        .iter()
        .map(|r| r.get(0))
        .collect();
    println!("cdc cursors' pending transactions after the runs: {pending:?}");
    b.admin
        .batch_execute("UPDATE cacheward_cdc_settings SET notify = true")
        .await
        .expect("notify again");
}

/// The paced run once more, on servers of its own: a PostgreSQL that flushes every commit before
/// it returns, as a production server does (the bench's own skips flushes), on a disk whose flush
/// takes 0.5 ms (`commit_delay`: every flush a commit waits for sleeps that long first; a network
/// disk's). What the change stream's own commits would add to the lag if the worker waited for
/// their flush: an early batch draws a transaction id, so its read commits a write, and a stored
/// cursor is one. Eight writers: four, each waiting for its own flush, fall short of the rate.
pub async fn durable(runs: &Runs, report: &mut Value) {
    let pg = Postgres::start_with(PostgresOptions {
        durable: true,
        ..Default::default()
    })
    .expect("postgres");
    let redis = Redis::start_with(RedisOptions {
        tcp: true,
        ..Default::default()
    })
    .expect("redis");
    let (db_url, pg_config, admin) = crate::seeded(&pg, *runs.paced.end()).await;
    for setting in [
        "ALTER SYSTEM SET commit_delay = 500",
        "ALTER SYSTEM SET commit_siblings = 0",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(setting).await.expect(setting);
    }
    let redis_url = redis.tcp_url(0).expect("tcp");
    let redis_client = redis::Client::open(redis_url.as_str()).expect("redis url");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("durable.sock");
    let _daemon = DaemonProcess::start(dir.path(), &socket, &db_url, &redis_url, &[]).await;
    let run = cdc_lag(
        &pg_config,
        &redis_client,
        Load {
            connections: 8,
            ..runs.load()
        },
        runs.paced.clone(),
        "d",
        Alongside::Nothing,
    )
    .await;
    println!(
        "cdc on a durable PostgreSQL (every commit flushed, 0.5 ms per flush): {} renames/s for {} s from 8 connections: {}",
        runs.rate,
        runs.seconds,
        run.summary()
    );
    report["cdc_durable"] = run.json();
}

/// When each key matching `pattern` was first written from now on (Redis keyspace
/// notifications), as the listener it returns (abort it when done) records it.
pub async fn watch_keys(
    redis_client: &redis::Client,
    pattern: &str,
) -> (
    Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    tokio::task::JoinHandle<()>,
) {
    use futures::StreamExt;
    let mut conn = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("K$")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    let mut pubsub = redis_client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .psubscribe(format!("__keyspace@*__:{pattern}"))
        .await
        .expect("psubscribe");
    let seen: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let listener = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let channel = msg.get_channel_name();
                let key = channel.split_once("__:").map_or(channel, |(_, k)| k);
                seen.lock()
                    .unwrap()
                    .entry(key.to_owned())
                    .or_insert_with(Instant::now);
            }
        }
    });
    (seen, listener)
}

/// Renames users `u1..` to `c1..` at `rate` per second for `seconds` from `connections` sessions, and times each new key's
/// appearance in Redis (keyspace notifications). Returns the lag histogram (µs) and how many
/// renames never showed up.
pub async fn cdc_lag(
    pg: &tokio_postgres::Config,
    redis_client: &redis::Client,
    load: Load,
    names: std::ops::RangeInclusive<u64>,
    prefix: &'static str,
    alongside: Alongside,
) -> CdcRun {
    let Load {
        rate,
        seconds,
        connections,
    } = load;
    let stopped_daemon = match alongside {
        Alongside::StoppedDaemon(pid) => Some(pid),
        _ => None,
    };
    let floor = matches!(alongside, Alongside::Floor);
    use std::collections::HashMap;
    let told = match floor {
        true => Some(listen(pg, FLOOR_CHANNEL).await),
        false => None,
    };
    let mut conn = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let (seen, listener) = watch_keys(redis_client, &format!("user:{prefix}*")).await;
    let committed: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    // Stopped (SIGSTOP) while the writers run, the daemon finds the whole run as a backlog.
    let signal = |signal| {
        if let Some(pid) = stopped_daemon {
            // SAFETY: kill(2) on the daemon's pid; no memory is involved.
            unsafe { libc::kill(pid as i32, signal) };
        }
    };
    signal(libc::SIGSTOP);
    let start = Instant::now();
    let mut writers = Vec::new();
    let first = *names.start();
    let last = *names.end();
    for w in 0..connections {
        let (pg, committed) = (pg.clone(), committed.clone());
        writers.push(tokio::spawn(async move {
            let client = cacheward::store::pg::connect(&pg).await.expect("pg");
            let sql = match floor {
                false => "UPDATE users SET username = $2 WHERE username = $1".to_owned(),
                true => format!(
                    "WITH u AS (UPDATE users SET username = $2 WHERE username = $1 RETURNING 1)
                     SELECT pg_notify('{FLOOR_CHANNEL}', $2) FROM u"
                ),
            };
            let stmt = client.prepare(&sql).await.expect("prepare");
            let mut i = first + w;
            while i <= last && start.elapsed() < Duration::from_secs(seconds) {
                if let Some(rate) = rate {
                    // Paced: the n-th change is due at n / rate seconds.
                    let due = start + Duration::from_secs_f64((i - first) as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let (from, to) = (format!("u{i}"), format!("{prefix}{i}"));
                client.execute(&stmt, &[&from, &to]).await.expect("update");
                committed
                    .lock()
                    .unwrap()
                    .insert(format!("user:{to}"), Instant::now());
                i += connections;
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let elapsed = start.elapsed();
    let resumed = Instant::now();
    signal(libc::SIGCONT);
    // Until every change showed up, or 15 s, then a little longer for stragglers.
    let expected = committed.lock().unwrap().len();
    while seen.lock().unwrap().len() < expected && resumed.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    listener.abort();
    let drained_in = seen
        .lock()
        .unwrap()
        .values()
        .max()
        .map_or(Duration::ZERO, |last| {
            last.saturating_duration_since(resumed)
        });
    let mut lag = histogram();
    let mut unseen = Vec::new();
    {
        let seen = seen.lock().unwrap();
        for (name, at) in committed.lock().unwrap().iter() {
            match seen.get(name) {
                Some(visible) => {
                    lag.saturating_record(visible.saturating_duration_since(*at).as_micros() as u64)
                }
                None => unseen.push(name.clone()),
            }
        }
    }
    // A change whose notification never came may still have reached Redis (a dropped
    // notification): only a key that is missing now is lost.
    let mut lost = 0;
    for keys in unseen.chunks(1000) {
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .expect("MGET");
        for (key, value) in keys.iter().zip(values) {
            if !value
                .as_deref()
                .is_some_and(cacheward::model::entry::is_live)
            {
                eprintln!("cdc: {key} never reached Redis: {value:?}");
                let client = cacheward::store::pg::connect(pg).await.expect("pg");
                let name = key.trim_start_matches("user:");
                for row in client
                    .query("SELECT id, txid::text, changed_at::text FROM cacheward_outbox WHERE username = $1", &[&name])
                    .await
                    .expect("outbox")
                {
                    let (id, txid, at): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
                    let around: Vec<(i64, String)> = client
                        .query("SELECT id, txid::text FROM cacheward_outbox WHERE id BETWEEN $1::bigint - 3 AND $1::bigint + 3 ORDER BY id", &[&id])
                        .await
                        .expect("around")
                        .iter()
                        .map(|r| (r.get(0), r.get(1)))
                        .collect();
                    eprintln!("  outbox id {id} txid {txid} at {at}; around: {around:?}");
                }
                lost += 1;
            }
        }
    }
    let changes = committed.lock().unwrap().len() as u64;
    let floor = told.map(|(told, listener)| {
        listener.abort();
        let told = told.lock().unwrap();
        let mut floor = histogram();
        for (key, at) in committed.lock().unwrap().iter() {
            if let Some(told_at) = told.get(key.trim_start_matches("user:")) {
                floor.saturating_record(told_at.saturating_duration_since(*at).as_micros() as u64);
            }
        }
        floor
    });
    CdcRun {
        changes,
        elapsed,
        lag,
        lost,
        drained_in,
        floor,
    }
}

/// What a [`cdc_lag`] run does besides its renames.
pub enum Alongside {
    Nothing,
    /// The daemon (its pid) is stopped (SIGSTOP) while the writers run: it finds the whole run
    /// as a backlog.
    StoppedDaemon(u32),
    /// Each rename also sends a NOTIFY of its own, in its own transaction, to a connection of the
    /// bench's, timed the same way (the run's `floor`).
    Floor,
}

/// The channel the floor's renames notify (see [`cdc_lag`]).
const FLOOR_CHANNEL: &str = "cacheward_bench_floor";

/// A connection LISTENing on `channel`: when each payload first arrived, as the task it returns
/// (abort it when done) records it.
async fn listen(
    pg: &tokio_postgres::Config,
    channel: &str,
) -> (
    Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    tokio::task::JoinHandle<()>,
) {
    use futures::StreamExt;
    let (client, mut connection) = pg.connect(tokio_postgres::NoTls).await.expect("pg");
    let told: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let (listening, listened) = tokio::sync::oneshot::channel();
    let listen = format!("LISTEN {channel}");
    let task = tokio::spawn({
        let told = told.clone();
        async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            let drive = async {
                while let Some(Ok(message)) = messages.next().await {
                    if let tokio_postgres::AsyncMessage::Notification(n) = message {
                        told.lock()
                            .unwrap()
                            .entry(n.payload().to_owned())
                            .or_insert_with(Instant::now);
                    }
                }
            };
            let listen = async {
                client.batch_execute(&listen).await.expect("LISTEN");
                let _ = listening.send(());
                // The client lives as long as its connection is driven.
                std::future::pending::<()>().await
            };
            tokio::join!(drive, listen);
        }
    });
    listened.await.expect("listening");
    (told, task)
}

/// Out-of-band changes committed, and how long each took to show in Redis.
pub struct CdcRun {
    changes: u64,
    elapsed: Duration,
    lag: Histogram<u64>,
    lost: u64,
    /// From the daemon resuming (or the last commit) to the last change showing in Redis.
    drained_in: Duration,
    /// From each commit to the bench's own LISTENing client being told of it (µs), if measured.
    floor: Option<Histogram<u64>>,
}

impl CdcRun {
    pub fn rate(&self) -> f64 {
        self.changes as f64 / self.elapsed.as_secs_f64()
    }

    pub fn summary(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let floor = self.floor.as_ref().map_or(String::new(), |floor| {
            format!(
                "; the bench's client told p50 {} ms, p99 {} ms (PostgreSQL's floor for any consumer)",
                ms(floor.value_at_quantile(0.5)),
                ms(floor.value_at_quantile(0.99))
            )
        });
        format!(
            "{} changes at {:.0}/s: lag p50 {} ms, p99 {} ms, max {} ms; lost {}{floor}",
            self.changes,
            self.rate(),
            ms(self.lag.value_at_quantile(0.5)),
            ms(self.lag.value_at_quantile(0.99)),
            ms(self.lag.max()),
            self.lost
        )
    }

    pub fn json(&self) -> Value {
        let mut json = json!({"changes": self.changes, "rate": self.rate(), "lost": self.lost,
            "lag_us": {"p50": self.lag.value_at_quantile(0.5), "p99": self.lag.value_at_quantile(0.99), "max": self.lag.max()}});
        if let Some(floor) = &self.floor {
            json["floor_us"] =
                json!({"p50": floor.value_at_quantile(0.5), "p99": floor.value_at_quantile(0.99)});
        }
        json
    }
}
