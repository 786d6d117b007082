//! The `users` row and its JSON form (DESIGN 1.3 `USER`), the one value stored in Redis and sent to
//! clients.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

/// One row of `users`. `version` grows with every change to the row (sql/0001_users.sql).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: i64,
    pub username: String,
    #[serde(serialize_with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    pub version: i64,
}

fn rfc3339_micros<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

impl User {
    /// The row as DESIGN's `USER` JSON object: every column, timestamps RFC 3339 UTC with six
    /// fractional digits and `Z`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a user always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn json_has_every_column_and_micro_timestamps() {
        let created_at = Utc.timestamp_opt(1_762_047_803, 38_598_000).unwrap();
        let user = User {
            id: 4,
            username: "user01".into(),
            created_at,
            version: 9,
        };
        assert_eq!(
            user.to_json(),
            r#"{"id":4,"username":"user01","created_at":"2025-11-02T01:43:23.038598Z","version":9}"#
        );
    }
}
