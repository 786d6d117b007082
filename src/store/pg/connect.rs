//! How PostgreSQL is reached: a URL's settings plus cacheward's (statement timeout, keepalives,
//! application name), TLS as its `sslmode` says, the password from `postgres.password_file` read
//! afresh for every connection, and whether the URL turned out to be a transaction-mode pooler.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres_rustls::MakeRustlsConnect;

use super::error::{refused_options, DbError, DbErrorKind};
use crate::config::{Config, SecretUrl};
use crate::support::secrets::PasswordFile;
use crate::support::tls::PgTls;

/// TCP keepalives of every backend connection (PostgreSQL and Redis): first probe after this idle
/// time, then every [`KEEPALIVE_INTERVAL`], given up after [`KEEPALIVE_RETRIES`] unanswered.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_RETRIES: u32 = 3;
/// How long written data may stay unacknowledged before the connection is given up.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to reach PostgreSQL: the connection settings, the TLS connector the URL's
/// `sslmode` asks for (see [`PgTls`]), the password file, and whether this is a pooler.
#[derive(Clone)]
pub struct PgTarget {
    /// The settings for a direct connection: cacheward's startup options included.
    direct: tokio_postgres::Config,
    /// The same without startup options, for a transaction-mode pooler (which refuses them, or
    /// applies them to whichever server connection it happens to hand out).
    pooled: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    password_file: Option<PasswordFile>,
    /// Set once the server turned out to be a transaction-mode pooler (PgBouncer): no startup
    /// options, and no statement outlives its transaction (see `db`'s statements).
    is_pooler: Arc<AtomicBool>,
    /// The configuration key the URL came from, for messages.
    key: &'static str,
}

impl PgTarget {
    /// The settings for a new connection: the password read afresh from its file, if one is set.
    pub fn config(&self) -> tokio_postgres::Config {
        let mut config = match self.is_pooler() {
            true => self.pooled.clone(),
            false => self.direct.clone(),
        };
        // Read when the target was made: there is always a last password to fall back on.
        if let Some(Ok(password)) = self.password_file.as_ref().map(PasswordFile::read) {
            config.password(password);
        }
        config
    }

    /// Whether the URL leads to a transaction-mode pooler (found out at the first connection it
    /// refused, or the first statement it lost).
    pub fn is_pooler(&self) -> bool {
        self.is_pooler.load(Relaxed)
    }

    /// From now on, treat the server as a transaction-mode pooler (said once, with why).
    pub fn found_pooler(&self, why: &str) {
        if !self.is_pooler.swap(true, Relaxed) {
            tracing::info!(
                key = self.key,
                why,
                "postgres is reached through a transaction-mode pooler: no startup options, no prepared statements"
            );
        }
    }

    /// One connection and its driver, to be polled by the caller. A pooler that refuses
    /// cacheward's startup options is recognised, and connected to again without them.
    pub async fn connect_raw(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
                    tokio_postgres::Socket,
                >>::Stream,
            >,
        ),
        tokio_postgres::Error,
    > {
        match self.config().connect(self.tls.clone()).await {
            Err(e) if !self.is_pooler() && refused_options(&e) => {
                self.found_pooler("it refused the startup options");
                self.config().connect(self.tls.clone()).await
            }
            other => other,
        }
    }

    /// One connection, its driver spawned (it ends with the client).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, DbError> {
        let (client, connection) = self.connect_raw().await?;
        drive(connection);
        Ok(client)
    }
}

/// Drives a connection on a task of its own until it closes (it ends with its client): every
/// connection but the CDC worker's, whose driver also hands it the notifications.
pub fn drive(
    connection: impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    })
}

/// How the pool opens a connection: as [`PgTarget::connect`] does, the password read afresh.
pub struct PoolConnect(pub PgTarget);

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        Box::pin(async move {
            let (client, connection) = self.0.connect_raw().await?;
            Ok((client, drive(connection)))
        })
    }
}

/// `postgres.url`: the request path's pool, the health monitor, `migrate` and `verify`.
pub fn pg_target(config: &Config) -> Result<PgTarget, DbError> {
    let url = config
        .postgres
        .url
        .as_ref()
        .ok_or_else(|| DbError::said(DbErrorKind::Config, "postgres.url is not set"))?;
    target(config, url, "postgres.url")
}

