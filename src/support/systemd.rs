//! systemd integration through `sd_notify`: `READY=1` once the daemon is ready (the reference's
//! readiness), `STATUS=` one-line summaries, `STOPPING=1` when shutdown begins, and `WATCHDOG=1`
//! at half of `WatchdogSec` while the daemon's own loops are alive. Without `NOTIFY_SOCKET` (not
//! under systemd) every call does nothing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Counters bumped by the loops the watchdog vouches for, once per iteration. The health monitor
/// runs every 250 ms whatever the load, so a counter that stops means a wedged loop, and on the
/// one-thread runtime also a blocked thread (the watchdog itself would not run then either).
#[derive(Debug, Default)]
pub struct Heartbeats {
    pub monitor: AtomicU64,
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Pings at half of `period` while the monitor's heartbeat moved within the last
/// max(`period` / 2, 1 s); withholds the ping (and says so once) when it did not, so that systemd
/// restarts a wedged daemon.
pub async fn watchdog(period: Duration, beats: Arc<Heartbeats>, stop: CancellationToken) {
    let stale = (period / 2).max(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(period / 2);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = beats.monitor.load(Relaxed);
    let mut moved_at = tokio::time::Instant::now();
    let mut withheld = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = beats.monitor.load(Relaxed);
        if now != last {
            (last, moved_at) = (now, tokio::time::Instant::now());
        }
        if moved_at.elapsed() < stale {
            send(&[NotifyState::Watchdog]);
            if withheld {
                tracing::warn!("watchdog pings resumed");
            }
            withheld = false;
        } else if !withheld {
            tracing::error!(
                period_ms = period.as_millis() as u64,
                "watchdog ping withheld: the health monitor loop is stuck"
            );
            withheld = true;
        }
    }
}
