//! Per-partition offset tracking: a partition's commit position advances only over a
//! contiguous run of completed offsets, so a committed offset never skips unfinished work.
//!
//! Every received message is registered (in offset order, as the consumer delivers it) and
//! later completed, in any order. Each assignment of a partition gets a new generation: work
//! finished for a revoked assignment is ignored, so it can never move a later owner's offsets.

use std::collections::{HashMap, VecDeque};

pub use crate::kafka::TopicPartition;

/// Identifies one assignment of a partition to this worker.
pub type Generation = u64;

#[derive(Debug)]
struct PartitionState {
    generation: Generation,
    /// Received offsets not yet committable, ascending, with their completion flag.
    pending: VecDeque<(i64, bool)>,
    /// Next offset to commit (last contiguous completed + 1), if anything completed.
    committable: Option<i64>,
    committed: Option<i64>,
    /// Highest offset ever registered in this generation.
    last_registered: Option<i64>,
    /// First forgotten offset: nothing at or after it is registered again in this generation.
    blocked_at: Option<i64>,
    /// First offset registered in this generation: where the consumer started (the committed
    /// offset, or the reset position), for a rewind.
    start: Option<i64>,
}

impl PartitionState {
    fn new(generation: Generation, committed: Option<i64>) -> Self {
        Self { generation, pending: VecDeque::new(), committable: None, committed, last_registered: None, blocked_at: None, start: None }
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionState>,
    last_generation: Generation,
    /// Messages completed so far (all assignments): liveness watches it move.
    completed: u64,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start tracking a newly assigned partition; returns its generation.
    pub fn assign(&mut self, tp: TopicPartition) -> Generation {
        self.last_generation += 1;
        let generation = self.last_generation;
        self.partitions.insert(tp, PartitionState::new(generation, None));
        generation
    }

    /// Stop tracking a revoked partition. Returns the offset still to commit for it, if its
    /// completed work is ahead of what was committed; in-flight work of it is forgotten.
    pub fn revoke(&mut self, tp: &TopicPartition) -> Option<i64> {
        let state = self.partitions.remove(tp)?;
        state.committable.filter(|c| Some(*c) != state.committed)
    }

    pub fn assigned(&self) -> impl Iterator<Item = &TopicPartition> {
        self.partitions.keys()
    }

    /// Record a received message. Returns the generation to complete it with, or None when it
    /// must be dropped: its partition is not assigned (a late message of a revoked partition),
    /// or it was already received in this assignment (its first delivery is or was processed).
    pub fn register(&mut self, tp: &TopicPartition, offset: i64) -> Option<Generation> {
        let state = self.partitions.get_mut(tp)?;
        if state.last_registered.is_some_and(|last| offset <= last) || state.blocked_at.is_some() {
            return None;
        }
        state.last_registered = Some(offset);
        state.start.get_or_insert(offset);
        state.pending.push_back((offset, false));
        Some(state.generation)
    }

    /// Mark a message done (written to every sink). False if it belongs to an old assignment
    /// or was never registered.
    pub fn complete(&mut self, tp: &TopicPartition, offset: i64, generation: Generation) -> bool {
        let Some(state) = self.partitions.get_mut(tp) else { return false };
        if state.generation != generation {
            return false;
        }
        let Ok(i) = state.pending.binary_search_by_key(&offset, |&(o, _)| o) else { return false };
        state.pending[i].1 = true;
        self.completed += 1;
        while let Some(&(o, true)) = state.pending.front() {
            state.pending.pop_front();
            state.committable = Some(o + 1);
        }
        true
    }

    /// Messages completed so far, over every assignment.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    pub fn is_current(&self, tp: &TopicPartition, generation: Generation) -> bool {
        self.partitions.get(tp).is_some_and(|s| s.generation == generation)
    }

    /// Forget `offset` and everything registered after it on that partition: it will not be
    /// processed under this assignment (it never reached the pipeline), so it must hold the
    /// commit position back without counting as in flight.
    pub fn forget_from(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(state) = self.partitions.get_mut(tp) {
            while state.pending.back().is_some_and(|&(o, _)| o >= offset) {
                state.pending.pop_back();
            }
            state.blocked_at = Some(state.blocked_at.map_or(offset, |b| b.min(offset)));
        }
    }

    /// Messages registered and not completed on the given partitions.
    pub fn in_flight_of(&self, tps: &[TopicPartition]) -> usize {
        tps.iter()
            .filter_map(|tp| self.partitions.get(tp))
            .map(|s| s.pending.iter().filter(|(_, done)| !done).count())
            .sum()
    }

