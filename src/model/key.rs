//! What a cache entry is keyed by, as every path carries it: writes, flights, repairs, the near
//! cache and the change stream. A key names its table ([`TableId`]: `users`, or a declared table)
//! and the text that follows that table's prefix in Redis (a username, or a declared table's key
//! text as `model::table` encodes it).

use std::fmt;
use std::sync::Arc;

/// Which table a key belongs to: 0 is `users`; declared tables are numbered from 1 in the order
/// of their names, as `store::redis::Keys` numbers their prefixes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct TableId(pub u16);

impl TableId {
    pub const USERS: TableId = TableId(0);
}

/// The key of one cached row. Cheap to clone; ordered, hashed and compared by table, then text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    table: TableId,
    text: Arc<str>,
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
        assert_eq!(map.get(&Key::new(TableId(1), "alice")), None);
        assert!(Key::user("a") < Key::user("b"));
        assert!(Key::user("b") < Key::new(TableId(1), "a"));
        assert_eq!(format!("{:?}", Key::new(TableId(2), "42")), r#"2:"42""#);
    }
}
