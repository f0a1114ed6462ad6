//! Liveness from progress (`/healthz`), like rust-arroyo's health from progress: the worker is
//! alive while its Kafka poll loop keeps running and, whenever input is in flight, micro-batches
//! keep completing. A wedged worker (a poll loop that stopped, a model call or store write that
//! never returns) fails liveness once a threshold passes, so the orchestrator restarts it.
//!
//! Waiting on a dependency is not being wedged: while the store's retries or a Schema Registry
//! lookup wait out an outage (`DependencyWait`), the progress check is suspended, and its clock
//! restarts when the wait ends — an outage makes the worker unready, not dead.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Milliseconds on one monotonic clock for the process (0 = "never", so it starts at 1).
fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Dependency waits in progress in this process, and when the last one ended.
static DEPENDENCY_WAITS: AtomicUsize = AtomicUsize::new(0);
static LAST_WAIT_ENDED_MS: AtomicU64 = AtomicU64::new(0);
/// Of those, the waits for the Schema Registry (readiness names them).
static REGISTRY_WAITS: AtomicUsize = AtomicUsize::new(0);

/// Held while the worker waits out a dependency's outage (store retries, a registry lookup).
/// Process-wide: an outage is the process's, whichever worker meets it.
pub struct DependencyWait {
    registry: bool,
}

impl DependencyWait {
    pub fn begin() -> Self {
        DEPENDENCY_WAITS.fetch_add(1, Ordering::SeqCst);
        Self { registry: false }
    }

    /// A wait for the Schema Registry: the worker is also unready while it lasts, as it is
    /// during a store outage (its input waits either way).
    pub fn registry() -> Self {
        DEPENDENCY_WAITS.fetch_add(1, Ordering::SeqCst);
        REGISTRY_WAITS.fetch_add(1, Ordering::SeqCst);
        Self { registry: true }
    }
}

/// Whether a lookup is waiting for the Schema Registry now.
pub fn registry_waiting() -> bool {
    REGISTRY_WAITS.load(Ordering::SeqCst) > 0
}

