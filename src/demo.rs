//! `convoflow demo`: the whole spine with no server at all — librdkafka's in-process mock
//! cluster as Kafka, sample French and English conversations, the worker, and a summary of
//! what came out. (The embedded Qdrant engine and the models join when those issues land.)

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};

use crate::cli::{ProduceArgs, produce};
use crate::codec::{RecordCodec, WireFormat};
use crate::config::Config;
use crate::event::EnrichedConversation;
use crate::source::base_client_config;
use crate::worker;

const PARTITIONS: i32 = 6;

pub async fn run(conversations: u64, timeout: Duration) -> Result<()> {
    let mock = MockCluster::new(3).context("starting librdkafka's mock cluster")?;
    let mut cfg = Config::default();
    cfg.kafka.brokers = mock.bootstrap_servers();
    cfg.kafka.create_topics = false; // the mock cluster's admin API hangs; topics are made here
    cfg.kafka.session_timeout_ms = 6_000;
    // The embedded Qdrant engine in a fresh directory; no embedding model yet, so the points
    // carry BM25 vectors and the collection is sized for all-MiniLM-L6-v2.
    let store_dir = std::env::temp_dir().join(format!("convoflow-demo-{}", std::process::id()));
    cfg.qdrant.data_dir = store_dir.clone();
    cfg.qdrant.dense_dim = Some(384);
    for topic in [&cfg.kafka.input_topic, &cfg.kafka.output_topic, &cfg.kafka.dlq_topic()] {
        mock.create_topic(topic, PARTITIONS, 1).with_context(|| format!("creating {topic}"))?;
    }
    println!("convoflow demo: in-process Kafka (mock cluster, 3 brokers) at {}", cfg.kafka.brokers);

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
    let expected = topic_size(&cfg, &cfg.kafka.input_topic)?;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let worker = tokio::spawn(worker::run(cfg.clone(), stop.clone()));
    let reader_cfg = cfg.clone();
    let outputs = tokio::task::spawn_blocking(move || read_outputs(&reader_cfg, expected, timeout)).await??;
    let elapsed = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    worker.await.context("worker task")??;
    if outputs.len() < expected {
        bail!("only {} of {expected} events were enriched within {timeout:?}", outputs.len());
    }
    let input_ts = timestamps(&cfg, &cfg.kafka.input_topic)?;
    print_summary(&outputs, &input_ts, elapsed);
    let searched = search_examples(&cfg).await;
    let _ = std::fs::remove_dir_all(&store_dir);
    searched
}

/// A few searches over what the worker indexed (BM25 until the embedding model is wired in).
async fn search_examples(cfg: &Config) -> Result<()> {
    use crate::sink::store::{self, Bootstrap, HybridQuery};
    let store = store::open(&cfg.qdrant)?;
    let spec = store::collection_spec(&cfg.qdrant, crate::search::dense_dim(cfg)?);
    store.ensure_collection(&spec, Bootstrap::MustExist).await?;
    println!("\nindexed points: {}", store.count(&Default::default()).await?);
    for query in ["remboursement promis", "outage in my area"] {
        let q = HybridQuery {
            dense: None,
            sparse: crate::pipeline::bm25::query_vector(query),
            filter: Default::default(),
            limit: 3,
            prefetch_limit: 50,
        };
        let hits = store.search(&q).await?;
        println!("\nsearch {query:?} (BM25):\n{}", crate::search::table(&hits, false));
    }
    Ok(())
}

fn consumer(cfg: &Config) -> Result<BaseConsumer> {
    Ok(base_client_config(&cfg.kafka)
        .set("group.id", "convoflow-demo-reader")
        .set("enable.auto.commit", "false")
        .create()?)
}

fn assign_all(c: &BaseConsumer, topic: &str) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(())
}

fn topic_size(cfg: &Config, topic: &str) -> Result<usize> {
    let c = consumer(cfg)?;
    let mut n = 0;
    for p in 0..PARTITIONS {
        let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        n += (high - low) as usize;
    }
    Ok(n)
}

/// (partition, offset) -> record timestamp (ms) of every record in `topic`.
fn timestamps(cfg: &Config, topic: &str) -> Result<HashMap<(i32, i64), i64>> {
    let c = consumer(cfg)?;
    assign_all(&c, topic)?;
    let expected = topic_size(cfg, topic)?;
    let mut out = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            out.insert((m.partition(), m.offset()), m.timestamp().to_millis().unwrap_or_default());
        }
    }
    Ok(out)
}

/// Reads enriched events as they arrive, with a progress bar, until `expected` distinct inputs
/// are covered. Returns (output record timestamp, event).
fn read_outputs(cfg: &Config, expected: usize, timeout: Duration) -> Result<Vec<(i64, EnrichedConversation)>> {
    let codec = RecordCodec::<EnrichedConversation>::new(WireFormat::Avro)?;
    let c = consumer(cfg)?;
    assign_all(&c, &cfg.kafka.output_topic)?;
    let mut by_source = HashMap::new();
    let deadline = Instant::now() + timeout;
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    while by_source.len() < expected && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            if let Some(payload) = m.payload() {
                let event = codec.decode(payload)?;
                let ts = m.timestamp().to_millis().unwrap_or_default();
                by_source.insert((event.source.partition, event.source.offset), (ts, event));
            }
        }
        if last_draw.elapsed() > Duration::from_millis(200) || by_source.len() == expected {
            draw_progress(by_source.len(), expected);
            last_draw = Instant::now();
        }
    }
    eprintln!();
    Ok(by_source.into_values().collect())
}

fn draw_progress(done: usize, total: usize) {
    let width = 40;
    let filled = if total == 0 { width } else { done * width / total };
    eprint!("\r  enriching [{}{}] {done}/{total} events", "#".repeat(filled), "-".repeat(width - filled));
    let _ = std::io::stderr().flush();
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
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
    println!("  (events were published before the worker joined the group, so latency includes the join)");
    println!("  entities and sentiment: not computed yet (models not yet wired into the worker)");
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
