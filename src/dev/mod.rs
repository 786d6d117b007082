//! Throwaway PostgreSQL, Redis and PgBouncer started from the system's binaries (installed by
//! [`install`] when missing) in temp dirs this process owns (for `serve --dev`, the tests and the
//! benchmark). Each server is a direct child, so callers can
//! stop, kill and restart it to inject faults; dropping it kills it and removes its files.
//!
//! Servers get `PR_SET_PDEATHSIG`, so they die with the thread that started them: start them from a
//! thread that outlives them (never from `spawn_blocking`).

pub mod cluster;
pub mod install;
pub mod pgbouncer;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod sentinel;

pub use pgbouncer::PgBouncer;
pub use postgres::{Postgres, PostgresOptions};
pub use process::{free_port, pg_tool, DevError, ServerTls};
pub use redis::{Redis, RedisOptions};

use crate::config::{Config, SecretUrl, TableConfig};
use crate::model::entry::Write;
use crate::store::pg::{self as db, capture, connect, tables};
use crate::store::redis::Cache;
use process::failed;

/// The original article's users. `user01` is also cached, so the first `get user02` comes from
/// the database.
pub const SEED_USERS: [&str; 4] = ["user01", "user02", "user05", "user06"];

/// The declared table `serve --dev` shows: accounts with a lookup by email and a column never
/// served, made, captured and seeded next to the users.
const ACCOUNTS: &str = "
    CREATE TABLE IF NOT EXISTS accounts (
        id            bigint PRIMARY KEY,
        email         text NOT NULL UNIQUE,
        plan          text NOT NULL DEFAULT 'free',
        password_hash text,
        updated_at    timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO accounts (id, email, plan, password_hash) VALUES
        (1, 'ada@example.com', 'pro', 'x'), (2, 'alan@example.com', 'free', 'y')
    ON CONFLICT DO NOTHING;";

/// Everything `serve --dev` runs on: both servers, the `cacheward` database migrated and seeded.
pub struct DevStack {
    pub postgres: Postgres,
    pub redis: Redis,
    pub database_url: String,
    pub redis_url: String,
}

impl DevStack {
    pub async fn start() -> Result<DevStack, DevError> {
        let postgres = Postgres::start()?;
        let redis = Redis::start()?;
        let database_url = postgres.create_database("cacheward").await?;
        let redis_url = redis.url(0);
        let stack = DevStack {
            postgres,
            redis,
            database_url,
            redis_url,
        };
        stack.seed().await?;
        Ok(stack)
    }

    /// A configuration pointing at this stack, declaring its `accounts` table.
    pub fn configure(&self, config: &mut Config) {
        config.postgres.url = Some(SecretUrl::new(self.database_url.clone()));
        config.redis.url = Some(SecretUrl::new(self.redis_url.clone()));
        config.tables.insert(
            "accounts".into(),
            TableConfig {
                exclude: vec!["password_hash".into()],
                ..TableConfig::keyed(&["id"]).lookup("by_email", &["email"])
            },
        );
    }

    async fn seed(&self) -> Result<(), DevError> {
        let mut config = Config::default();
        self.configure(&mut config);
        let target =
            connect::pg_target(&config).map_err(|e| failed("postgres url", e.to_string()))?;
        let mut client = target
            .connect()
            .await
            .map_err(|e| failed("connecting to postgres", e.to_string()))?;
        db::migrate(&mut client)
            .await
            .map_err(|e| failed("migrate", e.to_string()))?;
        client
            .batch_execute(ACCOUNTS)
            .await
            .map_err(|e| failed("making the accounts table", e.to_string()))?;
        let declared = tables::resolve_all(&client, &config)
            .await
            .map_err(|e| failed("declaring accounts", e.to_string()))?;
        capture::install(&mut client, &declared)
            .await
            .map_err(|e| failed("capturing accounts", e.to_string()))?;
        for name in SEED_USERS {
            client
                .execute(
                    "INSERT INTO users (username) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&name],
                )
                .await
                .map_err(|e| failed("seeding users", e.to_string()))?;
        }
        // The seed is history from before the daemon, as in the article: without this, the CDC
        // worker's first start would replay it and cache every seeded user.
        client
            .batch_execute("DELETE FROM cacheward_outbox")
            .await
            .map_err(|e| failed("seeding users", e.to_string()))?;
        let store = db::Db::new(&config).map_err(|e| failed("postgres pool", e.to_string()))?;
        let seeding = |e: String| failed("seeding the cache", e);
        // A fresh Redis has no fence yet; the daemon's health monitor would set it, the seed
        // needs it now.
        let fence = store
            .fresh_horizon()
            .await
            .map_err(|e| seeding(e.to_string()))?;
        let cache = Cache::new(&config).map_err(|e| failed("redis url", e.to_string()))?;
        // Written under this very Redis process: the daemon then trusts it (see Cache::epoch_key).
        cache
            .claim(fence)
            .await
            .map_err(|e| seeding(e.to_string()))?;
        let mut found = store
            .find_users(&[SEED_USERS[0]])
            .await
            .map_err(|e| seeding(e.to_string()))?;
        let user = found
            .users
            .pop()
            .ok_or_else(|| seeding("user01 vanished".into()))?;
        cache
            .apply(&[Write::live(&user, found.read_at)])
            .await
            .map_err(|e| seeding(e.to_string()))?;
        Ok(())
    }
}
