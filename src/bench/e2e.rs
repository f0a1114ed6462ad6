//! `convoflow bench`: end to end through a Kafka broker (the configured one, or with
//! `--mock-broker` librdkafka's in-process mock cluster) and the embedded Qdrant engine.
//! The worker runs in-process with the models of the configuration (or, like the demo, the
//! models scripts/setup installs); once it holds its partitions, generated conversations are
//! published as fast as the producer goes, and the bench reads the output topic until every
//! input event has its enriched event. Throughput counts from the first input record's
//! timestamp to the last output record's; latency is output record time − input record time.
//! Then, with the worker idle, single long conversations (`--idle-turns` turns) are published
//! one at a time and timed from the publish call until a consumer sees the enriched event.
//! The report adds each stage's busy seconds and each model's padding share (from the
//! worker's own metrics) and, on CUDA, libtorch's allocator peak.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::codec::WireFormat;
use crate::config::Config;
use crate::sink::store::SearchFilter;
use crate::bench::readback;
use crate::kafka::admin;

pub struct E2eArgs {
    pub config: Option<PathBuf>,
    pub conversations: u64,
    pub partitions: i32,
    pub json: Option<PathBuf>,
    /// Run against librdkafka's in-process mock cluster instead of the configured brokers.
    pub mock_broker: bool,
    /// Idle-worker probes: how many, and the turns of each probe conversation.
    pub idle_probes: usize,
    pub idle_turns: usize,
}

