//! The `users` row and its JSON form (DESIGN 1.3 `USER`), the one value stored in Redis and sent to
//! clients: every column of the row, whatever columns the table has, with timestamps in RFC 3339
//! UTC with six fractional digits and `Z`.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
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

/// Why a row could not be turned into a [`User`].
#[derive(Debug, thiserror::Error)]
#[error("cannot read a users row: {0}")]
pub struct RowError(String);

/// RFC 3339 in UTC with six fractional digits and `Z`, as DESIGN fixes for every timestamp.
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl User {
    /// Reads a row selected with [`USER_SELECT`] (`alias.*` then the row's JSON). PostgreSQL's own
    /// JSON renders timestamps with a trimmed fraction and an offset, so every timestamp column is
    /// re-rendered from its typed value.
    pub fn from_row(row: &Row) -> Result<User, RowError> {
        let columns = row.columns();
        let json_at = columns
            .len()
            .checked_sub(1)
            .ok_or_else(|| RowError("no columns".into()))?;
        let text: &str = row.try_get(json_at).map_err(|e| RowError(e.to_string()))?;
        let mut object: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| RowError(format!("row JSON: {e}")))?;
        for (i, column) in columns[..json_at].iter().enumerate() {
            let rendered = match *column.type_() {
                Type::TIMESTAMPTZ => row
                    .try_get::<_, Option<DateTime<Utc>>>(i)
                    .map_err(|e| RowError(e.to_string()))?
                    .map(|t| format_timestamp(&t)),
                Type::TIMESTAMP => row
                    .try_get::<_, Option<NaiveDateTime>>(i)
                    .map_err(|e| RowError(e.to_string()))?
                    .map(|t| format_timestamp(&t.and_utc())),
                _ => continue,
            };
            object.insert(
                column.name().to_owned(),
                rendered.map_or(Value::Null, Value::String),
            );
        }
        let username = object
            .get("username")
            .and_then(Value::as_str)
            .ok_or_else(|| RowError("no username".into()))?
            .to_owned();
        let version = object
            .get("version")
            .and_then(Value::as_i64)
            .ok_or_else(|| RowError("no version: is the schema migrated?".into()))?;
        let json = serde_json::to_string(&object).expect("a JSON object serializes");
        Ok(User {
            username,
            version,
            json,
        })
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
}
