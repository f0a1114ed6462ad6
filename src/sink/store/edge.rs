//! `edge` backend: Qdrant's engine in-process (`qdrant-edge`), one shard per collection,
//! persisted under `<data_dir>/<collection>` (WAL + segments; reopened after a restart).
//!
//! The engine is synchronous, so every call runs on tokio's blocking pool. An update returns
//! once it is in the WAL and applied, which is what `wait=true` means on a server. Edge runs no
//! background optimizer: after every `OptimizeSchedule::every` upserted points one optimization
//! pass (segment merge, HNSW and sparse index build) runs on a background thread once the
//! writes pause (`optimizer`).
//! One process at a time: the WAL directory is locked while a shard is open.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use qdrant_edge::{
    Condition, CountRequest, CreateIndex, Distance, EdgeConfig, EdgeShard, EdgeSparseVectorParams, EdgeVectorParams,
    PointId as ExtendedPointId, FieldCondition, FieldIndexOperations, Filter, Fusion, Match, Memory, Modifier, NamedQuery,
    OperationError, PayloadFieldSchema, PayloadSchemaType, PointInsertOperations, PointOperations, PointStruct,
    Prefetch, QuantizationConfig, QueryEnum, QueryRequest, Range, RetrieveRequest, ScalarQuantizationConfig,
    ScalarType, ScoringQuery, UpdateOperation, ValueVariants, Vector, VectorInternal, Vectors, WithPayloadInterface,
    WithVector,
};
use serde_json::Value;
use tracing::{info, warn};

use super::{
    Bootstrap, CollectionSpec, DENSE, FieldKind, Hit, HybridQuery, INDEXED_FIELDS, SPARSE, SearchFilter, StoreError, StorePoint, VectorStore,
    WrittenTurns,
};
use super::optimizer::{OptimizeSchedule, Optimizer};

pub struct EdgeStore {
    path: PathBuf,
    shard: std::sync::Mutex<Option<Arc<EdgeShard>>>,
    /// The background optimization pass: it holds the shard (and so the directory's lock)
    /// until it ends, so `flush` waits for it.
    optimizer: Optimizer<EdgeShard>,
    /// Writes wait while the filesystem has less free space (0: no check). Keep it above the
    /// WAL's 2 × 32 MiB segments: the engine preallocates a segment when the WAL rolls over.
    min_free_bytes: u64,
}

/// Bytes available to this process on the filesystem holding `path` (statvfs: `f_bavail`).
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and an out-pointer to a live struct
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

impl EdgeStore {
    /// Writes wait (a transient error, retried like an outage) while the filesystem of the
    /// store has less than `bytes` free.
    pub fn with_min_free_bytes(mut self, bytes: u64) -> Self {
        self.min_free_bytes = bytes;
        self
    }

