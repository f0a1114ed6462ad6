//! The emit stage: shows a stored batch to the dead-letter breaker, enqueues one record per
//! message in input order on the idempotent producer (enriched event — encoded by the store
//! stage through [`OutputEncoder`] before its points were written —, forwarded tombstone or DLQ
//! copy) and hands the deliveries to a task that completes the offsets.
//!
//! Delivery retries are librdkafka's own (`enable.idempotence`, `kafka.delivery_timeout_ms`),
//! so per-key order holds; nothing is re-enqueued by hand. The producer's `message.max.bytes`
//! is the smallest of `kafka.message_max_bytes` and the output and DLQ topics' own limits (read
//! at start), so a record too large is refused at enqueue, alone — not by the broker together
//! with the rest of its batch. An enriched event over it is found before its points are stored
//! (the encoder's bound is above librdkafka's own count) and dead-lettered as `output-too-large`.
//! The input's own headers are carried up to `pipeline.max_carried_header_bytes`. A DLQ copy
//! too large is replaced by one whose value keeps its first half-limit bytes
//! (`dlq.value.truncated` holds the original length), and if that is still too large, by one
//! without the input's headers and with key and value cut to a quarter of the limit each
//! (`dlq.headers.dropped`, `dlq.key.truncated`): nothing makes a record impossible to
//! dead-letter. Any
//! other failure to produce — a delivery that timed out after librdkafka's retries, a fatal
//! producer error, a broker refusing a batch the limits should have kept small (a topic's limit
//! lowered while the worker runs) — is the machine's, not the data's: the worker stops, the
//! message stays uncommitted, and the restarted worker reads the limits again.
//!
//! With `kafka.delivery: exactly_once` the producer is transactional: the stage holds the open
//! transaction while it enqueues a batch and notes each message's offset in it; the source's
//! poll thread commits it (see `kafka::transactions`). A delivery purged by an abort is not a
//! failure: its message is read again.

use std::sync::Arc;

use anyhow::anyhow;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::DeliveryFuture;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{error, warn};

use crate::codec::RecordCodec;
use crate::event::EnrichedConversation;
use crate::pipeline::breaker::DlqBreaker;
use super::message::{Decided, Message};
use crate::shutdown::Halt;
use crate::pipeline::stage::{Busy, Flight, STAGE_EMIT, count_stale, keep_current, record_depth};
use crate::fault::{Fault, RejectClass, Rejection};
use crate::sink::dlq;
use crate::sink::headers::{self, header_bytes};
use crate::kafka::producer::{EventProducer, Outgoing, record_wire_bytes};
use crate::kafka::transactions::{BeginError, Transactions};
use crate::source::{InboundMessage, SharedSource};
use crate::telemetry;
use crate::telemetry::events::{DeadLettered, InternalEvent};

/// A valid conversation whose points the store acknowledged: its enriched event, encoded.
pub struct Written {
    pub event: EnrichedConversation,
    pub output: EncodedOutput,
}

/// The enriched event as it will be produced, encoded by the store stage before it writes the
/// event's points: an event that cannot be produced (too large, unencodable) is dead-lettered
/// before anything of it is stored, so the store and the output topic agree.
pub struct EncodedOutput {
    pub value: Vec<u8>,
    /// The input's headers as carried (bounded by `pipeline.max_carried_header_bytes`).
    pub headers: Option<OwnedHeaders>,
}

/// A batch whose points the store acknowledged, for the emit stage.
pub struct Stored {
    pub batch: Vec<Message<Written>>,
}

/// What the emit stage produced, for the worker's final log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmitStats {
    pub enriched: u64,
    pub dead_lettered: u64,
    pub tombstones: u64,
}

impl EmitStats {
    /// One count per record enqueued, by what it finally is (a too-large enriched event that
    /// became a DLQ copy counts once, as dead-lettered).
    fn count(&mut self, record: &Record) {
        match (record.destination, &record.value) {
            (Destination::DeadLetter, _) => self.dead_lettered += 1,
            (Destination::Output, None) => self.tombstones += 1,
            (Destination::Output, Some(_)) => self.enriched += 1,
        }
    }
}

/// The topic a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    Output,
    DeadLetter,
}

/// One record to produce for an input message.
struct Record {
    destination: Destination,
    key: Option<Vec<u8>>,
    /// None = tombstone.
    value: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
    /// A DLQ copy: why, and how far it was cut down already.
    dead_letter: Option<DeadLetter>,
}

