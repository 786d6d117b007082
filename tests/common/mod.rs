//! What every integration test stands on: its own throwaway PostgreSQL and Redis, the daemon
//! started in-process on them, and a line-level JSON-RPC client.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use cacheward::config::{Config, SecretUrl};
use cacheward::dev::{Postgres, PostgresOptions, Redis, RedisOptions};
use cacheward::rpc::server;
use cacheward::runtime::daemon;
use cacheward::service::hooks::{FillHook, Hooks};
use cacheward::store::pg;

pub mod certs;
pub mod history;
pub mod subject;
pub mod tracked;

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// One test's servers and scratch directory.
pub struct TestEnv {
    pub pg: Postgres,
    pub redis: Redis,
    pub db_url: String,
    pub redis_url: String,
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        TestEnv::start_with(RedisOptions::default()).await
    }

    /// [`TestEnv::start`] with a Redis that keeps its data across a kill, as production ones do
    /// (`appendonly yes`, `appendfsync always`).
    pub async fn start_persistent() -> TestEnv {
        TestEnv::start_with(RedisOptions {
            persistent: true,
            ..Default::default()
        })
        .await
    }

    /// Fresh servers, the schema migrated, `pg_stat_statements` installed.
    pub async fn start_with(redis: RedisOptions) -> TestEnv {
        TestEnv::start_servers(PostgresOptions::default(), redis).await
    }

    /// [`TestEnv::start_with`], the servers also listening on TCP with TLS if asked. `db_url` and
    /// `redis_url` stay the Unix sockets (the harness's own connections).
    pub async fn start_servers(pg: PostgresOptions, redis: RedisOptions) -> TestEnv {
        init_logs();
        let pg = Postgres::start_with(pg).expect("start postgres");
        let redis = Redis::start_with(redis).expect("start redis");
        let db_url = pg.create_database("cw").await.expect("create database");
        let redis_url = redis.url(3);
        let env = TestEnv {
            pg,
            redis,
            db_url,
            redis_url,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let mut client = env.pg().await;
        pg::migrate(&mut client).await.expect("migrate");
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .expect("pg_stat_statements");
        env
    }

    /// The daemon's configuration for this environment.
    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.postgres.url = Some(SecretUrl::new(self.db_url.clone()));
        config.redis.url = Some(SecretUrl::new(self.redis_url.clone()));
        config.socket.path = self.dir.path().join("cw.sock");
        config.log.stats_interval_secs = 0;
        config
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        let pg: tokio_postgres::Config = self.db_url.parse().expect("url");
        pg::connect(&pg).await.expect("connect to postgres")
    }

    /// Takes `ACCESS EXCLUSIVE` on `users` in an open transaction: every statement on the table,
    /// the daemon's included, waits until [`UsersLock::release`].
    pub async fn lock_users(&self) -> UsersLock {
        let client = self.pg().await;
        client
            .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock users");
        UsersLock(client)
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    /// Sets Redis key `key` to `value` behind cacheward's back.
    pub async fn redis_set(&self, key: &str, value: &str) {
        let () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut self.redis().await)
            .await
            .expect("redis SET");
    }

    /// The epoch recorded in Redis (the `run_id` of the process its data was written under).
    pub async fn epoch(&self) -> Option<String> {
        let mut conn = self.redis().await;
        redis::cmd("GET")
            .arg("user:\0epoch")
            .query_async(&mut conn)
            .await
            .expect("redis GET")
    }

    /// The raw value at `user:<name>`.
    pub async fn cached(&self, username: &str) -> Option<String> {
        let mut conn = self.redis().await;
        redis::cmd("GET")
            .arg(format!("user:{username}"))
            .query_async(&mut conn)
            .await
            .expect("redis GET")
    }

    /// The row as the daemon would render it, straight from PostgreSQL.
    pub async fn row_json(&self, username: &str) -> Option<Value> {
        let query = format!(
            "SELECT {} FROM users u WHERE u.username = $1",
            cacheward::model::user::USER_SELECT
        );
        let rows = self
            .pg()
            .await
            .query(&query, &[&username])
            .await
            .expect("select");
        rows.first().map(|r| {
            let user = cacheward::model::user::User::from_row(r).expect("a users row");
            serde_json::from_str(&user.json).expect("json")
        })
    }

    pub async fn start_daemon(&self, config: Config) -> Daemon {
        self.start_daemon_with(config, Hooks::default()).await
    }

    /// The daemon started in-process, without waiting for it to be ready.
    pub fn spawn_daemon(&self, config: Config, hooks: Hooks) -> Daemon {
        let config = Arc::new(config);
        let socket = server::bind(&config).expect("bind socket");
        let token = CancellationToken::new();
        let handle = tokio::spawn(daemon::run(config.clone(), socket, token.clone(), hooks));
        Daemon {
            socket: config.socket.path.clone(),
            token,
            handle: Some(handle),
        }
    }

    pub async fn start_daemon_with(&self, config: Config, hooks: Hooks) -> Daemon {
        let daemon = self.spawn_daemon(config, hooks);
        wait_until("daemon ready", Duration::from_secs(10), || async {
            match daemon.try_client().await {
                Some(mut c) => c.call("health", json!({})).await["result"]["ready"] == json!(true),
                None => false,
            }
        })
        .await;
        cdc_settled(&daemon.socket).await;
        daemon
    }
}

