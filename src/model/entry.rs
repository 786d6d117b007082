//! What a cache entry is and which one wins, stated once: a live entry (a user's row JSON carrying
//! its `version`, or a declared table's `{"version":N,"row":ROW}`) or a tombstone (`{"tombstone":true,"version":N}`), the versioned writes that
//! make them, and the read-your-writes rule. The Lua scripts in `store/redis/*.lua` apply the
//! same rules inside Redis; `store::redis::scripts`'s tests hold the two to each other.

use serde::Deserialize;

use super::key::Key;
use super::user::User;

/// A live entry as the read path looks at it: a JSON object with an integer `version` and either
/// an `id` (a user's row) or a `row` that is an object or an array (a declared table's; an array
/// because Lua's cjson cannot tell the two apart, and `entry.lua` must agree). Anything else (a
/// tombstone, a foreign value) is a miss.
#[derive(Deserialize)]
struct LiveProbe<'a> {
    id: Option<serde::de::IgnoredAny>,
    #[serde(borrow)]
    row: Option<&'a serde_json::value::RawValue>,
    version: Option<i64>,
}

/// Whether a stored value is a live user entry written by cacheward (`docs/reference.md`, "Redis
/// layout").
pub fn is_live(value: &str) -> bool {
    live_version(value).is_some()
}

/// The version of a stored value that is a live user entry; `None` for anything else.
pub fn live_version(value: &str) -> Option<i64> {
    live(value).map(|(version, _)| version)
}