/// What a DLQ record is for.
struct DeadLetter {
    why: Rejection,
    shrunk: Shrunk,
}

/// How far a DLQ copy too large to produce was cut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shrunk {
    /// As it was read.
    No,
    /// Its value cut to half the limit.
    Value,
    /// Without the input's headers, key and value cut to a quarter of the limit each.
    Bare,
}

/// A record on its way, with the message it completes.
struct Delivery {
    msg: InboundMessage,
    future: DeliveryFuture,
    /// Exactly-once: the epoch of the transactional producer it was enqueued on.
    epoch: Option<u64>,
}

/// A produce error that no retry fixes and that is the record's own: it is too large.
fn too_large(e: &KafkaError) -> bool {
    matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge))
}

/// The producer side, shared by the emit stage and its delivery tasks.
struct Sink {
    producer: EventProducer,
    output_topic: String,
    dlq_topic: String,
    group_id: String,
    /// The producer's `message.max.bytes` (`kafka.message_max_bytes`).
    message_max_bytes: usize,
    /// `pipeline.max_carried_header_bytes`.
    max_carried_header_bytes: usize,
    shared: Arc<SharedSource>,
    halt: Arc<Halt>,
    /// Exactly-once: the transactions the records go in.
    txn: Option<Arc<Transactions>>,
}

pub struct Emitter {
    breaker: DlqBreaker,
    sink: Arc<Sink>,
    /// What was enqueued, one count per outcome.
    stats: EmitStats,
}

/// What the emit stage needs from the worker's configuration.
pub struct EmitSettings {
    pub output_topic: String,
    pub dlq_topic: String,
    pub group_id: String,
    pub message_max_bytes: usize,
    pub max_carried_header_bytes: usize,
    /// Exactly-once: the producer's transactions (None: at-least-once).
    pub transactions: Option<Arc<Transactions>>,
}

impl Emitter {
    pub fn new(producer: EventProducer, settings: EmitSettings, breaker: DlqBreaker, shared: Arc<SharedSource>, halt: Arc<Halt>) -> Self {
        let EmitSettings { output_topic, dlq_topic, group_id, message_max_bytes, max_carried_header_bytes, transactions } = settings;
        let sink = Sink {
            producer,
            output_topic,
            dlq_topic,
            group_id,
            message_max_bytes,
            max_carried_header_bytes,
            shared,
            halt,
            txn: transactions,
        };
        Self { breaker, sink: Arc::new(sink), stats: EmitStats::default() }
    }

