//! Declared tables in the change stream: the keys a batch's changes of declared tables mention
//! (each row's key, the keys rows left, the lookup values they no longer have), their TRUNCATEs,
//! and the current rows of those keys, read in the batch's snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::CdcError;
use crate::model::key::{Key, TableId};
use crate::model::registry::Tables;
use crate::model::table::{encode_lookup, Table};
use crate::store::pg::rows::{select_sql, table_row, ByShape, TableRow};

/// One outbox row of a declared table, as [`TableChanges::add`] reads it.
pub struct TableChange<'a> {
    pub op: &'a str,
    pub row_key: Option<&'a [String]>,
    pub old_key: Option<&'a [String]>,
    pub old_lookups: Option<&'a serde_json::Value>,
    pub version: i64,
}

/// What a batch's changes of declared tables say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableChanges {
    /// Every row key mentioned, with the largest version recorded for it.
    pub keys: BTreeMap<Key, i64>,
    /// Lookup keys that rows no longer hold, with the version of the change that left them.
    pub gone_lookups: BTreeMap<Key, i64>,
    /// Per table, the largest version horizon a TRUNCATE of it recorded.
    pub truncates: BTreeMap<TableId, i64>,
    /// Tables whose changes are in the stream but that this daemon does not declare.
    pub undeclared: std::collections::BTreeSet<String>,
}

/// The old lookup values of a change: `{"by_email": ["a@x"]}`, each lookup's column texts.
fn old_lookups(value: &serde_json::Value) -> Option<Vec<(&str, Vec<&str>)>> {
    value
        .as_object()?
        .iter()
        .map(|(name, parts)| {
            let parts = parts.as_array()?;
            let parts: Option<Vec<&str>> = parts.iter().map(|p| p.as_str()).collect();
            Some((name.as_str(), parts?))
        })
        .collect()
}

impl TableChanges {
    /// Adds `c`, a change of the declared table `table` (`None`: a table no longer declared,
    /// whose capture was left in place: passed over). Returns why `c` cannot be what the capture
    /// wrote, if so.
    pub fn add(
        &mut self,
        tables: &Tables,
        table: Option<TableId>,
        c: TableChange<'_>,
    ) -> Option<&'static str> {
        let id = table?;
        match c.op {
            "truncate" => {
                let v = self.truncates.entry(id).or_insert(c.version);
                *v = (*v).max(c.version);
                return None;
            }
            "insert" | "update" | "delete" => {}
            _ => return Some("unknown op"),
        }
        if c.row_key.is_none() && c.old_key.is_none() {
            return Some("a change names no key");
        }
        // Read whole before anything is kept: a malformed row adds nothing.
        let lookups = match c.old_lookups {
            None => Vec::new(),
            Some(value) => match old_lookups(value) {
                Some(lookups) => lookups,
                None => return Some("old_lookups is not an object of text arrays"),
            },
        };
        let keys: Option<Vec<Key>> = [c.row_key, c.old_key]
            .into_iter()
            .flatten()
            .map(|parts| tables.key(id, parts))
            .collect();
        let Some(keys) = keys else {
            return Some("a key of an undeclared table");
        };
        for key in keys {
            let v = self.keys.entry(key).or_insert(c.version);
            *v = (*v).max(c.version);
        }
        for (name, parts) in lookups {
            let key = Key::new(id, &encode_lookup(name, &parts));
            let v = self.gone_lookups.entry(key).or_insert(c.version);
            *v = (*v).max(c.version);
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.gone_lookups.is_empty() && self.truncates.is_empty()
    }
}

/// One declared table's read in a batch: its statement, prepared, and the texts of its keys'
/// columns (one list per key column).
pub struct TableRead {
    id: TableId,
    table: Arc<Table>,
    statement: Statement,
    columns: Vec<Vec<String>>,
}

/// The reads of the declared tables' keys `changes` mentions, a statement per table prepared on
/// `client` now if it was not already (so that the reads themselves go out in the batch's one
/// pipelined round trip, before its COMMIT: see [`current_rows`]). A table found not to match
/// the catalog is passed over: its keys get tombstones below their change's version (see
/// `plan`). A table not checked yet fails the batch ([`CdcError::Unchecked`]: it is read again
/// once the table is checked), since passing it over would leave its lookups' copies as they were.
pub async fn prepare_reads(
    client: &Client,
    statements: &TableStatements,
    tables: &Tables,
    changes: &TableChanges,
) -> Result<Vec<TableRead>, CdcError> {
    let mut by_table: BTreeMap<TableId, (Arc<Table>, Vec<Vec<String>>)> = BTreeMap::new();
    for key in changes.keys.keys() {
        let Some(table) = tables.get(key.table()) else {
            if !tables.is_unavailable(key.table()) {
                return Err(CdcError::Unchecked(tables.name(key.table()).to_owned()));
            }
            continue;
        };
        // A key no row can have (an outbox row forged with a text its column's type never
        // prints: `x` or `99999999999` for an integer, ` 8`) is not read: its cast would fail the
        // whole read, and the table with it. Found by no read, it is dropped as a missing row is.
        if let Some((None, parts)) = table.decode_canonical(key.as_str()) {
            by_table
                .entry(key.table())
                .or_insert_with(|| (table.clone(), Vec::new()))
                .1
                .push(parts);
        }
    }
    let reads = by_table.into_iter().map(|(id, (table, keys))| async move {
        let statement = match statements.get(&table, None) {
            Some(statement) => statement,
            None => {
                let types = vec![Type::TEXT_ARRAY; table.key.len()];
                let statement = client
                    .prepare_typed(&select_sql(&table, None), &types)
                    .await
                    .map_err(|e| unreadable(tables, id, &table, e))?;
                statements.put(&table, None, statement.clone());
                statement
            }
        };
        // One list per key column, the n-th key's text at index n of each.
        let mut columns = vec![Vec::with_capacity(keys.len()); table.key.len()];
        for parts in keys {
            for (column, part) in columns.iter_mut().zip(parts) {
                column.push(part);
            }
        }
        Ok::<_, CdcError>(TableRead {
            id,
            table,
            statement,
            columns,
        })
    });
    futures::future::try_join_all(reads).await
}

