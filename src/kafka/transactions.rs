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
//!
//! A producer that librdkafka failed for good without being fenced is replaced instead
//! (`Held::replace`): after a broker restart, `abort_transaction` of a healthy member can answer
//! with a fatal INVALID_TXN_STATE (librdkafka #3297, #4849), and a fatal error leaves the
//! producer unable to do anything more. A new producer with the same `transactional.id` runs
//! `init_transactions`, which bumps the epoch (fencing the failed one) and aborts its open
//! transaction on the coordinator; the failed one's records are purged and their messages never
//! complete (`Transactions::superseded`), and the consumer rewinds to the committed offsets as
//! after any abort. [`MAX_REPLACEMENTS`] in a row without a commit between stop the worker.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::kafka::TopicPartition;
use crate::kafka::producer::EventProducer;
use crate::telemetry;
use crate::telemetry::events::{InternalEvent, TransactionAborted, TransactionCommitted, TransactionFenced};

/// Replacements of a failed producer in a row, without a committed transaction between, after
/// which the worker stops: the failure is not the passing kind a new producer rides out.
pub const MAX_REPLACEMENTS: u32 = 3;

/// Makes a new transactional producer with this worker's `transactional.id`, transactions not
/// initialised (`EventProducer::transactional_uninitialised`).
pub type MakeProducer = Box<dyn Fn() -> anyhow::Result<EventProducer> + Send + Sync>;

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
    /// The producer failed for good, not fenced, outside a commit or an abort (`Txn::begin`):
    /// the poll thread replaces it at its next commit.
    Broken,
    /// A replacement producer's `init_transactions` has not succeeded yet: retried before
    /// anything else.
    Initialising,
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
    /// Why the producer broke (`Phase::Broken`).
    broken: Option<String>,
    /// Producers replaced since the last committed transaction.
    replaced_in_a_row: u32,
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

/// Producer errors that a new producer would not get past: another producer owns the
/// `transactional.id` now (or the coordinator fenced this one), or it is not allowed.
fn fenced_producer(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
    )
}

/// How a transactional call failed.
enum Failure {
    Retriable(String),
    Abortable { reason: String, zombie: bool },
    /// The producer can do nothing more; `fenced`: nor could a new one.
    Fatal { reason: String, fenced: bool },
}

/// How a call of `producer` failed: [`classify`], except that a producer on which librdkafka
/// raised a fatal error has failed for good whatever the call answered (a fatal error raised
/// outside the transaction manager, e.g. by the idempotence layer, can leave the transaction's
/// own state as it was, so the call's error alone does not say it).
fn classify_call(producer: &EventProducer, what: &str, e: &KafkaError) -> Failure {
    match (classify(what, e), producer.fatal_error()) {
        (fatal @ Failure::Fatal { .. }, _) | (fatal, None) => fatal,
        (_, Some((code, why))) => Failure::Fatal { reason: format!("{what}: {e}; the producer failed for good: {code:?}: {why}"), fenced: fenced_producer(code) },
    }
}

fn classify(what: &str, e: &KafkaError) -> Failure {
    let reason = format!("{what}: {e}");
    match e {
        KafkaError::Transaction(re) if re.is_fatal() => Failure::Fatal { reason, fenced: fenced_producer(re.code()) },
        KafkaError::Transaction(re) if re.txn_requires_abort() => Failure::Abortable { reason, zombie: fenced_by_group(re.code()) },
        KafkaError::Transaction(re) if re.is_retriable() => Failure::Retriable(reason),
        // rust-rdkafka's commit_transaction flushes first: deliveries still under way
        KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut) => Failure::Retriable(reason),
        other => match other.rdkafka_error_code() {
            Some(code) if fenced_producer(code) => Failure::Fatal { reason, fenced: true },
            Some(code) if fenced_by_group(code) => Failure::Abortable { reason, zombie: true },
            _ => Failure::Abortable { reason, zombie: false },
        },
    }
}

/// The producer was fenced: the worker stops (counted as `fenced`).
fn producer_fenced(reason: String) -> Outcome {
    TransactionFenced { reason: &reason }.emit();
    Outcome::Fatal(format!("the transactional producer was fenced (by a newer instance or by the coordinator): {reason}"))
}