#[derive(Debug, Serialize)]
pub struct E2eReport {
    pub brokers: String,
    /// `kafka.delivery` of the run: at_least_once or exactly_once.
    pub delivery: crate::config::Delivery,
    pub device: String,
    pub models: Vec<String>,
    pub conversations: u64,
    pub events: usize,
    pub turns: usize,
    pub tokens: i64,
    pub points: u64,
    pub seconds: f64,
    /// The backlog's drain window: first input record → last output record (epoch ms).
    pub drain_started_ms: i64,
    pub drain_ended_ms: i64,
    pub events_per_s: f64,
    pub turns_per_s: f64,
    pub tokens_per_s: f64,
    pub latency_p50_ms: i64,
    pub latency_p99_ms: i64,
    pub latency_max_ms: i64,
    /// Idle worker: turns of each probe conversation, and its publish → enriched-event-seen
    /// times in ms (sorted).
    pub idle_conversation_turns: usize,
    pub idle_latency_ms: Vec<f64>,
    /// The same probes, publish call → the worker's enqueue of the enriched event (its output
    /// record's timestamp): without the output's delivery and the reading consumer's fetch.
    pub idle_worker_ms: Vec<f64>,
    /// Busy milliseconds of each stage for one idle probe (median): the rest of
    /// `idle_worker_ms` is waiting (consumer fetch, queues, producer linger).
    pub idle_stage_busy_ms: std::collections::BTreeMap<String, f64>,
    /// Seconds each model thread spent per phase ("ner/device"; `convoflow_model_phase_seconds`).
    pub model_phase_s: std::collections::BTreeMap<String, f64>,
    /// Seconds each stage was busy (the worker's `convoflow_stage_busy_seconds_sum`).
    pub stage_busy_s: std::collections::BTreeMap<String, f64>,
    /// Share of the tokens each model computed that was padding.
    pub padding: std::collections::BTreeMap<String, f64>,
    /// CUDA: libtorch's allocator peak (all models together), MiB.
    pub gpu_peak_allocated_mib: Option<f64>,
    pub gpu_peak_reserved_mib: Option<f64>,
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
    cfg.models.stand_in = base.models.stand_in;
    cfg.models.load_strategy = base.models.load_strategy;
    let run_id = format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_millis());
    cfg.kafka.input_topic = format!("convoflow-bench-{run_id}");
    cfg.kafka.output_topic = format!("convoflow-bench-{run_id}.enriched");
    cfg.kafka.dlq_topic = String::new();
    cfg.kafka.group_id = format!("convoflow-bench-{run_id}");
    cfg.kafka.create_topics = true;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    cfg.telemetry.listen = format!("127.0.0.1:{port}");
    // the in-process broker lives as long as this function
    let _mock = if args.mock_broker {
        let mock = rdkafka::mocking::MockCluster::new(3).context("starting librdkafka's mock cluster")?;
        cfg.kafka.brokers = mock.bootstrap_servers();
        cfg.kafka.create_topics = false; // the mock cluster's admin API hangs; topics are made here
        cfg.kafka.session_timeout_ms = 6_000;
        for topic in [&cfg.kafka.input_topic, &cfg.kafka.output_topic, &cfg.kafka.dlq_topic()] {
            mock.create_topic(topic, args.partitions, 1).with_context(|| format!("creating {topic}"))?;
        }
        Some(mock)
    } else {
        None
    };
    let store_dir = std::env::temp_dir().join(format!("convoflow-bench-{run_id}"));
    cfg.qdrant.backend = crate::config::StoreBackend::Edge;
    cfg.qdrant.data_dir = store_dir.clone();
    if cfg.models.embedding.is_none() && cfg.qdrant.dense_dim.is_none() {
        cfg.qdrant.dense_dim = Some(384);
    }
    if !args.mock_broker {
        admin::ensure_topics(&cfg.kafka, std::slice::from_ref(&cfg.kafka.input_topic), args.partitions as usize).await?;
    }

    // the store is opened again once the worker stops: wait for its final flush
    cfg.pipeline.shutdown_timeout_ms = cfg.pipeline.shutdown_timeout_ms.max(crate::demo::IN_PROCESS_SHUTDOWN_MS);
    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(crate::worker::run(cfg.clone(), stop.clone()));
    eprintln!("bench: waiting for the worker (models: {})", found.lines.join("; "));
    wait_ready(port, Duration::from_secs(300)).await?;

    let produce = crate::produce::ProduceArgs {
        count: args.conversations,
        input: None,
        format: WireFormat::Avro,
        topic: Some(cfg.kafka.input_topic.clone()),
        seed: 7,
        whole: false,
        partitions: args.partitions as usize,
    };
    crate::produce::produce(&cfg, produce).await?;
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
    let idle = idle_probes(&cfg, args.idle_probes, args.idle_turns).await?;
    let metrics_text = crate::telemetry::prometheus().render();
    let device = crate::infer::device::parse_device(&cfg.gpu.device)?;
    let gpu = match device {
        tch::Device::Cuda(i) => crate::infer::cuda::memory_stats(i).ok(),
        _ => None,
    };
    stop.store(true, Ordering::SeqCst);
    worker.await.context("worker task")??;

    let store = crate::query::open_store(&cfg).await?;
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
        delivery: cfg.kafka.delivery,
        device: format!("{device:?}"),
        models: found.lines,
        conversations: args.conversations,
        events: outputs.len(),
        turns,
        tokens,
        points,
        seconds,
        drain_started_ms: first_in,
        drain_ended_ms: last_out,
        events_per_s: outputs.len() as f64 / seconds,
        turns_per_s: turns as f64 / seconds,
        tokens_per_s: tokens as f64 / seconds,
        latency_p50_ms: readback::percentile(&latencies, 0.5),
        latency_p99_ms: readback::percentile(&latencies, 0.99),
        latency_max_ms: latencies.last().copied().unwrap_or_default(),
        idle_conversation_turns: args.idle_turns,
        idle_latency_ms: idle.latency_ms,
        idle_worker_ms: idle.worker_ms,
        idle_stage_busy_ms: idle.stage_median_ms,
        stage_busy_s: labelled_values(&metrics_text, &format!("{}_sum", crate::telemetry::STAGE_BUSY_SECONDS)),
        model_phase_s: labelled_values(&metrics_text, &format!("{}_sum", crate::telemetry::MODEL_PHASE_SECONDS)),
        padding: padding_shares(&metrics_text),
        gpu_peak_allocated_mib: gpu.map(|m| m.allocated_peak as f64 / 1_048_576.0),
        gpu_peak_reserved_mib: gpu.map(|m| m.reserved_peak as f64 / 1_048_576.0),
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// One conversation of `turns` turns (sample turns, renumbered), for the idle probes.
fn long_conversation(id: u64, turns: usize) -> crate::event::Conversation {
    let g = crate::sample::SampleGenerator::new(id);
    let mut conv = g.conversation(0);
    conv.conversation_id = format!("idle-probe-{id}");
    let mut all = Vec::with_capacity(turns);
    let mut n = 0;
    while all.len() < turns {
        all.extend(g.conversation(n).turns);
        n += 1;
    }
    all.truncate(turns);
    for (i, t) in all.iter_mut().enumerate() {
        t.turn_id = format!("t{i:04}");
        t.ts = conv.started_at + i as i64 * 1_000;
    }
    conv.turns = all;
    conv
}

