//! Client-side caching (`CLIENT TRACKING`): which connection read which key, and the
//! `invalidate` pushes owed to each, kept exact the way the near cache is (docs/reference.md,
//! Guarantee 9) because they hear the same thing: the tracker watches the near cache
//! ([`Watcher`]), so every invalidation it handles — Redis saying a key changed (another daemon's
//! write, an expiry, an eviction), the daemon's own writes (before they are sent and once they are
//! answered), a flush (a lost connection, a failover, a drop, Redis's "everything") — reaches the
//! connections that read the key, or all of them; one table's drop (its TRUNCATE) reaches those
//! that read its keys, as those keys.
//!
//! **Exactness, as Redis has it**: a connection's read registers its keys *before* the read is
//! asked for, so a change that its answer may not show is heard after the registration; and a
//! push is written only after the answers of every request the connection had read when the
//! invalidation was heard ([`Sink::take_ready`]), so it never overtakes the answer it voids. An
//! answer the near cache does not hold as it was answered (a database read, a read Redis did not
//! track for this daemon, a flight that started earlier) is not known to be watched: it is
//! invalidated right behind its reply (`resp::read`), and the client asks again.
//!
//! **Bounded**: the keys remembered for all connections together are at most
//! `resp.tracking_max_keys`; past it the oldest are invalidated, as Redis's
//! `tracking-table-max-keys` does. The pushes owed to one connection that does not read them are
//! at most [`MAX_OWED`] keys, past which they become one flush; a connection that reads nothing
//! at all is closed by `socket.write_timeout_secs`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::model::key::{Key, TableId};
use crate::service::Stats;
use crate::store::redis::near::Watcher;
use crate::store::redis::Cache;

/// Keys owed to one connection past which they are replaced by one flush.
pub const MAX_OWED: usize = 10_000;

/// An `invalidate` push owed to a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// These Redis keys changed.
    Keys(Vec<Bytes>),
    /// Anything may have changed (a null-keys invalidate).
    Flush,
}

/// What one tracking connection is owed, and how far it has read.
#[derive(Default)]
pub struct Sink {
    /// Requests the connection has read so far: a push owed now follows their answers.
    seen: AtomicU64,
    owed: Mutex<Owed>,
    notify: Notify,
}

#[derive(Default)]
struct Owed {
    /// Pushes with the request count their answers must follow, in that order.
    pushes: VecDeque<(u64, Push)>,
    keys: usize,
}

impl Sink {
    /// The connection has read `requests` requests (call before the last one is handled): a
    /// push owed from now on follows their answers.
    pub fn saw(&self, requests: u64) {
        self.seen.store(requests, Relaxed);
    }

    /// Owes `push`, after the answers of the requests read so far.
    pub fn owe(&self, push: Push) {
        let after = self.seen.load(Relaxed);
        let mut owed = self.owed.lock().expect("not poisoned");
        match push {
            Push::Keys(keys) => {
                owed.keys += keys.len();
                // Keys of the same moment travel in one message.
                match owed.pushes.back_mut() {
                    Some((at, Push::Keys(more))) if *at == after => more.extend(keys),
                    _ => owed.pushes.push_back((after, Push::Keys(keys))),
                }
            }
            // Everything the client holds goes: what was owed before says nothing more.
            Push::Flush => {
                owed.pushes.clear();
                owed.keys = 0;
                owed.pushes.push_back((after, Push::Flush));
            }
        }
        if owed.keys > MAX_OWED {
            // Never read: one flush says as much and costs nothing.
            owed.pushes.clear();
            owed.keys = 0;
            owed.pushes.push_back((after, Push::Flush));
        }
        drop(owed);
        self.notify.notify_one();
    }

    /// The pushes that may be written now that `answered` requests are answered.
    pub fn take_ready(&self, answered: u64) -> Vec<Push> {
        let mut owed = self.owed.lock().expect("not poisoned");
        let mut ready = Vec::new();
        while owed
            .pushes
            .front()
            .is_some_and(|(after, _)| *after <= answered)
        {
            let (_, mut push) = owed.pushes.pop_front().expect("checked");
            if let Push::Keys(keys) = &mut push {
                owed.keys -= keys.len();
                // A key heard twice at one moment is named once.
                keys.sort_unstable();
                keys.dedup();
            }
            ready.push(push);
        }
        ready
    }

