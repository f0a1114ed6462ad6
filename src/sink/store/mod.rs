//! The vector store: one `VectorStore` interface, two backends.
//!
//! - `edge` (default): Qdrant's engine in-process (`qdrant-edge`), persisted under a data dir.
//! - `qdrant`: a remote Qdrant server or cluster over gRPC (`qdrant-client`).
//!
//! Both hold one collection laid out the same way (see `docs/storage.md`): named dense vector
//! `dense` (cosine), named sparse vector `bm25` (IDF modifier), one point per turn chunk, and
//! payload indexes on the fields searches filter by. `writer` adds batching and retries on top.

mod backend;
pub mod edge;
pub mod optimizer;
pub mod points;
pub mod remote;
pub mod writer;

pub use backend::open;

use async_trait::async_trait;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::QdrantConfig;
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

/// The turns one message wrote, for deleting the chunks a re-sent turn no longer has: the
/// points of (tenant, conversation, turn) whose `chunk_index` is at or above the turn's number
/// of chunks now (point ids depend on that tuple and the chunk index only, so the first
/// chunks were overwritten by the upsert and the rest would stay searchable).
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenTurns {
    pub tenant: String,
    pub conversation_id: String,
    pub turns: Vec<WrittenTurn>,
}

/// One turn as written now.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenTurn {
    pub turn_id: String,
    /// Its number of chunks now.
    pub chunks: usize,
    /// The id chunk number `chunks` has: an older version of the turn left stale chunks exactly
    /// when this point exists (chunk indexes are contiguous from 0), so one lookup by id —
    /// cheap — says whether a filter delete is needed at all.
    pub next_chunk_id: Uuid,
}

/// The written turns whose next chunk id is in `existing`: those with stale chunks.
pub fn with_stale_chunks(written: &[WrittenTurns], existing: &std::collections::HashSet<Uuid>) -> Vec<WrittenTurns> {
    written
        .iter()
        .filter_map(|w| {
            let turns: Vec<WrittenTurn> = w.turns.iter().filter(|t| existing.contains(&t.next_chunk_id)).cloned().collect();
            (!turns.is_empty()).then(|| WrittenTurns { turns, ..w.clone() })
        })
        .collect()
}

/// Every written turn's next chunk id.
pub fn next_chunk_ids(written: &[WrittenTurns]) -> Vec<Uuid> {
    written.iter().flat_map(|w| w.turns.iter().map(|t| t.next_chunk_id)).collect()
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
            out.push(("entity_values", entity_term(label, value)));
        }
        out
    }
}

/// A hybrid query: dense and BM25 prefetches fused by reciprocal rank fusion.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HybridQuery {
    /// The embedded query; None searches BM25 alone.
    pub dense: Option<Vec<f32>>,
    pub sparse: SparseVector,
    pub filter: SearchFilter,
    /// Hits to return; with `group_by`, groups to return (one hit each).
    pub limit: usize,
    /// Candidates each prefetch contributes to the fusion.
    pub prefetch_limit: usize,
    /// Payload field to group the hits by (group size 1): only the best hit of each distinct
    /// value is returned, best first — e.g. [`GROUP_BY_CONVERSATION`] for the best turn per
    /// conversation (see [`search_grouped`]). None: plain hits.
    pub group_by: Option<String>,
}

/// The payload field `search --group-by conversation` groups by.
pub const GROUP_BY_CONVERSATION: &str = "conversation_id";

/// Most candidates one prefetch fetches while a grouped search looks for `limit` groups.
pub const MAX_GROUP_PREFETCH: usize = 10_000;

/// A grouped search (`query.group_by`) on any backend, given its plain fused search: one fused
/// query over-fetches candidates (each prefetch and the fusion at least 10 × limit) and the
/// best hit of each group is kept, in fused order; while fewer than `limit`
/// groups came and the prefetches were full, again with 4 × the candidates (up to
/// [`MAX_GROUP_PREFETCH`] per prefetch).
///
/// Not Qdrant's own grouping (`query_groups` on the server, `EdgeShardRead::query_groups` in
/// qdrant-edge): its driver fetches `limit` candidates, then runs the query again without the
/// groups found so far, and a fusion restarts its ranks in every round — a conversation found in
/// the second round gets a first-rank RRF score and comes before the best conversation of the
/// first round. Reciprocal ranks from one fusion compare; a larger prefetch only appends lower
/// ranks, so the hits kept here have the scores an ungrouped search gives them.
pub(crate) async fn search_grouped<F, Fut>(q: &HybridQuery, field: &str, mut fused: F) -> Result<Vec<Hit>, StoreError>
where
    F: FnMut(HybridQuery) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Hit>, StoreError>>,
{
    if q.limit == 0 {
        return Ok(vec![]);
    }
    let mut prefetch = q.prefetch_limit.max(q.limit.saturating_mul(10)).min(MAX_GROUP_PREFETCH);
    loop {
        let candidates = HybridQuery { limit: prefetch, prefetch_limit: prefetch, group_by: None, ..q.clone() };
        let hits = fused(candidates).await?;
        // fewer fused candidates than one prefetch's limit: every prefetch had all it matches
        let exhausted = hits.len() < prefetch;
        let best = best_per_group(hits, field, q.limit);
        if best.len() >= q.limit || exhausted || prefetch >= MAX_GROUP_PREFETCH {
            return Ok(best);
        }
        prefetch = prefetch.saturating_mul(4).min(MAX_GROUP_PREFETCH);
    }
}