/// The version of a live entry, and for a declared table's entry that is not in the form
/// cacheward writes (`{"version":N,"row":ROW}` exactly: other spacing or order, or members of
/// someone else's beside them), that form: answers cut the row out of an entry where it says
/// (`rpc::encode`), and a member after ROW must not become a member of the answer.
fn live(value: &str) -> Option<(i64, Option<String>)> {
    // serde would also read a struct from an array: only an object counts.
    if !value.trim_start().starts_with('{') {
        return None;
    }
    let probe = serde_json::from_str::<LiveProbe>(value).ok()?;
    let version = probe.version?;
    if probe.id.is_some() {
        return Some((version, None));
    }
    let row = probe.row?.get();
    if !(row.starts_with('{') || row.starts_with('[')) {
        return None;
    }
    let cut = value
        .strip_prefix(r#"{"version":"#)
        .and_then(|rest| rest.strip_prefix(itoa::Buffer::new().format(version)))
        .and_then(|rest| rest.strip_prefix(r#","row":"#))
        .and_then(|rest| rest.strip_suffix('}'));
    match cut == Some(row) {
        true => Some((version, None)),
        false => Some((
            version,
            Some(format!(r#"{{"version":{version},"row":{row}}}"#)),
        )),
    }
}

/// The version a tombstone carries, if `value` is one of cacheward's: `{"tombstone":true}` with an
/// integer version, any (a drop of a row's first version, 1, leaves one of version 0; a declared
/// table's row untouched since its declaration has version 0, and leaves one of version -1).
pub fn tombstone_version(value: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct Tombstone {
        tombstone: bool,
        version: i64,
    }
    if !value.trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str::<Tombstone>(value)
        .ok()
        .filter(|t| t.tombstone)
        .map(|t| t.version)
}

/// Whether a stored value is cacheward's: a live entry or a tombstone.
pub fn is_ours(value: &str) -> bool {
    is_live(value) || tombstone_version(value).is_some()
}

/// A tombstone's stored form. The Lua scripts build the same text (`scripts::tests` checks it).
pub fn tombstone_json(version: i64) -> String {
    format!(r#"{{"tombstone":true,"version":{version}}}"#)
}

/// The version of a tombstone that removes every entry older than `version` and lets that very
/// version be written again: what an invalidation or a drop leaves (in Lua: `version - 1`).
pub fn version_below(version: i64) -> i64 {
    version - 1
}

/// Whether an entry of `version` may answer a read that asked for `min_version` (read-your-writes:
/// an older one is passed over and the database read).
pub fn satisfies(version: i64, min_version: Option<i64>) -> bool {
    min_version.is_none_or(|min| version >= min)
}

/// A live entry as read from Redis: the user's JSON as stored, and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub json: String,
    pub version: i64,
}

impl Live {
    /// `value` if it is a live entry.
    pub fn of(value: String) -> Option<Live> {
        let (version, canonical) = live(&value)?;
        Some(Live {
            json: canonical.unwrap_or(value),
            version,
        })
    }

    /// Whether it may answer a read that asked for `min_version` ([`satisfies`]).
    pub fn satisfies(&self, min_version: Option<i64>) -> bool {
        satisfies(self.version, min_version)
    }
}

/// Whether two JSON texts say the same (key order and spacing aside); texts that do not parse
/// (a number past f64, say) are compared as they are.
pub fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// One versioned write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Store the row's JSON unless Redis holds a version at least as new, or the row was read
    /// before the fence (see `store::redis::Cache::fence_key`).
    Live {
        key: Key,
        version: i64,
        json: String,
        /// The version horizon read before the row was: a fence above it refuses the write.
        read_at: i64,
    },
    /// Remove the entry, leaving a tombstone that refuses older live writes, unless Redis holds a
    /// newer version. `version` is at least the last version the name's row had.
    Tombstone { key: Key, version: i64 },
}

impl Write {
    /// The live entry of `user`, whose row was read after the version horizon was `read_at`.
    pub fn live(user: &User, read_at: i64) -> Write {
        Write::Live {
            key: user.key(),
            version: user.version,
            json: user.json.clone(),
            read_at,
        }
    }

    /// A tombstone for `key`: refuses every live write of a version up to `version`.
    pub fn tombstone(key: Key, version: i64) -> Write {
        Write::Tombstone { key, version }
    }

    /// A tombstone [one version below](version_below) `user`'s row: removes every older entry
    /// and lets this very row (or a newer one) be filled. What an invalidation writes, and what a
    /// drop turns each live entry into (in Lua: `drop.lua`).
    pub fn below(user: &User) -> Write {
        Write::tombstone(user.key(), version_below(user.version))
    }

    pub fn key(&self) -> &Key {
        match self {
            Write::Live { key, .. } | Write::Tombstone { key, .. } => key,
        }
    }

    pub fn version(&self) -> i64 {
        match self {
            Write::Live { version, .. } | Write::Tombstone { version, .. } => *version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_entry_is_held_in_the_form_cacheward_writes() {
        let json = |value: &str| Live::of(value.to_owned()).map(|live| live.json);
        let canonical = r#"{"version":3,"row":{"a":[1,"x}"]}}"#;
        assert_eq!(json(canonical).as_deref(), Some(canonical));
        for other in [
            r#"{ "version": 3, "row": {"a":[1,"x}"]} }"#,
            r#"{"row":{"a":[1,"x}"]},"version":3}"#,
            // Members of someone else's after ROW would become members of the answer.
            r#"{"version":3,"row":{"a":[1,"x}"]},"source":"db","x":{}}"#,
            r#"{"version":3,"row":{"a":[1,"x}"]},"x":{"b":2}}"#,
        ] {
            assert_eq!(json(other).as_deref(), Some(canonical), "{other}");
        }
        // A user's entry is kept as it is, whatever it holds.
        let user = r#"{"id":1,"row":{"b":1},"x":2,"version":3}"#;
        assert_eq!(json(user).as_deref(), Some(user));
    }

    #[test]
    fn live_entries_are_objects_with_an_id_and_a_version() {
        assert!(is_live(
            r#"{"id":1,"username":"a","created_at":"x","version":3}"#
        ));
        assert!(!is_live(r#"{"tombstone":true,"version":3}"#));
        assert!(!is_live("garbage"));
        assert!(!is_live("[1]"));
        assert!(!is_live(r#"{"id":null,"username":"a","version":3}"#));
        // The `id` rule alone: a version without an id is no live entry.
        assert!(!is_live(r#"{"username":"a","version":3}"#));
        // The version rule alone: an id without an integer version is none either.
        assert!(!is_live(r#"{"id":1,"username":"a"}"#));
        assert!(!is_live(r#"{"id":1,"version":"3"}"#));
        // A declared table's entry: a row object and a version.
        assert_eq!(live_version(r#"{"version":4,"row":{"id":1}}"#), Some(4));
        assert_eq!(live_version(r#"{"version":4,"row":{}}"#), Some(4));
        assert!(!is_live(r#"{"version":4,"row":null}"#));
        assert!(!is_live(r#"{"version":4,"row":"x"}"#));
        assert!(!is_live(r#"{"row":{"id":1}}"#));
    }

    #[test]
    fn tombstones_are_told_from_live_entries_and_foreign_values() {
        assert_eq!(tombstone_version(&tombstone_json(7)), Some(7));
        assert_eq!(tombstone_version(&tombstone_json(-1)), Some(-1));
        assert!(is_ours(&tombstone_json(7)));
        // A drop of a row's first version (1) leaves version_below(1) = 0: still cacheward's.
        assert_eq!(
            tombstone_version(&tombstone_json(version_below(1))),
            Some(0)
        );
        assert!(!is_ours(r#"{"tombstone":true,"version":1.5}"#));
        assert!(!is_ours(r#"{"tombstone":false,"version":7}"#));
        assert!(!is_ours("7"));
        assert!(is_ours(r#"{"id":1,"version":3}"#));
    }

    #[test]
    fn a_read_with_min_version_takes_only_entries_at_least_that_new() {
        assert!(satisfies(5, None));
        assert!(satisfies(5, Some(5)));
        assert!(satisfies(6, Some(5)));
        assert!(!satisfies(4, Some(5)));
    }

    #[test]
    fn an_invalidation_lets_the_row_it_names_be_filled_and_nothing_older() {
        let user = User {
            username: "a".into(),
            version: 7,
            json: "{}".into(),
        };
        let below = Write::below(&user);
        assert_eq!(below.key(), &Key::user("a"));
        assert_eq!(below.version(), 6);
        assert!(matches!(below, Write::Tombstone { .. }));
        // A deletion's tombstone carries the deleted version itself.
        assert_eq!(Write::tombstone(Key::user("a"), 7).version(), 7);
        let live = Write::live(&user, 3);
        assert!(matches!(
            live,
            Write::Live {
                read_at: 3,
                version: 7,
                ..
            }
        ));
    }

    #[test]
    fn json_is_compared_by_meaning_and_unparsable_numbers_by_text() {
        assert!(same_json(r#"{"a":1,"b":2}"#, r#"{"b":2, "a":1}"#));
        assert!(!same_json(r#"{"a":1}"#, r#"{"a":2}"#));
        assert!(same_json(r#"{"n":1e400}"#, r#"{"n":1e400}"#));
        assert!(!same_json(r#"{"n":1e400}"#, r#"{"n":2e400}"#));
    }
}
