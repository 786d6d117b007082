//! Writing a declared table's rows: `upsert`, `update` and `delete`, each in one transaction that
//! also reads what the cache needs afterwards (the row as it is now, with the version its capture
//! drew; the key and lookup texts it had before). JSON values are converted by PostgreSQL
//! (`json_populate_record`), so every type it accepts can be written, and a value it refuses is
//! named by its column.

use serde_json::{Map, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use super::rows::{key_match, lookup_texts, select_sql, table_row, TableRow};
use super::tables::quote_ident;
use super::{Db, DbError, DbErrorKind};
use crate::model::table::{Column, Table};

/// Why a write was refused, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// A value, a column or a constraint refused it: `invalid_params`, naming which.
    #[error("{0}")]
    Invalid(String),
    /// A unique constraint refused it.
    #[error("{0}")]
    Conflict(String),
    /// `update` of a key no row has.
    #[error("no row with that key")]
    NotFound,
}

/// A write that failed: refused as the client asked it, or the database failed.
#[derive(Debug)]
pub enum Failed {
    Refused(WriteError),
    Db(DbError),
}

impl From<DbError> for Failed {
    fn from(e: DbError) -> Failed {
        Failed::Db(e)
    }
}

/// What a write left: the row now (absent after a delete), the key and lookup texts the row had
/// before (for their tombstones), and the version the change is known by.
#[derive(Debug)]
pub struct Written {
    pub row: Option<TableRow>,
    pub created: bool,
    pub before: Option<(String, Vec<String>)>,
    pub version: i64,
}

