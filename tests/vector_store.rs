//! The vector-store contract, run against the embedded `edge` backend always and against a
//! remote Qdrant (`qdrant` backend) when QDRANT_URL is set, e.g.
//!   QDRANT_URL=http://127.0.0.1:6334 [QDRANT_API_KEY=...] cargo test --release --test vector_store
//! Plus: dimension mismatch, and failure injection through `FlakyStore` (a test double wrapping
//! the real edge store that fails the first N calls).

mod common;

use common::flaky_store::FlakyStore;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use convoflow::config::{QdrantConfig, StoreBackend};
use convoflow::pipeline::bm25::{Bm25Params, document_vector, query_vector};
use convoflow::sink::store::points::rfc3339;
use convoflow::sink::store::writer::{BatchLimits, RetryPolicy, StoreWriter};
use convoflow::sink::store::{
    self, Bootstrap, CollectionSpec, HybridQuery, Quantization, SearchFilter, StoreError, StorePoint, VectorStore,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;
use uuid::Uuid;

const DIM: usize = 64;
const POINTS: usize = 10_000;
const WORDS: &[&str] = &[
    "bonjour", "merci", "facture", "colis", "livraison", "retard", "compte", "adresse", "hello", "thanks", "invoice",
    "parcel", "delivery", "delay", "account", "address", "router", "mobile", "plan", "refund", "technician", "appointment",
];

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn random_vector(rng: &mut StdRng) -> Vec<f32> {
    unit((0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect())
}

fn point(i: usize, text: &str, dense: Vec<f32>) -> StorePoint {
    let payload = json!({
        "conversation_id": format!("conv-{}", i / 10),
        "turn_id": format!("t{}", i % 10),
        "chunk_index": 0,
        "tenant": format!("tenant-{}", i % 3),
        "speaker": if i.is_multiple_of(2) { "agent" } else { "customer" },
        "language": if i.is_multiple_of(4) { "en" } else { "fr" },
        "ts": rfc3339(1_780_000_000_000 + i as i64 * 1000),
        "text": text,
        "sentiment_stars": 1 + (i % 5) as i64,
        "entity_labels": if i.is_multiple_of(7) { json!(["PER"]) } else { json!([]) },
        "entity_values": if i.is_multiple_of(7) { json!(["PER:marie curie"]) } else { json!([]) },
    });
    StorePoint {
        id: convoflow::event::point_id(&format!("tenant-{}", i % 3), &format!("conv-{}", i / 10), &format!("t{}", i % 10), 0),
        dense: Some(dense),
        sparse: document_vector(text, &Bm25Params::default()),
        payload: payload.as_object().unwrap().clone(),
    }
}

/// 10,000 ordinary points and three planted ones near `query` that mention "zygomorphic orchid".
struct Dataset {
    points: Vec<StorePoint>,
    query: Vec<f32>,
    planted: Vec<Uuid>,
}

fn dataset() -> Dataset {
    let mut rng = StdRng::seed_from_u64(7);
    let mut points: Vec<StorePoint> = (0..POINTS)
        .map(|i| {
            let text: Vec<&str> = (0..12).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
            point(i, &text.join(" "), random_vector(&mut rng))
        })
        .collect();
    let query = random_vector(&mut rng);
    let mut planted = vec![];
    // Closer in the dense space and stronger in BM25 (tf, length) with each step: a clear order.
    let texts = [
        "zygomorphic orchid zygomorphic orchid",
        "la fleur zygomorphic orchid du client",
        "la fleur zygomorphic orchid du client, delivery delay et retard de livraison",
    ];
    for (k, (noise, text)) in [0.05f32, 0.1, 0.15].into_iter().zip(texts).enumerate() {
        let i = 10 * (POINTS / 10 + k); // a conversation of its own each
        let dense = unit(query.iter().map(|x| x + noise * rng.random_range(-1.0f32..1.0)).collect());
        let p = point(i, text, dense);
        planted.push(p.id);
        points.push(p);
    }
    Dataset { points, query, planted }
}

fn spec(name: &str, dim: usize) -> CollectionSpec {
    CollectionSpec { name: name.into(), dense_dim: dim, on_disk: false, quantization: Quantization::None }
}

fn count_where(points: &[StorePoint], pred: impl Fn(&serde_json::Map<String, serde_json::Value>) -> bool) -> u64 {
    points.iter().filter(|p| pred(&p.payload)).count() as u64
}

/// The contract every backend passes. `reopen` gives a fresh handle on the same collection.
async fn contract(open: impl Fn() -> Arc<dyn VectorStore>, collection: &str) {
    let data = dataset();
    let store = open();
    let spec = spec(collection, DIM);
    assert!(matches!(store.ensure_collection(&spec, Bootstrap::MustExist).await, Err(StoreError::MissingCollection(_))));
    store.ensure_collection(&spec, Bootstrap::CreateIfMissing).await.unwrap();
    store.ensure_collection(&spec, Bootstrap::CreateIfMissing).await.expect("bootstrap is idempotent");

    let writer = StoreWriter::new(store.clone(), BatchLimits { max_points: 256, max_bytes: 8 << 20 }, RetryPolicy::default());
    writer.upsert_all(&data.points).await.unwrap();
    let total = data.points.len() as u64;
    assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), total);
    assert!(writer.counters.requests.load(Ordering::Relaxed) >= (POINTS / 256) as u64, "sent in batches");

    // replays upsert the same ids: the count does not move
    writer.upsert_all(&data.points[..2_000]).await.unwrap();
    assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), total, "idempotent re-upsert");

    // filtered counts agree with the data
    let tenant = SearchFilter { tenant: Some("tenant-1".into()), ..Default::default() };
    assert_eq!(store.count(&tenant).await.unwrap(), count_where(&data.points, |p| p["tenant"] == "tenant-1"));
    let happy_agents = SearchFilter { speaker: Some("agent".into()), min_stars: Some(4), ..Default::default() };
    assert_eq!(
        store.count(&happy_agents).await.unwrap(),
        count_where(&data.points, |p| p["speaker"] == "agent" && p["sentiment_stars"].as_i64().unwrap() >= 4)
    );
    let marie = SearchFilter { entities: vec![("PER".into(), "Marie Curie".into())], ..Default::default() };
    assert_eq!(store.count(&marie).await.unwrap(), count_where(&data.points, |p| p["entity_labels"] == json!(["PER"])));

    // hybrid search: the planted neighbours come first
    let query = HybridQuery {
        dense: Some(data.query.clone()),
        sparse: query_vector("zygomorphic orchid"),
        filter: SearchFilter::default(),
        limit: 10,
        prefetch_limit: 50,
        group_by: None,
    };
    let hits = store.search(&query).await.unwrap();
    assert_eq!(hits.len(), 10);
    let top: Vec<Uuid> = hits.iter().take(3).map(|h| h.id).collect();
    assert_eq!(top, data.planted, "planted points first, closest first: {hits:?}");
    assert!(hits[0].payload["text"].as_str().unwrap().contains("zygomorphic"));
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    // BM25 alone finds them too, and a filter narrows to the one planted point of its tenant
    let sparse_only = HybridQuery { dense: None, ..query.clone() };
    let sparse_hits: Vec<Uuid> = store.search(&sparse_only).await.unwrap().iter().take(3).map(|h| h.id).collect();
    assert_eq!(sparse_hits.iter().filter(|id| data.planted.contains(id)).count(), 3);
    let planted_tenant = data.points.iter().find(|p| p.id == data.planted[1]).unwrap().payload["tenant"].clone();
    let filtered = HybridQuery {
        filter: SearchFilter { tenant: Some(planted_tenant.as_str().unwrap().into()), ..Default::default() },
        ..query.clone()
    };
    let hits = store.search(&filtered).await.unwrap();
    assert_eq!(hits[0].id, data.planted[1]);
    assert!(hits.iter().all(|h| h.payload["tenant"] == planted_tenant));

    // delete by conversation, tenant by tenant: a deletion touches its own tenant's points only
    // (this data spreads one conversation over three tenants, as if three tenants reused its id)
    let conv = SearchFilter { conversation_id: Some("conv-42".into()), ..Default::default() };
    assert_eq!(store.count(&conv).await.unwrap(), 10);
    let of_tenant_1 = count_where(&data.points, |p| p["conversation_id"] == "conv-42" && p["tenant"] == "tenant-1");
    assert!(of_tenant_1 > 0);
    assert_eq!(writer.delete_conversation(Some("tenant-1"), "conv-42").await.unwrap(), of_tenant_1 as u64, "it counts what it deletes");
    assert_eq!(store.count(&conv).await.unwrap(), 10 - of_tenant_1);
    assert_eq!(writer.delete_conversation(Some(""), "conv-42").await.unwrap(), 0, "no point without a tenant");
    assert_eq!(store.count(&conv).await.unwrap(), 10 - of_tenant_1);
    // no tenant: every tenant's points of the conversation at once
    assert_eq!(writer.delete_conversation(None, "conv-42").await.unwrap(), 10 - of_tenant_1 as u64);
    assert_eq!(store.count(&conv).await.unwrap(), 0);
    assert_eq!(writer.delete_conversation(None, "conv-42").await.unwrap(), 0, "nothing left to match");
    assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), total - 10);
    stale_chunks(&writer, &store, &data).await;

    // restart: a new handle on the same collection sees everything
    store.flush().await.unwrap();
    drop(writer);
    drop(store);
    let reopened = open();
    reopened.ensure_collection(&spec, Bootstrap::MustExist).await.unwrap();
    assert_eq!(reopened.count(&SearchFilter::default()).await.unwrap(), total - 10);
    let hits = reopened.search(&query).await.unwrap();
    assert_eq!(hits[0].id, data.planted[0]);

    // an existing collection with another dimension is refused clearly
    let err = reopened.ensure_collection(&self::spec(collection, DIM + 1), Bootstrap::CreateIfMissing).await.unwrap_err();
    assert!(matches!(err, StoreError::DimensionMismatch { existing: DIM, expected, .. } if expected == DIM + 1), "{err:?}");
    assert!(err.to_string().contains(&format!("dimension {DIM}")), "{err}");
}

