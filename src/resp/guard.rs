//! Failed `AUTH`s on the TCP front end, counted per peer address: once an address has spent a
//! burst of [`BURST`] wrong passwords, its next tries are refused unchecked, one more allowed per
//! [`REFILL`] — a password cannot be guessed faster than that from one address, whatever the
//! number of connections. Bounded: [`MAX_ADDRESSES`] addresses are remembered at most.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::support::time::RateLimited;

/// Wrong passwords an address may send before it waits.
pub const BURST: u32 = 10;
/// How often an address that spent its burst may try again.
pub const REFILL: Duration = Duration::from_secs(1);
/// The most addresses remembered; past it, those whose burst is whole again are forgotten first.
const MAX_ADDRESSES: usize = 10_000;
/// How often `resp AUTH refused for an address` is said at most.
const SAY_EVERY: Duration = Duration::from_secs(10);

/// What an `AUTH` answers when its address must wait.
pub const REFUSED: &str = "ERR too many failed AUTH attempts from this address: try again later";

#[derive(Default)]
pub struct AuthGuard {
    failures: Mutex<HashMap<IpAddr, Failures>>,
    said: Mutex<Option<RateLimited>>,
}

/// An address's wrong passwords, as a bucket of tries: [`BURST`] full, one back per [`REFILL`].
struct Failures {
    tries: f64,
    at: Instant,
}

impl Failures {
    /// The tries left now.
    fn refilled(&mut self, now: Instant) -> f64 {
        let back = now.saturating_duration_since(self.at).as_secs_f64() / REFILL.as_secs_f64();
        self.tries = (self.tries + back).min(f64::from(BURST));
        self.at = now;
        self.tries
    }
}

impl AuthGuard {
    /// Whether `ip` may have a password checked now.
    pub fn may_try(&self, ip: IpAddr) -> bool {
        let mut failures = self.failures.lock().expect("never poisoned");
        let may = failures
            .get_mut(&ip)
            .is_none_or(|f| f.refilled(Instant::now()) >= 1.0);
        if !may {
            let mut said = self.said.lock().expect("never poisoned");
            said.get_or_insert_with(|| RateLimited::new(SAY_EVERY))
                .say(|suppressed| {
                    tracing::warn!(%ip, suppressed, "resp AUTH refused for an address: too many wrong passwords");
                });
        }
        may
    }

    /// A password from `ip` was wrong.
    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("never poisoned");
        if failures.len() >= MAX_ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, f| f.refilled(now) < f64::from(BURST));
            if failures.len() >= MAX_ADDRESSES {
                // More addresses failing at once than remembered: one is forgotten.
                let any = *failures.keys().next().expect("not empty");
                failures.remove(&any);
            }
        }
        let entry = failures.entry(ip).or_insert(Failures {
            tries: f64::from(BURST),
            at: now,
        });
        entry.refilled(now);
        entry.tries = (entry.tries - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_waits_after_its_burst_and_others_do_not() {
        let guard = AuthGuard::default();
        let (one, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        for _ in 0..BURST {
            assert!(guard.may_try(one));
            guard.failed(one);
        }
        assert!(!guard.may_try(one));
        assert!(guard.may_try(other));
        // One try back per REFILL.
        guard.failures.lock().unwrap().get_mut(&one).unwrap().at -= REFILL;
        assert!(guard.may_try(one));
        guard.failed(one);
        assert!(!guard.may_try(one));
    }

    #[test]
    fn the_addresses_remembered_are_bounded() {
        let guard = AuthGuard::default();
        for i in 0..(MAX_ADDRESSES as u32 + 50) {
            guard.failed(IpAddr::from(i.to_be_bytes()));
        }
        assert!(guard.failures.lock().unwrap().len() <= MAX_ADDRESSES);
    }
}
