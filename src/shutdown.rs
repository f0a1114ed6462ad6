//! How the worker stops: the first failure that stops it (`Halt`, shared by the stages and the
//! source's committer) and the shutdown's one deadline (`ShutdownClock`). Below the source and
//! the pipeline, which both hold them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The first failure that stops the worker, shared by the stages: set once, it raises the stop
/// flag (the source stops fetching, commits what is complete and leaves).
pub struct Halt {
    first: std::sync::Mutex<Option<anyhow::Error>>,
    stop: Arc<AtomicBool>,
}

impl Halt {
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Self { first: std::sync::Mutex::new(None), stop }
    }

    /// Records `e` (the first one wins) and stops the worker.
    pub fn trip(&self, e: anyhow::Error) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            tracing::error!(error = %format!("{e:#}"), "stopping the worker: work in progress stays uncommitted and is re-read");
            *first = Some(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn is_tripped(&self) -> bool {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The failure, if any (taken: later calls return None).
    pub fn take(&self) -> Option<anyhow::Error> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The shutdown's one deadline: `pipeline.shutdown_timeout_ms` from the moment the worker was
/// asked to stop (a signal or a failure sets the stop flag; `watch` notes when), so time spent
/// before the source notices (a commit blocked on an absent coordinator) counts too. Every wait
/// of the shutdown ends by it.
#[derive(Clone)]
pub struct ShutdownClock {
    stopped_at: Arc<std::sync::OnceLock<Instant>>,
    budget: Duration,
}

impl ShutdownClock {
    /// Notes when `stop` is first set (checked every 20 ms on a thread of its own).
    pub fn watch(stop: Arc<AtomicBool>, budget: Duration) -> Self {
        let clock = Self { stopped_at: Arc::default(), budget };
        let stopped_at = clock.stopped_at.clone();
        let _ = std::thread::Builder::new().name("shutdown-clock".into()).spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = stopped_at.set(Instant::now());
        });
        clock
    }

    /// When the shutdown must be over (the budget from now while no stop was seen yet).
    pub fn deadline(&self) -> Instant {
        *self.stopped_at.get().unwrap_or(&Instant::now()) + self.budget
    }

    /// Whether the worker was asked to stop (the deadline runs).
    pub fn stopping(&self) -> bool {
        self.stopped_at.get().is_some()
    }

    /// Time left until the deadline, less `reserve`.
    pub fn remaining(&self, reserve: Duration) -> Duration {
        self.deadline().saturating_duration_since(Instant::now()).saturating_sub(reserve)
    }

    /// What the steps after the source (its last commit and leaving the group, the producer's
    /// flush, the store's) keep of the budget: a third of it, at most 2 s.
    pub fn reserve(&self) -> Duration {
        (self.budget / 3).min(Duration::from_secs(2))
    }
}

/// How long before the shutdown deadline the worker stops waiting for the source (its poll
/// thread may be blocked in a librdkafka call that waits for an unresponsive broker, such as a
/// synchronous commit): the pipeline stops without it, and the worker exits on time.
pub const SOURCE_LEFT_BEHIND: Duration = Duration::from_millis(500);