/// Hits a fusion of `q` can return at most: every prefetch's candidates (dense and BM25, or
/// BM25 alone). The backends ask the fusion for all of them and cut with [`rank_fused`].
pub(crate) fn fusion_candidates(q: &HybridQuery) -> usize {
    q.prefetch_limit.max(q.limit).saturating_mul(if q.dense.is_some() { 2 } else { 1 })
}

/// Fused hits, best first, in an order that does not change between runs: equal scores by point
/// id; the first `limit`.
///
/// Qdrant's reciprocal rank fusion (the server's and qdrant-edge's `rrf_scoring`) gathers the
/// points in a randomly seeded hash map and sorts them unstably, and equal fused scores are
/// common: a point ranked (1st, 2nd) by the two prefetches scores exactly what one ranked
/// (2nd, 1st) does. Their order — and, at the `limit` boundary, which of them is returned —
/// changed from one process to the next (`search` and `ask` cited the same turns in different
/// orders). So the fusion is asked for every candidate ([`fusion_candidates`]) and cut here.
pub(crate) fn rank_fused(mut hits: Vec<Hit>, limit: usize) -> Vec<Hit> {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    hits.truncate(limit);
    hits
}

/// The first (best) hit of each distinct value of the payload `field` (a dotted path; string or
/// number values), at most `limit`, in the given order; hits without the field are left out.
pub fn best_per_group(hits: Vec<Hit>, field: &str, limit: usize) -> Vec<Hit> {
    let mut seen = std::collections::HashSet::new();
    hits.into_iter()
        .filter(|h| group_key(&h.payload, field).is_some_and(|k| seen.insert(k)))
        .take(limit)
        .collect()
}

