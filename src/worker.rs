//! Wiring of `convoflow run`: Kafka source → decode → validate → enrich (micro-batches) →
//! vector store (acknowledged upserts; tombstones delete) → output topic / DLQ → offset
//! completion → commit (by the source thread). What goes to the DLQ and what stops the worker
//! (its unfinished offsets uncommitted) is in docs/reliability.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::mpsc;
use tokio::time::Instant;
use rayon::prelude::*;
use tracing::{Instrument, debug, info, warn};

use crate::codec::registry::{self, RegistryLookup, SchemaRegistry};
use crate::codec::{AvroSchemas, InMemorySchemaLookup, Record, RecordCodec, WireFormat};
use crate::config::{CodecConfig, Config, Delivery, PipelineConfig};
use crate::event::{Conversation, EnrichedConversation, ModelInfo};
use crate::infer::tokenize::ModelTokenizer;
use crate::pipeline::breaker::DlqBreaker;
use crate::pipeline::chunk::{Chunker, builtin_tokenizer, load_tokenizer};
use crate::pipeline::enrich::{ModelFailure, Models, Outputs, Pending, TextEnricher};
use crate::pipeline::prepare::{Decided, Prepared, Preparer, Valid};
use crate::pipeline::emit::{EmitSettings, Emitter, OutputEncoder, Stored};
use crate::pipeline::stage::{Busy, Flight, Halt, STAGE_INFER, STAGE_PREPARE, STAGE_STORE, keep_current, record_depth};
use crate::sink::dlq::Rejection;
use crate::sink::producer::EventProducer;
use crate::sink::transactions::Transactions;
use crate::sink::store::points::{PayloadText, points_for};
use crate::sink::store::writer::StoreWriter;
use crate::sink::store::{self, Bootstrap, StoreError, StorePoint, VectorStore, WrittenTurn, WrittenTurns};
use crate::telemetry::{self, Readiness};
use crate::source::{self, InboundMessage, SharedSource, SourceSettings, admin};

/// Codec for input conversations, with the configured extra writer schemas and Confluent ids
/// (fixed ones from `codec.confluent_schemas`, then the Schema Registry's, which must be
/// reachable at start).
pub fn input_codec(cfg: &CodecConfig) -> Result<RecordCodec<Conversation>> {
    let mut schemas = AvroSchemas::new(Conversation::SCHEMA)?;
    for path in &cfg.input_writer_schemas {
        let json = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        schemas.add_writer_schema(&json).with_context(|| format!("parsing {}", path.display()))?;
    }
    let mut fixed = std::collections::HashMap::new();
    for (id, path) in &cfg.confluent_schemas {
        let json = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        fixed.insert(*id, apache_avro::Schema::parse_str(&json).with_context(|| format!("parsing {}", path.display()))?);
    }
    if let Some(registry_cfg) = &cfg.schema_registry {
        let registry = Arc::new(SchemaRegistry::new(registry_cfg)?);
        registry.check().context("the schema registry (codec.schema_registry) at start")?;
        schemas = schemas.with_confluent(Arc::new(RegistryLookup::new(registry, fixed)), None);
    } else if !fixed.is_empty() {
        let mut lookup = InMemorySchemaLookup::default();
        for (id, schema) in fixed {
            lookup.insert(id, schema);
        }
        schemas = schemas.with_confluent(Arc::new(lookup), None);
    }
    Ok(RecordCodec::with_schemas(cfg.input, schemas))
}

/// Codec writing `T` to `topic` in `format`; for the Confluent framing, the schema id comes
/// from the Schema Registry (registered or looked up under the topic's subject; an
/// incompatible schema refuses to start) or from a fixed `fixed_id`.
pub fn writer_codec<T: Record>(cfg: &CodecConfig, format: WireFormat, topic: &str, fixed_id: Option<u32>) -> Result<RecordCodec<T>> {
    let mut id = fixed_id;
    if format == WireFormat::Confluent
        && let Some(registry_cfg) = &cfg.schema_registry
    {
        let registry = SchemaRegistry::new(registry_cfg)?;
        id = Some(registry::writer_schema_id(registry_cfg, &registry, topic, T::SCHEMA)?);
    }
    let schemas = AvroSchemas::new(T::SCHEMA)?.with_confluent(Arc::new(InMemorySchemaLookup::default()), id);
    Ok(RecordCodec::with_schemas(format, schemas))
}

/// Codec of the enriched events on `kafka.output_topic`.
pub fn output_codec(cfg: &Config) -> Result<RecordCodec<EnrichedConversation>> {
    writer_codec(&cfg.codec, cfg.codec.output, &cfg.kafka.output_topic, cfg.codec.confluent_output_schema_id)
}