    /// Emits each stored batch; ends when the store stage is done. Once the source has stopped
    /// for good, nothing more is emitted and deliveries still pending are not waited for (their
    /// offsets cannot be committed any more).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Stored>, flight: Arc<Flight>) -> EmitStats {
        let mut deliveries = JoinSet::new();
        loop {
            let stored = tokio::select! {
                stored = rx.recv() => stored,
                _ = flight.abandoned() => None,
            };
            let Some(stored) = stored else { break };
            record_depth(STAGE_EMIT, rx.len());
            tokio::select! {
                _ = self.emit(stored.batch, &mut deliveries) => {}
                // the producer's queue may be full with the broker away: give up on the batch
                _ = flight.abandoned() => {}
            }
            flight.ended();
            while deliveries.try_join_next().is_some() {}
        }
        if flight.is_abandoned() {
            deliveries.abort_all();
        }
        while deliveries.join_next().await.is_some() {}
        self.stats
    }

    async fn emit(&mut self, batch: Vec<Message<Written>>, deliveries: &mut JoinSet<()>) {
        let _busy = Busy::start(STAGE_EMIT);
        let sink = self.sink.clone();
        // a partition that moved while the batch was stored: its new owner re-reads and emits
        // these messages; emitting them here too would duplicate them
        let batch = keep_current(&sink.shared, STAGE_EMIT, batch, |p| &p.msg);
        if batch.is_empty() || sink.halt.is_tripped() {
            return; // after a failure: nothing more is emitted or completed
        }
        // the dead-letter breaker sees the batch before anything of it is produced
        let outcomes =
            batch.iter().filter(|p| !p.decided.is_unfinished()).map(|p| p.decided.rejection().is_some());
        if let Err(why) = self.breaker.record(outcomes) {
            sink.halt.trip(anyhow!(why));
            return;
        }
        // exactly-once: the batch goes in the open transaction, whole (a commit waits for it)
        let mut txn = match &sink.txn {
            Some(t) => {
                let mut txn = t.lock().await;
                match txn.begin() {
                    Ok(()) => Some(txn),
                    Err(BeginError::Broken(reason)) => {
                        // the poll thread replaces the producer and rewinds: this batch is read again
                        warn!(%reason, "the transactional producer failed; the batch is left uncompleted");
                        return;
                    }
                    Err(BeginError::Stop(e)) => {
                        sink.halt.trip(anyhow!(e));
                        return;
                    }
                }
            }
            None => None,
        };
        // exactly-once: the transaction's producer (replaced only while nothing holds the
        // transaction), otherwise the worker's
        let (producer, epoch) = match &txn {
            Some(t) => {
                let (producer, epoch) = t.producer();
                (producer, Some(epoch))
            }
            None => (sink.producer.clone(), None),
        };
        let mut pending = Vec::with_capacity(batch.len());
        for Message { msg, decided } in batch {
            // checked again before each record: the partition may have moved meanwhile
            if !sink.shared.is_current(&msg.tp, msg.generation) {
                count_stale(STAGE_EMIT, 1);
                continue;
            }
            let record = match decided {
                Decided::Valid(w) => {
                    let Written { event, output: EncodedOutput { value, headers } } = *w;
                    Record {
                        destination: Destination::Output,
                        key: Some(event.conversation_id.into_bytes()),
                        value: Some(value),
                        headers,
                        dead_letter: None,
                    }
                }
                Decided::Tombstone(t) => {
                    let matched = if t.matched == Some(0) { "none" } else { "some" };
                    metrics::counter!(telemetry::TOMBSTONES, "matched" => matched).increment(1);
                    Record {
                        destination: Destination::Output,
                        key: msg.key.clone(),
                        value: None,
                        headers: headers::carry(&msg.headers, sink.max_carried_header_bytes).into_headers(),
                        dead_letter: None,
                    }
                }
                Decided::Failed(Fault::Data(why)) => sink.dead_letter(&msg, why),
                Decided::Failed(Fault::Machine(e)) => {
                    // not completed: the offset stays uncommitted and the message is re-read
                    let reason = format!("{e:#}");
                    error!(tp = %msg.tp, offset = msg.offset, reason, "a message was left unfinished");
                    if txn.is_some() {
                        // a transaction cannot skip a message: its successors' offsets would
                        // commit it; stopping aborts the transaction
                        sink.halt.trip(anyhow!("a message was left unfinished: {reason}"));
                        break;
                    }
                    continue;
                }
            };
            let Some((future, enqueued)) = sink.enqueue(&producer, &msg, record).await else {
                // the worker stops, or (exactly-once) the failed producer is replaced and its
                // transaction aborted; this message and the rest stay uncommitted
                break;
            };
            self.stats.count(&enqueued);
            if let Some(txn) = txn.as_mut() {
                txn.add(&msg.tp, msg.offset);
            }
            pending.push(Delivery { msg, future, epoch });
        }
        drop(txn);
        deliveries.spawn(async move {
            for Delivery { msg, future, epoch } in pending {
                if !sink.deliver(&msg, future, epoch).await {
                    return;
                }
                sink.shared.complete(&msg.tp, msg.offset, msg.generation);
                if let Some(t0) = msg.timestamp_ms.filter(|t| *t > 0) {
                    let ms = chrono::Utc::now().timestamp_millis() - t0;
                    metrics::histogram!(telemetry::END_TO_END_SECONDS).record(ms.max(0) as f64 / 1000.0);
                }
            }
        });
    }
}

impl Sink {
    fn topic(&self, destination: Destination) -> &str {
        match destination {
            Destination::Output => &self.output_topic,
            Destination::DeadLetter => &self.dlq_topic,
        }
    }

    /// The DLQ record of a rejected message: its key and value unchanged, headers saying why.
    fn dead_letter(&self, msg: &InboundMessage, why: Rejection) -> Record {
        DeadLettered { tp: &msg.tp, offset: msg.offset, class: why.class.as_str(), reason: &why.message }.emit();
        let carried = headers::carry(&msg.headers, self.max_carried_header_bytes).headers;
        Record {
            destination: Destination::DeadLetter,
            key: msg.key.clone(),
            value: msg.payload.clone(),
            headers: Some(dlq::headers(msg, &why, &self.group_id, carried)),
            dead_letter: Some(DeadLetter { why, shrunk: Shrunk::No }),
        }
    }