fn group_key(payload: &Map<String, Value>, field: &str) -> Option<String> {
    let mut parts = field.split('.');
    let mut value = payload.get(parts.next()?)?;
    for part in parts {
        value = value.get(part)?;
    }
    match value {
        Value::String(s) => Some(format!("s{s}")),
        Value::Number(n) => Some(format!("n{n}")),
        _ => None,
    }
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
    /// The edge store's filesystem has less free space than `qdrant.edge_min_free_bytes`:
    /// worth retrying too (mid-run, writes wait for space).
    #[error("too little free disk for the vector store: {0}")]
    LowDisk(String),
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
        matches!(self, StoreError::Transient(_) | StoreError::LowDisk(_))
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
    /// Deletes every point of a conversation (filter delete on `conversation_id`) in `tenant`
    /// (the empty tenant matches the points written without one) or, None, in every tenant;
    /// acknowledged. Returns how many points matched (counted just before the delete).
    async fn delete_conversation(&self, tenant: Option<&str>, conversation_id: &str) -> Result<u64, StoreError>;
    /// Deletes the chunks of the written turns that their new version no longer has (see
    /// [`WrittenTurns`]): one lookup of their next chunk ids, then, only for the turns where one
    /// exists, one acknowledged filter delete. Nothing to do for an empty slice.
    async fn delete_stale_chunks(&self, written: &[WrittenTurns]) -> Result<(), StoreError>;
    /// Deletes points by id, acknowledged (ids that do not exist are ignored).
    async fn delete_points(&self, ids: &[uuid::Uuid]) -> Result<(), StoreError>;
    /// Exact number of points matching the filter.
    async fn count(&self, filter: &SearchFilter) -> Result<u64, StoreError>;
    /// Hybrid search; with `query.group_by`, the best hit of each group (at most `limit` groups),
    /// best group first.
    async fn search(&self, query: &HybridQuery) -> Result<Vec<Hit>, StoreError>;
    /// Persists what is buffered (edge); a no-op for a server.
    async fn flush(&self) -> Result<(), StoreError>;
    /// Builds indexes and merges segments now (edge); a server optimizes by itself.
    async fn optimize(&self) -> Result<(), StoreError> {
        Ok(())
    }
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

/// `entity_values` term of an entity: label and lower-cased text, e.g. `PER:marie curie`.
pub fn entity_term(label: &str, value: &str) -> String {
    format!("{}:{}", label.to_uppercase(), value.trim().to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hit(n: u128, score: f32, payload: Value) -> Hit {
        Hit { id: Uuid::from_u128(n), score, payload: payload.as_object().unwrap().clone() }
    }

    #[test]
    fn the_best_hit_of_each_group_is_kept_in_order() {
        let hits = vec![
            hit(1, 0.9, json!({"conversation_id": "a"})),
            hit(2, 0.8, json!({"conversation_id": "a"})),
            hit(3, 0.7, json!({})),
            hit(4, 0.6, json!({"conversation_id": "b"})),
            hit(5, 0.5, json!({"conversation_id": 7})),
            hit(6, 0.4, json!({"conversation_id": "7"})),
            hit(7, 0.3, json!({"conversation_id": "b"})),
        ];
        let ids = |h: Vec<Hit>| h.into_iter().map(|h| h.id.as_u128()).collect::<Vec<_>>();
        assert_eq!(ids(best_per_group(hits.clone(), "conversation_id", 10)), [1, 4, 5, 6], "a number and a string differ");
        assert_eq!(ids(best_per_group(hits, "conversation_id", 2)), [1, 4]);
        let nested = vec![hit(1, 0.9, json!({"meta": {"thread": "x"}})), hit(2, 0.8, json!({"meta": {"thread": "x"}}))];
        assert_eq!(ids(best_per_group(nested, "meta.thread", 10)), [1]);
    }

    /// Candidates grow until enough groups come, or the prefetches run dry.
    #[tokio::test]
    async fn grouped_search_fetches_more_until_enough_groups() {
        // 1,000 hits, ten per conversation, in fused order
        let all: Vec<Hit> = (0..1_000).map(|i| hit(i, 1.0 / (i as f32 + 1.0), json!({"conversation_id": format!("c{}", i / 10)}))).collect();
        let q = HybridQuery { dense: Some(vec![1.0]), limit: 30, prefetch_limit: 50, group_by: Some("conversation_id".into()), ..Default::default() };
        let mut asked = vec![];
        let hits = search_grouped(&q, "conversation_id", |c| {
            asked.push((c.prefetch_limit, c.limit, c.group_by.clone()));
            let n = c.limit.min(all.len());
            std::future::ready(Ok(all[..n].to_vec()))
        })
        .await
        .unwrap();
        assert_eq!(hits.len(), 30);
        assert_eq!(hits[0].id.as_u128(), 0);
        assert_eq!(hits[29].id.as_u128(), 290, "the best (first) hit of conversation c29");
        // 300 per prefetch and fused (10 × limit): they hold 30 conversations
        assert_eq!(asked, [(300, 300, None)]);

        let q = HybridQuery { limit: 200, ..q };
        let mut asked = vec![];
        let hits = search_grouped(&q, "conversation_id", |c| {
            asked.push(c.prefetch_limit);
            let n = c.limit.min(all.len());
            std::future::ready(Ok(all[..n].to_vec()))
        })
        .await
        .unwrap();
        assert_eq!(hits.len(), 100, "all there are");
        assert_eq!(asked, [2_000], "fewer candidates than asked: nothing more to fetch");
    }

    /// Equal fused scores come out by point id whatever order the engine gave, and the cut
    /// keeps the same ones.
    #[test]
    fn equal_fused_scores_are_ordered_by_id_before_the_cut() {
        let tied = 1.0 / 61.0 + 1.0 / 62.0;
        let ids = |h: Vec<Hit>| h.into_iter().map(|h| h.id.as_u128()).collect::<Vec<_>>();
        let a = vec![hit(9, tied, json!({})), hit(3, 1.0 / 63.0, json!({})), hit(4, tied, json!({})), hit(7, tied, json!({}))];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(ids(rank_fused(a.clone(), 10)), [4, 7, 9, 3]);
        assert_eq!(ids(rank_fused(b, 2)), [4, 7]);
        assert_eq!(ids(rank_fused(a, 2)), [4, 7]);
        let q = HybridQuery { dense: Some(vec![1.0]), limit: 5, prefetch_limit: 50, ..Default::default() };
        assert_eq!(fusion_candidates(&q), 100);
        assert_eq!(fusion_candidates(&HybridQuery { dense: None, limit: 80, ..q }), 80);
    }
}
