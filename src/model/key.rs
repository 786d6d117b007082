//! What a cache entry is keyed by, as every path carries it: writes, flights, repairs, the near
//! cache and the change stream. A key names its table ([`TableId`]: `users`, or a declared table)
//! and the text that follows that table's prefix in Redis (a username, or a declared table's key
//! text as `model::table` encodes it).

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Which table a key belongs to: 0 is `users`; declared tables are numbered from 1 in the order
/// of their names, as `store::redis::Keys` numbers their prefixes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct TableId(pub u16);

impl TableId {
    pub const USERS: TableId = TableId(0);
}

/// The key of one cached row. Cheap to clone; ordered, hashed and compared by table, then text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    table: TableId,
    text: Arc<str>,
}

/// A key's table and text however they are held: a [`Key`], or a [`KeyRef`] borrowed from a
/// request, which finds a map's entry keyed by [`Key`] without allocating one (`Key` borrows as
/// `dyn KeyParts`, hashed and compared alike).
pub trait KeyParts {
    fn table(&self) -> TableId;
    fn text(&self) -> &str;
}

/// A key's parts, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRef<'a> {
    pub table: TableId,
    pub text: &'a str,
}

impl KeyRef<'_> {
    pub fn to_key(self) -> Key {
        Key::new(self.table, self.text)
    }
}

impl KeyParts for KeyRef<'_> {
    fn table(&self) -> TableId {
        self.table
    }
    fn text(&self) -> &str {
        self.text
    }
}

impl KeyParts for Key {
    fn table(&self) -> TableId {
        self.table
    }
    fn text(&self) -> &str {
        &self.text
    }
}

impl Hash for dyn KeyParts + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.table().hash(state);
        self.text().hash(state);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.table() == other.table() && self.text() == other.text()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl<'a> Borrow<dyn KeyParts + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

/// As its parts are hashed (what [`Borrow`] requires).
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn KeyParts).hash(state)
    }
}

impl Key {
    /// The key of the `users` row named `username`.
    pub fn user(username: &str) -> Key {
        Key::new(TableId::USERS, username)
    }

    /// The key whose text (what follows the table's prefix) is `text`.
    pub fn new(table: TableId, text: &str) -> Key {
        Key {
            table,
            text: text.into(),
        }
    }

    pub fn table(&self) -> TableId {
        self.table
    }

    /// Whether it is a `users` row's key.
    pub fn is_user(&self) -> bool {
        self.table == TableId::USERS
    }

    /// Its text: what follows its table's prefix in its Redis key (the username, for `users`).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.table {
            TableId::USERS => fmt::Debug::fmt(&*self.text, f),
            TableId(n) => write!(f, "{n}:{:?}", &*self.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_its_table_and_its_text() {
        let key = Key::user("alice");
        assert_eq!(key.as_str(), "alice");
        assert_eq!(format!("{key} {key:?}"), r#"alice "alice""#);
        let mut map = std::collections::HashMap::new();
        map.insert(key.clone(), 1);
        assert_eq!(map.get(&Key::user("alice")), Some(&1));
        // Found by its borrowed parts too, and only by the same table's.
        let parts = |table, text| KeyRef { table, text };
        let found = |k: KeyRef| map.get(&k as &dyn KeyParts).copied();
        assert_eq!(found(parts(TableId::USERS, "alice")), Some(1));
        assert_eq!(found(parts(TableId(1), "alice")), None);
        assert_eq!(found(parts(TableId::USERS, "alic")), None);
        assert_eq!(map.get(&Key::new(TableId(1), "alice")), None);
        assert!(Key::user("a") < Key::user("b"));
        assert!(Key::user("b") < Key::new(TableId(1), "a"));
        assert_eq!(format!("{:?}", Key::new(TableId(2), "42")), r#"2:"42""#);
    }
}