    /// Messages registered and not completed, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.pending.iter().filter(|(_, done)| !done).count()).sum()
    }

    /// Partitions whose commit position moved since the last successful commit.
    pub fn commit_candidates(&self) -> Vec<(TopicPartition, i64)> {
        let mut out: Vec<_> = self
            .partitions
            .iter()
            .filter_map(|(tp, s)| s.committable.filter(|c| Some(*c) != s.committed).map(|c| (tp.clone(), c)))
            .collect();
        out.sort();
        out
    }

    /// Starts a new generation for every assigned partition (work of the old one is stale from
    /// now on) and returns where each must be read again from: its last committed offset, else
    /// where this generation started. Partitions that received nothing and committed nothing
    /// are not listed (their fetch position is still the start).
    pub fn rewind(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut targets = Vec::new();
        let tps: Vec<TopicPartition> = self.partitions.keys().cloned().collect();
        for tp in tps {
            let old = self.partitions.remove(&tp).expect("listed");
            let target = old.committed.or(old.start);
            self.last_generation += 1;
            self.partitions.insert(tp.clone(), PartitionState::new(self.last_generation, target));
            if let Some(target) = target {
                targets.push((tp, target));
            }
        }
        targets.sort();
        targets
    }

    /// Record a successful commit (ignored if the partition was revoked meanwhile).
    pub fn mark_committed(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(state) = self.partitions.get_mut(tp) {
            if state.committed.is_none_or(|c| c < offset) {
                state.committed = Some(offset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("in", p)
    }

    #[test]
    fn commits_only_contiguous_completed_offsets() {
        let mut t = OffsetTracker::new();
        let g = t.assign(tp(0));
        for o in [10, 11, 12, 15] {
            assert_eq!(t.register(&tp(0), o), Some(g));
        }
        assert!(t.complete(&tp(0), 11, g));
        assert!(t.complete(&tp(0), 15, g));
        assert_eq!(t.commit_candidates(), vec![], "10 is not done");
        assert_eq!(t.in_flight(), 2);
        assert!(t.complete(&tp(0), 10, g));
        assert_eq!(t.commit_candidates(), vec![(tp(0), 12)], "12 still pending");
        t.mark_committed(&tp(0), 12);
        assert_eq!(t.commit_candidates(), vec![]);
        assert!(t.complete(&tp(0), 12, g));
        // offset gaps (compaction, transaction markers) are fine: 15 was the next received
        assert_eq!(t.commit_candidates(), vec![(tp(0), 16)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_rewind_goes_back_to_the_last_commit_and_makes_work_in_flight_stale() {
        let mut t = OffsetTracker::new();
        let g = t.assign(tp(0));
        let g3 = t.assign(tp(3));
        let _idle = t.assign(tp(4));
        for o in [5, 6, 7, 8] {
            t.register(&tp(0), o);
        }
        t.register(&tp(3), 40);
        assert!(t.complete(&tp(0), 5, g) && t.complete(&tp(0), 6, g));
        t.mark_committed(&tp(0), 7);
        assert!(t.complete(&tp(0), 7, g));
        // partition 0 back to its commit (7, not the completed 8), partition 3 to where it
        // started (nothing committed), partition 4 untouched (nothing read)
        assert_eq!(t.rewind(), vec![(tp(0), 7), (tp(3), 40)]);
        assert!(!t.complete(&tp(0), 8, g), "work of the old generation is stale");
        assert!(!t.complete(&tp(3), 40, g3));
        assert_eq!(t.in_flight(), 0);
        let g0 = t.register(&tp(0), 7).expect("offsets are read again");
        assert_ne!(g0, g);
        assert!(t.complete(&tp(0), 7, g0));
        assert_eq!(t.commit_candidates(), vec![(tp(0), 8)]);
        // a second rewind before any commit goes back to the same place
        assert_eq!(t.rewind()[0], (tp(0), 7));
    }

    #[test]
    fn revoked_assignments_cannot_move_offsets() {
        let mut t = OffsetTracker::new();
        let g1 = t.assign(tp(1));
        t.register(&tp(1), 0);
        t.register(&tp(1), 1);
        t.complete(&tp(1), 0, g1);
        assert_eq!(t.revoke(&tp(1)), Some(1), "completed work is committed on revoke");
        assert!(!t.complete(&tp(1), 1, g1), "not assigned any more");
        assert_eq!(t.register(&tp(1), 2), None);
        let g2 = t.assign(tp(1));
        assert_ne!(g1, g2);
        t.register(&tp(1), 1);
        assert!(!t.complete(&tp(1), 1, g1), "stale generation");
        assert!(!t.is_current(&tp(1), g1));
        assert!(t.complete(&tp(1), 1, g2));
        assert_eq!(t.commit_candidates(), vec![(tp(1), 2)]);
        assert_eq!(t.revoke(&tp(7)), None);
    }

    #[test]
    fn forgotten_tail_holds_the_commit_position_back() {
        let mut t = OffsetTracker::new();
        let g = t.assign(tp(0));
        for o in 0..5 {
            t.register(&tp(0), o);
        }
        t.forget_from(&tp(0), 3);
        assert_eq!(t.in_flight_of(&[tp(0)]), 3);
        for o in 0..3 {
            assert!(t.complete(&tp(0), o, g));
        }
        assert!(!t.complete(&tp(0), 3, g), "forgotten");
        assert_eq!(t.register(&tp(0), 5), None, "nothing after a forgotten offset is taken");
        assert_eq!(t.commit_candidates(), vec![(tp(0), 3)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn redelivery_of_a_pending_offset_is_not_double_counted() {
        let mut t = OffsetTracker::new();
        let g = t.assign(tp(0));
        t.register(&tp(0), 5);
        t.register(&tp(0), 6);
        assert_eq!(t.register(&tp(0), 5), None, "a second delivery is dropped");
        assert_eq!(t.in_flight(), 2);
        t.complete(&tp(0), 5, g);
        t.complete(&tp(0), 6, g);
        assert_eq!(t.commit_candidates(), vec![(tp(0), 7)]);
        assert!(!t.complete(&tp(0), 99, g), "never registered");
    }
}