    /// Resolves when a push is owed.
    pub async fn owed(&self) {
        self.notify.notified().await
    }
}

/// How a connection tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The keys it reads.
    Reads,
    /// Every key under these prefixes (all keys when none).
    Broadcast(Vec<Bytes>),
}

/// The connections that track, and the keys they read.
pub struct Tracker {
    cache: Cache,
    max_keys: usize,
    state: Mutex<State>,
    /// Every open connection's inbox, by id: where `CLIENT TRACKING … REDIRECT id` sends.
    inboxes: Mutex<HashMap<u64, Weak<Sink>>>,
    /// Connections tracking now: with none, an invalidation costs no lock.
    tracking: std::sync::atomic::AtomicUsize,
    /// Where its figures go (`stats.resp`).
    stats: Arc<Stats>,
}

#[derive(Default)]
struct State {
    clients: HashMap<u64, (Arc<Sink>, Mode)>,
    /// Key → the connections that read it since it last changed.
    keys: HashMap<Key, Vec<u64>>,
    /// Keys in the order they were first remembered (some may be gone since).
    order: VecDeque<Key>,
    /// Entries of `keys`' lists, all together.
    remembered: usize,
    /// Connections in broadcast mode.
    broadcasting: usize,
}

impl Tracker {
    /// A tracker of at most `max_keys`, watching `cache`'s near cache; `None` when the near cache
    /// is off (nothing would tell it of changes this daemon did not make).
    pub fn new(cache: &Cache, max_keys: usize, stats: Arc<Stats>) -> Option<Arc<Tracker>> {
        let tracker = Arc::new(Tracker {
            cache: cache.clone(),
            max_keys,
            state: Mutex::default(),
            inboxes: Mutex::default(),
            tracking: Default::default(),
            stats,
        });
        cache.watch_near(tracker.clone()).then_some(tracker)
    }

    /// Connection `id` is open, its pushes owed to `inbox` (its own, and those redirected to it).
    pub fn open(&self, id: u64, inbox: &Arc<Sink>) {
        let mut inboxes = self.inboxes.lock().expect("not poisoned");
        inboxes.insert(id, Arc::downgrade(inbox));
    }

    /// Connection `id` is closed.
    pub fn close(&self, id: u64) {
        self.inboxes.lock().expect("not poisoned").remove(&id);
    }

    /// The inbox of open connection `id`.
    pub fn inbox(&self, id: u64) -> Option<Weak<Sink>> {
        let inboxes = self.inboxes.lock().expect("not poisoned");
        inboxes.get(&id).filter(|i| i.strong_count() > 0).cloned()
    }

    /// Starts (or changes) tracking for connection `id`.
    pub fn start(&self, id: u64, sink: Arc<Sink>, mode: Mode) {
        let mut state = self.state.lock().expect("not poisoned");
        state.clients.insert(id, (sink, mode));
        state.broadcasting = Self::broadcasting(&state);
        self.count(&state);
    }

    /// Publishes the figures `stats` shows.
    fn count(&self, state: &State) {
        self.tracking.store(state.clients.len(), Relaxed);
        let resp = &self.stats.resp;
        resp.tracking_clients
            .store(state.clients.len() as u64, Relaxed);
        resp.tracked_keys.store(state.remembered as u64, Relaxed);
    }

    fn broadcasting(state: &State) -> usize {
        let broadcast = |(_, mode): &&(Arc<Sink>, Mode)| matches!(mode, Mode::Broadcast(_));
        state.clients.values().filter(broadcast).count()
    }

    /// Stops tracking for connection `id` (its remembered keys go as they change or age).
    pub fn stop(&self, id: u64) {
        let mut state = self.state.lock().expect("not poisoned");
        state.clients.remove(&id);
        state.broadcasting = Self::broadcasting(&state);
        if state.clients.is_empty() {
            // Nobody left to tell: nothing to remember.
            state.keys.clear();
            state.order.clear();
            state.remembered = 0;
        }
        self.count(&state);
    }

