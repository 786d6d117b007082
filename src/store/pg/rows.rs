//! Reading a declared table's rows: by key or by lookup, many at once, each with its version
//! (from `cacheward_row_versions`; 0 for a row no change has touched since the table was
//! declared) and its ROW JSON, after the version horizon (their `read_at`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

use super::tables::quote_ident;
use super::{query_after_horizon, Db, DbError, DbErrorKind};
use crate::model::key::TableId;
use crate::model::table::{Column, Lookup, Table};
use crate::model::user::normalize_timestamps;

/// One row of a declared table as read: the key texts it is cached under and its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRow {
    /// The text of its key (what follows the prefix).
    pub key: String,
    /// The text of each lookup's key, in the table's lookup order.
    pub lookups: Vec<String>,
    pub version: i64,
    /// ROW: the projected columns as a JSON object.
    pub row: String,
}

impl TableRow {
    /// The entry stored in Redis and answered: `{"version":N,"row":ROW}`.
    pub fn entry(&self) -> String {
        format!(r#"{{"version":{},"row":{}}}"#, self.version, self.row)
    }
}

/// What a read of several keys of one table found.
#[derive(Debug)]
pub struct FoundRows {
    pub rows: Vec<TableRow>,
    /// The version horizon read before the rows.
    pub read_at: i64,
}

/// `ARRAY[t."a"::text, …]` of `columns`.
fn text_array(columns: &[Column]) -> String {
    let parts: Vec<String> = columns
        .iter()
        .map(|c| format!("t.{}::text", quote_ident(&c.name)))
        .collect();
    format!("ARRAY[{}]", parts.join(", "))
}

/// The statement reading `table`'s rows by its key (`by` = None) or by a lookup: one `text[]`
/// parameter per column of that key, the n-th key being the n-th element of each.
pub fn select_sql(table: &Table, by: Option<&Lookup>) -> String {
    let columns = by.map_or(&table.key, |l| &l.columns);
    let wanted: Vec<String> = columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(&c.name)))
        .collect();
    let given: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("u.c{i}::{}", c.kind.sql()))
        .collect();
    let unnest: Vec<String> = (1..=columns.len())
        .map(|i| format!("${i}::text[]"))
        .collect();
    let names: Vec<String> = (0..columns.len()).map(|i| format!("c{i}")).collect();
    let filter = format!(
        "({}) IN (SELECT {} FROM unnest({}) AS u({}))",
        wanted.join(", "),
        given.join(", "),
        unnest.join(", "),
        names.join(", "),
    );
    select_where(table, &filter)
}

/// [`select_sql`] for one key: one `text` parameter per column, compared by equality (the plan
/// a single cold key takes, cheaper than the set's semi-join).
pub fn select_one_sql(table: &Table, by: Option<&Lookup>) -> String {
    select_where(table, &key_match(by.map_or(&table.key, |l| &l.columns), 1))
}

/// `t."a" = $n::type AND …` for `columns`, their parameters from `$first` on.
pub(super) fn key_match(columns: &[Column], first: usize) -> String {
    let parts: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "t.{} = ${}::text::{}",
                quote_ident(&c.name),
                first + i,
                c.kind.sql()
            )
        })
        .collect();
    parts.join(" AND ")
}

/// The rows of `table` that `filter` (over `t`) selects, each with its version, key texts, ROW and
/// lookups' texts, as [`table_row`] reads them.
fn select_where(table: &Table, filter: &str) -> String {
    let projected: Vec<String> = table
        .projection
        .iter()
        .map(|c| format!("t.{}", quote_ident(c)))
        .collect();
    let lookups: Vec<String> = table
        .lookups
        .iter()
        .map(|l| format!(", {}", text_array(&l.columns)))
        .collect();
    format!(
        "SELECT coalesce(v.version, 0), {key}, \
                (SELECT row_to_json(p) FROM (SELECT {projected}) p)::text{lookups} \
         FROM {source} t \
         LEFT JOIN cacheward_row_versions v ON v.tbl = '{name}' AND v.key = {key} \
         WHERE {filter}",
        key = text_array(&table.key),
        projected = projected.join(", "),
        lookups = lookups.concat(),
        source = table.source,
        name = table.name,
    )
}

/// The texts of `table`'s lookups' keys for a row whose lookups' column texts (one `text[]` per
/// lookup) are its columns from `first` on.
pub(super) fn lookup_texts(table: &Table, row: &Row, first: usize) -> Vec<String> {
    table
        .lookups
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let values: Vec<String> = row.get(first + i);
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            crate::model::table::encode_lookup(&l.name, &values)
        })
        .collect()
}

