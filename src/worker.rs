//! Wiring of `convoflow run`: Kafka source → decode → validate → enrich (micro-batches) →
//! vector store (acknowledged upserts; tombstones delete) → output topic / DLQ → offset
//! completion → commit (by the source thread). A store failure that retries cannot fix stops
//! the worker with an error, leaving the offsets of the unwritten messages uncommitted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rdkafka::message::{Message, OwnedHeaders};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, error, info, warn};

use crate::codec::{AvroSchemas, InMemorySchemaLookup, Record, RecordCodec, WireFormat};
use crate::config::{CodecConfig, Config};
use crate::event::{Conversation, EnrichedConversation, SourceRef};
use crate::pipeline::chunk::{Chunker, builtin_tokenizer, load_tokenizer};
use crate::pipeline::enrich::{EnrichInput, Enriched, Enricher, ModelEnricher, TextEnricher};
use crate::sink::dlq::{self, Rejection};
use crate::sink::producer::{EventProducer, Outgoing};
use crate::sink::store::points::{PayloadText, points_for};
use crate::sink::store::writer::StoreWriter;
use crate::sink::store::{self, Bootstrap, StoreError, VectorStore};
use crate::telemetry::{self, Readiness};
use crate::source::{self, InboundMessage, SharedSource, SourceSettings, admin};

/// Codec for input conversations, with the configured extra writer schemas and Confluent ids.
pub fn input_codec(cfg: &CodecConfig) -> Result<RecordCodec<Conversation>> {
    let mut schemas = AvroSchemas::new(Conversation::SCHEMA)?;
    for path in &cfg.input_writer_schemas {
        let json = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        schemas.add_writer_schema(&json).with_context(|| format!("parsing {}", path.display()))?;
    }
    if !cfg.confluent_schemas.is_empty() {
        let mut lookup = InMemorySchemaLookup::default();
        for (id, path) in &cfg.confluent_schemas {
            let json = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            lookup.insert(*id, apache_avro::Schema::parse_str(&json).with_context(|| format!("parsing {}", path.display()))?);
        }
        schemas = schemas.with_confluent(Arc::new(lookup), None);
    }
    Ok(RecordCodec::with_schemas(cfg.input, schemas))
}

pub fn output_codec(cfg: &CodecConfig) -> Result<RecordCodec<EnrichedConversation>> {
    let schemas = AvroSchemas::new(EnrichedConversation::SCHEMA)?
        .with_confluent(Arc::new(InMemorySchemaLookup::default()), cfg.confluent_output_schema_id);
    Ok(RecordCodec::with_schemas(cfg.output, schemas))
}

/// The enricher `run` uses: the configured models around the text enricher, or the text
/// enricher alone when no model is configured. Loads eager models (blocking).
pub fn build_enricher(cfg: &Config) -> Result<Arc<dyn Enricher>> {
    let text = build_text_enricher(cfg)?;
    let m = &cfg.models;
    if m.embedding.is_none() && m.ner.is_none() && m.sentiment.is_none() {
        return Ok(Arc::new(text));
    }
    Ok(Arc::new(ModelEnricher::new(text, m, &cfg.gpu)?))
}

