//! PostgreSQL: the connection pool, the queries of the request path, and the embedded migrations.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::Config;
use crate::tls::PgTls;
use crate::user::{RowError, User, USER_SELECT};

/// Why a database call failed, classified once here for every caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// The server cannot be reached or the connection broke: retryable.
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// The call did not finish in time (statement timeout or the client-side bound).
    #[error("postgres timed out: {0}")]
    Timeout(String),
    /// A unique constraint refused the change (rename onto an existing name).
    #[error("unique violation: {0}")]
    Conflict(String),
    /// A row that cannot be served (see `User::from_row`): fails only the request that asked
    /// for it.
    #[error(transparent)]
    Row(#[from] RowError),
    /// Anything else (missing schema, bad SQL): not fixed by retrying.
    #[error("postgres error: {0}")]
    Other(String),
}

impl DbError {
    fn classify(e: &tokio_postgres::Error) -> DbError {
        let text = match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => {
                // "error connecting to server" alone hides why: append the causes.
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(e);
                while let Some(c) = cause {
                    text.push_str(": ");
                    text.push_str(&c.to_string());
                    cause = c.source();
                }
                text
            }
        };
        match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => DbError::Conflict(text),
            Some(c) if *c == SqlState::QUERY_CANCELED => {
                DbError::Timeout(format!("statement timeout: {text}"))
            }
            Some(c)
                if c.code().starts_with("08")
                    || c.code().starts_with("57P")
                    || c.code().starts_with("53")
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE =>
            {
                DbError::Unavailable(text)
            }
            Some(_) => DbError::Other(text),
            // No SQLSTATE: the connection itself failed (refused, closed, I/O).
            None => DbError::Unavailable(text),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::classify(&e)
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => DbError::classify(&e),
            other => DbError::Unavailable(other.to_string()),
        }
    }
}

fn user_from_row(row: &Row) -> Result<User, DbError> {
    Ok(User::from_row(row)?)
}

/// PostgreSQL refuses to run a prepared statement whose result columns changed since it was
/// prepared (`SELECT u.*` after `ALTER TABLE users ADD COLUMN`).
fn plan_changed(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED)
        && e.as_db_error().is_some_and(|db| {
            db.message()
                .contains("cached plan must not change result type")
        })
}

type Params<'a> = [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// Runs `sql` as a cached prepared statement; one whose result columns changed is dropped from the
/// cache and prepared again, so a schema change costs nothing more than a re-prepare.
async fn query_cached(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, DbError> {
    let stmt = client.prepare_cached(sql).await?;
    match client.query(&stmt, params).await {
        Err(e) if plan_changed(&e) => {
            client.statement_cache.remove(sql, &[]);
            let stmt = client.prepare_cached(sql).await?;
            Ok(client.query(&stmt, params).await?)
        }
        other => Ok(other?),
    }
}

/// [`query_cached`] for at most one row.
async fn query_opt_cached(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &Params<'_>,
) -> Result<Option<Row>, DbError> {
    let mut rows = query_cached(client, sql, params).await?;
    if rows.len() > 1 {
        return Err(DbError::Other(format!(
            "expected at most one row, got {}",
            rows.len()
        )));
    }
    Ok(rows.pop())
}

/// The rows of a set of names, in one query (`$1`: text[]), as [`User::from_row`] reads them: the
/// request path's misses, repairs, the CDC worker's refetch and `verify` all use this one statement.
pub const FIND_USERS: &str =
    "SELECT u.*, row_to_json(u)::text FROM users u WHERE u.username = ANY($1)";

/// The version horizon: at least every version drawn so far. Read before a row, it is the row's
/// `read_at` (see `Cache::fence_key`); `last_value` of a sequence is not transactional, so it is
/// read in its own statement, ahead of the statement that reads the row.
pub const HORIZON: &str = "SELECT last_value FROM cacheward_version_seq";

/// A fresh horizon, larger than every version and every horizon read before it: a fence at it
/// refuses every write that read its row before this was drawn.
pub const FRESH_HORIZON: &str = "SELECT nextval('cacheward_version_seq')";

/// Runs [`HORIZON`] and then `sql`, pipelined on one connection (one round trip): the horizon is
/// read before the rows' snapshot is taken. Returns the rows and the horizon.
async fn query_after_horizon(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &Params<'_>,
) -> Result<(Vec<Row>, i64), DbError> {
    let horizon = client.prepare_cached(HORIZON).await?;
    let (horizon, rows) = tokio::try_join!(
        async { Ok::<_, DbError>(client.query_one(&horizon, &[]).await?) },
        query_cached(client, sql, params)
    )?;
    Ok((rows, horizon.get(0)))
}

/// Where and how to reach PostgreSQL: the connection settings, the TLS connector the URL's
/// `sslmode` asks for (see [`PgTls`]), and the password file, if any.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    password_file: Option<PasswordFile>,
}