/// A row selected by [`select_sql`].
pub fn table_row(table: &Table, row: &Row) -> Result<TableRow, DbError> {
    let broken = |what: String| {
        DbError::said(
            DbErrorKind::Row,
            format!("a row of table {} cannot be served: {what}", table.name),
        )
    };
    let version: i64 = row.get(0);
    let key: Vec<String> = row.get(1);
    let json: String = row.get(2);
    let timestamps = table.timestamps.iter().map(|(c, z)| (c.as_str(), *z));
    let row_json = normalize_timestamps(&json, timestamps).map_err(broken)?;
    let keys: Vec<&str> = key.iter().map(String::as_str).collect();
    let lookups = lookup_texts(table, row, 3);
    Ok(TableRow {
        key: table.key_text(&keys),
        lookups,
        version,
        row: row_json,
    })
}

/// Values built for a declared table's shape, by its key (`None`) or by the lookup at an index:
/// kept until the table is checked again after a change (another `Arc`), so that what depends
/// only on the shape (a statement's text, a prepared statement) is not built at every read.
pub struct ByShape<V>(Mutex<HashMap<Read, (Arc<Table>, V)>>);

/// A table's read: by its key (`None`) or by the lookup at an index.
type Read = (TableId, Option<usize>);

impl<V> Default for ByShape<V> {
    fn default() -> Self {
        ByShape(Mutex::default())
    }
}

impl<V: Clone> ByShape<V> {
    /// The value kept for `table`'s shape, if any.
    pub fn get(&self, table: &Arc<Table>, lookup: Option<usize>) -> Option<V> {
        let kept = self.0.lock().expect("not poisoned");
        match kept.get(&(table.id, lookup)) {
            Some((shape, value)) if Arc::ptr_eq(shape, table) => Some(value.clone()),
            _ => None,
        }
    }

    /// Keeps `value` for `table`'s shape (replacing what an older shape had).
    pub fn put(&self, table: &Arc<Table>, lookup: Option<usize>, value: V) {
        let mut kept = self.0.lock().expect("not poisoned");
        kept.insert((table.id, lookup), (table.clone(), value));
    }
}

/// The statements reading a table's rows by one read's columns: [`select_sql`] for a set of
/// keys, [`select_one_sql`] for one.
pub type Selects = [Arc<str>; 2];

/// [`Selects`] of `table` by its key or by the lookup at index `lookup`, kept in `built`.
pub fn select_sql_of(
    built: &ByShape<Selects>,
    table: &Arc<Table>,
    lookup: Option<usize>,
) -> Selects {
    built.get(table, lookup).unwrap_or_else(|| {
        let by = lookup.map(|l| &table.lookups[l]);
        let sql: Selects = [
            select_sql(table, by).into(),
            select_one_sql(table, by).into(),
        ];
        built.put(table, lookup, sql.clone());
        sql
    })
}

impl Db {
    /// The rows of `table` whose key (or the lookup at index `lookup`) is one of `keys` (each the
    /// columns' texts), in one query, after the version horizon.
    pub async fn find_rows(
        &self,
        table: &Arc<Table>,
        lookup: Option<usize>,
        keys: &[Vec<String>],
    ) -> Result<FoundRows, DbError> {
        let [set, one] = select_sql_of(&self.selects, table, lookup);
        let by = lookup.map(|l| &table.lookups[l]);
        let width = by.map_or(table.key.len(), |l| l.columns.len());
        let columns: Vec<Vec<&str>> = (0..width)
            .map(|i| keys.iter().map(|k| k[i].as_str()).collect())
            .collect();
        self.bounded("select rows", async {
            let client = self.pool.get().await?;
            // One key (a single cold get, the common case) by equality; more as a set.
            let (sql, params): (&str, Vec<(&(dyn ToSql + Sync), Type)>) = match keys {
                [key] => (
                    &one,
                    key.iter()
                        .map(|c| (c as &(dyn ToSql + Sync), Type::TEXT))
                        .collect(),
                ),
                _ => (
                    &set,
                    columns
                        .iter()
                        .map(|c| (c as &(dyn ToSql + Sync), Type::TEXT_ARRAY))
                        .collect(),
                ),
            };
            let (rows, read_at) = query_after_horizon(&client, &self.target, sql, &params).await?;
            let rows = rows
                .iter()
                .map(|r| table_row(table, r))
                .collect::<Result<_, _>>()?;
            Ok(FoundRows { rows, read_at })
        })
        .await
    }
}
