//! When the embedded engine's optimization pass runs (segment merge, HNSW and sparse index
//! build). Edge has no background optimizer of its own, and the pass is the costliest thing
//! the store does (about three quarters of the CPU while it runs, measured with `perf` mid
//! drain): run in the middle of a backlog it takes the cores the writes need. So, as Qdrant's
//! bulk-load guidance says (index after the upload, not during it), a pass that is due waits
//! for the writes to pause (`idle`) — unless `max_deferred` points are waiting, so a stream
//! that never pauses still gets its index and the unindexed segments stay bounded.
//!
//! Written by hand: the schedule is a few atomics and one timer task; no crate models "run
//! this once the writes pause".

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// When a pass is due and when it may start.
#[derive(Debug, Clone, Copy)]
pub struct OptimizeSchedule {
    /// A pass is due after this many written points; 0 = never.
    pub every: usize,
    /// A due pass starts once no point was written for this long; zero = at once.
    pub idle: Duration,
    /// A due pass starts at once when this many points wait, writes or not; 0 = no limit.
    pub max_deferred: usize,
}

/// Shared with the timer and the pass thread.
struct State {
    epoch: Instant,
    /// Points written since the last pass started.
    waiting: AtomicUsize,
    /// Milliseconds from `epoch` to the last write.
    last_write_ms: AtomicU64,
    running: AtomicBool,
    /// A timer task waits for the writes to pause.
    armed: AtomicBool,
    /// Bumped by `finish`: points written before it are not optimized by a timer.
    generation: AtomicU64,
    /// The generation of the last write.
    write_generation: AtomicU64,
    pass: Mutex<Option<JoinHandle<()>>>,
}

impl State {
    /// A pass is due and wanted: enough points wait, written since the last `finish`.
    fn due(&self, every: usize) -> bool {
        self.waiting.load(Ordering::SeqCst) >= every
            && self.write_generation.load(Ordering::SeqCst) == self.generation.load(Ordering::SeqCst)
    }

    fn since_last_write(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_write_ms.load(Ordering::SeqCst)))
    }
}

/// Runs `pass` on the target (held weakly: a closed store is never kept open by a timer) on
/// its own thread, at most one at a time, as the schedule says.
pub struct Optimizer<T: Send + Sync + 'static> {
    schedule: OptimizeSchedule,
    state: Arc<State>,
    pass: fn(&T),
}

impl<T: Send + Sync + 'static> Optimizer<T> {
    pub fn new(schedule: OptimizeSchedule, pass: fn(&T)) -> Self {
        let state = State {
            epoch: Instant::now(),
            waiting: AtomicUsize::new(0),
            last_write_ms: AtomicU64::new(0),
            running: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            write_generation: AtomicU64::new(0),
            pass: Mutex::new(None),
        };
        Self { schedule, state: Arc::new(state), pass }
    }

    /// `n` points were written to `target`.
    pub fn wrote(&self, n: usize, target: &Arc<T>) {
        let s = &self.state;
        s.last_write_ms.store(s.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
        s.write_generation.store(s.generation.load(Ordering::SeqCst), Ordering::SeqCst);
        let waiting = s.waiting.fetch_add(n, Ordering::SeqCst) + n;
        let OptimizeSchedule { every, idle, max_deferred } = self.schedule;
        if every == 0 || waiting < every {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        if idle.is_zero() || (max_deferred > 0 && waiting >= max_deferred) || runtime.is_err() {
            start(s, target.clone(), self.pass);
            return;
        }
        if s.armed.swap(true, Ordering::SeqCst) {
            return;
        }
        let (state, weak, pass) = (self.state.clone(), Arc::downgrade(target), self.pass);
        runtime.expect("checked").spawn(wait_for_pause(state, weak, pass, self.schedule));
    }

    /// Cancels a due pass that waits for a pause (the target is about to close) and gives
    /// the last pass's thread to wait for: it holds the target until it ends. Writes after
    /// this arm the schedule again.
    pub fn finish(&self) -> Option<JoinHandle<()>> {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        self.state.pass.lock().expect("not poisoned").take()
    }

    /// Points written since the last pass started.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.state.waiting.load(Ordering::SeqCst)
    }

    #[cfg(test)]
    fn running(&self) -> bool {
        self.state.running.load(Ordering::SeqCst)
    }
}

/// The timer: sleeps until no write came for `idle`, then starts the pass (or, while one runs,
/// looks again after `idle`). It ends when the pass started, when nothing is due any more
/// (`finish` was called) or when the target is gone.
async fn wait_for_pause<T: Send + Sync + 'static>(state: Arc<State>, target: Weak<T>, pass: fn(&T), schedule: OptimizeSchedule) {
    loop {
        let quiet = state.since_last_write();
        if quiet < schedule.idle {
            tokio::time::sleep(schedule.idle - quiet).await;
            continue;
        }
        if let Some(alive) = target.upgrade().filter(|_| state.due(schedule.every))
            && !start(&state, alive, pass)
        {
            // a pass (started by the limit) still runs
            tokio::time::sleep(schedule.idle).await;
            continue;
        }
        state.armed.store(false, Ordering::SeqCst);
        // a write that found this timer armed while it was deciding: wait for its pause too
        let rearm = state.due(schedule.every) && target.strong_count() > 0;
        if !rearm || state.armed.swap(true, Ordering::SeqCst) {
            return;
        }
    }
}