    /// What replaces `record`, refused as too large (`e`): None when nothing can.
    fn fallback(&self, msg: &InboundMessage, record: Record, e: &KafkaError) -> Option<Record> {
        let limit = self.message_max_bytes;
        match record.dead_letter {
            None => {
                // the input was fine, its result is not deliverable (the store stage's bound
                // finds such events before their points are written; this is the safety net)
                let bytes = record.value.as_ref().map_or(0, Vec::len);
                let message = format!(
                    "the enriched event is {bytes} bytes, over the producer's limit of {limit} bytes for {} \
                     (kafka.message_max_bytes and the topics' max.message.bytes): {e}",
                    self.output_topic
                );
                Some(self.dead_letter(msg, Rejection::new(RejectClass::OutputTooLarge, message)))
            }
            // a DLQ copy too large itself keeps the start of the value and says so
            Some(DeadLetter { why, shrunk: Shrunk::No }) => {
                let original = msg.payload.as_ref().map_or(0, Vec::len);
                let keep = original.min(limit / 2);
                warn!(tp = %msg.tp, offset = msg.offset, original, keep, "the DLQ copy is too large: its value is truncated");
                let mut headers = record.headers.unwrap_or_default();
                if keep < original {
                    headers = headers.insert(Header { key: dlq::VALUE_TRUNCATED, value: Some(original.to_string().as_str()) });
                }
                Some(Record {
                    value: msg.payload.as_ref().map(|p| p[..keep].to_vec()),
                    headers: Some(headers),
                    dead_letter: Some(DeadLetter { why, shrunk: Shrunk::Value }),
                    ..record
                })
            }
            // still too large: the input's own headers (or its key) are the bulk; they go, and
            // the copy says so
            Some(DeadLetter { why, shrunk: Shrunk::Value }) => {
                let dropped = msg.headers.len();
                let dropped_bytes: usize = msg.headers.iter().map(header_bytes).sum();
                warn!(tp = %msg.tp, offset = msg.offset, dropped, dropped_bytes, "the DLQ copy is still too large: it goes without the input's headers");
                let mut h = dlq::headers(msg, &why, &self.group_id, OwnedHeaders::new());
                if dropped > 0 {
                    let note = format!("{dropped} headers, {dropped_bytes} bytes");
                    h = h.insert(Header { key: dlq::HEADERS_DROPPED, value: Some(note.as_str()) });
                }
                let (key, key_cut) = cut(msg.key.as_deref(), limit / 4);
                let (value, value_cut) = cut(msg.payload.as_deref(), limit / 4);
                if let Some(original) = key_cut {
                    h = h.insert(Header { key: dlq::KEY_TRUNCATED, value: Some(original.to_string().as_str()) });
                }
                if let Some(original) = value_cut {
                    h = h.insert(Header { key: dlq::VALUE_TRUNCATED, value: Some(original.to_string().as_str()) });
                }
                Some(Record { key, value, headers: Some(h), dead_letter: Some(DeadLetter { why, shrunk: Shrunk::Bare }), ..record })
            }
            Some(DeadLetter { shrunk: Shrunk::Bare, .. }) => None,
        }
    }

    /// Enqueues `record`; one refused as too large is replaced by its fallback. None when
    /// nothing could be enqueued: the worker stops (a fault of the producer, not of the data),
    /// or, exactly-once, the failed producer is replaced at the next commit.
    /// The record as enqueued comes back with its future (it may be the fallback).
    async fn enqueue(&self, producer: &EventProducer, msg: &InboundMessage, mut record: Record) -> Option<(DeliveryFuture, Record)> {
        loop {
            let out = Outgoing {
                topic: self.topic(record.destination),
                key: record.key.as_deref(),
                payload: record.value.as_deref(),
                headers: record.headers.clone(),
            };
            match producer.enqueue(out).await {
                Ok(future) => return Some((future, record)),
                Err(e) if too_large(&e) => {
                    let topic = self.topic(record.destination).to_string();
                    match self.fallback(msg, record, &e) {
                        Some(next) => record = next,
                        None => {
                            self.halt.trip(anyhow!(
                                "even the cut-down DLQ copy of {}@{} (no input headers, key and value within a quarter of \
                                 the limit each) is too large for {topic}: {e}",
                                msg.tp,
                                msg.offset
                            ));
                            return None;
                        }
                    }
                }
                // exactly-once: librdkafka failed the producer for good; the poll thread's next
                // commit replaces it and aborts the transaction (or stops the worker if fenced)
                Err(e) if self.txn.is_some() && producer.fatal_error().is_some() => {
                    warn!(error = %e, "the transactional producer failed; the rest of the batch is left uncompleted");
                    return None;
                }
                Err(e) => {
                    self.halt.trip(anyhow!("producing to {} failed: {e}", self.topic(record.destination)));
                    return None;
                }
            }
        }
    }

