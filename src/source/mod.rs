//! The Kafka source: one consumer-group member polled on its own OS thread.
//!
//! - `enable.auto.commit=false`, `enable.auto.offset.store=false`: offsets are committed only
//!   from the `OffsetTracker`, i.e. only over contiguous completed work.
//! - Backpressure: received messages go to a bounded queue; when it is full or too much is in
//!   flight, the assigned partitions are paused and the thread keeps polling (liveness,
//!   rebalances) until the work drains, then resumes.
//! - Rebalance: on revoke, the revoked partitions' not-yet-queued messages are dropped, queued
//!   and running work gets `rebalance_drain_ms` to finish, completed offsets are committed,
//!   and the rest is forgotten (its late completions are ignored; the next owner re-reads it).
//! - Shutdown: stop taking messages, wait (bounded) for in-flight work, commit, leave the group.
//! - `kafka.delivery: exactly_once`: "commit" means committing the producer's open transaction
//!   with its offsets (`kafka::transactions`), at the same three moments; an aborted transaction
//!   rewinds the consumer to the last committed offsets.

pub mod lag;
pub mod offsets;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::KafkaConfig;
use crate::kafka::{self, TopicPartition};
use offsets::{Generation, OffsetTracker};
use crate::shutdown::{Halt, ShutdownClock};
use crate::telemetry::events::{CommitFailed, Committed, InternalEvent, PartitionsAssigned, Rewound};
use crate::kafka::transactions::{Held, Outcome, Transactions};

/// How consumed offsets are committed.
#[derive(Clone)]
pub enum Committer {
    /// At-least-once: the consumer commits the offsets of completed (delivered) work.
    Offsets,
    /// Exactly-once: the offsets go in the producer's transaction with the outputs.
    Transactions { txn: Arc<Transactions>, halt: Arc<Halt> },
}

/// A message as read from Kafka, owned, with the assignment generation it belongs to.
#[derive(Debug, Clone)]
pub struct InboundMessage {
    pub tp: TopicPartition,
    pub offset: i64,
    pub generation: Generation,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
    /// The record's headers, in order (trace context and the like), carried onto its enriched
    /// event and its dead-letter record.
    pub headers: Vec<InboundHeader>,
}

/// One Kafka record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundHeader {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// The headers of a record as read.
fn headers_of<M: Message>(m: &M) -> Vec<InboundHeader> {
    use rdkafka::message::Headers;
    m.headers()
        .map(|h| h.iter().map(|h| InboundHeader { key: h.key.to_string(), value: h.value.map(<[u8]>::to_vec) }).collect())
        .unwrap_or_default()
}

/// State shared by the poll thread, the rebalance callbacks and the pipeline.
#[derive(Default)]
pub struct SourceState {
    pub tracker: OffsetTracker,
    /// Received and registered, not yet accepted by the queue (backpressure).
    backlog: VecDeque<InboundMessage>,
    /// Set by a rebalance: the assignment changed, so pause state must be re-applied.
    rebalanced: bool,
    /// Set at shutdown: the final revoke must not wait again for work already waited for.
    shutting_down: bool,
    /// Set once the source has stopped handing out messages for good: nothing the pipeline
    /// still holds can be completed any more.
    pub left: bool,
}

#[derive(Default)]
pub struct SharedSource(Mutex<SourceState>);

impl SharedSource {
    pub fn lock(&self) -> MutexGuard<'_, SourceState> {
        // A panic elsewhere must not wedge offset bookkeeping: the state stays consistent
        // because every mutation is a single call.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the pipeline when a message is written to every sink.
    pub fn complete(&self, tp: &TopicPartition, offset: i64, generation: Generation) -> bool {
        self.lock().tracker.complete(tp, offset, generation)
    }

    pub fn is_current(&self, tp: &TopicPartition, generation: Generation) -> bool {
        self.lock().tracker.is_current(tp, generation)
    }
}