/// Starts one pass unless one runs; false only while one runs. A thread that cannot be
/// started is logged and counts as a pass (its points are not retried at once: the next pass
/// is due after `every` more).
fn start<T: Send + Sync + 'static>(state: &Arc<State>, target: Arc<T>, pass: fn(&T)) -> bool {
    if state.running.swap(true, Ordering::SeqCst) {
        return false;
    }
    state.waiting.store(0, Ordering::SeqCst);
    let shared = state.clone();
    let spawned = std::thread::Builder::new().name("edge-optimize".into()).spawn(move || {
        pass(&target);
        shared.running.store(false, Ordering::SeqCst);
    });
    match spawned {
        // a previous pass has ended (`running` was clear): its handle is replaced
        Ok(handle) => *state.pass.lock().expect("not poisoned") = Some(handle),
        Err(e) => {
            state.running.store(false, Ordering::SeqCst);
            tracing::warn!(error = %e, "could not start the edge optimizer");
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test double of the engine: counts passes, each taking `pass_ms`.
    struct Passes {
        done: AtomicUsize,
        pass_ms: u64,
    }

    fn count(p: &Passes) {
        std::thread::sleep(Duration::from_millis(p.pass_ms));
        p.done.fetch_add(1, Ordering::SeqCst);
    }

    fn schedule(idle_ms: u64, max_deferred: usize) -> OptimizeSchedule {
        OptimizeSchedule { every: 100, idle: Duration::from_millis(idle_ms), max_deferred }
    }

    async fn settle(opt: &Optimizer<Passes>) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(pass) = opt.finish() {
            pass.join().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_optimization_pass_waits_for_the_writes_to_pause_unless_too_many_wait() {
        let target = Arc::new(Passes { done: AtomicUsize::new(0), pass_ms: 10 });
        let opt = Optimizer::new(schedule(300, 0), count);
        // 400 points in writes 20 ms apart: due after the first 100, but never idle for 300 ms
        for _ in 0..20 {
            opt.wrote(20, &target);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(target.done.load(Ordering::SeqCst), 0, "no pass while writes keep coming");
        assert_eq!(opt.waiting(), 400);
        tokio::time::sleep(Duration::from_millis(700)).await;
        settle(&opt).await;
        assert_eq!(target.done.load(Ordering::SeqCst), 1, "one pass once the writes paused");
        assert_eq!(opt.waiting(), 0);

        // with a limit of 200 waiting points, a pass starts mid-stream
        let target = Arc::new(Passes { done: AtomicUsize::new(0), pass_ms: 10 });
        let opt = Optimizer::new(schedule(10_000, 200), count);
        for _ in 0..11 {
            opt.wrote(20, &target);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        settle(&opt).await;
        assert_eq!(target.done.load(Ordering::SeqCst), 1, "the limit starts a pass without a pause");
        assert_eq!(opt.waiting(), 20, "the points after the limit wait for the next pass");

        // idle zero: a pass starts as soon as one is due, as before the schedule existed
        let target = Arc::new(Passes { done: AtomicUsize::new(0), pass_ms: 0 });
        let opt = Optimizer::new(schedule(0, 0), count);
        opt.wrote(99, &target);
        settle(&opt).await;
        assert_eq!(target.done.load(Ordering::SeqCst), 0, "not due below `every`");
        opt.wrote(1, &target);
        settle(&opt).await;
        assert_eq!(target.done.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_target_or_a_finished_optimizer_gets_no_deferred_pass() {
        let opt = Optimizer::new(schedule(50, 0), count);
        let target = Arc::new(Passes { done: AtomicUsize::new(0), pass_ms: 0 });
        opt.wrote(100, &target);
        assert!(opt.finish().is_none(), "no pass ran yet");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(target.done.load(Ordering::SeqCst), 0, "finish cancels the waiting pass");

        // writes after finish arm the schedule again
        opt.wrote(100, &target);
        tokio::time::sleep(Duration::from_millis(150)).await;
        settle(&opt).await;
        assert_eq!(target.done.load(Ordering::SeqCst), 1);

        // the timer holds the target weakly: a dropped store is not kept alive, nor optimized
        let weak = {
            let gone = Arc::new(Passes { done: AtomicUsize::new(0), pass_ms: 0 });
            opt.wrote(100, &gone);
            Arc::downgrade(&gone)
        };
        assert!(weak.upgrade().is_none());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!opt.running());
    }
}