    /// A transient error while the disk is (nearly) full: the caller waits and retries, and a
    /// write never runs the engine's memory maps into a full filesystem.
    fn check_free_space(&self) -> Result<(), StoreError> {
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        // the nearest existing directory: a store not created yet lies under a missing parent too
        let dir = self.path.ancestors().find(|p| p.exists()).unwrap_or(&self.path);
        let free = free_bytes(dir);
        if let Ok(free) = &free {
            metrics::gauge!(crate::telemetry::STORE_FREE_BYTES).set(*free as f64);
            metrics::gauge!(crate::telemetry::STORE_MIN_FREE_BYTES).set(self.min_free_bytes as f64);
        }
        match free {
            Ok(free) if free < self.min_free_bytes => Err(StoreError::LowDisk(format!(
                "only {free} bytes free on the filesystem of {}, below qdrant.edge_min_free_bytes {}",
                self.path.display(),
                self.min_free_bytes
            ))),
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, path = %dir.display(), "cannot read the free space of the store's filesystem");
                Ok(())
            }
        }
    }

    /// A store at `path` (the collection's directory); nothing is opened until bootstrap.
    pub fn new(path: PathBuf, schedule: OptimizeSchedule) -> Self {
        Self {
            path,
            shard: std::sync::Mutex::new(None),
            optimizer: Optimizer::new(schedule, optimize_pass),
            min_free_bytes: 0,
        }
    }

    fn shard(&self) -> Result<Arc<EdgeShard>, StoreError> {
        self.shard
            .lock()
            .expect("not poisoned")
            .clone()
            .ok_or_else(|| StoreError::Permanent("the edge collection is not open (ensure_collection first)".into()))
    }

    /// Runs a blocking engine call on tokio's blocking pool.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&EdgeShard) -> Result<R, OperationError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let shard = self.shard()?;
        tokio::task::spawn_blocking(move || f(&shard))
            .await
            .map_err(|e| StoreError::Permanent(format!("edge task failed: {e}")))?
            .map_err(classify)
    }

    /// The hybrid query: dense and sparse prefetches (with the filter) fused by RRF.
    async fn fused(&self, q: HybridQuery) -> Result<Vec<Hit>, StoreError> {
        let f = filter(&q.filter);
        let sparse = qdrant_edge::SparseVector::new(
            q.sparse.indices.iter().map(|&i| i as u32).collect(),
            q.sparse.values.clone(),
        )
        .map_err(|e| StoreError::Permanent(format!("bad sparse query: {e}")))?;
        let prefetch = |query: VectorInternal, using: &str| Prefetch {
            prefetches: vec![],
            query: Some(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery { query, using: Some(using.to_string()) }))),
            limit: q.prefetch_limit.max(q.limit),
            params: None,
            filter: f.clone(),
            score_threshold: None,
        };
        let mut prefetches = vec![prefetch(VectorInternal::Sparse(sparse), SPARSE)];
        if let Some(dense) = &q.dense {
            prefetches.insert(0, prefetch(VectorInternal::Dense(dense.clone()), DENSE));
        }
        let request = QueryRequest {
            prefetches,
            query: Some(ScoringQuery::Fusion(Fusion::Rrf { k: 60, weights: None })),
            filter: f.clone(),
            score_threshold: None,
            limit: super::fusion_candidates(&q),
            offset: 0,
            params: None,
            with_vector: WithVector::Bool(false),
            with_payload: WithPayloadInterface::Bool(true),
        };
        let points = self.blocking(move |s| s.query(request)).await?;
        Ok(super::rank_fused(points.into_iter().filter_map(from_scored).collect(), q.limit))
    }
}

/// One optimization pass, on the optimizer's thread.
fn optimize_pass(shard: &EdgeShard) {
    let started = std::time::Instant::now();
    match shard.optimize() {
        Ok(_) => info!(elapsed_ms = started.elapsed().as_millis() as u64, "edge collection optimized"),
        Err(e) => warn!(error = %e, "edge optimization failed"),
    }
}

/// Engine errors are local: retrying does not help. Those about a point's content are the
/// data's (`Rejected`); the rest (I/O, a locked directory, a broken segment) the machine's.
fn classify(e: OperationError) -> StoreError {
    match e {
        OperationError::WrongVectorDimension { .. }
        | OperationError::MalformedVectorBlob { .. }
        | OperationError::MalformedPayloadBlob { .. }
        | OperationError::TypeError { .. }
        | OperationError::TypeInferenceError { .. }
        | OperationError::ValidationError { .. }
        | OperationError::WrongSparse
        | OperationError::WrongMulti => StoreError::Rejected(e.to_string()),
        _ => StoreError::Permanent(e.to_string()),
    }
}

fn edge_config(spec: &CollectionSpec) -> EdgeConfig {
    #[allow(deprecated)]
    let dense = EdgeVectorParams {
        size: spec.dense_dim,
        distance: Distance::Cosine,
        on_disk: None,
        memory: spec.on_disk.then_some(Memory::Cold),
        multivector_config: None,
        datatype: None,
        quantization_config: None,
        hnsw_config: None,
    };
    let sparse = EdgeSparseVectorParams { modifier: Some(Modifier::Idf), ..Default::default() };
    #[allow(deprecated)]
    let quantization = match spec.quantization {
        super::Quantization::None => None,
        super::Quantization::Scalar => Some(QuantizationConfig::from(ScalarQuantizationConfig {
            r#type: ScalarType::Int8,
            quantile: Some(0.99),
            always_ram: None,
            memory: Some(Memory::Pinned),
        })),
    };
    EdgeConfig {
        vectors: HashMap::from([(DENSE.to_string(), dense)]),
        sparse_vectors: HashMap::from([(SPARSE.to_string(), sparse)]),
        quantization_config: quantization,
        ..Default::default()
    }
}

