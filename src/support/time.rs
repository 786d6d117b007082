//! Bounds in time, written once: every backend call is bounded by [`within`], and every retry
//! loop waits by a [`Backoff`].

use std::future::Future;
use std::time::Duration;

/// `call`'s result, or `timed_out(bound)` once it has run for `bound` (the call is dropped then).
pub async fn within<T, E, E0>(
    bound: Duration,
    call: impl Future<Output = Result<T, E0>>,
    timed_out: impl FnOnce(Duration) -> E,
) -> Result<T, E>
where
    E: From<E0>,
{
    match tokio::time::timeout(bound, call).await {
        Ok(result) => result.map_err(E::from),
        Err(_) => Err(timed_out(bound)),
    }
}
