//! Which Redis connections the request path may take answers from. A connection serves reads only
//! once the health monitor has looked at the process behind it (its `run_id` against the epoch
//! recorded there, see `watch`) and acted on what it found; the look names the connection
//! (`CLIENT SETNAME`) in the same pipeline as the `INFO` that tells the process, so the name
//! stands for that process. Every read pipeline starts with `CLIENT GETNAME`: a connection made
//! since (Redis restarted, Sentinel or the Cluster promoted a replica, a reconnection reached
//! another server) has no name or another one, and its reads are refused — they go to PostgreSQL
//! — while the monitor, woken at once, looks. So no answer comes from a process whose data was
//! not checked first, not even for a monitor tick.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// What the monitor confirmed of one node's connection.
#[derive(Clone, Debug, PartialEq)]
pub enum Confirmed {
    /// The connection carries this name: reads answered under it come from the process looked at.
    Name(String),
    /// Redis refuses `CLIENT SETNAME` (an ACL): reads are not checked (said once).
    Ungated,
}

/// The confirmed connection of each node (by address; `""` for the one server, and for the
/// primary Sentinel names), and the monitor's alarm.
#[derive(Default)]
pub struct Confirmations {
    nodes: Mutex<HashMap<String, Confirmed>>,
    /// Wakes the health monitor before its tick: a read was refused for want of a look here, or a
    /// write was refused by a fence (see `Cache::look_alarm`).
    alarm: Arc<Notify>,
    /// Whether Redis refusing `CLIENT SETNAME` was said.
    refusal_said: AtomicBool,
}

impl Confirmations {
    /// The monitor's alarm (see [`Confirmations`]).
    pub fn alarm(&self) -> &Arc<Notify> {
        &self.alarm
    }

    /// What is confirmed of `node`'s connection.
    pub fn of(&self, node: &str) -> Option<Confirmed> {
        self.lock().get(node).cloned()
    }

    /// Whether the reads of a pipeline sent to `node` (`None`: a node the routes do not know), whose
    /// `CLIENT GETNAME` answered `name`, may be answered. If not, the monitor is woken.
    pub fn accepts(&self, node: Option<&str>, name: &redis::Value) -> bool {
        let accepted = node.is_some_and(|node| match self.lock().get(node) {
            Some(Confirmed::Ungated) => true,
            Some(Confirmed::Name(confirmed)) => {
                matches!(name, redis::Value::BulkString(n) if n == confirmed.as_bytes())
            }
            None => false,
        });
        if !accepted {
            self.alarm.notify_one();
        }
        accepted
    }

    /// Whether a look's `CLIENT GETNAME` answer (`name`) shows `node`'s confirmed connection.
    pub fn still(&self, node: &str, name: Option<&str>) -> bool {
        match self.of(node) {
            Some(Confirmed::Ungated) => true,
            Some(Confirmed::Name(confirmed)) => name == Some(confirmed.as_str()),
            None => false,
        }
    }

    /// Records what the monitor confirmed, once it has acted on its look.
    pub fn confirm(&self, confirmed: Vec<(String, Confirmed)>) {
        let mut nodes = self.lock();
        for (node, what) in confirmed {
            if what == Confirmed::Ungated && !self.refusal_said.swap(true, Relaxed) {
                tracing::warn!(
                    node = %node,
                    "redis refuses CLIENT SETNAME: reads are not held back from a restarted or promoted redis until the monitor's next look (up to 250 ms); allow CLIENT SETNAME and GETNAME in the ACL (docs/operations.md)"
                );
            }
            nodes.insert(node, what);
        }
    }

    /// Forgets every node but `current` (the primaries now): a node demoted and promoted again is
    /// looked at anew.
    pub fn keep_only(&self, current: &[&str]) {
        self.lock()
            .retain(|node, _| current.contains(&node.as_str()));
    }

    /// Forgets what was confirmed of `nodes` (they stopped answering).
    pub fn forget(&self, nodes: &[&str]) {
        self.lock()
            .retain(|node, _| !nodes.contains(&node.as_str()));
    }

    /// A name no connection has had: `cacheward-` and a random id.
    pub fn fresh_name() -> String {
        format!("cacheward-{}", crate::support::ids::random_id())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Confirmed>> {
        self.nodes
            .lock()
            .expect("confirmations lock is never poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_confirmed_name_on_a_known_node_is_accepted() {
        let c = Confirmations::default();
        let named = |n: &str| redis::Value::BulkString(n.as_bytes().to_vec());
        // Nothing confirmed yet: refused, and the monitor is woken.
        assert!(!c.accepts(Some(""), &named("x")));
        c.confirm(vec![("a:1".into(), Confirmed::Name("cacheward-1".into()))]);
        assert!(c.accepts(Some("a:1"), &named("cacheward-1")));
        // Another name, none, an error, another node, a node the routes do not know.
        assert!(!c.accepts(Some("a:1"), &named("cacheward-2")));
        assert!(!c.accepts(Some("a:1"), &redis::Value::Nil));
        assert!(!c.accepts(Some("b:1"), &named("cacheward-1")));
        assert!(!c.accepts(None, &named("cacheward-1")));
        assert!(c.still("a:1", Some("cacheward-1")) && !c.still("a:1", None));
        // Redis refusing names: not checked.
        c.confirm(vec![("b:1".into(), Confirmed::Ungated)]);
        assert!(c.accepts(Some("b:1"), &redis::Value::Nil));
        c.keep_only(&["b:1"]);
        assert!(!c.accepts(Some("a:1"), &named("cacheward-1")));
        assert_ne!(Confirmations::fresh_name(), Confirmations::fresh_name());
    }
}
