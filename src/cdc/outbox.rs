//! The outbox side of the CDC worker: its SQL (each statement once), the rows it reads, and
//! [`read`], which reads one batch in one snapshot: the fresh changes after the cursor, the late
//! ones of transactions that were pending and have finished, and the current rows of every name
//! they mention. The seam the rest of the worker sees is the [`Batch`] it returns.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::cursor::{in_flight, parse_xid, Cursor, Missed, Pending, Snapshot};
use super::statements::{Statements, OUTBOX_ID_HORIZON};
use super::tables::{self, TableChange, TableChanges};
use super::CdcError;
use crate::model::key::Key;
use crate::model::registry::Tables;
use crate::model::table::Table;
use crate::model::user::User;
use crate::store::pg as db;
use crate::store::pg::rows::TableRow;
use std::sync::Arc;

/// One outbox row as the applier reads it.
#[derive(Debug, Clone)]
pub struct Change {
    pub id: i64,
    pub op: String,
    pub username: Option<String>,
    pub old_username: Option<String>,
    /// The declared table the change is of; `None`: users.
    pub table: Option<String>,
    /// A declared table's change: the key the row has now, each column's text.
    pub row_key: Option<Vec<String>>,
    /// A declared table's change: a key that no longer has the row.
    pub old_key: Option<Vec<String>>,
    /// A declared table's change: the lookup values the row no longer has.
    pub old_lookups: Option<serde_json::Value>,
    pub version: i64,
    pub lag_ms: i64,
    /// Whether the version is one the version sequence can have drawn.
    pub version_drawn: bool,
    /// What of the row could not be read, if anything.
    pub defect: Option<&'static str>,
}

impl Change {
    /// Why this outbox row cannot be what the capture trigger wrote, if so. The outbox is input
    /// like any other: a row forged by a role that may insert there must not stop the stream,
    /// fence the cache off for good or make it drop everything at will.
    pub fn malformed(&self) -> Option<&'static str> {
        if self.defect.is_some() {
            return self.defect;
        }
        if !self.version_drawn {
            return Some("its version is newer than any the version sequence drew");
        }
        match self.op.as_str() {
            "insert" | "update" if self.username.is_none() => {
                Some("an insert or update names no user")
            }
            "delete" if self.old_username.is_none() => Some("a delete names no user"),
            "insert" | "update" | "delete" | "truncate" => None,
            _ => Some("unknown op"),
        }
    }
}

/// The part of a batch's read that is not users' rows: see [`super::statements::batch_query`].
#[derive(Deserialize)]
struct BatchJson {
    xmin: String,
    xmax: String,
    running: Vec<String>,
    xid: Option<String>,
    fresh: Vec<ChangeJson>,
    late: Vec<ChangeJson>,
}

/// One outbox row as the batch's read renders it. The outbox is input like any other: whatever
/// a forged row holds (a key array with NULLs or two dimensions, lookups nested past any parser's
/// depth) is read, and judged later (see [`Change::malformed`]), never a failed batch.
#[derive(Deserialize)]
struct ChangeJson {
    id: i64,
    op: String,
    username: Option<String>,
    old_username: Option<String>,
    version: i64,
    tbl: Option<String>,
    row_key: Option<serde_json::Value>,
    old_key: Option<serde_json::Value>,
    old_lookups: Option<String>,
    lag_ms: i64,
    drawn: bool,
}

impl From<ChangeJson> for Change {
    fn from(c: ChangeJson) -> Change {
        let mut defect = None;
        let mut key = |value: Option<serde_json::Value>| {
            let parts = value?;
            let parts = parts.as_array().and_then(|parts| {
                parts
                    .iter()
                    .map(|p| p.as_str().map(String::from))
                    .collect::<Option<Vec<String>>>()
            });
            if parts.is_none() {
                defect = Some("a key is not a one-dimensional array of text");
            }
            parts
        };
        let (row_key, old_key) = (key(c.row_key), key(c.old_key));
        // Lookups that do not parse (nested past serde_json's depth) are no object of text arrays.
        let old_lookups = c
            .old_lookups
            .map(|text| serde_json::from_str(&text).unwrap_or(serde_json::Value::Null));
        Change {
            id: c.id,
            op: c.op,
            username: c.username,
            old_username: c.old_username,
            table: c.tbl,
            row_key,
            old_key,
            old_lookups,
            version: c.version,
            lag_ms: c.lag_ms,
            version_drawn: c.drawn,
            defect,
        }
    }
}

