//! Bounds in time, written once: every backend call is bounded by [`within`], and every retry
//! loop waits by a [`Backoff`].

use std::future::Future;
use std::time::Duration;

/// `call`'s result, or `timed_out(bound)` once it has run for `bound` (the call is dropped then).
///
/// A combinator, not an `async fn`: an async wrapper would keep `call` twice in its state (as its
/// argument and inside the timeout), and the request path's futures are moved whole when a task
/// is spawned or a batch boxed (the benchmark's miss path measured the difference).
pub fn within<T, E, E0>(
    bound: Duration,
    call: impl Future<Output = Result<T, E0>>,
    timed_out: impl FnOnce(Duration) -> E,
) -> impl Future<Output = Result<T, E>>
where
    E: From<E0>,
{
    use futures::FutureExt;
    tokio::time::timeout(bound, call).map(move |answered| match answered {
        Ok(result) => result.map_err(E::from),
        Err(_) => Err(timed_out(bound)),
    })
}

/// Waits that grow: `first`, doubling each time up to `cap`, and `first` again after a
/// [`Backoff::reset`] (what every retry loop waits by; a fixed wait is `first == cap`).
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap: cap.max(first),
            next: first,
        }
    }

    /// The same wait every time.
    pub fn fixed(every: Duration) -> Backoff {
        Backoff::new(every, every)
    }

    /// The wait to take now; the next one is twice as long, up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.cap);
        now
    }

    /// After a success: the next wait is the first again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Waits [`Backoff::next_wait`]; false when `stop` came first.
    pub async fn wait(&mut self, stop: &tokio_util::sync::CancellationToken) -> bool {
        let wait = self.next_wait();
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

/// How often a repeated warning (refused peers, failing accepts, repeated drops) is said at most.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// A warning said at most once per period, with how many were left unsaid since.
pub struct RateLimited {
    every: Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub fn new(every: Duration) -> Self {
        RateLimited {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Calls `say` with the number suppressed since the last time, unless that was too recent.
    pub fn say(&mut self, say: impl FnOnce(u64)) {
        if self.last.is_some_and(|at| at.elapsed() < self.every) {
            self.suppressed += 1;
            return;
        }
        say(self.suppressed);
        self.suppressed = 0;
        self.last = Some(std::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_start_over_after_a_reset() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        let waits: Vec<_> = (0..5).map(|_| backoff.next_wait()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), ms(100));
        let mut fixed = Backoff::fixed(ms(30));
        assert_eq!([fixed.next_wait(), fixed.next_wait()], [ms(30), ms(30)]);
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait() {
        let stop = tokio_util::sync::CancellationToken::new();
        stop.cancel();
        let mut backoff = Backoff::fixed(Duration::from_secs(3600));
        assert!(!backoff.wait(&stop).await);
    }

    #[tokio::test]
    async fn a_call_past_its_bound_is_the_timeout_error() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<(), String>(())
        };
        let bound = Duration::from_millis(10);
        let e = within(bound, slow, |b| format!("after {b:?}")).await;
        assert_eq!(e, Err("after 10ms".to_owned()));
    }
}
