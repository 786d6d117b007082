//! What the CDC worker reports: counters, the cursor, and the change-to-applied lag (a window of
//! percentiles for `stats` and the stats line, cumulative buckets for Prometheus).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use serde::Serialize;

/// Counters and the lag histogram behind `stats` and `health`.
pub struct CdcStats {
    pub applied: AtomicU64,
    /// Batches that applied changes.
    pub batches: AtomicU64,
    /// Reads of the outbox, empty ones included: moves while the worker is alive and idle.
    pub polls: AtomicU64,
    pub reconnects: AtomicU64,
    pub resyncs: AtomicU64,
    /// Changes passed over because their Redis primary did not answer (their names are read
    /// from PostgreSQL until repaired).
    pub missed: AtomicU64,
    pub listening: AtomicBool,
    pub cursor: AtomicI64,
    /// Largest lag of the last batch; 0 once a poll finds nothing new.
    pub last_lag_ms: AtomicU64,
    /// Change-to-applied lag since the last stats line.
    lag: Mutex<hdrhistogram::Histogram<u64>>,
    /// Change-to-applied lag since start: counts per bucket of [`LAG_BUCKETS_MS`] (the last slot
    /// counts the rest), and the sum in ms; the Prometheus histogram.
    pub lag_buckets: [AtomicU64; LAG_BUCKETS_MS.len() + 1],
    pub lag_sum_ms: AtomicU64,
}

/// Upper bounds (ms) of the lag histogram's buckets.
pub const LAG_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000];

impl Default for CdcStats {
    fn default() -> Self {
        CdcStats {
            applied: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            cursor: AtomicI64::new(0),
            last_lag_ms: AtomicU64::new(0),
            lag_buckets: Default::default(),
            lag_sum_ms: AtomicU64::new(0),
            lag: Mutex::new(
                hdrhistogram::Histogram::new(3).expect("3 significant digits is valid"),
            ),
        }
    }
}

impl CdcStats {
    pub(super) fn record_lag(&self, ms: u64) {
        self.lag
            .lock()
            .expect("lag lock is never poisoned")
            .saturating_record(ms);
        let bucket = LAG_BUCKETS_MS
            .iter()
            .position(|&le| ms <= le)
            .unwrap_or(LAG_BUCKETS_MS.len());
        self.lag_buckets[bucket].fetch_add(1, Relaxed);
        self.lag_sum_ms.fetch_add(ms, Relaxed);
    }

    /// Lag percentiles over the current window; `reset` starts a new window.
    pub fn lag(&self, reset: bool) -> LagReport {
        let mut histogram = self.lag.lock().expect("lag lock is never poisoned");
        let report = LagReport {
            p50: histogram.value_at_quantile(0.5),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
        };
        if reset {
            histogram.reset();
        }
        report
    }

    pub fn report(&self, reset_lag: bool) -> CdcReport {
        CdcReport {
            applied: self.applied.load(Relaxed),
            batches: self.batches.load(Relaxed),
            polls: self.polls.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            resyncs: self.resyncs.load(Relaxed),
            missed: self.missed.load(Relaxed),
            lag_ms: self.lag(reset_lag),
        }
    }

    pub fn health(&self) -> CdcHealth {
        CdcHealth {
            listening: self.listening.load(Relaxed),
            cursor: self.cursor.load(Relaxed),
            lag_ms: self.last_lag_ms.load(Relaxed),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct CdcReport {
    pub applied: u64,
    pub batches: u64,
    pub polls: u64,
    pub reconnects: u64,
    pub resyncs: u64,
    pub missed: u64,
    pub lag_ms: LagReport,
}

#[derive(Debug, Default, Serialize)]
pub struct LagReport {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct CdcHealth {
    pub listening: bool,
    pub cursor: i64,
    pub lag_ms: u64,
}
