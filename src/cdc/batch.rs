//! One batch of the CDC worker's loop: read, plan, apply, advance — and, while Redis applies it,
//! the read of the next one when a change is known to wait (a notification came, or the batch was
//! full), so that a change committed during an apply waits for no more than the read it needs.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tokio::sync::Notify;
use tokio_postgres::Client;

use super::apply::Unsaved;
use super::cursor::Cursor;
use super::outbox::{self, Batch};
use super::plan::Plan;
use super::statements::Statements;
use super::{Applier, CdcError, Following};

/// A batch read while the one before it was applied, from the cursor that one moved to.
pub(super) struct Ahead {
    read: outbox::Read,
    /// The cursor it was read after: it is used only if the loop's cursor is still that one (a
    /// replay moves it back, a failed apply keeps it where it was).
    from: Cursor,
    started: Instant,
}

impl Applier {
    /// Reads, applies and records one batch; returns how many fresh rows it read, and how many
    /// changes (late ones too). `early`: changes are likely (see [`outbox::read`]). The batch is
    /// `ahead`'s if it was read from `cursor`; `ahead` is then the next batch if one was read
    /// while this one applied.
    ///
    /// Reading ahead is safe because nothing a read sees depends on Redis: every write carries
    /// the version PostgreSQL gave it, and the applies stay in order. Only the cursor needs the
    /// apply: the next batch is read from where this one would move it, and dropped (its
    /// transaction ended) if the apply fails.
    pub(super) async fn batch(
        &self,
        f: &Following<'_>,
        cursor: &mut Cursor,
        early: bool,
        unsaved: &mut Unsaved,
        ahead: &mut Option<Ahead>,
    ) -> Result<(usize, usize), CdcError> {
        let (client, st) = (f.client, f.statements);
        let (outbox::Read { batch, open }, started) = match ahead.take() {
            Some(next) if next.from == *cursor => (next.read, next.started),
            stale => {
                if let Some(stale) = stale {
                    self.discard(client, stale).await?;
                }
                let started = Instant::now();
                (self.read(client, st, cursor, early).await?, started)
            }
        };
        let plan = Plan::of(
            self.config.cdc.mode,
            &batch,
            self.config.cache.max_entry_bytes,
        );
        // While Redis applies, off the changes' way to it: the read-only transaction ends, and a
        // moved cursor is stored (see `Unsaved`), in one round trip.
        let store = unsaved
            .carry()
            .then(|| (unsaved.storable(cursor).clone(), unsaved.missed.clone()));
        let consumer = self.consumer();
        let holder = outbox::Holder {
            consumer: &consumer,
            holder: &self.holder,
        };
        let finish = async {
            let commit = async { Ok(outbox::end(client, open).await?) };
            let stored = async {
                match &store {
                    Some((stored, missed)) => {
                        outbox::store_cursor(client, st, holder, stored, missed).await
                    }
                    None => Ok(()),
                }
            };
            tokio::try_join!(commit, stored).map(|_| ())
        };
        let past = past(cursor, &batch);
        // Only a batch that read changes reads ahead: a flood of empty notifications costs at
        // most one read more per batch of real changes.
        let may_read_ahead = batch.changes().next().is_some();
        let full = batch.fresh.len() >= self.config.cdc.batch_size;
        let applied_signal = Notify::new();
        let applying = async {
            let applied = self.apply(&plan).await;
            applied_signal.notify_one();
            applied
        };
        let reading = async {
            self.bounded("commit", finish).await?;
            if !may_read_ahead {
                return Ok(None);
            }
            if !full {
                // A notification during the apply: its change is read now, not after it.
                tokio::select! {
                    biased;
                    _ = applied_signal.notified() => return Ok(None),
                    _ = f.wake.notified() => {}
                }
            }
            let started = Instant::now();
            match self.read(client, st, &past, true).await {
                Ok(read) => Ok(Some(Ahead {
                    read,
                    from: past.clone(),
                    started,
                })),
                // Read again, in its turn (a table not checked yet).
                Err(CdcError::Unchecked(_)) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let (applied, next) = tokio::join!(applying, reading);
        let next = next?;
        if store.is_some() {
            unsaved.stored();
        }
        let missed = match applied {
            Ok(missed) => missed,
            Err(e) => {
                if let Some(next) = next {
                    self.discard(client, next).await?;
                }
                return Err(e);
            }
        };
        *ahead = next;
        if !missed.is_empty() {
            let upto = batch
                .changes()
                .map(|c| c.id)
                .max()
                .unwrap_or(cursor.position);
            unsaved.hold(cursor, &missed, upto);
        }
        if past != *cursor {
            *cursor = past;
            unsaved.moved = true;
            // Reported as applied (it is stored with the next read, or soon after).
            self.stats.cursor.store(cursor.position, Relaxed);
        }
        unsaved.settle_missed(cursor.position);
        self.record(&batch, &plan, cursor, started);
        Ok((batch.fresh.len(), batch.changes().count()))
    }

    /// One batch's read after `cursor`, bounded in time and counted.
    async fn read(
        &self,
        client: &Client,
        st: &Statements,
        cursor: &Cursor,
        early: bool,
    ) -> Result<outbox::Read, CdcError> {
        let limit = self.config.cdc.batch_size as i64;
        let read = outbox::read(client, st, cursor, limit, early, &self.tables);
        let read = self.bounded("batch read", read).await?;
        self.stats.polls.fetch_add(1, Relaxed);
        self.say_undeclared(&read.batch.declared.undeclared);
        Ok(read)
    }

    /// Drops a batch read ahead, ending its transaction if it left one open: the connection is
    /// then free for the cursor's store (a read-only transaction would refuse it).
    pub(super) async fn discard(&self, client: &Client, ahead: Ahead) -> Result<(), CdcError> {
        let end = async { Ok(outbox::end(client, ahead.read.open).await?) };
        self.bounded("commit", end).await
    }
}

/// The cursor past `batch`, read after `cursor`.
fn past(cursor: &Cursor, batch: &Batch) -> Cursor {
    cursor.advance(
        &batch.snapshot,
        batch.fresh.last().map(|c| c.id),
        batch.late_complete,
        batch.late.last().map_or(0, |c| c.id),
    )
}
