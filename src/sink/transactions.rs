//! Exactly-once output (`kafka.delivery: exactly_once`): one transactional producer per worker
//! process; each transaction holds the records (enriched events, forwarded tombstones, DLQ
//! copies) of a run of emitted messages and, through `send_offsets_to_transaction` with the
//! consumer's group metadata (KIP-447), the input offsets just past them. A `read_committed`
//! consumer of the output and DLQ topics therefore sees each input message's records once: a
//! transaction either commits records and offsets together or neither.
//!
//! Who does what:
//! - the emit stage holds the transaction (`lock`) while it enqueues one batch's records, begins
//!   the transaction on its first record and notes each message's offset (`Txn::add`);
//! - the source's poll thread holds it (`hold` → `Held`) to commit it (`Held::commit`) on the
//!   commit interval or when `kafka.transaction_max_messages` are in it, before partitions are
//!   revoked and at shutdown, and to abort it (`Held::abort`) when that fails or a lost
//!   assignment means another member may own the partitions; after an abort, still holding it,
//!   it rewinds the consumer to the last committed offsets.
//!
//! Holding the lock across a batch means a commit never splits a batch and never includes a
//! message whose records are not in the transaction. A fenced producer (another process took the
//! `transactional.id`, or the coordinator aborted a transaction that outlived
//! `kafka.transaction_timeout_ms`) and a group that fenced this member (its generation is gone:
//! a zombie) stop the worker: nothing it produced since its last commit becomes visible.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, info, warn};

use crate::pipeline::offsets::TopicPartition;
use crate::telemetry;

/// Where the open transaction stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No transaction open: the emit stage begins one with its next record.
    #[default]
    Idle,
    Open,
    /// A commit was started and must be finished (or aborted) before anything else is produced:
    /// librdkafka refuses new records meanwhile, and a `commit_transaction` that timed out must
    /// be resumed before anything else is called. `offsets_sent` says whether the offsets are in.
    Committing { offsets_sent: bool },
    /// An abort was started and timed out: it is retried before anything else.
    Aborting,
    /// The source committed or aborted for the last time: nothing more begins.
    Closed,
}

#[derive(Debug, Default)]
struct Open {
    phase: Phase,
    /// Per input partition, the offset just past the last message whose records this
    /// transaction holds (what `send_offsets_to_transaction` commits).
    offsets: BTreeMap<TopicPartition, i64>,
    began: Option<Instant>,
}

/// What a commit or an abort came to, for the poll thread.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing was open.
    Idle,
    /// Committed: these offsets are the group's now.
    Committed(Vec<(TopicPartition, i64)>),
    /// Not finished (the coordinator is away, a timeout): tried again at the next interval; the
    /// emit stage waits meanwhile.
    Pending(String),
    /// Aborted: nothing of the transaction is visible; the consumer must rewind to the last
    /// committed offsets and re-read.
    Aborted(String),
    /// The producer or this member was fenced, or the producer failed for good: the worker
    /// stops (its open transaction stays invisible).
    Fatal(String),
}

/// Group errors that mean this member no longer owns what it consumed: it is a zombie.
fn fenced_by_group(code: RDKafkaErrorCode) -> bool {
    matches!(code, RDKafkaErrorCode::IllegalGeneration | RDKafkaErrorCode::UnknownMemberId | RDKafkaErrorCode::FencedInstanceId)
}

/// How a transactional call failed.
enum Failure {
    Retriable(String),
    Abortable { reason: String, zombie: bool },
    Fatal(String),
}

fn classify(what: &str, e: &KafkaError) -> Failure {
    let reason = format!("{what}: {e}");
    match e {
        KafkaError::Transaction(re) if re.is_fatal() => Failure::Fatal(reason),
        KafkaError::Transaction(re) if re.txn_requires_abort() => Failure::Abortable { reason, zombie: fenced_by_group(re.code()) },
        KafkaError::Transaction(re) if re.is_retriable() => Failure::Retriable(reason),
        // rust-rdkafka's commit_transaction flushes first: deliveries still under way
        KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut) => Failure::Retriable(reason),
        other => match other.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch) => Failure::Fatal(reason),
            Some(code) if fenced_by_group(code) => Failure::Abortable { reason, zombie: true },
            _ => Failure::Abortable { reason, zombie: false },
        },
    }
}

/// The transactional producer's transactions; shared by the emit stage and the poll thread.
pub struct Transactions {
    producer: FutureProducer,
    open: tokio::sync::Mutex<Open>,
    /// Messages in the open transaction (kept outside the lock: the poll thread reads it for
    /// the size bound without taking the transaction).
    messages: AtomicUsize,
    max_messages: usize,
    /// Set when the open transaction must be aborted but could not be at once (the emit stage
    /// held it, or a message of the pipeline was left out of it): the next commit aborts
    /// instead, and the emit stage adds nothing to it meanwhile.
    doomed: AtomicBool,
    /// Bound on each blocking transactional call.
    call_timeout: Duration,
}