/// A cursor at the newest outbox row, with every transaction in flight pending from `after` (rows
/// up to it are gone), read in one snapshot, and a fresh version horizon drawn with it: a fence at
/// it refuses every write that read its row before.
pub async fn head(client: &Client, after: i64) -> Result<(Cursor, i64), CdcError> {
    const FRESH_HORIZON: &str = db::FRESH_HORIZON;
    let row = client
        .query_one(
            &format!("SELECT coalesce((SELECT max(id) FROM cacheward_outbox WHERE id <= ({OUTBOX_ID_HORIZON})), 0),
                    ({FRESH_HORIZON}),
                    pg_snapshot_xmax(pg_current_snapshot())::text,
                    ARRAY(SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x),
                    pg_current_xact_id()::text"),
            &[],
        )
        .await?;
    let position: i64 = row.get(0);
    let listed = row
        .get::<_, Vec<String>>(3)
        .into_iter()
        .map(parse_xid)
        .collect::<Result<HashSet<u64>, _>>()?;
    let running = in_flight(parse_xid(row.get(2))?, listed, parse_xid(row.get(4))?);
    let mut pending: Vec<Pending> = running
        .into_iter()
        .map(|txid| Pending {
            txid,
            after,
            upto: position,
        })
        .filter(|p| p.after < p.upto)
        .collect();
    pending.sort_by_key(|p| p.txid);
    Ok((Cursor { position, pending }, row.get(1)))
}

/// Rows deleted per prune statement.
const PRUNE_CHUNK: i64 = 10_000;

/// Deletes, of the `$3` oldest outbox rows up to id `$2`, those older than `$1` seconds, records
/// how far pruning got, and returns how many it deleted. Ids are handed over as an array so that
/// the delete looks them up by primary key: as a join, PostgreSQL chose a sequential scan of the
/// whole outbox (54 ms at a million rows, every minute, on the CDC worker's connection).
pub const PRUNE_QUERY: &str = "WITH gone AS (DELETE FROM cacheward_outbox o
                   WHERE o.id = ANY(ARRAY(SELECT id FROM cacheward_outbox
                                          WHERE id <= $2 ORDER BY id LIMIT $3))
                     AND o.changed_at < now() - make_interval(secs => $1)
                   RETURNING o.id)
     UPDATE cacheward_cdc_settings
        SET pruned_upto = greatest(pruned_upto, coalesce((SELECT max(id) FROM gone), 0))
     RETURNING (SELECT count(*) FROM gone)";

/// Deletes outbox rows older than `retention_secs` that `cursor` no longer needs, and records how
/// far it pruned so that a consumer left behind knows to resync. Returns how many it deleted.
pub async fn prune(client: &Client, cursor: &Cursor, retention_secs: u64) -> Result<i64, CdcError> {
    let retention = retention_secs as f64;
    let mut pruned = 0;
    loop {
        let row = client
            .query_one(
                PRUNE_QUERY,
                &[&retention, &cursor.low_water(), &PRUNE_CHUNK],
            )
            .await?;
        let deleted: i64 = row.get(0);
        pruned += deleted;
        if deleted < PRUNE_CHUNK {
            return Ok(pruned);
        }
    }
}

/// Whose cursor a store is, and by which lease holder (a store by another than the holder
/// stores nothing: the lease was lost).
#[derive(Clone, Copy)]
pub struct Holder<'a> {
    pub consumer: &'a str,
    pub holder: &'a str,
}

/// Stores `cursor` and `missed` as `by.consumer`'s, if `by.holder` holds its lease (else the
/// lease was lost: [`CdcError::LeaseLost`]).
pub async fn store_cursor(
    client: &Client,
    st: &Statements,
    by: Holder<'_>,
    cursor: &Cursor,
    missed: &Missed,
) -> Result<(), CdcError> {
    let pending = serde_json::to_string(&cursor.pending).expect("pending list serializes");
    let params: [&(dyn ToSql + Sync); 6] = [
        &by.consumer,
        &cursor.position,
        &pending,
        &by.holder,
        &missed.stored_slots(),
        &missed.upto,
    ];
    match client.execute(&st.store_cursor, &params).await? {
        0 => Err(CdcError::LeaseLost),
        _ => Ok(()),
    }
}