/// With the worker idle: publishes `probes` single conversations of `turns` turns, one at a
/// time, each timed from the publish call until a consumer of the output topic sees its
/// enriched event, and until the output record's timestamp (ms, in probe order).
async fn idle_probes(cfg: &Config, probes: usize, turns: usize) -> Result<IdleProbes> {
    if probes == 0 {
        return Ok(IdleProbes::default());
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // let the worker go idle
    let codec = crate::codec::factory::input_codec(&cfg.codec)?;
    let producer = crate::kafka::producer::EventProducer::new(&cfg.kafka, cfg.kafka.message_max_bytes)?;
    let tail = {
        let k = cfg.kafka.clone();
        tokio::task::spawn_blocking(move || readback::tail(&k, &k.output_topic)).await??
    };
    let tail = Arc::new(tail);
    let (mut out, mut worker) = (Vec::with_capacity(probes), Vec::with_capacity(probes));
    let mut stage_ms: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    // busy seconds per stage and model-thread phase ("ner/device"), as counted so far
    let busy_sums = || {
        let text = crate::telemetry::prometheus().render();
        let mut sums = labelled_values(&text, &format!("{}_sum", crate::telemetry::STAGE_BUSY_SECONDS));
        sums.extend(labelled_values(&text, &format!("{}_sum", crate::telemetry::MODEL_PHASE_SECONDS)));
        sums
    };
    for i in 0..probes {
        let busy_before = busy_sums();
        // probes come in pairs of the same turns (new conversation ids): a second run of the
        // same shapes shows what the first paid for shapes the device had not run yet
        let mut conv = long_conversation(900_000 + (i / 2) as u64, turns);
        conv.conversation_id = format!("idle-probe-{i}");
        let payload = codec.encode(&conv)?;
        let started = Instant::now();
        let published_ms = chrono::Utc::now().timestamp_micros() as f64 / 1000.0;
        let out_rec = crate::kafka::producer::Outgoing {
            topic: &cfg.kafka.input_topic,
            key: Some(conv.conversation_id.as_bytes()),
            payload: Some(&payload),
            headers: None,
        };
        let delivery = producer.enqueue(out_rec).await?;
        let (t, id) = (tail.clone(), conv.conversation_id.clone());
        let seen = tokio::task::spawn_blocking(move || readback::wait_for_event(&t, &id, Duration::from_secs(30))).await??;
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        let _ = delivery.await;
        match seen {
            Some((ts, event)) if event.turns.len() == turns => {
                out.push(elapsed);
                worker.push(ts as f64 - published_ms);
                for (stage, after) in busy_sums() {
                    let before = busy_before.get(&stage).copied().unwrap_or_default();
                    stage_ms.entry(stage).or_default().push((after - before) * 1000.0);
                }
            }
            Some((_, event)) => bail!("the idle probe came back with {} turns, not {turns}", event.turns.len()),
            None => bail!("the idle probe {i} was not enriched within 30 s"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stage_median_ms = stage_ms
        .into_iter()
        .map(|(stage, mut ms)| {
            ms.sort_by(f64::total_cmp);
            (stage, ms[ms.len() / 2])
        })
        .collect();
    Ok(IdleProbes { latency_ms: out, worker_ms: worker, stage_median_ms })
}

/// What the idle probes measured (in probe order: pairs of the same turns).
#[derive(Debug, Default)]
struct IdleProbes {
    latency_ms: Vec<f64>,
    worker_ms: Vec<f64>,
    /// Busy milliseconds of each stage for one probe (median over the probes).
    stage_median_ms: std::collections::BTreeMap<String, f64>,
}

/// Values of a metric with any labels in Prometheus text: label values joined by "/" -> value.
fn labelled_values(text: &str, name: &str) -> std::collections::BTreeMap<String, f64> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let key: Vec<&str> = labels.split(',').filter_map(|kv| kv.split_once('=').map(|(_, v)| v.trim_matches('"'))).collect();
            Some((key.join("/"), value.trim().parse().ok()?))
        })
        .collect()
}

/// Padding share per model task, from `convoflow_model_tokens_total{task, kind}`.
fn padding_shares(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut real = std::collections::BTreeMap::<String, f64>::new();
    let mut padded = std::collections::BTreeMap::<String, f64>::new();
    for line in text.lines().filter(|l| l.starts_with(crate::telemetry::MODEL_TOKENS)) {
        let field = |key: &str| line.split(&format!("{key}=\"")).nth(1).and_then(|r| r.split('"').next()).map(str::to_string);
        let (Some(task), Some(kind), Some(v)) = (field("task"), field("kind"), line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        else {
            continue;
        };
        match kind.as_str() {
            "real" => real.insert(task, v),
            _ => padded.insert(task, v),
        };
    }
    padded.into_iter().filter(|(_, p)| *p > 0.0).map(|(t, p)| (t.clone(), 1.0 - real.get(&t).copied().unwrap_or(0.0) / p)).collect()
}

pub fn print(r: &E2eReport) {
    println!(
        "convoflow end-to-end bench (broker {}, device {}, embedded Qdrant engine, delivery {:?})",
        r.brokers, r.device, r.delivery
    );
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
    if !r.idle_latency_ms.is_empty() {
        let ms: Vec<String> = r.idle_latency_ms.iter().map(|v| format!("{v:.0}")).collect();
        println!("  idle worker, one {}-turn conversation, publish → enriched event seen (pairs of the same turns): {} ms", r.idle_conversation_turns, ms.join(" / "));
        let ms: Vec<String> = r.idle_worker_ms.iter().map(|v| format!("{v:.0}")).collect();
        println!("    publish → enriched event enqueued by the worker (its record timestamp): {} ms", ms.join(" / "));
        let busy: Vec<String> = r.idle_stage_busy_ms.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
        println!("    busy ms per stage for one probe (median; the rest is waiting): {}", busy.join(", "));
    }
    let busy: Vec<String> = r.stage_busy_s.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
    println!("  stage busy seconds: {}", busy.join(", "));
    if !r.model_phase_s.is_empty() {
        let phases: Vec<String> = r.model_phase_s.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        println!("  model thread seconds by phase (queue / device / read): {}", phases.join(", "));
    }
    let padding: Vec<String> = r.padding.iter().map(|(k, v)| format!("{k} {:.1} %", v * 100.0)).collect();
    if !padding.is_empty() {
        println!("  padding share: {}", padding.join(", "));
    }
    if let (Some(a), Some(res)) = (r.gpu_peak_allocated_mib, r.gpu_peak_reserved_mib) {
        println!("  GPU allocator peak: {a:.0} MiB allocated, {res:.0} MiB reserved (three models)");
    }
}
