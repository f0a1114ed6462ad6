//! Consumer lag of the group on every partition of the input topic: the partition's high
//! watermark minus the group's committed offset, refreshed every few seconds on a thread of its
//! own. It asks the broker through a separate, never-subscribed consumer of the same group (a
//! subscribed consumer's `committed()` can hang at close with rdkafka 0.39), so lag keeps rising
//! while the worker's partitions are paused. Every partition is reported whoever holds it — or
//! nobody, during a rebalance or a broker outage — so the gauge never shows a backlog as 0;
//! several workers report the same values (aggregate with `max`, not `sum`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::debug;

use crate::telemetry::{ASSIGNED_PARTITIONS, COMMITTED_OFFSET, IN_FLIGHT, LAG, Readiness};
use crate::config::KafkaConfig;
use crate::kafka;
use crate::source::SharedSource;

pub struct LagMonitor {
    done: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl LagMonitor {
    pub fn start(
        cfg: &KafkaConfig,
        shared: Arc<SharedSource>,
        readiness: Arc<Readiness>,
        interval: Duration,
    ) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = kafka::client(cfg)
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .create()?;
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let topic = cfg.input_topic.clone();
        let handle = std::thread::Builder::new().name("lag-monitor".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let (assigned, in_flight) = {
                    let state = shared.lock();
                    let assigned: BTreeSet<(String, i32)> =
                        state.tracker.assigned().map(|tp| (tp.topic.to_string(), tp.partition)).collect();
                    (assigned, state.tracker.in_flight())
                };
                metrics::gauge!(IN_FLIGHT).set(in_flight as f64);
                metrics::gauge!(ASSIGNED_PARTITIONS).set(assigned.len() as f64);
                readiness.partitions_assigned.store(!assigned.is_empty(), Ordering::Relaxed);
                if let Err(e) = refresh(&consumer, &topic) {
                    debug!(error = %e, "lag refresh failed; trying again");
                }
                // sleep in small steps so the monitor stops promptly
                let mut slept = Duration::ZERO;
                while slept < interval && !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    slept += Duration::from_millis(100);
                }
            }
        })?;
        Ok(Self { done, handle: Some(handle) })
    }
}

fn refresh(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<()> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic && t.error().is_none()) {
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(5))?;
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(5))?;
        let position = match e.offset() {
            Offset::Offset(o) => o,
            _ => low, // nothing committed yet: everything retained is pending
        };
        let (topic, partition) = (e.topic().to_string(), e.partition().to_string());
        metrics::gauge!(LAG, "topic" => topic.clone(), "partition" => partition.clone()).set((high - position).max(0) as f64);
        metrics::gauge!(COMMITTED_OFFSET, "topic" => topic, "partition" => partition).set(position as f64);
    }
    Ok(())
}

impl Drop for LagMonitor {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        // not joined while it waits on the cluster (up to 5 s per request with the broker
        // away): a stopping worker exits on time; the thread ends by itself or with the process
        if let Some(h) = self.handle.take()
            && h.is_finished()
        {
            let _ = h.join();
        }
    }
}