/// `ARRAY[t."a"::text, …]` and the lookups' arrays: the key and lookup texts of the row `t`.
fn texts_of(table: &Table) -> String {
    let array = |columns: &[Column]| {
        let parts: Vec<String> = columns
            .iter()
            .map(|c| format!("t.{}::text", quote_ident(&c.name)))
            .collect();
        format!("ARRAY[{}]", parts.join(", "))
    };
    std::iter::once(array(&table.key))
        .chain(table.lookups.iter().map(|l| array(&l.columns)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The key and lookup texts a row selected with [`texts_of`] (from column `at` on) has.
fn texts(table: &Table, row: &tokio_postgres::Row, at: usize) -> (String, Vec<String>) {
    let key: Vec<String> = row.get(at);
    let key: Vec<&str> = key.iter().map(String::as_str).collect();
    let lookups = lookup_texts(table, row, at + 1);
    (table.key_text(&key), lookups)
}

/// Only columns of the projection may be written.
fn check_columns(table: &Table, given: &Map<String, Value>) -> Result<(), Failed> {
    match given.keys().find(|c| !table.projection.contains(c)) {
        Some(c) => Err(Failed::Refused(WriteError::Invalid(format!(
            "table {}: {:?} is not a column it serves",
            table.name,
            c.chars().take(64).collect::<String>()
        )))),
        None => Ok(()),
    }
}

/// What the client is told of a statement PostgreSQL refused: a unique violation is a conflict, a
/// NOT NULL, CHECK, foreign-key or exclusion violation names its constraint, a value PostgreSQL
/// cannot take names its column (found by [`find_column`]).
async fn refused(
    tx: &Transaction<'_>,
    table: &Table,
    given: Option<&Map<String, Value>>,
    e: tokio_postgres::Error,
) -> Failed {
    let Some(db) = e.as_db_error() else {
        return Failed::Db(DbError::from_driver("write a row", e));
    };
    let code = db.code();
    let what = |name: Option<&str>| name.map(|n| format!(" {n:?}")).unwrap_or_default();
    let text = match code {
        c if c == &SqlState::UNIQUE_VIOLATION => {
            return Failed::Refused(WriteError::Conflict(format!(
                "table {}: a row with that value exists already (constraint{})",
                table.name,
                what(db.constraint())
            )))
        }
        c if c == &SqlState::NOT_NULL_VIOLATION => {
            format!("column{} may not be null", what(db.column()))
        }
        c if c == &SqlState::CHECK_VIOLATION
            || c == &SqlState::FOREIGN_KEY_VIOLATION
            || c == &SqlState::EXCLUSION_VIOLATION =>
        {
            format!(
                "constraint{} refused it: {}",
                what(db.constraint()),
                db.message()
            )
        }
        // Class 22: a value the column's type refuses.
        c if c.code().starts_with("22") => {
            let column = match given {
                Some(given) => find_column(tx, table, given).await,
                None => None,
            };
            match column {
                Some(column) => format!("column {column:?}: {}", db.message()),
                None => db.message().to_owned(),
            }
        }
        _ => return Failed::Db(DbError::from_driver("write a row", e)),
    };
    Failed::Refused(WriteError::Invalid(format!("table {}: {text}", table.name)))
}

/// The first given column whose value PostgreSQL refuses on its own (each tried in a savepoint).
async fn find_column(
    tx: &Transaction<'_>,
    table: &Table,
    given: &Map<String, Value>,
) -> Option<String> {
    // The failed statement aborted the transaction: roll back to before it.
    tx.batch_execute("ROLLBACK TO SAVEPOINT attempt")
        .await
        .ok()?;
    for (column, value) in given {
        let one = Value::Object(Map::from_iter([(column.clone(), value.clone())]));
        let sql = format!(
            "SELECT (json_populate_record(NULL::{}, $1::text::json)).{}::text",
            table.source,
            quote_ident(column)
        );
        tx.batch_execute("SAVEPOINT probe").await.ok()?;
        let text = one.to_string();
        let probe = tx.query_typed(&sql, &[(&text, Type::TEXT)]).await;
        tx.batch_execute("ROLLBACK TO SAVEPOINT probe").await.ok()?;
        if probe.is_err() {
            return Some(column.clone());
        }
    }
    None
}

impl Db {
    /// INSERT … ON CONFLICT (key) DO UPDATE of the given columns; `row` must hold the key.
    pub async fn upsert_row(
        &self,
        table: &Table,
        row: &Map<String, Value>,
    ) -> Result<Written, Failed> {
        check_columns(table, row)?;
        if let Some(c) = table.key.iter().find(|c| !row.contains_key(&c.name)) {
            return Err(Failed::Refused(WriteError::Invalid(format!(
                "table {}: row must hold the key column {:?}",
                table.name, c.name
            ))));
        }
        let columns: Vec<String> = row.keys().map(|c| quote_ident(c)).collect();
        let key: Vec<String> = table.key.iter().map(|c| quote_ident(&c.name)).collect();
        let mut sets: Vec<String> = row
            .keys()
            .filter(|c| !table.key.iter().any(|k| &k.name == *c))
            .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
            .collect();
        if sets.is_empty() {
            // Nothing but the key given: the row is "updated" to itself, so that it is returned.
            sets = key.iter().map(|k| format!("{k} = excluded.{k}")).collect();
        }
        let sql = format!(
            "INSERT INTO {source} AS t ({columns}) \
             SELECT {columns} FROM json_populate_record(NULL::{source}, $1::text::json) \
             ON CONFLICT ({key}) DO UPDATE SET {sets} \
             RETURNING t.xmax = 0, {texts}",
            source = table.source,
            columns = columns.join(", "),
            key = key.join(", "),
            sets = sets.join(", "),
            texts = texts_of(table),
        );
        let json = Value::Object(row.clone()).to_string();
        self.write(table, Some(row), move |tx| {
            Box::pin(async move {
                let done = tx.query_typed(&sql, &[(&json, Type::TEXT)]).await?;
                let row = done.into_iter().next();
                let created = row.as_ref().is_some_and(|r| r.get::<_, bool>(0));
                Ok((created, row, None))
            })
        })
        .await
    }

    /// UPDATE of the row whose key texts are `key` (columns' texts, as `Table::decode` gives
    /// them) with the given columns (the key's among them, if asked).
    pub async fn update_row(
        &self,
        table: &Table,
        key: &[String],
        set: &Map<String, Value>,
    ) -> Result<Written, Failed> {
        check_columns(table, set)?;
        if set.is_empty() {
            return Err(Failed::Refused(WriteError::Invalid(format!(
                "table {}: set names no column",
                table.name
            ))));
        }
        let sets: Vec<String> = set
            .keys()
            .map(|c| format!("{0} = g.{0}", quote_ident(c)))
            .collect();
        let before = format!(
            "SELECT {texts} FROM {source} t WHERE {matches} FOR UPDATE",
            texts = texts_of(table),
            source = table.source,
            matches = key_match(&table.key, 1),
        );
        let sql = format!(
            "UPDATE {source} AS t SET {sets} \
             FROM json_populate_record(NULL::{source}, $1::text::json) AS g \
             WHERE {matches} RETURNING false, {texts}",
            source = table.source,
            sets = sets.join(", "),
            matches = key_match(&table.key, 2),
            texts = texts_of(table),
        );
        let json = Value::Object(set.clone()).to_string();
        let key = key.to_vec();
        self.write(table, Some(set), move |tx| {
            Box::pin(async move {
                let mut params: Vec<(&(dyn ToSql + Sync), Type)> = Vec::new();
                for k in &key {
                    params.push((k, Type::TEXT));
                }
                let old = tx.query_typed(&before, &params).await?;
                let Some(old) = old.into_iter().next() else {
                    return Ok((false, None, None));
                };
                let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![(&json, Type::TEXT)];
                for k in &key {
                    params.push((k, Type::TEXT));
                }
                let done = tx.query_typed(&sql, &params).await?;
                Ok((false, done.into_iter().next(), Some(old)))
            })
        })
        .await
        .and_then(|w| match w.row {
            None => Err(Failed::Refused(WriteError::NotFound)),
            Some(_) => Ok(w),
        })
    }

    /// DELETE of the row whose key texts are `key`. `version`: the deletion's own (drawn by the
    /// capture), 0 when there was no such row.
    pub async fn delete_row(&self, table: &Table, key: &[String]) -> Result<Written, Failed> {
        let sql = format!(
            "DELETE FROM {source} AS t WHERE {matches} RETURNING {texts}",
            source = table.source,
            matches = key_match(&table.key, 1),
            texts = texts_of(table),
        );
        let key = key.to_vec();
        self.write(table, None, move |tx| {
            Box::pin(async move {
                let params: Vec<(&(dyn ToSql + Sync), Type)> = key
                    .iter()
                    .map(|k| (k as &(dyn ToSql + Sync), Type::TEXT))
                    .collect();
                let gone = tx.query_typed(&sql, &params).await?;
                Ok((false, None, gone.into_iter().next()))
            })
        })
        .await
    }

    /// Runs `statement` in a transaction (a savepoint before it, so that a value it refuses can be
    /// looked into), then reads the row it left by its key, with its version; or, when it left
    /// none, the version the capture drew for the departure. `statement` answers whether it
    /// created the row, the row's key and lookup texts after it (`RETURNING created, texts…`),
    /// and before it (`texts…`).
    async fn write<F>(
        &self,
        table: &Table,
        given: Option<&Map<String, Value>>,
        statement: F,
    ) -> Result<Written, Failed>
    where
        F: for<'t> FnOnce(
            &'t Transaction<'t>,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<
                            (
                                bool,
                                Option<tokio_postgres::Row>,
                                Option<tokio_postgres::Row>,
                            ),
                            tokio_postgres::Error,
                        >,
                    > + Send
                    + 't,
            >,
        >,
    {
        let bound = self.bounded("write a row", async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            tx.batch_execute("SAVEPOINT attempt").await?;
            let (created, after, before) = match statement(&tx).await {
                Ok(done) => done,
                Err(e) => return Ok(Err(refused(&tx, table, given, e).await)),
            };
            let before = before.map(|row| texts(table, &row, 0));
            let now = match &after {
                None => None,
                Some(row) => {
                    let (key, _) = texts(table, row, 1);
                    let (_, parts) = table.decode(&key).ok_or_else(|| {
                        DbError::said(DbErrorKind::Server, "a key that does not decode")
                    })?;
                    let params: Vec<Vec<String>> = parts.iter().map(|p| vec![p.clone()]).collect();
                    let params: Vec<(&(dyn ToSql + Sync), Type)> = params
                        .iter()
                        .map(|p| (p as &(dyn ToSql + Sync), Type::TEXT_ARRAY))
                        .collect();
                    let rows = tx.query_typed(&select_sql(table, None), &params).await?;
                    let row = rows.first().ok_or_else(|| {
                        DbError::said(DbErrorKind::Server, "the row written is not there")
                    })?;
                    Some(table_row(table, row)?)
                }
            };
            let version = match (&now, &before) {
                (Some(row), _) => row.version,
                (None, Some((key, _))) => {
                    let (_, parts) = table.decode(key).unwrap_or((None, Vec::new()));
                    tx.query_typed(
                        "SELECT coalesce(max(version), 0) FROM cacheward_outbox \
                         WHERE txid = pg_current_xact_id() AND tbl = $1 AND old_key = $2",
                        &[(&table.name, Type::TEXT), (&parts, Type::TEXT_ARRAY)],
                    )
                    .await?
                    .first()
                    .map_or(0, |r| r.get::<_, i64>(0))
                }
                (None, None) => 0,
            };
            tx.commit().await?;
            Ok(Ok(Written {
                row: now,
                created,
                before,
                version,
            }))
        });
        bound.await?
    }
}
