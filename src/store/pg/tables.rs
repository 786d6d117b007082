//! Declared tables in the catalog: each `[tables.NAME]` section checked against what PostgreSQL
//! has (the table, its unique keys, its columns) and compiled into a [`Table`]. The capture
//! `cacheward migrate` installs for each is the `capture` room's.

use tokio_postgres::GenericClient;

use super::DbError;
use crate::config::{Config, TableConfig};
use crate::model::key::TableId;
use crate::model::table::{Column, KeyType, Lookup, Table};

/// Why a declared table cannot be served: names the table and the configuration key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("table {table}: `tables.{table}.{key}`: {reason}")]
    Config {
        table: String,
        key: String,
        reason: String,
    },
    #[error("table {table}: its capture is not installed{detail}: run `cacheward migrate`")]
    NotInstalled { table: String, detail: String },
    #[error("table {table}: {source}")]
    Db {
        table: String,
        #[source]
        source: DbError,
    },
}

impl TableError {
    fn config(table: &str, key: &str, reason: impl Into<String>) -> TableError {
        TableError::Config {
            table: table.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A column as the catalog has it.
struct CatalogColumn {
    name: String,
    typname: String,
    not_null: bool,
}

/// A unique index usable as a key: immediate, total (no predicate, no expression).
struct UniqueKey {
    columns: Vec<String>,
}

/// Everything the checks need to know of one table.
struct Catalog {
    /// `schema.table`, quoted.
    qualified: String,
    columns: Vec<CatalogColumn>,
    keys: Vec<UniqueKey>,
}

async fn catalog(
    client: &impl GenericClient,
    name: &str,
    source: &str,
) -> Result<Catalog, TableError> {
    let db = |source: tokio_postgres::Error| TableError::Db {
        table: name.to_owned(),
        source: DbError::from_driver("read the catalog", source),
    };
    let found = client
        .query_opt(
            "SELECT c.oid, format('%I.%I', n.nspname, c.relname), c.relkind::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass($1)",
            &[&source],
        )
        .await
        .map_err(db)?;
    let Some(row) = found else {
        return Err(TableError::config(
            name,
            "source",
            format!("no table {source:?} (as the search_path resolves it)"),
        ));
    };
    let (oid, qualified, relkind): (u32, String, String) = (row.get(0), row.get(1), row.get(2));
    if relkind != "r" && relkind != "p" {
        return Err(TableError::config(
            name,
            "source",
            format!("{qualified} is not a table (a view or another relation)"),
        ));
    }
    let columns = client
        .query(
            "SELECT a.attname::text, t.typname::text, a.attnotnull
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| CatalogColumn {
            name: r.get(0),
            typname: r.get(1),
            not_null: r.get(2),
        })
        .collect();
    let keys = client
        .query(
            "SELECT ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) k
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k)
             FROM pg_index i
             WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indimmediate
               AND i.indpred IS NULL AND i.indexprs IS NULL",
            &[&oid],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| UniqueKey { columns: r.get(0) })
        .collect();
    Ok(Catalog {
        qualified,
        columns,
        keys,
    })
}

/// The key or lookup `columns` (configured at `key`) as a unique key of `catalog`.
fn key_columns(
    name: &str,
    key: &str,
    columns: &[String],
    catalog: &Catalog,
) -> Result<Vec<Column>, TableError> {
    let mut out = Vec::with_capacity(columns.len());
    for column in columns {
        let Some(found) = catalog.columns.iter().find(|c| &c.name == column) else {
            return Err(TableError::config(
                name,
                key,
                format!("{} has no column {column:?}", catalog.qualified),
            ));
        };
        if !found.not_null {
            return Err(TableError::config(
                name,
                key,
                format!("column {column:?} may be NULL: a key's columns must be NOT NULL"),
            ));
        }
        let Some(kind) = KeyType::of(&found.typname) else {
            return Err(TableError::config(
                name,
                key,
                format!(
                    "column {column:?} is of type {}: a key's columns must be {}",
                    found.typname,
                    KeyType::ALLOWED
                ),
            ));
        };
        out.push(Column {
            name: column.clone(),
            kind,
        });
    }
    let unique = catalog
        .keys
        .iter()
        .any(|k| k.columns.len() == columns.len() && k.columns.iter().all(|c| columns.contains(c)));
    if !unique {
        return Err(TableError::config(
            name,
            key,
            format!(
                "{columns:?} is not the primary key nor a unique constraint of {} (immediate, \
                 without a predicate)",
                catalog.qualified
            ),
        ));
    }
    Ok(out)
}

/// Checks `config`'s section `name` against the catalog and compiles it.
pub async fn resolve(
    client: &impl GenericClient,
    name: &str,
    table: &TableConfig,
    config: &Config,
) -> Result<Table, TableError> {
    let source = table.source(name);
    let catalog = catalog(client, name, &source).await?;
    let key = key_columns(name, "key", &table.key, &catalog)?;
    let mut lookups = Vec::with_capacity(table.lookups.len());
    for (lookup, columns) in &table.lookups {
        let at = format!("lookups.{lookup}");
        lookups.push(Lookup {
            name: lookup.clone(),
            columns: key_columns(name, &at, columns, &catalog)?,
        });
    }
    let named = table.columns.iter().flatten().chain(&table.exclude);
    for column in named {
        if !catalog.columns.iter().any(|c| &c.name == column) {
            let at = if table.columns.is_some() {
                "columns"
            } else {
                "exclude"
            };
            return Err(TableError::config(
                name,
                at,
                format!("{} has no column {column:?}", catalog.qualified),
            ));
        }
    }
    let projected: Vec<&CatalogColumn> = catalog
        .columns
        .iter()
        .filter(|c| match &table.columns {
            Some(kept) => kept.contains(&c.name),
            None => !table.exclude.contains(&c.name),
        })
        .collect();
    let projection = projected.iter().map(|c| c.name.clone()).collect();
    let types = projected.iter().map(|c| c.typname.clone()).collect();
    let timestamps = projected
        .iter()
        .filter_map(|c| match c.typname.as_str() {
            "timestamptz" => Some((c.name.clone(), true)),
            "timestamp" => Some((c.name.clone(), false)),
            _ => None,
        })
        .collect();
    let position = config.tables.keys().position(|n| n == name);
    let id = TableId(position.map_or(0, |p| p as u16 + 1));
    Ok(Table {
        id,
        name: name.to_owned(),
        source: catalog.qualified,
        prefix: table.prefix(name),
        ttl_secs: table.ttl_secs.unwrap_or(config.cache.ttl_secs),
        writable: table.writable,
        key,
        lookups,
        projection,
        types,
        timestamps,
    })
}

/// Every declared table, checked and compiled, in name order.
pub async fn resolve_all(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Vec<Table>, TableError> {
    let mut tables = Vec::with_capacity(config.tables.len());
    for (name, section) in &config.tables {
        tables.push(resolve(client, name, section, config).await?);
    }
    Ok(tables)
}

/// An identifier quoted as SQL needs it.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal.
pub(super) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
