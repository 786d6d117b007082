//! The last steps of a CDC batch: apply its plan to Redis, store the cursor (see [`Unsaved`]),
//! record its lag.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::cursor::{Cursor, Missed};
use super::outbox::{self, Batch};
use super::plan::{fence_after, Plan};
use super::statements::Statements;
use super::{Applier, CdcError};

/// Whether the cursor moved since it was last stored, and when it was. A moved cursor is stored
/// while a batch is applied to Redis, at most every [`CARRY_EVERY`] (no round trip of its own, none
/// on the way of a change to Redis, and no write per batch, while changes keep coming), or after [`SAVE_AFTER`] without a batch, before
/// a prune, and before the session ends. A cursor stored late only replays changes already
/// applied (every write is versioned).
///
/// While changes that a Redis node missed are not applied yet (their primary did not answer: see
/// `Cache::apply_or_miss`), the cursor from before the first of them, the *floor*, is stored
/// instead: a daemon that stops or dies meanwhile, or the next leader, replays them, and this one
/// replays them from it once every primary answers again ([`Unsaved::replay`]).
///
/// The slots of the changes passed over are stored with it ([`Missed`]) until everything up to
/// the position read when the last was passed over is applied: every daemon's monitor reads them
/// and sends those slots' reads to PostgreSQL meanwhile.
#[derive(Default)]
pub(super) struct Unsaved {
    pub moved: bool,
    stored: Option<Instant>,
    floor: Option<Cursor>,
    pub missed: Missed,
}

impl Unsaved {
    /// The batch after `before`, read up to outbox id `upto`, passed over changes in `slots`:
    /// stores go no further than `before` until they are replayed, and say the slots missed.
    pub fn hold(&mut self, before: &Cursor, slots: &[u16], upto: i64) {
        if self.floor.is_none() {
            self.floor = Some(before.clone());
        }
        self.missed.slots.extend(slots.iter().copied());
        self.missed.upto = self.missed.upto.max(upto);
        self.moved = true;
    }

    /// The cursor is at `position`: once nothing waits to be replayed and everything up to the
    /// last change passed over is applied, no slot is missed any more (stored with the next
    /// store).
    pub fn settle_missed(&mut self, position: i64) {
        if self.floor.is_none() && !self.missed.slots.is_empty() && position >= self.missed.upto {
            self.missed = Missed::default();
            self.moved = true;
        }
    }

    /// What a store stores: the floor while there is one, else `cursor`.
    pub fn storable<'a>(&'a self, cursor: &'a Cursor) -> &'a Cursor {
        self.floor.as_ref().unwrap_or(cursor)
    }

    /// The floor to replay from, once `answering()` (every primary answers; asked only while
    /// there is a floor): the cursor goes back to it and the changes since are applied again
    /// (every write is versioned).
    pub fn replay(&mut self, answering: impl FnOnce() -> bool) -> Option<Cursor> {
        match self.floor.is_some() && answering() {
            true => self.floor.take(),
            false => None,
        }
    }

    /// Whether the next batch carries the cursor's store.
    pub fn carry(&self) -> bool {
        self.moved && self.stored.is_none_or(|at| at.elapsed() >= CARRY_EVERY)
    }

    /// The cursor was stored.
    pub fn stored(&mut self) {
        self.moved = false;
        self.stored = Some(Instant::now());
    }
}

/// How long a moved cursor waits for the next batch to carry it before it is stored alone.
pub(super) const SAVE_AFTER: Duration = Duration::from_millis(50);
/// The least time between two stores carried by batches: a store is a write (and a commit) in
/// PostgreSQL, the costliest statement a batch sends.
const CARRY_EVERY: Duration = Duration::from_millis(50);

/// A change applied later than this after it was made is worth a warning.
const LAG_WARN_MS: u64 = 5_000;
/// How often `cdc lagging` repeats while the lag lasts.
const LAG_WARN_EVERY: Duration = Duration::from_secs(60);