/// The text enricher (chunking, token counts, BM25, point ids). With an embedding model
/// (`embedding`: its tokenizer and the length of its document prefix in tokens), chunks are
/// counted and cut in that model's tokens, so each chunk is exactly one model input;
/// otherwise in those of `pipeline.chunk.tokenizer` or the built-in word-level tokenizer.
pub fn build_text_enricher(cfg: &Config, embedding: Option<(&ModelTokenizer, usize)>) -> Result<TextEnricher> {
    let chunk = &cfg.pipeline.chunk;
    let tokenizer = match (embedding, &chunk.tokenizer) {
        (Some(_), Some(path)) => bail!(
            "pipeline.chunk.tokenizer ({}) is for workers without an embedding model: with one, chunks are counted in \
             the embedding model's own tokens; remove the setting",
            path.display()
        ),
        (Some((tokenizer, leading)), None) => {
            let room = tokenizer.content_capacity().saturating_sub(leading);
            if chunk.max_tokens > room {
                bail!(
                    "pipeline.chunk.max_tokens is {}, but the embedding model takes {room} tokens of text per input \
                     ({} positions less {} special and {leading} document-prefix tokens); lower max_tokens",
                    chunk.max_tokens,
                    tokenizer.max_positions,
                    tokenizer.max_positions - tokenizer.content_capacity()
                );
            }
            tokenizer.plain_tokenizer().clone()
        }
        (None, Some(path)) => load_tokenizer(path)?,
        (None, None) => builtin_tokenizer(),
    };
    Ok(TextEnricher::new(Chunker::new(tokenizer, chunk.max_tokens, chunk.overlap_tokens)?, cfg.pipeline.bm25))
}

/// Runs the worker until `stop` is set (signal), then drains, commits and returns.
pub async fn run(cfg: Config, stop: Arc<AtomicBool>) -> Result<()> {
    let store = store::open(&cfg.qdrant)?;
    run_with_store(cfg, stop, store).await
}

