//! `cacheward verify`: compares every cached entry (users' and every declared table's, their
//! lookups' included) with its row, in SCAN-sized batches so that a live system is never blocked,
//! and reports the entries that differ or whose row is gone; with `--repair`, drops each of them
//! as the live consistency checker does, so that the next read fills it from its row.

use std::time::Duration;

use crate::config::Config;
use crate::model::entry::{is_live, is_ours, live_version, same_json, version_below};
use crate::model::key::{Key, TableId};
use crate::model::table::Table;
use crate::store::pg::rows::{select_sql, table_row};
use crate::store::pg::tables;
use crate::store::redis::{Cache, Stored};
use tokio_postgres::types::Type;

use crate::model::user::User;
use crate::store::pg::{self as db, connect};

/// A cached entry that does not match the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub key: String,
    pub cached: String,
    /// The row's JSON, or `None` when no row has that username.
    pub row: Option<String>,
    /// With `--repair`: whether the entry was dropped (`false`: it changed since it was compared,
    /// and was left as it is now).
    pub repaired: Option<bool>,
}

/// What a verification found.
#[derive(Debug, Default)]
pub struct Report {
    /// Live entries compared.
    pub checked: u64,
    pub mismatches: Vec<Mismatch>,
    /// Keys under the prefix holding values that are not cacheward's (left alone).
    pub foreign: Vec<String>,
}

/// How long to wait before looking again at a suspect entry: a change in flight (a write between
/// its database and Redis steps, a CDC batch) settles well within it.
const RECHECK_AFTER: Duration = Duration::from_millis(1500);

/// Compares every live entry under the prefix with its row. Differences are checked a second time
/// after [`RECHECK_AFTER`], and only those that persist are reported; with `repair`, each is then
/// dropped (see [`repair`]).
pub async fn verify(config: &Config, repair: bool) -> anyhow::Result<Report> {
    let cache = Cache::new(config)?;
    let client = connect::pg_target(config)?.connect().await?;
    let declared = tables::resolve_all(&client, config).await?;
    let mut report = Report::default();
    let mut suspects: Vec<Key> = Vec::new();
    let all = std::iter::once(TableId::USERS).chain(declared.iter().map(|t| t.id));
    for table in all {
        let mut scan = cache.scan_table(table);
        while let Some(names) = scan.next_page().await? {
            let (checked, found, foreign) = compare(&cache, &client, &declared, names).await?;
            report.checked += checked;
            suspects.extend(found.into_iter().map(|(key, _)| key));
            report
                .foreign
                .extend(foreign.iter().map(|key| cache.redis_key(key)));
        }
    }
    if !suspects.is_empty() {
        tokio::time::sleep(RECHECK_AFTER).await;
        let found = compare(&cache, &client, &declared, suspects).await?.1;
        for (key, mut m) in found {
            if repair {
                m.repaired = Some(self::repair(&cache, &client, &key, &m).await?);
            }
            m.key = cache.redis_key(&key);
            report.mismatches.push(m);
        }
    }
    Ok(report)
}

/// Drops the entry of `key` that `m` found wrong, as the live consistency checker does: replaced
/// by a tombstone one below its row's version (with no row, or one that cannot be served, at a
/// fresh horizon), unless it changed since; the next read fills it from its row. Whatever
/// version the wrong entry claims (one no row has, written around cacheward, included). Returns
/// whether it was dropped.
async fn repair(
    cache: &Cache,
    client: &tokio_postgres::Client,
    key: &Key,
    m: &Mismatch,
) -> anyhow::Result<bool> {
    let version = match m.row.as_deref().and_then(live_version) {
        Some(version) => version_below(version),
        None => client.query_one(db::FRESH_HORIZON, &[]).await?.get(0),
    };
    Ok(cache.replace_wrong(key, &m.cached, version).await?)
}

