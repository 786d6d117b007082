//! The Redis-protocol front end (docs/reference.md, "Redis protocol front end") with real Redis
//! clients: the `redis` crate in RESP2 and RESP3 over the Unix socket and over TCP with AUTH,
//! `redis-cli`, and raw bytes for what no client sends (hostile frames, inline requests).

mod common;

use std::time::Duration;

use cacheward::config::{Config, TableConfig};
use cacheward::store::pg::{capture, tables};
use common::{kind, TestEnv};
use redis::{AsyncCommands, Value as R};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SCHEMA: &str = "
    CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, plan text,
                           secret text);
    CREATE TABLE orders (region text NOT NULL, id integer NOT NULL, note text,
                         PRIMARY KEY (region, id));
    INSERT INTO accounts VALUES (1, 'a@x', 'free', 's1'), (2, 'b@x', 'pro', 's2');
    INSERT INTO orders VALUES ('e:u=1', 7, 'n7');
    INSERT INTO users (username) VALUES ('alice');";

const PASSWORD: &str = "front-end-Secret-7";

struct Front {
    env: TestEnv,
    daemon: common::Daemon,
    socket: std::path::PathBuf,
    port: u16,
}

impl Front {
    fn url(&self, protocol: u8) -> String {
        format!(
            "redis+unix://{}?protocol=resp{protocol}",
            self.socket.display()
        )
    }

    async fn conn(&self, protocol: u8) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url(protocol))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the front end")
    }

    /// A connection speaking raw bytes to the Unix socket.
    async fn raw(&self) -> tokio::net::UnixStream {
        tokio::net::UnixStream::connect(&self.socket).await.unwrap()
    }
}

/// Servers, `accounts` and `orders` declared and captured, a daemon with both listeners.
async fn start() -> Front {
    start_with(|_| {}).await
}

/// [`start`], the daemon's configuration adjusted by `adjust`.
async fn start_with(adjust: impl FnOnce(&mut Config)) -> Front {
    let env = TestEnv::start().await;
    let mut config: Config = env.config();
    let accounts = TableConfig {
        exclude: vec!["secret".into()],
        ..TableConfig::keyed(&["id"]).lookup("by_email", &["email"])
    };
    config.tables.insert("accounts".into(), accounts);
    config
        .tables
        .insert("orders".into(), TableConfig::keyed(&["region", "id"]));
    let socket = env.dir.path().join("resp.sock");
    let port = cacheward::dev::free_port().unwrap();
    let password = env.dir.path().join("resp-password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    config.resp.socket = Some(socket.clone());
    config.resp.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    config.resp.password_file = Some(password);
    adjust(&mut config);
    let mut pg = env.pg().await;
    pg.batch_execute(SCHEMA).await.unwrap();
    let checked = tables::resolve_all(&pg, &config).await.unwrap();
    capture::install(&mut pg, &checked).await.unwrap();
    let daemon = env.start_daemon(config).await;
    // Until the daemon has checked the tables against the catalog, their rows are unavailable.
    let mut client = daemon.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let probe = json!({"table": "orders", "key": {"region": "w", "id": 1}});
    while kind(&client.call("get", probe.clone()).await) != "not_found" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tables were never checked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Front {
        env,
        daemon,
        socket,
        port,
    }
}

fn text(value: &R) -> String {
    match value {
        R::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
        R::SimpleString(s) => s.clone(),
        R::VerbatimString { text, .. } => text.clone(),
        other => panic!("not a string: {other:?}"),
    }
}

fn json_of(value: &R) -> Value {
    serde_json::from_str(&text(value)).unwrap()
}

/// Sends `bytes`, reads what comes back until the daemon closes or `within` passes.
async fn exchange(
    stream: &mut tokio::net::UnixStream,
    bytes: &[u8],
    within: Duration,
) -> (String, bool) {
    // The daemon may close before it read everything (a protocol error): what it answered counts.
    let _ = stream.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[tokio::test]
async fn reads_answer_users_and_declared_rows_as_the_json_rpc_get_does_in_resp2_and_resp3() {
    let front = start().await;
    let mut rpc = front.daemon.client().await;
    let alice = rpc.call("get", json!({"username": "alice"})).await["result"]["user"].clone();
    let account = rpc
        .call("get", json!({"table": "accounts", "key": {"id": 1}}))
        .await["result"]["row"]
        .clone();
    assert_eq!(account, json!({"id": 1, "email": "a@x", "plan": "free"}));
    for protocol in [2, 3] {
        let mut conn = front.conn(protocol).await;
        let user: R = conn.get("user:alice").await.unwrap();
        assert_eq!(json_of(&user), alice, "RESP{protocol}");
        let row: R = conn.get("accounts:1").await.unwrap();
        assert_eq!(json_of(&row), account);
        // A lookup answers the row its key does; a composite key with ':' and '=' percent-encoded.
        let by_email: R = conn.get("accounts:by_email=b@x").await.unwrap();
        assert_eq!(json_of(&by_email)["plan"], "pro");
        let order: R = conn.get("orders:e%3Au%3D1:7").await.unwrap();
        assert_eq!(
            json_of(&order),
            json!({"region": "e:u=1", "id": 7, "note": "n7"})
        );
        // Missing rows are nil, in both protocols.
        let missing: R = conn.get("accounts:3").await.unwrap();
        assert_eq!(missing, R::Nil);
        let missing: R = conn.get("user:nobody").await.unwrap();
        assert_eq!(missing, R::Nil);
        let many: Vec<Option<String>> = conn
            .mget(&["user:alice", "accounts:9", "accounts:2", "orders:w:1"])
            .await
            .unwrap();
        assert_eq!(
            many.iter().map(Option::is_some).collect::<Vec<_>>(),
            [true, false, true, false]
        );
        assert_eq!(
            serde_json::from_str::<Value>(many[2].as_ref().unwrap()).unwrap()["id"],
            2
        );
        let n: i64 = redis::cmd("EXISTS")
            .arg(&["user:alice", "accounts:1", "accounts:9", "user:alice"])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 3, "counted per key named, as Redis counts");
        // Once the near cache holds every key, MGET and EXISTS are answered from it alone
        // (its hits count them), the same as the read path answers them.
        let held = ["user:alice", "accounts:1", "accounts:2", "user:alice"];
        let first: Vec<Option<String>> = conn.mget(&held).await.unwrap();
        common::wait_until(
            "an MGET answered by the near cache",
            Duration::from_secs(5),
            || {
                let (mut conn, daemon, first) = (conn.clone(), &front.daemon, first.clone());
                async move {
                    let hits = |s: Value| s["near_cache"]["hits"].as_u64().unwrap();
                    let before = hits(daemon.stats().await);
                    let again: Vec<Option<String>> = conn.mget(&held).await.unwrap();
                    assert_eq!(again, first);
                    hits(daemon.stats().await) == before + 4
                }
            },
        )
        .await;
        let n: i64 = redis::cmd("EXISTS")
            .arg(&held)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 4);
        // A key the near cache lacks, or one that names no row, after held ones: the read path
        // answers the whole command, nothing of the held ones' answers written twice.
        let many: Vec<Option<String>> = conn.mget(&[held[0], held[1], "accounts:9"]).await.unwrap();
        assert_eq!(many[..2], first[..2]);
        assert_eq!(many[2], None);
        let e = conn
            .mget::<_, Vec<Option<String>>>(&[held[0], "accounts:x"])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("accounts:x"), "{e}");
    }
    // A row changed out of band is answered changed (the change stream reached the cache).
    front
        .env
        .pg()
        .await
        .batch_execute("UPDATE accounts SET plan = 'team' WHERE id = 1")
        .await
        .unwrap();
    let mut conn = front.conn(3).await;
    common::wait_until("the change is answered", Duration::from_secs(5), || {
        let mut conn = conn.clone();
        async move {
            let row: R = conn.get("accounts:1").await.unwrap();
            json_of(&row)["plan"] == "team"
        }
    })
    .await;
    let row: Option<String> = conn.get("accounts:1").await.unwrap();
    assert!(row.unwrap().contains("team"));
    let stats = front.daemon.stats().await;
    assert!(stats["resp"]["requests"].as_u64().unwrap() >= 20, "{stats}");
}

