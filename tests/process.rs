//! The `cacheward` binary as users and supervisors run it: signals (guarantee 7), the client
//! commands, `migrate`, configuration errors and `serve --dev`.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{wait_until, Rpc, TestEnv};
use serde_json::{json, Value};

use common::{wait_exit, DaemonProcess, BIN};

fn run_cli(args: &[&str], socket: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .output()
        .expect("run cacheward")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_removes_the_socket_and_exits_zero() {
    let env = TestEnv::start().await;
    let mut daemon = DaemonProcess::spawn(&env, "term");
    daemon.wait_ready().await;
    assert!(
        daemon.logs().contains("ready"),
        "logs say ready:\n{}",
        daemon.logs()
    );

    // A write held in PostgreSQL behind a table lock: in flight when SIGTERM arrives.
    let lock = env.lock_users().await;
    let mut c = Rpc::connect(&daemon.socket).await;
    c.send(
        &json!({"jsonrpc": "2.0", "id": 1, "method": "put", "params": {"username": "inflight"}}),
    )
    .await;
    let pg = env.pg().await;
    wait_until("the put waits on the lock", Duration::from_secs(5), || async {
        let waiting: i64 = pg
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%users%'", &[])
            .await
            .unwrap()
            .get(0);
        waiting > 0
    })
    .await;

    daemon.signal(libc::SIGTERM);
    let socket = daemon.socket.clone();
    wait_until(
        "socket removed: no longer accepting",
        Duration::from_secs(5),
        || async { !socket.exists() },
    )
    .await;
    assert!(daemon.child.try_wait().unwrap().is_none(), "still draining");
    lock.release().await;

    let answer = c.recv().await;
    assert_eq!(
        answer["result"]["created"],
        json!(true),
        "the in-flight write finished: {answer}"
    );
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "exit code 0 after SIGTERM; logs:\n{}",
        daemon.logs()
    );
    assert!(env.row_json("inflight").await.is_some());
    let logs = daemon.logs();
    assert!(
        logs.contains("shutdown requested") && logs.contains("stopped"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_and_sighup_does_not() {
    let env = TestEnv::start().await;
    let mut daemon = DaemonProcess::spawn(&env, "hup");
    daemon.wait_ready().await;
    daemon.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the daemon"
    );
    let mut c = Rpc::connect(&daemon.socket).await;
    assert_eq!(
        c.call("health", Value::Null).await["result"]["ready"],
        json!(true)
    );
    drop(c);
    daemon.signal(libc::SIGINT);
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(!daemon.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_daemons_socket_is_reused_and_a_live_one_is_refused() {
    let env = TestEnv::start().await;
    let mut first = DaemonProcess::spawn(&env, "crash");
    first.wait_ready().await;

    // A second daemon on the same path must refuse, leaving the first one alone.
    let mut second = DaemonProcess::spawn(&env, "crash");
    let status = second.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", second.logs());
    assert!(
        second.logs().contains("already listening"),
        "{}",
        second.logs()
    );
    assert_eq!(
        Rpc::connect(&first.socket)
            .await
            .call("health", Value::Null)
            .await["result"]["ready"],
        json!(true)
    );

    first.signal(libc::SIGKILL);
    assert_eq!(
        first.wait_exit(Duration::from_secs(5)).signal(),
        Some(libc::SIGKILL)
    );
    assert!(
        first.socket.exists(),
        "a killed daemon leaves its socket file"
    );
    let third = DaemonProcess::spawn(&env, "crash");
    third.wait_ready().await;
    assert!(
        third.logs().contains("replacing stale socket file"),
        "{}",
        third.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_print_json_and_exit_nonzero_on_error() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let socket = daemon.socket.clone();

    let out = run_cli(&["put", "cli-user"], &socket);
    assert!(out.status.success(), "{out:?}");
    let put: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(put["created"], json!(true));
    assert_eq!(put["user"], env.row_json("cli-user").await.unwrap());

    let out = run_cli(&["get", "cli-user"], &socket);
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["source"], json!("cache"));

    let out = run_cli(&["rename", "cli-user", "cli-renamed"], &socket);
    assert!(out.status.success(), "{out:?}");
    let out = run_cli(&["get", "cli-user"], &socket);
    assert_eq!(out.status.code(), Some(1), "not found is exit 1");
    let error: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(error["data"]["kind"], json!("not_found"));
    let out = run_cli(&["get", ""], &socket);
    assert_eq!(out.status.code(), Some(1));

    let out = run_cli(&["delete", "cli-renamed"], &socket);
    let deleted = serde_json::from_slice::<Value>(&out.stdout).unwrap();
    assert_eq!(deleted["deleted"], json!(true), "{deleted}");
    assert!(deleted["version"].as_i64().unwrap() > 0, "{deleted}");
    let out = run_cli(&["stats"], &socket);
    assert!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["requests"].is_u64());
    let out = run_cli(&["health"], &socket);
    assert!(out.status.success(), "health exits 0 when ready: {out:?}");

    let nowhere = env.dir.path().join("nobody-here.sock");
    let out = run_cli(&["health"], &nowhere);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody-here.sock"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_works_from_anywhere_and_bad_config_names_the_key() {
    let env = TestEnv::start().await;
    let url = env.pg.create_database("fresh").await.unwrap();
    let migrate = || {
        Command::new(BIN)
            .arg("migrate")
            .current_dir("/")
            .env("DATABASE_URL", &url)
            .output()
            .unwrap()
    };
    let out = migrate();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("applied"),
        "{out:?}"
    );
    let out = migrate();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("up to date"),
        "{out:?}"
    );

    let out = Command::new(BIN)
        .arg("serve")
        .current_dir(env.dir.path())
        .env("DATABASE_URL", &env.db_url)
        .env("REDIS_URL", &env.redis_url)
        .env("CACHEWARD__SOCKET__MAX_CONNECTIONS", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("socket.max_connections"),
        "{out:?}"
    );

    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent.toml"])
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml"),
        "{out:?}"
    );

    let out = Command::new(BIN)
        .arg("serve")
        .current_dir(env.dir.path())
        .env("DATABASE_URL", "postgresql://app:hunter2@127.0.0.1:1/db")
        .env("REDIS_URL", "redis://:hunter3@127.0.0.1:1/0")
        .env(
            "CACHEWARD__SOCKET__PATH",
            env.dir.path().join("secret.sock"),
        )
        .env("CACHEWARD__LOG__FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(out.id() as i32, libc::SIGTERM) };
    let out = out.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains(r#""message":"starting""#), "{logs}");
    assert!(
        logs.contains(r#""message":"backend unreachable""#),
        "{logs}"
    );
    assert!(
        !logs.contains("hunter2") && !logs.contains("hunter3"),
        "passwords leaked:\n{logs}"
    );
    for line in logs.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}

/// No password, in any form a driver accepts, raw or percent-decoded, reaches a log line or a
/// command's output: URLs whose password holds `/`, `?`, `#` or `"`, libpq key=value DSNs, Redis
/// ACL users, a configuration file that fails to parse (at start and on SIGHUP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_log_line_or_output() {
    let env = TestEnv::start().await;
    // (DATABASE_URL, REDIS_URL, the secrets they hold in every form).
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "postgresql://app:Sl/ash?q#h@127.0.0.1:1/db",
            "redis://svc:Redis%2FSecret@127.0.0.1:1/0",
            &["Sl/ash?q#h", "Redis%2FSecret", "Redis/Secret"],
        ),
        (
            "host=127.0.0.1 port=1 user=app password='Dsn Secret' dbname=db",
            "redis://svc:Tls%22Secret@127.0.0.1:1/0",
            &["Dsn Secret", "Tls%22Secret", "Tls\"Secret", "Tls\\\"Secret"],
        ),
        (
            "postgresql://app:Pct%40Secret@127.0.0.1:1/db?sslmode=disable",
            "redis://:hunter3@127.0.0.1:1/0",
            &["Pct%40Secret", "Pct@Secret", "hunter3"],
        ),
    ];
    for (i, (db, redis, secrets)) in cases.iter().enumerate() {
        let check = |what: &str, text: &str| {
            for secret in *secrets {
                assert!(!text.contains(secret), "{what} leaked {secret:?}:\n{text}");
            }
        };
        let out = Command::new(BIN)
            .arg("migrate")
            .env("DATABASE_URL", db)
            .env("REDIS_URL", redis)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        check("migrate", &format!("{out:?}"));
        let out = Command::new(BIN)
            .arg("verify")
            .env("DATABASE_URL", db)
            .env("REDIS_URL", redis)
            .output()
            .unwrap();
        check("verify", &format!("{out:?}"));

        // serve, JSON and text logs, through start, failed connections, a rejected reload.
        for format in ["json", "text"] {
            let file = env.dir.path().join(format!("secret-{i}-{format}.toml"));
            std::fs::write(&file, "[log]\nlevel = \"debug\"\n").unwrap();
            let child = Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&file)
                .current_dir(env.dir.path())
                .env("DATABASE_URL", db)
                .env("REDIS_URL", redis)
                .env(
                    "CACHEWARD__SOCKET__PATH",
                    env.dir.path().join(format!("s{i}.sock")),
                )
                .env("CACHEWARD__LOG__FORMAT", format)
                .env_remove("RUST_LOG")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(700)).await;
            // A broken file quoting a secret of its own: the reload is rejected without echoing it.
            std::fs::write(
                &file,
                "[postgres]\nurl = \"postgresql://app:FileSecret@db/app\n",
            )
            .unwrap();
            // SAFETY: signals to our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
            tokio::time::sleep(Duration::from_millis(300)).await;
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let out = child.wait_with_output().unwrap();
            let logs = String::from_utf8_lossy(&out.stderr);
            assert!(logs.contains("reload rejected"), "{logs}");
            check("serve", &logs);
            assert!(
                !logs.contains("FileSecret"),
                "the broken file leaked:\n{logs}"
            );
        }
    }
    // A file that fails to parse at start: named, with where, never quoted.
    let file = env.dir.path().join("broken.toml");
    std::fs::write(
        &file,
        "[postgres]\nurl = \"postgresql://app:FileSecret@db/app\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("broken.toml") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert!(!stderr.contains("FileSecret"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_dev_seeds_the_article_users_and_ctrl_c_removes_everything() {
    common::init_logs();
    let cwd = tempfile::tempdir().unwrap();
    let log = cwd.path().join("dev.log");
    let mut child = Command::new(BIN)
        .args(["serve", "--dev"])
        .current_dir(cwd.path())
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("CACHEWARD__LOG__STATS_INTERVAL_SECS", "0")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed (with its servers, through their parent-death signal) if an assertion fails first.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: kill on our own child's pid; harmless once it has exited.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _guard = KillOnDrop(child.id());
    let socket = cwd.path().join("cacheward.sock");
    wait_until("dev daemon ready", Duration::from_secs(30), || async {
        if tokio::net::UnixStream::connect(&socket).await.is_err() {
            return false;
        }
        Rpc::connect(&socket)
            .await
            .call("health", Value::Null)
            .await["result"]["ready"]
            == json!(true)
    })
    .await;
    let mut c = Rpc::connect(&socket).await;
    assert_eq!(
        c.get("user01").await["result"]["source"],
        json!("cache"),
        "user01 is seeded in Redis"
    );
    assert_eq!(
        c.get("user02").await["result"]["source"],
        json!("db"),
        "user02 comes from the database first"
    );
    assert_eq!(c.get("user02").await["result"]["source"], json!("cache"));
    for name in ["user05", "user06"] {
        assert_eq!(c.get(name).await["result"]["user"]["username"], json!(name));
    }
    drop(c);
    // The Redis-protocol front end, as the banner and the README's tour use it.
    let resp = cwd.path().join("cacheward-resp.sock");
    let cli = tokio::process::Command::new("redis-cli")
        .arg("-s")
        .arg(&resp)
        .args(["MGET", "user:user01", "accounts:by_email=ada@example.com"])
        .output()
        .await
        .expect("redis-cli");
    let out = String::from_utf8_lossy(&cli.stdout);
    assert!(
        out.contains("user01") && out.contains("ada@example.com"),
        "{out}"
    );

    let banner = std::fs::read_to_string(&log).unwrap();
    let pg_dir = banner
        .split("PostgreSQL in ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .map(PathBuf::from)
        .expect("banner names the PostgreSQL dir");
    assert!(pg_dir.exists());
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut child, Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(!socket.exists(), "socket removed");
    assert!(!resp.exists(), "the front end's socket removed");
    // Nothing left in the working directory but the test's own log.
    let left: Vec<_> = std::fs::read_dir(cwd.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != "dev.log")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    wait_until(
        "dev servers and their data removed",
        Duration::from_secs(5),
        || async { !pg_dir.exists() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_level_and_format_and_rejects_a_bad_file() {
    let env = TestEnv::start().await;
    let file = env.dir.path().join("config/cacheward.toml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "[log]\nlevel = \"info\"\n").unwrap();
    let mut daemon = DaemonProcess::spawn(&env, "reload");
    daemon.wait_ready().await;
    let health = || async {
        Rpc::connect(&daemon.socket)
            .await
            .call("health", Value::Null)
            .await
    };
    // Writes the file, sends SIGHUP and waits for `outcome` in the log.
    let reload_with = |text: &'static str, outcome: &'static str| {
        let (daemon, file) = (&daemon, &file);
        async move {
            std::fs::write(file, text).unwrap();
            daemon.signal(libc::SIGHUP);
            wait_until(outcome, Duration::from_secs(5), || async {
                daemon.logs().contains(outcome)
            })
            .await;
        }
    };
    health().await;
    let logs = daemon.logs();
    assert!(!logs.contains("DEBUG"), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "no colours when stderr is not a terminal: {logs}"
    );

    // Level: a debug event appears once the file says debug.
    reload_with("[log]\nlevel = \"debug\"\n", "config reloaded").await;
    health().await;
    wait_until("a debug event", Duration::from_secs(5), || async {
        daemon.logs().contains("DEBUG")
    })
    .await;

    // A file that fails validation changes nothing, and the daemon keeps serving.
    reload_with(
        "[log]\nlevel = \"debug\"\nlouder = true\n",
        "config reload rejected",
    )
    .await;
    assert!(
        daemon.logs().contains("log.louder"),
        "the error names the key"
    );
    assert_eq!(health().await["result"]["ready"], json!(true));

    // What needs a restart is named; the format switches to JSON lines.
    reload_with(
        "[log]\nlevel = \"debug\"\nformat = \"json\"\n[cache]\nttl_secs = 60\n",
        "\"message\":\"config reloaded\"",
    )
    .await;
    let logs = daemon.logs();
    assert!(logs.contains("cache.ttl_secs"), "{logs}");
    let last = logs.lines().last().unwrap();
    let line: Value = serde_json::from_str(last).expect("a JSON log line");
    assert_eq!(line["message"], json!("config reloaded"));

    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
}

/// What a fake systemd received on its notification socket.
struct FakeSystemd {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
}

impl FakeSystemd {
    fn bind(dir: &Path) -> FakeSystemd {
        let path = dir.join("systemd-notify.socket");
        let socket = tokio::net::UnixDatagram::bind(&path).expect("bind notify socket");
        FakeSystemd { socket, path }
    }

    /// Every message line received during `window`.
    async fn collect(&self, window: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        let mut buf = vec![0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            lines.extend(text.lines().map(str::to_owned));
        }
        lines
    }

    /// Waits up to `within` for a line equal to `wanted`; returns the lines seen until then.
    async fn wait_for(&self, wanted: &str, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    seen.extend(text.lines().map(str::to_owned));
                    if seen.iter().any(|l| l == wanted) {
                        return seen;
                    }
                }
                _ => panic!("no {wanted} within {within:?}; got {seen:?}"),
            }
        }
    }
}

fn pings(lines: &[String]) -> usize {
    lines.iter().filter(|l| *l == "WATCHDOG=1").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_pings_and_stopping_and_the_pings_stop_when_wedged() {
    let mut env = TestEnv::start().await;
    let systemd = FakeSystemd::bind(env.dir.path());
    env.redis.kill();
    let notify = systemd.path.to_str().unwrap().to_owned();
    let mut daemon = DaemonProcess::spawn_with(
        &env,
        "notify",
        &[
            ("NOTIFY_SOCKET", notify.as_str()),
            ("WATCHDOG_USEC", "1000000"),
            ("CACHEWARD_TEST_WEDGE_MONITOR_AFTER_MS", "5000"),
        ],
    );
    let started = tokio::time::Instant::now();

    // Redis is down: no READY=1, whatever else is said.
    let early = systemd.collect(Duration::from_millis(1200)).await;
    assert!(!early.iter().any(|l| l == "READY=1"), "{early:?}");
    env.redis.start_again().expect("redis back");
    let ready = systemd.wait_for("READY=1", Duration::from_secs(5)).await;
    assert!(
        ready.iter().any(|l| l.starts_with("STATUS=")),
        "a status line comes with readiness: {ready:?}"
    );

    // Pings at half of WatchdogSec (500 ms).
    let paced = systemd.collect(Duration::from_millis(2000)).await;
    assert!((3..=5).contains(&pings(&paced)), "pings in 2 s: {paced:?}");

    // The monitor wedges 5 s after it starts (later than `started` on a busy machine); the
    // watchdog withholds its pings from then on.
    while !daemon.logs().contains("watchdog ping withheld") {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no ping withheld: {}",
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    systemd.collect(Duration::ZERO).await;
    let wedged = systemd.collect(Duration::from_millis(1500)).await;
    assert_eq!(pings(&wedged), 0, "pinged while wedged: {wedged:?}");

    daemon.signal(libc::SIGTERM);
    systemd.wait_for("STOPPING=1", Duration::from_secs(5)).await;
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
}

/// The event names docs/operations.md documents (first column of its event table).
fn documented_events() -> std::collections::HashSet<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .expect("docs/operations.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(name, _)| name.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse_and_carry_documented_event_names() {
    let env = TestEnv::start().await;
    let documented = documented_events();
    assert!(documented.len() > 30, "{documented:?}");
    let mut daemon = DaemonProcess::spawn_with(
        &env,
        "jsonlogs",
        &[
            ("CACHEWARD__LOG__FORMAT", "json"),
            ("CACHEWARD__LOG__STATS_INTERVAL_SECS", "1"),
        ],
    );
    daemon.wait_ready().await;
    let mut c = Rpc::connect(&daemon.socket).await;
    c.call("put", json!({"username": "logged"})).await;
    c.call("get", json!({"username": "nobody"})).await;
    wait_until("a stats line", Duration::from_secs(5), || async {
        daemon.logs().contains("\"message\":\"stats\"")
    })
    .await;
    daemon.signal(libc::SIGHUP);
    wait_until("reloaded", Duration::from_secs(5), || async {
        daemon.logs().contains("config reloaded")
    })
    .await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());

    let mut seen = std::collections::HashSet::new();
    for line in daemon.logs().lines() {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let message = event["message"].as_str().expect("a message").to_owned();
        if event["level"] != json!("DEBUG") && event["level"] != json!("TRACE") {
            assert!(
                documented.contains(&message),
                "undocumented event {message:?}: {line}"
            );
        }
        if message == "starting" {
            let config: Value =
                serde_json::from_str(event["config"].as_str().expect("config field")).unwrap();
            assert!(config["postgres"]["url"].is_string(), "{config}");
        }
        if message == "stats" {
            assert!(
                event["errors"].as_u64().unwrap() >= 1,
                "client errors counted: {line}"
            );
        }
        seen.insert(message);
    }
    for event in [
        "starting",
        "backend reached",
        "ready",
        "cdc listening",
        "stats",
        "reloading the configuration",
        "config reloaded",
        "shutdown requested",
        "stopped accepting; draining connections",
        "stopped",
    ] {
        assert!(seen.contains(event), "no {event:?} in {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_endpoint_serves_every_documented_metric() {
    let env = TestEnv::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut daemon =
        DaemonProcess::spawn_with(&env, "metrics", &[("CACHEWARD__METRICS__LISTEN", &listen)]);
    daemon.wait_ready().await;
    let mut c = Rpc::connect(&daemon.socket).await;
    c.call("put", json!({"username": "counted"})).await;
    env.pg()
        .await
        .execute(
            "UPDATE users SET username = 'recounted' WHERE username = 'counted'",
            &[],
        )
        .await
        .unwrap();
    let scrape = |path: &'static str| common::scrape(&listen, path);
    // Idle connections (opened, nothing sent) do not hold up a scrape.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(&listen).await.unwrap());
    }
    let asked = std::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(1), scrape("/metrics"))
        .await
        .expect("a scrape is answered within 1 s despite 20 idle connections");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    eprintln!(
        "scrape behind 20 idle connections took {:?}",
        asked.elapsed()
    );
    drop(idle);
    wait_until(
        "the rename's lag is recorded",
        Duration::from_secs(5),
        || async {
            common::sample(&scrape("/metrics").await, "cacheward_cdc_lag_seconds_count") >= 1.0
        },
    )
    .await;
    let response = scrape("/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap();
    let documented: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `cacheward_"))
        .filter_map(|rest| rest.split_once('`').map(|(name, _)| name))
        .collect();
    assert_eq!(documented.len(), 38, "{documented:?}");
    for name in documented {
        assert!(
            response.contains(&format!("# TYPE cacheward_{name} ")),
            "cacheward_{name} missing:\n{response}"
        );
    }
    // The readiness probe's health and the put.
    assert!(common::sample(&response, "cacheward_requests_total") >= 2.0);
    assert_eq!(
        common::sample(&response, "cacheward_backend_up{backend=\"redis\"}"),
        1.0
    );
    assert_eq!(
        common::sample(&response, "cacheward_cdc_lag_seconds_bucket{le=\"+Inf\"}"),
        common::sample(&response, "cacheward_cdc_lag_seconds_count")
    );
    assert!(scrape("/other").await.starts_with("HTTP/1.1 404"));
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
}