/// The current rows of `reads`, read on `client` (in the batch's snapshot): every read is sent
/// when this is first polled. A table whose read fails is marked unavailable before the batch
/// fails, so that the batch read again passes it over and no other table waits on it.
pub async fn current_rows(
    client: &Client,
    tables: &Tables,
    reads: &[TableRead],
) -> Result<Vec<(Arc<Table>, Vec<TableRow>)>, CdcError> {
    let reads = reads.iter().map(|r| async move {
        let params: Vec<&(dyn ToSql + Sync)> =
            r.columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let rows = client
            .query(&r.statement, &params)
            .await
            .map_err(|e| unreadable(tables, r.id, &r.table, e))?;
        let mut read = Vec::with_capacity(rows.len());
        for row in &rows {
            match table_row(&r.table, row) {
                Ok(row) => read.push(row),
                // Treated as missing (a tombstone), as users' rows that cannot be served are.
                Err(e) => {
                    tracing::warn!(table = %r.table.name, error = %e, "cdc skipped a row that cannot be served")
                }
            }
        }
        Ok::<_, CdcError>((r.table.clone(), read))
    });
    futures::future::try_join_all(reads).await
}

/// `e`, met preparing or reading table `id`: a database error means the table no longer reads as
/// it was checked (a column dropped, the table gone), and makes it unavailable.
fn unreadable(tables: &Tables, id: TableId, table: &Table, e: tokio_postgres::Error) -> CdcError {
    if e.as_db_error().is_some() {
        tables.unavailable(id, format!("reading it failed: {e}"));
        tracing::error!(table = %table.name, error = %e, "declared table unavailable");
    }
    e.into()
}

/// Each declared table's statement reading its rows by key, prepared on the session's connection
/// when a batch first needs it (and again once the table's shape changed): a statement parsed and
/// planned for every batch costs PostgreSQL more than the read itself.
pub type TableStatements = ByShape<Statement>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change<'a>(
        op: &'a str,
        row_key: Option<&'a [String]>,
        old_key: Option<&'a [String]>,
        old_lookups: Option<&'a serde_json::Value>,
    ) -> TableChange<'a> {
        TableChange {
            op,
            row_key,
            old_key,
            old_lookups,
            version: 9,
        }
    }

    #[test]
    fn forged_rows_of_a_declared_table_are_named_and_change_nothing() {
        let tables = Tables::new(vec![("accounts".into(), false)]);
        let id = tables.id("accounts");
        let key = vec!["1".to_owned()];
        let bad_lookups = json!({"by_email": [1, 2]});
        let not_an_object = json!(["by_email"]);
        let mut changes = TableChanges::default();
        for (forged, why) in [
            (change("upsert", Some(&key), None, None), "unknown op"),
            (change("update", None, None, None), "a change names no key"),
            (
                change("delete", None, Some(&key), Some(&bad_lookups)),
                "old_lookups is not an object of text arrays",
            ),
            (
                change("delete", None, Some(&key), Some(&not_an_object)),
                "old_lookups is not an object of text arrays",
            ),
        ] {
            assert_eq!(changes.add(&tables, id, forged), Some(why));
        }
        // A table this daemon does not declare: passed over, said by the worker.
        assert_eq!(
            changes.add(&tables, None, change("truncate", None, None, None)),
            None
        );
        assert!(
            changes.is_empty(),
            "a malformed row adds nothing: {changes:?}"
        );
        // A well-formed one is kept, under its encoded key.
        let lookups = json!({"by_email": ["a:b@x"]});
        let ok = change("update", Some(&key), None, Some(&lookups));
        assert_eq!(changes.add(&tables, id, ok), None);
        let id = id.unwrap();
        assert!(changes.keys.contains_key(&Key::new(id, "1")));
        assert!(changes
            .gone_lookups
            .contains_key(&Key::new(id, "by_email=a%3Ab@x")));
    }
}