/// `consumer`'s stored cursor, if it has one, and how far the outbox was pruned.
pub async fn load_cursor(
    client: &Client,
    consumer: &str,
) -> Result<(Option<Cursor>, i64), CdcError> {
    let row = client
        .query_opt(
            "SELECT position, pending::text FROM cacheward_cdc_cursors WHERE consumer = $1",
            &[&consumer],
        )
        .await?;
    let pruned_upto: i64 = client
        .query_one("SELECT pruned_upto FROM cacheward_cdc_settings", &[])
        .await?
        .get(0);
    let cursor = match row {
        Some(row) => {
            let pending: String = row.get(1);
            Some(Cursor {
                position: row.get(0),
                pending: serde_json::from_str(&pending).map_err(|e| {
                    db::DbError::said(
                        db::DbErrorKind::Server,
                        format!("cdc cursor pending list: {e}"),
                    )
                })?,
            })
        }
        None => None,
    };
    Ok((cursor, pruned_upto))
}

/// What `consumer`'s last worker stored as missed (see [`Missed`]): a worker that takes over
/// keeps it until it has applied up to it.
pub async fn load_missed(client: &Client, consumer: &str) -> Result<Missed, CdcError> {
    let row = client
        .query_opt(
            "SELECT missed_slots, missed_upto FROM cacheward_cdc_cursors WHERE consumer = $1",
            &[&consumer],
        )
        .await?;
    Ok(row.map_or_else(Missed::default, |row| {
        Missed::from_stored(row.get(0), row.get(1))
    }))
}

/// One batch as read in one snapshot.
pub struct Batch {
    /// The version horizon read before the snapshot: the rows' `read_at` (see `Cache::fence_key`).
    pub read_at: i64,
    /// The transactions the snapshot saw as running, and every one that may have drawn an id
    /// below the rows read (see [`in_flight`]).
    pub snapshot: Snapshot,
    /// Changes after the cursor's position, in id order, at most `limit`.
    pub fresh: Vec<Change>,
    /// Changes of pending transactions that have finished, in id order, at most `limit`.
    pub late: Vec<Change>,
    /// Whether `late` holds every late change (else only up to its last id).
    pub late_complete: bool,
    /// Every key the well-formed changes mention, with the largest version they record for it.
    pub mentioned: BTreeMap<Key, i64>,
    /// The largest version horizon a TRUNCATE among the changes recorded.
    pub truncate: Option<i64>,
    /// The current rows of the mentioned names that can be served.
    pub rows: Vec<User>,
    /// What the changes say of declared tables.
    pub declared: TableChanges,
    /// The current rows of the declared tables' keys mentioned, table by table.
    pub table_rows: Vec<(Arc<Table>, Vec<TableRow>)>,
}

impl Batch {
    /// Every change read, fresh then late.
    pub fn changes(&self) -> impl Iterator<Item = &Change> {
        self.fresh.iter().chain(&self.late)
    }
}

