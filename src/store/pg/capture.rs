//! The capture `cacheward migrate` installs for each declared table (sql/table_capture.sql),
//! whether it is installed as declared and fires in every session, and `migrate --prune`, which
//! drops the captures of tables no longer declared.

use std::collections::BTreeMap;

use tokio_postgres::GenericClient;

use super::tables::{quote_ident, quote_literal, TableError};
use super::DbError;
use crate::config::Config;
use crate::model::table::{Column, Table};

const CAPTURE_TEMPLATE: &str = include_str!("../../../sql/table_capture.sql");

/// `ARRAY[alias."a"::text, …]`'s elements for `columns`.
fn texts(alias: &str, columns: &[Column]) -> String {
    let parts: Vec<String> = columns
        .iter()
        .map(|c| format!("{alias}.{}::text", quote_ident(&c.name)))
        .collect();
    parts.join(", ")
}

/// What the capture stores in `key` and `lookups` of `cacheward_tables`: the key's column names
/// and each lookup's, as SQL literals. `migrate` compares them to tell an outdated capture.
fn registered(table: &Table) -> (Vec<String>, serde_json::Value) {
    let key = table.key.iter().map(|c| c.name.clone()).collect();
    let lookups: BTreeMap<&str, Vec<&str>> = table
        .lookups
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.columns.iter().map(|c| c.name.as_str()).collect(),
            )
        })
        .collect();
    (key, serde_json::json!(lookups))
}

/// The SQL that installs `table`'s capture, in schema `schema` (sql/table_capture.sql filled in).
pub fn capture_sql(table: &Table, schema: &str) -> String {
    let lookups_of = |changed_only: bool| -> String {
        if table.lookups.is_empty() {
            return "NULL::jsonb".into();
        }
        let pairs: Vec<String> = table
            .lookups
            .iter()
            .map(|l| {
                let old = format!("jsonb_build_array({})", texts("o", &l.columns));
                let value = if changed_only {
                    let cols = |alias: &str| {
                        let c: Vec<String> = l
                            .columns
                            .iter()
                            .map(|c| format!("{alias}.{}", quote_ident(&c.name)))
                            .collect();
                        format!("ROW({})", c.join(", "))
                    };
                    format!(
                        "CASE WHEN {} IS DISTINCT FROM {} THEN {old} END",
                        cols("o"),
                        cols("n")
                    )
                } else {
                    old
                };
                format!("{}, {value}", quote_literal(&l.name))
            })
            .collect();
        let object = format!("jsonb_build_object({})", pairs.join(", "));
        match changed_only {
            true => format!("jsonb_strip_nulls({object})"),
            false => object,
        }
    };
    let same_key: Vec<String> = table
        .key
        .iter()
        .map(|c| {
            let q = quote_ident(&c.name);
            format!("o.{q} = n.{q}")
        })
        .collect();
    let (key, lookups) = registered(table);
    let key_literal = format!(
        "ARRAY[{}]::text[]",
        key.iter()
            .map(|k| quote_literal(k))
            .collect::<Vec<_>>()
            .join(", ")
    );
    CAPTURE_TEMPLATE
        .replace("{{function}}", &capture_function(&table.name))
        .replace("{{schema}}", &quote_ident(schema))
        .replace("{{source_literal}}", &quote_literal(&table.source))
        .replace("{{source}}", &table.source)
        .replace("{{new_key}}", &texts("n", &table.key))
        .replace("{{old_key}}", &texts("o", &table.key))
        .replace("{{first}}", &quote_ident(&table.key[0].name))
        .replace("{{old_lookups}}", &lookups_of(false))
        .replace("{{changed_lookups}}", &lookups_of(true))
        .replace("{{same_key}}", &same_key.join(" AND "))
        .replace("{{key_literal}}", &key_literal)
        .replace(
            "{{lookups_literal}}",
            &format!("{}::jsonb", quote_literal(&lookups.to_string())),
        )
        .replace("{{name}}", &table.name)
}

/// The capture function of the table named `name` (a name of `[a-z][a-z0-9_]*`: no quoting).
fn capture_function(name: &str) -> String {
    format!("cacheward_capture__{name}")
}