impl Drop for DependencyWait {
    fn drop(&mut self) {
        LAST_WAIT_ENDED_MS.store(now_ms(), Ordering::SeqCst);
        DEPENDENCY_WAITS.fetch_sub(1, Ordering::SeqCst);
        if self.registry {
            REGISTRY_WAITS.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One worker's liveness: fed by its poll loop, read by `/healthz`.
#[derive(Debug)]
pub struct Liveness {
    poll_stall_ms: u64,
    progress_stall_ms: u64,
    /// The poll loop's last turn (0: it has not started; start-up is the startup probe's job).
    last_poll_ms: AtomicU64,
    /// When the worker last made progress: a message completed, or nothing was in flight.
    last_progress_ms: AtomicU64,
    in_flight: AtomicUsize,
    completed: AtomicU64,
}

impl Liveness {
    pub fn new(poll_stall: Duration, progress_stall: Duration) -> Self {
        Self {
            poll_stall_ms: poll_stall.as_millis() as u64,
            progress_stall_ms: progress_stall.as_millis() as u64,
            last_poll_ms: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
        }
    }

    /// A turn of the poll loop, with the messages in flight (read, not yet completed) and how
    /// many have completed so far.
    pub fn poll_turn(&self, in_flight: usize, completed: u64) {
        let now = now_ms();
        self.last_poll_ms.store(now, Ordering::SeqCst);
        let before = self.completed.swap(completed, Ordering::SeqCst);
        self.in_flight.store(in_flight, Ordering::SeqCst);
        if in_flight == 0 || completed != before || self.last_progress_ms.load(Ordering::SeqCst) == 0 {
            self.last_progress_ms.store(now, Ordering::SeqCst);
        }
    }

    /// Why the worker is not alive; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        self.problems_at(now_ms(), DEPENDENCY_WAITS.load(Ordering::SeqCst), LAST_WAIT_ENDED_MS.load(Ordering::SeqCst))
    }

    fn problems_at(&self, now: u64, dependency_waits: usize, last_wait_ended: u64) -> Vec<String> {
        let mut out = vec![];
        let last_poll = self.last_poll_ms.load(Ordering::SeqCst);
        if last_poll > 0 && now.saturating_sub(last_poll) > self.poll_stall_ms {
            out.push(format!("the Kafka poll loop has not run for {} ms", now - last_poll));
        }
        let in_flight = self.in_flight.load(Ordering::SeqCst);
        // progress is measured from the later of the last completion and the end of the last
        // dependency wait; no check while a wait goes on
        let since = self.last_progress_ms.load(Ordering::SeqCst).max(last_wait_ended);
        if in_flight > 0 && dependency_waits == 0 && since > 0 && now.saturating_sub(since) > self.progress_stall_ms {
            out.push(format!("no message completed for {} ms while {in_flight} are in flight", now - since));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness() -> Liveness {
        Liveness::new(Duration::from_millis(1_000), Duration::from_millis(5_000))
    }

    #[test]
    fn alive_before_the_poll_loop_starts_and_while_it_turns() {
        let l = liveness();
        assert!(l.problems_at(60_000, 0, 0).is_empty(), "start-up is the startup probe's job");
        l.poll_turn(0, 0);
        let t = l.last_poll_ms.load(Ordering::SeqCst);
        assert!(l.problems_at(t + 1_000, 0, 0).is_empty());
        let p = l.problems_at(t + 1_001, 0, 0);
        assert!(p.len() == 1 && p[0].contains("poll loop has not run"), "{p:?}");
    }

    #[test]
    fn work_in_flight_without_completions_fails_after_the_threshold() {
        let l = Liveness::new(Duration::from_secs(3_600), Duration::from_millis(5_000));
        l.poll_turn(0, 0); // idle: progress
        let t0 = l.last_progress_ms.load(Ordering::SeqCst);
        l.poll_turn(10, 0); // work arrives: the clock runs from the last progress
        assert!(l.problems_at(t0 + 5_000, 0, 0).is_empty());
        let p = l.problems_at(t0 + 5_001, 0, 0);
        assert!(p.len() == 1 && p[0].contains("no message completed") && p[0].contains("10 are in flight"), "{p:?}");
        // a completion is progress
        l.poll_turn(10, 3);
        let t1 = l.last_progress_ms.load(Ordering::SeqCst);
        assert!(t1 >= t0);
        assert!(l.problems_at(t1 + 5_000, 0, 0).is_empty());
        // nothing in flight: alive however long it stays idle
        l.poll_turn(0, 3);
        assert!(l.problems_at(t1 + 60_000, 0, 0).is_empty());
    }

    #[test]
    fn a_dependency_wait_suspends_the_progress_check_and_restarts_its_clock() {
        let l = Liveness::new(Duration::from_secs(3_600), Duration::from_millis(5_000));
        l.poll_turn(10, 0);
        let t0 = l.last_progress_ms.load(Ordering::SeqCst);
        assert!(l.problems_at(t0 + 60_000, 1, 0).is_empty(), "waiting out an outage is not wedged");
        let ended = t0 + 60_000;
        assert!(l.problems_at(ended + 5_000, 0, ended).is_empty(), "the clock restarts when the wait ends");
        assert_eq!(l.problems_at(ended + 5_001, 0, ended).len(), 1);
    }

    #[test]
    fn dependency_waits_are_counted_while_held() {
        let before = DEPENDENCY_WAITS.load(Ordering::SeqCst);
        let wait = DependencyWait::begin();
        assert_eq!(DEPENDENCY_WAITS.load(Ordering::SeqCst), before + 1);
        drop(wait);
        assert_eq!(DEPENDENCY_WAITS.load(Ordering::SeqCst), before);
        assert!(LAST_WAIT_ENDED_MS.load(Ordering::SeqCst) > 0);
        let wait = DependencyWait::registry();
        assert!(registry_waiting());
        assert_eq!(DEPENDENCY_WAITS.load(Ordering::SeqCst), before + 1);
        drop(wait);
        assert!(!registry_waiting());
        assert_eq!(DEPENDENCY_WAITS.load(Ordering::SeqCst), before);
    }
}