#[tokio::test]
async fn keys_that_name_no_row_are_errors_naming_them_and_writes_are_readonly() {
    let front = start().await;
    let mut conn = front.conn(3).await;
    let error = |r: redis::RedisResult<R>| r.unwrap_err().to_string();
    let e = error(conn.get("sessions:1").await);
    assert!(e.contains("sessions:1") && e.contains("no table"), "{e}");
    // Not the key its row is cached under: said with the one it is.
    let e = error(conn.get("accounts:007").await);
    assert!(e.contains("accounts:007") && e.contains("\"7\""), "{e}");
    let e = error(conn.get("accounts:x").await);
    assert!(e.contains("bigint") && e.contains("id"), "{e}");
    let e = error(conn.get("accounts:by_phone=1").await);
    assert!(e.contains("lookup"), "{e}");
    let e = error(conn.get("orders:w").await);
    assert!(e.contains("2 key columns"), "{e}");
    // cacheward's own keys under the prefix are no row.
    let e = error(conn.get("user:\0fence").await);
    assert!(e.contains("no table") || e.contains("names no user"), "{e}");
    // Writes and unknown commands.
    let e = error(conn.set("user:alice", "x").await);
    assert!(
        e.to_uppercase().contains("READONLY") && e.contains("JSON-RPC"),
        "{e}"
    );
    let e = error(
        redis::cmd("DEL")
            .arg("accounts:1")
            .query_async(&mut conn)
            .await,
    );
    assert!(e.to_uppercase().contains("READONLY"), "{e}");
    let e = error(redis::cmd("FROB").arg("a").query_async(&mut conn).await);
    assert!(
        e.contains("unknown command 'FROB'") && e.contains("'a'"),
        "{e}"
    );
    let e = error(redis::cmd("GET").query_async(&mut conn).await);
    assert!(e.contains("wrong number of arguments for 'get'"), "{e}");
    // The connection is still usable after every error.
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn handshakes_of_common_clients_succeed() {
    let front = start().await;
    let mut raw = front.raw().await;
    let (answer, _) = exchange(
        &mut raw,
        b"HELLO 3 SETNAME app\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert!(answer.starts_with("%7\r\n"), "{answer}");
    for part in [
        "$6\r\nserver\r\n$5\r\nredis\r\n",
        "$7\r\nversion\r\n$5\r\n7.4.0\r\n",
        "$5\r\nproto\r\n:3\r\n",
    ] {
        assert!(answer.contains(part), "{answer}");
    }
    let script: &[(&str, &str)] = &[
        ("CLIENT SETINFO LIB-NAME redis-py\r\n", "+OK\r\n"),
        ("CLIENT SETINFO LIB-VER 5.2.1\r\n", "+OK\r\n"),
        ("CLIENT GETNAME\r\n", "$3\r\napp\r\n"),
        ("SELECT 0\r\n", "+OK\r\n"),
        ("SELECT 1\r\n", "-ERR DB index is out of range\r\n"),
        ("PING\r\n", "+PONG\r\n"),
        ("ECHO hi\r\n", "$2\r\nhi\r\n"),
        ("HELLO 4\r\n", "-NOPROTO unsupported protocol version\r\n"),
        ("COMMAND COUNT\r\n", ":15\r\n"),
        ("CLIENT GETREDIR\r\n", ":-1\r\n"),
        (
            "GET nothing:1\r\n",
            "-ERR key 'nothing:1' is under no table's prefix",
        ),
    ];
    for (request, expected) in script {
        let (answer, closed) =
            exchange(&mut raw, request.as_bytes(), Duration::from_millis(300)).await;
        assert!(answer.starts_with(expected), "{request}: {answer}");
        assert!(!closed);
    }
    let (answer, _) = exchange(&mut raw, b"CLIENT INFO\r\n", Duration::from_millis(300)).await;
    assert!(
        answer.contains("name=app")
            && answer.contains("resp=3")
            && answer.contains("lib-name=redis-py"),
        "{answer}"
    );
    let (answer, _) = exchange(&mut raw, b"INFO server\r\n", Duration::from_millis(300)).await;
    assert!(
        answer.contains("redis_version:7.4.0") && answer.contains("cacheward_version:"),
        "{answer}"
    );
    let (answer, _) = exchange(
        &mut raw,
        b"COMMAND DOCS get\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert!(answer.starts_with("%1\r\n$3\r\nget\r\n%3\r\n"), "{answer}");
    let (answer, _) = exchange(
        &mut raw,
        b"COMMAND INFO get nosuch\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert!(
        answer.starts_with("*2\r\n*10\r\n$3\r\nget\r\n:2\r\n") && answer.ends_with("_\r\n"),
        "{answer}"
    );
    // RESET goes back to RESP2 and no name; QUIT answers and closes.
    let (answer, _) = exchange(
        &mut raw,
        b"RESET\r\nCLIENT GETNAME\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(answer, "+RESET\r\n$-1\r\n");
    let (answer, closed) = exchange(&mut raw, b"QUIT\r\nPING\r\n", Duration::from_secs(2)).await;
    assert_eq!((answer.as_str(), closed), ("+OK\r\n", true));
    // redis-cli, as people use it.
    // Not std's Command: the daemon runs on this test's one thread.
    let cli = tokio::process::Command::new("redis-cli")
        .arg("-s")
        .arg(&front.socket)
        .args(["GET", "accounts:2"])
        .output()
        .await
        .expect("redis-cli");
    let out = String::from_utf8_lossy(&cli.stdout);
    assert!(
        out.contains("\"plan\":\"pro\"") || out.contains("\\\"plan\\\":\\\"pro\\\""),
        "{out}"
    );
}

#[tokio::test]
async fn tcp_serves_only_clients_that_auth() {
    let front = start().await;
    let addr = format!("127.0.0.1:{}", front.port);
    let requests = "GET user:alice\r\nHELLO 3\r\nAUTH wrong\r\nAUTH default wrong\r\nPING\r\n";
    let lines = answered(front.port, "127.0.0.1", requests, 5).await;
    let answer = lines.join("\r\n");
    assert_eq!(lines[0], "-NOAUTH Authentication required.");
    assert!(
        lines[1].starts_with("-NOAUTH HELLO must be called"),
        "{answer}"
    );
    assert!(
        lines[2].starts_with("-WRONGPASS") && lines[3].starts_with("-WRONGPASS"),
        "{answer}"
    );
    assert_eq!(lines[4], "-NOAUTH Authentication required.");
    // A client given the password (it sends HELLO 3 AUTH default … or AUTH) reads.
    for protocol in [2, 3] {
        let url = format!("redis://:{PASSWORD}@{addr}/?protocol=resp{protocol}");
        let mut conn = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let row: Option<String> = conn.get("accounts:2").await.unwrap();
        assert!(row.unwrap().contains("pro"));
    }
    // The Unix socket needs no AUTH (its peers are the file mode's and socket.allow_*'s).
    let mut conn = front.conn(2).await;
    let row: Option<String> = conn.get("accounts:2").await.unwrap();
    assert!(row.is_some());
}

/// Wrong passwords are counted per address: past the burst, that address's tries (the right
/// password too) are refused unchecked, on any connection, until one comes back a second later;
/// another address is not held up.
#[tokio::test]
async fn wrong_passwords_hold_up_their_address_only() {
    let front = start().await;
    let wrong = "AUTH wrong\r\n".repeat(10);
    let right = format!("AUTH {PASSWORD}\r\n");
    let lines = answered(front.port, "127.0.0.1", &format!("{wrong}{right}"), 11).await;
    assert!(
        lines[..10].iter().all(|l| l.starts_with("-WRONGPASS")),
        "{lines:?}"
    );
    let refused = "-ERR too many failed AUTH attempts from this address: try again later";
    assert_eq!(lines[10], refused);
    let again = answered(front.port, "127.0.0.1", &right, 1).await;
    assert_eq!(
        again,
        [refused],
        "a new connection from the address waits too"
    );
    let other = answered(front.port, "127.0.0.2", &right, 1).await;
    assert_eq!(other, ["+OK"], "another address is not held up");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = answered(front.port, "127.0.0.1", &right, 1).await;
    assert_eq!(later, ["+OK"], "a second later, one try is back");
}

/// The first `count` lines answered to `requests`, sent on a new TCP connection from `local`.
async fn answered(port: u16, local: &str, requests: &str, count: usize) -> Vec<String> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut tcp = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    tcp.write_all(requests.as_bytes()).await.unwrap();
    let mut got = vec![0u8; 4096];
    let mut answer = String::new();
    while answer.matches("\r\n").count() < count {
        let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {answer}");
        answer.push_str(&String::from_utf8_lossy(&got[..n]));
    }
    answer
        .split("\r\n")
        .take(count)
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn hostile_frames_cost_their_connection_only() {
    let front = start().await;
    let mut good = front.conn(2).await;
    let hostile: &[(&[u8], &str)] = &[
        (
            b"*1\r\n*1\r\n*1\r\n*1\r\n$1\r\na\r\n",
            "expected '$', got '*'",
        ),
        (
            b"*2\r\n$3\r\nGET\r\n$99999999999\r\n",
            "invalid bulk length",
        ),
        (b"*2\r\n$3\r\nGET\r\n$70000\r\n", "invalid bulk length"),
        (b"*99999999\r\n", "invalid multibulk length"),
        (b"*1\r\n%1\r\n", "expected '$', got '%'"),
    ];
    for (bytes, error) in hostile {
        let mut raw = front.raw().await;
        let (answer, closed) = exchange(&mut raw, bytes, Duration::from_secs(2)).await;
        assert!(
            answer.starts_with("-ERR Protocol error: ") && answer.contains(error),
            "{answer}"
        );
        assert!(closed, "a protocol error closes its connection");
    }
    // Deeply nested arrays: refused at the second header, nothing recursed into.
    let mut deep = Vec::new();
    for _ in 0..100_000 {
        deep.extend_from_slice(b"*1\r\n");
    }
    let mut raw = front.raw().await;
    let (answer, closed) = exchange(&mut raw, &deep, Duration::from_secs(2)).await;
    assert!(
        answer.contains("expected '$', got '*'") && closed,
        "{answer}"
    );
    // A client that pipelines reads and never reads its answers: the daemon stops reading it
    // (socket.max_inflight_bytes) instead of buffering; others are served meanwhile.
    let mut greedy = front.raw().await;
    let request = b"*2\r\n$3\r\nGET\r\n$10\r\naccounts:1\r\n".repeat(1000);
    let writer = tokio::spawn(async move {
        for _ in 0..200 {
            if tokio::time::timeout(Duration::from_millis(200), greedy.write_all(&request))
                .await
                .is_err()
            {
                return true; // the daemon stopped reading: writes block
            }
        }
        false
    });
    let row: Option<String> = good.get("accounts:1").await.unwrap();
    assert!(row.is_some());
    assert!(
        writer.await.unwrap(),
        "the daemon read everything a non-reading client sent"
    );
    let row: Option<String> = good.get("accounts:2").await.unwrap();
    assert!(row.is_some());
}

/// One RESP3 frame as a test reads it.
#[derive(Debug, Clone, PartialEq)]
enum F {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(String),
    Null,
    Array(Vec<F>),
    Map(Vec<F>),
    Push(Vec<F>),
}

/// A raw RESP3 connection: requests written as inline commands, replies read in order, pushes
/// (which may come between them) kept aside.
struct Raw {
    reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    pushes: std::collections::VecDeque<F>,
}

impl Raw {
    async fn connect(front: &Front) -> Raw {
        let mut raw = Raw::resp2(front).await;
        assert!(matches!(raw.call("HELLO 3").await, F::Map(_)));
        raw
    }

    /// A connection left in RESP2 (its messages are arrays: read them with [`Raw::frame`]).
    async fn resp2(front: &Front) -> Raw {
        let (r, writer) = front.raw().await.into_split();
        Raw {
            reader: tokio::io::BufReader::new(r),
            writer,
            pushes: Default::default(),
        }
    }

    /// The next frame, whatever it is, if one comes within `within`.
    async fn frame(&mut self, within: Duration) -> Option<F> {
        tokio::time::timeout(within, read_frame(&mut self.reader))
            .await
            .ok()
    }

    async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }

    /// The reply to `line`; pushes before it are kept for [`Raw::push_within`].
    async fn call(&mut self, line: &str) -> F {
        self.send(line).await;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut self.reader))
                .await
                .expect("a reply within 5 s");
            match frame {
                F::Push(_) => self.pushes.push_back(frame),
                // A RESP2 subscriber's messages come between replies too.
                F::Array(ref parts) if parts.first() == Some(&F::Bulk("message".into())) => {
                    self.pushes.push_back(frame)
                }
                reply => return reply,
            }
        }
    }

    /// The next push, if one comes within `within`.
    async fn push_within(&mut self, within: Duration) -> Option<F> {
        if let Some(push) = self.pushes.pop_front() {
            return Some(push);
        }
        let frame = tokio::time::timeout(within, read_frame(&mut self.reader))
            .await
            .ok()?;
        assert!(
            matches!(frame, F::Push(_)),
            "a reply nobody asked for: {frame:?}"
        );
        Some(frame)
    }

    async fn push(&mut self) -> F {
        self.push_within(Duration::from_secs(5))
            .await
            .expect("a push within 5 s")
    }

    /// Waits for a push that names `key` (others may come first: each key read is told of).
    async fn told_of(&mut self, key: &str) {
        let mut heard = Vec::new();
        while !heard.iter().any(|k| k == key) {
            let push = self.push_within(Duration::from_secs(5)).await;
            let push = push.unwrap_or_else(|| panic!("no push named {key}: heard {heard:?}"));
            heard.extend(keys_of(&push));
        }
    }

    /// The pushes that come within `within`.
    async fn pushes_within(&mut self, within: Duration) -> Vec<F> {
        let mut all = Vec::new();
        while let Some(push) = self.push_within(within).await {
            all.push(push);
        }
        all
    }

    /// Asserts that no push arrives for a while.
    async fn quiet(&mut self) {
        let got = self.push_within(Duration::from_millis(300)).await;
        assert_eq!(got, None, "nothing was owed");
    }
}

