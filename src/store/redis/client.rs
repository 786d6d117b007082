//! How one Redis server is reached: a URL's settings with cacheward's TCP settings, the
//! `redis.tls_*` certificates, the rotated `redis.password_file`, and the lazily made,
//! reconnecting connection that may hand its push messages to the near cache.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionInfo, IntoConnectionInfo};

use crate::config::{Config, SecretUrl};
use crate::store::pg::connect;
use crate::support::secrets::PasswordFile;

/// The settings every connection gets: dead peers are noticed as for PostgreSQL (see
/// `connect::KEEPALIVE_IDLE`), and nothing waits for Nagle.
pub fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
    let keepalive = TcpKeepalive::new()
        .with_time(connect::KEEPALIVE_IDLE)
        .with_interval(connect::KEEPALIVE_INTERVAL)
        .with_retries(connect::KEEPALIVE_RETRIES);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(connect::TCP_USER_TIMEOUT)
}

/// `url` as connection settings, with [`tcp_settings`].
pub fn connection_info(url: &SecretUrl, key: &str) -> Result<ConnectionInfo, String> {
    url.expose()
        .into_connection_info()
        .map(|info| info.set_tcp_settings(tcp_settings()))
        .map_err(|e| format!("{key} {}: {e}", url.redacted()))
}

/// The certificates of `redis.tls_*`, when any is set (the system's roots otherwise).
pub fn certificates(config: &Config) -> Result<Option<redis::TlsCertificates>, String> {
    let r = &config.redis;
    if r.tls_ca_file.is_none() && r.tls_cert_file.is_none() {
        return Ok(None);
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{key} {}: {e}", path.display()))
    };
    let root_cert = match &r.tls_ca_file {
        Some(path) => Some(read("redis.tls_ca_file", path)?),
        None => None,
    };
    let client_tls = match (&r.tls_cert_file, &r.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", cert)?,
            client_key: read("redis.tls_key_file", key)?,
        }),
        _ => None,
    };
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// What a failure to build a client with the `redis.tls_*` files says: which files.
pub fn tls_files_failed(config: &Config, e: &dyn std::fmt::Display) -> String {
    let r = &config.redis;
    let files: Vec<String> = [
        ("redis.tls_ca_file", &r.tls_ca_file),
        ("redis.tls_cert_file", &r.tls_cert_file),
        ("redis.tls_key_file", &r.tls_key_file),
    ]
    .into_iter()
    .filter_map(|(key, path)| Some(format!("{key} {}", path.as_ref()?.display())))
    .collect();
    format!("{}: {e}", files.join(", "))
}

/// The settings of `template` (user, password, database, TLS or not) for the server at
/// `host:port`, with [`tcp_settings`].
pub fn at_address(
    template: Option<&ConnectionInfo>,
    host: &str,
    port: u16,
) -> redis::RedisResult<ConnectionInfo> {
    let tls = template.is_some_and(|t| matches!(t.addr(), redis::ConnectionAddr::TcpTls { .. }));
    let addr = match tls {
        true => redis::ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        },
        false => redis::ConnectionAddr::Tcp(host.to_owned(), port),
    };
    let info = match template {
        Some(template) => template.clone().set_addr(addr),
        None => addr.into_connection_info()?,
    };
    Ok(info.set_tcp_settings(tcp_settings()))
}

/// A client for one server at `info`, with the certificates of `redis.tls_*`.
pub fn single_client(config: &Config, info: ConnectionInfo) -> Result<redis::Client, String> {
    crate::support::tls::provider();
    match certificates(config)? {
        None => redis::Client::open(info).map_err(|e| e.to_string()),
        Some(certificates) => redis::Client::build_with_tls(info, certificates)
            .map_err(|e| tls_files_failed(config, &e)),
    }
}

/// `redis.password_file` for the user of one connection's settings (see
/// [`crate::support::secrets::PasswordFile`]: read for every new connection).
#[derive(Clone)]
pub struct Password {
    username: String,
    file: PasswordFile,
}

impl Password {
    pub fn of(config: &Config, info: &ConnectionInfo) -> Option<Password> {
        let path = config.redis.password_file.as_ref()?;
        let username = info
            .redis_settings()
            .username()
            .unwrap_or("default")
            .to_owned();
        let file = PasswordFile::new("redis.password_file", path);
        Some(Password { username, file })
    }
}

impl redis::auth::StreamingCredentialsProvider for Password {
    fn subscribe(
        &self,
    ) -> std::pin::Pin<
        Box<dyn futures::Stream<Item = redis::RedisResult<redis::auth::BasicAuth>> + Send>,
    > {
        let credentials = self
            .file
            .read()
            .map(|password| redis::auth::BasicAuth::new(self.username.clone(), password))
            .map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::AuthenticationFailed,
                    "redis.password_file",
                    e,
                ))
            });
        // One item: the connection being made takes it; nothing re-authenticates later.
        Box::pin(futures::stream::once(async move { credentials }))
    }
}

/// Where the near cache hears from Redis (`store::redis::near`): the push messages of every connection
/// that may carry a tracked read (`invalidate`), and the news that one was lost or replaced
/// (`Disconnection`, from the driver or from [`lost`]).
pub type Pushes = tokio::sync::mpsc::UnboundedSender<redis::PushInfo>;

/// Tells the near cache a connection that may have carried tracked reads is gone: whatever Redis
/// would have told it there is lost.
pub fn lost(pushes: &Option<Pushes>) {
    if let Some(pushes) = pushes {
        let _ = pushes.send(redis::PushInfo {
            kind: redis::PushKind::Disconnection,
            data: Vec::new(),
        });
    }
}

/// A lazily made, reconnecting connection to one server at `info`; its calls time out after
/// `response_timeout` (`None`: only the caller's own bound applies). With `pushes`, it speaks
/// RESP3 and hands its push messages there.
pub fn manager(
    config: &Config,
    info: ConnectionInfo,
    response_timeout: Option<Duration>,
    pushes: Option<&Pushes>,
) -> Result<ConnectionManager, String> {
    let password = Password::of(config, &info);
    let info = match pushes {
        Some(_) => {
            let resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info.set_redis_settings(resp3)
        }
        None => info,
    };
    let client = single_client(config, info)?;
    let timeout = config.redis_timeout();
    let mut manager_config = ConnectionManagerConfig::new()
        .set_response_timeout(response_timeout)
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500));
    if let Some(password) = password {
        manager_config = manager_config.set_credentials_provider(password);
    }
    if let Some(pushes) = pushes {
        manager_config = manager_config.set_push_sender(pushes.clone());
    }
    ConnectionManager::new_lazy_with_config(client, manager_config).map_err(|e| e.to_string())
}
