//! A work queue drained in batches by a bounded number of workers: what lets concurrent requests
//! share one backend call. Callers push, then claim a worker slot and gather a batch; a worker
//! that finishes gives its slot back and claims again, so nothing pushed is ever left without a
//! worker.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct WorkQueue<T> {
    items: Mutex<Vec<T>>,
    slots: Arc<Semaphore>,
}

impl<T> WorkQueue<T> {
    /// `workers`: how many batches may be in progress at once (at least one).
    pub fn new(workers: usize) -> WorkQueue<T> {
        WorkQueue {
            items: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(workers.max(1))),
        }
    }

    /// One batch in progress at a time, so batches run in push order: **an item pushed after
    /// another's push returned is handled in the same batch or a later one**, never in an earlier
    /// one that could overtake it. The request-path Redis queue relies on it: a read queued after
    /// a fill reaches Redis after the fill (the read-your-fill rule, see `service::read`).
    pub fn serial() -> WorkQueue<T> {
        WorkQueue::new(1)
    }

    pub fn push(&self, item: T) {
        self.lock().push(item);
    }

    /// A free worker slot, if one is free and something is queued; `None` otherwise (a worker in
    /// progress claims again when it is done). The worker then takes its batch with
    /// [`WorkQueue::gather`].
    pub fn claim(&self) -> Option<OwnedSemaphorePermit> {
        loop {
            let slot = self.slots.clone().try_acquire_owned().ok()?;
            if !self.lock().is_empty() {
                return Some(slot);
            }
            // Whoever pushed while the slot was held here found none free: look again.
            drop(slot);
            if self.lock().is_empty() {
                return None;
            }
        }
    }

    /// Up to `max` queued items, oldest first, taken after yielding once to the runtime: every
    /// task that is ready to run now (and whatever the I/O driver finds ready) pushes first and
    /// shares the batch. Fewer, larger backend calls, with no timer. Empty if another worker took
    /// them all.
    pub async fn gather(&self, max: usize) -> Vec<T> {
        tokio::task::yield_now().await;
        self.take(max)
    }

    /// Up to `max` queued items, oldest first, now.
    pub fn take(&self, max: usize) -> Vec<T> {
        let mut items = self.lock();
        let n = items.len().min(max);
        items.drain(..n).collect()
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
        let queue = WorkQueue::serial();
        assert!(queue.claim().is_none(), "nothing queued");
        for i in 0..5 {
            queue.push(i);
        }
        let slot = queue.claim().expect("queued");
        assert_eq!(queue.take(3), vec![0, 1, 2]);
        assert!(queue.claim().is_none(), "the only slot is taken");
        drop(slot);
        let _slot = queue.claim().expect("still queued");
        assert_eq!(queue.take(3), vec![3, 4]);
        assert!(queue.take(3).is_empty());
    }

    #[tokio::test]
    async fn a_serial_queue_handles_items_in_push_order() {
        let queue = WorkQueue::serial();
        queue.push("fill");
        let slot = queue.claim().expect("queued");
        let first = queue.gather(10).await;
        // Pushed while the first batch is in progress: it waits for the slot.
        queue.push("read");
        assert!(queue.claim().is_none(), "one batch in progress at a time");
        drop(slot);
        let _slot = queue.claim().expect("the read is queued");
        let second = queue.gather(10).await;
        assert_eq!((first, second), (vec!["fill"], vec!["read"]));
    }
}