    /// Remembers that connection `id` reads `keys` (call before the read is asked for).
    pub fn remember(&self, id: u64, keys: &[Key]) {
        let mut evicted = Vec::new();
        let mut state = self.state.lock().expect("not poisoned");
        for key in keys {
            let readers = state.keys.entry(key.clone()).or_default();
            if readers.contains(&id) {
                continue;
            }
            let first = readers.is_empty();
            readers.push(id);
            state.remembered += 1;
            if first {
                state.order.push_back(key.clone());
            }
        }
        while state.remembered > self.max_keys {
            let Some(oldest) = state.order.pop_front() else {
                break;
            };
            if let Some(readers) = state.keys.remove(&oldest) {
                state.remembered -= readers.len();
                evicted.push((oldest, readers));
            }
        }
        if state.order.len() > 2 * self.max_keys.max(state.keys.len()) {
            let State { order, keys, .. } = &mut *state;
            order.retain(|k| keys.contains_key(k));
        }
        for (key, readers) in evicted {
            self.owe_key(&state, &key, &readers);
        }
        self.count(&state);
    }

    /// Tells each of `readers` (and every broadcast connection whose prefix `key` is under) that
    /// `key` changed.
    fn owe_key(&self, state: &State, key: &Key, readers: &[u64]) {
        if readers.is_empty() && state.broadcasting == 0 {
            return;
        }
        let name = Bytes::from(self.cache.redis_key(key));
        for id in readers {
            if let Some((sink, Mode::Reads)) = state.clients.get(id) {
                sink.owe(Push::Keys(vec![name.clone()]));
                self.stats.resp.invalidations.fetch_add(1, Relaxed);
            }
        }
        if state.broadcasting == 0 {
            return;
        }
        for (sink, mode) in state.clients.values() {
            if let Mode::Broadcast(prefixes) = mode {
                if prefixes.is_empty() || prefixes.iter().any(|p| name.starts_with(p)) {
                    sink.owe(Push::Keys(vec![name.clone()]));
                    self.stats.resp.invalidations.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

impl Watcher for Tracker {
    fn invalidated(&self, name: &Key) {
        // Set under the lock before a connection's first read is remembered: a read remembered
        // before this invalidation is seen here.
        if self.tracking.load(Relaxed) == 0 {
            return;
        }
        let mut state = self.state.lock().expect("not poisoned");
        if state.clients.is_empty() {
            return;
        }
        let readers = state.keys.remove(name).unwrap_or_default();
        state.remembered -= readers.len();
        self.owe_key(&state, name, &readers);
        self.count(&state);
    }

    fn dropped(&self, table: TableId) {
        if self.tracking.load(Relaxed) == 0 {
            return;
        }
        let mut state = self.state.lock().expect("not poisoned");
        let gone: Vec<Key> = (state.keys.keys())
            .filter(|k| k.table() == table)
            .cloned()
            .collect();
        // A reader is told of the keys of the table it read, in one message; the others hear
        // nothing.
        let mut owed: HashMap<u64, Vec<Bytes>> = HashMap::new();
        for key in gone {
            let readers = state.keys.remove(&key).unwrap_or_default();
            state.remembered -= readers.len();
            let name = Bytes::from(self.cache.redis_key(&key));
            for id in readers {
                owed.entry(id).or_default().push(name.clone());
            }
        }
        state.order.retain(|k| k.table() != table);
        let prefix = self.cache.prefix_of(table).as_bytes();
        for (id, (sink, mode)) in &state.clients {
            let push = match mode {
                Mode::Reads => owed.remove(id).map(Push::Keys),
                // What a broadcast client holds under the table is not known: if its prefixes
                // reach into the table, all of it goes.
                Mode::Broadcast(prefixes) => {
                    let within = |p: &Bytes| p.starts_with(prefix) || prefix.starts_with(p);
                    (prefixes.is_empty() || prefixes.iter().any(within)).then_some(Push::Flush)
                }
            };
            if let Some(push) = push {
                let told = match &push {
                    Push::Keys(keys) => keys.len() as u64,
                    Push::Flush => 1,
                };
                sink.owe(push);
                self.stats.resp.invalidations.fetch_add(told, Relaxed);
            }
        }
        self.count(&state);
    }

    fn flushed(&self) {
        if self.tracking.load(Relaxed) == 0 {
            return;
        }
        let mut state = self.state.lock().expect("not poisoned");
        state.keys.clear();
        state.order.clear();
        state.remembered = 0;
        for (sink, _) in state.clients.values() {
            sink.owe(Push::Flush);
            self.stats.resp.invalidations.fetch_add(1, Relaxed);
        }
        self.count(&state);
    }
}

/// The channel a RESP2 connection subscribes to for the invalidations redirected to it.
pub const CHANNEL: &[u8] = b"__redis__:invalidate";

/// Writes `push` as RESP3 sends it: `>2`, `invalidate`, then the keys or null.
pub fn encode(push: &Push, out: &mut Vec<u8>) {
    let reply = super::frame::Reply(3);
    reply.push(out, 2);
    reply.bulk(out, b"invalidate");
    keys(reply, push, out);
}

/// Tells a RESP3 client whose `REDIRECT` target is gone that its invalidations are lost.
pub fn encode_broken_redirect(target: u64, out: &mut Vec<u8>) {
    let reply = super::frame::Reply(3);
    reply.push(out, 2);
    reply.bulk(out, b"tracking-redir-broken");
    reply.int(out, target as i64);
}

/// Writes `push` as Redis sends a redirected invalidation to a RESP2 connection subscribed to
/// [`CHANNEL`]: a `message` on that channel whose payload is the keys, or null for a flush.
pub fn encode_message(push: &Push, out: &mut Vec<u8>) {
    let reply = super::frame::Reply(2);
    reply.array(out, 3);
    reply.bulk(out, b"message");
    reply.bulk(out, CHANNEL);
    keys(reply, push, out);
}

/// The keys of an invalidation (an array), or the null of a flush.
fn keys(reply: super::frame::Reply, push: &Push, out: &mut Vec<u8>) {
    match push {
        Push::Keys(keys) => {
            reply.array(out, keys.len());
            for key in keys {
                reply.bulk(out, key);
            }
        }
        Push::Flush => reply.nil(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Push {
        Push::Keys(names.iter().map(|n| Bytes::from(n.to_string())).collect())
    }

    #[test]
    fn a_push_waits_for_the_answers_of_the_requests_read_before_it_was_owed() {
        let sink = Sink::default();
        sink.saw(3);
        sink.owe(keys(&["a"]));
        sink.owe(keys(&["b"]));
        sink.owe(keys(&["a"]));
        sink.saw(5);
        sink.owe(keys(&["c"]));
        // Owed at the same moment: one message.
        assert_eq!(sink.take_ready(2), vec![]);
        assert_eq!(sink.take_ready(3), vec![keys(&["a", "b"])]);
        assert_eq!(sink.take_ready(4), vec![]);
        assert_eq!(sink.take_ready(9), vec![keys(&["c"])]);
        assert_eq!(sink.take_ready(9), vec![]);
    }

    #[test]
    fn what_a_client_is_owed_is_bounded_and_a_flush_voids_the_rest() {
        let sink = Sink::default();
        sink.saw(1);
        sink.owe(keys(&["a"]));
        sink.saw(2);
        sink.owe(Push::Flush);
        assert_eq!(sink.take_ready(2), vec![Push::Flush]);
        for i in 0..=MAX_OWED {
            sink.owe(keys(&[&i.to_string()]));
        }
        assert_eq!(sink.take_ready(2), vec![Push::Flush]);
        let mut out = Vec::new();
        encode(&Push::Flush, &mut out);
        encode(&keys(&["user:a"]), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            ">2\r\n$10\r\ninvalidate\r\n_\r\n>2\r\n$10\r\ninvalidate\r\n*1\r\n$6\r\nuser:a\r\n"
        );
        // Redirected to a RESP2 subscriber: messages on __redis__:invalidate, as Redis sends them.
        let mut out = Vec::new();
        encode_message(&keys(&["user:a"]), &mut out);
        encode_message(&Push::Flush, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$6\r\nuser:a\r\n\
             *3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n$-1\r\n"
        );
    }
}