pub fn build_text_enricher(cfg: &Config) -> Result<TextEnricher> {
    let chunk = &cfg.pipeline.chunk;
    let tokenizer = match &chunk.tokenizer {
        Some(path) => load_tokenizer(path)?,
        None => builtin_tokenizer(),
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
    telemetry::serve(&cfg.telemetry.listen, readiness.clone()).await?;
    let kafka = &cfg.kafka;
    let partitions = admin::partition_count(kafka, &kafka.input_topic, Duration::from_secs(15))?
        .ok_or_else(|| anyhow!("input topic {} does not exist on {}", kafka.input_topic, kafka.brokers))?;
    let dlq_topic = kafka.dlq_topic();
    if kafka.create_topics {
        admin::ensure_topics(kafka, &[kafka.output_topic.clone(), dlq_topic.clone()], partitions).await?;
    }
    let spec = store::collection_spec(&cfg.qdrant, crate::search::dense_dim(&cfg)?);
    store.ensure_collection(&spec, Bootstrap::CreateIfMissing).await.context("bootstrapping the vector store")?;
    info!(backend = store.backend(), collection = %spec.name, dim = spec.dense_dim, "vector store ready");
    readiness.store_reachable.store(true, Ordering::Relaxed);
    let enricher = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || build_enricher(&cfg)).await??
    };
    readiness.models_warm.store(true, Ordering::Relaxed);
    let pipeline = Pipeline {
        store: StoreWriter::new(store.clone(), cfg.qdrant.batch, cfg.qdrant.retry),
        payload_text: cfg.qdrant.payload_text,
        stop: stop.clone(),
        failure: None,
        input_codec: input_codec(&cfg.codec)?,
        output_codec: output_codec(&cfg.codec)?,
        enricher,
        readiness: readiness.clone(),
        producer: EventProducer::new(kafka)?,
        output_topic: kafka.output_topic.clone(),
        dlq_topic,
        group_id: kafka.group_id.clone(),
        max_turn_bytes: cfg.pipeline.max_turn_bytes,
        shared: Arc::new(SharedSource::default()),
        stats: Stats::default(),
    };
    let consumer = source::create_consumer(
        kafka,
        pipeline.shared.clone(),
        Duration::from_millis(cfg.pipeline.shutdown_timeout_ms.min(5_000)),
    )?;
    let (tx, rx) = mpsc::channel(cfg.pipeline.queue_capacity);
    let settings = SourceSettings {
        max_in_flight: cfg.pipeline.max_in_flight,
        commit_interval: Duration::from_millis(kafka.commit_interval_ms),
        shutdown_timeout: Duration::from_millis(cfg.pipeline.shutdown_timeout_ms),
    };
    let lag_monitor = telemetry::lag::LagMonitor::start(kafka, pipeline.shared.clone(), readiness.clone(), Duration::from_secs(2))?;
    let shared = pipeline.shared.clone();
    let poll_thread = std::thread::Builder::new()
        .name("kafka-source".into())
        .spawn(move || source::run_poll_loop(consumer, shared, tx, settings, stop))
        .context("starting the source thread")?;
    info!(input = %kafka.input_topic, output = %kafka.output_topic, group = %kafka.group_id, "worker started");

    let producer = pipeline.producer.clone();
    let (stats, failure) = pipeline
        .run(rx, cfg.pipeline.max_batch_messages, Duration::from_millis(cfg.pipeline.max_batch_wait_ms))
        .await;
    tokio::task::spawn_blocking(move || poll_thread.join())
        .await?
        .map_err(|_| anyhow!("the source thread panicked"))?;
    producer.flush(Duration::from_secs(5))?;
    store.flush().await.context("flushing the vector store")?;
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

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub enriched: u64,
    /// Points upserted to the vector store (the writer's count).
    pub points: u64,
    pub dead_lettered: u64,
    pub tombstones: u64,
}

struct Pipeline {
    store: StoreWriter,
    readiness: Arc<Readiness>,
    payload_text: PayloadText,
    /// Set to stop the source when the store fails for good.
    stop: Arc<AtomicBool>,
    failure: Option<anyhow::Error>,
    input_codec: RecordCodec<Conversation>,
    output_codec: RecordCodec<EnrichedConversation>,
    enricher: Arc<dyn Enricher>,
    producer: EventProducer,
    output_topic: String,
    dlq_topic: String,
    group_id: String,
    max_turn_bytes: usize,
    shared: Arc<SharedSource>,
    stats: Stats,
}

/// What became of one input message before anything is produced.
enum Decided {
    Tombstone,
    Rejected(Rejection),
    Valid(Conversation),
}

