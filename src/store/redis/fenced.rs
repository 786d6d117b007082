//! What the fences refused, and what the health monitor is told of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tokio::sync::Notify;

use super::scripts::Outcome;

/// Live writes the fence refused, fences found missing where the monitor does not look, and
/// the health monitor's alarm.
pub struct Fenced {
    refused: AtomicU64,
    /// A slot was found without its fence by a drop, on a primary whose anchor slot has one (a
    /// primary restarted from a snapshot older than slots it serves now): the monitor's look
    /// sees only the anchor, so the next one sets every missing fence of every primary.
    missing: AtomicBool,
    /// The health monitor's alarm (`Confirmations::alarm`).
    pub(super) alarm: Arc<Notify>,
}

impl Fenced {
    pub(super) fn new(alarm: Arc<Notify>) -> Fenced {
        Fenced {
            refused: AtomicU64::new(0),
            missing: AtomicBool::new(false),
            alarm,
        }
    }

    pub(super) fn count(&self, outcomes: &[Outcome]) {
        let fenced = outcomes.iter().filter(|o| **o == Outcome::Fenced).count() as u64;
        if fenced > 0 {
            self.refused.fetch_add(fenced, Relaxed);
            self.alarm.notify_one();
        }
    }

    pub(super) fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    pub(super) fn missing_seen(&self) {
        self.missing.store(true, Relaxed);
        self.alarm.notify_one();
    }

    /// Whether a fence was found missing since the last call.
    pub(super) fn take_missing(&self) -> bool {
        self.missing.swap(false, Relaxed)
    }
}