/// `postgres.password_file`, read for every new connection; the last password read stays in use
/// while the file cannot be read (a rotation in progress), with a warning.
#[derive(Clone)]
struct PasswordFile {
    path: PathBuf,
    last: Arc<Mutex<String>>,
}

impl PasswordFile {
    fn read(&self) -> String {
        let mut last = self.last.lock().expect("password lock is never poisoned");
        match crate::secrets::read_password_file(&self.path) {
            Ok(password) => *last = password,
            Err(e) => tracing::warn!(
                error = %e,
                "postgres.password_file unreadable; the last password read is used"
            ),
        }
        last.clone()
    }
}

impl PgTarget {
    /// The settings for a new connection: the password read afresh from its file, if one is set.
    pub fn config(&self) -> tokio_postgres::Config {
        let mut config = self.config.clone();
        if let Some(file) = &self.password_file {
            config.password(file.read());
        }
        config
    }

    /// One connection, its driver spawned (it ends with the client).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, DbError> {
        let (client, connection) = self.config().connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection closed");
            }
        });
        Ok(client)
    }
}

/// How the pool opens a connection: as [`PgTarget::connect`] does, the password read afresh.
struct PoolConnect(PgTarget);

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let (config, tls) = (self.0.config(), self.0.tls.clone());
        Box::pin(async move {
            let (client, connection) = config.connect(tls).await?;
            let driver = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "postgres connection closed");
                }
            });
            Ok((client, driver))
        })
    }
}

/// TCP keepalives of every backend connection (PostgreSQL and Redis): first probe after this idle
/// time, then every [`KEEPALIVE_INTERVAL`], given up after [`KEEPALIVE_RETRIES`] unanswered.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_RETRIES: u32 = 3;
/// How long written data may stay unacknowledged before the connection is given up.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// `postgres.url`, with the settings every cacheward connection carries.
pub fn pg_target(config: &Config) -> Result<PgTarget, DbError> {
    let url = config
        .postgres
        .url
        .as_ref()
        .ok_or_else(|| DbError::Other("postgres.url is not set".into()))?;
    let bad =
        |e: &dyn std::fmt::Display| DbError::Other(format!("postgres.url {}: {e}", url.redacted()));
    let (rest, tls) = PgTls::split(url.expose()).map_err(|e| bad(&e))?;
    let mut pg: tokio_postgres::Config = rest.parse().map_err(|e| bad(&e))?;
    pg.ssl_mode(tls.mode.driver_mode());
    // UTC, so that PostgreSQL's JSON of any extra timestamp column is in UTC too. Options the URL
    // already carries are kept, after ours (a later -c wins).
    let ours = format!(
        "-c statement_timeout={} -c TimeZone=UTC",
        config.postgres.statement_timeout_ms
    );
    let options = match pg.get_options().filter(|o| !o.trim().is_empty()) {
        Some(theirs) => format!("{ours} {theirs}"),
        None => ours,
    };
    pg.options(options);
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
    let tls = MakeRustlsConnect::new(tls.client_config().map_err(|e| bad(&e))?);
    let password_file = match &config.postgres.password_file {
        None => None,
        Some(path) => {
            let password = crate::secrets::read_password_file(path)
                .map_err(|e| DbError::Other(format!("postgres.password_file {e}")))?;
            Some(PasswordFile {
                path: path.clone(),
                last: Arc::new(Mutex::new(password)),
            })
        }
    };
    Ok(PgTarget {
        config: pg,
        tls,
        password_file,
    })
}

