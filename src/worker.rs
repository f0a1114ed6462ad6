//! Wiring of `convoflow run`: Kafka source → decode → validate → enrich (micro-batches) →
//! vector store (acknowledged upserts; tombstones delete) → output topic / DLQ → offset
//! completion → commit (by the source thread). What goes to the DLQ and what stops the worker
//! (its unfinished offsets uncommitted) is in docs/reliability.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::codec::factory::output_codec;
use crate::config::{Config, Delivery};
use crate::kafka::admin;
use crate::kafka::producer::EventProducer;
use crate::kafka::transactions::Transactions;
use crate::pipeline::breaker::DlqBreaker;
use crate::pipeline::emit::{EmitSettings, Emitter, OutputEncoder};
use crate::pipeline::infer::Models;
use crate::pipeline::prepare::Preparer;
use crate::pipeline::store::StoreStage;
use crate::pipeline::Pipeline;
use crate::shutdown::{Halt, SOURCE_LEFT_BEHIND, ShutdownClock};
use crate::sink::store::writer::StoreWriter;
use crate::sink::store::{self, Bootstrap, VectorStore};
use crate::source::{self, SharedSource, SourceSettings};
use crate::telemetry::{self, Readiness};

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
    telemetry::start_worker_metrics_at_zero(&crate::fault::RejectClass::ALL.map(crate::fault::RejectClass::as_str));
    let kafka = &cfg.kafka;
    let partitions = admin::partition_count(kafka, &kafka.input_topic, Duration::from_secs(15))?
        .ok_or_else(|| anyhow!("input topic {} does not exist on {}", kafka.input_topic, kafka.brokers))?;
    let dlq_topic = kafka.dlq_topic();
    if kafka.create_topics {
        admin::ensure_topics(kafka, &[kafka.output_topic.clone(), dlq_topic.clone()], partitions).await?;
    }
    let spec = store::collection_spec(&cfg.qdrant, crate::query::dense_dim(&cfg)?);
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
    let shutdown = ShutdownClock::watch(stop.clone(), Duration::from_millis(cfg.pipeline.shutdown_timeout_ms));
    let models = models.map(Arc::new);
    let models_at_exit = models.clone();
    let pipeline = Pipeline {
        shutdown: shutdown.clone(),
        preparer: Arc::new(preparer),
        store: Arc::new(StoreStage {
            store: StoreWriter::new(store.clone(), cfg.qdrant.batch, cfg.qdrant.retry).for_worker(readiness.clone(), stop.clone()),
            payload_text: cfg.qdrant.payload_text,
            encoder: Arc::new(encoder),
            stop: stop.clone(),
            halt,
            model_infos: models.as_deref().map(Models::infos).unwrap_or_default(),
            models,
            readiness: readiness.clone(),
            shared: shared.clone(),
            transactions: transactions.clone(),
        }),
        emitter: Some(emitter),
    };
    let consumer = source::create_consumer(
        kafka,
        shared.clone(),
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
    let lag_monitor = source::lag::LagMonitor::start(kafka, shared.clone(), readiness.clone(), Duration::from_secs(2))?;
    let shared = shared.clone();
    let poll_thread = std::thread::Builder::new()
        .name("kafka-source".into())
        .spawn(move || source::run_poll_loop(consumer, shared, tx, settings, stop))
        .context("starting the source thread")?;
    info!(input = %kafka.input_topic, output = %kafka.output_topic, group = %kafka.group_id, "worker started");

    let (stats, failure) = pipeline.run(rx, &cfg.pipeline).await;
    // what the model threads still compute nobody waits for: stopped at their next layer
    if let Some(m) = &models_at_exit {
        m.cancel();
    }
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
    let producer = transactions.as_ref().map(|t| t.current()).unwrap_or(producer);
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


/// Room left under a topic's `max.message.bytes` for the record batch's own framing (the broker
/// compares whole batches with it; librdkafka checks records without it).
const BATCH_FRAMING: u32 = 512;
/// Bound on each transactional call of the poll thread (send offsets, commit, abort; a commit
/// flushes first, with the same bound): short, so the thread keeps polling (liveness) while the
/// coordinator is away; a call that times out is resumed at the next commit interval.
const TRANSACTION_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on `init_transactions` at start (it fences and aborts a predecessor's transaction).
const TRANSACTION_INIT_TIMEOUT: Duration = Duration::from_secs(30);











