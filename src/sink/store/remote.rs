//! `qdrant` backend: a Qdrant server or cluster over gRPC (`qdrant-client`).
//!
//! `https://` URLs use TLS with the system's root certificates; `api_key` is sent with every
//! call. Timeouts come from the configuration. The client's own version check prints to stdout,
//! so it is off and convoflow checks the server version itself at bootstrap: it refuses servers
//! older than 1.10 (no Query API / IDF modifier) and warns when the minor versions are more than
//! one apart. gRPC status codes decide what is worth retrying.

use std::time::Duration;

use async_trait::async_trait;
use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, DeletePointsBuilder,
    Distance, FieldType, Filter, Fusion, Modifier, NamedVectors, PointStruct, PrefetchQueryBuilder, Query,
    QueryPointsBuilder, ScoredPoint, Range, ScalarQuantizationBuilder, SparseVectorParamsBuilder, SparseVectorsConfigBuilder,
    UpsertPointsBuilder, Vector, VectorParamsBuilder, VectorsConfigBuilder, point_id::PointIdOptions,
    vectors_config,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use tonic::Code;
use tracing::{info, warn};
use uuid::Uuid;

use super::{Bootstrap, CollectionSpec, DENSE, FieldKind, Hit, HybridQuery, INDEXED_FIELDS, SPARSE, SearchFilter, StoreError, StorePoint, VectorStore, WrittenTurns};
use crate::config::QdrantConfig;

/// Oldest server with everything convoflow uses (Query API with fusion, sparse IDF).
const MIN_SERVER: (u64, u64) = (1, 10);
/// The qdrant-client release linked (Cargo.lock; a unit test keeps the two equal): servers more
/// than one minor version away get a warning.
const CLIENT_VERSION: (u64, u64) = (1, 20);

