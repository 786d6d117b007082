//! Who applies a cache's change stream: a lease in `cacheward_cdc_leases` (sql/0004_cdc_lease.sql),
//! held by one worker at a time, renewed at least every [`HEARTBEAT`], taken over by a standby once
//! it is [`LEASE`] old. The same worker reconnecting takes its own lease back at once. Every time
//! is the server's clock, so daemons on hosts whose clocks disagree still agree.

use std::time::Duration;

use tokio_postgres::Client;

use super::CdcError;

/// How long a lease lasts without a renewal: how long a leader that went silent (a frozen
/// connection, a stopped process) holds the stream up at most.
pub const LEASE: Duration = Duration::from_secs(4);
/// How often the leader renews its lease at least: also the heartbeat that finds a silent
/// connection (each renewal is a query, bounded in time).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Takes the lease of `consumer` for `holder` if it is free, expired, or `holder`'s already. A
/// lease that runs further ahead than any holder can set it (a forged row, a clock stepped back)
/// counts as expired: no row can hold the stream up for good.
pub async fn acquire(client: &Client, consumer: &str, holder: &str) -> Result<bool, CdcError> {
    let taken = client
        .query_opt(
            "INSERT INTO cacheward_cdc_leases AS l (consumer, holder, expires_at)
             VALUES ($1, $2, clock_timestamp() + $3 * interval '1 millisecond')
             ON CONFLICT (consumer) DO UPDATE
                SET holder = $2, expires_at = clock_timestamp() + $3 * interval '1 millisecond'
              WHERE l.holder = $2 OR l.expires_at < clock_timestamp()
                 OR l.expires_at > clock_timestamp() + $3 * interval '1 millisecond'
             RETURNING 1",
            &[&consumer, &holder, &(LEASE.as_millis() as f64)],
        )
        .await?;
    Ok(taken.is_some())
}

/// Extends `holder`'s lease; false when it was lost (it expired and another worker took it).
pub async fn renew(client: &Client, consumer: &str, holder: &str) -> Result<bool, CdcError> {
    let renewed = client
        .execute(
            "UPDATE cacheward_cdc_leases
                SET expires_at = clock_timestamp() + $3 * interval '1 millisecond'
              WHERE consumer = $1 AND holder = $2",
            &[&consumer, &holder, &(LEASE.as_millis() as f64)],
        )
        .await?;
    Ok(renewed == 1)
}

/// Gives the lease up (at shutdown), so that a standby takes over at once.
pub async fn release(client: &Client, consumer: &str, holder: &str) -> Result<(), CdcError> {
    client
        .execute(
            "DELETE FROM cacheward_cdc_leases WHERE consumer = $1 AND holder = $2",
            &[&consumer, &holder],
        )
        .await?;
    Ok(())
}