/// Reads one batch after `cursor`: at most `limit` fresh and `limit` late changes, and the rows
/// they mention, all in one snapshot. `early`: the batch likely finds changes (the last one did,
/// or a notification came), so our own transaction id is drawn with the snapshot.
///
/// Requests are pipelined: one statement for the snapshot, the changes and the users' rows
/// ([`super::statements::batch_query`]) costs one round trip. With tables declared it runs in a
/// transaction (BEGIN in the same round trip) then left open ([`Read::open`]) for the caller to
/// commit while it applies the batch. A batch that also needs our transaction id (drawn late) or
/// declared tables' rows reads them in a second round trip, with the COMMIT. Any database error
/// ends the session (and the connection with it), so the transaction never outlives a failure.
///
/// The transactions that may hide rows below the new position are those running at the snapshot
/// and every id from its xmax up to one of our own (see [`in_flight`]): the later ours is drawn,
/// the more ids land in that range, each to be remembered and looked up. While changes keep
/// coming, ours is drawn in the snapshot's own statement; an idle poll draws none, and a batch
/// that finds changes after one draws it in the second round trip.
pub async fn read(
    client: &Client,
    st: &Statements,
    cursor: &Cursor,
    limit: i64,
    early: bool,
    declared_tables: &Tables,
) -> Result<Read, CdcError> {
    // Every pending transaction is asked for: those that finished in the snapshot answer.
    let txids: Vec<String> = cursor.pending.iter().map(|p| p.txid.to_string()).collect();
    let afters: Vec<i64> = cursor.pending.iter().map(|p| p.after).collect();
    let uptos: Vec<i64> = cursor.pending.iter().map(|p| p.upto).collect();
    let params: [&(dyn ToSql + Sync); 6] =
        [&cursor.position, &limit, &txids, &afters, &uptos, &early];
    // Declared tables' rows are read in a second statement, in the batch's snapshot: that takes a
    // transaction. With no table declared the batch's one statement is its snapshot, and BEGIN and
    // COMMIT would be two statements more for the backend to run.
    let transaction = !declared_tables.names().is_empty();
    let begin = async {
        match transaction {
            true => {
                client
                    .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await
            }
            false => Ok(()),
        }
    };
    // The version horizon is read first, in a statement of its own before the snapshot.
    let (horizon, _, mut rows) = tokio::try_join!(
        client.query_one(&st.horizon, &[]),
        begin,
        client.query(&st.batch, &params),
    )?;
    let read_at: i64 = horizon.get(0);
    // The batch's own row comes last (a UNION ALL's branches come in order).
    let json: BatchJson = match rows.pop().map(|row| row.try_get::<_, String>(0)) {
        Some(Ok(text)) => serde_json::from_str(&text).map_err(|e| {
            db::DbError::said(db::DbErrorKind::Server, format!("cdc batch read: {e}"))
        })?,
        _ => {
            return Err(
                db::DbError::said(db::DbErrorKind::Server, "cdc batch read: no batch row").into(),
            )
        }
    };
    let early_xid = json.xid;
    let mut snapshot = Snapshot {
        xmin: parse_xid(json.xmin)?,
        xmax: parse_xid(json.xmax)?,
        running: json
            .running
            .into_iter()
            .map(parse_xid)
            .collect::<Result<_, _>>()?,
    };
    let fresh: Vec<Change> = json.fresh.into_iter().map(Change::from).collect();
    let late: Vec<Change> = json.late.into_iter().map(Change::from).collect();
    let (mentioned, truncate, declared) = mentions(fresh.iter().chain(&late), declared_tables);
    // Only the rows of names a well-formed change mentions (the query may have read more).
    let rows: Vec<tokio_postgres::Row> = rows
        .into_iter()
        .filter(|row| {
            row.try_get::<_, &str>("username")
                .is_ok_and(|name| mentioned.contains_key(&Key::user(name)))
        })
        .collect();

    // The position moves past the fresh rows: the transactions that may still hide rows below it
    // must all be known (see `in_flight`), which takes a transaction id of our own.
    let early_xid = early_xid.filter(|_| !fresh.is_empty());
    let need_xid = !fresh.is_empty() && early_xid.is_none();
    let (own_xid, table_rows, open) = if need_xid || !declared.is_empty() {
        let own_xid = async {
            match need_xid {
                false => Ok(early_xid.clone()),
                true => client
                    .query_one(&st.own_xid, &[])
                    .await
                    .map(|row| Some(row.get(0))),
            }
        };
        // Declared tables' rows are read in the same round trip, before the COMMIT (in the
        // snapshot): the requests go out in the order the futures are first polled (their
        // statements were prepared above: a read that had to prepare first would go out after
        // the COMMIT, outside the snapshot).
        let reads =
            match tables::prepare_reads(client, &st.tables, declared_tables, &declared).await {
                Ok(reads) => reads,
                Err(e) => {
                    // Read again later (a table not checked yet), in a snapshot of its own: a
                    // transaction left open would hand its old snapshot to the next read, whose
                    // version horizon is newer than the rows it would read.
                    end(client, transaction).await?;
                    return Err(e);
                }
            };
        let table_rows = tables::current_rows(client, declared_tables, &reads);
        let (own_xid, table_rows, _) = tokio::try_join!(
            async { Ok::<_, CdcError>(own_xid.await?) },
            table_rows,
            async { Ok::<_, CdcError>(end(client, transaction).await?) },
        )?;
        (own_xid, table_rows, false)
    } else {
        (early_xid, Vec::new(), transaction)
    };
    // A row that cannot be served is skipped, once per change, and its name gets a tombstone (the
    // plan treats it as missing): the rest of the batch is applied.
    let (rows, broken) = User::from_rows(&rows);
    for e in &broken {
        tracing::warn!(username = ?e.username, error = %e.reason, "cdc skipped a row that cannot be served");
    }
    if let Some(own) = own_xid {
        let own = parse_xid(own)?;
        snapshot.running = in_flight(snapshot.xmax, snapshot.running, own);
    }
    let batch = Batch {
        read_at,
        snapshot,
        late_complete: (late.len() as i64) < limit,
        fresh,
        late,
        mentioned,
        truncate,
        rows,
        declared,
        table_rows,
    };
    Ok(Read { batch, open })
}

