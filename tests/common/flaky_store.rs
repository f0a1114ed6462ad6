//! `FlakyStore`: a test double around a real store that fails or stalls on purpose.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use convoflow::sink::store::{Bootstrap, CollectionSpec, Hit, HybridQuery, SearchFilter, StoreError, StorePoint, VectorStore};

/// Test double: the real edge store behind a wrapper that fails the first `fail_first` upserts
/// with `failure`, (optionally) rejects upserts larger than `max_points` as too large, and
/// holds upserts while `closed` is set (a stalled store), fails every upsert with `failure`
/// while `down` is set (an outage), and rejects for their content (`StoreError::Rejected`) the
/// upserts holding a point whose payload text contains `reject_marker` (a point the store
/// cannot take).
pub struct FlakyStore {
    pub inner: Arc<dyn VectorStore>,
    fail_first: usize,
    failure: StoreError,
    max_points: usize,
    pub calls: AtomicUsize,
    pub closed: AtomicBool,
    pub down: AtomicBool,
    reject_marker: Option<String>,
    /// Upserts rejected for their content.
    pub rejected: AtomicUsize,
}

#[async_trait]
impl VectorStore for FlakyStore {
    fn backend(&self) -> &'static str {
        "flaky-edge (test double)"
    }
    async fn ensure_collection(&self, spec: &CollectionSpec, mode: Bootstrap) -> Result<(), StoreError> {
        self.inner.ensure_collection(spec, mode).await
    }
    async fn upsert(&self, points: &[StorePoint]) -> Result<(), StoreError> {
        while self.closed.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first || self.down.load(Ordering::SeqCst) {
            return Err(self.failure.clone());
        }
        if let Some(marker) = &self.reject_marker
            && let Some(p) = points.iter().find(|p| p.payload.get("text").and_then(|t| t.as_str()).is_some_and(|t| t.contains(marker.as_str())))
        {
            self.rejected.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Rejected(format!("point {}: payload refused (test double)", p.id)));
        }
        if points.len() > self.max_points {
            return Err(StoreError::TooLarge(format!("{} points", points.len())));
        }
        self.inner.upsert(points).await
    }
    async fn delete_conversation(&self, tenant: Option<&str>, id: &str) -> Result<u64, StoreError> {
        self.inner.delete_conversation(tenant, id).await
    }
    async fn delete_stale_chunks(&self, written: &[convoflow::sink::store::WrittenTurns]) -> Result<(), StoreError> {
        self.inner.delete_stale_chunks(written).await
    }
    async fn delete_points(&self, ids: &[uuid::Uuid]) -> Result<(), StoreError> {
        self.inner.delete_points(ids).await
    }
    async fn count(&self, filter: &SearchFilter) -> Result<u64, StoreError> {
        self.inner.count(filter).await
    }
    async fn search(&self, q: &HybridQuery) -> Result<Vec<Hit>, StoreError> {
        self.inner.search(q).await
    }
    async fn optimize(&self) -> Result<(), StoreError> {
        self.inner.optimize().await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
}

impl FlakyStore {
    pub fn new(inner: Arc<dyn VectorStore>, fail_first: usize, failure: StoreError, max_points: usize) -> Self {
        Self {
            inner,
            fail_first,
            failure,
            max_points,
            calls: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            down: AtomicBool::new(false),
            reject_marker: None,
            rejected: AtomicUsize::new(0),
        }
    }

    /// A store that rejects the points whose text contains `marker`.
    pub fn rejecting(inner: Arc<dyn VectorStore>, marker: &str) -> Self {
        Self { reject_marker: Some(marker.into()), ..Self::new(inner, 0, StoreError::Transient(String::new()), usize::MAX) }
    }

    /// A store that never fails but holds upserts until `closed` is cleared.
    pub fn stalled(inner: Arc<dyn VectorStore>) -> Self {
        let store = Self::new(inner, 0, StoreError::Transient(String::new()), usize::MAX);
        store.closed.store(true, Ordering::SeqCst);
        store
    }
}