impl Applier {
    /// Writes `plan` to Redis: a TRUNCATE's fence and drop first, then the writes in one call.
    /// Returns the slots of the changes passed over (their primary does not answer).
    pub(super) async fn apply(&self, plan: &Plan) -> Result<Vec<u16>, CdcError> {
        if let Some(fence) = plan.truncate_fence() {
            let dropped = self.cache.drop_users(fence).await?;
            tracing::info!(dropped, "cdc applied a TRUNCATE: every cached user dropped");
        }
        for (&table, &version) in &plan.table_truncates {
            let dropped = self.cache.drop_table(fence_after(version), table).await?;
            let table = self.tables.name(table);
            tracing::info!(
                dropped,
                table,
                "cdc applied a TRUNCATE of a declared table: its cached rows dropped"
            );
        }
        let (missed, slots) = self.cache.apply_or_miss(&plan.writes).await?;
        if missed > 0 {
            self.stats.missed.fetch_add(missed as u64, Relaxed);
            tracing::debug!(
                missed,
                "cdc passed over changes whose redis node does not answer"
            );
        }
        Ok(slots)
    }

    /// Stores `cursor` and reports its position.
    pub(super) async fn store_cursor(
        &self,
        client: &Client,
        st: &Statements,
        cursor: &Cursor,
        missed: &Missed,
    ) -> Result<(), CdcError> {
        let consumer = self.consumer();
        let by = outbox::Holder {
            consumer: &consumer,
            holder: &self.holder,
        };
        let store = outbox::store_cursor(client, st, by, cursor, missed);
        self.bounded("cursor store", store).await?;
        // The applied position may be past it (a floor is stored: see `Unsaved`).
        self.stats.cursor.fetch_max(cursor.position, Relaxed);
        Ok(())
    }

    /// Stores `cursor` if it moved since it was last stored.
    pub(super) async fn save(
        &self,
        client: &Client,
        st: &Statements,
        cursor: &Cursor,
        unsaved: &mut Unsaved,
    ) -> Result<(), CdcError> {
        if unsaved.moved {
            self.store_cursor(client, st, unsaved.storable(cursor), &unsaved.missed)
                .await?;
            unsaved.stored();
        }
        Ok(())
    }

    /// Counts an applied batch and its lag (each change's age when read plus the batch's own time).
    pub(super) fn record(&self, batch: &Batch, plan: &Plan, cursor: &Cursor, started: Instant) {
        let applied = batch.changes().count();
        if applied == 0 {
            self.stats.last_lag_ms.store(0, Relaxed);
            return;
        }
        let elapsed = started.elapsed().as_millis() as i64;
        let mut worst = 0;
        for c in batch.changes() {
            let lag = (c.lag_ms.max(0) + elapsed) as u64;
            self.stats.record_lag(lag);
            worst = worst.max(lag);
        }
        self.stats.last_lag_ms.store(worst, Relaxed);
        self.watch_lag(worst);
        self.stats.applied.fetch_add(applied as u64, Relaxed);
        self.stats.batches.fetch_add(1, Relaxed);
        tracing::debug!(
            changes = applied,
            took_us = started.elapsed().as_micros() as u64,
            late = batch.late.len(),
            pending = cursor.pending.len(),
            writes = plan.writes.len(),
            position = cursor.position,
            lag_ms = worst,
            "cdc batch applied"
        );
    }

    /// `cdc lagging` once the lag passes [`LAG_WARN_MS`] (then at most every [`LAG_WARN_EVERY`]),
    /// `cdc caught up` once it is back under.
    fn watch_lag(&self, lag_ms: u64) {
        let mut warned = self.lag_warned.lock().expect("lag lock is never poisoned");
        if lag_ms > LAG_WARN_MS {
            if warned.is_none_or(|at| at.elapsed() >= LAG_WARN_EVERY) {
                tracing::warn!(lag_ms, "cdc lagging");
                *warned = Some(Instant::now());
            }
        } else if warned.take().is_some() {
            tracing::info!(lag_ms, "cdc caught up");
        }
    }
}
