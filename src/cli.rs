//! Command line: `run`, `produce`, `demo`, `search`, `ask`, `serve`, `bench`, `check`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::codec::WireFormat;
use crate::config::Config;
use crate::sample::SampleGenerator;
use crate::kafka::admin;
use crate::produce::{ProduceArgs, produce};
use crate::worker;

#[derive(Parser)]
#[command(name = "convoflow", version, about = "Streaming enrichment of conversations: Kafka → models → Qdrant + enriched events")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The worker: consume, enrich, emit, commit (until SIGTERM/SIGINT).
    Run {
        #[arg(long, short, env = "CONVOFLOW_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Publish sample conversations (or JSON lines) to the input topic.
    Produce {
        #[arg(long, short, env = "CONVOFLOW_CONFIG")]
        config: Option<PathBuf>,
        /// Number of sample conversations to generate (ignored with --input).
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// JSON lines file, one Conversation per line, instead of generated samples.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Wire format of the published values.
        #[arg(long, value_enum, default_value_t = WireFormat::Avro)]
        format: WireFormat,
        /// Topic (default: kafka.input_topic).
        #[arg(long)]
        topic: Option<String>,
        /// Seed of the sample generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Send each sample conversation whole instead of in 1-3 events of consecutive turns.
        #[arg(long)]
        whole: bool,
        /// Create the topic with this many partitions if it does not exist.
        #[arg(long, default_value_t = 6)]
        partitions: usize,
    },
    /// The embedded default: in-process Kafka, sample conversations, the worker, a summary.
    Demo {
        /// A config whose `models` (and `gpu`) the demo uses when the model folders exist.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Sample conversations to publish.
        #[arg(long, default_value_t = 50)]
        conversations: u64,
        /// Give up when no event has been enriched (or dead-lettered) for this many seconds, model
        /// loading and group join included; the demo keeps waiting while events keep coming.
        #[arg(long, default_value_t = 180)]
        timeout_s: u64,
    },
    /// End-to-end benchmark through the configured Kafka broker and the embedded Qdrant engine
    /// (the worker in-process, generated conversations); `--models-only`: model inference alone.
    Bench {
        #[command(flatten)]
        e2e: E2eBenchFlags,
        /// Only the models: inference throughput on generated turns (needs --models).
        #[arg(long)]
        models_only: bool,
        #[command(flatten)]
        models: ModelsBenchFlags,
    },
    /// Hybrid search (dense + BM25, fused by RRF) over the collection, with payload filters.
    Search {
        /// Config file (qdrant store, embedding model for the query).
        #[arg(long, short, env = "CONVOFLOW_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        args: crate::search::SearchArgs,
    },
    /// Answer a question from the indexed conversations: hybrid retrieval, a grounded prompt,
    /// the LLM at llm.url (OpenAI-compatible), the answer streamed, then its sources.
    Ask {
        /// Config file (qdrant store, embedding model, llm endpoint and prompt templates).
        #[arg(long, short, env = "CONVOFLOW_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        args: crate::ask::AskArgs,
    },
    /// The search/ask HTTP API: POST /v1/search, POST /v1/ask (SSE with "stream": true),
    /// GET /healthz, GET /metrics on serve.listen (until SIGTERM/SIGINT).
    Serve {
        /// Config file (serve, qdrant store, embedding model, llm endpoint).
        #[arg(long, short, env = "CONVOFLOW_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the configuration, the tokenizer and the Kafka topics; report what was found.
    Check {
        #[arg(long, short, env = "CONVOFLOW_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// `convoflow bench`'s end-to-end flags.
#[derive(Debug, clap::Args)]
pub struct E2eBenchFlags {
    /// Config (brokers, models, gpu, pipeline); topics, group and store are the bench's own.
    #[arg(long, short, env = "CONVOFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// Generated conversations to publish (end-to-end bench).
    #[arg(long, default_value_t = 500)]
    conversations: u64,
    /// Partitions of the bench's input topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// End-to-end bench against librdkafka's in-process mock cluster (no broker needed).
    #[arg(long)]
    mock_broker: bool,
    /// End-to-end bench: single conversations published to the idle worker afterwards.
    #[arg(long, default_value_t = 5)]
    idle_probes: usize,
    /// Turns of each idle-worker probe conversation.
    #[arg(long, default_value_t = 120)]
    idle_turns: usize,
}

impl E2eBenchFlags {
    fn into_args(self, json: Option<PathBuf>) -> crate::bench::e2e::E2eArgs {
        let E2eBenchFlags { config, conversations, partitions, mock_broker, idle_probes, idle_turns } = self;
        crate::bench::e2e::E2eArgs { config, conversations, partitions, json, mock_broker, idle_probes, idle_turns }
    }
}

/// `convoflow bench --models-only`'s flags (and `--json`, which both benches take).
#[derive(Debug, clap::Args)]
pub struct ModelsBenchFlags {
    /// --models-only: folder with embedding/, ner/ and sentiment/ HuggingFace model folders.
    #[arg(long, required_if_eq("models_only", "true"))]
    models: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    turns: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "fp16")]
    dtype: String,
    #[arg(long, default_value_t = 16_384)]
    max_batch_tokens: usize,
    #[arg(long, default_value_t = 64)]
    max_batch_size: usize,
    /// CPU intra-op threads (0 = libtorch default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// --models-only: also time inputs of exactly these token lengths, e.g. 16,64,256,512.
    #[arg(long, value_delimiter = ',')]
    lengths: Vec<usize>,
    /// Write the generated turns (JSON array) here, for a comparison run elsewhere.
    #[arg(long)]
    dump_turns: Option<PathBuf>,
}

impl ModelsBenchFlags {
    fn into_args(self) -> crate::bench::ModelsBenchArgs {
        let ModelsBenchFlags { models, turns, device, dtype, max_batch_tokens, max_batch_size, threads, json, lengths, dump_turns } = self;
        crate::bench::ModelsBenchArgs {
            models: models.expect("required with --models-only"),
            turns,
            device,
            dtype,
            budget: crate::infer::batch::Budget { max_batch_tokens, max_batch_size },
            threads,
            json,
            dump_turns,
            lengths,
        }
    }
}

pub async fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config } => {
            let cfg = Config::load(config.as_deref())?;
            let stop = Arc::new(AtomicBool::new(false));
            spawn_signal_handler(stop.clone(), std::time::Duration::from_millis(cfg.pipeline.shutdown_timeout_ms));
            worker::run(cfg, stop).await
        }
        Command::Produce { config, count, input, format, topic, seed, whole, partitions } => {
            let cfg = Config::load(config.as_deref())?;
            produce(&cfg, ProduceArgs { count, input, format, topic, seed, whole, partitions }).await
        }
        Command::Demo { config, conversations, timeout_s } => {
            crate::demo::run(config.as_deref(), conversations, std::time::Duration::from_secs(timeout_s)).await
        }
        Command::Check { config } => check(config.as_deref()).await,
        Command::Ask { config, args } => {
            let cfg = Config::load(config.as_deref())?;
            crate::ask::run(&cfg, &args).await
        }
        Command::Serve { config } => crate::serve::run(Config::load(config.as_deref())?).await,
        Command::Search { config, args } => {
            let cfg = Config::load(config.as_deref())?;
            crate::search::run(&cfg, &args).await
        }
        Command::Bench { e2e, models_only, models } => {
            let json = models.json.clone();
            if !models_only {
                let report = crate::bench::e2e::run(&e2e.into_args(json)).await?;
                crate::bench::e2e::print(&report);
                return Ok(());
            }
            let args = models.into_args();
            let report = tokio::task::spawn_blocking(move || crate::bench::run_models(&args)).await??;
            crate::bench::print_report(&report);
            Ok(())
        }
    }
}

