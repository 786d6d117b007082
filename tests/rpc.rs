//! The wire protocol of docs/reference.md against the real daemon: every method, every error code,
//! pipelining, notifications, hostile input and the socket's limits.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{kind, wait_until, Rpc, TestEnv};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_and_its_edge_cases() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;

    let put = c.call("put", json!({"username": "ann"})).await;
    assert_eq!(put["result"]["created"], json!(true), "{put}");
    let ann = put["result"]["user"].clone();
    assert_eq!(
        ann,
        env.row_json("ann").await.unwrap(),
        "put returns the row"
    );
    assert!(ann["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        ann["created_at"].as_str().unwrap().len(),
        "2025-11-02T01:43:23.038598Z".len()
    );

    let again = c.call("put", json!({"username": "ann"})).await;
    assert_eq!(
        again["result"],
        json!({"user": ann, "created": false}),
        "put of an existing user"
    );

    let got = c.get("ann").await;
    assert_eq!(
        got["result"],
        json!({"user": ann, "source": "cache"}),
        "write-through filled the cache"
    );

    let renamed = c
        .call("rename", json!({"username": "ann", "new_username": "bea"}))
        .await;
    assert_eq!(renamed["result"]["user"]["username"], json!("bea"));
    assert_eq!(renamed["result"]["user"]["id"], ann["id"]);
    assert_eq!(
        renamed["result"]["user"],
        env.row_json("bea").await.unwrap()
    );
    assert_eq!(kind(&c.get("ann").await), "not_found", "old name is gone");
    assert_eq!(c.get("bea").await["result"]["source"], json!("cache"));

    c.call("put", json!({"username": "cal"})).await;
    let conflict = c
        .call("rename", json!({"username": "bea", "new_username": "cal"}))
        .await;
    assert_eq!(conflict["error"]["code"], json!(-32002), "{conflict}");
    assert_eq!(kind(&conflict), "conflict");
    let missing = c
        .call("rename", json!({"username": "nobody", "new_username": "x"}))
        .await;
    assert_eq!(missing["error"]["code"], json!(-32001), "{missing}");

    let bea_version = env.row_json("bea").await.unwrap()["version"]
        .as_i64()
        .unwrap();
    assert_eq!(
        c.call("delete", json!({"username": "bea"})).await["result"],
        json!({"deleted": true, "version": bea_version + 1}),
        "delete answers the version the deletion is known by: one above the deleted row's"
    );
    assert_eq!(
        c.call("delete", json!({"username": "bea"})).await["result"],
        json!({"deleted": false, "version": 0})
    );
    let gone = c.get("bea").await;
    assert_eq!(gone["error"]["code"], json!(-32001));
    assert_eq!(gone["error"]["message"], json!("user 'bea' not found"));
    assert!(env.row_json("bea").await.is_none());

    let stats = c.call("stats", Value::Null).await["result"].clone();
    for field in [
        "uptime_secs",
        "connections",
        "requests",
        "errors",
        "cache_hits",
        "cache_misses",
        "db_queries",
    ] {
        assert!(stats[field].is_u64(), "stats.{field} missing: {stats}");
    }
    for field in ["applied", "batches", "reconnects", "resyncs"] {
        assert!(
            stats["cdc"][field].is_u64(),
            "stats.cdc.{field} missing: {stats}"
        );
    }
    for field in ["p50", "p99", "max"] {
        assert!(
            stats["cdc"]["lag_ms"][field].is_u64(),
            "stats.cdc.lag_ms.{field} missing: {stats}"
        );
    }
    assert!(stats["requests"].as_u64().unwrap() >= 12);
    assert!(stats["errors"].as_u64().unwrap() >= 4);
    assert_eq!(stats["connections"], json!(1));

    let health = c.call("health", Value::Null).await["result"].clone();
    assert_eq!(health["ready"], json!(true));
    assert_eq!(health["postgres"], json!("up"));
    assert_eq!(health["redis"], json!("up"));
    assert!(health["cdc"]["listening"].is_boolean() && health["cdc"]["cursor"].is_i64());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_read_fills_exactly_the_row_and_the_next_read_hits() {
    let env = TestEnv::start().await;
    env.pg()
        .await
        .execute("INSERT INTO users (username) VALUES ('user02')", &[])
        .await
        .unwrap();
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    assert_eq!(env.cached("user02").await, None);

    let first = c.get("user02").await;
    assert_eq!(first["result"]["source"], json!("db"), "{first}");
    let row = env.row_json("user02").await.unwrap();
    assert_eq!(first["result"]["user"], row);
    let cached: Value = serde_json::from_str(&env.cached("user02").await.expect("filled")).unwrap();
    assert_eq!(cached, row, "Redis holds exactly the row's JSON");

    let second = c.get("user02").await;
    assert_eq!(second["result"], json!({"user": row, "source": "cache"}));

    let mut redis = env.redis().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg("user:user02")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        ttl > 3500 && ttl <= 3600,
        "entry carries cache.ttl_secs, got {ttl}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_requests_come_back_in_order_and_notifications_stay_silent() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    c.call("put", json!({"username": "p0"})).await;

    // A notification that writes: executed, never answered.
    c.send(&json!({"jsonrpc": "2.0", "method": "put", "params": {"username": "silent"}}))
        .await;
    // A failing notification: not answered either.
    c.send(&json!({"jsonrpc": "2.0", "method": "nope"})).await;

    let mut batch = Vec::new();
    for i in 0..1000u64 {
        let request = match i % 4 {
            0 => json!({"jsonrpc": "2.0", "id": i, "method": "get", "params": {"username": "p0"}}),
            1 => {
                json!({"jsonrpc": "2.0", "id": i, "method": "put", "params": {"username": format!("p{i}")}})
            }
            2 => {
                json!({"jsonrpc": "2.0", "id": i, "method": "get", "params": {"username": format!("missing{i}")}})
            }
            _ => json!({"jsonrpc": "2.0", "id": i, "method": "stats"}),
        };
        batch.extend(serde_json::to_vec(&request).unwrap());
        batch.push(b'\n');
    }
    c.send_raw(&batch).await;
    for i in 0..1000u64 {
        let response = c.recv().await;
        assert_eq!(response["id"], json!(i), "answers come in request order");
        match i % 4 {
            0 => assert_eq!(response["result"]["user"]["username"], json!("p0")),
            1 => assert_eq!(response["result"]["created"], json!(true), "{response}"),
            2 => assert_eq!(kind(&response), "not_found"),
            _ => assert!(response["result"]["requests"].is_u64()),
        }
    }
    assert!(
        env.row_json("silent").await.is_some(),
        "the notification was executed"
    );
    assert!(
        c.try_recv(Duration::from_millis(200)).await.is_none(),
        "nothing answered the notifications"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_error_and_costs_nothing() {
    let env = TestEnv::start().await;
    let daemon = env.start_daemon(env.config()).await;
    let mut setup = daemon.client().await;
    setup.call("put", json!({"username": "ok"})).await;

    // Another client keeps being served the whole time.
    let socket = daemon.socket.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let bystander = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut c = Rpc::connect(&socket).await;
            let mut served = 0u32;
            while !stop.is_cancelled() {
                let r = c.get("ok").await;
                assert_eq!(
                    r["result"]["user"]["username"],
                    json!("ok"),
                    "bystander got {r}"
                );
                served += 1;
            }
            served
        }
    });

    let long_name = "x".repeat(65);
    let cases: Vec<(Vec<u8>, i64, &str, Value)> = vec![
        (b"\xff\xfe\x00garbage\x01".to_vec(), -32700, "parse_error", Value::Null),
        (b"{".to_vec(), -32700, "parse_error", Value::Null),
        (b"[]".to_vec(), -32600, "invalid_request", Value::Null),
        (b"42".to_vec(), -32600, "invalid_request", Value::Null),
        (br#"{"jsonrpc":"2.0","id":1}"#.to_vec(), -32600, "invalid_request", json!(1)),
        (br#"{"jsonrpc":"2.0","id":2,"method":5}"#.to_vec(), -32600, "invalid_request", json!(2)),
        (br#"{"jsonrpc":"2.0","id":3,"method":"fly"}"#.to_vec(), -32601, "method_not_found", json!(3)),
        (br#"{"jsonrpc":"2.0","id":4,"method":"get"}"#.to_vec(), -32602, "invalid_params", json!(4)),
        (br#"{"jsonrpc":"2.0","id":5,"method":"get","params":{"username":7}}"#.to_vec(), -32602, "invalid_params", json!(5)),
        (br#"{"jsonrpc":"2.0","id":6,"method":"get","params":{"username":""}}"#.to_vec(), -32602, "invalid_params", json!(6)),
        (
            format!(r#"{{"jsonrpc":"2.0","id":7,"method":"put","params":{{"username":"{long_name}"}}}}"#).into_bytes(),
            -32602,
            "invalid_params",
            json!(7),
        ),
        (br#"{"jsonrpc":"2.0","id":8,"method":"put","params":{"username":"a\u0000b"}}"#.to_vec(), -32602, "invalid_params", json!(8)),
        (br#"{"jsonrpc":"2.0","id":9,"method":"put","params":{"username":" pad"}}"#.to_vec(), -32602, "invalid_params", json!(9)),
        (br#"{"jsonrpc":"2.0","id":10,"method":"rename","params":{"username":"ok","new_username":null}}"#.to_vec(), -32602, "invalid_params", json!(10)),
    ];
    let mut c = daemon.client().await;
    for (line, code, expected_kind, id) in cases {
        let mut bytes = line.clone();
        bytes.push(b'\n');
        c.send_raw(&bytes).await;
        let response = c.recv().await;
        assert_eq!(
            response["error"]["code"],
            json!(code),
            "{} -> {response}",
            String::from_utf8_lossy(&line)
        );
        assert_eq!(kind(&response), expected_kind);
        assert_eq!(response["id"], id);
        assert!(
            response["error"]["message"].as_str().unwrap().len() > 5,
            "message names the problem"
        );
        let after = c.get("ok").await;
        assert_eq!(
            after["result"]["user"]["username"],
            json!("ok"),
            "connection still works after {code}"
        );
    }

    // A 10 MB line, streamed: one invalid_request, then the connection keeps working.
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..10 {
        c.send_raw(&chunk).await;
    }
    c.send_raw(b"\n").await;
    let response = c.recv().await;
    assert_eq!(response["error"]["code"], json!(-32600), "{response}");
    assert_eq!(response["id"], Value::Null);
    assert!(response["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_request_bytes"));
    assert_eq!(c.get("ok").await["result"]["user"]["username"], json!("ok"));

    // None of it reached the database.
    let count: i64 = env
        .pg()
        .await
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "no bad input wrote anything");

    stop.cancel();
    let served = bystander.await.expect("bystander never failed");
    assert!(served > 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_limits_are_enforced() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config.socket.max_connections = 2;
    config.socket.idle_timeout_secs = 1;
    config.socket.mode = cacheward::config::SocketMode(0o600);
    let daemon = env.start_daemon(config).await;

    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket.mode applied");

    // Wait for the readiness probe's connection to be gone, then fill both slots.
    wait_until(
        "probe connection closed",
        Duration::from_secs(5),
        || async {
            let mut c = daemon.client().await;
            c.call("stats", Value::Null).await["result"]["connections"] == json!(1)
        },
    )
    .await;
    let mut a = daemon.client().await;
    let mut b = daemon.client().await;
    assert!(a.call("stats", Value::Null).await["result"].is_object());
    assert!(b.call("stats", Value::Null).await["result"].is_object());
    let mut third = daemon.client().await;
    third
        .send(&json!({"jsonrpc": "2.0", "id": 1, "method": "stats"}))
        .await;
    assert!(
        third.try_recv(Duration::from_millis(300)).await.is_none(),
        "a third connection waits while two are open"
    );
    drop(a);
    let answer = third
        .try_recv(Duration::from_secs(5))
        .await
        .expect("served once a slot frees");
    assert_eq!(answer["id"], json!(1));

    // Idle connections are closed after idle_timeout_secs.
    assert!(
        b.closed_within(Duration::from_secs(5)).await,
        "idle connection closed"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_keeps_a_connection_open_past_the_idle_timeout() {
    let env = TestEnv::start().await;
    let mut config = env.config();
    config.socket.idle_timeout_secs = 1;
    let daemon = env.start_daemon(config).await;
    let mut c = daemon.client().await;
    // A request every 400 ms for 2.4 s: never idle for a whole second.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let answer = c.call("health", Value::Null).await;
        assert!(answer["result"].is_object(), "request {i}: {answer}");
    }
    assert!(
        c.closed_within(Duration::from_secs(3)).await,
        "closed once idle"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_but_a_live_one_is_never_stolen() {
    let env = TestEnv::start().await;
    let config = env.config();
    // A crashed daemon leaves its socket file behind: nobody answers on it.
    drop(std::os::unix::net::UnixListener::bind(&config.socket.path).unwrap());
    assert!(config.socket.path.exists());
    let daemon = env.start_daemon(config.clone()).await;

    let err = cacheward::rpc::server::bind(&config)
        .err()
        .expect("second bind must fail");
    assert!(err.to_string().contains("already listening"), "{err}");
    let mut c = daemon.client().await;
    assert_eq!(
        c.call("health", Value::Null).await["result"]["ready"],
        json!(true),
        "first daemon unharmed"
    );

    // A regular file at the path is never deleted.
    let mut other = env.config();
    other.socket.path = env.dir.path().join("not-a-socket");
    std::fs::write(&other.socket.path, "data").unwrap();
    let err = cacheward::rpc::server::bind(&other)
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&other.socket.path).unwrap(), "data");

    let socket = daemon.socket.clone();
    daemon.stop().await;
    assert!(!socket.exists(), "socket removed on shutdown");
}
