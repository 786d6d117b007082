//! When the CDC worker acts on a notification: at once, unless a run of notifications brought
//! nothing to read (someone flooding the channel), then after a growing gap.

use std::time::{Duration, Instant};

/// Notifications that brought nothing to read, in a row. A change's own notification may find it
/// read already by the batch before (so a busy stream sees a few), but a run of them is someone
/// sending `NOTIFY` on the channel (any role may): past [`SPURIOUS_RUN`], and no change read for
/// [`FLOWING`], the next notification is heeded only after a gap that doubles up to
/// [`SPURIOUS_GAP_MAX`]; any change read ends it.
#[derive(Default)]
pub struct Spurious {
    run: u32,
    /// Whether the last wait ended on a notification.
    pub woke: bool,
    /// Changes the batches of the current catch-up read.
    caught: usize,
    /// When a batch last read a change: while changes flow, no notification waits.
    last_read: Option<Instant>,
}

/// How long after a change was read notifications are heeded at once, whatever came between.
const FLOWING: Duration = Duration::from_millis(100);

/// Notifications in a row that read nothing before the next waits.
const SPURIOUS_RUN: u32 = 8;
/// The longest wait before a notification is heeded during a flood.
const SPURIOUS_GAP_MAX: Duration = Duration::from_millis(50);

impl Spurious {
    /// A batch of the current catch-up read `read` changes (late ones too).
    pub fn batch_read(&mut self, read: usize) {
        self.caught = self.caught.saturating_add(read);
    }

    /// After a catch-up: its wake-up was spurious if none of its batches read a change. Its last
    /// batch alone may find nothing when the one before read the changes (read ahead while it
    /// applied, or full).
    pub fn after_catch_up(&mut self) {
        let read = std::mem::take(&mut self.caught);
        match (self.woke, read) {
            (_, 1..) => {
                self.run = 0;
                self.last_read = Some(Instant::now());
            }
            (true, 0) => self.run = self.run.saturating_add(1),
            (false, 0) => {}
        }
    }

    pub fn gap(&self) -> Duration {
        if self.last_read.is_some_and(|at| at.elapsed() < FLOWING) {
            return Duration::ZERO;
        }
        match self.run.checked_sub(SPURIOUS_RUN) {
            None => Duration::ZERO,
            Some(past) => Duration::from_millis(1 << past.min(6)).min(SPURIOUS_GAP_MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_empty_notifications_opens_a_growing_gap_that_a_change_closes() {
        let mut spurious = Spurious::default();
        let woke_empty = |s: &mut Spurious| {
            s.woke = true;
            s.batch_read(0);
            s.after_catch_up();
        };
        for _ in 0..SPURIOUS_RUN {
            assert_eq!(spurious.gap(), Duration::ZERO);
            woke_empty(&mut spurious);
        }
        assert_eq!(spurious.gap(), Duration::from_millis(1));
        woke_empty(&mut spurious);
        assert_eq!(spurious.gap(), Duration::from_millis(2));
        for _ in 0..20 {
            woke_empty(&mut spurious);
        }
        assert_eq!(spurious.gap(), SPURIOUS_GAP_MAX);
        // A poll that finds nothing changes nothing; a change read ends the run.
        spurious.woke = false;
        spurious.after_catch_up();
        assert_eq!(spurious.gap(), SPURIOUS_GAP_MAX);
        spurious.batch_read(1);
        spurious.after_catch_up();
        assert_eq!(spurious.gap(), Duration::ZERO);
        // Right after a change was read, even a run of empty ones waits for nothing.
        for _ in 0..SPURIOUS_RUN + 4 {
            woke_empty(&mut spurious);
        }
        assert_eq!(spurious.gap(), Duration::ZERO);
    }

    #[test]
    fn a_catch_up_whose_last_batch_found_nothing_after_one_that_read_changes_was_no_spurious_one() {
        let mut spurious = Spurious::default();
        for _ in 0..SPURIOUS_RUN * 2 {
            spurious.woke = true;
            // The changes, then the batch read ahead while they applied: empty.
            spurious.batch_read(3);
            spurious.batch_read(0);
            spurious.after_catch_up();
        }
        assert_eq!(spurious.run, 0);
        // Long after, a wake-up still heeded at once.
        spurious.last_read = None;
        assert_eq!(spurious.gap(), Duration::ZERO);
    }
}
