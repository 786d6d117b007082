//! Who may use the socket: the peer lists of `socket.*` checked against each connection's
//! credentials (SO_PEERCRED), and the rate limit on the warnings a refused crowd would cause.

use std::time::Duration;

use tokio::net::UnixStream;

use crate::config::Config;

/// How often a repeated warning (refused peers, failing accepts) is said at most.
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

/// Who may connect and who may write, by the peer's credentials (SO_PEERCRED).
pub struct Peers {
    allow_uids: Vec<u32>,
    allow_gids: Vec<u32>,
    readonly_uids: Vec<u32>,
    readonly_gids: Vec<u32>,
}

impl Peers {
    pub fn new(config: &Config) -> Peers {
        let s = &config.socket;
        Peers {
            allow_uids: s.allow_uids.clone(),
            allow_gids: s.allow_gids.clone(),
            readonly_uids: s.readonly_uids.clone(),
            readonly_gids: s.readonly_gids.clone(),
        }
    }

    /// `None`: the peer may not connect. `Some(may_write)` otherwise.
    fn decide(&self, uid: u32, gid: u32) -> Option<bool> {
        let open = self.allow_uids.is_empty() && self.allow_gids.is_empty();
        if !open && !self.allow_uids.contains(&uid) && !self.allow_gids.contains(&gid) {
            return None;
        }
        Some(!self.readonly_uids.contains(&uid) && !self.readonly_gids.contains(&gid))
    }

    /// Checks a new connection's peer; a refused one is dropped (closed) here, with a
    /// rate-limited warning. Returns whether an admitted peer may write.
    pub fn admit(&self, stream: &UnixStream, refusals: &mut RateLimited) -> Option<bool> {
        let unrestricted = self.allow_uids.is_empty()
            && self.allow_gids.is_empty()
            && self.readonly_uids.is_empty()
            && self.readonly_gids.is_empty();
        if unrestricted {
            return Some(true);
        }
        let cred = match stream.peer_cred() {
            Ok(cred) => cred,
            Err(e) => {
                refusals.say(|suppressed| {
                    tracing::warn!(error = %e, suppressed, "peer refused: credentials unknown");
                });
                return None;
            }
        };
        let decision = self.decide(cred.uid(), cred.gid());
        if decision.is_none() {
            refusals.say(|suppressed| {
                tracing::warn!(
                    uid = cred.uid(),
                    gid = cred.gid(),
                    pid = cred.pid(),
                    suppressed,
                    "peer refused"
                );
            });
        }
        decision
    }
}