/// How long past `pipeline.shutdown_timeout_ms` a stopping worker may take before the
/// watchdog ends the process (every wait of the shutdown is bounded; this is the backstop).
const SHUTDOWN_WATCHDOG_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// First SIGTERM/SIGINT: graceful stop. A second one: exit at once. The process also exits (code 1) if the graceful stop has not ended by then plus
/// `SHUTDOWN_WATCHDOG_MARGIN` (unfinished work stays uncommitted and is re-read).
fn spawn_signal_handler(stop: Arc<AtomicBool>, shutdown_timeout: std::time::Duration) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler");
        for _ in 0..2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if stop.swap(true, Ordering::SeqCst) {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
            tracing::info!("signal received: draining and committing");
            let limit = shutdown_timeout + SHUTDOWN_WATCHDOG_MARGIN;
            std::thread::spawn(move || {
                std::thread::sleep(limit);
                tracing::error!(
                    seconds = limit.as_secs_f64(),
                    "the graceful stop did not end in time; exiting now (unfinished work stays uncommitted)"
                );
                std::process::exit(1);
            });
        }
    });
}

async fn check(config: Option<&Path>) -> Result<()> {
    let cfg = Config::load(config)?;
    println!("config: ok ({})", config.map(|p| p.display().to_string()).unwrap_or_else(|| "defaults + environment".into()));
    println!("codecs: {}", crate::codec::factory::describe_codecs(&cfg.codec)?);
    let preparer = crate::pipeline::prepare::Preparer::new(&cfg)?;
    let probe = SampleGenerator::new(1).conversation(0);
    let enriched = preparer.text().enrich_one(&crate::pipeline::text::EnrichInput {
        conversation: &probe,
        source: crate::event::SourceRef { topic: "check".into(), partition: 0, offset: 0 },
    })?;
    println!(
        "tokenizer: {} ({} tokens in a {}-turn sample conversation)",
        preparer.chunk_tokens,
        enriched.total_tokens,
        probe.turns.len()
    );
    for line in crate::infer::device::report() {
        println!("{line}");
    }
    let device = crate::infer::device::parse_device(&cfg.gpu.device)?;
    let tasks = [
        ("embedding", cfg.models.embedding.iter().collect::<Vec<_>>(), crate::infer::Task::Embedding),
        ("ner", cfg.models.ner.iter().collect(), crate::infer::Task::TokenClassification),
        ("sentiment", cfg.models.sentiment.iter().collect(), crate::infer::Task::SequenceClassification),
    ];
    for (task, list, kind) in tasks {
        if list.is_empty() {
            println!("model {task}: not configured");
        }
        for m in list {
            check_model(task, m, kind, device)?;
        }
    }
    check_store(&cfg).await;
    if cfg.llm.is_configured() {
        println!(
            "llm: {} at {} (api key {}; not contacted here: ask and serve connect on the first question)",
            cfg.llm.model,
            cfg.llm.url,
            crate::config::set_or_not(&cfg.llm.api_key)
        );
    } else {
        println!("llm: not configured (set llm.url to an OpenAI-compatible endpoint for `convoflow ask`; docs/ask.md)");
    }
    let k = &cfg.kafka;
    println!("kafka {}: security {}", k.brokers, k.security.describe());
    let mut missing = vec![];
    for topic in [&k.input_topic, &k.output_topic, &k.dlq_topic()] {
        let count = admin::partition_count(k, topic, Duration::from_secs(10)).map_err(|e| {
            // a broker that refused the credentials or the certificate did answer: its reason is the hint
            if e.downcast_ref::<admin::BrokerRefused>().is_some() {
                return e;
            }
            anyhow::anyhow!(
                "{e:#}\n  → no Kafka broker answered at {}: set kafka.brokers in the config file or \
                 CONVOFLOW__KAFKA__BROKERS=host:port (and kafka.security for a secured cluster); \
                 `convoflow demo` runs without any broker",
                k.brokers
            )
        })?;
        match count {
            Some(n) => println!("kafka {}: topic {topic}: {n} partitions", k.brokers),
            None => {
                println!("kafka {}: topic {topic}: missing", k.brokers);
                missing.push(topic.clone());
            }
        }
    }
    if missing.contains(&k.input_topic) {
        bail!("input topic {} does not exist", k.input_topic);
    }
    Ok(())
}