/// The trigger events of a capture, as they end its triggers' names.
const EVENTS: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// The triggers named `names` on `source` (a table's name, as the search path finds it) that are
/// not there or do not fire in every session, each said with what to run; empty when all do.
/// A trigger enabled the default way does not fire where `session_replication_role` is `replica`
/// (a bulk load, pg_restore, a logical replication subscriber): a change made there would pass
/// the cache by (sql/0007_capture_always.sql).
pub async fn not_always(
    client: &impl GenericClient,
    source: &str,
    names: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let modes = modes(client, source, names).await?;
    let wrong = modes.into_iter().filter_map(|(name, enabled)| {
        let how = match enabled.as_deref() {
            Some("A") => return None,
            None => {
                return Some(format!(
                    "trigger {name} on {source} is missing (run `cacheward migrate`)"
                ))
            }
            Some("D") => "is disabled",
            Some("R") => "fires only in replica sessions",
            Some(_) => "does not fire in replica sessions (session_replication_role = replica)",
        };
        Some(format!(
            "trigger {name} on {source} {how}: ALTER TABLE {source} ENABLE ALWAYS TRIGGER {name}"
        ))
    });
    Ok(wrong.collect())
}

/// Users' capture triggers ([`USERS_TRIGGERS`]) that do not fire in an ordinary session: missing,
/// disabled, or enabled for replica sessions only; or the table itself, missing (renamed or
/// dropped: what the cache holds of it is no table's any more). Changes made meanwhile pass the
/// cache by.
pub async fn users_not_firing(
    client: &impl GenericClient,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let exists = client
        .query_one("SELECT to_regclass('users') IS NOT NULL", &[])
        .await?;
    if !exists.get::<_, bool>(0) {
        return Ok(vec!["table users is missing".to_owned()]);
    }
    let names = USERS_TRIGGERS.map(String::from);
    let modes = modes(client, "users", &names).await?;
    let off = modes.into_iter().filter_map(|(name, enabled)| {
        let how = match enabled.as_deref() {
            None => "is missing",
            Some("D") => "is disabled",
            Some("R") => "fires only in replica sessions",
            Some(_) => return None,
        };
        Some(format!("trigger {name} on users {how}"))
    });
    Ok(off.collect())
}

/// How each trigger named `names` on `source` is enabled (`pg_trigger.tgenabled`: `O` origin and
/// local sessions, `A` always, `R` replica sessions, `D` never), `None` for one that is not there.
async fn modes(
    client: &impl GenericClient,
    source: &str,
    names: &[String],
) -> Result<Vec<(String, Option<String>)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.name, g.tgenabled::text
             FROM unnest($2::text[]) AS n(name)
             LEFT JOIN pg_trigger g ON g.tgrelid = $1::text::regclass AND g.tgname = n.name",
            &[&source, &names],
        )
        .await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The triggers of users' version and capture (sql/0001_users.sql, sql/0002_cdc.sql), which
/// sql/0007_capture_always.sql makes fire in every session as [`triggers`] are.
pub const USERS_TRIGGERS: [&str; 5] = [
    "cacheward_users_version",
    "cacheward_capture_insert",
    "cacheward_capture_update",
    "cacheward_capture_delete",
    "cacheward_capture_truncate",
];

/// The names of the capture triggers of the table named `name`.
pub fn triggers(name: &str) -> Vec<String> {
    EVENTS
        .iter()
        .map(|e| format!("cacheward_{name}_{e}"))
        .collect()
}

/// Whether `table`'s capture is installed as it is declared now: registered for the same table
/// and keys, its four triggers in place and firing for the application's sessions (a trigger
/// disabled, or enabled for replica sessions only, lets their changes pass the cache by). Says
/// what differs when not.
pub async fn installed(client: &impl GenericClient, table: &Table) -> Result<(), TableError> {
    let db = |source: tokio_postgres::Error| TableError::Db {
        table: table.name.clone(),
        source: DbError::from_driver("read the capture", source),
    };
    let missing = |detail: String| TableError::NotInstalled {
        table: table.name.clone(),
        detail,
    };
    let (key, lookups) = registered(table);
    let row = client
        .query_opt(
            "SELECT t.source = $2::text::regclass::oid, t.key = $3, t.lookups = $4::text::jsonb,
                    (SELECT count(*) FROM pg_trigger g
                     WHERE g.tgrelid = $2::text::regclass AND g.tgname = ANY($5) AND g.tgenabled IN ('O', 'A'))
             FROM cacheward_tables t WHERE t.name = $1",
            &[
                &table.name,
                &table.source,
                &key,
                &lookups.to_string(),
                &triggers(&table.name),
            ],
        )
        .await;
    let row = match row {
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Err(missing(" (the schema predates declared tables)".into()))
        }
        other => other.map_err(db)?,
    };
    let Some(row) = row else {
        return Err(missing(String::new()));
    };
    let (same_source, same_key, same_lookups, triggers): (bool, bool, bool, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !same_source {
        return Err(missing(format!(" on {}", table.source)));
    }
    if !same_key || !same_lookups {
        return Err(missing(" for its key and lookups as declared now".into()));
    }
    if triggers != EVENTS.len() as i64 {
        return Err(missing(format!(
            " ({triggers} of its {} triggers are there and firing)",
            EVENTS.len()
        )));
    }
    Ok(())
}

