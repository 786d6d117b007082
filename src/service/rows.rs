//! Declared tables on the read path: cold keys read from the database, grouped by table and by
//! the key or lookup they name (one query per group), and the fill that caches what was found.
//! A lookup's entry is a copy of the row's entry, carrying the same version: it is applied by the
//! same versioned write as any entry, so it never holds a row older than a completed change says.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;

use super::{db_result, Service, ServiceError, Source};
use crate::model::entry::Write;
use crate::model::key::{Key, TableId};
use crate::store::pg::rows::TableRow;

/// Per key: the entry JSON found (`None`: no such row), where from; or why it failed.
pub(super) type Answer = Result<Option<(String, Source)>, ServiceError>;

/// Keys asked for, by table and lookup (`None`: the table's key): each one's position among the
/// keys and its columns' texts.
type Groups = BTreeMap<(TableId, Option<usize>), Vec<(usize, Vec<String>)>>;

impl Service {
    /// Reads `keys` (declared tables' only) from the database: one answer per key, and the
    /// writes that fill Redis with the rows found (rows over `cache.max_entry_bytes` are answered,
    /// never cached).
    pub(super) async fn read_rows(&self, keys: &[&Key]) -> (Vec<Answer>, Vec<Write>) {
        let mut answers: Vec<Answer> = vec![Ok(None); keys.len()];
        let mut writes = Vec::new();
        let mut groups: Groups = BTreeMap::new();
        for (i, key) in keys.iter().enumerate() {
            let Some(table) = self.tables.get(key.table()) else {
                let name = self.tables.name(key.table()).to_owned();
                answers[i] = Err(ServiceError::TableUnavailable(name));
                continue;
            };
            // A text that no key of the table encodes to names no row, nor one whose values no
            // row can hold (a Redis key written around the daemon, `x` for an integer, which the
            // consistency checker samples): read, its cast would fail its whole group.
            if let Some((lookup, parts)) = table.decode_canonical(key.as_str()) {
                let at = lookup.and_then(|l| table.lookups.iter().position(|m| m == l));
                groups
                    .entry((key.table(), at))
                    .or_default()
                    .push((i, parts));
            }
        }
        for ((id, lookup), members) in groups {
            let table = self.tables.get(id).expect("checked above");
            let (members, wanted): (Vec<usize>, Vec<Vec<String>>) = members.into_iter().unzip();
            self.stats.db_queries.fetch_add(1, Relaxed);
            let found = match db_result(
                self.db.find_rows(&table, lookup, &wanted).await,
                &self.health,
            ) {
                Ok(found) => found,
                Err(e) => {
                    for &i in &members {
                        answers[i] = Err(e.clone());
                    }
                    continue;
                }
            };
            let by_text: HashMap<&str, &TableRow> = found
                .rows
                .iter()
                .map(|row| match lookup {
                    None => (row.key.as_str(), row),
                    Some(l) => (row.lookups[l].as_str(), row),
                })
                .collect();
            for &i in &members {
                let key = keys[i];
                let Some(row) = by_text.get(key.as_str()) else {
                    continue;
                };
                let entry = row.entry();
                if entry.len() as u64 <= self.max_entry_bytes {
                    writes.push(Write::Live {
                        key: key.clone(),
                        version: row.version,
                        json: entry.clone(),
                        read_at: found.read_at,
                    });
                } else {
                    self.stats.rows_too_large.fetch_add(1, Relaxed);
                }
                answers[i] = Ok(Some((entry, Source::Db)));
            }
        }
        (answers, writes)
    }
}