pub struct SourceContext {
    shared: Arc<SharedSource>,
    rebalance_drain: Duration,
    committer: Committer,
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked: Vec<TopicPartition> =
                    tpl.elements().iter().map(|e| TopicPartition::new(e.topic(), e.partition())).collect();
                if let Committer::Transactions { txn, halt } = &self.committer {
                    // the open transaction holds outputs of these partitions: committed now with
                    // their offsets, or aborted (never committed later under another
                    // generation). A lost assignment is not waited for: another member may own
                    // it already. The partitions leave the tracker while the transaction is
                    // still held, so the emit stage cannot add their messages to the next one.
                    let lost = consumer.assignment_lost();
                    if lost {
                        self.drop_backlog_of(&revoked);
                    } else {
                        self.drain_revoked(&revoked);
                    }
                    let held = txn.hold(self.rebalance_drain);
                    match held {
                        Some(mut held) => {
                            let outcome = if lost {
                                held.abort("the assignment was lost (session timed out): another member may own the partitions")
                            } else {
                                held.commit(consumer.group_metadata().as_ref())
                            };
                            if lost {
                                settle(consumer, &self.shared, halt, outcome, false);
                            } else {
                                let why = "the partitions are revoked and the transaction could not commit";
                                settle_or_abort(consumer, &self.shared, halt, &mut held, outcome, why);
                            }
                            self.revoke_all(&revoked);
                        }
                        None => {
                            // the emit stage holds it: it must not commit with these partitions'
                            // offsets later; what it adds from now on is of current partitions
                            txn.doom();
                            self.revoke_all(&revoked);
                        }
                    }
                    info!(partitions = %tpl_names(tpl), "partitions revoked");
                    return;
                }
                self.drain_revoked(&revoked);
                let mut commit = TopicPartitionList::new();
                {
                    let mut state = self.shared.lock();
                    for tp in &revoked {
                        if let Some(next) = state.tracker.revoke(tp) {
                            let _ = commit.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next));
                        }
                    }
                    state.rebalanced = true;
                }
                if commit.count() > 0 {
                    match consumer.commit(&commit, CommitMode::Sync) {
                        Ok(()) => info!(offsets = ?tpl_offsets(&commit), "committed completed work of revoked partitions"),
                        Err(e) => warn!(error = %e, "commit on revoke failed; the next owner re-reads from the last commit"),
                    }
                }
                info!(partitions = %tpl_names(tpl), "partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut state = self.shared.lock();
            for e in tpl.elements() {
                state.tracker.assign(TopicPartition::new(e.topic(), e.partition()));
            }
            state.rebalanced = true;
            PartitionsAssigned { partitions: &tpl_names(tpl) }.emit();
        }
    }
}

impl SourceContext {
    /// Removes `revoked` partitions from the tracker: their work in flight becomes stale.
    fn revoke_all(&self, revoked: &[TopicPartition]) {
        let mut state = self.shared.lock();
        for tp in revoked {
            state.tracker.revoke(tp);
        }
        state.rebalanced = true;
    }

    /// Drops the backlogged (not yet queued) messages of `revoked` partitions.
    fn drop_backlog_of(&self, revoked: &[TopicPartition]) {
        let mut state = self.shared.lock();
        let SourceState { tracker, backlog, .. } = &mut *state;
        backlog.retain(|m| {
            let keep = !revoked.contains(&m.tp);
            if !keep {
                tracker.forget_from(&m.tp, m.offset);
            }
            keep
        });
    }

    /// Drop backlogged messages of revoked partitions, then wait (bounded) for their queued
    /// and running work to complete so it can be committed before the partitions move.
    fn drain_revoked(&self, revoked: &[TopicPartition]) {
        self.drop_backlog_of(revoked);
        if self.shared.lock().shutting_down {
            return;
        }
        let deadline = Instant::now() + self.rebalance_drain;
        while Instant::now() < deadline {
            if self.shared.lock().tracker.in_flight_of(revoked) == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        warn!("in-flight work of revoked partitions did not finish in time; it will be re-read by the next owner");
    }
}

fn tpl_names(tpl: &TopicPartitionList) -> String {
    tpl.elements().iter().map(|e| format!("{}[{}]", e.topic(), e.partition())).collect::<Vec<_>>().join(",")
}

fn tpl_offsets(tpl: &TopicPartitionList) -> Vec<(String, i32, i64)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition(), e.offset().to_raw().unwrap_or(-1)))
        .collect()
}

pub type SourceConsumer = BaseConsumer<SourceContext>;

pub fn create_consumer(cfg: &KafkaConfig, shared: Arc<SharedSource>, rebalance_drain: Duration, committer: Committer) -> Result<SourceConsumer> {
    let mut c = kafka::client(cfg);
    c.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &cfg.auto_offset_reset)
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set("max.poll.interval.ms", cfg.max_poll_interval_ms.to_string())
        .set("fetch.message.max.bytes", cfg.message_max_bytes.to_string());
    let consumer: SourceConsumer = c
        .create_with_context(SourceContext { shared, rebalance_drain, committer })
        
        .context("creating the Kafka consumer")?;
    consumer.subscribe(&[&cfg.input_topic]).context("subscribing to the input topic")?;
    Ok(consumer)
}

pub struct SourceSettings {
    pub max_in_flight: usize,
    pub commit_interval: Duration,
    pub committer: Committer,
    pub shutdown: ShutdownClock,
    /// Fed every turn of the poll loop (`/healthz`).
    pub liveness: Arc<crate::telemetry::liveness::Liveness>,
}

