//! TLS to both backends, against real servers with a CA made at test time: PostgreSQL with `ssl =
//! on` and `hostssl` only (plain TCP refused), redis-server on `--tls-port`.

mod common;

use std::time::Duration;

use serde_json::json;

use cacheward::config::SecretUrl;
use cacheward::dev::{PostgresOptions, RedisOptions};
use cacheward::service::Hooks;
use cacheward::store::pg::connect;
use cacheward::store::redis::Cache;
use common::certs::TestCa;
use common::{wait_until, DaemonProcess, Rpc, TestEnv};

/// A PostgreSQL that takes TLS only over TCP, signed by `ca`.
async fn tls_postgres(ca: &TestCa) -> TestEnv {
    let pg = PostgresOptions {
        tls: Some(ca.server("pg", None)),
        ..Default::default()
    };
    TestEnv::start_servers(pg, RedisOptions::default()).await
}

fn ca_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// How many of the daemon's PostgreSQL connections use TLS, and how many do not.
async fn daemon_connections(env: &TestEnv) -> (i64, i64) {
    let row = env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name LIKE 'cacheward%'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_reaches_postgres_for_every_connection_the_daemon_opens() {
    let certs = ca_dir();
    let ca = TestCa::new(certs.path(), "good");
    let env = tls_postgres(&ca).await;
    let url = env
        .pg
        .tcp_url(
            "cw",
            &format!("sslmode=verify-full&sslrootcert={}", ca.ca_file.display()),
        )
        .expect("tcp");
    // Plain TCP is refused: whatever works below went over TLS.
    let plain = env.pg.tcp_url("cw", "sslmode=disable").unwrap();
    let mut config = env.config();
    config.postgres.url = Some(SecretUrl::new(plain));
    let refused = connect::pg_target(&config)
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("no encryption"), "{refused}");

    config.postgres.url = Some(SecretUrl::new(url));
    let daemon = env.start_daemon(config).await;
    let mut client = daemon.client().await;
    assert_eq!(
        client.call("put", json!({"username": "tls1"})).await["result"]["created"],
        json!(true)
    );
    assert_eq!(client.get("tls1").await["result"]["source"], json!("cache"));
    // An out-of-band change reaches Redis: the CDC worker's connection is up, over TLS.
    env.pg()
        .await
        .execute(
            "UPDATE users SET username = 'tls2' WHERE username = 'tls1'",
            &[],
        )
        .await
        .unwrap();
    wait_until(
        "the rename applied by CDC",
        Duration::from_secs(5),
        || async {
            env.cached("tls2")
                .await
                .is_some_and(|v| cacheward::model::entry::is_live(&v))
        },
    )
    .await;
    // The pool, the CDC session and the health monitor: all over TLS, none in the clear.
    let (tls, plain) = daemon_connections(&env).await;
    assert!(tls >= 3, "{tls} TLS connections");
    assert_eq!(plain, 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_names_the_certificate_and_the_daemon_is_not_ready() {
    let certs = ca_dir();
    let (ca, other) = (
        TestCa::new(certs.path(), "good"),
        TestCa::new(certs.path(), "other"),
    );
    let env = tls_postgres(&ca).await;
    let mut config = env.config();
    let url = |params: String| SecretUrl::new(env.pg.tcp_url("cw", &params).unwrap());
    config.postgres.url = Some(url(format!(
        "sslmode=verify-full&sslrootcert={}",
        other.ca_file.display()
    )));
    let e = connect::pg_target(&config)
        .unwrap()
        .connect()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("certificate of localhost") && e.contains(&other.ca_file.display().to_string()),
        "{e}"
    );
    assert!(e.contains("UnknownIssuer"), "{e}");
    // `check --connect` says the same, as the problem it is.
    let found = cacheward::cli::check::backends(&config).await;
    let problem = *found
        .problems_with("postgres")
        .first()
        .unwrap_or_else(|| panic!("{found:#?}"));
    for part in [
        "certificate of localhost",
        &other.ca_file.display().to_string(),
        "UnknownIssuer",
    ] {
        assert!(problem.contains(part), "{part} not in {problem}");
    }

    let daemon = env.spawn_daemon(config, Hooks::default());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health = daemon.health().await;
    assert_eq!(health["ready"], json!(false), "{health}");
    assert_eq!(health["postgres"], json!("down"), "{health}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_without_roots_and_verify_ca_ignores_the_host_name() {
    let certs = ca_dir();
    let ca = TestCa::new(certs.path(), "good");
    let env = tls_postgres(&ca).await;
    let port = env.pg.tcp_port().unwrap();
    let ca_file = ca.ca_file.display().to_string();
    let mut config = env.config();
    let connect = |url: String| {
        let mut config = config.clone();
        config.postgres.url = Some(SecretUrl::new(url));
        async move {
            connect::pg_target(&config)
                .unwrap()
                .connect()
                .await
                .map(|_| ())
        }
    };
    // Encryption without authentication: libpq's require (and prefer) check no certificate.
    connect(env.pg.tcp_url("cw", "sslmode=require").unwrap())
        .await
        .unwrap();
    connect(env.pg.tcp_url("cw", "sslmode=prefer").unwrap())
        .await
        .unwrap();
    // A name the certificate does not carry (the address is still 127.0.0.1).
    let elsewhere = |mode: &str| {
        format!(
            "postgresql://postgres@db.invalid:{port}/cw?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca_file}"
        )
    };
    connect(elsewhere("verify-ca")).await.unwrap();
    let e = connect(elsewhere("verify-full")).await.unwrap_err();
    // Classified by the error in its chain, not by its wording.
    assert_eq!(e.kind(), cacheward::store::pg::DbErrorKind::Tls, "{e}");
    let e = e.to_string();
    assert!(
        e.contains("certificate of db.invalid") && e.contains("not valid for name"),
        "{e}"
    );
    // require with roots given checks the chain, as in libpq.
    let other = TestCa::new(certs.path(), "other");
    let e = connect(format!(
        "{}&sslrootcert={}",
        env.pg.tcp_url("cw", "sslmode=require").unwrap(),
        other.ca_file.display()
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("UnknownIssuer"), "{e}");
    config.postgres.url = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_ca_file_and_with_client_certificates() {
    let certs = ca_dir();
    let ca = TestCa::new(certs.path(), "good");
    let clients = TestCa::new(certs.path(), "clients");
    let redis = RedisOptions {
        tls: Some(ca.server("redis", Some(&clients))),
        ..Default::default()
    };
    let env = TestEnv::start_servers(PostgresOptions::default(), redis).await;
    let mut config = env.config();
    config.redis.url = Some(SecretUrl::new(env.redis.tls_url(3).unwrap()));
    config.redis.tls_ca_file = Some(ca.ca_file.clone());

    // No client certificate: the server refuses, and the error says it was TLS.
    let cache = Cache::new(&config).unwrap();
    let e = cache
        .get_raw(&[cacheward::model::key::Key::user("a")])
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        cacheward::store::redis::CacheErrorKind::Tls,
        "{e}"
    );
    let e = e.to_string();
    assert!(
        e.contains("TLS") && e.contains("CertificateRequired"),
        "{e}"
    );
    // `check --connect` names it too: the server wants a client certificate.
    let found = cacheward::cli::check::backends(&config).await;
    let problem = *found
        .problems_with("redis")
        .first()
        .unwrap_or_else(|| panic!("{found:#?}"));
    assert!(
        problem.contains("TLS failed")
            && problem.contains("CertificateRequired")
            && problem.contains(&format!("redis.tls_ca_file {}", ca.ca_file.display())),
        "{problem}"
    );

    // The sentinels' connections, which the daemon makes itself (their answers bounded), reach a
    // TLS server as the driver's do: the chain checked against redis.tls_ca_file, the certificate
    // sent.
    let url = env.redis.tls_url(3).unwrap();
    let e = bounded_ping(&config, &url).await.unwrap_err();
    assert!(e.contains("CertificateRequired"), "{e}");
    let (cert, key) = clients.issue("daemon", &["cacheward"], true);
    config.redis.tls_cert_file = Some(cert);
    config.redis.tls_key_file = Some(key);
    assert_eq!(bounded_ping(&config, &url).await, Ok("PONG".to_owned()));
    let mut wrong_roots = config.clone();
    wrong_roots.redis.tls_ca_file = Some(clients.ca_file.clone());
    let e = bounded_ping(&wrong_roots, &url).await.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");

    let daemon = env.start_daemon(config).await;
    let mut client = daemon.client().await;
    client.call("put", json!({"username": "r1"})).await;
    assert_eq!(client.get("r1").await["result"]["source"], json!("cache"));
    assert!(env.cached("r1").await.is_some(), "written over TLS");
    daemon.stop().await;
}

/// `PING` over a connection made as the daemon makes the sentinels' ([`bounded::connection`]).
async fn bounded_ping(config: &cacheward::config::Config, url: &str) -> Result<String, String> {
    use cacheward::store::redis::bounded;
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| e.to_string())?;
    let (mut conn, driver) = bounded::connection(config, &info)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(driver);
    redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())
}

/// `sslcert` + `sslkey`: PostgreSQL's `cert` authentication (the certificate's CN is the user),
/// for every connection the daemon opens; without them the server refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_to_postgres() {
    let certs = ca_dir();
    let (ca, clients) = (
        TestCa::new(certs.path(), "good"),
        TestCa::new(certs.path(), "clients"),
    );
    let pg = PostgresOptions {
        tls: Some(ca.server("pg", Some(&clients))),
        tcp_auth: Some("cert".into()),
        ..Default::default()
    };
    let env = TestEnv::start_servers(pg, RedisOptions::default()).await;
    let (cert, key) = clients.issue("postgres-user", &["postgres"], true);
    let verify = format!("sslmode=verify-full&sslrootcert={}", ca.ca_file.display());
    let mut config = env.config();
    config.postgres.url = Some(SecretUrl::new(env.pg.tcp_url("cw", &verify).unwrap()));
    let e = connect::pg_target(&config)
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("certificate"),
        "refused without one: {e}"
    );

    config.postgres.url = Some(SecretUrl::new(
        env.pg
            .tcp_url(
                "cw",
                &format!(
                    "{verify}&sslcert={}&sslkey={}",
                    cert.display(),
                    key.display()
                ),
            )
            .unwrap(),
    ));
    let daemon = env.start_daemon(config).await;
    let mut client = daemon.client().await;
    assert_eq!(
        client.call("put", json!({"username": "by-cert"})).await["result"]["created"],
        json!(true)
    );
    let (tls, plain) = daemon_connections(&env).await;
    assert!(tls >= 3 && plain == 0, "{tls} TLS, {plain} plain");
    daemon.stop().await;
}

