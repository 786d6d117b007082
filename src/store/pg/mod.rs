//! PostgreSQL: the connection pool, the queries of the request path, and the embedded migrations.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};

pub mod capture;
pub mod connect;
pub mod error;
pub mod rows;
pub mod tables;
pub mod writes;

use self::connect::{pg_target, PgTarget, PoolConnect};
pub use self::error::{DbError, DbErrorKind};
use crate::config::Config;
use crate::model::user::{RowError, User, USER_SELECT};
use crate::support::time::within;

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

/// A statement's parameters, each with its type: enough to send it unnamed through a pooler.
type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// Runs `sql` on the request path. On a direct connection it is a cached prepared statement (one
/// whose result columns changed is prepared again, so a schema change costs a re-prepare); through
/// a transaction-mode pooler, where a prepared statement does not outlive its transaction, it is
/// parsed, bound and executed unnamed in one round trip. A prepared statement that vanished
/// reveals a pooler that passed the startup options on (`ignore_startup_parameters`).
async fn query(
    client: &deadpool_postgres::Client,
    target: &PgTarget,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, DbError> {
    if !target.is_pooler() {
        match prepared(client, sql, params).await {
            Err(e) if e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) => {
                target.found_pooler("a prepared statement vanished between two statements")
            }
            Err(e) if plan_changed(&e) => {
                let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
                client.statement_cache.remove(sql, &types);
                return Ok(prepared(client, sql, params).await?);
            }
            other => return Ok(other?),
        }
    }
    Ok(client.query_typed(sql, params).await?)
}

async fn prepared(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
    let stmt = client.prepare_typed_cached(sql, &types).await?;
    let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
    client.query(&stmt, &values).await
}

/// [`query`] for at most one row.
async fn query_opt(
    client: &deadpool_postgres::Client,
    target: &PgTarget,
    sql: &str,
    params: &Params<'_>,
) -> Result<Option<Row>, DbError> {
    let mut rows = query(client, target, sql, params).await?;
    if rows.len() > 1 {
        return Err(DbError::said(
            DbErrorKind::Server,
            format!("expected at most one row, got {}", rows.len()),
        ));
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
    target: &PgTarget,
    sql: &str,
    params: &Params<'_>,
) -> Result<(Vec<Row>, i64), DbError> {
    let (horizon, rows) = tokio::try_join!(
        read_horizon(client, target),
        query(client, target, sql, params)
    )?;
    Ok((rows, horizon))
}

/// [`HORIZON`], read on `client` (every reading of it is this one).
async fn read_horizon(
    client: &deadpool_postgres::Client,
    target: &PgTarget,
) -> Result<i64, DbError> {
    let row = query_opt(client, target, HORIZON, &[]).await?;
    row.map(|r| r.get(0))
        .ok_or_else(|| DbError::said(DbErrorKind::Server, "the version horizon read no row"))
}

/// What a read of several names found.
#[derive(Debug, Default)]
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
    target: PgTarget,
    /// Client-side bound on one call (pool wait + query), beyond the server's statement timeout.
    call_timeout: Duration,
    /// The statements reading declared tables' rows, built once per table shape.
    selects: Arc<rows::ByShape<rows::Selects>>,
}

impl Db {
    /// How the pool reaches PostgreSQL; a clone shares what it found out (a pooler).
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// Builds the pool. Connects lazily: a database that is down now is not an error.
    pub fn new(config: &Config) -> Result<Db, DbError> {
        let target = pg_target(config)?;
        let manager = Manager::from_connect(
            target.config(),
            PoolConnect(target.clone()),
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
            .map_err(|e| DbError::new(DbErrorKind::Config, "the pool", Arc::new(e)))?;
        Ok(Db {
            pool,
            target,
            call_timeout,
            selects: Default::default(),
        })
    }

    /// `f`, bounded by `postgres.statement_timeout_ms` (not an `async fn`: see `within`).
    fn bounded<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = Result<T, DbError>>,
    ) -> impl std::future::Future<Output = Result<T, DbError>> {
        within(self.call_timeout, f, move |bound| {
            DbError::timeout(what, bound)
        })
    }

