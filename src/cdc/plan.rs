//! What a CDC batch does to Redis, decided purely from what it read: a live entry or a tombstone
//! per mentioned key (a declared table's row also writes its lookups' copies, and a lookup value
//! a row left gets a tombstone), and the fence each TRUNCATE needs.

use std::collections::{BTreeMap, HashMap};

use super::outbox::Batch;
use super::tables::TableChanges;
use crate::config::CdcMode;
use crate::model::entry::{version_below, Write};
use crate::model::key::{Key, TableId};
use crate::model::table::Table;
use crate::model::user::User;
use crate::store::pg::rows::TableRow;

/// What a batch decided to do to Redis.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// A TRUNCATE of users was seen: tombstone every entry with a version up to this.
    pub truncate: Option<i64>,
    /// TRUNCATEs of declared tables: per table, the version horizon it recorded.
    pub table_truncates: BTreeMap<TableId, i64>,
    pub writes: Vec<Write>,
}

/// The fence a TRUNCATE at version horizon `version` needs: every row it removed has a version up
/// to `version`, and every fill that read one of them read a horizon no later than it.
pub fn fence_after(version: i64) -> i64 {
    version.saturating_add(1)
}

impl Plan {
    /// The fence users' TRUNCATE needs ([`fence_after`]).
    pub fn truncate_fence(&self) -> Option<i64> {
        self.truncate.map(fence_after)
    }
}

/// The `read_at` of a batch's writes: the horizon read before its snapshot, or the highest fence
/// one of its TRUNCATEs raises if higher. The rows were read after every change of the batch
/// committed, TRUNCATEs included, so the fence they raise is not meant for them: without this,
/// a batch whose TRUNCATE of one table is followed by no new version would have its writes to
/// other tables refused and leave their old entries in place.
fn read_at_of(read_at: i64, users: Option<i64>, tables: &BTreeMap<TableId, i64>) -> i64 {
    let fences = users
        .into_iter()
        .chain(tables.values().copied())
        .map(fence_after);
    fences.fold(read_at, i64::max)
}

/// The writes for declared tables' changes: each mentioned key's current row (and its lookups'
/// copies, carrying its version), or a tombstone; a tombstone for each lookup value a row left.
/// A row whose entry is over `max_entry_bytes` is never cached: its keys get tombstones below it.
fn table_writes(
    mode: CdcMode,
    changes: &TableChanges,
    rows: &[(std::sync::Arc<Table>, Vec<TableRow>)],
    read_at: i64,
    max_entry_bytes: u64,
) -> Vec<Write> {
    let found: HashMap<(TableId, &str), &TableRow> = rows
        .iter()
        .flat_map(|(table, rows)| rows.iter().map(|r| ((table.id, r.key.as_str()), r)))
        .collect();
    let mut writes = Vec::new();
    // Lookup keys a current row holds: a lookup value that a row left is not tombstoned when a
    // row read in this snapshot (after every change of the batch) holds it now. That row may be
    // the same one, under a new key: an update of its key records the old key's lookups as left,
    // with a version that may be above the one its new key drew.
    let mut held = std::collections::HashSet::new();
    let fetched: std::collections::HashSet<TableId> = rows.iter().map(|(t, _)| t.id).collect();
    for (key, removed_version) in &changes.keys {
        let Some(row) = found.get(&(key.table(), key.as_str())) else {
            // A table not read (not served now): its row's state is unknown, so the tombstone
            // removes every older entry and lets that very version be filled.
            let version = match fetched.contains(&key.table()) {
                true => *removed_version,
                false => version_below(*removed_version),
            };
            writes.push(Write::tombstone(key.clone(), version));
            continue;
        };
        let lookups: Vec<Key> = row
            .lookups
            .iter()
            .map(|text| Key::new(key.table(), text))
            .collect();
        held.extend(lookups.iter().cloned());
        let keys = std::iter::once(key.clone()).chain(lookups);
        let entry = row.entry();
        let live = mode == CdcMode::Refresh && entry.len() as u64 <= max_entry_bytes;
        for key in keys {
            writes.push(match live {
                true => Write::Live {
                    key,
                    version: row.version,
                    json: entry.clone(),
                    read_at,
                },
                // Removes anything older than the current row, and lets it be filled.
                false => Write::tombstone(key, version_below(row.version)),
            });
        }
    }
    for (key, version) in &changes.gone_lookups {
        if !held.contains(key) {
            writes.push(Write::tombstone(key.clone(), *version));
        }
    }
    writes
}

/// Turns the names a batch mentions and their current rows (read after the horizon was `read_at`)
/// into cache writes. A name without a row gets a tombstone with the largest version the batch
/// recorded for it, which is at least the last version its removed row had.
pub fn plan(
    mode: CdcMode,
    mentioned: &BTreeMap<Key, i64>,
    rows: &[User],
    read_at: i64,
    truncate: Option<i64>,
) -> Plan {
    let found: BTreeMap<&str, &User> = rows.iter().map(|u| (u.username.as_str(), u)).collect();
    let writes = mentioned
        .iter()
        .map(
            |(key, removed_version)| match (found.get(key.as_str()), mode) {
                (Some(user), CdcMode::Refresh) => Write::live(user, read_at),
                // Removes anything older than the current row, and lets the current row be filled.
                (Some(user), CdcMode::Invalidate) => Write::below(user),
                (None, _) => Write::tombstone(key.clone(), *removed_version),
            },
        )
        .collect();
    Plan {
        truncate,
        writes,
        ..Plan::default()
    }
}

