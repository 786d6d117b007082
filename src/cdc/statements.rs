//! The SQL of the batch loop: each statement's text once, prepared once per session.

use tokio_postgres::{Client, Statement};

use super::tables;
use crate::store::pg as db;

/// The statements of the batch loop, prepared once per session: each then costs one round trip
/// (an unprepared query costs two).
pub struct Statements {
    /// A batch's read: see [`batch_query`].
    pub(super) batch: Statement,
    pub(super) own_xid: Statement,
    pub(super) store_cursor: Statement,
    pub(super) horizon: Statement,
    /// The declared tables' reads, prepared as batches need them.
    pub(super) tables: tables::TableStatements,
}

impl Statements {
    pub async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        let sequence = outbox_sequence(client).await?;
        let batch = batch_query(sequence);
        let (batch, own_xid, store_cursor, horizon) = tokio::try_join!(
            client.prepare(&batch),
            client.prepare("SELECT pg_current_xact_id()::text"),
            // Only the lease's holder ($4) stores: a worker that lost it stores nothing.
            client.prepare(
                "INSERT INTO cacheward_cdc_cursors (consumer, position, pending, missed_slots, missed_upto)
                 SELECT $1, $2, $3::text::jsonb, $5, $6
                  WHERE EXISTS (SELECT 1 FROM cacheward_cdc_leases WHERE consumer = $1 AND holder = $4)
                 ON CONFLICT (consumer) DO UPDATE SET position = $2, pending = $3::text::jsonb,
                     missed_slots = $5, missed_upto = $6, updated_at = now()",
            ),
            client.prepare(db::HORIZON),
        )?;
        Ok(Statements {
            batch,
            own_xid,
            store_cursor,
            horizon,
            tables: Default::default(),
        })
    }
}

/// The changes after the cursor: `$1` its position, `$2` the row limit; `sequence` is the outbox
/// ids' (see [`outbox_sequence`]).
fn fresh_query(columns: &str, sequence: i64) -> String {
    format!(
        "SELECT {columns} FROM cacheward_outbox o
         WHERE o.id > $1 AND o.id <= coalesce(pg_sequence_last_value({sequence}::oid), 0)
         ORDER BY o.id LIMIT $2"
    )
}

/// The oid of the sequence behind the outbox's ids, found once per session: a lookup by name at
/// every batch costs a fifth of a read.
pub async fn outbox_sequence(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_get_serial_sequence('cacheward_outbox', 'id')::regclass::oid::bigint",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The rows of pending transactions that have finished in the transaction's snapshot: `$1`
/// txids, `$2` afters, `$3` uptos (one each), `$4` the row limit. One primary-key range scan per
/// transaction, whatever the outbox's size: the LIMIT inside the LATERAL keeps PostgreSQL from
/// flattening it into a hash join over a sequential scan of the whole outbox (what it chose
/// without it: 30 ms at 300 000 rows, and every batch after a busy one paid it).
pub fn late_query() -> String {
    late_from(&change_columns(), ["$1", "$2", "$3", "$4"])
}

/// [`late_query`] selecting `columns`, with its parameters numbered as `params` says.
fn late_from(columns: &str, [txids, afters, uptos, limit]: [&str; 4]) -> String {
    format!(
        "SELECT {columns}
         FROM unnest({txids}::text[], {afters}::bigint[], {uptos}::bigint[]) AS p(txid, after, upto)
         CROSS JOIN LATERAL (
             SELECT * FROM cacheward_outbox x
             WHERE x.id > p.after AND x.id <= p.upto AND x.txid = p.txid::xid8
             ORDER BY x.id LIMIT {limit}
         ) o
         WHERE pg_visible_in_snapshot(p.txid::xid8, pg_current_snapshot())
         ORDER BY o.id LIMIT {limit}"
    )
}

/// A batch's read, in one statement and so in one snapshot: the changes after the cursor (`$1`
/// its position, `$2` the row limit), the late ones of pending transactions that finished in the
/// snapshot (`$3`..`$5` their txids, afters and uptos), and the current rows of every user either
/// names. One statement, not one each: every statement in a pipeline costs the backend its own
/// execution and a flush on the batch's critical path (~20 µs each, measured).
///
/// Its rows are the users' (`NULL`, `u.*`, the row's JSON), then one more whose first column,
/// `cacheward_batch`, is the rest as JSON: the snapshot (`xmin`, `xmax`, `running`), our own
/// transaction id when `$6` asks for it (drawn after the snapshot), and the `fresh` and `late`
/// changes, each an object of `change_columns` in id order. The users are found by an array,
/// not a join, so that their unique index is used whatever the estimates.
pub fn batch_query(sequence: i64) -> String {
    let columns = change_columns();
    format!(
        "WITH f AS MATERIALIZED ({fresh}), l AS MATERIALIZED ({late})
         SELECT NULL::text AS cacheward_batch, u.*, row_to_json(u)::text FROM users u
          WHERE u.username = ANY(ARRAY(
              SELECT n FROM (SELECT username, old_username FROM f
                             UNION ALL SELECT username, old_username FROM l) c
              CROSS JOIN LATERAL (VALUES (c.username), (c.old_username)) v(n)))
         UNION ALL
         SELECT json_build_object(
                    'xmin', pg_snapshot_xmin(s)::text,
                    'xmax', pg_snapshot_xmax(s)::text,
                    'running', ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x),
                    'xid', CASE WHEN $6 THEN pg_current_xact_id()::text END,
                    'fresh', (SELECT coalesce(json_agg(f ORDER BY f.id), '[]') FROM f),
                    'late', (SELECT coalesce(json_agg(l ORDER BY l.id), '[]') FROM l))::text,
                (NULL::users).*, NULL
           FROM pg_current_snapshot() s",
        fresh = fresh_query(&columns, sequence),
        late = late_from(&columns, ["$3", "$4", "$5", "$2"]),
    )
}

/// The columns of an outbox `Change`. The lag is clamped to [0, one day]: `changed_at` is what
/// the outbox row says, and no value there (`infinity`, a year 294276 AD) may fail the read. The
/// last column says whether the version sequence can have drawn the row's version (see
/// `Change::malformed`).
fn change_columns() -> String {
    format!(
        "o.id, o.op, o.username, o.old_username, o.version, o.tbl, o.row_key, o.old_key, \
         o.old_lookups::text AS old_lookups, \
         least(greatest((extract(epoch FROM clock_timestamp()) - extract(epoch FROM o.changed_at)) \
                        * 1000, 0), 86400000)::bigint AS lag_ms, \
         o.version <= ({horizon}) AS drawn",
        horizon = db::HORIZON
    )
}

/// The largest outbox id the identity has handed out: a row above it was forged (inserted with
/// OVERRIDING SYSTEM VALUE), and is never read (it would move the cursor past every real change).
pub(super) const OUTBOX_ID_HORIZON: &str = "SELECT coalesce(pg_sequence_last_value(\
     pg_get_serial_sequence('cacheward_outbox', 'id')::regclass), 0)";
