//! Who may use the socket: the peer lists of `socket.*` checked against each connection's
//! credentials (SO_PEERCRED); the warnings a refused crowd would cause are rate-limited
//! (`support::time::RateLimited`).

use tokio::net::UnixStream;

use crate::config::Config;
pub use crate::support::time::{RateLimited, WARN_EVERY};

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

    /// `None`: the peer may not connect. `Some(may_write)` otherwise. `groups`: the peer's
    /// primary group and its supplementary ones (a member of a read-only group stays read-only
    /// whatever its primary group: `sg` and `newgrp` change only that one); `None` when the
    /// supplementary ones are unknown, and then a read-only group may be among them.
    fn decide(&self, uid: u32, gid: u32, groups: Option<&[u32]>) -> Option<bool> {
        let open = self.allow_uids.is_empty() && self.allow_gids.is_empty();
        let any_of = |listed: &[u32]| {
            listed.contains(&gid) || groups.is_some_and(|g| g.iter().any(|g| listed.contains(g)))
        };
        if !open && !self.allow_uids.contains(&uid) && !any_of(&self.allow_gids) {
            return None;
        }
        let readonly = self.readonly_uids.contains(&uid)
            || any_of(&self.readonly_gids)
            || (groups.is_none() && !self.readonly_gids.is_empty());
        Some(!readonly)
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
        let groups = match self.allow_gids.is_empty() && self.readonly_gids.is_empty() {
            true => Ok(Vec::new()),
            false => peer_groups(stream),
        };
        if let Err(e) = &groups {
            tracing::debug!(error = %e, "the peer's supplementary groups are unknown");
        }
        let decision = self.decide(cred.uid(), cred.gid(), groups.as_deref().ok());
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

/// The peer's supplementary groups as the kernel recorded them when it connected
/// (`SO_PEERGROUPS`, Linux 4.13 and later).
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    // A second try with the size the kernel asked for (at most NGROUPS_MAX, 65536, groups).
    for _ in 0..2 {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: the buffer holds `len` bytes, and the kernel writes at most that many.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / GID);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || len as usize <= groups.len() * GID {
            return Err(e);
        }
        groups.resize((len as usize).div_ceil(GID).min(65_536), 0);
    }
    Err(std::io::Error::other("the peer's groups kept growing"))
}
