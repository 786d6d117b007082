//! The declared tables a daemon serves and captures: their names as configured (which
//! [`TableId`] each has, and how their key texts are encoded) and, once checked against the
//! catalog, their compiled [`Table`]. The request path and the CDC worker share one.

use std::sync::{Arc, OnceLock, RwLock};

use super::key::{Key, TableId};
use super::table::{encode_key, Column, KeyType, Lookup, Table};

#[derive(Default)]
pub struct Tables {
    /// The declared names in [`TableId`] order from 1.
    names: Vec<String>,
    /// Whether each one's one-column key text is kept as it is (it has no lookups).
    plain: Vec<bool>,
    /// Each one's state, at the same index.
    checked: RwLock<Vec<Slot>>,
}

/// Where a declared table stands.
#[derive(Debug, Clone, Default)]
enum Slot {
    /// Not checked against the catalog yet.
    #[default]
    Unchecked,
    /// Checked, compiled: served.
    Ready(Arc<Table>),
    /// It stopped matching the catalog while the daemon ran (dropped, a key column gone, its
    /// capture removed): why.
    Unavailable(String),
}

/// Why a table named in a request cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableLookup {
    /// No such table is declared.
    Unknown,
    /// Declared, not checked against the catalog yet.
    Unchecked,
    /// Declared, but it no longer matches the catalog: why.
    Unavailable(String),
}

impl Tables {
    /// The tables declared as `(name, has no lookups)`, in [`TableId`] order (the
    /// configuration's order).
    pub fn new(declared: Vec<(String, bool)>) -> Tables {
        let checked = RwLock::new(vec![Slot::Unchecked; declared.len()]);
        let (names, plain) = declared.into_iter().unzip();
        Tables {
            names,
            plain,
            checked,
        }
    }

    /// The id of the table named `name`, if declared.
    pub fn id(&self, name: &str) -> Option<TableId> {
        let at = self.names.iter().position(|n| n == name)?;
        Some(TableId(at as u16 + 1))
    }

    /// The key of table `id` whose columns print as `parts` (the outbox's `row_key`).
    pub fn key(&self, id: TableId, parts: &[String]) -> Option<Key> {
        let plain = *self.plain.get((id.0 as usize).checked_sub(1)?)?;
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        Some(Key::new(id, &encode_key(&parts, plain)))
    }

    /// The table named `name`, if declared and checked.
    pub fn named(&self, name: &str) -> Result<Arc<Table>, TableLookup> {
        let at = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or(TableLookup::Unknown)?;
        match &self.checked.read().expect("not poisoned")[at] {
            Slot::Ready(table) => Ok(table.clone()),
            Slot::Unchecked => Err(TableLookup::Unchecked),
            Slot::Unavailable(why) => Err(TableLookup::Unavailable(why.clone())),
        }
    }

    /// `f` of the table named `name`, if declared and checked: as [`Tables::named`], without
    /// cloning it or naming why not (the request fast path's, which leaves errors to the
    /// general one).
    pub fn with_ready<R>(&self, name: &str, f: impl FnOnce(&Table) -> R) -> Option<R> {
        let at = self.names.iter().position(|n| n == name)?;
        match &self.checked.read().expect("not poisoned")[at] {
            Slot::Ready(table) => Some(f(table)),
            _ => None,
        }
    }

    /// The checked table `id`.
    pub fn get(&self, id: TableId) -> Option<Arc<Table>> {
        let at = (id.0 as usize).checked_sub(1)?;
        match self.checked.read().expect("not poisoned").get(at)? {
            Slot::Ready(table) => Some(table.clone()),
            _ => None,
        }
    }

    /// The name of table `id` ("users" for 0).
    pub fn name(&self, id: TableId) -> &str {
        match (id.0 as usize).checked_sub(1) {
            None => "users",
            Some(at) => self.names.get(at).map_or("?", String::as_str),
        }
    }

    /// Records `table` as checked: requests may use it from now on.
    pub fn checked(&self, table: Table) {
        if let Some(at) = (table.id.0 as usize).checked_sub(1) {
            if let Some(slot) = self.checked.write().expect("not poisoned").get_mut(at) {
                *slot = Slot::Ready(Arc::new(table));
            }
        }
    }

    /// Records table `id` as no longer matching the catalog: requests answer `unavailable` with
    /// `why`, the change stream passes its rows over (tombstones) until it is checked again.
    pub fn unavailable(&self, id: TableId, why: String) {
        if let Some(at) = (id.0 as usize).checked_sub(1) {
            if let Some(slot) = self.checked.write().expect("not poisoned").get_mut(at) {
                *slot = Slot::Unavailable(why);
            }
        }
    }

    /// Whether table `id` was found not to match the catalog.
    pub fn is_unavailable(&self, id: TableId) -> bool {
        let at = (id.0 as usize).wrapping_sub(1);
        matches!(
            self.checked.read().expect("not poisoned").get(at),
            Some(Slot::Unavailable(_))
        )
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// Declared tables for the request parser's tests and its fuzz target (`rpc::fuzzing`): `orders`,
/// keyed by `(region text, id bigint)` with a lookup `by_ref` on `(ref uuid)`, checked.
pub fn declared_fixture() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let column = |name: &str, kind| Column {
            name: name.into(),
            kind,
        };
        let tables = Tables::new(vec![("orders".into(), false)]);
        tables.checked(Table {
            id: TableId(1),
            name: "orders".into(),
            source: "\"orders\"".into(),
            prefix: "orders:".into(),
            ttl_secs: 0,
            writable: true,
            key: vec![column("region", KeyType::Text), column("id", KeyType::Int8)],
            lookups: vec![Lookup {
                name: "by_ref".into(),
                columns: vec![column("ref", KeyType::Uuid)],
            }],
            projection: vec!["region".into(), "id".into(), "ref".into()],
            types: vec!["text".into(), "int8".into(), "uuid".into()],
            timestamps: vec![],
        });
        tables
    })
}
