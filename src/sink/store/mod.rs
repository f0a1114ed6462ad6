//! The vector store: one `VectorStore` interface, two backends.
//!
//! - `edge` (default): Qdrant's engine in-process (`qdrant-edge`), persisted under a data dir.
//! - `qdrant`: a remote Qdrant server or cluster over gRPC (`qdrant-client`).
//!
//! Both hold one collection laid out the same way (see `docs/storage.md`): named dense vector
//! `dense` (cosine), named sparse vector `bm25` (IDF modifier), one point per turn chunk, and
//! payload indexes on the fields searches filter by. `writer` adds batching and retries on top.

pub mod edge;
pub mod points;
pub mod remote;
pub mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::{QdrantConfig, StoreBackend};
use crate::event::SparseVector;

/// Name of the dense vector in every point.
pub const DENSE: &str = "dense";
/// Name of the BM25 sparse vector in every point.
pub const SPARSE: &str = "bm25";

/// How a payload field is indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Keyword,
    Integer,
    Datetime,
}

/// Payload indexes created with the collection: the fields searches and deletes filter on.
pub const INDEXED_FIELDS: &[(&str, FieldKind)] = &[
    ("conversation_id", FieldKind::Keyword),
    ("tenant", FieldKind::Keyword),
    ("speaker", FieldKind::Keyword),
    ("language", FieldKind::Keyword),
    ("sentiment_stars", FieldKind::Integer),
    ("entity_labels", FieldKind::Keyword),
    ("entity_values", FieldKind::Keyword),
    ("ts", FieldKind::Datetime),
];

pub use crate::config::Quantization;

/// What the collection must look like.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionSpec {
    pub name: String,
    /// Dimension of the embedding model's vectors.
    pub dense_dim: usize,
    /// Keep the original dense vectors on disk (memory-mapped) instead of in RAM.
    pub on_disk: bool,
    pub quantization: Quantization,
}

/// Whether bootstrapping may create a missing collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    CreateIfMissing,
    MustExist,
}

/// One point: a chunk of a turn.
#[derive(Debug, Clone, PartialEq)]
pub struct StorePoint {
    pub id: Uuid,
    /// None when no embedding model is configured: the point then has only the BM25 vector.
    pub dense: Option<Vec<f32>>,
    pub sparse: SparseVector,
    pub payload: Map<String, Value>,
}

impl StorePoint {
    /// Rough size on the wire, used to bound upsert requests.
    pub fn approx_bytes(&self) -> usize {
        let payload: usize = self.payload.iter().map(|(k, v)| k.len() + json_size(v)).sum();
        16 + self.dense.as_ref().map_or(0, |d| d.len() * 4) + self.sparse.indices.len() * 8 + payload
    }
}

fn json_size(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) => 4,
        Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(a) => a.iter().map(json_size).sum::<usize>() + 2,
        Value::Object(o) => o.iter().map(|(k, v)| k.len() + json_size(v)).sum::<usize>() + 2,
    }
}

/// Payload conditions; all given ones must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchFilter {
    pub conversation_id: Option<String>,
    pub tenant: Option<String>,
    pub speaker: Option<String>,
    pub language: Option<String>,
    pub min_stars: Option<i32>,
    /// (label, value): the chunk's turn mentions an entity with this label and text
    /// (value compared case-insensitively).
    pub entities: Vec<(String, String)>,
}

impl SearchFilter {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The keyword conditions as (field, value) pairs, entity pairs as `entity_values` terms.
    pub fn keyword_conditions(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![];
        let fields = [
            ("conversation_id", &self.conversation_id),
            ("tenant", &self.tenant),
            ("speaker", &self.speaker),
            ("language", &self.language),
        ];
        for (field, value) in fields {
            if let Some(v) = value {
                out.push((field, v.clone()));
            }
        }
        for (label, value) in &self.entities {
            out.push(("entity_values", points::entity_term(label, value)));
        }
        out
    }
}

