//! What a CDC batch does to Redis, decided purely from what it read: a live entry or a tombstone
//! per mentioned name, and the fence a TRUNCATE needs.

use std::collections::BTreeMap;

use super::outbox::Batch;
use crate::config::CdcMode;
use crate::model::entry::Write;
use crate::model::key::Key;
use crate::model::user::User;

/// What a batch decided to do to Redis.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// A TRUNCATE was seen: tombstone every entry with a version up to this.
    pub truncate: Option<i64>,
    pub writes: Vec<Write>,
}

impl Plan {
    /// The fence a TRUNCATE at version horizon `version` needs: every row it removed has a version
    /// up to `version`, and every fill that read one of them read a horizon no later than it.
    pub fn truncate_fence(&self) -> Option<i64> {
        self.truncate.map(|version| version.saturating_add(1))
    }
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
    Plan { truncate, writes }
}

impl Plan {
    /// The plan for a batch as read.
    pub fn of(mode: CdcMode, batch: &Batch) -> Plan {
        plan(
            mode,
            &batch.mentioned,
            &batch.rows,
            batch.read_at,
            batch.truncate,
        )
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
}