/// Checks the vectors of an opened shard against the spec.
fn check_layout(spec: &CollectionSpec, config: &EdgeConfig) -> Result<(), StoreError> {
    let dense = config.vectors.get(DENSE).ok_or_else(|| StoreError::IncompatibleCollection {
        collection: spec.name.clone(),
        reason: format!("no dense vector named {DENSE:?}"),
    })?;
    super::check_dense(spec, dense.size, dense.distance == Distance::Cosine)?;
    let sparse = config.sparse_vectors.get(SPARSE).ok_or_else(|| StoreError::IncompatibleCollection {
        collection: spec.name.clone(),
        reason: format!("no sparse vector named {SPARSE:?}"),
    })?;
    if sparse.modifier != Some(Modifier::Idf) {
        return Err(StoreError::IncompatibleCollection {
            collection: spec.name.clone(),
            reason: format!("the sparse vector {SPARSE:?} has no IDF modifier"),
        });
    }
    Ok(())
}

fn key(field: &str) -> qdrant_edge::JsonPath {
    field.try_into().expect("static field names are valid JSON paths")
}

pub(crate) fn filter(f: &SearchFilter) -> Option<Filter> {
    let mut must: Vec<Condition> = f
        .keyword_conditions()
        .into_iter()
        .map(|(field, value)| {
            Condition::Field(FieldCondition::new_match(key(field), Match::new_value(ValueVariants::String(value))))
        })
        .collect();
    if let Some(stars) = f.min_stars {
        let range = Range { gte: Some(f64::from(stars).into()), lt: None, gt: None, lte: None };
        must.push(Condition::Field(FieldCondition::new_range(key("sentiment_stars"), range)));
    }
    (!must.is_empty()).then(|| Filter { must: Some(must), should: None, min_should: None, must_not: None })
}

fn all_of(must: Vec<Condition>) -> Filter {
    Filter { must: Some(must), should: None, min_should: None, must_not: None }
}

fn any_of(should: Vec<Condition>) -> Filter {
    Filter { must: None, should: Some(should), min_should: None, must_not: None }
}

fn keyword(field: &str, value: &str) -> Condition {
    Condition::Field(FieldCondition::new_match(key(field), Match::new_value(ValueVariants::String(value.to_string()))))
}

/// The points of a conversation, in one tenant or (None) in all.
fn conversation_filter(tenant: Option<&str>, conversation_id: &str) -> Filter {
    let mut must = vec![keyword("conversation_id", conversation_id)];
    if let Some(tenant) = tenant {
        must.push(keyword("tenant", tenant));
    }
    all_of(must)
}

/// Every chunk of the written turns at or above the turn's chunk count: per message, its
/// conversation and tenant, then per turn, its id and `chunk_index >= count`.
pub(crate) fn stale_chunks_filter(written: &[WrittenTurns]) -> Filter {
    let messages = written
        .iter()
        .map(|w| {
            let groups = w
                .turns
                .iter()
                .map(|t| {
                    let at_or_above = Range { gte: Some((t.chunks as f64).into()), lt: None, gt: None, lte: None };
                    Condition::Filter(all_of(vec![
                        keyword("turn_id", &t.turn_id),
                        Condition::Field(FieldCondition::new_range(key("chunk_index"), at_or_above)),
                    ]))
                })
                .collect();
            let mut conversation = conversation_filter(Some(&w.tenant), &w.conversation_id);
            conversation.must.get_or_insert_default().push(Condition::Filter(any_of(groups)));
            Condition::Filter(conversation)
        })
        .collect();
    any_of(messages)
}

