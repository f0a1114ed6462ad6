//! The idempotent Kafka producer shared by the output topic and the DLQ.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::error::KafkaError;

use crate::config::KafkaConfig;
use crate::kafka;

#[derive(Clone)]
pub struct EventProducer {
    producer: FutureProducer,
}

/// What a sent record is, for delivery handling.
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    /// None = tombstone.
    pub payload: Option<&'a [u8]>,
    pub headers: Option<OwnedHeaders>,
}

/// An upper bound of the size librdkafka compares with the producer's `message.max.bytes`
/// when a record is enqueued (`rd_kafka_msg_max_wire_size`: the v2 record's fixed overhead of
/// at most 36 bytes, key, value and serialized headers, each header at most 10 bytes of
/// varints around its key and value). A record within it is never refused as too large.
pub fn record_wire_bytes(key: Option<&[u8]>, value: Option<&[u8]>, headers: Option<&OwnedHeaders>) -> usize {
    use rdkafka::message::Headers;
    const RECORD_OVERHEAD: usize = 36;
    const HEADER_OVERHEAD: usize = 10;
    let headers: usize = headers.map_or(0, |h| {
        h.iter().map(|h| HEADER_OVERHEAD + h.key.len() + h.value.map_or(0, <[u8]>::len)).sum()
    });
    RECORD_OVERHEAD + key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + headers
}

impl EventProducer {
    /// A producer for `cfg` whose records are at most `message_max_bytes` (and batches too).
    pub fn new(cfg: &KafkaConfig, message_max_bytes: u32) -> Result<Self> {
        Self::create(cfg, message_max_bytes, None)
    }

    /// The worker's transactional producer (`kafka.delivery: exactly_once`), its transactions
    /// initialised: a previous producer with the same `transactional.id` (this instance before a
    /// restart) is fenced and its open transaction aborted.
    pub fn transactional(cfg: &KafkaConfig, message_max_bytes: u32, init_timeout: Duration) -> Result<Self> {
        let id = cfg.transactional_id();
        let this = Self::transactional_uninitialised(cfg, message_max_bytes)?;
        this.init_transactions(init_timeout)
            .with_context(|| format!("initialising transactions for transactional.id {id:?} (is the broker reachable?)"))?;
        tracing::info!(transactional_id = %id, "transactional producer ready (exactly-once output)");
        Ok(this)
    }

    /// A transactional producer with this worker's `transactional.id` whose transactions are
    /// not initialised yet (`init_transactions` contacts the coordinator; nothing else does).
    pub fn transactional_uninitialised(cfg: &KafkaConfig, message_max_bytes: u32) -> Result<Self> {
        Self::create(cfg, message_max_bytes, Some(&cfg.transactional_id()))
    }

    /// `init_transactions`: fences every earlier producer with the same `transactional.id` and
    /// aborts its open transaction. A timeout may be retried.
    pub fn init_transactions(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.init_transactions(timeout)
    }

    /// Drops every record still queued or in flight: their deliveries fail with `PurgeQueue` /
    /// `PurgeInflight` (the producer is being replaced).
    pub fn purge_all(&self) {
        self.producer.purge(PurgeConfig::default().queue().inflight().non_blocking());
    }

    /// The fatal error librdkafka raised on this producer, if any (it can do nothing more).
    pub fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.producer.client().fatal_error()
    }

    /// The underlying producer, borrowed (transactional calls).
    pub fn inner(&self) -> &FutureProducer {
        &self.producer
    }

    fn create(cfg: &KafkaConfig, message_max_bytes: u32, transactional_id: Option<&str>) -> Result<Self> {
        let mut c = kafka::client(cfg);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", &cfg.compression)
            .set("message.max.bytes", message_max_bytes.to_string())
            .set("batch.size", message_max_bytes.min(1_000_000).to_string())
            // librdkafka retries each delivery itself until this passes, in order per partition
            .set("delivery.timeout.ms", cfg.delivery_timeout_ms.to_string());
        if let Some(id) = transactional_id {
            // librdkafka requires delivery.timeout.ms <= transaction.timeout.ms
            c.set("transactional.id", id)
                .set("transaction.timeout.ms", cfg.transaction_timeout_ms.to_string())
                .set("delivery.timeout.ms", cfg.delivery_timeout_ms.min(cfg.transaction_timeout_ms).to_string());
        }
        let producer: FutureProducer =
            c.create().context("creating the Kafka producer")?;
        Ok(Self { producer })
    }

    /// Enqueues a record. Records enqueued one after another keep that order per partition
    /// (idempotent producer), so callers enqueue in input order. Waits while the local queue
    /// is full instead of reordering.
    pub async fn enqueue(&self, out: Outgoing<'_>) -> Result<DeliveryFuture, KafkaError> {
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(out.topic);
            if let Some(key) = out.key {
                record = record.key(key);
            }
            if let Some(payload) = out.payload {
                record = record.payload(payload);
            }
            if let Some(headers) = &out.headers {
                record = record.headers(headers.clone());
            }
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(timeout).context("flushing the producer")
    }
}