/// The open transaction, held by the emit stage for one batch.
pub struct Txn<'a> {
    open: tokio::sync::MutexGuard<'a, Open>,
    owner: &'a Transactions,
}

impl Txn<'_> {
    /// Begins a transaction unless one is open. An error stops the worker.
    pub fn begin(&mut self) -> Result<(), String> {
        if self.open.phase == Phase::Idle {
            self.owner.producer.begin_transaction().map_err(|e| format!("beginning a transaction: {e}"))?;
            self.open.phase = Phase::Open;
            self.open.began = Some(Instant::now());
        }
        Ok(())
    }

    /// Notes that the records of `tp`@`offset` were enqueued in this transaction.
    pub fn add(&mut self, tp: &TopicPartition, offset: i64) {
        let next = self.open.offsets.entry(tp.clone()).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
        self.owner.messages.fetch_add(1, Ordering::Relaxed);
    }
}

/// The transaction held by the poll thread: the emit stage cannot add to it meanwhile, so
/// what the poll thread does under it (commit, abort, then the offset tracker's rewind or
/// revoke) is one step as the emit stage sees it.
pub struct Held<'a> {
    open: tokio::sync::MutexGuard<'a, Open>,
    owner: &'a Transactions,
}

impl Transactions {
    /// `producer` must have a `transactional.id` and have run `init_transactions`.
    pub fn new(producer: FutureProducer, max_messages: usize, call_timeout: Duration) -> Self {
        Self {
            producer,
            open: tokio::sync::Mutex::new(Open::default()),
            messages: AtomicUsize::new(0),
            max_messages,
            doomed: AtomicBool::new(false),
            call_timeout,
        }
    }