/// A hybrid query: dense and BM25 prefetches fused by reciprocal rank fusion.
#[derive(Debug, Clone, PartialEq)]
pub struct HybridQuery {
    /// The embedded query; None searches BM25 alone.
    pub dense: Option<Vec<f32>>,
    pub sparse: SparseVector,
    pub filter: SearchFilter,
    pub limit: usize,
    /// Candidates each prefetch contributes to the fusion.
    pub prefetch_limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: Uuid,
    pub score: f32,
    pub payload: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: unavailable, timeout, overloaded.
    #[error("transient vector store error: {0}")]
    Transient(String),
    /// The store refused the request for its content (a point it cannot take: malformed vector
    /// or payload, a type its index refuses): the data's fault. The worker finds the message by
    /// halving the batch and dead-letters it (class `store`).
    #[error("the vector store rejected the data: {0}")]
    Rejected(String),
    /// The request was too large; a smaller batch may pass.
    #[error("request too large for the vector store: {0}")]
    TooLarge(String),
    #[error(
        "collection {collection:?} has dense vectors of dimension {existing}, but the embedding model produces {expected}; \
         use another collection (qdrant.collection) or recreate it"
    )]
    DimensionMismatch { collection: String, existing: usize, expected: usize },
    #[error("collection {collection:?} is not laid out as convoflow needs: {reason}")]
    IncompatibleCollection { collection: String, reason: String },
    #[error("collection {0:?} does not exist")]
    MissingCollection(String),
    /// Not worth retrying (bad request, unauthorised, broken data dir...).
    #[error("vector store error: {0}")]
    Permanent(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

/// The operations the worker and `convoflow search` need from a Qdrant collection.
#[async_trait]
pub trait VectorStore: Send + Sync {
    /// `edge` or `qdrant`.
    fn backend(&self) -> &'static str;
    /// Creates the collection and its payload indexes if missing (and allowed), then checks
    /// that an existing one has the same layout. Idempotent, safe when workers race.
    async fn ensure_collection(&self, spec: &CollectionSpec, mode: Bootstrap) -> Result<(), StoreError>;
    /// Upserts and returns once the points are applied (Qdrant's `wait=true`).
    async fn upsert(&self, points: &[StorePoint]) -> Result<(), StoreError>;
    /// Deletes every point of a tenant's conversation (filter delete on `tenant` and
    /// `conversation_id`; the empty tenant matches the points written without one), acknowledged.
    async fn delete_conversation(&self, tenant: &str, conversation_id: &str) -> Result<(), StoreError>;
    /// Deletes points by id, acknowledged (ids that do not exist are ignored).
    async fn delete_points(&self, ids: &[uuid::Uuid]) -> Result<(), StoreError>;
    /// Exact number of points matching the filter.
    async fn count(&self, filter: &SearchFilter) -> Result<u64, StoreError>;
    async fn search(&self, query: &HybridQuery) -> Result<Vec<Hit>, StoreError>;
    /// Persists what is buffered (edge); a no-op for a server.
    async fn flush(&self) -> Result<(), StoreError>;
    /// Builds indexes and merges segments now (edge); a server optimizes by itself.
    async fn optimize(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Opens the configured backend (no collection is touched yet).
pub fn open(cfg: &QdrantConfig) -> Result<Arc<dyn VectorStore>, StoreError> {
    Ok(match cfg.backend {
        StoreBackend::Edge => Arc::new(
            edge::EdgeStore::new(cfg.data_dir.join(&cfg.collection), cfg.edge_optimize_every_points).with_min_free_bytes(cfg.edge_min_free_bytes),
        ),
        StoreBackend::Qdrant => Arc::new(remote::RemoteStore::connect(cfg)?),
    })
}

/// The collection layout the configuration asks for, with the embedding dimension.
pub fn collection_spec(cfg: &QdrantConfig, dense_dim: usize) -> CollectionSpec {
    CollectionSpec {
        name: cfg.collection.clone(),
        dense_dim,
        on_disk: cfg.on_disk_vectors,
        quantization: cfg.quantization,
    }
}

/// Checks an existing dense vector definition against the spec.
pub(crate) fn check_dense(spec: &CollectionSpec, existing_dim: usize, cosine: bool) -> Result<(), StoreError> {
    if existing_dim != spec.dense_dim {
        return Err(StoreError::DimensionMismatch {
            collection: spec.name.clone(),
            existing: existing_dim,
            expected: spec.dense_dim,
        });
    }
    if !cosine {
        return Err(StoreError::IncompatibleCollection {
            collection: spec.name.clone(),
            reason: format!("the {DENSE:?} vector does not use cosine distance"),
        });
    }
    Ok(())
}
