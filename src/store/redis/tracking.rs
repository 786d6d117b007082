//! Client-side caching for the near cache: the `CLIENT TRACKING` commands that go with each
//! read, and the listener that hands what Redis pushes (`invalidate`, a lost connection) to it.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use super::keys::Keys;
use super::near::NearCache;

/// Hands the near cache what Redis pushes: `invalidate` drops the names it lists (everything when
/// it lists none: a FLUSHALL, a FLUSHDB); a connection lost or replaced drops everything.
pub async fn listen(
    near: Arc<NearCache>,
    keys: Keys,
    mut heard: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
) {
    while let Some(push) = heard.recv().await {
        match push.kind {
            redis::PushKind::Invalidate => match push.data.first() {
                Some(redis::Value::Array(names)) => {
                    for named in names {
                        // Not an entry's key: cacheward's fence or epoch, or another program's.
                        let key = match named {
                            redis::Value::BulkString(named) => keys.key_of(named),
                            _ => None,
                        };
                        if let Some(key) = key {
                            near.invalidate(&key);
                        }
                    }
                }
                _ => near.flush(),
            },
            redis::PushKind::Disconnection => near.flush(),
            _ => {}
        }
    }
}

/// `CLIENT TRACKING ON OPTIN NOLOOP`: Redis tells this connection of every change to a key it
/// read right after a `CLIENT CACHING YES` ([`caching`]: the request path's MGETs, and nothing
/// else), except the changes it makes itself.
///
/// OPTIN: without it every key the versioned-write script reads is tracked too, Redis's tracking
/// table grows with every name the daemon ever wrote, and each script call got 5 times slower
/// (a CDC backlog drained at 10 k/s instead of 65 k/s). NOLOOP: every write of a user's key the
/// daemon makes invalidates the near cache's entry itself, before it is sent and once it is
/// answered (`Cache::apply`, `Cache::fill`; a drop flushes what it drops), so it need not hear of it
/// again.
pub fn track() -> redis::Cmd {
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("TRACKING").arg("ON").arg("OPTIN").arg("NOLOOP");
    cmd
}

/// `CLIENT CACHING YES`: the next command's keys are tracked (see [`track`]).
pub fn caching() -> redis::Cmd {
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("CACHING").arg("YES");
    cmd
}

/// Whether Redis refusing `CLIENT TRACKING` was said (once).
#[derive(Default)]
pub struct Refusal(AtomicBool);

impl Refusal {
    /// Says once that Redis refuses `CLIENT TRACKING`: nothing it reads can be kept then.
    pub fn say(&self, e: &redis::ServerError) {
        if !self.0.swap(true, Relaxed) {
            tracing::warn!(error = %e, "redis refuses CLIENT TRACKING: the near cache keeps nothing; allow it in the ACL (docs/operations.md)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::key::Key;

    #[tokio::test]
    async fn hostile_pushes_drop_what_they_name_or_everything_never_more_than_theirs() {
        use redis::{PushInfo, PushKind, Value};
        let near = Arc::new(NearCache::new(1 << 20).unwrap());
        let hold = |name: &str| {
            let key = Key::user(name);
            let ticket = near.ticket(&[&key]);
            assert!(near.keep(&ticket, 0, &key, r#"{"id":1,"version":1}"#, 1));
        };
        // Hands `pushes` to the near cache and waits until they are all handled.
        let hear = |pushes: Vec<(PushKind, Vec<Value>)>| {
            let (sender, heard) = tokio::sync::mpsc::unbounded_channel();
            for (kind, data) in pushes {
                sender.send(PushInfo { kind, data }).unwrap();
            }
            listen(near.clone(), Keys::new("user:", &[], false), heard)
        };
        let keys = |keys: &[&[u8]]| {
            let keys = keys.iter().map(|k| Value::BulkString(k.to_vec())).collect();
            vec![Value::Array(keys)]
        };
        hold("ann");
        hold("bob");
        // Keys of others, not strings, not UTF-8, the prefix alone: nothing of ours is named.
        let mut odd = keys(&[b"other:ann", b"user:\xff\xfe", b"user:"]);
        if let Value::Array(keys) = &mut odd[0] {
            keys.extend([Value::Int(5), Value::Nil]);
        }
        hear(vec![
            (PushKind::Invalidate, odd),
            (PushKind::Message, keys(&[b"user:ann"])),
            (PushKind::Other("invalidate".into()), keys(&[b"user:ann"])),
        ])
        .await;
        assert!(
            near.get(&Key::user("ann"), None).is_some()
                && near.get(&Key::user("bob"), None).is_some()
        );
        // One of ours: that one only.
        hear(vec![(PushKind::Invalidate, keys(&[b"user:ann"]))]).await;
        assert!(
            near.get(&Key::user("ann"), None).is_none()
                && near.get(&Key::user("bob"), None).is_some()
        );
        // An invalidation that names no keys in the expected shape, a lost connection: all goes.
        for data in [vec![Value::Nil], vec![], vec![Value::Int(1)]] {
            hold("ann");
            hear(vec![(PushKind::Invalidate, data)]).await;
            assert_eq!(near.report().entries, 0);
        }
        hold("ann");
        hear(vec![(PushKind::Disconnection, vec![])]).await;
        assert_eq!(near.report().entries, 0);
    }
}
