//! The `users` row and its JSON form (`USER` in docs/reference.md), the one value stored in Redis and sent to
//! clients: every column of the row, whatever columns the table has and whatever legal value they
//! hold.
//!
//! PostgreSQL renders the row (`row_to_json`), so every type it ships, and every type a user adds,
//! has a JSON form without Rust having to decode it: numbers beyond f64 stay exact digits, `NaN`
//! and infinities are strings, arrays, ranges, `jsonb`, `bytea`, `inet`, `interval` are what
//! PostgreSQL's JSON says they are. Only `timestamp` and `timestamptz` columns are rewritten, to RFC
//! 3339 in UTC with six fractional digits and `Z`, as docs/reference.md fixes; a value RFC 3339 cannot hold
//! (`infinity`, `-infinity`, years before 1 or after 9999) keeps PostgreSQL's own text. The values
//! are never parsed into a tree: the row's JSON is cut at its top-level keys and put together
//! again, so no depth or number size can fail it.

use super::key::Key;
use std::fmt;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use tokio_postgres::types::Type;
use tokio_postgres::Row;

/// The select list that [`User::from_row`] reads: every column, then the row as JSON.
pub const USER_SELECT: &str = "u.*, row_to_json(u)::text";

/// One row of `users`, as cached. `version` grows with every change to the row
/// (sql/0001_users.sql).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub version: i64,
    /// The whole row as a JSON object.
    pub json: String,
}

/// Why a row could not be turned into a [`User`]: it names the row (when its username could be
/// read) and the column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the users row {} cannot be served: {reason}", username.as_deref().map_or("?".to_owned(), |u| format!("'{u}'")))]
pub struct RowError {
    pub username: Option<String>,
    pub reason: String,
}

/// RFC 3339 in UTC with six fractional digits and `Z`, as docs/reference.md fixes for every timestamp.
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// PostgreSQL's JSON text of a timestamp, in the reference's form where RFC 3339 can hold it; `None` keeps
/// PostgreSQL's text (`infinity`, `-infinity`, BC and five-digit years).
fn normalize_timestamp(text: &str, with_zone: bool) -> Option<String> {
    let t = match with_zone {
        true => DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc),
        false => NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
            .ok()?
            .and_utc(),
    };
    Some(format_timestamp(&t))
}

/// The top-level entries of a JSON object, values left as text.
struct Entries(Vec<(String, Box<RawValue>)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Entries, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// Cuts a JSON object at its top-level keys without parsing the values: no depth limit, no number
/// range applies to them.
fn entries(json: &str) -> Result<Vec<(String, Box<RawValue>)>, String> {
    // The values are skipped, not built (serde_json skips without recursing): any nesting works.
    let mut de = serde_json::Deserializer::from_str(json);
    let entries = <Entries as serde::Deserialize>::deserialize(&mut de)
        .map_err(|e| format!("row JSON: {e}"))?;
    de.end().map_err(|e| format!("row JSON: {e}"))?;
    Ok(entries.0)
}

/// A row's JSON object with its timestamp columns (`(name, with time zone)`) rewritten as the
/// reference fixes them (see the module's documentation); every other value kept as PostgreSQL
/// wrote it.
pub fn normalize_timestamps<'a>(
    text: &str,
    timestamps: impl Iterator<Item = (&'a str, bool)>,
) -> Result<String, String> {
    let mut entries = entries(text)?;
    for (column, with_zone) in timestamps {
        let Some((_, value)) = entries.iter_mut().find(|(key, _)| key == column) else {
            continue;
        };
        let Ok(Some(text)) = serde_json::from_str::<Option<String>>(value.get()) else {
            continue;
        };
        if let Some(rendered) = normalize_timestamp(&text, with_zone) {
            let quoted = serde_json::to_string(&rendered).expect("a string serializes");
            *value = RawValue::from_string(quoted).expect("a JSON string is JSON");
        }
    }
    let mut json = String::with_capacity(text.len() + 16);
    json.push('{');
    for (i, (key, value)) in entries.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&serde_json::to_string(key).expect("a string serializes"));
        json.push(':');
        json.push_str(value.get());
    }
    json.push('}');
    Ok(json)
}

