//! `convoflow bench`: end to end through a real Kafka broker and the embedded Qdrant engine.
//! The worker runs in-process with the models of the configuration (or, like the demo, the
//! models scripts/setup installs); once it holds its partitions, generated conversations are
//! published as fast as the producer goes, and the bench reads the output topic until every
//! input event has its enriched event. Throughput counts from the first input record's
//! timestamp to the last output record's; latency is output record time − input record time.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::codec::WireFormat;
use crate::config::Config;
use crate::sink::store::{self, Bootstrap, SearchFilter};
use crate::source::{admin, readback};

pub struct E2eArgs {
    pub config: Option<PathBuf>,
    pub conversations: u64,
    pub partitions: i32,
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct E2eReport {
    pub brokers: String,
    pub device: String,
    pub models: Vec<String>,
    pub conversations: u64,
    pub events: usize,
    pub turns: usize,
    pub tokens: i64,
    pub points: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    pub turns_per_s: f64,
    pub tokens_per_s: f64,
    pub latency_p50_ms: i64,
    pub latency_p99_ms: i64,
    pub latency_max_ms: i64,
}

/// GET /readyz on the worker's telemetry port until it answers 200.
async fn wait_ready(port: u16, timeout: Duration) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let mut body = String::new();
            let _ = s.read_to_string(&mut body).await;
            if body.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the worker was not ready within {timeout:?}")
}

pub async fn run(args: &E2eArgs) -> Result<E2eReport> {
    let base = Config::load(args.config.as_deref())?;
    let found = crate::demo::find_models(Some(&base.models));
    let mut cfg = base.clone();
    cfg.models = found.models;
    let run_id = format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_millis());
    cfg.kafka.input_topic = format!("convoflow-bench-{run_id}");
    cfg.kafka.output_topic = format!("convoflow-bench-{run_id}.enriched");
    cfg.kafka.dlq_topic = String::new();
    cfg.kafka.group_id = format!("convoflow-bench-{run_id}");
    cfg.kafka.create_topics = true;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    cfg.telemetry.listen = format!("127.0.0.1:{port}");
    let store_dir = std::env::temp_dir().join(format!("convoflow-bench-{run_id}"));
    cfg.qdrant.backend = crate::config::StoreBackend::Edge;
    cfg.qdrant.data_dir = store_dir.clone();
    if cfg.models.embedding.is_none() && cfg.qdrant.dense_dim.is_none() {
        cfg.qdrant.dense_dim = Some(384);
    }
    admin::ensure_topics(&cfg.kafka, std::slice::from_ref(&cfg.kafka.input_topic), args.partitions as usize).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(crate::worker::run(cfg.clone(), stop.clone()));
    eprintln!("bench: waiting for the worker (models: {})", found.lines.join("; "));
    wait_ready(port, Duration::from_secs(300)).await?;

    let produce = crate::cli::ProduceArgs {
        count: args.conversations,
        input: None,
        format: WireFormat::Avro,
        topic: Some(cfg.kafka.input_topic.clone()),
        seed: 7,
        whole: false,
        partitions: args.partitions as usize,
    };
    crate::cli::produce(&cfg, produce).await?;
    let reader = cfg.clone();
    let timeout = Duration::from_secs(1800);
    let (inputs, outputs) = tokio::task::spawn_blocking(move || -> Result<_> {
        let expected = readback::topic_size(&reader.kafka, &reader.kafka.input_topic)?;
        let inputs = readback::timestamps(&reader.kafka, &reader.kafka.input_topic)?;
        let outputs = readback::read_enriched(&reader.kafka, expected, timeout)?;
        if outputs.len() < expected {
            bail!("only {} of {expected} events were enriched within {timeout:?}", outputs.len());
        }
        Ok((inputs, outputs))
    })
    .await??;
    stop.store(true, Ordering::SeqCst);
    worker.await.context("worker task")??;

    let store = store::open(&cfg.qdrant)?;
    let dim = crate::search::dense_dim(&cfg)?;
    store.ensure_collection(&store::collection_spec(&cfg.qdrant, dim), Bootstrap::MustExist).await?;
    let points = store.count(&SearchFilter::default()).await?;
    drop(store);
    let _ = std::fs::remove_dir_all(&store_dir);

    let mut latencies: Vec<i64> = outputs
        .iter()
        .filter_map(|(ts, e)| inputs.get(&(e.source.partition, e.source.offset)).map(|t0| ts - t0))
        .collect();
    latencies.sort_unstable();
    let first_in = inputs.values().copied().min().unwrap_or_default();
    let last_out = outputs.iter().map(|(ts, _)| *ts).max().unwrap_or_default();
    let seconds = ((last_out - first_in).max(1)) as f64 / 1000.0;
    let turns: usize = outputs.iter().map(|(_, e)| e.turns.len()).sum();
    let tokens: i64 = outputs.iter().map(|(_, e)| e.total_tokens).sum();
    let report = E2eReport {
        brokers: cfg.kafka.brokers.clone(),
        device: format!("{:?}", crate::infer::device::parse_device(&cfg.gpu.device)?),
        models: found.lines,
        conversations: args.conversations,
        events: outputs.len(),
        turns,
        tokens,
        points,
        seconds,
        events_per_s: outputs.len() as f64 / seconds,
        turns_per_s: turns as f64 / seconds,
        tokens_per_s: tokens as f64 / seconds,
        latency_p50_ms: readback::percentile(&latencies, 0.5),
        latency_p99_ms: readback::percentile(&latencies, 0.99),
        latency_max_ms: latencies.last().copied().unwrap_or_default(),
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

pub fn print(r: &E2eReport) {
    println!("convoflow end-to-end bench (broker {}, device {}, embedded Qdrant engine)", r.brokers, r.device);
    for m in &r.models {
        println!("  model {m}");
    }
    println!("  {:<36} {:>12}", "conversations", r.conversations);
    println!("  {:<36} {:>12}", "events (one enriched event each)", r.events);
    println!("  {:<36} {:>12}", "turns", r.turns);
    println!("  {:<36} {:>12}", "tokens", r.tokens);
    println!("  {:<36} {:>12}", "points in the store", r.points);
    println!("  {:<36} {:>12.1}", "seconds (first input → last output)", r.seconds);
    println!("  {:<36} {:>12.1}", "events/s", r.events_per_s);
    println!("  {:<36} {:>12.1}", "turns/s", r.turns_per_s);
    println!("  {:<36} {:>12.0}", "tokens/s", r.tokens_per_s);
    println!("  {:<36} {:>12}", "latency p50 ms (input → enriched)", r.latency_p50_ms);
    println!("  {:<36} {:>12}", "latency p99 ms", r.latency_p99_ms);
    println!("  {:<36} {:>12}", "latency max ms", r.latency_max_ms);
}