impl Pipeline {
    async fn run(mut self, mut rx: mpsc::Receiver<InboundMessage>, max_batch: usize, max_wait: Duration) -> (Stats, Option<anyhow::Error>) {
        let mut deliveries = JoinSet::new();
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let deadline = Instant::now() + max_wait;
            while batch.len() < max_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => batch.push(m),
                    Ok(None) | Err(_) => break,
                }
            }
            if self.failure.is_some() {
                continue; // stopping: what is still queued is neither written nor completed
            }
            metrics::gauge!(telemetry::QUEUE_DEPTH).set(rx.len() as f64);
            let span = tracing::info_span!("batch", messages = batch.len(), queued = rx.len());
            self.process(batch, &mut deliveries).instrument(span).await;
            while deliveries.try_join_next().is_some() {}
        }
        while deliveries.join_next().await.is_some() {}
        self.stats.points = self.store.counters.upserted_points.load(Ordering::Relaxed);
        (self.stats, self.failure)
    }

    fn decide(&self, msg: &InboundMessage) -> Decided {
        let Some(payload) = &msg.payload else {
            return match &msg.key {
                Some(_) => Decided::Tombstone,
                None => Decided::Rejected(Rejection {
                    class: "validation",
                    message: "tombstone (null value) without a key: no conversation to delete".into(),
                }),
            };
        };
        let conv = match self.input_codec.decode(payload) {
            Ok(c) => c,
            Err(e) => return Decided::Rejected(Rejection { class: e.class(), message: e.to_string() }),
        };
        let checked = conv.validate(self.max_turn_bytes).and_then(|()| match &msg.key {
            Some(key) if key.as_slice() != conv.conversation_id.as_bytes() => {
                Err(crate::event::ValidationError::KeyMismatch {
                    key: String::from_utf8_lossy(key).into_owned(),
                    conversation_id: conv.conversation_id.clone(),
                })
            }
            _ => Ok(()),
        });
        match checked {
            Ok(()) => Decided::Valid(conv),
            Err(e) => Decided::Rejected(Rejection { class: "validation", message: e.to_string() }),
        }
    }

    async fn process(&mut self, batch: Vec<InboundMessage>, deliveries: &mut JoinSet<()>) {
        let batch: Vec<InboundMessage> =
            batch.into_iter().filter(|m| self.shared.is_current(&m.tp, m.generation)).collect();
        if batch.is_empty() {
            return;
        }
        metrics::counter!(telemetry::MESSAGES).increment(batch.len() as u64);
        metrics::histogram!(telemetry::BATCH_MESSAGES).record(batch.len() as f64);
        let mut decided: Vec<Decided> = batch.iter().map(|m| self.decide(m)).collect();
        let started = std::time::Instant::now();
        let enriched = self.enrich(&batch, &mut decided).await;
        let turns: usize = enriched.iter().map(|e| e.event.turns.len()).sum();
        let tokens: i64 = enriched.iter().map(|e| e.event.total_tokens).sum();
        if turns > 0 {
            metrics::histogram!(telemetry::ENRICH_SECONDS).record(started.elapsed().as_secs_f64());
            metrics::counter!(telemetry::TURNS).increment(turns as u64);
            metrics::counter!(telemetry::TOKENS).increment(tokens.max(0) as u64);
            metrics::histogram!(telemetry::BATCH_TURNS).record(turns as f64);
            metrics::histogram!(telemetry::BATCH_TOKENS).record(tokens as f64);
        }
        if let Err(e) = self.write_store(&batch, &decided, &enriched).await {
            self.readiness.store_reachable.store(false, Ordering::Relaxed);
            error!(error = %e, messages = batch.len(), "the vector store failed; stopping without completing this batch");
            self.failure = Some(anyhow::Error::new(e).context("writing to the vector store"));
            self.stop.store(true, Ordering::SeqCst);
            return;
        }

        // Enqueue in input order: the idempotent producer keeps that order per partition.
        let mut pending = Vec::with_capacity(batch.len());
        let mut enriched = enriched.into_iter();
        for (msg, decision) in batch.iter().zip(decided) {
            let record = match decision {
                Decided::Valid(_) => {
                    let event = enriched.next().expect("one enriched event per valid input").event;
                    match self.output_codec.encode(&event) {
                        Ok(bytes) => {
                            self.stats.enriched += 1;
                            (false, Some(event.conversation_id.into_bytes()), Some(bytes), None)
                        }
                        Err(e) => self.dead_letter(msg, Rejection { class: "encoding", message: e.to_string() }),
                    }
                }
                Decided::Tombstone => {
                    self.stats.tombstones += 1;
                    metrics::counter!(telemetry::TOMBSTONES).increment(1);
                    (false, msg.key.clone(), None, None)
                }
                Decided::Rejected(why) => self.dead_letter(msg, why),
            };
            let (to_dlq, key, payload, headers) = record;
            let topic = if to_dlq { self.dlq_topic.as_str() } else { self.output_topic.as_str() };
            let out = Outgoing { topic, key: key.as_deref(), payload: payload.as_deref(), headers };
            match self.producer.enqueue(out).await {
                Ok(delivery) => pending.push((msg.tp.clone(), msg.offset, msg.generation, msg.timestamp_ms, delivery)),
                // Not completed: the offset stays uncommitted and the message is re-read later.
                Err(e) => error!(error = %e, tp = %msg.tp, offset = msg.offset, "could not enqueue a record"),
            }
        }
        let shared = self.shared.clone();
        let producer = self.producer.clone();
        deliveries.spawn(async move {
            for (tp, offset, generation, event_ms, delivery) in pending {
                if await_delivery(&producer, delivery).await {
                    shared.complete(&tp, offset, generation);
                    if let Some(t0) = event_ms.filter(|t| *t > 0) {
                        let ms = chrono::Utc::now().timestamp_millis() - t0;
                        metrics::histogram!(telemetry::END_TO_END_SECONDS).record(ms.max(0) as f64 / 1000.0);
                    }
                }
            }
        });
    }

    /// Writes the batch to the vector store in input order: the points of each enriched
    /// conversation, and for a tombstone the deletion of that conversation's points (after the
    /// upserts before it, so a later re-creation is not deleted). Acknowledged on return.
    async fn write_store(
        &self,
        batch: &[InboundMessage],
        decided: &[Decided],
        enriched: &[Enriched],
    ) -> Result<(), StoreError> {
        let mut points = Vec::new();
        let mut events = enriched.iter();
        for (msg, decision) in batch.iter().zip(decided) {
            match decision {
                Decided::Valid(conv) => {
                    let e = events.next().expect("one enriched event per valid input");
                    points.extend(points_for(conv, &e.event, e.dense.as_deref(), self.payload_text));
                }
                Decided::Tombstone => {
                    let key = msg.key.as_deref().expect("tombstones have keys");
                    self.store.upsert_all(&points).await?;
                    points.clear();
                    self.store.delete_conversation(&String::from_utf8_lossy(key)).await?;
                }
                Decided::Rejected(_) => {}
            }
        }
        self.store.upsert_all(&points).await
    }

    /// The DLQ record of a rejected message: (to the DLQ, key, value, headers).
    fn dead_letter(&mut self, msg: &InboundMessage, why: Rejection) -> (bool, Option<Vec<u8>>, Option<Vec<u8>>, Option<OwnedHeaders>) {
        warn!(tp = %msg.tp, offset = msg.offset, class = why.class, reason = %why.message, "dead-lettering a message");
        self.stats.dead_lettered += 1;
        metrics::counter!(telemetry::DLQ, "class" => why.class).increment(1);
        let headers = dlq::headers(msg, &why, &self.group_id);
        (true, msg.key.clone(), msg.payload.clone(), Some(headers))
    }

    /// Enriches the valid conversations of a batch on a blocking thread. A batch failure is
    /// retried message by message, so one bad conversation only dead-letters itself.
    async fn enrich(&self, batch: &[InboundMessage], decided: &mut [Decided]) -> Vec<Enriched> {
        let jobs: Vec<(usize, Conversation, SourceRef)> = decided
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match d {
                Decided::Valid(c) => Some((i, c.clone(), source_ref(&batch[i]))),
                _ => None,
            })
            .collect();
        if jobs.is_empty() {
            return vec![];
        }
        let enricher = self.enricher.clone();
        let results = tokio::task::spawn_blocking(move || {
            let inputs: Vec<EnrichInput<'_>> =
                jobs.iter().map(|(_, c, s)| EnrichInput { conversation: c, source: s.clone() }).collect();
            match enricher.enrich_batch(&inputs) {
                Ok(all) => all.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(_) => inputs.iter().map(|i| enricher.enrich_batch(std::slice::from_ref(i)).map(|mut v| v.remove(0))).collect(),
            }
            .into_iter()
            .zip(jobs.iter().map(|(i, _, _)| *i))
            .collect::<Vec<_>>()
        })
        .await
        .expect("enrichment does not panic");
        let mut out = Vec::with_capacity(results.len());
        for (result, index) in results {
            match result {
                Ok(event) => out.push(event),
                Err(e) => decided[index] = Decided::Rejected(Rejection { class: "enrichment", message: format!("{e:#}") }),
            }
        }
        out
    }
}

