//! The bounded log of writes both backends keep beside their last snapshot,
//! so a reader one or more snapshots behind gets the writes since instead of
//! a whole snapshot to compare ([`super::Store::snapshot_since`]).
//!
//! It holds the deltas of revisions `floor + 1 ..= last`, each with its
//! revision, at most `cap` of them: when it is full the oldest goes and the
//! floor moves up to it. A reader from before the floor reads whole.

use std::collections::VecDeque;

use super::{Delta, Revision};

/// Writes after `floor`, each with the revision that committed it.
#[derive(Debug, Clone)]
pub(crate) struct DeltaLog {
    entries: VecDeque<(Revision, Delta)>,
    floor: Revision,
    cap: usize,
}

impl DeltaLog {
    /// An empty log of at most `cap` writes, starting after `floor`.
    pub fn new(floor: Revision, cap: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            floor,
            cap,
        }
    }

    /// Appends the write that committed as `revision` (newer than any in
    /// the log), dropping the oldest past the cap.
    pub fn push(&mut self, revision: Revision, delta: Delta) {
        self.entries.push_back((revision, delta));
        while self.entries.len() > self.cap {
            if let Some((r, _)) = self.entries.pop_front() {
                self.floor = r;
            }
        }
    }

    /// The writes after `from` up to `to` (the revision the reader gets
    /// with them), if the log reaches back that far; `None` means "read
    /// whole".
    pub fn since(&self, from: Revision, to: Revision) -> Option<Vec<Delta>> {
        if from < self.floor || from > to {
            return None;
        }
        let start = self.entries.partition_point(|(r, _)| *r <= from);
        Some(
            self.entries
                .range(start..)
                .take_while(|(r, _)| *r <= to)
                .map(|(_, d)| d.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(i: u32) -> Delta {
        Delta::InstanceRemoved(
            "acme".parse().unwrap(),
            "web".parse().unwrap(),
            format!("i{i}").parse().unwrap(),
        )
    }

    fn log_of(floor: Revision, revs: &[Revision], cap: usize) -> DeltaLog {
        let mut log = DeltaLog::new(floor, cap);
        for r in revs {
            log.push(*r, delta(u32::try_from(*r).unwrap()));
        }
        log
    }

    #[test]
    fn since_hands_out_the_writes_after_a_revision_it_reaches() {
        let log = log_of(10, &[11, 12, 13], 8);
        assert_eq!(
            log.since(10, 13),
            Some(vec![delta(11), delta(12), delta(13)])
        );
        assert_eq!(log.since(12, 13), Some(vec![delta(13)]));
        assert_eq!(log.since(13, 13), Some(vec![]), "up to date");
        assert_eq!(log.since(9, 13), None, "from before the floor");
        assert_eq!(log.since(14, 13), None, "from the future");
        assert_eq!(
            log.since(11, 12),
            Some(vec![delta(12)]),
            "no later than asked"
        );
    }

    #[test]
    fn revisions_without_a_write_still_count_as_reached() {
        // etcd: a revision that changed nothing planned (a sync report).
        let log = log_of(10, &[11, 15], 8);
        assert_eq!(log.since(12, 20), Some(vec![delta(15)]));
        assert_eq!(log.since(15, 20), Some(vec![]));
    }

    #[test]
    fn a_full_log_drops_the_oldest_and_moves_its_floor() {
        let log = log_of(0, &[1, 2, 3, 4, 5], 3);
        assert_eq!(log.since(1, 5), None, "revision 2 fell off");
        assert_eq!(log.since(2, 5), Some(vec![delta(3), delta(4), delta(5)]));
    }
}