/// Installs (or brings up to date) the capture of every table in `tables`; returns the names of
/// those it installed: a capture already installed as declared is left alone.
pub async fn install(
    client: &mut tokio_postgres::Client,
    tables: &[Table],
) -> Result<Vec<String>, TableError> {
    let mut done = Vec::new();
    for table in tables {
        if installed(&*client, table).await.is_ok() {
            continue;
        }
        let db = |source: tokio_postgres::Error| TableError::Db {
            table: table.name.clone(),
            source: DbError::from_driver("install the capture", source),
        };
        let tx = client.transaction().await.map_err(db)?;
        let schema: String = tx
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(db)?
            .get(0);
        // A capture made for another source or key first leaves that table alone.
        drop_capture(&tx, &table.name).await?;
        tx.batch_execute(&capture_sql(table, &schema))
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        done.push(table.name.clone());
    }
    Ok(done)
}

/// Drops the capture registered as `name`: its triggers (if its table is still there), its
/// function, its versions and its registration.
async fn drop_capture(client: &impl GenericClient, name: &str) -> Result<(), TableError> {
    let db = |source: tokio_postgres::Error| TableError::Db {
        table: name.to_owned(),
        source: DbError::from_driver("drop the capture", source),
    };
    let source: Option<String> = client
        .query_opt(
            "SELECT format('%I.%I', n.nspname, c.relname)
             FROM cacheward_tables t JOIN pg_class c ON c.oid = t.source
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.name = $1",
            &[&name],
        )
        .await
        .map_err(db)?
        .map(|r| r.get(0));
    let registered: bool = client
        .query_one(
            "SELECT EXISTS (SELECT FROM cacheward_tables WHERE name = $1)",
            &[&name],
        )
        .await
        .map_err(db)?
        .get(0);
    if !registered {
        // Nothing installed under this name (a first install): nothing to drop.
        return Ok(());
    }
    let mut sql = String::new();
    if let Some(source) = source {
        for event in EVENTS {
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS cacheward_{name}_{event} ON {source};\n"
            ));
        }
    }
    sql.push_str(&format!(
        "DROP FUNCTION IF EXISTS {}();\n\
         DELETE FROM cacheward_row_versions WHERE tbl = {lit};\n\
         DELETE FROM cacheward_tables WHERE name = {lit};\n",
        capture_function(name),
        lit = quote_literal(name)
    ));
    client.batch_execute(&sql).await.map_err(db)
}

/// `migrate --prune`: drops the captures of tables that are installed but no longer declared.
/// Returns their names.
pub async fn prune(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<String>, TableError> {
    let installed: Vec<String> = client
        .query("SELECT name FROM cacheward_tables ORDER BY name", &[])
        .await
        .map_err(|e| TableError::Db {
            table: "(any)".into(),
            source: DbError::from_driver("list the captures", e),
        })?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut pruned = Vec::new();
    for name in installed {
        if config.tables.contains_key(&name) {
            continue;
        }
        let tx = client.transaction().await.map_err(|e| TableError::Db {
            table: name.clone(),
            source: DbError::from_driver("drop the capture", e),
        })?;
        drop_capture(&tx, &name).await?;
        tx.commit().await.map_err(|e| TableError::Db {
            table: name.clone(),
            source: DbError::from_driver("drop the capture", e),
        })?;
        pruned.push(name);
    }
    Ok(pruned)
}

/// Names of installed captures that the configuration no longer declares (left in place until
/// `migrate --prune`).
pub async fn undeclared(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Vec<String>, DbError> {
    let names: Vec<String> = client
        .query("SELECT name FROM cacheward_tables ORDER BY name", &[])
        .await
        .map_err(|e| DbError::from_driver("list the captures", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(names
        .into_iter()
        .filter(|n| !config.tables.contains_key(n))
        .collect())
}
