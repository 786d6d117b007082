//! Declared tables' writes: `upsert`, `update` and `delete`, write-through as `users`' are
//! (PostgreSQL first, in a task of its own; then Redis, a failure queued for repair): the row's
//! entry and its lookups' copies at the version its capture drew, and tombstones for the key and
//! the lookup values it left.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{db_error, Service, ServiceError};
use crate::model::entry::Write;
use crate::model::table::Table;
use crate::store::pg::writes::{Failed, WriteError, Written};

impl Service {
    /// Upsert, write-through: the entry written and whether the row was created.
    pub async fn upsert_row(
        self: &Arc<Self>,
        table: Arc<Table>,
        row: Map<String, Value>,
    ) -> Result<(String, bool), ServiceError> {
        self.detached(move |svc| async move {
            svc.stats.db_queries.fetch_add(1, Relaxed);
            let written = svc.written(&table, svc.db.upsert_row(&table, &row).await)?;
            let created = written.created;
            let entry = svc.write_row_through(&table, written).await;
            Ok((entry.unwrap_or_default(), created))
        })
        .await
    }

    /// Update of the row whose key text is `key`, write-through: the entry written.
    pub async fn update_row(
        self: &Arc<Self>,
        table: Arc<Table>,
        key: String,
        set: Map<String, Value>,
    ) -> Result<String, ServiceError> {
        self.detached(move |svc| async move {
            let Some((None, parts)) = table.decode(&key) else {
                return Err(svc.not_found(&table.key(&key)));
            };
            svc.stats.db_queries.fetch_add(1, Relaxed);
            let written = match svc.db.update_row(&table, &parts, &set).await {
                Err(Failed::Refused(WriteError::NotFound)) => {
                    return Err(svc.not_found(&table.key(&key)))
                }
                other => svc.written(&table, other)?,
            };
            let entry = svc.write_row_through(&table, written).await;
            Ok(entry.unwrap_or_default())
        })
        .await
    }

    /// Delete of the row whose key text is `key`, write-through: the version the deletion is
    /// known by (`None`: there was no such row).
    pub async fn delete_row(
        self: &Arc<Self>,
        table: Arc<Table>,
        key: String,
    ) -> Result<Option<i64>, ServiceError> {
        self.detached(move |svc| async move {
            let Some((None, parts)) = table.decode(&key) else {
                return Ok(None);
            };
            svc.stats.db_queries.fetch_add(1, Relaxed);
            let written = svc.written(&table, svc.db.delete_row(&table, &parts).await)?;
            if written.before.is_none() {
                return Ok(None);
            }
            let version = written.version;
            svc.write_row_through(&table, written).await;
            Ok(Some(version))
        })
        .await
    }

    /// A write's outcome as the client is told it.
    fn written(
        &self,
        table: &Table,
        result: Result<Written, Failed>,
    ) -> Result<Written, ServiceError> {
        if let Some(counters) = self.stats.table(table.id) {
            counters.writes.fetch_add(1, Relaxed);
        }
        match result {
            Ok(written) => {
                self.health.saw_up(super::Backend::Postgres);
                Ok(written)
            }
            Err(Failed::Refused(WriteError::Conflict(why))) => Err(ServiceError::RowConflict(why)),
            Err(Failed::Refused(WriteError::Invalid(why))) => Err(ServiceError::InvalidRow(why)),
            Err(Failed::Refused(WriteError::NotFound)) => Err(ServiceError::RowNotFound {
                table: table.name.clone(),
                key: String::new(),
            }),
            Err(Failed::Db(e)) => Err(db_error(e, &self.health)),
        }
    }

    /// The Redis half of a declared table's write: the row's entry at its key and its lookups',
    /// tombstones at the version of the change for the key and lookup values it left. Returns
    /// the entry written.
    async fn write_row_through(&self, table: &Table, written: Written) -> Option<String> {
        let version = written.version;
        let mut writes = Vec::new();
        let mut kept: Vec<&str> = Vec::new();
        let entry = written.row.as_ref().map(|row| row.entry());
        if let (Some(row), Some(entry)) = (&written.row, &entry) {
            let keys = std::iter::once(&row.key).chain(&row.lookups);
            for text in keys {
                kept.push(text);
                writes.push(match entry.len() as u64 <= self.max_entry_bytes {
                    true => Write::Live {
                        key: table.key(text),
                        version: row.version,
                        json: entry.clone(),
                        read_at: row.version,
                    },
                    false => Write::tombstone(table.key(text), row.version - 1),
                });
            }
        }
        if let Some((key, lookups)) = &written.before {
            for text in std::iter::once(key).chain(lookups) {
                if !kept.contains(&text.as_str()) {
                    writes.push(Write::tombstone(table.key(text), version));
                }
            }
        }
        self.write_through(writes).await;
        entry
    }
}
