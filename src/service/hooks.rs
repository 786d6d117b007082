//! Test-only interleaving points, built with the `test-hooks` cargo feature (the integration tests
//! turn it on): pauses a test holds a request at to drive a race on purpose, and a way to wedge the
//! health monitor. Without the feature [`Hooks`] is empty, and the pauses (each call site is
//! `#[cfg(feature = "test-hooks")]`) are not compiled at all.

#[cfg(feature = "test-hooks")]
use std::{future::Future, pin::Pin, sync::Arc};

/// A pause point: called with a key's text (a username, or a declared table's key text), the
/// request waits until the returned future is done.
#[cfg(feature = "test-hooks")]
pub type FillHook = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The pause points of one daemon; all `None` unless a test sets them.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Runs after a cache-aside fill read its row and before it writes Redis.
    #[cfg(feature = "test-hooks")]
    pub before_fill: Option<FillHook>,
    /// Runs after a `get` missed Redis and before it joins (or starts) the database read.
    #[cfg(feature = "test-hooks")]
    pub after_miss: Option<FillHook>,
    /// Runs before each check of the declared tables against the catalog (with "first" or
    /// "again"): holding it keeps them unchecked.
    #[cfg(feature = "test-hooks")]
    pub before_table_check: Option<FillHook>,
}

#[cfg(feature = "test-hooks")]
impl Hooks {
    /// Holds a fill of `names` between its database read and its Redis write.
    pub(crate) async fn pause_before_fill(&self, names: &[&str]) {
        if let Some(hook) = &self.before_fill {
            for name in names {
                hook(name.to_string()).await;
            }
        }
    }

    /// Holds a check of the declared tables (`first`: the one at start).
    pub(crate) async fn pause_before_table_check(&self, first: bool) {
        if let Some(hook) = &self.before_table_check {
            hook(if first { "first" } else { "again" }.into()).await;
        }
    }

    /// Holds the misses on `names` between their Redis read and their database read.
    pub(crate) async fn pause_after_miss(&self, names: &[&str]) {
        if let Some(hook) = &self.after_miss {
            for name in names {
                hook(name.to_string()).await;
            }
        }
    }
}

/// `CACHEWARD_TEST_WEDGE_MONITOR_AFTER_MS` makes the health monitor hang after that long, as a
/// wedged loop would (the watchdog tests need one). Always `None` without `test-hooks`.
pub fn monitor_wedge() -> Option<std::time::Duration> {
    if !cfg!(feature = "test-hooks") {
        return None;
    }
    let ms: u64 = std::env::var("CACHEWARD_TEST_WEDGE_MONITOR_AFTER_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms))
}
