//! Where a session starts from: the consumer's stored cursor, or on a first start or after a gap
//! in the outbox, the head behind a fence (see [`Applier::resync`]).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio_postgres::Client;

use super::cursor::Cursor;
use super::outbox;
use super::statements::Statements;
use super::{Applier, CdcError};
use crate::store::redis::CacheErrorKind;

impl Applier {
    /// Loads this consumer's cursor; decides on a first start or a gap whether to replay or resync.
    pub(super) async fn load_cursor(
        &self,
        client: &Client,
        st: &Statements,
    ) -> Result<Cursor, CdcError> {
        let consumer = self.consumer();
        let load = outbox::load_cursor(client, &consumer);
        let (stored, pruned_upto) = self.bounded("cursor load", load).await?;
        let inherited = self.inherited.lock().expect("never poisoned").take();
        let inherited = match (&stored, inherited) {
            (None, Some(before)) => {
                let load = outbox::load_cursor(client, &before);
                self.bounded("cursor load", load).await?.0
            }
            _ => None,
        };
        let cursor = match (stored, inherited) {
            (Some(cursor), _) => cursor,
            (None, Some(cursor)) => {
                // Kept under the new consumer from now on.
                self.store_cursor(client, st, &cursor, &Default::default())
                    .await?;
                cursor
            }
            (None, None) => {
                // First start for this cache. One with entries replays what the outbox retains
                // (its TTL bounds anything older). An empty one starts at the head, behind a
                // fence at the head's horizon, every entry a fill made meanwhile dropped: a
                // fill that read a row before a change the cursor passes over cannot land.
                let cached = self.cache.any_entry().await?;
                let cursor = if cached {
                    Cursor::default()
                } else {
                    // Transactions in flight may still commit changes below the head.
                    let head = outbox::head(client, pruned_upto);
                    let (cursor, horizon) = self.bounded("outbox head", head).await?;
                    self.fence_empty_cache(horizon).await?;
                    cursor
                };
                self.store_cursor(client, st, &cursor, &Default::default())
                    .await?;
                if cached && pruned_upto == 0 {
                    tracing::info!(consumer = %self.consumer(), "cdc first start: replaying the retained outbox");
                }
                cursor
            }
        };
        if cursor.low_water() < pruned_upto {
            return self
                .resync(
                    client,
                    st,
                    pruned_upto,
                    "changes newer than the cursor were pruned from the outbox",
                )
                .await;
        }
        Ok(cursor)
    }

    /// Raises the fence to `horizon` and drops what was filled meanwhile. On a first start the
    /// health monitor may not have set the fence yet (it does within 250 ms while PostgreSQL
    /// answers): waited for, up to 3 s, rather than a reconnection.
    async fn fence_empty_cache(&self, horizon: i64) -> Result<(), CdcError> {
        let mut tries = 0;
        loop {
            match self.cache.drop_all(horizon).await {
                Err(e) if e.kind() == CacheErrorKind::Unfenced && tries < 30 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                result => return result.map(|_| ()).map_err(Into::into),
            }
        }
    }

    /// Starts over from the head of the outbox after history was lost: the cache is fenced at a
    /// fresh version horizon and every cached entry dropped (so no entry older than now survives,
    /// and no write that read before now can land), and the cursor jumps to the newest change.
    async fn resync(
        &self,
        client: &Client,
        st: &Statements,
        pruned_upto: i64,
        reason: &str,
    ) -> Result<Cursor, CdcError> {
        tracing::warn!(consumer = %self.consumer(), reason, "cdc resync: dropping every cached user entry");
        let head = outbox::head(client, pruned_upto);
        let (cursor, horizon) = self.bounded("outbox head", head).await?;
        let dropped = self.cache.drop_all(horizon).await?;
        let position = cursor.position;
        self.store_cursor(client, st, &cursor, &Default::default())
            .await?;
        self.stats.resyncs.fetch_add(1, Relaxed);
        tracing::warn!(consumer = %self.consumer(), dropped, position, "cdc resync done");
        Ok(cursor)
    }
}
