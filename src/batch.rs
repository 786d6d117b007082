//! A work queue drained in batches by a bounded number of workers: what lets concurrent requests
//! share one backend call. Callers push, then ask for a batch; a worker that finishes gives its
//! slot back and asks again, so nothing pushed is ever left without a worker.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Queue<T> {
    items: Mutex<Vec<T>>,
    slots: Arc<Semaphore>,
}

impl<T> Queue<T> {
    /// `workers`: how many batches may be in progress at once (at least one).
    pub fn new(workers: usize) -> Queue<T> {
        Queue {
            items: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(workers.max(1))),
        }
    }

    pub fn push(&self, item: T) {
        self.lock().push(item);
    }

    /// A free worker slot and up to `max` queued items, oldest first; `None` when no slot is free
    /// (a worker in progress asks again when it is done) or nothing is queued.
    pub fn next(&self, max: usize) -> Option<(OwnedSemaphorePermit, Vec<T>)> {
        loop {
            let slot = self.slots.clone().try_acquire_owned().ok()?;
            let mut items = self.lock();
            if items.is_empty() {
                drop(items);
                // Whoever pushed while the slot was held here found none free: look again.
                drop(slot);
                if self.lock().is_empty() {
                    return None;
                }
                continue;
            }
            let n = items.len().min(max);
            return Some((slot, items.drain(..n).collect()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        self.items.lock().expect("queue lock is never poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_bounded_and_slots_limit_workers() {
        let queue = Queue::new(1);
        assert!(queue.next(10).is_none(), "nothing queued");
        for i in 0..5 {
            queue.push(i);
        }
        let (slot, first) = queue.next(3).expect("queued");
        assert_eq!(first, vec![0, 1, 2]);
        assert!(queue.next(3).is_none(), "the only slot is taken");
        drop(slot);
        let (_slot, rest) = queue.next(3).expect("still queued");
        assert_eq!(rest, vec![3, 4]);
    }
}
