//! Declared tables, and users' capture, kept in step with the catalog while the daemon runs. At
//! start, every table is checked once PostgreSQL answers, and one that cannot be served as
//! configured (no such table, a key that is not unique, its capture not installed) stops the
//! daemon, naming it. Then every [`EVERY`] each table is checked again, with the rights `serve`
//! has (no event trigger, which managed PostgreSQL does not allow):
//! - its shape changed (a column added or dropped, a type changed): the new shape is served, and
//!   its cached entries are dropped behind a fresh fence, so no entry of the old shape survives;
//! - it stopped matching (dropped, a key column gone, its capture removed): it answers
//!   `unavailable` and its entries are dropped; the other tables are unaffected;
//! - it matches again: it is served again.
//!
//! Users' capture is checked as often (daemon or no declared table): a trigger of it disabled,
//! dropped or made to fire in replica sessions only (`ALTER TABLE users DISABLE TRIGGER …`) is
//! said at error, once, and from then on no cached user is trusted: users are read from
//! PostgreSQL (exact, if slower), and the near cache and tracking clients forget every user they
//! hold, since none would hear of a change made now. When all fire again, every cached user is
//! dropped behind a fresh fence (any may have missed a change made meanwhile), and only then is
//! the cache trusted for users again.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Backend, Service};
use crate::config::Config;
use crate::model::key::TableId;
use crate::store::pg::capture;
use crate::store::pg::tables::{self, TableError};
use crate::support::time::Backoff;

/// How often the declared tables are checked against the catalog.
pub const EVERY: Duration = Duration::from_millis(500);

/// What the first check found that stops the daemon, if anything.
pub type Unservable = Arc<Mutex<Option<String>>>;

/// Runs until `stop`. A table the first check cannot serve records why in `unservable` and
/// cancels `shutdown`.
pub async fn watch(
    service: Arc<Service>,
    config: Arc<Config>,
    unservable: Unservable,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut first = true;
    // Tables whose entries must be dropped (a drop that failed is tried again).
    let mut to_drop: BTreeSet<TableId> = BTreeSet::new();
    loop {
        let bound = config.statement_timeout() * 4;
        let client = match tokio::time::timeout(bound, service.pg_target().connect()).await {
            Ok(Ok(client)) => client,
            _ => {
                if !backoff.wait(&stop).await {
                    return;
                }
                continue;
            }
        };
        loop {
            #[cfg(feature = "test-hooks")]
            service.hooks.pause_before_table_check(first).await;
            let pass = tokio::time::timeout(bound, service.check_tables(&client, &config, first));
            match pass.await {
                Ok(Ok(changed)) => {
                    first = false;
                    backoff.reset();
                    to_drop.extend(changed);
                }
                Ok(Err(e)) if first && !matches!(e, TableError::Db { .. }) => {
                    tracing::error!(error = %e, "a declared table cannot be served; stopping");
                    *unservable.lock().expect("not poisoned") = Some(e.to_string());
                    shutdown.cancel();
                    return;
                }
                // PostgreSQL down or slow: a new connection, later.
                _ => break,
            }
            match tokio::time::timeout(bound, capture::users_not_firing(&client)).await {
                Ok(Ok(off)) => service.users_capture_found(off, &mut to_drop),
                _ => break,
            }
            for table in std::mem::take(&mut to_drop) {
                match service.drop_table_entries(table).await {
                    Ok(dropped) if table == TableId::USERS => {
                        // Unless it stopped firing again meanwhile (then it stays distrusted).
                        if service.users_capture_firing() {
                            service.repairs.trust_table(TableId::USERS);
                        }
                        tracing::info!(dropped, "users capture firing again: cached users dropped");
                    }
                    Ok(_) => {}
                    Err(()) => {
                        to_drop.insert(table);
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
        }
        if !backoff.wait(&stop).await {
            return;
        }
    }
}

impl Service {
    /// Whether the last check found every trigger of users' capture firing (true until checked).
    pub fn users_capture_firing(&self) -> bool {
        !self
            .users_capture_off
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records what a check of users' capture found (`off`: the triggers that do not fire). While
    /// one does not, no cached user is trusted (see the module's doc). Once they all fire again,
    /// users' entries are queued in `to_drop` (any may have missed a change made meanwhile); the
    /// cache is trusted for users again once they are dropped.
    fn users_capture_found(&self, off: Vec<String>, to_drop: &mut BTreeSet<TableId>) {
        let firing = off.is_empty();
        match (self.users_capture_firing(), firing) {
            (true, false) => {
                self.repairs.distrust_table(TableId::USERS);
                self.cache.forget_near_table(TableId::USERS);
                tracing::error!(
                    problems = %off.join("; "),
                    "users capture not firing: changes to users pass the cache by"
                )
            }
            (false, true) => {
                to_drop.insert(TableId::USERS);
            }
            _ => return,
        }
        self.users_capture_off
            .store(!firing, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Service {
    /// Checks every declared table on `client`, records what it found, and returns the tables
    /// whose cached entries must go (their shape changed, or they stopped matching). On the
    /// `first` check, a table that does not match is an error.
    async fn check_tables(
        &self,
        client: &tokio_postgres::Client,
        config: &Config,
        first: bool,
    ) -> Result<Vec<TableId>, TableError> {
        let mut changed = Vec::new();
        for (name, section) in &config.tables {
            let id = self.tables.id(name).expect("declared");
            let checked = match tables::resolve(client, name, section, config).await {
                Ok(table) => capture::installed(client, &table).await.map(|()| table),
                Err(e) => Err(e),
            };
            match checked {
                Ok(table) => {
                    let before = self.tables.get(id);
                    if before.as_deref() == Some(&table) {
                        continue;
                    }
                    let again = self.tables.is_unavailable(id);
                    self.tables.checked(table);
                    if before.is_some() {
                        tracing::info!(table = %name, "declared table changed: its cached rows are dropped");
                        changed.push(id);
                    } else if again {
                        // Its changes were passed over meanwhile: tombstones at their keys, but
                        // their lookups' copies were left as they were.
                        tracing::info!(table = %name, "declared table available again");
                        changed.push(id);
                    }
                }
                Err(e @ TableError::Db { .. }) => return Err(e),
                Err(e) if first => return Err(e),
                Err(e) => {
                    if self.tables.get(id).is_some() {
                        tracing::error!(table = %name, error = %e, "declared table unavailable");
                        self.tables.unavailable(id, e.to_string());
                        changed.push(id);
                    }
                }
            }
        }
        Ok(changed)
    }

    /// Drops the cached entries of table `id` behind a fresh fence: no write that read a row
    /// before now lands after it.
    pub async fn drop_table_entries(&self, id: TableId) -> Result<u64, ()> {
        let fence = match self.db.fresh_horizon().await {
            Ok(fence) => fence,
            Err(_) => return Err(()),
        };
        if !self.health.is_up(Backend::Redis) {
            return Err(());
        }
        match self.cache.drop_table(fence, id).await {
            Ok(dropped) => Ok(dropped),
            Err(e) => {
                self.cache_failed(&e, "drop a table's entries");
                Err(())
            }
        }
    }
}
