//! Reading topics back from the beginning for reports (`demo`, `bench`): how many records a
//! topic holds, their record timestamps, and the enriched events of the output topic.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{self, admin};
use crate::codec::{RecordCodec, WireFormat};
use crate::config::KafkaConfig;
use crate::event::EnrichedConversation;

fn partitions(cfg: &KafkaConfig, topic: &str) -> Result<i32> {
    Ok(admin::partition_count(cfg, topic, Duration::from_secs(30))?.unwrap_or(0) as i32)
}

/// A consumer of `topic` that sees only what is written from now on (assigned at each
/// partition's high watermark, read now, so nothing written after this call is missed).
pub fn tail(cfg: &KafkaConfig, topic: &str) -> Result<BaseConsumer> {
    let c = unassigned(cfg, Some("10"))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions(cfg, topic)? {
        let (_, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

/// Polls a `tail` consumer of the (Avro) output topic until the enriched event of
/// `conversation_id` arrives: (output record timestamp, event), or None after `timeout`.
pub fn wait_for_event(
    consumer: &BaseConsumer,
    conversation_id: &str,
    timeout: Duration,
) -> Result<Option<(i64, EnrichedConversation)>> {
    let codec = RecordCodec::<EnrichedConversation>::new(WireFormat::Avro)?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(20)) {
            let m = m?;
            if m.key() == Some(conversation_id.as_bytes()) {
                if let Some(payload) = m.payload() {
                    return Ok(Some((m.timestamp().to_millis().unwrap_or_default(), codec.decode(payload)?)));
                }
            }
        }
    }
    Ok(None)
}

/// A consumer assigned every partition of `topic` from the beginning (no group membership,
/// nothing committed).
fn reader(cfg: &KafkaConfig, topic: &str) -> Result<BaseConsumer> {
    let c = unassigned(cfg, None)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions(cfg, topic)? {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

/// A consumer for reading back (no group membership, nothing committed), not assigned yet;
/// `fetch_wait_ms` shortens the broker's wait for data (the tail of a topic, for latency).
fn unassigned(cfg: &KafkaConfig, fetch_wait_ms: Option<&str>) -> Result<BaseConsumer> {
    let mut c = kafka::client(cfg);
    c.set("group.id", "convoflow-readback")
        .set("enable.auto.commit", "false")
        .set("fetch.message.max.bytes", cfg.message_max_bytes.to_string());
    if let Some(ms) = fetch_wait_ms {
        c.set("fetch.wait.max.ms", ms);
    }
    c.create()
}

/// Records retained in `topic` (high − low watermark, summed over partitions).
pub fn topic_size(cfg: &KafkaConfig, topic: &str) -> Result<usize> {
    let c: BaseConsumer = kafka::client(cfg).create()?;
    let mut n = 0;
    for p in 0..partitions(cfg, topic)? {
        let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        n += (high - low) as usize;
    }
    Ok(n)
}

/// (partition, offset) -> record timestamp (ms) of every record in `topic`.
pub fn timestamps(cfg: &KafkaConfig, topic: &str) -> Result<HashMap<(i32, i64), i64>> {
    let expected = topic_size(cfg, topic)?;
    let c = reader(cfg, topic)?;
    let mut out = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            out.insert((m.partition(), m.offset()), m.timestamp().to_millis().unwrap_or_default());
        }
    }
    Ok(out)
}

/// Reads the (Avro) enriched events of the output topic as they arrive, with a progress bar on
/// stderr, until `expected` distinct inputs are covered or `timeout`. Returns (output record
/// timestamp, event), the first arrival per input.
pub fn read_enriched(cfg: &KafkaConfig, expected: usize, timeout: Duration) -> Result<Vec<(i64, EnrichedConversation)>> {
    let codec = RecordCodec::<EnrichedConversation>::new(WireFormat::Avro)?;
    let c = reader(cfg, &cfg.output_topic)?;
    let mut by_source = HashMap::new();
    let deadline = Instant::now() + timeout;
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    while by_source.len() < expected && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            if let Some(payload) = m.payload() {
                let event = codec.decode(payload)?;
                let ts = m.timestamp().to_millis().unwrap_or_default();
                by_source.entry((event.source.partition, event.source.offset)).or_insert((ts, event));
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

/// The `p` quantile (0..=1) of ascending values; 0 when empty.
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() { 0 } else { sorted[((sorted.len() - 1) as f64 * p).round() as usize] }
}
