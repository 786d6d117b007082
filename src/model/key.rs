//! What a cache entry is keyed by, as every path carries it: writes, flights, repairs, the near
//! cache and the change stream. Today it names a row of `users` by its username (what follows
//! `cache.key_prefix` in Redis); declared tables will add which table it belongs to here, and
//! nowhere else.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// The key of one cached row. Cheap to clone; ordered, hashed and compared by its text, which is
/// what follows the prefix in its Redis key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// The key of the `users` row named `username`.
    pub fn user(username: &str) -> Key {
        Key(username.into())
    }

    /// Its text: what follows the prefix in its Redis key (the username, for `users`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_its_text_wherever_it_is_looked_up() {
        let key = Key::user("alice");
        assert_eq!(key.as_str(), "alice");
        assert_eq!(format!("{key} {key:?}"), r#"alice "alice""#);
        let mut map = std::collections::HashMap::new();
        map.insert(key.clone(), 1);
        assert_eq!(map.get("alice"), Some(&1));
        assert!(Key::user("a") < Key::user("b"));
    }
}