/// Why `Txn::begin` failed.
#[derive(Debug)]
pub enum BeginError {
    /// The producer failed for good without being fenced: the poll thread replaces it at its
    /// next commit and rewinds; the batch is left uncompleted (it is read again).
    Broken(String),
    /// The worker stops.
    Stop(String),
}

/// The transactional producer's transactions; shared by the emit stage and the poll thread.
pub struct Transactions {
    /// The current producer: replaced only by the poll thread while it holds the transaction, so
    /// the emit stage sees one producer for a whole batch.
    producer: RwLock<EventProducer>,
    /// Bumped when the producer is replaced: deliveries of an older producer do not complete.
    epoch: AtomicU64,
    make: MakeProducer,
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
    /// Begins a transaction unless one is open.
    pub fn begin(&mut self) -> Result<(), BeginError> {
        if self.open.phase == Phase::Idle {
            let producer = self.owner.current();
            if let Err(e) = producer.inner().begin_transaction() {
                return Err(match classify_call(&producer, "beginning a transaction", &e) {
                    Failure::Fatal { reason, fenced: false } => {
                        self.open.phase = Phase::Broken;
                        self.open.broken = Some(reason.clone());
                        BeginError::Broken(reason)
                    }
                    Failure::Fatal { reason, .. } | Failure::Retriable(reason) | Failure::Abortable { reason, .. } => BeginError::Stop(reason),
                });
            }
            self.open.phase = Phase::Open;
            self.open.began = Some(Instant::now());
        }
        Ok(())
    }