fn to_point(p: &StorePoint) -> Result<qdrant_edge::PointStructPersisted, StoreError> {
    let indices: Vec<u32> = p.sparse.indices.iter().map(|&i| i as u32).collect();
    let sparse = Vector::new_sparse(indices, p.sparse.values.clone())
        .map_err(|e| StoreError::Rejected(format!("point {}: bad sparse vector: {e}", p.id)))?;
    let mut named: Vec<(&str, Vector)> = vec![(SPARSE, sparse)];
    if let Some(dense) = &p.dense {
        named.push((DENSE, Vector::new_dense(dense.clone())));
    }
    let point = PointStruct::new(ExtendedPointId::Uuid(p.id), Vectors::new_named(named), Value::Object(p.payload.clone()));
    Ok(point.into())
}

fn from_scored(p: qdrant_edge::ScoredPoint) -> Option<Hit> {
    let id = match p.id {
        ExtendedPointId::Uuid(u) => u,
        ExtendedPointId::NumId(_) => return None, // not a convoflow point
    };
    Some(Hit { id, score: p.score, payload: p.payload.map(|pl| pl.0).unwrap_or_default() })
}

#[async_trait]
impl VectorStore for EdgeStore {
    fn backend(&self) -> &'static str {
        "edge"
    }

    async fn ensure_collection(&self, spec: &CollectionSpec, mode: Bootstrap) -> Result<(), StoreError> {
        if let Ok(shard) = self.shard() {
            return check_layout(spec, &shard.config());
        }
        // opening or creating a collection preallocates its WAL (2 × 32 MiB memory-mapped
        // segments): on a full filesystem that is a SIGBUS, so refuse with a clear error first
        self.check_free_space()?;
        let path = self.path.clone();
        let spec_owned = spec.clone();
        let shard = tokio::task::spawn_blocking(move || -> Result<EdgeShard, StoreError> {
            let spec = &spec_owned;
            let exists = path.join("edge_config.json").exists() || path.join("segments").is_dir();
            if exists {
                let shard = EdgeShard::load(&path, None).map_err(|e| {
                    StoreError::Permanent(format!("opening the edge collection at {}: {e}", path.display()))
                })?;
                check_layout(spec, &shard.config())?;
                Ok(shard)
            } else if mode == Bootstrap::MustExist {
                Err(StoreError::MissingCollection(format!("{} (edge, {})", spec.name, path.display())))
            } else {
                info!(path = %path.display(), dim = spec.dense_dim, "creating the edge collection");
                EdgeShard::new(&path, edge_config(spec)).map_err(|e| {
                    StoreError::Permanent(format!("creating the edge collection at {}: {e}", path.display()))
                })
            }
        })
        .await
        .map_err(|e| StoreError::Permanent(format!("edge task failed: {e}")))??;
        let shard = Arc::new(shard);
        *self.shard.lock().expect("not poisoned") = Some(shard.clone());
        // Payload indexes: created when missing (the schema is persisted with the shard).
        let existing = shard.info().map_err(classify)?.payload_schema;
        for (field, kind) in INDEXED_FIELDS {
            if existing.keys().any(|k| k.to_string() == *field) {
                continue;
            }
            let schema = match kind {
                FieldKind::Keyword => PayloadSchemaType::Keyword,
                FieldKind::Integer => PayloadSchemaType::Integer,
                FieldKind::Datetime => PayloadSchemaType::Datetime,
            };
            let op = UpdateOperation::FieldIndexOperation(FieldIndexOperations::CreateIndex(CreateIndex {
                field_name: key(field),
                field_schema: Some(PayloadFieldSchema::FieldType(schema)),
            }));
            self.blocking(move |s| s.update(op)).await?;
        }
        Ok(())
    }

    async fn upsert(&self, points: &[StorePoint]) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        self.check_free_space()?;
        let list = points.iter().map(to_point).collect::<Result<Vec<_>, _>>()?;
        let n = list.len();
        self.blocking(move |s| {
            s.update(UpdateOperation::PointOperation(PointOperations::UpsertPoints(PointInsertOperations::PointsList(list))))
        })
        .await?;
        self.optimizer.wrote(n, &self.shard()?);
        Ok(())
    }

    async fn delete_conversation(&self, tenant: Option<&str>, conversation_id: &str) -> Result<u64, StoreError> {
        self.check_free_space()?;
        let f = conversation_filter(tenant, conversation_id);
        let request = CountRequest { filter: Some(f.clone()), exact: true };
        let matched = self.blocking(move |s| s.count(request)).await?;
        if matched > 0 {
            self.blocking(move |s| s.update(UpdateOperation::PointOperation(PointOperations::DeletePointsByFilter(f)))).await?;
        }
        Ok(matched as u64)
    }

    async fn delete_stale_chunks(&self, written: &[WrittenTurns]) -> Result<(), StoreError> {
        if written.is_empty() {
            return Ok(());
        }
        let ids: Vec<ExtendedPointId> = super::next_chunk_ids(written).into_iter().map(ExtendedPointId::Uuid).collect();
        let request = RetrieveRequest { point_ids: ids, with_payload: Some(WithPayloadInterface::Bool(false)), with_vector: Some(WithVector::Bool(false)) };
        let found = self.blocking(move |s| s.retrieve(request)).await?;
        let existing: std::collections::HashSet<uuid::Uuid> = found
            .into_iter()
            .filter_map(|r| match r.id {
                ExtendedPointId::Uuid(u) => Some(u),
                ExtendedPointId::NumId(_) => None,
            })
            .collect();
        let stale = super::with_stale_chunks(written, &existing);
        if stale.is_empty() {
            return Ok(());
        }
        self.check_free_space()?;
        let f = stale_chunks_filter(&stale);
        self.blocking(move |s| s.update(UpdateOperation::PointOperation(PointOperations::DeletePointsByFilter(f)))).await
    }

    async fn delete_points(&self, ids: &[uuid::Uuid]) -> Result<(), StoreError> {
        let ids: Vec<ExtendedPointId> = ids.iter().map(|id| ExtendedPointId::Uuid(*id)).collect();
        self.blocking(move |s| s.update(UpdateOperation::PointOperation(PointOperations::DeletePoints { ids }))).await
    }

    async fn count(&self, f: &SearchFilter) -> Result<u64, StoreError> {
        let request = CountRequest { filter: filter(f), exact: true };
        self.blocking(move |s| s.count(request)).await.map(|n| n as u64)
    }

    async fn search(&self, q: &HybridQuery) -> Result<Vec<Hit>, StoreError> {
        match &q.group_by {
            Some(field) => super::search_grouped(q, field, |candidates| self.fused(candidates)).await,
            None => self.fused(q.clone()).await,
        }
    }

    async fn optimize(&self) -> Result<(), StoreError> {
        self.blocking(|s| s.optimize().map(drop)).await
    }

    /// Waits for a running optimization pass (it holds the directory until it ends: a process
    /// that reopens the store right after the worker stops would find it locked), then flushes.
    async fn flush(&self) -> Result<(), StoreError> {
        if self.shard().is_err() {
            return Ok(());
        }
        if let Some(pass) = self.optimizer.finish() {
            tokio::task::spawn_blocking(move || pass.join())
                .await
                .map_err(|e| StoreError::Permanent(format!("edge task failed: {e}")))?
                .map_err(|_| StoreError::Permanent("the edge optimizer panicked".into()))?;
        }
        self.blocking(|s| s.flush()).await
    }
}

impl Drop for EdgeStore {
    fn drop(&mut self) {
        if let Some(shard) = self.shard.get_mut().ok().and_then(|s| s.take())
            && let Err(e) = shard.flush()
        {
            warn!(error = %e, "flushing the edge collection on close");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_about_a_points_content_are_rejections_the_rest_permanent() {
        let content = [
            OperationError::WrongVectorDimension { expected_dim: 8, received_dim: 7 },
            OperationError::ValidationError { description: "bad".into() },
            OperationError::WrongSparse,
        ];
        for e in content {
            assert!(matches!(classify(e), StoreError::Rejected(_)));
        }
        let machine = OperationError::ServiceError { description: "disk".into(), backtrace: None };
        assert!(matches!(classify(machine), StoreError::Permanent(_)));
    }
}