/// Reports the vector store's collection (without creating it).
async fn check_store(cfg: &Config) {
    use crate::sink::store::{self, Bootstrap, StoreError};
    let q = &cfg.qdrant;
    let place = match q.backend {
        crate::config::StoreBackend::Edge => format!("edge at {}", q.data_dir.join(&q.collection).display()),
        crate::config::StoreBackend::Qdrant => format!("qdrant at {}", q.url),
    };
    let dim = match crate::query::dense_dim(cfg) {
        Ok(dim) => dim,
        Err(e) => return println!("vector store ({place}): {e:#}"),
    };
    let result = async {
        let store = store::open(q)?;
        store.ensure_collection(&store::collection_spec(q, dim), Bootstrap::MustExist).await?;
        store.count(&Default::default()).await
    };
    match result.await {
        Ok(points) => println!("vector store ({place}): collection {} ({dim}-d dense + bm25), {points} points", q.collection),
        Err(StoreError::MissingCollection(_)) => {
            println!("vector store ({place}): collection {} not created yet (convoflow run creates it, {dim}-d)", q.collection)
        }
        Err(e) => println!("vector store ({place}): {e}"),
    }
}

/// `convoflow check`'s line for one configured model: loaded once, with the turn languages it
/// is routed.
fn check_model(task: &str, m: &crate::config::ModelConfig, kind: crate::infer::Task, device: tch::Device) -> Result<()> {
    if !m.path.exists() {
        println!("model {task}: {} — folder {} not found (download it from the HuggingFace hub)", m.name, m.path.display());
        return Ok(());
    }
    let dtype = crate::infer::device::parse_dtype(&m.dtype, device)?;
    let started = Instant::now();
    let loaded = crate::infer::Model::load(&m.path, kind, device, dtype)
        .with_context(|| format!("loading the {task} model {}", m.name))?;
    let hf = &loaded.folder.config;
    println!(
        "model {task}: {} ({}, {} layers, hidden {}, {} labels) on {device:?} as {dtype:?}, loaded in {:.1}s; languages: {}",
        m.name,
        hf.model_type,
        hf.num_hidden_layers,
        hf.hidden_size,
        loaded.labels.len(),
        started.elapsed().as_secs_f64(),
        if m.languages.is_empty() { "all".to_string() } else { m.languages.join(", ") }
    );
    Ok(())
}