    /// The producer this transaction's records go to, and its epoch (for
    /// [`Transactions::superseded`]).
    pub fn producer(&self) -> (EventProducer, u64) {
        (self.owner.current(), self.owner.epoch.load(Ordering::SeqCst))
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
    /// `producer` must have a `transactional.id` and have run `init_transactions`; `make` makes
    /// its replacement when it fails for good without being fenced.
    pub fn new(producer: EventProducer, make: MakeProducer, max_messages: usize, call_timeout: Duration) -> Self {
        Self {
            producer: RwLock::new(producer),
            epoch: AtomicU64::new(0),
            make,
            open: tokio::sync::Mutex::new(Open::default()),
            messages: AtomicUsize::new(0),
            max_messages,
            doomed: AtomicBool::new(false),
            call_timeout,
        }
    }

    /// The current producer (flushed at exit).
    pub fn current(&self) -> EventProducer {
        self.producer.read().expect("not poisoned").clone()
    }

    /// Whether a record enqueued on the producer of `epoch` can no longer complete its message
    /// although its delivery failed for a reason that is not the record's: that producer was
    /// replaced, or librdkafka failed it for good (the poll thread replaces it, or stops the
    /// worker, at its next commit). Its transaction is aborted; the message is read again.
    pub fn superseded(&self, epoch: u64) -> bool {
        self.epoch.load(Ordering::SeqCst) != epoch || self.current().fatal_error().is_some()
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
            Phase::Aborting | Phase::Broken | Phase::Initialising => return self.abort("finishing an abort"),
            Phase::Open | Phase::Committing { .. } => {}
        }
        if !matches!(self.open.phase, Phase::Committing { offsets_sent: true }) {
            self.open.phase = Phase::Committing { offsets_sent: false };
            if !self.open.offsets.is_empty() {
                let Some(group) = group else { return Outcome::Pending("no group metadata yet".into()) };
                let tpl = crate::kafka::offsets_list(self.open.offsets.iter().map(|(tp, next)| (tp, *next)));
                let producer = owner.current();
                if let Err(e) = producer.inner().send_offsets_to_transaction(&tpl, group, owner.call_timeout) {
                    return self.failed(classify_call(&producer, "sending the offsets to the transaction", &e));
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
        let producer = owner.current();
        if let Err(e) = producer.inner().commit_transaction(owner.call_timeout) {
            return self.failed(classify_call(&producer, "committing the transaction", &e));
        }
        self.open.replaced_in_a_row = 0;
        let committed: Vec<_> = std::mem::take(&mut self.open.offsets).into_iter().collect();
        let messages = owner.messages.swap(0, Ordering::Relaxed);
        let open = self.open.began.take().map(|began| began.elapsed());
        self.open.phase = Phase::Idle;
        TransactionCommitted { messages: messages as u64, offsets: &committed, commit: started.elapsed(), open }.emit();
        Outcome::Committed(committed)
    }

    /// Aborts the open transaction: nothing of it becomes visible. A commit whose offsets were
    /// sent is resumed instead (it was started under a valid generation; librdkafka allows
    /// nothing else until it ends) and aborted only if it fails.
    pub fn abort(&mut self, why: &str) -> Outcome {
        match self.open.phase {
            Phase::Idle | Phase::Closed => Outcome::Idle,
            Phase::Committing { offsets_sent: true } => self.finish_commit(),
            Phase::Broken => {
                let reason = self.open.broken.take().unwrap_or_else(|| why.to_string());
                self.replace(reason)
            }
            Phase::Initialising => self.initialise(),
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
            Failure::Fatal { reason, fenced: true } => producer_fenced(reason),
            Failure::Fatal { reason, fenced: false } => self.replace(reason),
            Failure::Abortable { reason, zombie: true } => match self.abort_now(reason.clone()) {
                Outcome::Fatal(e) => Outcome::Fatal(e),
                _ => {
                    TransactionFenced { reason: &reason }.emit();
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
        let producer = owner.current();
        match producer.inner().abort_transaction(owner.call_timeout) {
            Ok(()) => {
                let messages = owner.messages.swap(0, Ordering::Relaxed);
                self.open.offsets.clear();
                self.open.began = None;
                self.open.phase = Phase::Idle;
                owner.doomed.store(false, Ordering::SeqCst);
                TransactionAborted { messages: messages as u64, reason: &reason }.emit();
                Outcome::Aborted(reason)
            }
            Err(e) => match classify_call(&producer, "aborting the transaction", &e) {
                Failure::Fatal { reason: why, fenced: true } => producer_fenced(format!("{why} (aborting because {reason})")),
                Failure::Fatal { reason: why, fenced: false } => self.replace(format!("{why} (aborting because {reason})")),
                Failure::Retriable(why) | Failure::Abortable { reason: why, .. } => {
                    warn!(%why, "the abort is not finished; retrying at the next interval");
                    Outcome::Pending(why)
                }
            },
        }
    }

    /// Replaces a producer that failed for good without being fenced (see the module's
    /// documentation): its open transaction ends up aborted (the new producer's
    /// `init_transactions` aborts it on the coordinator, or the coordinator's
    /// `transaction.timeout.ms` does), so the outcome is `Aborted` and the consumer rewinds.
    fn replace(&mut self, reason: String) -> Outcome {
        let owner = self.owner;
        if self.open.replaced_in_a_row >= MAX_REPLACEMENTS {
            return Outcome::Fatal(format!(
                "the transactional producer failed for good {MAX_REPLACEMENTS} times in a row without a commit between: {reason}"
            ));
        }
        // first the epoch: a delivery of the failed producer that ends from here on is
        // recognised as superseded, not as a record that failed for good
        owner.epoch.fetch_add(1, Ordering::SeqCst);
        owner.current().purge_all();
        let replacement = match (owner.make)() {
            Ok(p) => p,
            Err(e) => return Outcome::Fatal(format!("replacing the failed transactional producer: {e:#} (it failed: {reason})")),
        };
        let failed = std::mem::replace(&mut *owner.producer.write().expect("not poisoned"), replacement);
        // dropping a producer flushes for up to 0.5 s and joins its threads: not on the poll thread
        let _ = std::thread::Builder::new().name("producer-drop".into()).spawn(move || drop(failed));
        let messages = owner.messages.swap(0, Ordering::Relaxed);
        self.open.offsets.clear();
        self.open.began = None;
        self.open.broken = None;
        self.open.replaced_in_a_row += 1;
        self.open.phase = Phase::Initialising;
        owner.doomed.store(false, Ordering::SeqCst);
        metrics::counter!(telemetry::TRANSACTIONS, "outcome" => "replaced").increment(1);
        warn!(
            messages,
            %reason,
            "the transactional producer failed for good (not fenced): replaced by a new one with the same transactional.id; \
             its open transaction is aborted and its messages are read again"
        );
        match self.initialise() {
            Outcome::Fatal(e) => Outcome::Fatal(e),
            _ => Outcome::Aborted(reason),
        }
    }

    /// `init_transactions` of a replacement producer, started or retried.
    fn initialise(&mut self) -> Outcome {
        let owner = self.owner;
        let producer = owner.current();
        match producer.init_transactions(owner.call_timeout) {
            Ok(()) => {
                self.open.phase = Phase::Idle;
                info!("the replacement transactional producer is ready");
                Outcome::Idle
            }
            Err(e) => match classify_call(&producer, "initialising the replacement producer's transactions", &e) {
                Failure::Fatal { reason, .. } => Outcome::Fatal(format!("the transactional producer failed for good: {reason}")),
                Failure::Retriable(why) | Failure::Abortable { reason: why, .. } => {
                    warn!(%why, "the replacement producer is not ready yet; retrying at the next interval");
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
        assert!(matches!(classify("x", &fenced), Failure::Fatal { fenced: true, .. }));
        let epoch = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidProducerEpoch);
        assert!(matches!(classify("x", &epoch), Failure::Fatal { fenced: true, .. }));
        let generation = KafkaError::MessageProduction(RDKafkaErrorCode::IllegalGeneration);
        assert!(matches!(classify("x", &generation), Failure::Abortable { zombie: true, .. }));
        let other = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(classify("x", &other), Failure::Abortable { zombie: false, .. }));
        // rust-rdkafka's commit_transaction flushes first: a slow delivery is retried, not aborted
        let slow = KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut);
        assert!(matches!(classify("x", &slow), Failure::Retriable(_)));
    }

    /// librdkafka's own handling of the broker's answer seen after a broker restart: its mock
    /// cluster answers EndTxn with INVALID_TXN_STATE, which librdkafka makes a fatal error of the
    /// producer (not fencing). The producer is replaced: the transaction ends aborted, the next
    /// one commits. (tests/exactly_once.rs checks the same against a real broker, with what a
    /// read_committed reader sees.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invalid_txn_state_answer_replaces_the_producer_instead_of_stopping() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::RDKafkaApiKey;
        use rdkafka::types::RDKafkaRespErr;
        use std::sync::Arc;

        use crate::kafka::producer::Outgoing;

        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("out", 1, 1).unwrap();
        let kafka = crate::config::KafkaConfig {
            brokers: mock.bootstrap_servers(),
            group_id: "g".into(),
            instance_id: "i".into(),
            ..Default::default()
        };
        let producer = EventProducer::transactional(&kafka, 1_000_000, Duration::from_secs(10)).unwrap();
        let k = kafka.clone();
        let make: MakeProducer = Box::new(move || EventProducer::transactional_uninitialised(&k, 1_000_000));
        let t = Arc::new(Transactions::new(producer, make, 100, Duration::from_secs(5)));
        let produce = |t: Arc<Transactions>| async move {
            let mut txn = t.lock().await;
            txn.begin().unwrap();
            let (producer, epoch) = txn.producer();
            let out = Outgoing { topic: "out", key: None, payload: Some(b"x"), headers: None };
            (producer.enqueue(out).await.unwrap(), epoch)
        };
        let commit = |t: Arc<Transactions>| tokio::task::spawn_blocking(move || t.hold(Duration::from_secs(5)).unwrap().commit(None));

        let (delivery, epoch) = produce(t.clone()).await;
        assert!(delivery.await.unwrap().is_ok());
        mock.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_TXN_STATE]);
        let outcome = commit(t.clone()).await.unwrap();
        assert!(matches!(&outcome, Outcome::Aborted(why) if why.contains("failed for good") || why.contains("state")), "{outcome:?}");
        assert!(t.superseded(epoch));
        let (delivery, epoch) = produce(t.clone()).await;
        assert!(delivery.await.unwrap().is_ok());
        let outcome = commit(t.clone()).await.unwrap();
        assert!(matches!(outcome, Outcome::Committed(_)), "{outcome:?}");
        assert!(!t.superseded(epoch));
    }
}
