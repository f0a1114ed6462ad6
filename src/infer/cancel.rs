//! A stop request for the model work running on the current thread. A model thread registers
//! its flag once (`watch`); the encoder reads it between layers (`requested`) and stops a
//! forward pass early when it is set, so a batch nobody waits for any more (a stopping worker)
//! gives the CPU back within one layer instead of running to its end — on 2 cores the rest of
//! the shutdown (the last commit, the flushes) otherwise waits behind it. What an interrupted
//! pass returns has the right shape and no meaning: the thread that set the flag answers its
//! waiters with an error instead (`runner`).
//!
//! A thread-local rather than an argument: the flag concerns the thread, not the model, and
//! the encoder is also run by the benchmarks and parity tests, which never stop early.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    static FLAG: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Model work on this thread stops early once `flag` is set.
pub fn watch(flag: Arc<AtomicBool>) {
    FLAG.with(|f| *f.borrow_mut() = Some(flag));
}

/// Whether this thread's model work was asked to stop (false on a thread that never `watch`ed).
pub fn requested() -> bool {
    FLAG.with(|f| f.borrow().as_ref().is_some_and(|flag| flag.load(Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_watching_thread_sees_its_flag() {
        let flag = Arc::new(AtomicBool::new(false));
        watch(flag.clone());
        assert!(!requested());
        flag.store(true, Ordering::SeqCst);
        assert!(requested());
        assert!(!std::thread::spawn(requested).join().unwrap(), "another thread never watched it");
    }
}
