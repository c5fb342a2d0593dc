//! Ordered acknowledgement: which position may be checkpointed.
//!
//! Every record handed to a sink gets a sequence number. Acknowledgements may arrive out of order
//! (different Kafka partitions), so the tracker keeps the contiguous acknowledged prefix and releases
//! a commit position only when every record registered before it is inside that prefix.
//! Memory is proportional to the records in flight, which the sink's queue bounds.

use std::collections::VecDeque;

use crate::sink::Checkpoint;

#[derive(Debug, Default)]
pub struct AckTracker {
    /// Sequence number of `pending[0]`; everything below it is acknowledged.
    base: u64,
    /// `true` once acknowledged, for records `base..base+len`.
    pending: VecDeque<bool>,
    /// Commit positions with the number of records registered before them.
    commits: VecDeque<(u64, Checkpoint)>,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a record about to be handed to the sink; returns its sequence number.
    pub fn register(&mut self) -> u64 {
        self.pending.push_back(false);
        self.base + self.pending.len() as u64 - 1
    }

    /// Marks a transaction boundary after every record registered so far.
    pub fn commit(&mut self, position: Checkpoint) {
        let end = self.base + self.pending.len() as u64;
        match self.commits.back_mut() {
            // Consecutive commits with no record between them: only the newest matters.
            Some((last_end, last)) if *last_end == end => *last = position,
            _ => self.commits.push_back((end, position)),
        }
    }

    pub fn ack(&mut self, seq: u64) {
        let Some(offset) = seq.checked_sub(self.base) else { return };
        if let Some(slot) = self.pending.get_mut(offset as usize) {
            *slot = true;
        }
        while self.pending.front() == Some(&true) {
            self.pending.pop_front();
            self.base += 1;
        }
    }

    /// The newest commit position whose preceding records are all acknowledged, if it moved.
    pub fn take_checkpoint(&mut self) -> Option<Checkpoint> {
        let mut newest = None;
        while let Some((end, _)) = self.commits.front() {
            if *end > self.base {
                break;
            }
            newest = self.commits.pop_front().map(|(_, p)| p);
        }
        newest
    }

    /// Records handed over and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use tailgate_core::{Lsn, Position};

    use super::*;

    fn pos(n: u64) -> Checkpoint {
        Checkpoint { seq: n, position: Position::postgres(Lsn(n)) }
    }

    #[test]
    fn commit_waits_for_every_earlier_record_even_when_acks_are_out_of_order() {
        let mut t = AckTracker::new();
        let a = t.register();
        let b = t.register();
        t.commit(pos(10));
        let c = t.register();
        t.commit(pos(20));

        t.ack(b);
        t.ack(c);
        assert_eq!(t.take_checkpoint(), None, "record a is still in flight");
        t.ack(a);
        assert_eq!(t.take_checkpoint(), Some(pos(20)));
        assert_eq!(t.take_checkpoint(), None);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn commit_without_records_is_released_at_once() {
        let mut t = AckTracker::new();
        t.commit(pos(5));
        t.commit(pos(6));
        assert_eq!(t.take_checkpoint(), Some(pos(6)));
    }

    #[test]
    fn unacked_record_blocks_later_commits() {
        let mut t = AckTracker::new();
        let _lost = t.register();
        t.commit(pos(1));
        for _ in 0..100 {
            let s = t.register();
            t.ack(s);
        }
        t.commit(pos(2));
        assert_eq!(t.take_checkpoint(), None);
        assert_eq!(t.in_flight(), 101);
    }
}