/// The default roots are the system's: a daemon process whose system store holds the test CA
/// (`SSL_CERT_FILE`, which the system store honours) reaches both servers with
/// `sslmode=verify-full` (no `sslrootcert`) and `rediss://` (no `redis.tls_ca_file`); without it,
/// it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_roots_are_the_systems() {
    let certs = ca_dir();
    let ca = TestCa::new(certs.path(), "system");
    let pg = PostgresOptions {
        tls: Some(ca.server("pg", None)),
        ..Default::default()
    };
    let redis = RedisOptions {
        tls: Some(ca.server("redis", None)),
        ..Default::default()
    };
    let env = TestEnv::start_servers(pg, redis).await;
    let database = env.pg.tcp_url("cw", "sslmode=verify-full").unwrap();
    let redis_url = env.redis.tls_url(3).unwrap();
    let ca_file = ca.ca_file.display().to_string();
    let vars = [
        ("DATABASE_URL", database.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("SSL_CERT_FILE", ca_file.as_str()),
    ];
    let daemon = DaemonProcess::spawn_with(&env, "system-roots", &vars);
    daemon.wait_ready().await;
    let mut client = Rpc::connect(&daemon.socket).await;
    client.call("put", json!({"username": "sys"})).await;
    assert_eq!(client.get("sys").await["result"]["source"], json!("cache"));
    drop(daemon);

    // The test CA is in no store: neither server is trusted.
    let elsewhere = certs.path().join("empty.pem");
    std::fs::write(&elsewhere, TestCa::new(certs.path(), "other").pem()).unwrap();
    let other = elsewhere.display().to_string();
    let vars = [
        ("DATABASE_URL", database.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("SSL_CERT_FILE", other.as_str()),
    ];
    let daemon = DaemonProcess::spawn_with(&env, "untrusted", &vars);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health = Rpc::connect(&daemon.socket)
        .await
        .call("health", serde_json::Value::Null)
        .await;
    assert_eq!(health["result"]["ready"], json!(false), "{health}");
    assert_eq!(
        (
            health["result"]["postgres"].clone(),
            health["result"]["redis"].clone()
        ),
        (json!("down"), json!("down")),
        "{health}"
    );
}

/// Redis TLS files that are missing or are not PEM: the error names the key and the file (or
/// what is wrong with it), and nothing is connected.
#[tokio::test]
async fn bad_redis_tls_files_are_named() {
    let dir = ca_dir();
    let mut config = cacheward::config::Config::default();
    config.redis.url = Some(SecretUrl::new("rediss://localhost:6380/0"));
    config.redis.tls_ca_file = Some(dir.path().join("missing.pem"));
    let e = Cache::new(&config)
        .err()
        .expect("a missing CA file")
        .to_string();
    assert!(
        e.contains("redis.tls_ca_file") && e.contains("missing.pem"),
        "{e}"
    );
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    config.redis.tls_ca_file = Some(garbage);
    let e = Cache::new(&config)
        .err()
        .expect("a CA file that is not PEM")
        .to_string();
    assert!(
        e.contains("redis.tls_ca_file") && e.contains("garbage.pem"),
        "{e}"
    );
}