/// Polls until `stop` is set, then drains, commits and leaves the group. Runs on its own thread.
/// Dropping `tx` at the end tells the pipeline that no more messages come.
pub fn run_poll_loop(
    consumer: SourceConsumer,
    shared: Arc<SharedSource>,
    tx: mpsc::Sender<InboundMessage>,
    settings: SourceSettings,
    stop: Arc<AtomicBool>,
) {
    let mut paused = false;
    let mut last_commit = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let (want_pause, may_resume, rebalanced) = {
            let mut state = shared.lock();
            flush_backlog(&mut state, &tx);
            let rebalanced = std::mem::take(&mut state.rebalanced);
            let in_flight = state.tracker.in_flight();
            settings.liveness.poll_turn(in_flight, state.tracker.completed());
            (
                !state.backlog.is_empty() || in_flight >= settings.max_in_flight,
                state.backlog.is_empty() && in_flight <= settings.max_in_flight / 2,
                rebalanced,
            )
        };
        if rebalanced {
            // librdkafka keeps a partition's pause flag across revoke and assign (librdkafka
            // #1849): a partition paused before the rebalance would never be fetched again.
            // Resume the whole new assignment (as rust-arroyo does), then re-apply the pause
            // from the current backlog and in-flight work below.
            set_paused(&consumer, false);
            paused = false;
        }
        if want_pause && !paused {
            paused = set_paused(&consumer, true);
        } else if paused && may_resume {
            paused = !set_paused(&consumer, false);
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                let tp = TopicPartition::new(m.topic(), m.partition());
                let mut state = shared.lock();
                if let Some(generation) = state.tracker.register(&tp, m.offset()) {
                    state.backlog.push_back(InboundMessage {
                        tp,
                        offset: m.offset(),
                        generation,
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        timestamp_ms: m.timestamp().to_millis(),
                        headers: headers_of(&m),
                    });
                    flush_backlog(&mut state, &tx);
                } else {
                    debug!(%tp, offset = m.offset(), "dropped a message of a revoked partition or a re-delivery");
                }
            }
            Some(Err(e)) => warn!(error = %e, "consumer error"),
            None => {}
        }
        match &settings.committer {
            Committer::Offsets if last_commit.elapsed() >= settings.commit_interval => {
                commit(&consumer, &shared, CommitMode::Sync);
                last_commit = Instant::now();
            }
            Committer::Transactions { txn, halt }
                if last_commit.elapsed() >= settings.commit_interval
                    || (txn.full() && last_commit.elapsed() >= Duration::from_millis(50)) =>
            {
                // waits only briefly for the emit stage's batch: the loop must keep polling;
                // a rewind happens while the transaction is still held
                if let Some(mut held) = txn.hold(Duration::from_millis(200)) {
                    let outcome = held.commit(consumer.group_metadata().as_ref());
                    settle(&consumer, &shared, halt, outcome, true);
                }
                last_commit = Instant::now();
            }
            _ => {}
        }
    }
    shutdown(consumer, shared, tx, settings);
}

fn shutdown(consumer: SourceConsumer, shared: Arc<SharedSource>, tx: mpsc::Sender<InboundMessage>, settings: SourceSettings) {
    info!("shutting down: no new messages, draining in-flight work");
    set_paused(&consumer, true);
    {
        let mut state = shared.lock();
        state.shutting_down = true;
        let SourceState { tracker, backlog, .. } = &mut *state;
        for m in backlog.drain(..) {
            tracker.forget_from(&m.tp, m.offset);
        }
    }
    let deadline = Instant::now() + settings.shutdown.remaining(settings.shutdown.reserve());
    loop {
        let in_flight = shared.lock().tracker.in_flight();
        if in_flight == 0 {
            break;
        }
        if Instant::now() >= deadline {
            warn!(in_flight, "shutdown timeout: unfinished work stays uncommitted and will be re-read");
            break;
        }
        // keep serving the group protocol while waiting; paused partitions deliver nothing
        let _ = consumer.poll(Duration::from_millis(20));
    }
    // the pipeline stops here: what it has not completed by now cannot be committed by this
    // member any more, so it need not finish it (the worker's exit does not wait for it)
    drop(tx);
    shared.lock().left = true;
    // may block for seconds while the group coordinator is away; the worker waits for it only
    // until shortly before the shutdown deadline
    match &settings.committer {
        Committer::Offsets => commit(&consumer, &shared, CommitMode::Sync),
        Committer::Transactions { txn, halt } => {
            // the last one: committed, or aborted after a failure; then closed, so the emit
            // stage cannot begin another that nobody would end
            let wait = settings.shutdown.remaining(Duration::ZERO).max(Duration::from_millis(200));
            match txn.hold(wait) {
                Some(mut held) => {
                    let outcome = if halt.is_tripped() {
                        held.abort("the worker stops after a failure")
                    } else {
                        held.commit(consumer.group_metadata().as_ref())
                    };
                    settle_or_abort(&consumer, &shared, halt, &mut held, outcome, "the worker stops and the transaction could not commit");
                    held.close();
                }
                None => warn!("the emit stage still holds the transaction: left open, aborted when this instance restarts or after kafka.transaction_timeout_ms"),
            }
        }
    }
    consumer.unsubscribe();
    info!("left the consumer group");
}