/// Ends a batch's read-only transaction, if it took one (`open`).
pub async fn end(client: &Client, open: bool) -> Result<(), tokio_postgres::Error> {
    match open {
        true => client.batch_execute("COMMIT").await,
        false => Ok(()),
    }
}

/// One batch as [`read`] returns it.
pub struct Read {
    pub batch: Batch,
    /// Whether its transaction is still open: the caller commits it (see [`end`]), which it
    /// may do while it applies the batch: the transaction only read.
    pub open: bool,
}

/// The names `changes` mention, each with the largest version recorded for it, the largest
/// version horizon of a TRUNCATE among them, and what they say of declared tables. A malformed
/// change is skipped (and said).
fn mentions<'a>(
    changes: impl Iterator<Item = &'a Change>,
    tables: &Tables,
) -> (BTreeMap<Key, i64>, Option<i64>, TableChanges) {
    let mut mentioned: BTreeMap<Key, i64> = BTreeMap::new();
    let mut truncate: Option<i64> = None;
    let mut declared = TableChanges::default();
    for c in changes {
        if let Some(name) = &c.table {
            let malformed = match c.version_drawn {
                _ if c.defect.is_some() => c.defect,
                false => Some("its version is newer than any the version sequence drew"),
                true => {
                    let change = TableChange {
                        op: &c.op,
                        row_key: c.row_key.as_deref(),
                        old_key: c.old_key.as_deref(),
                        old_lookups: c.old_lookups.as_ref(),
                        version: c.version,
                    };
                    let id = tables.id(name);
                    if id.is_none() && declared.undeclared.len() < 16 {
                        declared.undeclared.insert(name.clone());
                    }
                    declared.add(tables, id, change)
                }
            };
            if let Some(reason) = malformed {
                tracing::warn!(id = c.id, op = %c.op, version = c.version, reason, "cdc skipped a malformed outbox row");
            }
            continue;
        }
        if let Some(reason) = c.malformed() {
            tracing::warn!(id = c.id, op = %c.op, version = c.version, reason, "cdc skipped a malformed outbox row");
            continue;
        }
        if c.op == "truncate" {
            truncate = truncate.max(Some(c.version));
        }
        for name in [&c.username, &c.old_username].into_iter().flatten() {
            let v = mentioned.entry(Key::user(name)).or_insert(c.version);
            *v = (*v).max(c.version);
        }
    }
    (mentioned, truncate, declared)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(
        id: i64,
        op: &str,
        username: Option<&str>,
        old: Option<&str>,
        version: i64,
    ) -> Change {
        Change {
            id,
            op: op.into(),
            username: username.map(String::from),
            old_username: old.map(String::from),
            table: None,
            row_key: None,
            old_key: None,
            old_lookups: None,
            version,
            lag_ms: 0,
            version_drawn: version < 100,
            defect: None,
        }
    }

    #[test]
    fn a_batch_mentions_each_name_at_its_largest_version_and_skips_forged_rows() {
        let changes = [
            change(1, "insert", Some("a"), None, 3),
            change(2, "update", Some("b"), Some("a"), 5),
            change(3, "delete", None, Some("b"), 7),
            change(4, "truncate", None, None, 8),
            // Forged: a version the sequence never drew, an unknown op, a delete naming no one.
            change(5, "update", Some("c"), None, 500),
            change(6, "upsert", Some("c"), None, 9),
            change(7, "delete", Some("c"), None, 9),
            // A declared table's truncate is not users'.
            Change {
                table: Some("accounts".into()),
                ..change(8, "truncate", None, None, 9)
            },
        ];
        let (mentioned, truncate, _) = mentions(changes.iter(), &Tables::default());
        assert_eq!(
            mentioned,
            BTreeMap::from([(Key::user("a"), 5), (Key::user("b"), 7)])
        );
        assert_eq!(truncate, Some(8));
    }
}