/// A turn written with three chunks, then again with one: the stale chunks 1 and 2 are deleted,
/// and nothing of other turns, conversations or tenants (the same ids in another tenant, a turn
/// whose chunk count did not shrink).
async fn stale_chunks(writer: &StoreWriter, store: &Arc<dyn VectorStore>, data: &Dataset) {
    use convoflow::event::point_id;
    use convoflow::sink::store::{WrittenTurn, WrittenTurns};
    let chunk = |tenant: &str, conversation: &str, turn: &str, index: usize| {
        let mut p = data.points[0].clone();
        p.id = convoflow::event::point_id(tenant, conversation, turn, index);
        for (k, v) in [("tenant", json!(tenant)), ("conversation_id", json!(conversation)), ("turn_id", json!(turn)), ("chunk_index", json!(index))] {
            p.payload.insert(k.into(), v);
        }
        p
    };
    let mut points = vec![];
    for tenant in ["s1", "s2"] {
        for index in 0..3 {
            points.push(chunk(tenant, "conv-stale", "long", index));
            points.push(chunk(tenant, "conv-stale", "steady", index));
        }
    }
    writer.upsert_all(&points).await.unwrap();
    let of = |tenant: &str| SearchFilter { tenant: Some(tenant.into()), conversation_id: Some("conv-stale".into()), ..Default::default() };
    assert_eq!(store.count(&of("s1")).await.unwrap(), 6);
    let turn = |turn_id: &str, chunks: usize| WrittenTurn {
        turn_id: turn_id.into(),
        chunks,
        next_chunk_id: point_id("s1", "conv-stale", turn_id, chunks),
    };
    let written = WrittenTurns { tenant: "s1".into(), conversation_id: "conv-stale".into(), turns: vec![turn("long", 1), turn("steady", 3)] };
    writer.delete_stale_chunks(std::slice::from_ref(&written)).await.unwrap();
    assert_eq!(store.count(&of("s1")).await.unwrap(), 4, "chunks 1 and 2 of the shortened turn are gone");
    assert_eq!(store.count(&of("s2")).await.unwrap(), 6, "another tenant's turn with the same ids stays");
    writer.delete_stale_chunks(&[written]).await.unwrap();
    assert_eq!(store.count(&of("s1")).await.unwrap(), 4, "again: nothing stale is left, nothing else goes");
    assert_eq!(writer.delete_conversation(None, "conv-stale").await.unwrap(), 10);
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn edge_config(dir: &std::path::Path) -> QdrantConfig {
    QdrantConfig { backend: StoreBackend::Edge, data_dir: dir.to_path_buf(), edge_optimize_every_points: 0, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_backend_passes_the_contract() {
    let dir = temp_dir("edge-contract");
    let cfg = edge_config(&dir);
    contract(|| store::open(&cfg).unwrap(), &cfg.collection).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// No Qdrant server can be installed here: run with `QDRANT_URL=http://host:6334 cargo test
/// --release --test vector_store -- --ignored` against one (verified with Qdrant 1.19).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QDRANT_URL (a Qdrant server)"]
async fn qdrant_backend_passes_the_contract() {
    let url = std::env::var("QDRANT_URL").expect("QDRANT_URL: the gRPC URL of a Qdrant server");
    let cfg = QdrantConfig {
        backend: StoreBackend::Qdrant,
        url: url.clone(),
        api_key: std::env::var("QDRANT_API_KEY").ok().map(convoflow::config::Secret::new),
        collection: format!("convoflow-contract-{}", std::process::id()),
        ..Default::default()
    };
    contract(|| store::open(&cfg).unwrap(), &cfg.collection).await;
    let mut client = qdrant_client::Qdrant::from_url(&url).skip_compatibility_check();
    if let Some(key) = &cfg.api_key {
        client = client.api_key(key.expose().to_string());
    }
    client.build().unwrap().delete_collection(&cfg.collection).await.unwrap();
}

/// `--group-by conversation`: several turns of one conversation match; grouped, each
/// conversation comes once, with its best turn, best conversation first.
async fn grouping(open: impl Fn() -> Arc<dyn VectorStore>, collection: &str) {
    let store = open();
    store.ensure_collection(&spec(collection, DIM), Bootstrap::CreateIfMissing).await.unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut points: Vec<StorePoint> = (0..500)
        .map(|i| {
            let text: Vec<&str> = (0..12).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
            point(i, &text.join(" "), random_vector(&mut rng))
        })
        .collect();
    let query = random_vector(&mut rng);
    // (index → conversation conv-{i/10}, turn t{i%10}), dense noise, text: the closer the
    // vector and the denser the terms, the better; three conversations, 3 + 2 + 1 matching turns
    let planted = [
        (9000, 0.2f32, "zygomorphic orchid zygomorphic orchid"),
        (9010, 0.4, "zygomorphic orchid, zygomorphic"),
        (9001, 0.6, "la fleur zygomorphic orchid"),
        (9020, 0.8, "la fleur zygomorphic orchid du client"),
        (9011, 1.0, "la fleur zygomorphic orchid du client, delivery"),
        (9002, 1.2, "la fleur zygomorphic orchid du client, delivery delay et retard de livraison"),
    ];
    // away from the query along one direction orthogonal to it: cosine 1/√(1+d²), strictly in
    // the order above (no sampling noise to swap neighbours)
    let away = {
        let r = random_vector(&mut rng);
        let along: f32 = r.iter().zip(&query).map(|(a, b)| a * b).sum();
        unit(r.iter().zip(&query).map(|(a, b)| a - along * b).collect())
    };
    let mut ids = std::collections::HashMap::new();
    for (i, distance, text) in planted {
        let dense = unit(query.iter().zip(&away).map(|(q, e)| q + distance * e).collect());
        let p = point(i, text, dense);
        ids.insert(i, p.id);
        points.push(p);
    }
    StoreWriter::new(store.clone(), BatchLimits::default(), RetryPolicy::default()).upsert_all(&points).await.unwrap();
    let conversation = |h: &convoflow::sink::store::Hit| h.payload["conversation_id"].as_str().unwrap().to_string();

    let plain = HybridQuery {
        dense: Some(query.clone()),
        sparse: query_vector("zygomorphic orchid"),
        filter: SearchFilter::default(),
        limit: 6,
        prefetch_limit: 50,
        group_by: None,
    };
    let hits = store.search(&plain).await.unwrap();
    let convs: Vec<String> = hits.iter().map(conversation).collect();
    assert_eq!(convs.iter().filter(|c| *c == "conv-900").count(), 3, "ungrouped, one conversation fills rows: {convs:?}");

    let grouped = HybridQuery { limit: 3, group_by: Some(store::GROUP_BY_CONVERSATION.into()), ..plain.clone() };
    let hits = store.search(&grouped).await.unwrap();
    let got: Vec<Uuid> = hits.iter().map(|h| h.id).collect();
    assert_eq!(got, vec![ids[&9000], ids[&9010], ids[&9020]], "the best turn of each conversation, best first: {hits:?}");
    assert_eq!(hits.iter().map(conversation).collect::<Vec<_>>(), ["conv-900", "conv-901", "conv-902"]);
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score), "{hits:?}");
    assert!(hits[0].payload["text"].as_str().unwrap().contains("zygomorphic"), "hits carry their payload");
    // each group's hit is its conversation's first in the ungrouped ranking
    let all = store.search(&HybridQuery { limit: 30, ..plain.clone() }).await.unwrap();
    for h in &hits {
        let first = all.iter().find(|a| conversation(a) == conversation(h)).unwrap();
        assert_eq!(first.id, h.id, "{}", conversation(h));
    }
    // more groups than match: every conversation at most once
    let many = store.search(&HybridQuery { limit: 20, ..grouped.clone() }).await.unwrap();
    let distinct: std::collections::HashSet<String> = many.iter().map(conversation).collect();
    assert_eq!(distinct.len(), many.len(), "one hit per conversation");
    assert_eq!(many.len(), 20);
    assert_eq!(&many[..3].iter().map(|h| h.id).collect::<Vec<_>>(), &got);
    // BM25 alone and under a filter, the same
    let sparse = store.search(&HybridQuery { dense: None, ..grouped.clone() }).await.unwrap();
    let sparse_convs: std::collections::HashSet<String> = sparse.iter().map(conversation).collect();
    assert_eq!(sparse.len(), 3);
    assert_eq!(sparse_convs, ["conv-900", "conv-901", "conv-902"].map(String::from).into());
    let tenant = points.iter().find(|p| p.id == ids[&9001]).unwrap().payload["tenant"].as_str().unwrap().to_string();
    let filtered = HybridQuery { filter: SearchFilter { tenant: Some(tenant.clone()), ..Default::default() }, ..grouped.clone() };
    let hits = store.search(&filtered).await.unwrap();
    assert!(hits.iter().all(|h| h.payload["tenant"] == json!(tenant)));
    let of_900: Vec<_> = hits.iter().filter(|h| conversation(h) == "conv-900").collect();
    assert_eq!(of_900.len(), 1, "{hits:?}");
    assert_eq!(of_900[0].id, ids[&9001], "conv-900's best turn of that tenant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_backend_groups_hits_by_conversation() {
    let dir = temp_dir("edge-grouping");
    let cfg = edge_config(&dir);
    grouping(|| store::open(&cfg).unwrap(), &cfg.collection).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `QDRANT_URL=http://host:6334 cargo test --release --test vector_store -- --ignored`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QDRANT_URL (a Qdrant server)"]
async fn qdrant_backend_groups_hits_by_conversation() {
    let url = std::env::var("QDRANT_URL").expect("QDRANT_URL: the gRPC URL of a Qdrant server");
    let cfg = QdrantConfig {
        backend: StoreBackend::Qdrant,
        url: url.clone(),
        api_key: std::env::var("QDRANT_API_KEY").ok().map(convoflow::config::Secret::new),
        collection: format!("convoflow-grouping-{}", std::process::id()),
        ..Default::default()
    };
    grouping(|| store::open(&cfg).unwrap(), &cfg.collection).await;
    let mut client = qdrant_client::Qdrant::from_url(&url).skip_compatibility_check();
    if let Some(key) = &cfg.api_key {
        client = client.api_key(key.expose().to_string());
    }
    client.build().unwrap().delete_collection(&cfg.collection).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_optimization_keeps_everything_searchable() {
    let dir = temp_dir("edge-optimize");
    // due after 1,000 points, started once the writes paused for 300 ms: mid-loop below
    let cfg = QdrantConfig { edge_optimize_every_points: 1_000, edge_optimize_idle_ms: 300, ..edge_config(&dir) };
    let store = store::open(&cfg).unwrap();
    store.ensure_collection(&spec(&cfg.collection, DIM), Bootstrap::CreateIfMissing).await.unwrap();
    let data = dataset();
    let writer = StoreWriter::new(store.clone(), BatchLimits::default(), RetryPolicy::default());
    writer.upsert_all(&data.points).await.unwrap();
    // the background pass may still run: counts and searches stay right meanwhile and after
    for _ in 0..3 {
        assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), data.points.len() as u64);
        let q = HybridQuery {
            dense: Some(data.query.clone()),
            sparse: query_vector("zygomorphic orchid"),
            filter: SearchFilter::default(),
            limit: 3,
            prefetch_limit: 50,
            group_by: None,
        };
        let top: Vec<Uuid> = store.search(&q).await.unwrap().iter().map(|h| h.id).collect();
        assert_eq!(top, data.planted);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

async fn flaky(dir: &std::path::Path, fail_first: usize, failure: StoreError, max_points: usize) -> Arc<FlakyStore> {
    let cfg = edge_config(dir);
    let inner = store::open(&cfg).unwrap();
    inner.ensure_collection(&spec(&cfg.collection, DIM), Bootstrap::CreateIfMissing).await.unwrap();
    Arc::new(FlakyStore::new(inner, fail_first, failure, max_points))
}

fn small_points(n: usize) -> Vec<StorePoint> {
    let mut rng = StdRng::seed_from_u64(3);
    (0..n).map(|i| point(i, "merci pour la livraison", random_vector(&mut rng))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_nothing_is_lost() {
    let dir = temp_dir("flaky-transient");
    let store = flaky(&dir, 3, StoreError::Transient("unavailable (injected)".into()), usize::MAX).await;
    let retry = RetryPolicy { max_attempts: 5, initial_backoff_ms: 5, max_backoff_ms: 50, ..RetryPolicy::default() };
    let writer = StoreWriter::new(store.clone(), BatchLimits { max_points: 100, max_bytes: 1 << 20 }, retry);
    let points = small_points(500);
    writer.upsert_all(&points).await.unwrap();
    assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), 500, "nothing lost");
    assert_eq!(writer.counters.retries.load(Ordering::Relaxed), 3);
    assert_eq!(writer.counters.upserted_points.load(Ordering::Relaxed), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_batches_are_split_until_they_pass() {
    let dir = temp_dir("flaky-large");
    let store = flaky(&dir, 0, StoreError::Transient(String::new()), 30).await;
    let writer = StoreWriter::new(store.clone(), BatchLimits { max_points: 256, max_bytes: 1 << 30 }, RetryPolicy::default());
    writer.upsert_all(&small_points(256)).await.unwrap();
    assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), 256);
    assert!(writer.counters.splits.load(Ordering::Relaxed) >= 7, "256 → 128 → 64 → 32 → 16 per half");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_and_exhausted_retries_surface() {
    let dir = temp_dir("flaky-permanent");
    let store = flaky(&dir, usize::MAX, StoreError::Permanent("unauthorised (injected)".into()), usize::MAX).await;
    let retry = RetryPolicy { max_attempts: 4, initial_backoff_ms: 1, max_backoff_ms: 5, ..RetryPolicy::default() };
    let writer = StoreWriter::new(store.clone(), BatchLimits::default(), retry);
    let err = writer.upsert_all(&small_points(10)).await.unwrap_err();
    assert_eq!(err, StoreError::Permanent("unauthorised (injected)".into()));
    assert_eq!(store.calls.load(Ordering::SeqCst), 1, "a permanent error is not retried");
    drop(writer);
    drop(store);

    let dir = temp_dir("flaky-exhausted");
    let store = flaky(&dir, usize::MAX, StoreError::Transient("timeout (injected)".into()), usize::MAX).await;
    let writer = StoreWriter::new(store.clone(), BatchLimits::default(), retry);
    assert!(writer.upsert_all(&small_points(10)).await.unwrap_err().is_transient());
    assert_eq!(store.calls.load(Ordering::SeqCst), 4, "max_attempts calls, then the error");
    assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_without_limit_until_max_elapsed_or_a_stop() {
    use std::sync::atomic::AtomicBool;
    // the default policy has no attempt limit: only max_elapsed_ms ends the retries
    let dir = temp_dir("flaky-elapsed");
    let store = flaky(&dir, usize::MAX, StoreError::Transient("unavailable (injected)".into()), usize::MAX).await;
    let retry = RetryPolicy { initial_backoff_ms: 1, max_backoff_ms: 20, max_elapsed_ms: Some(600), ..RetryPolicy::default() };
    assert_eq!(RetryPolicy::default().max_attempts, 0, "no attempt limit by default");
    let readiness = Arc::new(convoflow::telemetry::Readiness::default());
    readiness.store_reachable.store(true, Ordering::SeqCst);
    let writer = StoreWriter::new(store.clone(), BatchLimits::default(), retry).for_worker(readiness.clone(), Arc::new(AtomicBool::new(false)));
    let started = std::time::Instant::now();
    assert!(writer.upsert_all(&small_points(10)).await.unwrap_err().is_transient());
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(store.calls.load(Ordering::SeqCst) > 20, "retried well past the old 8 attempts: {}", store.calls.load(Ordering::SeqCst));
    assert!(!readiness.store_reachable.load(Ordering::SeqCst), "unready while the store is down");
    drop(writer);
    drop(store);

    // no limit at all: a stop ends the wait promptly
    let dir = temp_dir("flaky-stop");
    let store = flaky(&dir, usize::MAX, StoreError::Transient("unavailable (injected)".into()), usize::MAX).await;
    let stop = Arc::new(AtomicBool::new(false));
    let retry = RetryPolicy { initial_backoff_ms: 2_000, max_backoff_ms: 10_000, ..RetryPolicy::default() };
    let writer = StoreWriter::new(store.clone(), BatchLimits::default(), retry).for_worker(readiness.clone(), stop.clone());
    let stopper = tokio::spawn({
        let stop = stop.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            stop.store(true, Ordering::SeqCst);
        }
    });
    let started = std::time::Instant::now();
    assert!(writer.upsert_all(&small_points(10)).await.unwrap_err().is_transient());
    assert!(started.elapsed() < Duration::from_millis(1_900), "the stop ended a 1–2 s backoff: {:?}", started.elapsed());
    stopper.await.unwrap();

    // recovery makes the worker ready again
    let dir = temp_dir("flaky-recovers");
    let store = flaky(&dir, 3, StoreError::Transient("unavailable (injected)".into()), usize::MAX).await;
    let retry = RetryPolicy { initial_backoff_ms: 1, max_backoff_ms: 5, ..RetryPolicy::default() };
    let writer = StoreWriter::new(store.clone(), BatchLimits::default(), retry).for_worker(readiness.clone(), Arc::new(AtomicBool::new(false)));
    writer.upsert_all(&small_points(10)).await.unwrap();
    assert!(readiness.store_reachable.load(Ordering::SeqCst), "ready again once the store answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_command_prints_hits_as_json_and_as_a_table() {
    let dir = temp_dir("search-cli");
    let cfg = edge_config(&dir);
    {
        let store = store::open(&cfg).unwrap();
        store.ensure_collection(&spec(&cfg.collection, DIM), Bootstrap::CreateIfMissing).await.unwrap();
        let data = dataset();
        let mut planted = data.points.iter().filter(|p| data.planted.contains(&p.id)).cloned().collect::<Vec<_>>();
        planted[0].payload.insert("chunk_start".into(), json!(0));
        planted[0].payload.insert("entities".into(), json!([{"label": "MISC", "start": 0, "end": 11, "score": 0.9}]));
        let mut points = data.points[..500].to_vec();
        points.extend(planted);
        StoreWriter::new(store, BatchLimits::default(), RetryPolicy::default()).upsert_all(&points).await.unwrap();
    } // closed: the command opens the same directory
    let search = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_convoflow"))
            .arg("search")
            .args(args)
            .env("CONVOFLOW__QDRANT__DATA_DIR", &dir)
            .env("CONVOFLOW__QDRANT__DENSE_DIM", DIM.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (json_out, stderr) = search(&["zygomorphic orchid", "--json", "--limit", "3"]);
    assert!(stderr.contains("BM25 only"), "no embedding model configured: {stderr}");
    let hits: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(hits.as_array().unwrap().len(), 3);
    assert!(hits.as_array().unwrap().iter().all(|h| h["payload"]["text"].as_str().unwrap().contains("zygomorphic")));
    let (table, _) = search(&["zygomorphic orchid", "--tenant", "tenant-1", "--limit", "3"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "header + the one planted point of tenant-1: {table}");
    assert!(lines[0].starts_with("#  score"), "{table}");
    assert!(lines[1].contains("conv-1000") && lines[1].contains("[zygomorphic|MISC]"), "{table}");
    let (none, _) = search(&["zygomorphic orchid", "--tenant", "nobody"]);
    assert_eq!(none, "no results\n");
    // a bad filter and a missing collection are clear errors
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["search", "x", "--entity", "Marie"])
        .env("CONVOFLOW__QDRANT__DATA_DIR", &dir)
        .env("CONVOFLOW__QDRANT__DENSE_DIM", "64")
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("LABEL:VALUE"));
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["search", "x"])
        .env("CONVOFLOW__QDRANT__DATA_DIR", dir.join("nothing-here"))
        .env("CONVOFLOW__QDRANT__DENSE_DIM", "64")
        .output()
        .unwrap();
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
}