fn source_ref(msg: &InboundMessage) -> SourceRef {
    SourceRef { topic: msg.tp.topic.to_string(), partition: msg.tp.partition, offset: msg.offset }
}

/// Waits for a record's delivery; on failure (after librdkafka's own retries) sends it again
/// with backoff, so nothing is dropped. False only when the producer is gone.
async fn await_delivery(producer: &EventProducer, mut delivery: rdkafka::producer::DeliveryFuture) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        match delivery.await {
            Ok(Ok(_)) => return true,
            Ok(Err((e, msg))) => {
                error!(error = %e, topic = msg.topic(), "delivery failed; sending again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                let headers = msg.headers().cloned();
                let out = Outgoing { topic: msg.topic(), key: msg.key(), payload: msg.payload(), headers };
                match producer.enqueue(out).await {
                    Ok(d) => delivery = d,
                    Err(e) => {
                        error!(error = %e, "re-enqueue failed");
                        return false;
                    }
                }
            }
            Err(_) => return false,
        }
    }
}

/// Input codec sanity for `check`: what the worker will accept.
pub fn describe_codecs(cfg: &CodecConfig) -> Result<String> {
    let input = input_codec(cfg)?;
    Ok(format!(
        "input {:?} (reader fingerprint {:016x}), output {:?}",
        input.format(),
        input.schemas().reader_fingerprint(),
        if cfg.output == WireFormat::Auto { WireFormat::Avro } else { cfg.output }
    ))
}