impl User {
    /// The key its entry is cached under.
    pub fn key(&self) -> Key {
        Key::user(&self.username)
    }

    /// Reads a row selected with [`USER_SELECT`] (`alias.*` then the row's JSON). Only `username`
    /// and `version` are decoded; every other column is taken from PostgreSQL's JSON, timestamps
    /// rewritten (see the module's documentation).
    pub fn from_row(row: &Row) -> Result<User, RowError> {
        let username: Option<String> = row.try_get("username").ok().flatten();
        let fail = |reason: String| RowError {
            username: username.clone(),
            reason,
        };
        let columns = row.columns();
        let json_at = columns
            .len()
            .checked_sub(1)
            .ok_or_else(|| fail("no columns".into()))?;
        let name = username
            .clone()
            .ok_or_else(|| fail("column username: missing or NULL".into()))?;
        let version: i64 = row
            .try_get::<_, Option<i64>>("version")
            .map_err(|e| fail(format!("column version: {e} (is the schema migrated?)")))?
            .ok_or_else(|| fail("column version: NULL".into()))?;
        let text: &str = row
            .try_get(json_at)
            .map_err(|e| fail(format!("row JSON: {e}")))?;
        let timestamps = columns[..json_at].iter().filter_map(|c| match *c.type_() {
            Type::TIMESTAMPTZ => Some((c.name(), true)),
            Type::TIMESTAMP => Some((c.name(), false)),
            _ => None,
        });
        let json = normalize_timestamps(text, timestamps).map_err(fail)?;
        Ok(User {
            username: name,
            version,
            json,
        })
    }

    /// Reads every row, keeping the ones that cannot be served apart: one bad row never fails the
    /// others.
    pub fn from_rows(rows: &[Row]) -> (Vec<User>, Vec<RowError>) {
        let mut users = Vec::with_capacity(rows.len());
        let mut broken = Vec::new();
        for row in rows {
            match User::from_row(row) {
                Ok(user) => users.push(user),
                Err(e) => broken.push(e),
            }
        }
        (users, broken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamps_have_six_digits_and_z() {
        let t = Utc.timestamp_opt(1_762_047_803, 38_598_000).unwrap();
        assert_eq!(format_timestamp(&t), "2025-11-02T01:43:23.038598Z");
        let whole = Utc.timestamp_opt(1_762_047_803, 0).unwrap();
        assert_eq!(format_timestamp(&whole), "2025-11-02T01:43:23.000000Z");
    }

    #[test]
    fn postgres_timestamps_are_normalized_where_rfc3339_holds_them() {
        let n = |text, zone| normalize_timestamp(text, zone);
        assert_eq!(
            n("2025-11-02T01:43:23.0386+00:00", true).as_deref(),
            Some("2025-11-02T01:43:23.038600Z")
        );
        assert_eq!(
            n("2025-11-02T03:43:23+02:00", true).as_deref(),
            Some("2025-11-02T01:43:23.000000Z"),
            "any session time zone comes out in UTC"
        );
        assert_eq!(
            n("2025-11-02T01:43:23.5", false).as_deref(),
            Some("2025-11-02T01:43:23.500000Z")
        );
        for kept in [
            "infinity",
            "-infinity",
            "0044-03-15T00:00:00+00:00 BC",
            "10000-01-01T00:00:00+00:00",
        ] {
            assert_eq!(n(kept, true), None, "{kept}");
        }
    }

    #[test]
    fn the_row_json_is_cut_at_top_level_keys_only() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let json = format!(r#"{{"a":{deep},"n":1e100000,"s":"x"}}"#);
        let cut = entries(&json).unwrap();
        assert_eq!(cut.len(), 3);
        assert_eq!(cut[1].1.get(), "1e100000");
        assert!(entries("[1]").is_err());
        assert!(entries(r#"{"a":1} trailing"#).is_err());
    }
}