fn flush_backlog(state: &mut SourceState, tx: &mpsc::Sender<InboundMessage>) {
    while let Some(m) = state.backlog.pop_front() {
        match tx.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                state.backlog.push_front(m);
                return;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                error!("pipeline stopped; messages stay uncommitted");
                state.backlog.clear();
                return;
            }
        }
    }
}

/// Pauses or resumes the whole assignment; returns whether it took effect.
fn set_paused(consumer: &SourceConsumer, pause: bool) -> bool {
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "reading the assignment failed");
            return false;
        }
    };
    if assignment.count() == 0 {
        return false;
    }
    let result = if pause { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
    match result {
        Ok(()) => {
            debug!(pause, partitions = %tpl_names(&assignment), "backpressure");
            metrics::gauge!(crate::telemetry::PAUSED).set(if pause { assignment.count() as f64 } else { 0.0 });
            true
        }
        Err(e) => {
            warn!(error = %e, pause, "pause/resume failed");
            false
        }
    }
}

/// Acts on a transaction's outcome (exactly-once): committed offsets are noted, an abort rewinds
/// the consumer (`seek`: false when the partitions are going anyway), a fatal error stops the
/// worker. True when nothing remains open.
fn settle(consumer: &SourceConsumer, shared: &SharedSource, halt: &Halt, outcome: Outcome, seek: bool) -> bool {
    match outcome {
        Outcome::Idle => true,
        Outcome::Committed(offsets) => {
            let mut state = shared.lock();
            for (tp, next) in &offsets {
                state.tracker.mark_committed(tp, *next);
            }
            true
        }
        Outcome::Pending(_) => false,
        Outcome::Aborted(_) => {
            rewind(consumer, shared, halt, seek);
            true
        }
        Outcome::Fatal(e) => {
            halt.trip(anyhow::anyhow!(e));
            true
        }
    }
}

/// Settles `outcome` of the transaction held in `held`; if it is still open (pending), aborts it
/// for `why` and settles that, before the partitions go (revoke, shutdown: no seek).
fn settle_or_abort(consumer: &SourceConsumer, shared: &SharedSource, halt: &Halt, held: &mut Held<'_>, outcome: Outcome, why: &str) {
    if !settle(consumer, shared, halt, outcome, false) {
        settle(consumer, shared, halt, held.abort(why), false);
    }
}

/// After an aborted transaction: every assigned partition starts a new generation (work of the
/// old one in the pipeline is dropped as stale) and is read again from its last committed
/// offset. A failed seek stops the worker (a restart reads from the committed offsets).
fn rewind(consumer: &SourceConsumer, shared: &SharedSource, halt: &Halt, seek: bool) {
    let targets = {
        let mut state = shared.lock();
        state.backlog.clear();
        state.rebalanced = true; // re-apply the pause state
        state.tracker.rewind()
    };
    if !seek {
        return;
    }
    for (tp, offset) in &targets {
        if let Err(e) = consumer.seek(&tp.topic, tp.partition, Offset::Offset(*offset), Duration::from_secs(10)) {
            halt.trip(anyhow::anyhow!("rewinding {tp} to offset {offset} after an aborted transaction failed: {e}"));
            return;
        }
    }
    let offsets: Vec<String> = targets.iter().map(|(tp, o)| format!("{tp}@{o}")).collect();
    Rewound { offsets: &offsets.join(",") }.emit();
}

/// Commits every partition whose contiguous completed offset moved.
fn commit(consumer: &SourceConsumer, shared: &SharedSource, mode: CommitMode) {
    let candidates = shared.lock().tracker.commit_candidates();
    if candidates.is_empty() {
        return;
    }
    let tpl = kafka::offsets_list(candidates.iter().map(|(tp, next)| (tp, *next)));
    let started = Instant::now();
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            let mut state = shared.lock();
            for (tp, next) in &candidates {
                state.tracker.mark_committed(tp, *next);
            }
            Committed { offsets: &candidates, took: started.elapsed() }.emit();
        }
        Err(e) => CommitFailed { error: &e }.emit(),
    }
}
