//! The dead-letter circuit breaker: a dead-lettered message is data the worker could not take,
//! but a long run of them (every message of a stream, a model that fails on everything) is a
//! systemic fault, and dead-lettering it would move the whole stream into the DLQ and commit
//! it. Past `max_consecutive` dead letters in a row, or a share above `max_ratio` of the last
//! `window` messages, the breaker trips: the worker stops with the breaker's message instead of
//! dead-lettering the batch at hand (left uncommitted), like rust-arroyo's DLQ limit.

use std::collections::VecDeque;

#[derive(Debug)]
pub struct DlqBreaker {
    /// 0: no limit.
    max_consecutive: usize,
    /// 1.0 or more: no limit.
    max_ratio: f64,
    window: usize,
    consecutive: usize,
    /// The last `window` outcomes, true = dead-lettered.
    recent: VecDeque<bool>,
    dead_in_window: usize,
}

impl DlqBreaker {
    pub fn new(max_consecutive: usize, max_ratio: f64, window: usize) -> Self {
        Self { max_consecutive, max_ratio, window: window.max(1), consecutive: 0, recent: VecDeque::new(), dead_in_window: 0 }
    }

    /// Takes a batch's outcomes in order (true = the message would be dead-lettered). Err with
    /// the reason when the batch trips the breaker; the batch's outcomes are counted either way.
    pub fn record(&mut self, outcomes: impl IntoIterator<Item = bool>) -> Result<(), String> {
        let mut tripped = None;
        for dead in outcomes {
            self.consecutive = if dead { self.consecutive + 1 } else { 0 };
            self.recent.push_back(dead);
            self.dead_in_window += usize::from(dead);
            if self.recent.len() > self.window && self.recent.pop_front() == Some(true) {
                self.dead_in_window -= 1;
            }
            if tripped.is_some() {
                continue;
            }
            if self.max_consecutive > 0 && self.consecutive >= self.max_consecutive {
                tripped = Some(format!(
                    "{} messages in a row would go to the dead-letter topic (pipeline.dlq_max_consecutive {}): \
                     this looks like a systemic fault, not bad data; stopping without dead-lettering them",
                    self.consecutive, self.max_consecutive
                ));
            } else if self.max_ratio < 1.0
                && self.recent.len() == self.window
                && self.dead_in_window as f64 > self.max_ratio * self.window as f64
            {
                tripped = Some(format!(
                    "{} of the last {} messages would go to the dead-letter topic (over pipeline.dlq_max_ratio {}): \
                     this looks like a systemic fault, not bad data; stopping without dead-lettering them",
                    self.dead_in_window, self.window, self.max_ratio
                ));
            }
        }
        tripped.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_dead_letters_trip_and_a_good_message_resets_the_run() {
        let mut b = DlqBreaker::new(5, 1.0, 100);
        assert!(b.record([true, true, true, true, false]).is_ok());
        assert!(b.record([true; 4]).is_ok(), "the run restarted at the good message");
        let err = b.record([true]).unwrap_err();
        assert!(err.contains("5 messages in a row") && err.contains("dlq_max_consecutive 5"), "{err}");
    }

    #[test]
    fn the_ratio_is_checked_over_a_full_window_only() {
        let mut b = DlqBreaker::new(0, 0.5, 10);
        // 6 of 8: the window is not full yet
        assert!(b.record([true, true, false, true, true, false, true, true]).is_ok());
        // the 10th message completes the window at 7 of 10 > 0.5
        let err = b.record([false, true]).unwrap_err();
        assert!(err.contains("7 of the last 10"), "{err}");
        // good messages push the dead ones out of the window
        let mut b = DlqBreaker::new(0, 0.5, 10);
        assert!(b.record([true, false, true, false, true, false, true, false, true, false]).is_ok(), "5 of 10 is not over");
        assert!(b.record([false; 20]).is_ok());
        assert_eq!(b.dead_in_window, 0);
    }

    #[test]
    fn no_limits_never_trip() {
        let mut b = DlqBreaker::new(0, 1.0, 10);
        assert!(b.record([true; 10_000]).is_ok());
    }
}
