//! What both front ends' connections keep the same way: the answers on their way, in request
//! order, with what they count against the connection's limits; and the idle timer.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::time::{Instant, Sleep};

/// An answer on its way: how many requests it answers, and its bytes (empty: nothing to write).
pub type Pending = Pin<Box<dyn Future<Output = (usize, Vec<u8>)> + Send>>;

/// Answers on their way, answered in the order they were pushed.
#[derive(Default)]
pub struct Inflight {
    pending: FuturesOrdered<Pending>,
    /// Requests they answer (a batch of reads is one entry and many requests).
    requests: usize,
    /// The request bytes of each entry, in the same order, and their sum.
    sizes: VecDeque<usize>,
    bytes: usize,
    /// Requests answered so far.
    answered: u64,
    /// Answers made at once (near-cache hits), gathered until anything else is queued, and how
    /// many requests they answer.
    ready: Vec<u8>,
    ready_requests: usize,
}

impl Inflight {
    /// Queues `pending`, answering `requests` requests of `bytes` request bytes, behind the
    /// answers made at once so far.
    pub fn push(&mut self, requests: usize, bytes: usize, pending: Pending) {
        self.flush_ready();
        self.push_now(requests, bytes, pending);
    }

    fn push_now(&mut self, requests: usize, bytes: usize, pending: Pending) {
        self.requests += requests;
        self.sizes.push_back(bytes);
        self.bytes += bytes;
        self.pending.push_back(pending);
    }

    /// Queues an answer known already.
    pub fn push_ready(&mut self, bytes: Vec<u8>) {
        self.push(1, 0, Box::pin(futures::future::ready((1, bytes))));
    }

    /// Answers one request at once if `answer` writes its answer (and says so): gathered with
    /// the ones answered so before it, queued as one when anything else is, or at
    /// [`Inflight::flush_ready`].
    pub fn answer_now(&mut self, answer: impl FnOnce(&mut Vec<u8>) -> bool) -> bool {
        let answered = answer(&mut self.ready);
        self.ready_requests += usize::from(answered);
        answered
    }

    /// Queues the answers made at once so far; their bytes count against the in-flight bytes
    /// until written (an answer made at once holds as much memory as a request waiting for one).
    pub fn flush_ready(&mut self) {
        if self.ready_requests > 0 {
            let (mut bytes, requests) = (std::mem::take(&mut self.ready), self.ready_requests);
            self.ready_requests = 0;
            // Grown by doubling: give back what it does not hold before it waits to be written.
            if bytes.capacity() > 2 * bytes.len() + 4096 {
                bytes.shrink_to_fit();
            }
            let held = bytes.len();
            self.push_now(
                requests,
                held,
                Box::pin(futures::future::ready((requests, bytes))),
            );
        }
    }

    /// The bytes the connection holds for its requests in flight: their request bytes, and the
    /// answers made at once that wait to be written. Checked against `socket.max_inflight_bytes`
    /// before reading or parsing more.
    pub fn held(&self) -> usize {
        self.bytes + self.ready.len()
    }

    /// Requests not answered yet, those answered at once but not queued included.
    pub fn requests(&self) -> usize {
        self.requests + self.ready_requests
    }

    /// Requests answered so far (their answers handed out by [`Inflight::next`]).
    pub fn answered(&self) -> u64 {
        self.answered
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The next answer in order, once ready (never, when none is queued).
    pub async fn next(&mut self) -> Vec<u8> {
        let Some((answered, bytes)) = self.pending.next().await else {
            return std::future::pending().await;
        };
        self.requests -= answered;
        self.answered += answered as u64;
        self.bytes -= self.sizes.pop_front().expect("one size per entry");
        bytes
    }
}

/// A connection's idle timer: it expires once nothing moved it for its timeout. Moving it costs
/// an instant, not a timer reset; the timer is re-armed when it fires.
pub struct Idle {
    timeout: Option<Duration>,
    last_active: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl Idle {
    /// A timer of `timeout` (`None`: it never expires).
    pub fn new(timeout: Option<Duration>) -> Idle {
        let first = timeout
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(86400 * 365));
        Idle {
            timeout,
            last_active: Instant::now(),
            sleep: Box::pin(tokio::time::sleep(first)),
        }
    }

    /// Something happened: the timeout counts from now.
    pub fn touch(&mut self) {
        if self.timeout.is_some() {
            self.last_active = Instant::now();
        }
    }

    pub fn enabled(&self) -> bool {
        self.timeout.is_some()
    }

    /// Resolves once the timeout passed since the last [`Idle::touch`]. Cancel-safe.
    pub async fn expired(&mut self) {
        let Some(timeout) = self.timeout else {
            return std::future::pending().await;
        };
        loop {
            self.sleep.as_mut().await;
            let deadline = self.last_active + timeout;
            if Instant::now() >= deadline {
                return;
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
}