    /// Waits for a record's delivery; librdkafka retries on its own until
    /// `kafka.delivery_timeout_ms`. False when the message cannot be completed: the producer is
    /// gone, or the delivery failed for good and the worker stops.
    async fn deliver(&self, msg: &InboundMessage, future: DeliveryFuture, epoch: Option<u64>) -> bool {
        match future.await {
            Ok(Ok(_)) => true,
            // exactly-once: an aborted transaction purged it; the message is read again
            Ok(Err((e, _))) if matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)) => false,
            // exactly-once: its producer failed for good or was replaced, its transaction is
            // aborted (the poll thread rewinds, or stops the worker): not the record's fault
            Ok(Err(_)) if matches!((&self.txn, epoch), (Some(t), Some(epoch)) if t.superseded(epoch)) => false,
            Ok(Err((e, refused))) => {
                let hint = if too_large(&e) {
                    " (the broker refused a batch as too large: has a topic's max.message.bytes been lowered since the \
                     worker started? A restarted worker reads it again)"
                } else {
                    ""
                };
                self.halt.trip(anyhow!(
                    "delivering the record of {}@{} to {} failed for good, after librdkafka's retries within \
                     kafka.delivery_timeout_ms: {e}{hint}",
                    msg.tp,
                    msg.offset,
                    refused.topic()
                ));
                false
            }
            Err(_) => false, // the producer is gone
        }
    }
}

/// `bytes` cut to at most `max`, and the original length when it was cut.
fn cut(bytes: Option<&[u8]>, max: usize) -> (Option<Vec<u8>>, Option<usize>) {
    match bytes {
        Some(b) if b.len() > max => (Some(b[..max].to_vec()), Some(b.len())),
        other => (other.map(<[u8]>::to_vec), None),
    }
}

/// Encodes the enriched events for the output topic and finds those that cannot be produced,
/// for the store stage, before it writes their points (an event dead-lettered after its points
/// were stored would leave them searchable while no enriched event exists).
pub struct OutputEncoder {
    pub codec: RecordCodec<EnrichedConversation>,
    pub output_topic: String,
    /// The producer's `message.max.bytes`.
    pub message_max_bytes: usize,
    /// `pipeline.max_carried_header_bytes`.
    pub max_carried_header_bytes: usize,
}

impl OutputEncoder {
    /// The record of an enriched event, or why it cannot be produced: unencodable
    /// (`encoding`), or over the producer's limit (`output-too-large`, checked with an upper
    /// bound of librdkafka's own count, so what passes is never refused at enqueue).
    pub fn encode(&self, msg: &InboundMessage, event: &EnrichedConversation) -> Result<EncodedOutput, Rejection> {
        let value = self.codec.encode(event).map_err(|e| Rejection::new(RejectClass::Encoding, e.to_string()))?;
        let headers = headers::carry(&msg.headers, self.max_carried_header_bytes).into_headers();
        let bytes = record_wire_bytes(Some(event.conversation_id.as_bytes()), Some(&value), headers.as_ref());
        if bytes > self.message_max_bytes {
            let message = format!(
                "the enriched event is {} bytes ({bytes} with key and headers), over the producer's limit of {} bytes for {} \
                 (kafka.message_max_bytes and the topics' max.message.bytes); none of its points were stored",
                value.len(),
                self.message_max_bytes,
                self.output_topic
            );
            return Err(Rejection::new(RejectClass::OutputTooLarge, message));
        }
        Ok(EncodedOutput { value, headers })
    }
}