fn read_frame<'a>(
    r: &'a mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = F> + Send + 'a>> {
    use tokio::io::AsyncBufReadExt;
    Box::pin(async move {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        let n = || rest.parse::<i64>().unwrap();
        match kind {
            "+" => F::Simple(rest.into()),
            "-" => F::Error(rest.into()),
            ":" => F::Int(n()),
            "_" => F::Null,
            "$" if n() < 0 => F::Null,
            "$" => {
                let mut buf = vec![0u8; n() as usize + 2];
                r.read_exact(&mut buf).await.unwrap();
                F::Bulk(String::from_utf8_lossy(&buf[..buf.len() - 2]).into_owned())
            }
            "*" | "%" | ">" | "~" => {
                let count = if kind == "%" { 2 * n() } else { n() };
                let mut items = Vec::new();
                for _ in 0..count {
                    items.push(read_frame(r).await);
                }
                match kind {
                    "%" => F::Map(items),
                    ">" => F::Push(items),
                    _ => F::Array(items),
                }
            }
            other => panic!("unexpected frame {other}{rest}"),
        }
    })
}

/// An `invalidate` push naming `keys` (`None`: the null-keys flush).
fn invalidate(keys: Option<&[&str]>) -> F {
    let keys = match keys {
        Some(keys) => F::Array(keys.iter().map(|k| F::Bulk((*k).into())).collect()),
        None => F::Null,
    };
    F::Push(vec![F::Bulk("invalidate".into()), keys])
}

