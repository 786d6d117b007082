//! Single flight for cache misses: every concurrent miss on a name joins one flight, so the
//! database is read once however many ask; flights queue, and a loader claims the whole queue at a
//! time (see `read` for how they are loaded).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::{ServiceError, Source};
use crate::model::key::Key;
use crate::support::workqueue::WorkQueue;

/// What a load found: the user's JSON and where it came from, or no such user.
pub type Loaded = Result<Option<(String, Source)>, ServiceError>;

/// One pending database read, shared by every miss on the same name.
#[derive(Default)]
pub struct Flight {
    result: OnceLock<Loaded>,
    done: Notify,
    /// A loader took it: its database read may have begun.
    claimed: std::sync::atomic::AtomicBool,
    /// A read-your-writes get joined it: it must be answered by the database, not by Redis.
    from_db: std::sync::atomic::AtomicBool,
}

impl Flight {
    /// Waits for the load's result.
    pub async fn wait(&self) -> Loaded {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(result) = self.result.get() {
                return result.clone();
            }
            notified.await;
        }
    }

    fn finish(&self, result: Loaded) {
        if self.result.set(result).is_ok() {
            self.done.notify_waiters();
        }
    }
}

/// Completed flights remembered for late arrivals, pruned past this many.
const COMPLETED_CAPACITY: usize = 4096;
/// How long a completion matters: far longer than a Redis read takes.
const COMPLETED_MEMORY: Duration = Duration::from_secs(1);

/// Recently completed flights, oldest first, bounded by count and age: O(1) per completion.
#[derive(Default)]
struct Completions {
    order: VecDeque<(Key, Instant)>,
    latest: HashMap<Key, Instant>,
}

impl Completions {
    fn record(&mut self, key: &Key, now: Instant) {
        while let Some((name, at)) = self.order.front() {
            if self.order.len() < COMPLETED_CAPACITY && now.duration_since(*at) < COMPLETED_MEMORY {
                break;
            }
            if self.latest.get(name) == Some(at) {
                self.latest.remove(name);
            }
            self.order.pop_front();
        }
        self.latest.insert(key.clone(), now);
        self.order.push_back((key.clone(), now));
    }

    fn since(&self, key: &Key, asked_at: Instant) -> bool {
        self.latest.get(key).is_some_and(|at| *at >= asked_at)
    }
}

/// A miss waiting for a loader.
struct Queued {
    key: Key,
    flight: Arc<Flight>,
    asked_at: Instant,
}

/// The flights in progress, the queue of those no loader took yet, and the loader slots.
pub struct Flights {
    by_name: Mutex<HashMap<Key, Arc<Flight>>>,
    completed: Mutex<Completions>,
    queue: WorkQueue<Queued>,
}

impl Flights {
    /// `loaders`: how many batches may read the database at once.
    pub fn new(loaders: usize) -> Flights {
        Flights {
            by_name: Mutex::default(),
            completed: Mutex::default(),
            queue: WorkQueue::new(loaders),
        }
    }

    /// Joins the flight on `key`, or starts one and queues it (then returns true: the caller
    /// makes sure a loader runs). `asked_at` is when the caller's Redis read began.
    pub fn join(&self, key: &Key, asked_at: Instant) -> (Arc<Flight>, bool) {
        self.join_where(key, asked_at, false)
    }

    /// [`Flights::join`], of a flight no loader took yet, else a new one (which takes the
    /// flight's place for later joiners). For a get with a `min_version`: a flight whose
    /// database read starts after the get arrived reads every write acknowledged before, and it
    /// is answered by the database even where Redis was filled since (Redis may lag it).
    pub fn join_fresh(&self, key: &Key, asked_at: Instant) -> (Arc<Flight>, bool) {
        self.join_where(key, asked_at, true)
    }

    fn join_where(&self, key: &Key, asked_at: Instant, fresh: bool) -> (Arc<Flight>, bool) {
        use std::sync::atomic::Ordering::SeqCst;
        let mut by_name = self.by_name.lock().expect("flight lock is never poisoned");
        if let Some(flight) = by_name.get(key) {
            if !fresh {
                return (flight.clone(), false);
            }
            if !flight.claimed.load(SeqCst) {
                flight.from_db.store(true, SeqCst);
                return (flight.clone(), false);
            }
        }
        let flight = Arc::new(Flight::default());
        flight.from_db.store(fresh, SeqCst);
        by_name.insert(key.clone(), flight.clone());
        drop(by_name);
        self.queue.push(Queued {
            key: key.clone(),
            flight: flight.clone(),
            asked_at,
        });
        (flight, true)
    }

    /// A free loader slot, if one is free and a flight is queued (see [`WorkQueue::claim`]).
    pub fn claim(&self) -> Option<OwnedSemaphorePermit> {
        self.queue.claim()
    }

    /// Up to `max` queued flights, oldest first, gathered as [`WorkQueue::gather`] does.
    pub async fn gather(self: &Arc<Self>, max: usize) -> Claimed {
        let items = self.queue.gather(max).await;
        for item in &items {
            item.flight
                .claimed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Claimed {
            flights: self.clone(),
            items,
        }
    }
}

/// Flights taken by one loader. Every flight is finished exactly once: by [`Claimed::finish`], or,
/// if the loader stops early (a panic), with an error when the batch is dropped.
pub struct Claimed {
    flights: Arc<Flights>,
    items: Vec<Queued>,
}

impl Claimed {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn key(&self, i: usize) -> &Key {
        &self.items[i].key
    }

