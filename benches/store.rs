//! Vector-store benchmark on the embedded `edge` backend: upsert throughput (1024-d dense +
//! BM25 sparse + a turn payload, batches of 256, acknowledged) and hybrid query latency
//! (dense + sparse prefetch, RRF, limit 10) as p50/p99, before and after the optimizer pass.
//!   cargo bench --bench store            (CONVOFLOW_BENCH_POINTS=20000, CONVOFLOW_BENCH_QUERIES=300)

use std::time::{Duration, Instant};

use convoflow::config::{QdrantConfig, StoreBackend};
use convoflow::pipeline::bm25::{Bm25Params, document_vector, query_vector};
use convoflow::sink::store::points::rfc3339;
use convoflow::sink::store::writer::{BatchLimits, RetryPolicy, StoreWriter};
use convoflow::sink::store::{self, Bootstrap, CollectionSpec, HybridQuery, Quantization, SearchFilter, StorePoint};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

const DIM: usize = 1024;
const BATCH: usize = 256;
const WORDS: &[&str] = &[
    "bonjour", "merci", "facture", "colis", "livraison", "retard", "compte", "adresse", "technicien", "rendez-vous",
    "hello", "thanks", "invoice", "parcel", "delivery", "delay", "account", "address", "router", "refund", "plan",
    "mobile", "internet", "contrat", "résiliation", "remboursement", "commande", "service", "client", "problème",
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn unit(rng: &mut StdRng) -> Vec<f32> {
    let v: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn text(rng: &mut StdRng, words: usize) -> String {
    (0..words).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect::<Vec<_>>().join(" ")
}

fn point(i: usize, rng: &mut StdRng) -> StorePoint {
    let body = text(rng, 20);
    let payload = json!({
        "conversation_id": format!("conv-{}", i / 12), "turn_id": format!("t{}", i % 12), "chunk_index": 0,
        "tenant": format!("tenant-{}", i % 5), "channel": "chat", "language": "fr", "speaker": format!("agent-{}", i % 40),
        "role": "agent", "ts": rfc3339(1_780_000_000_000 + i as i64 * 1000), "text": body,
        "entities": [{"text": "Lyon", "label": "LOC", "start": 3, "end": 7, "score": 0.99}],
        "entity_labels": ["LOC"], "entity_values": ["LOC:lyon"], "sentiment_stars": 1 + (i % 5) as i64,
        "sentiment_score": 0.8, "models": ["intfloat/multilingual-e5-large-instruct"],
    });
    StorePoint {
        id: convoflow::event::point_id("", &format!("conv-{}", i / 12), &format!("t{}", i % 12), 0),
        dense: Some(unit(rng)),
        sparse: document_vector(&body, &Bm25Params::default()),
        payload: payload.as_object().unwrap().clone(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn query_latencies(store: &dyn store::VectorStore, rng: &mut StdRng, n: usize) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let q = HybridQuery {
            dense: Some(unit(rng)),
            sparse: query_vector(&text(rng, 3)),
            filter: SearchFilter::default(),
            limit: 10,
            prefetch_limit: 50,
            group_by: None,
        };
        let started = Instant::now();
        let hits = store.search(&q).await.unwrap();
        times.push(started.elapsed());
        assert_eq!(hits.len(), 10);
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list themselves
    }
    let points_n = env_usize("CONVOFLOW_BENCH_POINTS", 20_000);
    let queries = env_usize("CONVOFLOW_BENCH_QUERIES", 300);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = std::env::temp_dir().join(format!("convoflow-store-bench-{}", std::process::id()));
    let cfg = QdrantConfig { backend: StoreBackend::Edge, data_dir: dir.clone(), edge_optimize_every_points: 0, ..Default::default() };
    runtime.block_on(async {
        let store = store::open(&cfg).unwrap();
        let spec = CollectionSpec { name: cfg.collection.clone(), dense_dim: DIM, on_disk: false, quantization: Quantization::None };
        store.ensure_collection(&spec, Bootstrap::CreateIfMissing).await.unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let points: Vec<StorePoint> = (0..points_n).map(|i| point(i, &mut rng)).collect();
        let writer = StoreWriter::new(store.clone(), BatchLimits { max_points: BATCH, max_bytes: 64 << 20 }, RetryPolicy::default());
        let started = Instant::now();
        writer.upsert_all(&points).await.unwrap();
        let upsert = started.elapsed();
        assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), points_n as u64);
        let (p50, p99) = query_latencies(store.as_ref(), &mut rng, queries).await;

        // the optimizer pass (HNSW for dense, sparse index) that the worker runs periodically
        let started = Instant::now();
        store.optimize().await.unwrap();
        let optimize = started.elapsed();
        let (p50_opt, p99_opt) = query_latencies(store.as_ref(), &mut rng, queries).await;
        drop(writer);

        println!("edge vector store, {points_n} points of {DIM}-d dense + BM25 sparse + turn payload");
        println!("{:<44} {:>14}", "metric", "value");
        println!("{:<44} {:>14.0}", format!("upsert points/s (batches of {BATCH}, acknowledged)"), points_n as f64 / upsert.as_secs_f64());
        println!("{:<44} {:>14.2}", "hybrid query p50 ms (before optimize)", p50.as_secs_f64() * 1e3);
        println!("{:<44} {:>14.2}", "hybrid query p99 ms (before optimize)", p99.as_secs_f64() * 1e3);
        println!("{:<44} {:>14.1}", "optimize pass s (HNSW + sparse index)", optimize.as_secs_f64());
        println!("{:<44} {:>14.2}", "hybrid query p50 ms (after optimize)", p50_opt.as_secs_f64() * 1e3);
        println!("{:<44} {:>14.2}", "hybrid query p99 ms (after optimize)", p99_opt.as_secs_f64() * 1e3);
        if let Ok(path) = std::env::var("CONVOFLOW_BENCH_JSON") {
            let report = json!({
                "points": points_n, "dim": DIM, "batch": BATCH,
                "upsert_points_per_s": points_n as f64 / upsert.as_secs_f64(),
                "query_p50_ms": p50.as_secs_f64() * 1e3, "query_p99_ms": p99.as_secs_f64() * 1e3,
                "optimize_s": optimize.as_secs_f64(),
                "query_p50_ms_optimized": p50_opt.as_secs_f64() * 1e3, "query_p99_ms_optimized": p99_opt.as_secs_f64() * 1e3,
            });
            std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
