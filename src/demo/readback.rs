//! Reads the demo's output and DLQ topics back until every input event has its result.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::codec::{RecordCodec, WireFormat};
use crate::config::KafkaConfig;
use crate::event::EnrichedConversation;


/// Partitions of the demo's input topic.
pub const PARTITIONS: i32 = 6;

/// Why the wait for the enriched events ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every input is accounted for (enriched or dead-lettered).
    Complete,
    /// Nothing new arrived for the stall timeout.
    Stalled,
    /// The worker returned (an error, or an interruption).
    WorkerStopped,
}

/// Reads the output and dead-letter topics from the beginning as the worker writes them.
pub struct Readback {
    consumer: BaseConsumer,
    codec: RecordCodec<EnrichedConversation>,
    output_topic: String,
    dlq_topic: String,
    /// Source (partition, offset) → (output record timestamp, event), first arrival.
    pub enriched: HashMap<(i32, i64), (i64, EnrichedConversation)>,
    /// (partition, offset) of the records in the dead-letter topic.
    pub dead_lettered: HashSet<(i32, i64)>,
    /// Records read from the output topic (replays included): the worker's `enriched` count.
    pub output_records: usize,
    pub last_progress: Option<Instant>,
}

impl Readback {
    pub fn new(cfg: &KafkaConfig) -> Result<Self> {
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
    pub fn done(&self) -> usize {
        self.enriched.len() + self.dead_lettered.len()
    }

    /// Reads what arrives within `wait`; true when an input was newly accounted for.
    pub fn poll(&mut self, wait: Duration) -> Result<bool> {
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
    pub fn wait(&mut self, expected: usize, stall: Duration, worker_ended: &AtomicBool, interrupted: &AtomicBool) -> Result<Ended> {
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
    pub fn drain(&mut self, bound: Duration) -> Result<()> {
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

use super::progress::Progress;