/// Waits (up to 15 s) until the daemon answering on `socket` says it is ready.
pub async fn ready_at(socket: &std::path::Path) {
    wait_until("daemon process ready", Duration::from_secs(15), || async {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(_) => {
                Rpc::connect(socket).await.call("health", Value::Null).await["result"]["ready"]
                    == json!(true)
            }
            Err(_) => false,
        }
    })
    .await;
}

/// Waits (up to 2 s) for the daemon's CDC worker to listen: a first start with an empty cache
/// begins at the outbox head, so a test's changes must come after it to be applied. A standby
/// (another daemon leads) never listens; then this just returns.
async fn cdc_settled(socket: &std::path::Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        let health = Rpc::connect(socket).await.call("health", Value::Null).await;
        if health["result"]["cdc"]["listening"] == json!(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The daemon running in-process.
pub struct Daemon {
    pub socket: PathBuf,
    token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Daemon {
    pub async fn client(&self) -> Rpc {
        Rpc::connect(&self.socket).await
    }

    /// The `stats` result, over a fresh connection.
    pub async fn stats(&self) -> Value {
        self.client().await.call("stats", Value::Null).await["result"].clone()
    }

    /// The `health` result, over a fresh connection.
    pub async fn health(&self) -> Value {
        self.client().await.call("health", Value::Null).await["result"].clone()
    }

    async fn try_client(&self) -> Option<Rpc> {
        let stream = UnixStream::connect(&self.socket).await.ok()?;
        Some(Rpc::from_stream(stream))
    }

    /// Signals shutdown and waits for the daemon to drain and return.
    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.expect("daemon task").expect("daemon run");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A line-level JSON-RPC client: can send anything, including garbage.
pub struct Rpc {
    reader: BufReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
    next_id: u64,
}

impl Rpc {
    pub async fn connect(path: &std::path::Path) -> Rpc {
        Rpc::from_stream(UnixStream::connect(path).await.expect("connect to daemon"))
    }

    fn from_stream(stream: UnixStream) -> Rpc {
        let (r, w) = stream.into_split();
        Rpc {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write to daemon");
    }

    pub async fn send(&mut self, request: &Value) {
        let mut line = serde_json::to_vec(request).expect("json");
        line.push(b'\n');
        self.send_raw(&line).await;
    }

    /// The next response line as text; panics after 10 s or at EOF.
    pub async fn recv_line(&mut self) -> String {
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line)).await
        {
            Ok(Ok(n)) if n > 0 => line,
            other => panic!("no response line within 10 s: {other:?}"),
        }
    }

    /// The next response line, parsed; panics after 10 s.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(Duration::from_secs(10))
            .await
            .expect("a response within 10 s")
    }

    /// The next response line, or `None` on timeout or EOF.
    pub async fn try_recv(&mut self, within: Duration) -> Option<Value> {
        let mut line = String::new();
        match tokio::time::timeout(within, self.reader.read_line(&mut line)).await {
            Ok(Ok(0)) | Err(_) => None,
            Ok(Ok(_)) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad response {line:?}: {e}")),
            ),
            Ok(Err(e)) => panic!("read from daemon: {e}"),
        }
    }

    /// Whether the daemon closed the connection (EOF within `within`).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let mut line = String::new();
        matches!(
            tokio::time::timeout(within, self.reader.read_line(&mut line)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// One request, its whole response.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        let response = self.recv().await;
        assert_eq!(
            response["id"],
            json!(id),
            "response to another request: {response}"
        );
        response
    }

    /// Pipelines a `get` of every name, then reads every answer (checked to come in order).
    pub async fn get_all(&mut self, names: &[String]) -> Vec<Value> {
        for (id, name) in names.iter().enumerate() {
            self.send(
                &json!({"jsonrpc": "2.0", "id": id, "method": "get", "params": {"username": name}}),
            )
            .await;
        }
        let mut answers = Vec::with_capacity(names.len());
        for id in 0..names.len() {
            let answer = self.recv().await;
            assert_eq!(answer["id"], json!(id), "answers in request order");
            answers.push(answer);
        }
        answers
    }

    pub async fn get(&mut self, username: &str) -> Value {
        self.call("get", json!({ "username": username })).await
    }
}

/// The `error.data.kind` of a response, or "" for a success.
pub fn kind(response: &Value) -> &str {
    response["error"]["data"]["kind"].as_str().unwrap_or("")
}

/// The answer of the metrics endpoint at `listen` to `GET path`, head and body.
pub async fn scrape(listen: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(listen).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// A sample's value in a scrape's `text`, by its full name (labels included).
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Polls `check` until it holds; panics with `what` after `deadline`.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cacheward");

/// `cacheward serve` as a child process, stderr captured to a file.
pub struct DaemonProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl DaemonProcess {
    pub fn spawn(env: &TestEnv, name: &str) -> DaemonProcess {
        DaemonProcess::spawn_with(env, name, &[])
    }

    /// With extra environment variables (`CACHEWARD__…` settings).
    pub fn spawn_with(env: &TestEnv, name: &str, vars: &[(&str, &str)]) -> DaemonProcess {
        let socket = env.dir.path().join(format!("{name}.sock"));
        DaemonProcess::serve(env.dir.path(), &socket, &env.db_url, &env.redis_url, vars)
    }

    /// `cacheward serve` on any backends (the benchmark's too), in `dir`, its socket at `socket`
    /// and its log beside it (`.log`); `vars` are extra settings.
    pub fn serve(
        dir: &std::path::Path,
        socket: &std::path::Path,
        db_url: &str,
        redis_url: &str,
        vars: &[(&str, &str)],
    ) -> DaemonProcess {
        let socket = socket.to_owned();
        let log = socket.with_extension("log");
        let child = Command::new(BIN)
            .arg("serve")
            .current_dir(dir)
            .env("DATABASE_URL", db_url)
            .env("REDIS_URL", redis_url)
            .env("CACHEWARD__SOCKET__PATH", &socket)
            .env("CACHEWARD__LOG__STATS_INTERVAL_SECS", "0")
            .env_remove("RUST_LOG")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn cacheward serve");
        DaemonProcess { child, socket, log }
    }

    pub async fn wait_ready(&self) {
        ready_at(&self.socket).await;
        cdc_settled(&self.socket).await;
    }

    /// [`DaemonProcess::serve`], once it is ready.
    pub async fn start(
        dir: &std::path::Path,
        socket: &std::path::Path,
        db_url: &str,
        redis_url: &str,
        vars: &[(&str, &str)],
    ) -> DaemonProcess {
        let daemon = DaemonProcess::serve(dir, socket, db_url, redis_url, vars);
        daemon.wait_ready().await;
        daemon
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        wait_exit(&mut self.child, within)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < within,
            "process still running after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl TestEnv {
    /// Whether Redis agrees with the database for every name: a live entry equal to the row, or,
    /// without a row, no live entry. (A row with no entry at all is fine: it is simply not cached.)
    pub async fn agrees(&self, names: &[String]) -> bool {
        for name in names {
            let cached = self
                .cached(name)
                .await
                .filter(|v| cacheward::model::entry::is_live(v));
            let cached: Option<Value> =
                cached.map(|v| serde_json::from_str(&v).expect("live JSON"));
            match (cached, self.row_json(name).await) {
                (Some(c), Some(r)) if c != r => return false,
                (Some(_), None) => return false,
                _ => {}
            }
        }
        true
    }

    /// Runs `cacheward verify` against this environment.
    pub fn verify(&self) -> std::process::Output {
        self.verify_with(None, &[])
    }

    /// Runs `cacheward verify --repair` against this environment.
    pub fn verify_and_repair(&self) -> std::process::Output {
        self.verify_with(None, &["--repair"])
    }

    /// Runs `cacheward verify` against this environment with `toml` (declared tables) as its
    /// configuration file: its exit code and what it printed.
    pub fn verify_tables(&self, toml: &str) -> (Option<i32>, String) {
        self.verify_tables_with(toml, &[])
    }

    /// [`TestEnv::verify_tables`] with more arguments (`--repair`).
    pub fn verify_tables_with(&self, toml: &str, args: &[&str]) -> (Option<i32>, String) {
        let out = self.verify_with(Some(toml), args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    fn verify_with(&self, toml: Option<&str>, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(BIN);
        command
            .arg("verify")
            .args(args)
            .current_dir(self.dir.path());
        if let Some(toml) = toml {
            let file = self.dir.path().join("verify.toml");
            std::fs::write(&file, toml).expect("write the configuration");
            command.arg("--config").arg(file);
        }
        command
            .env("DATABASE_URL", &self.db_url)
            .env("REDIS_URL", &self.redis_url)
            .env_remove("RUST_LOG")
            .output()
            .expect("run cacheward verify")
    }
}

/// The writes a failover test wants the promoted replica to miss: half of `names` get a newer
/// version through CDC (an out-of-band UPDATE), the other half are deleted through the daemon
/// (tombstones). Returns each name's row now (`None`: deleted).
pub async fn outdate(env: &TestEnv, client: &mut Rpc, names: &[String]) -> Vec<Option<Value>> {
    let pg = env.pg().await;
    let (updated, deleted) = names.split_at(names.len() / 2);
    for name in updated {
        pg.execute(
            "UPDATE users SET created_at = now() - interval '1 year' WHERE username = $1",
            &[name],
        )
        .await
        .expect("update");
    }
    for name in deleted {
        let answer = client.call("delete", json!({"username": name})).await;
        assert_eq!(answer["result"]["deleted"], json!(true), "{answer}");
    }
    futures::future::join_all(names.iter().map(|n| env.row_json(n))).await
}

/// Gets every name through the daemon, again and again from `killed_at` on, checking that no
/// answer is older than `rows` (a deleted row: `not_found`; PostgreSQL down would be
/// `unavailable`), until `repaired()` has held for 2 s. Returns when it first held, after the kill.
pub async fn through_failover<F, Fut>(
    client: &mut Rpc,
    names: &[String],
    rows: &[Option<Value>],
    killed_at: std::time::Instant,
    repaired: F,
) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    through_failover_with(client, names, rows, &[], killed_at, repaired).await
}

/// [`through_failover`], with declared tables' gets too: each one's params and the row it must
/// answer (`None`: deleted).
pub async fn through_failover_with<F, Fut>(
    client: &mut Rpc,
    names: &[String],
    rows: &[Option<Value>],
    table_rows: &[(Value, Option<Value>)],
    killed_at: std::time::Instant,
    mut repaired: F,
) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut repaired_after: Option<Duration> = None;
    while killed_at.elapsed() < Duration::from_secs(30) {
        let mut answers: Vec<(String, Value, &Option<Value>)> = Vec::new();
        for ((name, row), answer) in names.iter().zip(rows).zip(client.get_all(names).await) {
            answers.push((name.clone(), answer, row));
        }
        for (params, row) in table_rows {
            let answer = client.call("get", params.clone()).await;
            answers.push((params.to_string(), answer, row));
        }
        for (name, answer, row) in answers {
            let served = match answer["result"].get("user") {
                Some(user) => user,
                None => &answer["result"]["row"],
            };
            match row {
                Some(row) if served != row => assert_eq!(
                    answer["error"]["data"]["kind"],
                    json!("unavailable"),
                    "{name} through the failover: {answer}"
                ),
                None => assert!(answer["result"].is_null(), "{name} was deleted: {answer}"),
                _ => {}
            }
        }
        if repaired().await {
            let first = *repaired_after.get_or_insert(killed_at.elapsed());
            if killed_at.elapsed() > first + Duration::from_secs(2) {
                return first;
            }
        } else {
            repaired_after = None;
        }
        // Often: a window of stale answers after the failover would be read.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the cache was not repaired within 30 s of the kill");
}

/// Declares table `accounts` (key `id`, lookup `by_email`) in `config`, creates it and installs its
/// capture: the declared table the topology tests run next to users.
pub async fn declare_accounts(env: &TestEnv, config: &mut cacheward::config::Config) {
    config.tables.insert(
        "accounts".into(),
        cacheward::config::TableConfig::keyed(&["id"]).lookup("by_email", &["email"]),
    );
    let mut pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, plan text)",
    )
    .await
    .unwrap();
    let declared = cacheward::store::pg::tables::resolve_all(&pg, config)
        .await
        .unwrap();
    cacheward::store::pg::capture::install(&mut pg, &declared)
        .await
        .unwrap();
}

/// Outdates rows `ids` of the table [`declare_accounts`] makes (their emails `f{id}@x`), as
/// [`outdate`] does users: every other one updated out of band, the rest deleted through the
/// daemon. Returns what a get of each by key, then by lookup, must answer from now on: the row as
/// it is (`None`: deleted).
pub async fn outdate_accounts(
    env: &TestEnv,
    client: &mut Rpc,
    ids: &[i64],
) -> Vec<(Value, Option<Value>)> {
    let pg = env.pg().await;
    let mut answers = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        match n % 2 {
            0 => {
                pg.execute("UPDATE accounts SET plan = 'pro' WHERE id = $1", &[id])
                    .await
                    .unwrap();
            }
            _ => {
                let answer = client
                    .call("delete", json!({"table": "accounts", "key": {"id": id}}))
                    .await;
                assert_eq!(answer["result"]["deleted"], json!(true), "{answer}");
            }
        }
        let row = pg
            .query_opt(
                "SELECT row_to_json(a)::text FROM accounts a WHERE id = $1",
                &[id],
            )
            .await
            .unwrap()
            .map(|r| serde_json::from_str::<Value>(r.get(0)).unwrap());
        let email = format!("f{id}@x");
        answers.push((json!({"table": "accounts", "key": {"id": id}}), row.clone()));
        answers.push((
            json!({"table": "accounts", "lookup": "by_email", "key": {"email": email}}),
            row,
        ));
    }
    answers
}

/// A lock on `users` held by [`TestEnv::lock_users`].
pub struct UsersLock(tokio_postgres::Client);

impl UsersLock {
    pub async fn release(self) {
        self.0.batch_execute("COMMIT").await.expect("release lock");
    }
}

/// A hook that holds the fill of `only` (or of every name) after its database read until the test
/// adds permits to the semaphore; each hold is announced on the receiver (without waiting when
/// nobody listens).
pub fn hold_fills(only: Option<&str>) -> (Hooks, mpsc::Receiver<()>, Arc<Semaphore>) {
    let only: Option<Arc<str>> = only.map(Arc::from);
    let (reached_tx, reached_rx) = mpsc::channel(1);
    let go = Arc::new(Semaphore::new(0));
    let hook: FillHook = {
        let go = go.clone();
        Arc::new(move |username: String| {
            let (reached, go, only) = (reached_tx.clone(), go.clone(), only.clone());
            Box::pin(async move {
                if only.is_none_or(|name| *name == *username) {
                    let _ = reached.try_send(());
                    go.acquire().await.expect("never closed").forget();
                }
            })
        })
    };
    (
        Hooks {
            before_fill: Some(hook),
            ..Hooks::default()
        },
        reached_rx,
        go,
    )
}

/// `config` pointed at the Sentinel `group`: its sentinels, and the master they name.
pub fn follow_sentinels(config: &mut Config, group: &cacheward::dev::sentinel::RedisSentinels) {
    config.redis.mode = cacheward::config::RedisMode::Sentinel;
    config.redis.url = None;
    config.redis.urls = group
        .sentinel_urls()
        .into_iter()
        .map(SecretUrl::new)
        .collect();
    config.redis.sentinel_master = Some(cacheward::dev::sentinel::MASTER.into());
}