    /// The rows named by `usernames` (in no particular order; absent names have none), in one
    /// query. Retried once on a connection that turned out to be dead (after a server restart the
    /// pool still holds its old connections).
    /// Also returns the rows that cannot be served, apart, and the horizon read before them
    /// (their `read_at`).
    pub async fn find_users(&self, usernames: &[&str]) -> Result<Found, DbError> {
        match self.find_users_once(usernames).await {
            Err(e) if e.is_unavailable() => self.find_users_once(usernames).await,
            other => other,
        }
    }

    async fn find_users_once(&self, usernames: &[&str]) -> Result<Found, DbError> {
        self.bounded("select users", async {
            let client = self.pool.get().await?;
            self.found(&client, &usernames).await
        })
        .await
    }

    /// [`FIND_USERS`] of `usernames` (a text array) after the horizon, split into rows and rows
    /// that cannot be served.
    async fn found(
        &self,
        client: &deadpool_postgres::Client,
        usernames: &(dyn ToSql + Sync),
    ) -> Result<Found, DbError> {
        let params = [(usernames, Type::TEXT_ARRAY)];
        let (rows, read_at) =
            query_after_horizon(client, &self.target, FIND_USERS, &params).await?;
        let (users, broken) = User::from_rows(&rows);
        Ok(Found {
            users,
            broken,
            read_at,
        })
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
                let (rows, read_at) = query_after_horizon(&client, &self.target, &select, &[(&username, Type::TEXT)]).await?;
                if let Some(row) = rows.first() {
                    return Ok((user_from_row(row)?, false, read_at));
                }
                if let Some(row) = query_opt(&client, &self.target, &insert, &[(&username, Type::TEXT)]).await? {
                    return Ok((user_from_row(&row)?, true, read_at));
                }
            }
            Err(DbError::said(
                DbErrorKind::Lost,
                format!("user '{username}' kept being inserted and deleted concurrently"),
            ))
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
            let (rows, read_at) = query_after_horizon(
                &client,
                &self.target,
                &sql,
                &[(&old, Type::TEXT), (&new, Type::TEXT)],
            )
            .await?;
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
            let sql = "DELETE FROM users WHERE username = $1 RETURNING version";
            let row = query_opt(&client, &self.target, sql, &[(&username, Type::TEXT)]).await?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    /// A fresh version horizon ([`FRESH_HORIZON`]): a fence at it refuses every write that read
    /// its row before now.
    pub async fn fresh_horizon(&self) -> Result<i64, DbError> {
        self.bounded("draw a version horizon", async {
            let client = self.pool.get().await?;
            let row = query_opt(&client, &self.target, FRESH_HORIZON, &[]).await?;
            row.map(|r| r.get(0))
                .ok_or_else(|| DbError::said(DbErrorKind::Server, "nextval read no row"))
        })
        .await
    }

    /// The rows named in `usernames` that exist (those that cannot be served apart), the horizon
    /// read before them (their `read_at`), and a version at least as large as any that a missing
    /// name can have had: the tombstone version for those that do not.
    pub async fn current_rows(&self, usernames: &[&str]) -> Result<(Found, i64), DbError> {
        self.bounded("select users", async {
            let client = self.pool.get().await?;
            let found = self.found(&client, &usernames).await?;
            // Read after the rows: a name missing above was removed before, so every version it
            // ever had was drawn before this.
            let horizon = read_horizon(&client, &self.target).await?;
            Ok((found, horizon))
        })
        .await
    }
}

/// The embedded migrations, applied in order, each once, each in its own transaction.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "users", include_str!("../../../sql/0001_users.sql")),
    (2, "cdc", include_str!("../../../sql/0002_cdc.sql")),
    (
        3,
        "least privilege",
        include_str!("../../../sql/0003_least_privilege.sql"),
    ),
    (
        4,
        "cdc lease",
        include_str!("../../../sql/0004_cdc_lease.sql"),
    ),
    (
        5,
        "declared tables",
        include_str!("../../../sql/0005_tables.sql"),
    ),
    (
        6,
        "missed slots",
        include_str!("../../../sql/0006_missed_slots.sql"),
    ),
    (
        7,
        "captures fire always",
        include_str!("../../../sql/0007_capture_always.sql"),
    ),
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
        tx.batch_execute(sql)
            .await
            .map_err(|e| DbError::from_driver(format!("migration {version} ({name})"), e))?;
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
    connect::drive(connection);
    Ok(client)
}