/// `run` with a given vector store (tests wrap the real one to inject failures).
pub async fn run_with_store(cfg: Config, stop: Arc<AtomicBool>, store: Arc<dyn VectorStore>) -> Result<()> {
    // First, so /healthz answers and /readyz says what is still missing while models load.
    let readiness = Arc::new(Readiness::default());
    let liveness = Arc::new(telemetry::liveness::Liveness::new(
        Duration::from_millis(cfg.telemetry.liveness_poll_stall_ms),
        Duration::from_millis(cfg.telemetry.liveness_progress_stall_ms),
    ));
    telemetry::serve(&cfg.telemetry.listen, readiness.clone(), liveness.clone()).await?;
    let kafka = &cfg.kafka;
    let partitions = admin::partition_count(kafka, &kafka.input_topic, Duration::from_secs(15))?
        .ok_or_else(|| anyhow!("input topic {} does not exist on {}", kafka.input_topic, kafka.brokers))?;
    let dlq_topic = kafka.dlq_topic();
    if kafka.create_topics {
        admin::ensure_topics(kafka, &[kafka.output_topic.clone(), dlq_topic.clone()], partitions).await?;
    }
    let spec = store::collection_spec(&cfg.qdrant, crate::search::dense_dim(&cfg)?);
    if let Err(e) = store.ensure_collection(&spec, Bootstrap::CreateIfMissing).await {
        // start-up fails plainly: waiting at start would hide a misconfiguration behind an
        // unready pod; mid-run, the same outage pauses the worker instead (docs/reliability.md)
        let hint = if e.is_transient() {
            " (convoflow starts only with a usable vector store and exits 1 otherwise, so its supervisor restarts it; \
             nothing was consumed)"
        } else {
            ""
        };
        return Err(anyhow::Error::new(e).context(format!("the worker did not start: bootstrapping the vector store failed{hint}")));
    }
    info!(backend = store.backend(), collection = %spec.name, dim = spec.dense_dim, "vector store ready");
    readiness.store_reachable.store(true, Ordering::Relaxed);
    // the output schema's registry id before the models load (a registry that is down or refuses
    // the schema stops the start at once)
    let output_codec = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || output_codec(&cfg)).await??
    };
    let (preparer, models) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let preparer = Preparer::new(&cfg)?;
            Ok((preparer, Models::new(&cfg.models, &cfg.gpu)?))
        })
        .await??
    };
    readiness.models_warm.store(true, Ordering::Relaxed);
    let shared = Arc::new(SharedSource::default());
    // the producer's limit is the smallest of its own and what the output and DLQ topics accept
    // (less room for the batch framing): a record over it is refused at enqueue, alone
    let message_max_bytes = match admin::max_message_bytes(kafka, &[kafka.output_topic.clone(), dlq_topic.clone()]).await {
        Some(topics) if topics.saturating_sub(BATCH_FRAMING) < kafka.message_max_bytes => {
            let limit = topics.saturating_sub(BATCH_FRAMING).max(1_000);
            info!(topics, producer = limit, configured = kafka.message_max_bytes, "the output topics accept less than kafka.message_max_bytes: producing records of at most the producer's limit");
            limit
        }
        _ => kafka.message_max_bytes,
    };
    let halt = Arc::new(Halt::new(stop.clone()));
    let (producer, transactions) = match kafka.delivery {
        Delivery::AtLeastOnce => (EventProducer::new(kafka, message_max_bytes)?, None),
        Delivery::ExactlyOnce => {
            let k = kafka.clone();
            let producer = tokio::task::spawn_blocking(move || EventProducer::transactional(&k, message_max_bytes, TRANSACTION_INIT_TIMEOUT))
                .await
                .context("initialising transactions")??;
            let (k, mmb) = (kafka.clone(), message_max_bytes);
            let make = Box::new(move || EventProducer::transactional_uninitialised(&k, mmb));
            let txn = Arc::new(Transactions::new(producer.clone(), make, kafka.transaction_max_messages, TRANSACTION_CALL_TIMEOUT));
            (producer, Some(txn))
        }
    };
    let committer = match &transactions {
        Some(txn) => source::Committer::Transactions { txn: txn.clone(), halt: halt.clone() },
        None => source::Committer::Offsets,
    };
    let encoder = OutputEncoder {
        codec: output_codec,
        output_topic: kafka.output_topic.clone(),
        message_max_bytes: message_max_bytes as usize,
        max_carried_header_bytes: cfg.pipeline.max_carried_header_bytes,
    };
    let emitter = Emitter::new(
        producer.clone(),
        EmitSettings {
            output_topic: kafka.output_topic.clone(),
            dlq_topic,
            group_id: kafka.group_id.clone(),
            message_max_bytes: message_max_bytes as usize,
            max_carried_header_bytes: cfg.pipeline.max_carried_header_bytes,
            transactions: transactions.clone(),
        },
        DlqBreaker::new(cfg.pipeline.dlq_max_consecutive, cfg.pipeline.dlq_max_ratio, cfg.pipeline.dlq_window),
        shared.clone(),
        halt.clone(),
    );
    let shutdown = source::ShutdownClock::watch(stop.clone(), Duration::from_millis(cfg.pipeline.shutdown_timeout_ms));
    let pipeline = Pipeline {
        shutdown: shutdown.clone(),
        store: StoreWriter::new(store.clone(), cfg.qdrant.batch, cfg.qdrant.retry).for_worker(readiness.clone(), stop.clone()),
        payload_text: cfg.qdrant.payload_text,
        encoder: Arc::new(encoder),
        stop: stop.clone(),
        halt,
        model_infos: models.as_ref().map(Models::infos).unwrap_or_default(),
        preparer: Arc::new(preparer),
        models: models.map(Arc::new),
        readiness: readiness.clone(),
        emitter: Some(emitter),
        shared,
        transactions,
    };
    let consumer = source::create_consumer(
        kafka,
        pipeline.shared.clone(),
        Duration::from_millis(cfg.pipeline.shutdown_timeout_ms.min(5_000)),
        committer.clone(),
    )?;
    let (tx, rx) = mpsc::channel(cfg.pipeline.queue_capacity);
    let settings = SourceSettings {
        max_in_flight: cfg.pipeline.max_in_flight,
        commit_interval: Duration::from_millis(kafka.commit_interval_ms),
        committer,
        shutdown: shutdown.clone(),
        liveness,
    };
    let lag_monitor = telemetry::lag::LagMonitor::start(kafka, pipeline.shared.clone(), readiness.clone(), Duration::from_secs(2))?;
    let shared = pipeline.shared.clone();
    let poll_thread = std::thread::Builder::new()
        .name("kafka-source".into())
        .spawn(move || source::run_poll_loop(consumer, shared, tx, settings, stop))
        .context("starting the source thread")?;
    info!(input = %kafka.input_topic, output = %kafka.output_topic, group = %kafka.group_id, "worker started");

    let pipeline_transactions = pipeline.transactions.clone();
    let (stats, failure) = pipeline.run(rx, &cfg.pipeline).await;
    // The source's last commit and its leaving the group may block while the broker is away:
    // waited for until shortly before the deadline, then left behind (what it did not commit is
    // re-read after a restart).
    let source_done = tokio::task::spawn_blocking(move || poll_thread.join());
    match tokio::time::timeout(shutdown.remaining(SOURCE_LEFT_BEHIND), source_done).await {
        Ok(joined) => joined?.map_err(|_| anyhow!("the source thread panicked"))?,
        Err(_) => warn!("the Kafka consumer did not close in time (broker unreachable?); exiting without it"),
    }
    // bounded too: with the broker away, what is still queued is not waited for (it was not
    // completed, so it is re-read after a restart)
    // exactly-once: the current producer (a failed one may have been replaced)
    let producer = pipeline_transactions.as_ref().map(|t| t.current()).unwrap_or(producer);
    if let Err(e) = producer.flush(shutdown.remaining(Duration::from_millis(300))) {
        warn!(error = %format!("{e:#}"), "records still queued at exit were not delivered; their messages stay uncommitted");
    }
    // bounded as well (at least a second, so a healthy flush finishes): what the store
    // acknowledged is in its write-ahead log, so an exit mid-flush loses nothing
    match tokio::time::timeout(shutdown.remaining(Duration::ZERO).max(Duration::from_secs(1)), store.flush()).await {
        Ok(flushed) => flushed.context("flushing the vector store")?,
        Err(_) => warn!("the vector store did not flush in time; its write-ahead log holds what it acknowledged"),
    }
    drop(lag_monitor);
    info!(
        enriched = stats.enriched,
        points = stats.points,
        dead_lettered = stats.dead_lettered,
        tombstones = stats.tombstones,
        "worker stopped"
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// How long before the shutdown deadline the worker stops waiting for the source (its poll
/// thread may be blocked in a librdkafka call that waits for an unresponsive broker, such as a
/// synchronous commit): the pipeline stops without it, and the worker exits on time.
const SOURCE_LEFT_BEHIND: Duration = Duration::from_millis(500);

/// Room left under a topic's `max.message.bytes` for the record batch's own framing (the broker
/// compares whole batches with it; librdkafka checks records without it).
const BATCH_FRAMING: u32 = 512;
/// Bound on each transactional call of the poll thread (send offsets, commit, abort; a commit
/// flushes first, with the same bound): short, so the thread keeps polling (liveness) while the
/// coordinator is away; a call that times out is resumed at the next commit interval.
const TRANSACTION_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on `init_transactions` at start (it fences and aborts a predecessor's transaction).
const TRANSACTION_INIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub enriched: u64,
    /// Points upserted to the vector store (the writer's count).
    pub points: u64,
    pub dead_lettered: u64,
    pub tombstones: u64,
}

struct Pipeline {
    /// The shutdown's deadline: past it (less `SOURCE_LEFT_BEHIND`) the pipeline stops
    /// without waiting for the source to leave.
    shutdown: source::ShutdownClock,
    store: StoreWriter,
    readiness: Arc<Readiness>,
    payload_text: PayloadText,
    /// Encodes each enriched event before its points are written (see `OutputEncoder`).
    encoder: Arc<OutputEncoder>,
    /// Set when the worker is stopping (a signal or a failure).
    stop: Arc<AtomicBool>,
    /// The first failure that stops the worker (shared with the emit stage).
    halt: Arc<Halt>,
    preparer: Arc<Preparer>,
    models: Option<Arc<Models>>,
    model_infos: Vec<ModelInfo>,
    /// The emit stage (moved into its task by `run`).
    emitter: Option<Emitter>,
    shared: Arc<SharedSource>,
    /// Exactly-once: the producer's transactions (a batch left out must doom the open one).
    transactions: Option<Arc<Transactions>>,
}

/// A prepared micro-batch whose model inputs are queued on the model threads.
struct InFlight {
    batch: Vec<Prepared>,
    /// The models' results (None without models).
    pending: Option<Result<Pending, ModelFailure>>,
    /// When the batch was submitted to the models (for the enrichment latency).
    submitted: std::time::Instant,
}

impl Pipeline {
    /// The stages, each a task connected to the next by a bounded channel, so several
    /// micro-batches are in flight and every stage works at once: batch → prepare (CPU cores)
    /// → infer (queues each batch on the model threads and goes on) → store (this task: model
    /// outputs, points upserted) → emit (output topic / DLQ, completion), all in input order.
    /// A full channel stops the stage before it, and in the end the source pauses its
    /// partitions.
    async fn run(mut self, rx: mpsc::Receiver<InboundMessage>, p: &PipelineConfig) -> (Stats, Option<anyhow::Error>) {
        let (batch_tx, batch_rx) = mpsc::channel(1);
        let (prepared_tx, prepared_rx) = mpsc::channel(p.prepare_workers);
        let (inflight_tx, mut inflight_rx) = mpsc::channel(p.batches_in_flight);
        let linger = Duration::from_millis(p.max_batch_wait_ms);
        let flight = Arc::new(Flight::default());
        let stages = [
            tokio::spawn({
                let (flight, preparer) = (flight.clone(), self.preparer.clone());
                let (max, room) = (p.max_batch_messages, p.batches_in_flight);
                async move {
                    form_batches(rx, batch_tx, flight, max, room, linger).await;
                    // the source is gone: a lookup waiting for the registry gives up
                    preparer.interrupt();
                }
            }),
            tokio::spawn(prepare_batches(batch_rx, prepared_tx, self.preparer.clone(), self.shared.clone(), flight.clone(), p.prepare_workers)),
            tokio::spawn(submit_batches(prepared_rx, inflight_tx, self.models.clone(), flight.clone())),
        ];
        // The batch stage notices the source's leaving only while it waits for messages; a stage
        // busy elsewhere (a full channel) must not keep the rest waiting on models or the store.
        // A source that has not left by shortly before the shutdown deadline is stuck (its poll
        // thread waits in librdkafka for a broker that does not answer): the pipeline stops
        // without it; what it did not complete stays uncommitted and is re-read.
        let source_watch = tokio::spawn({
            let (shared, flight, clock) = (self.shared.clone(), flight.clone(), self.shutdown.clone());
            async move {
                loop {
                    if shared.lock().left {
                        break;
                    }
                    if clock.stopping() && clock.remaining(SOURCE_LEFT_BEHIND).is_zero() {
                        warn!(
                            "the Kafka source has not left by the shutdown deadline (blocked on an unresponsive broker?): \
                             the pipeline stops without it; unfinished work stays uncommitted and is re-read"
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                flight.abandon();
            }
        });
        let (stored_tx, stored_rx) = mpsc::channel(2);
        let emitter = self.emitter.take().expect("run once");
        let emit = tokio::spawn(emitter.run(stored_rx, flight.clone()));
        while let Some(inflight) = inflight_rx.recv().await {
            record_depth(STAGE_STORE, inflight_rx.len());
            // stopping (a failure, or the source is gone): what is still queued is neither
            // written nor completed; the next owner of its partitions re-reads it
            let stored = if !self.halt.is_tripped() && !flight.is_abandoned() {
                let span = tracing::info_span!("batch", messages = inflight.batch.len(), queued = inflight_rx.len());
                tokio::select! {
                    stored = self.store(inflight).instrument(span) => stored,
                    // the source has left (its shutdown timeout passed): the batch cannot be
                    // completed any more, so the worker does not wait for its models or store
                    _ = flight.abandoned() => None,
                }
            } else {
                None
            };
            let forwarded = match stored {
                Some(stored) => stored_tx.send(stored).await.is_ok(),
                None => false,
            };
            if !forwarded {
                flight.ended();
            }
        }
        drop(stored_tx);
        source_watch.abort();
        for stage in stages {
            if let Err(e) = stage.await
                && e.is_panic()
            {
                self.halt.trip(anyhow!("a pipeline stage panicked: {e}"));
            }
        }
        let emitted = match emit.await {
            Ok(emitted) => emitted,
            Err(e) => {
                self.halt.trip(anyhow!("the emit stage panicked: {e}"));
                Default::default()
            }
        };
        let stats = Stats {
            enriched: emitted.enriched,
            points: self.store.counters.upserted_points.load(Ordering::Relaxed),
            dead_lettered: emitted.dead_lettered,
            tombstones: emitted.tombstones,
        };
        (stats, self.halt.take())
    }

    /// Stops the worker without completing the batch at hand: nothing of it is committed.
    fn fail(&mut self, e: anyhow::Error, messages: usize) {
        warn!(messages, "stopping without completing this batch");
        self.halt.trip(e);
    }

    /// The store stage: the batch's model outputs, then its points upserted (acknowledged).
    /// None when the batch ends here (nothing left of it, or a failure that stops the worker).
    async fn store(&mut self, inflight: InFlight) -> Option<Stored> {
        let InFlight { mut batch, pending, submitted } = inflight;
        if let Some(reason) = batch.iter().find_map(|p| match &p.decided {
            Decided::Unfinished(reason) => Some(reason.clone()),
            _ => None,
        }) {
            // only when the worker was already stopping; never dead-lettered, never completed
            self.fail(anyhow!("a message could not be decoded: {reason}"), batch.len());
            return None;
        }
        if let Err(e) = self.model_outputs(&mut batch, pending).await {
            self.fail(anyhow::Error::new(e).context("running the models"), batch.len());
            return None;
        }
        let _busy = Busy::start(STAGE_STORE); // from here on: the stage's own work
        // messages of partitions revoked while the batch was in flight: the next owner re-reads them
        let batch = keep_current(&self.shared, STAGE_STORE, batch, |p| &p.msg);
        if batch.is_empty() {
            return None;
        }
        metrics::counter!(telemetry::MESSAGES).increment(batch.len() as u64);
        metrics::histogram!(telemetry::BATCH_MESSAGES).record(batch.len() as f64);
        let (turns, tokens) = batch
            .iter()
            .filter_map(|p| match &p.decided {
                Decided::Valid(v) => Some((v.event.turns.len(), v.event.total_tokens)),
                _ => None,
            })
            .fold((0usize, 0i64), |(t, k), (a, b)| (t + a, k + b));
        if turns > 0 {
            metrics::histogram!(telemetry::ENRICH_SECONDS).record(submitted.elapsed().as_secs_f64());
            metrics::counter!(telemetry::TURNS).increment(turns as u64);
            metrics::counter!(telemetry::TOKENS).increment(tokens.max(0) as u64);
            metrics::histogram!(telemetry::BATCH_TURNS).record(turns as f64);
            metrics::histogram!(telemetry::BATCH_TOKENS).record(tokens as f64);
        }
        // every event encoded and the points of every message built, on rayon's pool: an event
        // that cannot be produced (too large, unencodable) is dead-lettered here, before any of
        // its points is written, so no point stays searchable without its enriched event
        let (payload_text, encoder) = (self.payload_text, self.encoder.clone());
        let mut batch = tokio::task::spawn_blocking(move || {
            let mut batch = batch;
            batch.par_iter_mut().for_each(|p| {
                let Prepared { msg, decided } = p;
                if let Decided::Valid(v) = decided {
                    match encoder.encode(msg, v) {
                        Ok(output) => {
                            v.output = Some(output);
                            let dense = v.dense.take();
                            v.points = points_for(&v.conversation, &v.event, dense.as_deref(), payload_text);
                        }
                        Err(why) => *decided = Decided::Rejected(why),
                    }
                }
            });
            batch
        })
        .await
        .expect("building points does not panic");
        // checked again right before writing: a partition may have moved while the points were
        // built, and a late write could bring back points its new owner deleted
        batch = keep_current(&self.shared, STAGE_STORE, batch, |p| &p.msg);
        if batch.is_empty() {
            return None;
        }
        if let Err(e) = self.write_store(&mut batch).await {
            self.readiness.store_reachable.store(false, Ordering::Relaxed);
            if e.is_transient() && self.stop.load(Ordering::SeqCst) {
                // stopping while the store is down: not a failure of the worker; the batch stays
                // uncommitted and the next owner of its partitions re-reads it
                warn!(messages = batch.len(), error = %e, "stopping during a vector store outage; the batch is left uncommitted");
                if let Some(txn) = &self.transactions {
                    // batches after this one may still be emitted: the open transaction must
                    // not commit their offsets past it
                    txn.doom();
                }
                return None;
            }
            self.fail(anyhow::Error::new(e).context("writing to the vector store"), batch.len());
            return None;
        }
        Some(Stored { batch })
    }

    /// Waits for the batch's model outputs and applies them to its events (the chunks' dense
    /// vectors go to each message's `dense`). When a model fails on the
    /// batch, each valid message is prepared and run again alone (a smaller job may fit where a
    /// batch ran out of memory), so only a message the model cannot take is dead-lettered —
    /// and only for a fault of its own (`ModelFailure::Input`). A message that fails alone for
    /// the machine's reasons (`Runtime`), or a model thread that is gone, is an error: the
    /// worker stops with nothing of the batch committed.
    async fn model_outputs(
        &self,
        batch: &mut [Prepared],
        pending: Option<Result<Pending, ModelFailure>>,
    ) -> Result<(), ModelFailure> {
        let (Some(models), Some(pending)) = (self.models.clone(), pending) else {
            return Ok(());
        };
        let collected = match pending {
            Ok(p) => {
                let m = models.clone();
                tokio::task::spawn_blocking(move || m.collect(p)).await.expect("collecting outputs does not panic")
            }
            Err(e) => Err(e),
        };
        let apply = |outputs: &mut Outputs, p: &mut Prepared| {
            if let Decided::Valid(v) = &mut p.decided {
                v.dense = outputs.apply(&mut v.event, &self.model_infos);
            }
        };
        match collected {
            Ok(mut outputs) => {
                batch.iter_mut().for_each(|p| apply(&mut outputs, p));
                Ok(())
            }
            Err(gone @ ModelFailure::ThreadGone(_)) => Err(gone),
            Err(failure) => {
                warn!(reason = %failure, messages = batch.len(), "a model failed on a batch; running its messages one by one");
                for p in batch.iter_mut() {
                    if !matches!(p.decided, Decided::Valid(_)) {
                        continue;
                    }
                    let (preparer, m, msg) = (self.preparer.clone(), models.clone(), p.msg.clone());
                    let (decided, result) = tokio::task::spawn_blocking(move || {
                        let mut alone = [Prepared { decided: preparer.decide(&msg), msg }];
                        let result = m.submit(&mut alone).and_then(|pending| m.collect(pending));
                        let [Prepared { decided, .. }] = alone;
                        (decided, result)
                    })
                    .await
                    .expect("a single message does not panic");
                    p.decided = decided;
                    match result {
                        Ok(mut outputs) => apply(&mut outputs, p),
                        Err(e @ ModelFailure::Input { .. }) => {
                            p.decided = Decided::Rejected(Rejection { class: "enrichment", message: e.to_string() });
                        }
                        Err(machine) => return Err(machine),
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes the batch to the vector store in input order: the points of each enriched
    /// conversation, and for a tombstone the deletion of that tenant's conversation points
    /// (after the upserts before it, so a later re-creation is not deleted). Acknowledged on
    /// return. When the store rejects what it is given for its content, the batch is halved
    /// until the messages it rejects are found; they become dead-letter rejections (class
    /// `store`, any of their points already stored deleted) and the rest is written. A batch
    /// whose every message is rejected is the collection's problem: an error, like any other.
    async fn write_store(&self, batch: &mut [Prepared]) -> Result<(), StoreError> {
        // the messages' points side by side, so a run of messages is one upsert without copies
        let mut bounds = Vec::with_capacity(batch.len());
        let mut flat = Vec::new();
        for p in batch.iter_mut() {
            let start = flat.len();
            if let Decided::Valid(v) = &mut p.decided {
                flat.append(&mut v.points);
            }
            bounds.push(start..flat.len());
        }
        let writable = batch.iter().filter(|p| matches!(p.decided, Decided::Valid(_) | Decided::Tombstone(_))).count();
        self.write_bisecting(batch, &flat, &bounds).await?;
        let rejected = batch.iter().filter(|p| matches!(&p.decided, Decided::Rejected(r) if r.class == "store")).count();
        if writable > 1 && rejected == writable {
            // every message refused: the collection, not the data (changed vector size, index
            // type...); dead-lettering would move the whole stream into the DLQ
            return Err(StoreError::Permanent(format!(
                "the vector store rejected every one of {writable} messages of a batch; check the collection (qdrant.collection) — \
                 first reason: {}",
                batch.iter().find_map(|p| match &p.decided {
                    Decided::Rejected(r) => Some(r.message.as_str()),
                    _ => None,
                }).unwrap_or_default()
            )));
        }
        Ok(())
    }

    fn write_bisecting<'a>(
        &'a self,
        batch: &'a mut [Prepared],
        flat: &'a [StorePoint],
        bounds: &'a [std::ops::Range<usize>],
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match self.write_in_order(batch, flat, bounds).await {
                Err(StoreError::Rejected(why)) if batch.len() == 1 => {
                    let p = &mut batch[0];
                    warn!(tp = %p.msg.tp, offset = p.msg.offset, reason = %why, "the vector store rejects this message's write");
                    // a message whose points took several requests may have some stored: none
                    // of a dead-lettered message stays searchable
                    let ids: Vec<uuid::Uuid> = flat[bounds[0].clone()].iter().map(|point| point.id).collect();
                    if !ids.is_empty() {
                        self.store.delete_points(&ids).await?;
                    }
                    p.decided = Decided::Rejected(Rejection { class: "store", message: why });
                    Ok(())
                }
                Err(StoreError::Rejected(why)) if batch.len() > 1 => {
                    debug!(messages = batch.len(), reason = %why, "the vector store rejected a write; halving it");
                    let mid = batch.len() / 2;
                    let (left, right) = batch.split_at_mut(mid);
                    let (left_bounds, right_bounds) = bounds.split_at(mid);
                    self.write_bisecting(left, flat, left_bounds).await?;
                    self.write_bisecting(right, flat, right_bounds).await
                }
                other => other,
            }
        })
    }

    /// The writes of `batch` (whose points are `flat[bounds[i]]`), in input order. A run of
    /// consecutive messages' points is one upsert (they are adjacent in `flat`), followed by one
    /// delete of the chunks their re-sent turns no longer have; a run ends before a tombstone,
    /// before a rejected message's points and before a second message of a conversation already
    /// in it (its stale-chunk delete must not run after that message's upsert).
    async fn write_in_order(&self, batch: &mut [Prepared], flat: &[StorePoint], bounds: &[std::ops::Range<usize>]) -> Result<(), StoreError> {
        let mut run = Run::default();
        for (p, range) in batch.iter_mut().zip(bounds) {
            match &mut p.decided {
                Decided::Valid(v) => {
                    let written = written_turns(v);
                    if run.has(&written) {
                        self.write_run(flat, &mut run).await?;
                    }
                    run.add(range.clone(), written);
                }
                Decided::Tombstone(t) => {
                    self.write_run(flat, &mut run).await?;
                    // a batch halved after a rejection runs its tombstones again: what they
                    // deleted the first time counts
                    let matched = t.matched.unwrap_or(0) + self.store.delete_conversation(t.tenant.as_deref(), &t.conversation_id).await?;
                    if matched == 0 {
                        warn!(
                            tp = %p.msg.tp, offset = p.msg.offset, conversation = %t.conversation_id, tenant = ?t.tenant,
                            "a tombstone matched no point (unknown conversation, or another tenant's)"
                        );
                    }
                    t.matched = Some(matched);
                }
                // points of a message the store rejected (found by halving) are skipped: the run
                // ends before them
                Decided::Rejected(_) | Decided::Unfinished(_) if !range.is_empty() => self.write_run(flat, &mut run).await?,
                Decided::Rejected(_) | Decided::Unfinished(_) => {}
            }
        }
        self.write_run(flat, &mut run).await
    }

    /// Upserts the run's points, then deletes its turns' stale chunks; the run is empty after.
    async fn write_run(&self, flat: &[StorePoint], run: &mut Run) -> Result<(), StoreError> {
        if let Some(r) = run.points.take() {
            self.store.upsert_all(&flat[r]).await?;
        }
        self.store.delete_stale_chunks(&run.written).await?;
        run.written.clear();
        Ok(())
    }
}

/// Consecutive valid messages written together (see `Pipeline::write_in_order`).
#[derive(Default)]
struct Run {
    /// Their points in the batch's flat list.
    points: Option<std::ops::Range<usize>>,
    /// Their turns, for the stale-chunk delete.
    written: Vec<WrittenTurns>,
}

impl Run {
    /// Whether a message of the same tenant's conversation is in the run already.
    fn has(&self, w: &WrittenTurns) -> bool {
        self.written.iter().any(|o| o.conversation_id == w.conversation_id && o.tenant == w.tenant)
    }

    fn add(&mut self, points: std::ops::Range<usize>, written: WrittenTurns) {
        self.points = Some(self.points.take().map_or(points.clone(), |r| r.start..points.end));
        self.written.push(written);
    }
}

/// A message's turns with their number of chunks now (a re-sent turn replaces the old one).
fn written_turns(v: &Valid) -> WrittenTurns {
    let e = &v.event;
    let turns = e
        .turns
        .iter()
        .map(|t| WrittenTurn {
            turn_id: t.turn_id.clone(),
            chunks: t.chunks.len(),
            next_chunk_id: crate::event::point_id(&e.tenant, &e.conversation_id, &t.turn_id, t.chunks.len()),
        })
        .collect();
    WrittenTurns { tenant: e.tenant.clone(), conversation_id: e.conversation_id.clone(), turns }
}

/// The batch stage: forms micro-batches of up to `max` messages. A batch takes what is already
/// queued and leaves at once while fewer than `room` batches are in flight (an idle worker
/// handles a lone conversation immediately and the models always have work queued, like
/// text-embeddings-inference forming the next batch while the model runs); otherwise it keeps
/// filling until it is full or a batch in flight ends. `linger` > 0 holds every batch that
/// long for more messages first.
async fn form_batches(
    mut rx: mpsc::Receiver<InboundMessage>,
    tx: mpsc::Sender<Vec<InboundMessage>>,
    flight: Arc<Flight>,
    max: usize,
    room: usize,
    linger: Duration,
) {
    loop {
        // the source's leaving (or the pipeline's giving up on it) ends the wait too
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = flight.abandoned() => None,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        let linger_until = Instant::now() + linger;
        let mut open = true;
        loop {
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let lingering = open && Instant::now() < linger_until;
            if batch.len() >= max || !open || (flight.count() < room && !lingering) {
                break;
            }
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => batch.push(m),
                    None => open = false,
                },
                _ = flight.ended.notified() => {}
                _ = tokio::time::sleep_until(linger_until), if lingering => {}
                _ = flight.abandoned() => open = false,
            }
        }
        metrics::gauge!(telemetry::QUEUE_DEPTH).set(rx.len() as f64);
        if !open || rx.is_closed() {
            // the source is gone (it committed what was complete and left the group): nothing
            // of this batch, nor of what is still queued, can be completed any more
            break;
        }
        flight.started();
        if tx.send(batch).await.is_err() {
            break;
        }
    }
    flight.abandon(); // also wakes a waiter on `ended`
}

/// The prepare stage: up to `workers` micro-batches at once on blocking threads (each spreads
/// its messages over rayon's pool), passed on in input order.
async fn prepare_batches(
    mut rx: mpsc::Receiver<Vec<InboundMessage>>,
    tx: mpsc::Sender<Vec<Prepared>>,
    preparer: Arc<Preparer>,
    shared: Arc<SharedSource>,
    flight: Arc<Flight>,
    workers: usize,
) {
    use futures::StreamExt;
    let batches = futures::stream::poll_fn(move |cx| {
        let next = rx.poll_recv(cx);
        record_depth(STAGE_PREPARE, rx.len());
        next
    })
    .map(|batch: Vec<InboundMessage>| {
        let (preparer, shared, flight) = (preparer.clone(), shared.clone(), flight.clone());
        tokio::task::spawn_blocking(move || {
            if flight.is_abandoned() {
                return vec![];
            }
            let _busy = Busy::start(STAGE_PREPARE);
            // messages of partitions revoked meanwhile are dropped: the next owner re-reads them
            let current: Vec<InboundMessage> = batch.into_iter().filter(|m| shared.is_current(&m.tp, m.generation)).collect();
            preparer.prepare(current)
        })
    })
    .buffered(workers);
    let mut batches = std::pin::pin!(batches);
    while let Some(prepared) = batches.next().await {
        let prepared = prepared.expect("preparation does not panic");
        if prepared.is_empty() {
            flight.ended(); // every message was revoked meanwhile, or the source is gone
        } else if tx.send(prepared).await.is_err() {
            return;
        }
    }
}

/// The infer stage: queues each prepared batch on the model threads (which run their jobs in
/// order, each on its own CUDA stream) and passes it on without waiting for the results. It
/// first takes a place in the write stage's queue, so at most `batches_in_flight` batches wait
/// on the models ahead of the one being written.
async fn submit_batches(
    mut rx: mpsc::Receiver<Vec<Prepared>>,
    tx: mpsc::Sender<InFlight>,
    models: Option<Arc<Models>>,
    flight: Arc<Flight>,
) {
    while let Some(mut batch) = rx.recv().await {
        record_depth(STAGE_INFER, rx.len());
        if flight.is_abandoned() {
            flight.ended(); // not run: nothing of it could be completed
            continue;
        }
        let submitted = std::time::Instant::now();
        let Ok(permit) = tx.reserve().await else { return };
        let pending = models.as_ref().map(|m| m.submit(&mut batch));
        permit.send(InFlight { batch, pending, submitted });
    }
}

/// Input codec sanity for `check`: what the worker will accept.
pub fn describe_codecs(cfg: &CodecConfig) -> Result<String> {
    let input = input_codec(cfg)?;
    let fingerprint: String = input.schemas().reader_fingerprint().to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let registry = match &cfg.schema_registry {
        Some(r) => format!(
            "; schema registry {} (reachable; user {}, password {}, subjects {:?}, auto_register {})",
            r.url,
            r.username.as_deref().unwrap_or("-"),
            crate::config::set_or_not(&r.password),
            r.subject_strategy,
            r.auto_register
        ),
        None => String::new(),
    };
    Ok(format!(
        "input {:?} (single-object fingerprint {fingerprint}), output {:?}{registry}",
        input.format(),
        if cfg.output == WireFormat::Auto { WireFormat::Avro } else { cfg.output }
    ))
}