    /// The open transaction for the emit stage, once no commit or abort is under way (and
    /// never again once the source closed it).
    pub async fn lock(&self) -> Txn<'_> {
        loop {
            let open = self.open.lock().await;
            if matches!(open.phase, Phase::Idle | Phase::Open) && !self.doomed.load(Ordering::SeqCst) {
                return Txn { open, owner: self };
            }
            drop(open);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the open transaction reached `kafka.transaction_max_messages`.
    pub fn full(&self) -> bool {
        self.messages.load(Ordering::Relaxed) >= self.max_messages
    }

    /// The open transaction must not commit (a message was left out of it): it is aborted at
    /// the next commit.
    pub fn doom(&self) {
        self.doomed.store(true, Ordering::SeqCst);
    }

    /// The transaction for the poll thread, waiting up to `wait` for the emit stage to finish
    /// its batch (None past it: the poll thread must not stall behind a producer queue that
    /// does not drain).
    pub fn hold(&self, wait: Duration) -> Option<Held<'_>> {
        let until = Instant::now() + wait;
        loop {
            if let Ok(open) = self.open.try_lock() {
                return Some(Held { open, owner: self });
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Held<'_> {
    /// Commits the open transaction with its offsets (blocks up to the call timeout per call).
    /// `group` is the consumer's current group metadata.
    pub fn commit(&mut self, group: Option<&ConsumerGroupMetadata>) -> Outcome {
        let owner = self.owner;
        if owner.doomed.load(Ordering::SeqCst) && !matches!(self.open.phase, Phase::Idle | Phase::Closed) {
            return self.abort("a message was left out of it or its partitions were revoked while it was open");
        }
        owner.doomed.store(false, Ordering::SeqCst);
        match self.open.phase {
            Phase::Idle | Phase::Closed => return Outcome::Idle,
            Phase::Aborting => return self.abort("finishing an abort"),
            Phase::Open | Phase::Committing { .. } => {}
        }
        if !matches!(self.open.phase, Phase::Committing { offsets_sent: true }) {
            self.open.phase = Phase::Committing { offsets_sent: false };
            if !self.open.offsets.is_empty() {
                let Some(group) = group else { return Outcome::Pending("no group metadata yet".into()) };
                let tpl = crate::source::offsets_list(self.open.offsets.iter().map(|(tp, next)| (tp, *next)));
                if let Err(e) = owner.producer.send_offsets_to_transaction(&tpl, group, owner.call_timeout) {
                    return self.failed(classify("sending the offsets to the transaction", &e));
                }
            }
            self.open.phase = Phase::Committing { offsets_sent: true };
        }
        self.finish_commit()
    }

    /// `commit_transaction`, started or resumed (a timed-out call must be resumed before any
    /// other transactional call: librdkafka answers anything else with a conflict).
    fn finish_commit(&mut self) -> Outcome {
        let owner = self.owner;
        let started = Instant::now();
        if let Err(e) = owner.producer.commit_transaction(owner.call_timeout) {
            return self.failed(classify("committing the transaction", &e));
        }
        let committed: Vec<_> = std::mem::take(&mut self.open.offsets).into_iter().collect();
        let messages = owner.messages.swap(0, Ordering::Relaxed);
        if let Some(began) = self.open.began.take() {
            metrics::histogram!(telemetry::TRANSACTION_SECONDS).record(began.elapsed().as_secs_f64());
        }
        self.open.phase = Phase::Idle;
        metrics::counter!(telemetry::TRANSACTIONS, "outcome" => "committed").increment(1);
        debug!(messages, offsets = ?committed, commit_ms = started.elapsed().as_millis() as u64, "transaction committed");
        Outcome::Committed(committed)
    }

    /// Aborts the open transaction: nothing of it becomes visible. A commit whose offsets were
    /// sent is resumed instead (it was started under a valid generation; librdkafka allows
    /// nothing else until it ends) and aborted only if it fails.
    pub fn abort(&mut self, why: &str) -> Outcome {
        match self.open.phase {
            Phase::Idle | Phase::Closed => Outcome::Idle,
            Phase::Committing { offsets_sent: true } => self.finish_commit(),
            _ => self.abort_now(why.to_string()),
        }
    }

    /// After the last commit or abort: nothing more begins (the worker is leaving).
    pub fn close(&mut self) {
        if matches!(self.open.phase, Phase::Idle) {
            self.open.phase = Phase::Closed;
        }
    }

    fn failed(&mut self, failure: Failure) -> Outcome {
        match failure {
            Failure::Retriable(reason) => {
                warn!(%reason, "the transaction is not committed yet; retrying at the next interval");
                Outcome::Pending(reason)
            }
            Failure::Fatal(reason) => {
                metrics::counter!(telemetry::TRANSACTIONS, "outcome" => "fenced").increment(1);
                Outcome::Fatal(format!("the transactional producer failed for good (fenced by a newer instance or by the coordinator?): {reason}"))
            }
            Failure::Abortable { reason, zombie: true } => match self.abort_now(reason.clone()) {
                Outcome::Fatal(e) => Outcome::Fatal(e),
                _ => {
                    metrics::counter!(telemetry::TRANSACTIONS, "outcome" => "fenced").increment(1);
                    Outcome::Fatal(format!(
                        "fenced by the consumer group: this member's generation is over (another member owns its partitions), \
                         its open transaction was aborted: {reason}"
                    ))
                }
            },
            Failure::Abortable { reason, zombie: false } => self.abort_now(reason),
        }
    }

    fn abort_now(&mut self, reason: String) -> Outcome {
        let owner = self.owner;
        self.open.phase = Phase::Aborting;
        match owner.producer.abort_transaction(owner.call_timeout) {
            Ok(()) => {
                let messages = owner.messages.swap(0, Ordering::Relaxed);
                self.open.offsets.clear();
                self.open.began = None;
                self.open.phase = Phase::Idle;
                owner.doomed.store(false, Ordering::SeqCst);
                metrics::counter!(telemetry::TRANSACTIONS, "outcome" => "aborted").increment(1);
                info!(messages, %reason, "transaction aborted: its messages are read again");
                Outcome::Aborted(reason)
            }
            Err(e) => match classify("aborting the transaction", &e) {
                Failure::Fatal(why) => Outcome::Fatal(format!("the transactional producer failed for good: {why} (aborting because {reason})")),
                Failure::Retriable(why) | Failure::Abortable { reason: why, .. } => {
                    warn!(%why, "the abort is not finished; retrying at the next interval");
                    Outcome::Pending(why)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_fencing_codes_mark_a_zombie() {
        for code in [RDKafkaErrorCode::IllegalGeneration, RDKafkaErrorCode::UnknownMemberId, RDKafkaErrorCode::FencedInstanceId] {
            assert!(fenced_by_group(code), "{code:?}");
        }
        assert!(!fenced_by_group(RDKafkaErrorCode::RebalanceInProgress));
        assert!(!fenced_by_group(RDKafkaErrorCode::RequestTimedOut));
    }

    #[test]
    fn producer_fencing_is_fatal_and_a_timeout_is_not() {
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert!(matches!(classify("x", &fenced), Failure::Fatal(_)));
        let epoch = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidProducerEpoch);
        assert!(matches!(classify("x", &epoch), Failure::Fatal(_)));
        let generation = KafkaError::MessageProduction(RDKafkaErrorCode::IllegalGeneration);
        assert!(matches!(classify("x", &generation), Failure::Abortable { zombie: true, .. }));
        let other = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(classify("x", &other), Failure::Abortable { zombie: false, .. }));
        // rust-rdkafka's commit_transaction flushes first: a slow delivery is retried, not aborted
        let slow = KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut);
        assert!(matches!(classify("x", &slow), Failure::Retriable(_)));
    }
}