/// (major, minor) of a version string such as `1.19.0` or `v1.19`.
fn major_minor(v: &str) -> Option<(u64, u64)> {
    let mut it = v.split('.').map(|p| p.trim_start_matches('v').parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// Whether a server version is far enough from the client's to warn about.
fn versions_drift(server: (u64, u64), client: (u64, u64)) -> bool {
    server.0 != client.0 || server.1.abs_diff(client.1) > 1
}

pub struct RemoteStore {
    client: Qdrant,
    collection: String,
    url: String,
}

impl RemoteStore {
    pub fn connect(cfg: &QdrantConfig) -> Result<Self, StoreError> {
        let mut builder = Qdrant::from_url(&cfg.url)
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .skip_compatibility_check();
        if let Some(key) = cfg.api_key.as_ref().map(crate::config::Secret::expose).filter(|k| !k.is_empty()) {
            builder = builder.api_key(key.to_string());
        }
        let client = builder.build().map_err(|e| StoreError::Permanent(format!("Qdrant client for {}: {e}", cfg.url)))?;
        Ok(Self { client, collection: cfg.collection.clone(), url: cfg.url.clone() })
    }

    /// The hybrid query: dense and sparse prefetches (with the filter) fused by RRF.
    async fn fused(&self, q: HybridQuery) -> Result<Vec<Hit>, StoreError> {
        let f = filter(&q.filter);
        let prefetch_limit = q.prefetch_limit.max(q.limit) as u64;
        let prefetch = |query: Query, using: &str| {
            let mut p = PrefetchQueryBuilder::default().query(query).using(using).limit(prefetch_limit);
            if let Some(f) = &f {
                p = p.filter(f.clone());
            }
            p
        };
        let mut request = QueryPointsBuilder::new(&self.collection);
        if let Some(dense) = &q.dense {
            request = request.add_prefetch(prefetch(Query::new_nearest(dense.clone()), DENSE));
        }
        let sparse = qdrant_client::qdrant::VectorInput::new_sparse(
            q.sparse.indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            q.sparse.values.clone(),
        );
        request = request
            .add_prefetch(prefetch(Query::new_nearest(sparse), SPARSE))
            .query(Query::new_fusion(Fusion::Rrf))
            .limit(super::fusion_candidates(&q) as u64)
            .with_payload(true);
        if let Some(f) = f.clone() {
            request = request.filter(f);
        }
        let reply = self.client.query(request).await.map_err(|e| classify(&self.url, e))?;
        Ok(super::rank_fused(reply.result.into_iter().filter_map(to_hit).collect(), q.limit))
    }

    async fn check_server_version(&self) -> Result<(), StoreError> {
        let reply = self.client.health_check().await.map_err(|e| classify(&self.url, e))?;
        match major_minor(&reply.version) {
            Some(server) if server < MIN_SERVER => Err(StoreError::Permanent(format!(
                "Qdrant server at {} is version {}; convoflow needs {}.{} or newer",
                self.url, reply.version, MIN_SERVER.0, MIN_SERVER.1
            ))),
            Some(server) => {
                if versions_drift(server, CLIENT_VERSION) {
                    let client = format!("qdrant-client {}.{}", CLIENT_VERSION.0, CLIENT_VERSION.1);
                    warn!(server = %reply.version, client, "Qdrant server and client versions differ by more than one minor version");
                }
                info!(url = %self.url, server = %reply.version, "connected to Qdrant");
                Ok(())
            }
            None => {
                warn!(server = %reply.version, "could not parse the Qdrant server version");
                Ok(())
            }
        }
    }

    async fn validate(&self, spec: &CollectionSpec) -> Result<(), StoreError> {
        let info = self.client.collection_info(&spec.name).await.map_err(|e| classify(&self.url, e))?;
        let params = info.result.and_then(|r| r.config).and_then(|c| c.params).ok_or_else(|| {
            StoreError::IncompatibleCollection { collection: spec.name.clone(), reason: "no collection parameters returned".into() }
        })?;
        let dense = match params.vectors_config.and_then(|v| v.config) {
            Some(vectors_config::Config::ParamsMap(map)) => map.map.get(DENSE).cloned(),
            _ => None,
        }
        .ok_or_else(|| StoreError::IncompatibleCollection {
            collection: spec.name.clone(),
            reason: format!("no named dense vector {DENSE:?}"),
        })?;
        super::check_dense(spec, dense.size as usize, dense.distance == Distance::Cosine as i32)?;
        let sparse = params.sparse_vectors_config.and_then(|s| s.map.get(SPARSE).cloned()).ok_or_else(|| {
            StoreError::IncompatibleCollection { collection: spec.name.clone(), reason: format!("no sparse vector {SPARSE:?}") }
        })?;
        if sparse.modifier != Some(Modifier::Idf as i32) {
            return Err(StoreError::IncompatibleCollection {
                collection: spec.name.clone(),
                reason: format!("the sparse vector {SPARSE:?} has no IDF modifier"),
            });
        }
        Ok(())
    }
}

/// Maps a client error to retry semantics.
fn classify(url: &str, e: QdrantError) -> StoreError {
    match &e {
        QdrantError::ResponseError { status } => {
            let msg = format!("Qdrant at {url}: {} {}", status.code(), status.message());
            match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => StoreError::Transient(msg),
                Code::ResourceExhausted | Code::OutOfRange if status.message().to_lowercase().contains("too large") => {
                    StoreError::TooLarge(msg)
                }
                Code::ResourceExhausted => StoreError::Transient(msg),
                Code::Internal | Code::Unknown if status.message().contains("transport") => StoreError::Transient(msg),
                Code::NotFound => StoreError::MissingCollection(msg),
                // a point the server cannot take (wrong vector size, malformed payload): the data's
                Code::InvalidArgument => StoreError::Rejected(msg),
                _ => StoreError::Permanent(msg),
            }
        }
        QdrantError::ResourceExhaustedError { .. } => StoreError::Transient(format!("Qdrant at {url}: {e}")),
        QdrantError::Io(_) => StoreError::Transient(format!("Qdrant at {url}: {e}")),
        _ => StoreError::Permanent(format!("Qdrant at {url}: {e}")),
    }
}

/// The points of a conversation, in one tenant or (None) in all.
fn conversation_filter(tenant: Option<&str>, conversation_id: &str) -> Filter {
    let mut must = vec![Condition::matches("conversation_id", conversation_id.to_string())];
    if let Some(tenant) = tenant {
        must.push(Condition::matches("tenant", tenant.to_string()));
    }
    Filter::must(must)
}

fn filter(f: &SearchFilter) -> Option<Filter> {
    let mut must: Vec<Condition> =
        f.keyword_conditions().into_iter().map(|(field, value)| Condition::matches(field, value)).collect();
    if let Some(stars) = f.min_stars {
        must.push(Condition::range("sentiment_stars", Range { gte: Some(f64::from(stars)), ..Default::default() }));
    }
    (!must.is_empty()).then(|| Filter::must(must))
}

fn sparse_vector(v: &crate::event::SparseVector) -> Vector {
    Vector::new_sparse(v.indices.iter().map(|&i| i as u32).collect::<Vec<_>>(), v.values.clone())
}

fn to_point(p: &StorePoint) -> PointStruct {
    let mut vectors = NamedVectors::default().add_vector(SPARSE, sparse_vector(&p.sparse));
    if let Some(dense) = &p.dense {
        vectors = vectors.add_vector(DENSE, Vector::new_dense(dense.clone()));
    }
    PointStruct::new(p.id.to_string(), vectors, Payload::from(p.payload.clone()))
}

/// A scored point of convoflow's (UUID id) as a hit.
fn to_hit(p: ScoredPoint) -> Option<Hit> {
    let id = match p.id?.point_id_options? {
        PointIdOptions::Uuid(s) => Uuid::parse_str(&s).ok()?,
        PointIdOptions::Num(_) => return None,
    };
    let payload = p.payload.into_iter().map(|(k, v)| (k, v.into_json())).collect();
    Some(Hit { id, score: p.score, payload })
}

#[async_trait]
impl VectorStore for RemoteStore {
    fn backend(&self) -> &'static str {
        "qdrant"
    }

    async fn ensure_collection(&self, spec: &CollectionSpec, mode: Bootstrap) -> Result<(), StoreError> {
        self.check_server_version().await?;
        let exists = self.client.collection_exists(&spec.name).await.map_err(|e| classify(&self.url, e))?;
        if !exists {
            if mode == Bootstrap::MustExist {
                return Err(StoreError::MissingCollection(format!("{} on {}", spec.name, self.url)));
            }
            let mut dense = VectorParamsBuilder::new(spec.dense_dim as u64, Distance::Cosine).on_disk(spec.on_disk);
            if spec.quantization == super::Quantization::Scalar {
                dense = dense.quantization_config(
                    ScalarQuantizationBuilder::default()
                        .r#type(qdrant_client::qdrant::QuantizationType::Int8 as i32)
                        .quantile(0.99)
                        .always_ram(true),
                );
            }
            let mut vectors = VectorsConfigBuilder::default();
            vectors.add_named_vector_params(DENSE, dense);
            let mut sparse = SparseVectorsConfigBuilder::default();
            sparse.add_named_vector_params(SPARSE, SparseVectorParamsBuilder::default().modifier(Modifier::Idf as i32));
            let create = CreateCollectionBuilder::new(&spec.name).vectors_config(vectors).sparse_vectors_config(sparse);
            match self.client.create_collection(create).await {
                Ok(_) => info!(collection = %spec.name, dim = spec.dense_dim, "created the Qdrant collection"),
                // Another worker created it first: fine, it is validated below.
                Err(QdrantError::ResponseError { status }) if status.code() == Code::AlreadyExists
                    || status.message().contains("already exists") => {}
                Err(e) => return Err(classify(&self.url, e)),
            }
        }
        self.validate(spec).await?;
        if mode == Bootstrap::CreateIfMissing {
            // Creating an index that exists is accepted by Qdrant (same schema): idempotent.
            for (field, kind) in INDEXED_FIELDS {
                let field_type = match kind {
                    FieldKind::Keyword => FieldType::Keyword,
                    FieldKind::Integer => FieldType::Integer,
                    FieldKind::Datetime => FieldType::Datetime,
                };
                self.client
                    .create_field_index(CreateFieldIndexCollectionBuilder::new(&spec.name, *field, field_type).wait(true))
                    .await
                    .map_err(|e| classify(&self.url, e))?;
            }
        }
        Ok(())
    }

    async fn upsert(&self, points: &[StorePoint]) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        let points: Vec<PointStruct> = points.iter().map(to_point).collect();
        self.client
            .upsert_points(UpsertPointsBuilder::new(&self.collection, points).wait(true))
            .await
            .map(drop)
            .map_err(|e| classify(&self.url, e))
    }

    async fn delete_conversation(&self, tenant: Option<&str>, conversation_id: &str) -> Result<u64, StoreError> {
        let f = conversation_filter(tenant, conversation_id);
        let reply = self
            .client
            .count(CountPointsBuilder::new(&self.collection).exact(true).filter(f.clone()))
            .await
            .map_err(|e| classify(&self.url, e))?;
        let matched = reply.result.map_or(0, |r| r.count);
        if matched > 0 {
            self.client
                .delete_points(DeletePointsBuilder::new(&self.collection).points(f).wait(true))
                .await
                .map_err(|e| classify(&self.url, e))?;
        }
        Ok(matched)
    }

    async fn delete_stale_chunks(&self, written: &[WrittenTurns]) -> Result<(), StoreError> {
        if written.is_empty() {
            return Ok(());
        }
        let ids: Vec<qdrant_client::qdrant::PointId> = super::next_chunk_ids(written).iter().map(|id| id.to_string().into()).collect();
        let found = self
            .client
            .get_points(qdrant_client::qdrant::GetPointsBuilder::new(&self.collection, ids).with_payload(false).with_vectors(false))
            .await
            .map_err(|e| classify(&self.url, e))?;
        let existing: std::collections::HashSet<Uuid> = found
            .result
            .into_iter()
            .filter_map(|p| match p.id?.point_id_options? {
                PointIdOptions::Uuid(s) => Uuid::parse_str(&s).ok(),
                PointIdOptions::Num(_) => None,
            })
            .collect();
        let stale = super::with_stale_chunks(written, &existing);
        if stale.is_empty() {
            return Ok(());
        }
        let messages = stale.iter().map(|w| {
            let groups = w.turns.iter().map(|t| {
                let at_or_above = Range { gte: Some(t.chunks as f64), ..Default::default() };
                Condition::from(Filter::must([
                    Condition::matches("turn_id", t.turn_id.clone()),
                    Condition::range("chunk_index", at_or_above),
                ]))
            });
            let mut conversation = conversation_filter(Some(&w.tenant), &w.conversation_id);
            conversation.must.push(Condition::from(Filter::should(groups)));
            Condition::from(conversation)
        });
        self.client
            .delete_points(DeletePointsBuilder::new(&self.collection).points(Filter::should(messages)).wait(true))
            .await
            .map(drop)
            .map_err(|e| classify(&self.url, e))
    }

    async fn delete_points(&self, ids: &[Uuid]) -> Result<(), StoreError> {
        let ids: Vec<qdrant_client::qdrant::PointId> = ids.iter().map(|id| id.to_string().into()).collect();
        self.client
            .delete_points(
                DeletePointsBuilder::new(&self.collection).points(qdrant_client::qdrant::PointsIdsList { ids }).wait(true),
            )
            .await
            .map(drop)
            .map_err(|e| classify(&self.url, e))
    }

    async fn count(&self, f: &SearchFilter) -> Result<u64, StoreError> {
        let mut request = CountPointsBuilder::new(&self.collection).exact(true);
        if let Some(f) = filter(f) {
            request = request.filter(f);
        }
        let reply = self.client.count(request).await.map_err(|e| classify(&self.url, e))?;
        Ok(reply.result.map_or(0, |r| r.count))
    }

    async fn search(&self, q: &HybridQuery) -> Result<Vec<Hit>, StoreError> {
        match &q.group_by {
            Some(field) => super::search_grouped(q, field, |candidates| self.fused(candidates)).await,
            None => self.fused(q.clone()).await,
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;

    /// The version compared with the server's is qdrant-client's (as locked), not convoflow's
    /// own package version, which made every server look far away.
    #[test]
    fn servers_are_compared_with_the_linked_client_version() {
        let lock = include_str!("../../../Cargo.lock");
        let at = lock.find("name = \"qdrant-client\"\nversion = \"").expect("qdrant-client in Cargo.lock");
        let version = lock[at..].lines().nth(1).unwrap().trim_start_matches("version = ").trim_matches('"');
        assert_eq!(major_minor(version), Some(CLIENT_VERSION), "update CLIENT_VERSION to {version}");
        assert!(!versions_drift((1, 19), CLIENT_VERSION) && !versions_drift((1, 21), CLIENT_VERSION));
        assert!(versions_drift((1, 17), CLIENT_VERSION) && versions_drift((2, 20), CLIENT_VERSION));
        assert_eq!(major_minor("v1.19.0"), Some((1, 19)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, message: &str) -> StoreError {
        classify("http://q:6334", QdrantError::ResponseError { status: tonic::Status::new(code, message) })
    }

    /// What each gRPC answer means for the worker: wait it out, split the batch, dead-letter
    /// the message (halving the batch to find it), or stop.
    #[test]
    fn grpc_errors_are_told_apart_as_outages_content_rejections_and_the_rest() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Aborted, Code::Cancelled, Code::ResourceExhausted] {
            assert!(matches!(status(code, "busy"), StoreError::Transient(_)), "{code:?}");
        }
        assert!(matches!(status(Code::Internal, "transport error"), StoreError::Transient(_)));
        assert!(matches!(status(Code::ResourceExhausted, "message too large"), StoreError::TooLarge(_)));
        assert!(matches!(status(Code::OutOfRange, "payload too large"), StoreError::TooLarge(_)));
        let rejected = status(Code::InvalidArgument, "Wrong input: Vector dimension error: expected dim: 8, got 7");
        assert!(matches!(&rejected, StoreError::Rejected(m) if m.contains("Vector dimension error")), "{rejected:?}");
        assert!(matches!(status(Code::NotFound, "Collection `c` doesn't exist!"), StoreError::MissingCollection(_)));
        for code in [Code::Unauthenticated, Code::PermissionDenied, Code::Internal, Code::FailedPrecondition] {
            assert!(matches!(status(code, "no"), StoreError::Permanent(_)), "{code:?}");
        }
    }
}