/// What a read of several names found.
#[derive(Debug)]
pub struct Found {
    pub users: Vec<User>,
    /// Rows that exist but cannot be served (each fails only its own name).
    pub broken: Vec<RowError>,
    /// The version horizon read before the rows (see `Cache::fence_key`).
    pub read_at: i64,
}

/// The pool serving requests, with every call bounded in time.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    /// Client-side bound on one call (pool wait + query), beyond the server's statement timeout.
    call_timeout: Duration,
}

impl Db {
    /// Builds the pool. Connects lazily: a database that is down now is not an error.
    pub fn new(config: &Config) -> Result<Db, DbError> {
        let target = pg_target(config)?;
        let manager = Manager::from_connect(
            target.config.clone(),
            PoolConnect(target),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let call_timeout = config.statement_timeout() + Duration::from_secs(1);
        let pool = Pool::builder(manager)
            .max_size(config.postgres.pool_size)
            .timeouts(Timeouts {
                wait: Some(call_timeout),
                create: Some(Duration::from_secs(2)),
                recycle: Some(Duration::from_secs(1)),
            })
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Other(e.to_string()))?;
        Ok(Db { pool, call_timeout })
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        match tokio::time::timeout(self.call_timeout, f).await {
            Ok(result) => result,
            Err(_) => Err(DbError::Timeout(format!(
                "{what} took longer than {:?}",
                self.call_timeout
            ))),
        }
    }

    /// The rows named by `usernames` (in no particular order; absent names have none), in one
    /// query. Retried once on a connection that turned out to be dead (after a server restart the
    /// pool still holds its old connections).
    /// Also returns the rows that cannot be served, apart, and the horizon read before them
    /// (their `read_at`).
    pub async fn find_users(&self, usernames: &[&str]) -> Result<Found, DbError> {
        match self.find_users_once(usernames).await {
            Err(DbError::Unavailable(_)) => self.find_users_once(usernames).await,
            other => other,
        }
    }

    async fn find_users_once(&self, usernames: &[&str]) -> Result<Found, DbError> {
        self.bounded("select users", async {
            let client = self.pool.get().await?;
            let (rows, read_at) = query_after_horizon(&client, FIND_USERS, &[&usernames]).await?;
            let (users, broken) = User::from_rows(&rows);
            Ok(Found {
                users,
                broken,
                read_at,
            })
        })
        .await
    }

    /// The original tool's `get_or_create_user`: the row named `username`, inserted if missing.
    /// Returns the row, whether this call created it, and the horizon read before it.
    pub async fn get_or_create(&self, username: &str) -> Result<(User, bool, i64), DbError> {
        self.bounded("get or create user", async {
            let client = self.pool.get().await?;
            let select = format!("SELECT {USER_SELECT} FROM users u WHERE u.username = $1");
            let insert = format!(
                "INSERT INTO users AS u (username) VALUES ($1) ON CONFLICT (username) DO NOTHING RETURNING {USER_SELECT}"
            );
            // Select first so that an existing user costs one round trip and burns no id. Between
            // the two statements another client may insert (then the insert does nothing) or
            // delete (then the select finds nothing): try again, a bounded number of times.
            for _ in 0..5 {
                let (rows, read_at) = query_after_horizon(&client, &select, &[&username]).await?;
                if let Some(row) = rows.first() {
                    return Ok((user_from_row(row)?, false, read_at));
                }
                if let Some(row) = query_opt_cached(&client, &insert, &[&username]).await? {
                    return Ok((user_from_row(&row)?, true, read_at));
                }
            }
            Err(DbError::Unavailable(format!(
                "user '{username}' kept being inserted and deleted concurrently"
            )))
        })
        .await
    }

