//! Writing to the store the way the worker needs it: upserts in batches bounded by points and
//! bytes (a batch the store finds too large is split in halves), every call acknowledged, and
//! transient failures retried with exponential backoff and jitter — by default for as long as
//! the outage lasts (a rolling upgrade of a Qdrant cluster takes minutes), while the worker is
//! unready and its partitions pause behind the waiting batch; `max_elapsed_ms` or
//! `max_attempts` bound it for those who prefer to exit. A non-retryable error (or retries
//! exhausted, or the worker stopping during the wait) is returned, and the caller leaves the
//! offsets uncommitted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

use super::{StoreError, StorePoint, VectorStore};
use crate::telemetry::events::{InternalEvent, StoreRetry};

pub use crate::config::{BatchLimits, RetryPolicy};

impl RetryPolicy {
    /// Delay before retry `n` (1-based): exponential, capped, with "equal jitter" (half fixed,
    /// half random) so that workers failing together do not retry together.
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self.initial_backoff_ms.saturating_mul(1u64 << (n.saturating_sub(1)).min(20));
        let capped = exp.min(self.max_backoff_ms) as f64;
        Duration::from_millis((capped / 2.0 + rand::random::<f64>() * capped / 2.0) as u64)
    }

    /// Whether a call that has made `attempts` attempts since `first` may retry after `delay`.
    fn may_retry(&self, attempts: u32, first: Instant, delay: Duration) -> bool {
        let attempts_left = self.max_attempts == 0 || attempts < self.max_attempts;
        let time_left = self.max_elapsed_ms.is_none_or(|ms| (first.elapsed() + delay).as_millis() as u64 <= ms);
        attempts_left && time_left
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct WriterCounters {
    pub upserted_points: AtomicU64,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub splits: AtomicU64,
}

#[derive(Clone)]
pub struct StoreWriter {
    store: Arc<dyn VectorStore>,
    limits: BatchLimits,
    retry: RetryPolicy,
    pub counters: Arc<WriterCounters>,
    /// The worker's: unready while a call waits out an outage; a stop ends the wait.
    readiness: Option<Arc<crate::telemetry::Readiness>>,
    stop: Option<Arc<AtomicBool>>,
}

impl StoreWriter {
    pub fn new(store: Arc<dyn VectorStore>, limits: BatchLimits, retry: RetryPolicy) -> Self {
        Self { store, limits, retry, counters: Arc::default(), readiness: None, stop: None }
    }

    /// The writer of a worker: `store_reachable` is false while a call retries, and setting
    /// `stop` ends a retry wait (the call returns its last error).
    pub fn for_worker(mut self, readiness: Arc<crate::telemetry::Readiness>, stop: Arc<AtomicBool>) -> Self {
        self.readiness = Some(readiness);
        self.stop = Some(stop);
        self
    }

    fn stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    fn set_reachable(&self, reachable: bool) {
        if let Some(r) = &self.readiness {
            r.store_reachable.store(reachable, Ordering::Relaxed);
            if reachable {
                r.store_disk_low.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Unready while a call retries: the store unreachable, or its disk too full.
    fn set_waiting(&self, e: &StoreError) {
        if let Some(r) = &self.readiness {
            r.store_disk_low.store(matches!(e, StoreError::LowDisk(_)), Ordering::Relaxed);
        }
        self.set_reachable(false);
    }

    pub fn store(&self) -> &Arc<dyn VectorStore> {
        &self.store
    }

    /// Upserts all points, acknowledged, in batches within the limits.
    pub async fn upsert_all(&self, points: &[StorePoint]) -> Result<(), StoreError> {
        for batch in batches(points, &self.limits) {
            self.upsert_splitting(batch).await?;
        }
        Ok(())
    }

    async fn upsert_splitting(&self, batch: &[StorePoint]) -> Result<(), StoreError> {
        // Explicit stack instead of recursion (async recursion needs boxing).
        let mut pending = vec![batch];
        while let Some(part) = pending.pop() {
            match self.with_retry("upsert", || self.store.upsert(part)).await {
                Ok(()) => {
                    self.counters.upserted_points.fetch_add(part.len() as u64, Ordering::Relaxed);
                    metrics::counter!(crate::telemetry::STORE_POINTS).increment(part.len() as u64);
                }
                Err(StoreError::TooLarge(why)) if part.len() > 1 => {
                    self.counters.splits.fetch_add(1, Ordering::Relaxed);
                    warn!(points = part.len(), reason = %why, "upsert too large; splitting the batch");
                    let (a, b) = part.split_at(part.len() / 2);
                    pending.push(b);
                    pending.push(a);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub async fn delete_points(&self, ids: &[uuid::Uuid]) -> Result<(), StoreError> {
        self.with_retry("delete", || self.store.delete_points(ids)).await
    }

    /// How many points matched (see `VectorStore::delete_conversation`).
    pub async fn delete_conversation(&self, tenant: Option<&str>, conversation_id: &str) -> Result<u64, StoreError> {
        self.with_retry("delete", || self.store.delete_conversation(tenant, conversation_id)).await
    }

    pub async fn delete_stale_chunks(&self, written: &[super::WrittenTurns]) -> Result<(), StoreError> {
        if written.is_empty() {
            return Ok(());
        }
        self.with_retry("delete", || self.store.delete_stale_chunks(written)).await
    }

    async fn with_retry<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 1;
        let first = Instant::now();
        loop {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let started = std::time::Instant::now();
            let result = call().await;
            if what == "upsert" {
                metrics::histogram!(crate::telemetry::STORE_UPSERT_SECONDS).record(started.elapsed().as_secs_f64());
            }
            if let Err(e) = &result {
                let [transient, low_disk, too_large, permanent] = crate::telemetry::STORE_ERROR_KINDS;
                let kind = match e {
                    StoreError::Transient(_) => transient,
                    StoreError::LowDisk(_) => low_disk,
                    StoreError::TooLarge(_) => too_large,
                    _ => permanent,
                };
                metrics::counter!(crate::telemetry::STORE_ERRORS, "op" => what.to_string(), "kind" => kind).increment(1);
            }
            let delay = self.retry.backoff(attempt);
            match result {
                Err(e) if e.is_transient() && !self.stopping() && self.retry.may_retry(attempt, first, delay) => {
                    StoreRetry { op: what, attempt, delay, error: &e }.emit();
                    self.set_waiting(&e);
                    // waiting out the store is not being wedged (liveness)
                    let _waiting = crate::telemetry::liveness::DependencyWait::begin();
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    let until = Instant::now() + delay;
                    while Instant::now() < until && !self.stopping() {
                        tokio::time::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(100))).await;
                    }
                    attempt += 1;
                }
                Ok(done) => {
                    if attempt > 1 {
                        self.set_reachable(true);
                    }
                    return Ok(done);
                }
                Err(e) => {
                    if e.is_transient() && attempt > 1 {
                        warn!(op = what, attempts = attempt, elapsed_ms = first.elapsed().as_millis() as u64, "vector store retries ended");
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Consecutive slices with at most `max_points` points and about `max_bytes` bytes each
/// (a single larger point gets a batch of its own).
pub fn batches<'a>(points: &'a [StorePoint], limits: &BatchLimits) -> Vec<&'a [StorePoint]> {
    let mut out = vec![];
    let (mut start, mut bytes) = (0, 0);
    for (i, p) in points.iter().enumerate() {
        let size = p.approx_bytes();
        if i > start && (i - start >= limits.max_points.max(1) || bytes + size > limits.max_bytes) {
            out.push(&points[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < points.len() {
        out.push(&points[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SparseVector;

    fn point(bytes: usize) -> StorePoint {
        let mut payload = serde_json::Map::new();
        payload.insert("text".into(), serde_json::json!("x".repeat(bytes)));
        StorePoint { id: uuid::Uuid::new_v4(), dense: None, sparse: SparseVector::default(), payload }
    }

    #[test]
    fn batches_respect_points_and_bytes() {
        let points: Vec<StorePoint> = (0..10).map(|_| point(100)).collect();
        let by_count = batches(&points, &BatchLimits { max_points: 4, max_bytes: 1 << 20 });
        assert_eq!(by_count.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
        let one = points[0].approx_bytes();
        let by_bytes = batches(&points, &BatchLimits { max_points: 100, max_bytes: one * 3 });
        assert_eq!(by_bytes.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
        let big = vec![point(10_000), point(10)];
        assert_eq!(batches(&big, &BatchLimits { max_points: 100, max_bytes: 100 }).len(), 2, "an oversized point is sent alone");
        assert!(batches(&[], &BatchLimits::default()).is_empty());
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_a_cap() {
        let p = RetryPolicy { max_attempts: 10, initial_backoff_ms: 100, max_backoff_ms: 1_000, ..RetryPolicy::default() };
        for _ in 0..50 {
            let d1 = p.backoff(1).as_millis();
            let d3 = p.backoff(3).as_millis();
            let d9 = p.backoff(9).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            assert!((200..=400).contains(&d3), "{d3}");
            assert!((500..=1_000).contains(&d9), "{d9}");
        }
    }
}