/// `cdc.url` (a direct session: LISTEN, the lease, the cursor), or `postgres.url` if unset.
pub fn cdc_target(config: &Config) -> Result<PgTarget, DbError> {
    match &config.cdc.url {
        Some(url) => target(config, url, "cdc.url"),
        None => pg_target(config),
    }
}

/// `url` with the settings every cacheward connection carries.
fn target(config: &Config, url: &SecretUrl, key: &'static str) -> Result<PgTarget, DbError> {
    let bad = |e: &dyn std::fmt::Display| {
        DbError::said(
            DbErrorKind::Config,
            format!("{key} {}: {e}", url.redacted()),
        )
    };
    let (rest, tls) = PgTls::split(url.expose()).map_err(|e| bad(&e))?;
    let mut pg: tokio_postgres::Config = rest.parse().map_err(|e| bad(&e))?;
    pg.ssl_mode(tls.mode.driver_mode());
    if pg.get_application_name().is_none() {
        pg.application_name("cacheward");
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(2));
    }
    // Dead peers: a server that vanished without a FIN (a failover, a partition) is found by TCP
    // keepalives within ~25 s on an idle connection, and unacknowledged writes give up after 30 s
    // (the kernel's defaults: two hours, and about fifteen minutes). A URL's own settings win.
    if pg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        pg.keepalives_idle(KEEPALIVE_IDLE);
    }
    if pg.get_keepalives_interval().is_none() {
        pg.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if pg.get_keepalives_retries().is_none() {
        pg.keepalives_retries(KEEPALIVE_RETRIES);
    }
    if pg.get_tcp_user_timeout().is_none() {
        pg.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    let pooled = pg.clone();
    // UTC, so that PostgreSQL's JSON of any extra timestamp column is in UTC too. Generic plans:
    // every prepared statement is a lookup by key whose plan does not depend on the values, and
    // PostgreSQL would plan a declared table's read (`IN (SELECT … unnest($1, …))`) anew at every
    // execution, its custom plan estimated cheaper than the generic one (one key against ten).
    // Options the URL already carries are kept, after ours (a later -c wins).
    let ours = format!(
        "-c statement_timeout={} -c TimeZone=UTC -c plan_cache_mode=force_generic_plan",
        config.postgres.statement_timeout_ms
    );
    let options = match pg.get_options().filter(|o| !o.trim().is_empty()) {
        Some(theirs) => format!("{ours} {theirs}"),
        None => ours,
    };
    pg.options(options);
    let tls = MakeRustlsConnect::new(tls.client_config().map_err(|e| bad(&e))?);
    let password_file = match &config.postgres.password_file {
        None => None,
        Some(path) => {
            let file = PasswordFile::new("postgres.password_file", path);
            file.read()
                .map_err(|e| DbError::said(DbErrorKind::Credentials, e))?;
            Some(file)
        }
    };
    Ok(PgTarget {
        direct: pg,
        pooled,
        tls,
        password_file,
        is_pooler: Arc::new(AtomicBool::new(false)),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretUrl;

    #[test]
    fn a_users_own_startup_options_are_kept_and_a_pooler_gets_none() {
        let mut config = Config::default();
        config.postgres.url = Some(SecretUrl::new(
            "postgresql://u@h/db?options=-c%20search_path%3Dapp%2Cpublic",
        ));
        let target = pg_target(&config).unwrap();
        let options = target.config().get_options().unwrap().to_owned();
        assert!(options.contains("-c statement_timeout=2000"), "{options}");
        assert!(options.ends_with("-c search_path=app,public"), "{options}");
        target.found_pooler("test");
        assert_eq!(
            target.config().get_options(),
            Some("-c search_path=app,public"),
            "a pooler is sent only what the URL itself carries"
        );
        config.postgres.url = Some(SecretUrl::new("postgresql://u@h/db"));
        let target = pg_target(&config).unwrap();
        assert_eq!(
            target.config().get_options(),
            Some("-c statement_timeout=2000 -c TimeZone=UTC -c plan_cache_mode=force_generic_plan")
        );
        target.found_pooler("test");
        assert_eq!(target.config().get_options(), None);
        assert_eq!(target.config().get_keepalives_idle(), KEEPALIVE_IDLE);
    }
}