    /// Renames `old` to `new`. `None` if `old` does not exist; `Conflict` if `new` does. Also
    /// returns the horizon read before the update.
    pub async fn rename(&self, old: &str, new: &str) -> Result<Option<(User, i64)>, DbError> {
        self.bounded("rename user", async {
            let client = self.pool.get().await?;
            let sql = format!(
                "UPDATE users AS u SET username = $2 WHERE u.username = $1 RETURNING {USER_SELECT}"
            );
            let (rows, read_at) = query_after_horizon(&client, &sql, &[&old, &new]).await?;
            rows.first()
                .map(|row| Ok((user_from_row(row)?, read_at)))
                .transpose()
        })
        .await
    }

    /// Deletes the row named `username`; returns the version it had, or `None` if there was none.
    pub async fn delete(&self, username: &str) -> Result<Option<i64>, DbError> {
        self.bounded("delete user", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached("DELETE FROM users WHERE username = $1 RETURNING version")
                .await?;
            let row = client.query_opt(&stmt, &[&username]).await?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    /// A fresh version horizon ([`FRESH_HORIZON`]): a fence at it refuses every write that read
    /// its row before now.
    pub async fn fresh_horizon(&self) -> Result<i64, DbError> {
        self.bounded("draw a version horizon", async {
            let client = self.pool.get().await?;
            let stmt = client.prepare_cached(FRESH_HORIZON).await?;
            Ok(client.query_one(&stmt, &[]).await?.get(0))
        })
        .await
    }

    /// The rows named in `usernames` that exist (those that cannot be served apart), the horizon
    /// read before them (their `read_at`), and a version at least as large as any that a missing
    /// name can have had: the tombstone version for those that do not.
    pub async fn current_rows(&self, usernames: &[String]) -> Result<(Found, i64), DbError> {
        self.bounded("select users", async {
            let client = self.pool.get().await?;
            let (rows, read_at) = query_after_horizon(&client, FIND_USERS, &[&usernames]).await?;
            let (users, broken) = User::from_rows(&rows);
            // Read after the rows: a name missing above was removed before, so every version it
            // ever had was drawn before this.
            let stmt = client.prepare_cached(HORIZON).await?;
            let horizon: i64 = client.query_one(&stmt, &[]).await?.get(0);
            let found = Found {
                users,
                broken,
                read_at,
            };
            Ok((found, horizon))
        })
        .await
    }
}

/// The embedded migrations, applied in order, each once, each in its own transaction.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "users", include_str!("../../sql/0001_users.sql")),
    (2, "cdc", include_str!("../../sql/0002_cdc.sql")),
    (
        3,
        "least privilege",
        include_str!("../../sql/0003_least_privilege.sql"),
    ),
    (4, "cdc lease", include_str!("../../sql/0004_cdc_lease.sql")),
];

/// Applies every migration not yet recorded in `cacheward_migrations`. Safe to run concurrently
/// and repeatedly. Returns the versions it applied.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<i32>, DbError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS cacheward_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        // One migrator at a time; the others wait here and then find the work done.
        tx.batch_execute("LOCK TABLE cacheward_migrations IN EXCLUSIVE MODE")
            .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM cacheward_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if done {
            continue;
        }
        tx.batch_execute(sql).await.map_err(|e| {
            DbError::Other(format!(
                "migration {version} ({name}): {}",
                DbError::from(e)
            ))
        })?;
        tx.execute(
            "INSERT INTO cacheward_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        applied.push(*version);
    }
    Ok(applied)
}

/// A plain connection (no TLS) to `pg`, outside the pool: for the harness and tools that reach a
/// local server. The daemon's own connections go through [`PgTarget::connect`].
pub async fn connect(pg: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretUrl;

    #[test]
    fn a_users_own_startup_options_are_kept() {
        let mut config = Config::default();
        config.postgres.url = Some(SecretUrl::new(
            "postgresql://u@h/db?options=-c%20search_path%3Dapp%2Cpublic",
        ));
        let pg = pg_target(&config).unwrap().config();
        let options = pg.get_options().unwrap();
        assert!(options.contains("-c statement_timeout=2000"), "{options}");
        assert!(options.ends_with("-c search_path=app,public"), "{options}");
        config.postgres.url = Some(SecretUrl::new("postgresql://u@h/db"));
        assert_eq!(
            pg_target(&config).unwrap().config().get_options(),
            Some("-c statement_timeout=2000 -c TimeZone=UTC")
        );
    }
}