/// The keys an `invalidate` push names (empty for a flush).
fn keys_of(push: &F) -> Vec<String> {
    match push {
        F::Push(parts) => match parts.get(1) {
            Some(F::Array(keys)) => keys
                .iter()
                .map(|k| match k {
                    F::Bulk(k) => k.clone(),
                    other => panic!("{other:?}"),
                })
                .collect(),
            _ => Vec::new(),
        },
        other => panic!("not a push: {other:?}"),
    }
}

/// Reads `key` until it is answered with nothing owed behind it: the near cache holds it as
/// answered, so the client may cache it. The answer, and the keys of the pushes heard meanwhile.
async fn read_watched(raw: &mut Raw, key: &str) -> (F, Vec<String>) {
    let mut heard = Vec::new();
    for _ in 0..5 {
        for push in raw.pushes_within(Duration::from_millis(100)).await {
            heard.extend(keys_of(&push));
        }
        let answer = raw.call(&format!("GET {key}")).await;
        let behind = raw.pushes_within(Duration::from_millis(200)).await;
        if behind.is_empty() {
            return (answer, heard);
        }
        for push in behind {
            heard.extend(keys_of(&push));
        }
    }
    panic!("{key} was never answered watched");
}

#[tokio::test]
async fn a_tracking_client_is_told_of_every_change_to_what_it_read() {
    let mut front = start().await;
    let mut raw = Raw::connect(&front).await;
    assert_eq!(raw.call("CLIENT TRACKING ON").await, F::Simple("OK".into()));
    assert_eq!(raw.call("CLIENT GETREDIR").await, F::Int(0));
    // A cold read comes from PostgreSQL: nothing watches it yet, so it is voided right behind
    // its reply; read again through Redis it is watched, and nothing follows.
    let first = raw.call("GET accounts:1").await;
    assert!(
        matches!(&first, F::Bulk(row) if row.contains("free")),
        "{first:?}"
    );
    assert_eq!(raw.push().await, invalidate(Some(&["accounts:1"])));
    read_watched(&mut raw, "accounts:1").await;
    raw.call("GET accounts:1").await;
    raw.quiet().await;
    // A missing row is never watched.
    assert_eq!(raw.call("GET accounts:99").await, F::Null);
    assert_eq!(raw.push().await, invalidate(Some(&["accounts:99"])));
    let pg = front.env.pg().await;
    // An out-of-band UPDATE (the change stream).
    pg.batch_execute("UPDATE accounts SET plan = 'team' WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(raw.push().await, invalidate(Some(&["accounts:1"])));
    let (row, _) = read_watched(&mut raw, "accounts:1").await;
    assert!(matches!(&row, F::Bulk(r) if r.contains("team")), "{row:?}");
    // A lookup answers its row: a change to that row, and the row moving away from the looked-up
    // value, each reach the client under the lookup's key.
    let (row, _) = read_watched(&mut raw, "accounts:by_email=a@x").await;
    assert!(matches!(&row, F::Bulk(r) if r.contains("team")), "{row:?}");
    pg.batch_execute("UPDATE accounts SET plan = 'gold' WHERE id = 1")
        .await
        .unwrap();
    raw.told_of("accounts:by_email=a@x").await;
    let (row, _) = read_watched(&mut raw, "accounts:by_email=a@x").await;
    assert!(matches!(&row, F::Bulk(r) if r.contains("gold")), "{row:?}");
    pg.batch_execute("UPDATE accounts SET email = 'moved@x' WHERE id = 1")
        .await
        .unwrap();
    raw.told_of("accounts:by_email=a@x").await;
    assert_eq!(raw.call("GET accounts:by_email=a@x").await, F::Null);
    pg.batch_execute("UPDATE accounts SET email = 'a@x' WHERE id = 1")
        .await
        .unwrap();
    read_watched(&mut raw, "accounts:1").await;
    // A write through the daemon.
    let mut rpc = front.daemon.client().await;
    let updated = rpc
        .call(
            "update",
            json!({"table": "accounts", "key": {"id": 1}, "set": {"plan": "pro"}}),
        )
        .await;
    assert!(updated.get("result").is_some(), "{updated}");
    assert_eq!(raw.push().await, invalidate(Some(&["accounts:1"])));
    // A user renamed out of band: the old name's key.
    read_watched(&mut raw, "user:alice").await;
    pg.batch_execute("UPDATE users SET username = 'alicia' WHERE username = 'alice'")
        .await
        .unwrap();
    assert_eq!(raw.push().await, invalidate(Some(&["user:alice"])));
    // A TRUNCATE: the client is told of the table's keys it read, and nothing else (another
    // table's key it read stays with it).
    read_watched(&mut raw, "orders:e%3Au%3D1:7").await;
    read_watched(&mut raw, "accounts:2").await;
    pg.batch_execute("TRUNCATE accounts").await.unwrap();
    let push = raw.push().await;
    let told = keys_of(&push);
    assert!(told.iter().any(|k| k == "accounts:2"), "{push:?}");
    assert!(told.iter().all(|k| k.starts_with("accounts:")), "{push:?}");
    raw.quiet().await;
    assert!(
        matches!(raw.call("GET orders:e%3Au%3D1:7").await, F::Bulk(_)),
        "the other table's row"
    );
    raw.quiet().await;
    // Redis restarted: whatever it said meanwhile may be lost, so everything goes.
    read_watched(&mut raw, "orders:e%3Au%3D1:7").await;
    front.env.redis.kill();
    front.env.redis.start_again().unwrap();
    let mut flushed = false;
    while let Some(push) = raw.push_within(Duration::from_secs(10)).await {
        if push == invalidate(None) {
            flushed = true;
            break;
        }
    }
    assert!(flushed, "a Redis restart flushes tracking clients");
    let stats = front.daemon.stats().await;
    assert_eq!(stats["resp"]["tracking_clients"], 1, "{stats}");
    assert!(
        stats["resp"]["invalidations"].as_u64().unwrap() >= 8,
        "{stats}"
    );
    // Tracking off: nothing more.
    assert_eq!(
        raw.call("CLIENT TRACKING OFF").await,
        F::Simple("OK".into())
    );
    read_watched(&mut raw, "orders:e%3Au%3D1:7").await;
    pg.batch_execute("UPDATE orders SET note = 'x'")
        .await
        .unwrap();
    raw.quiet().await;
}

/// Users' capture turned off: a tracking client that holds a user is told to forget it at once
/// (no change to it would be heard), every user it reads meanwhile comes from PostgreSQL and is
/// voided right behind its reply, so an out-of-band change is seen at the next read; once the
/// capture fires again, what it reads is watched again. A declared table's keys are not touched.
#[tokio::test]
async fn while_users_capture_is_off_no_user_stays_cached_by_a_tracking_client() {
    let front = start().await;
    let mut raw = Raw::connect(&front).await;
    assert_eq!(raw.call("CLIENT TRACKING ON").await, F::Simple("OK".into()));
    read_watched(&mut raw, "user:alice").await;
    read_watched(&mut raw, "accounts:2").await;
    let pg = front.env.pg().await;
    pg.batch_execute("ALTER TABLE users DISABLE TRIGGER cacheward_capture_update")
        .await
        .unwrap();
    raw.told_of("user:alice").await;
    // A change that passes the cache by, seen at the next read, each read voided behind it.
    pg.batch_execute(
        "UPDATE users SET created_at = '2001-02-03 04:05:06+00' WHERE username = 'alice'",
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let row = raw.call("GET user:alice").await;
        assert!(
            matches!(&row, F::Bulk(r) if r.contains("2001-02-03")),
            "{row:?}"
        );
        assert_eq!(raw.push().await, invalidate(Some(&["user:alice"])));
    }
    // The declared table's key stays with the client.
    raw.call("GET accounts:2").await;
    raw.quiet().await;
    pg.batch_execute("ALTER TABLE users ENABLE ALWAYS TRIGGER cacheward_capture_update")
        .await
        .unwrap();
    let (row, _) = read_watched(&mut raw, "user:alice").await;
    assert!(
        matches!(&row, F::Bulk(r) if r.contains("2001-02-03")),
        "{row:?}"
    );
}

#[tokio::test]
async fn broadcast_optin_and_the_bound_track_as_redis_does() {
    let front = start().await;
    // BCAST with a prefix: every change under it, read or not; nothing else.
    let mut bcast = Raw::connect(&front).await;
    assert_eq!(
        bcast
            .call("CLIENT TRACKING ON BCAST PREFIX accounts:")
            .await,
        F::Simple("OK".into())
    );
    let pg = front.env.pg().await;
    // The daemon hears of a change only to what it watches: read it through the daemon first.
    let mut reader = Raw::connect(&front).await;
    read_watched(&mut reader, "accounts:2").await;
    read_watched(&mut reader, "user:alice").await;
    pg.batch_execute("UPDATE accounts SET plan = 'x' WHERE id = 2; UPDATE users SET username = 'al' WHERE username = 'alice'")
        .await
        .unwrap();
    // Once or twice (the daemon's write invalidates before it is sent and once it is answered).
    let heard: Vec<String> = bcast
        .pushes_within(Duration::from_millis(1500))
        .await
        .iter()
        .flat_map(keys_of)
        .collect();
    assert!(heard.iter().any(|k| k == "accounts:2"), "{heard:?}");
    // Its lookup's key too; never a user's.
    assert!(
        heard.iter().all(|k| k.starts_with("accounts:")),
        "{heard:?}"
    );
    // OPTIN: only a read right after CLIENT CACHING yes is tracked.
    let mut optin = Raw::connect(&front).await;
    assert_eq!(
        optin.call("CLIENT TRACKING ON OPTIN").await,
        F::Simple("OK".into())
    );
    read_watched(&mut optin, "accounts:1").await;
    optin.call("GET accounts:1").await;
    pg.batch_execute("UPDATE accounts SET plan = 'y' WHERE id = 1")
        .await
        .unwrap();
    optin.quiet().await;
    assert_eq!(
        optin.call("CLIENT CACHING yes").await,
        F::Simple("OK".into())
    );
    optin.call("GET accounts:1").await;
    // Read again (watched now) after CACHING yes, so the next change is owed.
    let mut watched = false;
    for _ in 0..5 {
        optin.call("CLIENT CACHING yes").await;
        optin.call("GET accounts:1").await;
        if optin
            .pushes_within(Duration::from_millis(200))
            .await
            .is_empty()
        {
            watched = true;
            break;
        }
    }
    assert!(watched);
    pg.batch_execute("UPDATE accounts SET plan = 'z' WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(optin.push().await, invalidate(Some(&["accounts:1"])));
    // A TRUNCATE of one table: what a broadcast client may hold under that table's prefix is
    // not known, so a client whose prefixes reach into it is flushed; one whose prefixes do not
    // (or a reader of the table's keys that read none) hears nothing.
    let mut everything = Raw::connect(&front).await;
    everything.call("CLIENT TRACKING ON BCAST").await;
    let mut partly = Raw::connect(&front).await;
    partly
        .call("CLIENT TRACKING ON BCAST PREFIX user: PREFIX ord")
        .await;
    for client in [&mut bcast, &mut everything, &mut partly] {
        client.pushes_within(Duration::from_millis(300)).await;
    }
    pg.batch_execute("TRUNCATE orders").await.unwrap();
    assert_eq!(everything.push().await, invalidate(None));
    assert_eq!(partly.push().await, invalidate(None));
    optin.quiet().await;
    bcast.quiet().await;
    // What Redis refuses, and what this cacheward does not serve.
    let mut plain = Raw::connect(&front).await;
    let refused = [
        ("CLIENT TRACKING ON PREFIX a:", "BCAST"),
        ("CLIENT TRACKING ON OPTIN OPTOUT", "OPTIN and OPTOUT"),
        (
            "CLIENT TRACKING ON BCAST OPTIN",
            "not compatible with BCAST",
        ),
        ("CLIENT TRACKING ON REDIRECT 999", "does not exist"),
        ("CLIENT TRACKING ON REDIRECT x", "not an integer"),
        ("CLIENT TRACKING MAYBE", "syntax"),
        ("CLIENT CACHING yes", "OPTIN"),
    ];
    for (request, says) in refused {
        match plain.call(request).await {
            F::Error(e) => assert!(e.contains(says), "{request}: {e}"),
            other => panic!("{request}: {other:?}"),
        }
    }
    let mut resp2 = front.raw().await;
    let (answer, _) = exchange(
        &mut resp2,
        b"CLIENT TRACKING ON\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert!(
        answer.starts_with("-ERR CLIENT TRACKING in RESP2 needs REDIRECT"),
        "{answer}"
    );
}

#[tokio::test]
async fn the_keys_remembered_for_tracking_clients_are_bounded() {
    let front = start_with(|config| config.resp.tracking_max_keys = 2).await;
    let mut raw = Raw::connect(&front).await;
    raw.call("CLIENT TRACKING ON").await;
    read_watched(&mut raw, "accounts:1").await;
    read_watched(&mut raw, "accounts:2").await;
    // A third key: the oldest is forgotten, and the client told so.
    let (_, heard) = read_watched(&mut raw, "orders:e%3Au%3D1:7").await;
    assert!(heard.iter().any(|k| k == "accounts:1"), "{heard:?}");
    assert!(!heard.iter().any(|k| k == "accounts:2"), "{heard:?}");
    let stats = front.daemon.stats().await;
    assert_eq!(stats["resp"]["tracked_keys"], 2, "{stats}");
}

#[tokio::test]
async fn redis_py_runs_every_command_served_in_resp2_and_resp3_over_unix_and_tcp() {
    use cacheward::dev::install::{ensure, venv, Tool};
    let front = start().await;
    ensure(Tool::RedisPy).expect("redis-py");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/redis_py_commands.py");
    let run = tokio::process::Command::new(venv().join("bin/python"))
        .arg(script)
        .arg(&front.socket)
        .arg(front.port.to_string())
        .arg(PASSWORD)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("redis-py within 60 s")
        .expect("python");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim() == "ok", "{said}");
}

/// redis-py with its client-side cache on, driven line by line (tests/clients/redis_py_cache.py).
struct RedisPy {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl RedisPy {
    fn start(front: &Front) -> RedisPy {
        use cacheward::dev::install::{ensure, venv, Tool};
        use tokio::io::AsyncBufReadExt;
        ensure(Tool::RedisPy).expect("redis-py");
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/clients/redis_py_cache.py");
        let mut child = tokio::process::Command::new(venv().join("bin/python"))
            .arg(script)
            .arg(&front.socket)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python");
        let stdin = child.stdin.take().unwrap();
        let stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        RedisPy {
            child,
            stdin,
            stdout,
        }
    }

    async fn ask(&mut self, line: &str) -> Value {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await
            .expect("redis-py answers within 10 s")
            .unwrap()
            .unwrap_or_else(|| panic!("redis-py exited: {:?}", self.child.try_wait()));
        serde_json::from_str(&answer).unwrap()
    }

    async fn get(&mut self, key: &str) -> Option<String> {
        self.ask(&format!("GET {key}")).await["value"]
            .as_str()
            .map(str::to_owned)
    }
}

/// The front end's requests so far.
async fn front_requests(front: &Front) -> u64 {
    front.daemon.stats().await["resp"]["requests"]
        .as_u64()
        .unwrap()
}

/// Gets `key` through `py` until a few gets in a row cost the daemon nothing: served from
/// redis-py's own memory. The value.
async fn cached_by_client(front: &Front, py: &mut RedisPy, key: &str) -> Option<String> {
    for _ in 0..10 {
        let before = front_requests(front).await;
        let mut value = None;
        for _ in 0..3 {
            value = py.get(key).await;
        }
        // The stats call itself is not the front end's.
        if front_requests(front).await == before {
            return value;
        }
    }
    panic!("redis-py never served {key} from its own cache");
}

/// Gets `key` through `py` until `check` holds, within 5 s.
async fn until(py: &mut RedisPy, key: &str, what: &str, check: impl Fn(&Option<String>) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let value = py.get(key).await;
        if check(&value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: redis-py still answers {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn redis_py_s_client_side_cache_serves_repeats_from_its_memory_and_stays_exact() {
    let mut front = start().await;
    let mut py = RedisPy::start(&front);
    let row = cached_by_client(&front, &mut py, "accounts:1").await;
    assert!(row.unwrap().contains("free"));
    assert!(py.ask("SIZE").await["size"].as_u64().unwrap() >= 1);
    let pg = front.env.pg().await;
    // Out of band.
    pg.batch_execute("UPDATE accounts SET plan = 'team' WHERE id = 1")
        .await
        .unwrap();
    until(&mut py, "accounts:1", "an out-of-band UPDATE", |v| {
        v.as_deref().is_some_and(|v| v.contains("team"))
    })
    .await;
    // Through the daemon.
    cached_by_client(&front, &mut py, "accounts:1").await;
    let mut rpc = front.daemon.client().await;
    rpc.call(
        "update",
        json!({"table": "accounts", "key": {"id": 1}, "set": {"plan": "pro"}}),
    )
    .await;
    until(&mut py, "accounts:1", "a daemon write", |v| {
        v.as_deref().is_some_and(|v| v.contains("\"pro\""))
    })
    .await;
    // A rename: the old name is gone.
    assert!(cached_by_client(&front, &mut py, "user:alice")
        .await
        .is_some());
    pg.batch_execute("UPDATE users SET username = 'alicia' WHERE username = 'alice'")
        .await
        .unwrap();
    until(&mut py, "user:alice", "a rename", Option::is_none).await;
    // A TRUNCATE.
    cached_by_client(&front, &mut py, "accounts:2").await;
    pg.batch_execute("TRUNCATE accounts").await.unwrap();
    until(&mut py, "accounts:2", "a TRUNCATE", Option::is_none).await;
    // A Redis restart, then a change made while the client held the row.
    let order = "orders:e%3Au%3D1:7";
    cached_by_client(&front, &mut py, order).await;
    front.env.redis.kill();
    front.env.redis.start_again().unwrap();
    pg.batch_execute("UPDATE orders SET note = 'after the restart'")
        .await
        .unwrap();
    until(&mut py, order, "a change across a Redis restart", |v| {
        v.as_deref()
            .is_some_and(|v| v.contains("after the restart"))
    })
    .await;
}

/// A redirected invalidation as a RESP2 subscriber reads it (`None`: the flush's null).
fn message(keys: Option<&[&str]>) -> F {
    let keys = match keys {
        Some(keys) => F::Array(keys.iter().map(|k| F::Bulk((*k).into())).collect()),
        None => F::Null,
    };
    let head = ["message", "__redis__:invalidate"].map(|s| F::Bulk(s.into()));
    F::Array(head.into_iter().chain([keys]).collect())
}

#[tokio::test]
async fn tracking_redirected_to_another_connection_reaches_it_as_redis_sends_it() {
    let mut front = start().await;
    // The target: RESP2, subscribed to __redis__:invalidate, where Redis would send them too.
    let mut target = Raw::resp2(&front).await;
    let F::Int(target_id) = target.call("CLIENT ID").await else {
        panic!("CLIENT ID")
    };
    let subscribed = ["subscribe", "__redis__:invalidate"].map(|s| F::Bulk(s.into()));
    assert_eq!(
        target.call("SUBSCRIBE __redis__:invalidate").await,
        F::Array(subscribed.into_iter().chain([F::Int(1)]).collect())
    );
    // Subscribed in RESP2, a connection only (un)subscribes, pings, quits or resets.
    let refused = target.call("GET accounts:1").await;
    assert!(
        matches!(&refused, F::Error(e) if e.contains("Can't execute 'get'")),
        "{refused:?}"
    );
    let pong = ["pong", ""].map(|s| F::Bulk(s.into()));
    assert_eq!(target.call("PING").await, F::Array(pong.to_vec()));
    // Another channel would never carry anything.
    let other = target.call("SUBSCRIBE news").await;
    assert!(
        matches!(&other, F::Error(e) if e.contains("'news'")),
        "{other:?}"
    );
    // The tracking client: RESP2 too, which only REDIRECT makes possible.
    let mut client = Raw::resp2(&front).await;
    let on = format!("CLIENT TRACKING ON REDIRECT {target_id}");
    assert_eq!(client.call(&on).await, F::Simple("OK".into()));
    assert_eq!(client.call("CLIENT GETREDIR").await, F::Int(target_id));
    let info = client.call("CLIENT TRACKINGINFO").await;
    let expected = [
        F::Bulk("flags".into()),
        F::Array(vec![F::Bulk("on".into())]),
        F::Bulk("redirect".into()),
        F::Int(target_id),
        F::Bulk("prefixes".into()),
        F::Array(vec![]),
    ];
    assert_eq!(info, F::Array(expected.to_vec()));
    // A cold read is voided at the target, after the client has its answer.
    let row = client.call("GET accounts:1").await;
    assert!(matches!(&row, F::Bulk(r) if r.contains("free")), "{row:?}");
    let within = Duration::from_secs(5);
    assert_eq!(
        target.frame(within).await,
        Some(message(Some(&["accounts:1"])))
    );
    // Read again until the near cache watches it (nothing reaches the target then).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        client.call("GET accounts:1").await;
        if target.frame(Duration::from_millis(200)).await.is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "accounts:1 was never answered watched"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An out-of-band change reaches the target.
    let pg = front.env.pg().await;
    pg.batch_execute("UPDATE accounts SET plan = 'team' WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        target.frame(within).await,
        Some(message(Some(&["accounts:1"])))
    );
    // A Redis restart: the flush, as a message whose payload is null.
    front.env.redis.kill();
    front.env.redis.start_again().unwrap();
    let mut flushed = false;
    while let Some(frame) = target.frame(Duration::from_secs(10)).await {
        if frame == message(None) {
            flushed = true;
            break;
        }
    }
    assert!(flushed, "a Redis restart flushes the redirected tracking");
    // Unsubscribed, the target is an ordinary connection again.
    let unsubscribed = ["unsubscribe", "__redis__:invalidate"].map(|s| F::Bulk(s.into()));
    assert_eq!(
        target.call("UNSUBSCRIBE").await,
        F::Array(unsubscribed.into_iter().chain([F::Int(0)]).collect())
    );
    assert!(matches!(target.call("GET accounts:2").await, F::Bulk(_)));

    // A RESP3 target takes them as `invalidate` pushes, subscribed or not.
    let mut target3 = Raw::connect(&front).await;
    let F::Int(target3_id) = target3.call("CLIENT ID").await else {
        panic!("CLIENT ID")
    };
    let mut client3 = Raw::connect(&front).await;
    let on = format!("CLIENT TRACKING ON REDIRECT {target3_id}");
    assert_eq!(client3.call(&on).await, F::Simple("OK".into()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        client3.call("GET accounts:2").await;
        if target3
            .push_within(Duration::from_millis(200))
            .await
            .is_none()
        {
            break;
        }
        // Redis may still be coming back: until then every answer is read from PostgreSQL.
        assert!(
            tokio::time::Instant::now() < deadline,
            "accounts:2 was never answered watched"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pg.batch_execute("UPDATE accounts SET plan = 'x' WHERE id = 2")
        .await
        .unwrap();
    assert_eq!(target3.push().await, invalidate(Some(&["accounts:2"])));
    client3.quiet().await;
    // The target gone, the RESP3 client is told its invalidations are lost, as Redis tells it.
    drop(target3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    client3.call("GET accounts:2").await;
    pg.batch_execute("UPDATE accounts SET plan = 'y' WHERE id = 2")
        .await
        .unwrap();
    let broken = client3.push().await;
    assert_eq!(
        broken,
        F::Push(vec![
            F::Bulk("tracking-redir-broken".into()),
            F::Int(target3_id)
        ])
    );
    let info = client3.call("CLIENT TRACKINGINFO").await;
    let F::Map(info) = info else {
        panic!("{info:?}")
    };
    assert!(
        matches!(&info[1], F::Array(flags) if flags.contains(&F::Bulk("broken_redirect".into()))),
        "{info:?}"
    );
}