impl Plan {
    /// The plan for a batch as read.
    pub fn of(mode: CdcMode, batch: &Batch, max_entry_bytes: u64) -> Plan {
        let truncates = &batch.declared.truncates;
        let read_at = read_at_of(batch.read_at, batch.truncate, truncates);
        let mut plan = plan(mode, &batch.mentioned, &batch.rows, read_at, batch.truncate);
        plan.writes.extend(table_writes(
            mode,
            &batch.declared,
            &batch.table_rows,
            read_at,
            max_entry_bytes,
        ));
        plan.table_truncates = truncates.clone();
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_refresh_and_invalidate() {
        let user = User {
            username: "a".into(),
            version: 7,
            json: "{}".into(),
        };
        let mentioned: BTreeMap<Key, i64> = [(Key::user("a"), 7), (Key::user("gone"), 5)].into();
        let refresh = plan(
            CdcMode::Refresh,
            &mentioned,
            std::slice::from_ref(&user),
            3,
            None,
        );
        assert_eq!(
            refresh.writes,
            vec![
                Write::live(&user, 3),
                Write::tombstone(Key::user("gone"), 5)
            ]
        );
        assert_eq!(refresh.truncate_fence(), None);
        let invalidate = plan(CdcMode::Invalidate, &mentioned, &[user], 3, Some(9));
        assert_eq!(
            invalidate.truncate_fence(),
            Some(10),
            "above every removed row"
        );
        assert_eq!(invalidate.writes[0], Write::tombstone(Key::user("a"), 6));
    }

    fn accounts() -> std::sync::Arc<Table> {
        use crate::model::table::{Column, KeyType, Lookup};
        let column = |name: &str| Column {
            name: name.into(),
            kind: KeyType::Text,
        };
        std::sync::Arc::new(Table {
            id: TableId(1),
            name: "accounts".into(),
            source: "accounts".into(),
            prefix: "accounts:".into(),
            ttl_secs: 60,
            writable: true,
            key: vec![column("id")],
            lookups: vec![Lookup {
                name: "by_email".into(),
                columns: vec![column("email")],
            }],
            projection: vec![],
            types: vec![],
            timestamps: vec![],
        })
    }

    #[test]
    fn a_row_whose_key_changed_keeps_its_lookup_whatever_version_the_old_key_left_with() {
        // UPDATE accounts SET id = 11 WHERE id = 1: the new key drew 6, the old key's departure
        // (naming its lookup c@x as left) drew 7. The row holds c@x still.
        let key = |text: &str| Key::new(TableId(1), text);
        let changes = TableChanges {
            keys: [(key("11"), 6), (key("1"), 7)].into(),
            gone_lookups: [(key("by_email=c@x"), 7), (key("by_email=gone@x"), 7)].into(),
            truncates: Default::default(),
            undeclared: Default::default(),
        };
        let row = TableRow {
            key: "11".into(),
            lookups: vec!["by_email=c@x".into()],
            version: 6,
            row: "{}".into(),
        };
        let writes = table_writes(
            CdcMode::Refresh,
            &changes,
            &[(accounts(), vec![row])],
            3,
            1 << 20,
        );
        let live: Vec<&str> = writes
            .iter()
            .filter(|w| matches!(w, Write::Live { .. }))
            .map(|w| w.key().as_str())
            .collect();
        assert_eq!(live, ["11", "by_email=c@x"]);
        let tombstones: Vec<(&str, i64)> = writes
            .iter()
            .filter(|w| matches!(w, Write::Tombstone { .. }))
            .map(|w| (w.key().as_str(), w.version()))
            .collect();
        assert_eq!(
            tombstones,
            [("1", 7), ("by_email=gone@x", 7)],
            "c@x is held: no tombstone"
        );
        // Too large to cache: every key of the row is invalidated instead.
        let big = TableRow {
            key: "11".into(),
            lookups: vec!["by_email=c@x".into()],
            version: 6,
            row: "{}".into(),
        };
        let writes = table_writes(CdcMode::Refresh, &changes, &[(accounts(), vec![big])], 3, 4);
        assert!(writes.iter().all(|w| matches!(w, Write::Tombstone { .. })));
    }

    #[test]
    fn writes_of_a_batch_with_a_truncate_are_not_fenced_by_it() {
        assert_eq!(read_at_of(10, None, &Default::default()), 10);
        assert_eq!(read_at_of(10, Some(10), &Default::default()), 11);
        assert_eq!(read_at_of(10, None, &[(TableId(2), 12)].into()), 13);
    }
}
