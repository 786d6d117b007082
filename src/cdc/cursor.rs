//! The CDC cursor, pure and unit-tested: where a consumer stands in the outbox, and the
//! transactions still running at its last snapshot that may yet commit rows below it.
//!
//! Commit order is not id order: a transaction may take outbox id 10 and commit after id 11 was
//! applied. Every batch therefore reads one snapshot and remembers the transactions that were still
//! running in it (`pending`, with the id range their rows may hide in); once such a transaction has
//! finished, its rows in that range are read and applied. The cursor and the pending list are stored
//! together, so a restart resumes exactly.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::store::pg::{DbError, DbErrorKind};

/// A transaction that was running when a batch read its snapshot: its outbox rows with ids in
/// `(after, upto]` are still to be applied once it has finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub txid: u64,
    pub after: i64,
    pub upto: i64,
}

/// The durable position of one consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Every outbox row with `id <= position` was applied, except the rows of `pending`.
    pub position: i64,
    pub pending: Vec<Pending>,
}

/// The Redis Cluster slots whose changes a worker passed over (their primary did not answer it),
/// and the outbox position it had read up to when it last did: stored with the cursor until a
/// worker has applied everything up to it, so that every daemon sends those slots' reads to
/// PostgreSQL meanwhile (see `apply::Unsaved`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missed {
    pub slots: std::collections::BTreeSet<u16>,
    pub upto: i64,
}

impl Missed {
    /// The slots as stored (`integer[]`).
    pub fn stored_slots(&self) -> Vec<i32> {
        self.slots.iter().map(|&s| i32::from(s)).collect()
    }

    /// What a stored row says, read as input: a number that is no Cluster slot is dropped.
    pub fn from_stored(slots: Vec<i32>, upto: i64) -> Missed {
        Missed {
            slots: slots
                .into_iter()
                .filter_map(|s| u16::try_from(s).ok().filter(|&s| s < 16384))
                .collect(),
            upto,
        }
    }
}

/// The transactions a snapshot saw as running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub running: HashSet<u64>,
}

/// A transaction id (xid8) as PostgreSQL prints it.
pub fn parse_xid(text: String) -> Result<u64, DbError> {
    text.parse::<u64>()
        .map_err(|e| DbError::said(DbErrorKind::Server, format!("xid8 {text}: {e}")))
}

/// Every transaction a snapshot must treat as running: the ones it lists, and every id from its
/// xmax up to `own` (a transaction id drawn after the snapshot was taken). PostgreSQL's xmax is
/// "latest completed + 1", not "next to be assigned": a transaction that drew a newer id than
/// every finished one is running but not listed, and may already hold a lower outbox id than rows
/// the snapshot sees.
pub fn in_flight(xmax: u64, listed: HashSet<u64>, own: u64) -> HashSet<u64> {
    let mut running = listed;
    running.extend(xmax..own);
    running
}

impl Snapshot {
    /// Whether `txid` had finished (committed or aborted) when the snapshot was taken.
    pub fn finished(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && !self.running.contains(&txid))
    }
}

impl Cursor {
    /// The cursor after a batch: `fresh_upto` is the largest fresh id applied; `late_complete` says
    /// whether the late rows of finished transactions were all read (else only up to `late_upto`).
    pub fn advance(
        &self,
        snapshot: &Snapshot,
        fresh_upto: Option<i64>,
        late_complete: bool,
        late_upto: i64,
    ) -> Cursor {
        let position = fresh_upto.map_or(self.position, |id| id.max(self.position));
        let mut pending: Vec<Pending> = self
            .pending
            .iter()
            .filter_map(|p| {
                if !snapshot.finished(p.txid) {
                    // Still running: its rows may hide anywhere up to the new position.
                    return Some(Pending {
                        upto: position,
                        ..p.clone()
                    });
                }
                if late_complete {
                    return None;
                }
                let after = p.after.max(late_upto);
                (after < p.upto).then(|| Pending { after, ..p.clone() })
            })
            .collect();
        for &txid in &snapshot.running {
            if position > self.position && !pending.iter().any(|p| p.txid == txid) {
                // Started since the last snapshot: its ids are all above the old position.
                pending.push(Pending {
                    txid,
                    after: self.position,
                    upto: position,
                });
            }
        }
        pending.retain(|p| p.after < p.upto);
        pending.sort_by_key(|p| p.txid);
        Cursor { position, pending }
    }

    /// Oldest outbox id this cursor may still need.
    pub fn low_water(&self) -> i64 {
        self.pending
            .iter()
            .map(|p| p.after)
            .min()
            .unwrap_or(self.position)
            .min(self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_missed_slots_are_read_as_input() {
        let missed = Missed::from_stored(vec![-1, 0, 16383, 16384, 70000, i32::MAX, 0], 9);
        assert_eq!(missed.slots.into_iter().collect::<Vec<_>>(), [0, 16383]);
        assert_eq!(missed.upto, 9);
    }

    fn snapshot(xmin: u64, xmax: u64, running: &[u64]) -> Snapshot {
        Snapshot {
            xmin,
            xmax,
            running: running.iter().copied().collect(),
        }
    }

    #[test]
    fn transactions_from_xmax_up_to_our_own_are_in_flight() {
        let running = in_flight(10, HashSet::from([7]), 13);
        assert_eq!(running, HashSet::from([7, 10, 11, 12]));
        assert_eq!(in_flight(10, HashSet::new(), 10), HashSet::new());
    }

    #[test]
    fn finished_means_below_xmin_or_below_xmax_and_not_running() {
        let s = snapshot(10, 20, &[10, 15]);
        assert!(s.finished(9));
        assert!(!s.finished(10));
        assert!(s.finished(11));
        assert!(!s.finished(15));
        assert!(!s.finished(20));
    }

    #[test]
    fn a_running_transaction_is_remembered_until_it_finishes() {
        let start = Cursor::default();
        // Batch 1: ids up to 12 applied; transaction 15 was running and may hold ids below 12.
        let c1 = start.advance(&snapshot(15, 20, &[15]), Some(12), true, 0);
        assert_eq!(c1.position, 12);
        assert_eq!(
            c1.pending,
            vec![Pending {
                txid: 15,
                after: 0,
                upto: 12
            }]
        );
        // Batch 2: still running, the cursor moves on: its range grows with it.
        let c2 = c1.advance(&snapshot(15, 21, &[15]), Some(30), true, 0);
        assert_eq!(
            c2.pending,
            vec![Pending {
                txid: 15,
                after: 0,
                upto: 30
            }]
        );
        // Batch 3: it finished and all its rows were read: forgotten.
        let c3 = c2.advance(&snapshot(21, 21, &[]), None, true, 0);
        assert_eq!(
            c3,
            Cursor {
                position: 30,
                pending: vec![]
            }
        );
    }

    #[test]
    fn a_finished_transaction_read_in_part_keeps_the_rest() {
        let c = Cursor {
            position: 100,
            pending: vec![Pending {
                txid: 7,
                after: 0,
                upto: 100,
            }],
        };
        let next = c.advance(&snapshot(50, 50, &[]), None, false, 40);
        assert_eq!(
            next.pending,
            vec![Pending {
                txid: 7,
                after: 40,
                upto: 100
            }]
        );
        assert_eq!(next.low_water(), 40);
    }

    #[test]
    fn idle_batches_change_nothing() {
        let c = Cursor {
            position: 5,
            pending: vec![],
        };
        assert_eq!(
            c.advance(&snapshot(9, 12, &[9, 10]), None, true, 0),
            c,
            "no new ids: nothing can hide"
        );
    }
}