/// The rows of declared tables' `keys` (each live, with its cached value): per key, the entry its
/// row has now (`None`: no row).
async fn table_rows(
    client: &tokio_postgres::Client,
    declared: &[Table],
    keys: &[&Key],
) -> anyhow::Result<Vec<Option<String>>> {
    let mut out = vec![None; keys.len()];
    for table in declared {
        for lookup in std::iter::once(None).chain(table.lookups.iter().map(Some)) {
            let mine: Vec<(usize, Vec<String>)> = keys
                .iter()
                .enumerate()
                .filter(|(_, k)| k.table() == table.id)
                // A key whose values no row can hold (`x` for an integer) names no row: read,
                // its cast would fail the whole query.
                .filter_map(|(i, k)| match table.decode_canonical(k.as_str()) {
                    Some((by, parts)) if by == lookup => Some((i, parts)),
                    _ => None,
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            let width = lookup.map_or(table.key.len(), |l| l.columns.len());
            let columns: Vec<Vec<&str>> = (0..width)
                .map(|c| mine.iter().map(|(_, p)| p[c].as_str()).collect())
                .collect();
            let params: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> = columns
                .iter()
                .map(|c| {
                    (
                        c as &(dyn tokio_postgres::types::ToSql + Sync),
                        Type::TEXT_ARRAY,
                    )
                })
                .collect();
            let rows = client
                .query_typed(&select_sql(table, lookup), &params)
                .await?;
            let mut by_text = std::collections::HashMap::new();
            for row in &rows {
                let row = table_row(table, row)?;
                let text = match lookup {
                    None => row.key.clone(),
                    Some(l) => {
                        let at = table.lookups.iter().position(|m| m == l).unwrap_or(0);
                        row.lookups[at].clone()
                    }
                };
                by_text.insert(text, row.entry());
            }
            for (i, _) in mine {
                out[i] = by_text.get(keys[i].as_str()).cloned();
            }
        }
    }
    Ok(out)
}

/// A live entry's key and its cached value.
type Cached = (Key, String);

/// Compares the entries of `names`; returns how many were live, those that differ (with their
/// key), and those holding a value that is not cacheward's.
async fn compare(
    cache: &Cache,
    client: &tokio_postgres::Client,
    declared: &[Table],
    names: Vec<Key>,
) -> anyhow::Result<(u64, Vec<(Key, Mismatch)>, Vec<Key>)> {
    let values = cache.get_raw(&names).await?;
    let foreign: Vec<Key> = names
        .iter()
        .zip(&values)
        .filter(|(_, value)| match value {
            Stored::String(v) => !is_ours(v),
            Stored::Other => true,
            Stored::Missing => false,
        })
        .map(|(name, _)| name.clone())
        .collect();
    let live: Vec<(Key, String)> = names
        .into_iter()
        .zip(values)
        .filter_map(|(name, value)| match value {
            Stored::String(v) if is_live(&v) => Some((name, v)),
            _ => None,
        })
        .collect();
    let (cached_users, rows): (Vec<&Cached>, Vec<&Cached>) =
        live.iter().partition(|(k, _)| k.is_user());
    let row_keys: Vec<&Key> = rows.iter().map(|(k, _)| k).collect();
    let now = table_rows(client, declared, &row_keys).await?;
    let mut mismatches = Vec::new();
    for ((key, cached), row) in rows.iter().zip(now) {
        if !row.as_ref().is_some_and(|r| same_json(r, cached)) {
            let m = Mismatch {
                key: key.to_string(),
                cached: cached.clone(),
                row,
                repaired: None,
            };
            mismatches.push((key.clone(), m));
        }
    }
    let wanted: Vec<&str> = cached_users.iter().map(|(n, _)| n.as_str()).collect();
    // Unnamed (parse, bind, execute at once): works through a transaction-mode pooler too.
    let rows = client
        .query_typed(db::FIND_USERS, &[(&wanted, Type::TEXT_ARRAY)])
        .await?;
    let mut by_name = std::collections::HashMap::new();
    let (users, broken) = User::from_rows(&rows);
    for user in users {
        by_name.insert(user.username, user.json);
    }
    // A cached entry for a row that cannot be served is a mismatch: say why.
    for e in broken {
        if let Some(name) = e.username.clone() {
            by_name.insert(name, e.to_string());
        }
    }
    for (name, cached) in cached_users {
        let row = by_name.get(name.as_str());
        let same = row.is_some_and(|r| same_json(r, cached));
        if !same {
            let m = Mismatch {
                key: name.to_string(),
                cached: cached.clone(),
                row: row.cloned(),
                repaired: None,
            };
            mismatches.push((name.clone(), m));
        }
    }
    Ok((live.len() as u64, mismatches, foreign))
}

/// Text fit for a terminal: control characters (an ESC or BEL in a username could retitle or
/// recolour the operator's terminal) are written as `\u{..}` escapes.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(printable("user:\u{1b}]0;x\u{7}"), "user:\\u{1b}]0;x\\u{7}");
        assert_eq!(printable("ok ñ"), "ok ñ");
    }
}