    pub fn is_finished(&self, i: usize) -> bool {
        self.items[i].flight.result.get().is_some()
    }

    /// Whether a flight on item `i`'s name completed after its caller read Redis: Redis was
    /// filled since, so it is worth reading again before the database.
    pub fn filled_since_asked(&self, i: usize) -> bool {
        let item = &self.items[i];
        if item
            .flight
            .from_db
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return false;
        }
        self.flights
            .completed
            .lock()
            .expect("completed lock is never poisoned")
            .since(&item.key, item.asked_at)
    }

    /// Answers item `i`'s waiters. The flight leaves the map (and its completion is recorded)
    /// before anyone is woken, so that a get arriving after an answer never joins a finished
    /// flight (piece 3 of the read-your-fill rule, see `service::read`).
    pub fn finish(&self, i: usize, result: Loaded) {
        let item = &self.items[i];
        if item.flight.result.get().is_some() {
            return;
        }
        {
            let mut by_name = self
                .flights
                .by_name
                .lock()
                .expect("flight lock is never poisoned");
            if by_name
                .get(&item.key)
                .is_some_and(|f| Arc::ptr_eq(f, &item.flight))
            {
                by_name.remove(&item.key);
            }
        }
        self.flights
            .completed
            .lock()
            .expect("completed lock is never poisoned")
            .record(&item.key, Instant::now());
        item.flight.finish(result);
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        for i in 0..self.items.len() {
            self.finish(
                i,
                Err(ServiceError::Internal(
                    "the database read was abandoned".into(),
                )),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_are_remembered_by_name_and_time() {
        let mut c = Completions::default();
        let t0 = Instant::now();
        c.record(&Key::user("a"), t0);
        assert!(c.since(&Key::user("a"), t0));
        assert!(!c.since(&Key::user("a"), t0 + Duration::from_millis(1)));
        assert!(!c.since(&Key::user("b"), t0));
    }

    #[test]
    fn completions_stay_bounded() {
        let mut c = Completions::default();
        let t0 = Instant::now();
        for i in 0..3 * COMPLETED_CAPACITY {
            c.record(&Key::user(&format!("u{i}")), t0);
        }
        assert!(c.order.len() <= COMPLETED_CAPACITY);
        assert!(c.latest.len() <= COMPLETED_CAPACITY);
        assert!(c.since(&Key::user(&format!("u{}", 3 * COMPLETED_CAPACITY - 1)), t0));
        // Old entries age out even below the capacity.
        c.record(&Key::user("late"), t0 + 2 * COMPLETED_MEMORY);
        assert_eq!(c.order.len(), 1);
    }

    #[tokio::test]
    async fn a_fresh_join_takes_only_a_flight_whose_read_has_not_begun() {
        let flights = Arc::new(Flights::new(2));
        let now = Instant::now();
        let a = Key::user("a");
        let (queued, started) = flights.join(&a, now);
        assert!(started);
        // Not taken yet: joined, and answered by the database from now on.
        let (fresh, started) = flights.join_fresh(&a, now);
        assert!(!started && Arc::ptr_eq(&queued, &fresh));
        let _slot = flights.claim().unwrap();
        let taken = flights.gather(10).await;
        assert!(
            !taken.filled_since_asked(0),
            "a fresh flight never answers from Redis"
        );
        // Taken (its read may have begun): a fresh join starts its own, which later plain joins
        // share, and which the old one's end does not remove.
        let (second, started) = flights.join_fresh(&a, now);
        assert!(started && !Arc::ptr_eq(&queued, &second));
        assert!(Arc::ptr_eq(&flights.join(&a, now).0, &second));
        taken.finish(0, Ok(None));
        assert!(Arc::ptr_eq(&flights.join(&a, now).0, &second));
    }

    #[tokio::test]
    async fn one_flight_per_name_and_every_flight_finished() {
        let flights = Arc::new(Flights::new(1));
        let now = Instant::now();
        let (a1, queued1) = flights.join(&Key::user("a"), now);
        let (a2, queued2) = flights.join(&Key::user("a"), now);
        let (b, _) = flights.join(&Key::user("b"), now);
        assert!(queued1 && !queued2);
        assert!(Arc::ptr_eq(&a1, &a2));

        let slot = flights.claim().expect("a is queued");
        assert!(flights.claim().is_none(), "one loader slot");
        let batch = flights.gather(1).await;
        assert_eq!(batch.len(), 1);
        batch.finish(0, Ok(None));
        assert!(matches!(a2.wait().await, Ok(None)));
        drop(slot);
        // A panicking loader still answers its flights.
        drop(batch);
        let slot = flights.claim().expect("b is queued");
        drop((slot, flights.gather(10).await));
        assert!(matches!(b.wait().await, Err(ServiceError::Internal(_))));
        // Nothing queued: no slot taken.
        assert!(flights.claim().is_none());
        assert!(flights.gather(10).await.is_empty());
        // A finished name starts a new flight.
        assert!(flights.join(&Key::user("a"), now).1);
    }
}
