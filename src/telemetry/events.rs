//! Operational events, one struct each, whose `emit` writes the log line and the metric
//! together (as Vector's `src/internal_events/`), so the two cannot drift apart: an operator
//! who sees a counter move finds the line that says why, and the other way round. The
//! targets of the lines are the emitting modules' (`tracing`'s `target:`), as before.

use std::fmt::Display;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{
    COMMIT_FAILURES, COMMIT_SECONDS, DLQ, REBALANCES, REWINDS, STALE_BATCHES, STALE_MESSAGES, STORE_RETRIES, TRANSACTION_SECONDS,
    TRANSACTIONS,
};

/// An event that writes its log line and its metric.
pub trait InternalEvent {
    fn emit(self);
}

/// A message goes to the dead-letter topic (`convoflow_dlq_total{class}`).
pub struct DeadLettered<'a, P: Display> {
    pub tp: &'a P,
    pub offset: i64,
    pub class: &'static str,
    pub reason: &'a str,
}

impl<P: Display> InternalEvent for DeadLettered<'_, P> {
    fn emit(self) {
        warn!(target: "convoflow::pipeline::emit", tp = %self.tp, offset = self.offset, class = self.class, reason = %self.reason, "dead-lettering a message");
        metrics::counter!(DLQ, "class" => self.class).increment(1);
    }
}

/// Work of partitions that moved to another member was dropped at `stage`
/// (`convoflow_stale_batches_total`, `convoflow_stale_messages_total`).
pub struct StaleDropped {
    pub stage: &'static str,
    pub messages: usize,
}

impl InternalEvent for StaleDropped {
    fn emit(self) {
        if self.messages == 0 {
            return;
        }
        debug!(target: "convoflow::pipeline::stage", stage = self.stage, messages = self.messages, "dropped work of partitions that moved to another member");
        metrics::counter!(STALE_BATCHES, "stage" => self.stage).increment(1);
        metrics::counter!(STALE_MESSAGES, "stage" => self.stage).increment(self.messages as u64);
    }
}

/// Offsets committed (`convoflow_commit_seconds`).
pub struct Committed<'a, O: std::fmt::Debug> {
    pub offsets: &'a O,
    pub took: Duration,
}

impl<O: std::fmt::Debug> InternalEvent for Committed<'_, O> {
    fn emit(self) {
        debug!(target: "convoflow::source", offsets = ?self.offsets, elapsed_ms = self.took.as_millis() as u64, "committed");
        metrics::histogram!(COMMIT_SECONDS).record(self.took.as_secs_f64());
    }
}

/// An offset commit failed; it is retried at the next interval (`convoflow_commit_failures_total`).
pub struct CommitFailed<'a, E: Display> {
    pub error: &'a E,
}

impl<E: Display> InternalEvent for CommitFailed<'_, E> {
    fn emit(self) {
        warn!(target: "convoflow::source", error = %self.error, "offset commit failed; retrying at the next interval");
        metrics::counter!(COMMIT_FAILURES).increment(1);
    }
}

/// Partitions were assigned to this member (`convoflow_rebalances_total`).
pub struct PartitionsAssigned<'a> {
    pub partitions: &'a str,
}

impl InternalEvent for PartitionsAssigned<'_> {
    fn emit(self) {
        metrics::counter!(REBALANCES).increment(1);
        info!(target: "convoflow::source", partitions = %self.partitions, "partitions assigned");
    }
}

/// The consumer went back to the last committed offsets after an aborted transaction
/// (`convoflow_rewinds_total`).
pub struct Rewound<'a> {
    pub offsets: &'a str,
}

impl InternalEvent for Rewound<'_> {
    fn emit(self) {
        metrics::counter!(REWINDS).increment(1);
        info!(target: "convoflow::source", offsets = %self.offsets, "rewound to the last committed offsets: the aborted transaction's messages are read again");
    }
}

/// A transaction committed (`convoflow_transactions_total{outcome="committed"}`,
/// `convoflow_transaction_seconds`: open → committed).
pub struct TransactionCommitted<'a, O: std::fmt::Debug> {
    pub messages: u64,
    pub offsets: &'a O,
    pub commit: Duration,
    pub open: Option<Duration>,
}

impl<O: std::fmt::Debug> InternalEvent for TransactionCommitted<'_, O> {
    fn emit(self) {
        if let Some(open) = self.open {
            metrics::histogram!(TRANSACTION_SECONDS).record(open.as_secs_f64());
        }
        metrics::counter!(TRANSACTIONS, "outcome" => "committed").increment(1);
        debug!(target: "convoflow::kafka::transactions", messages = self.messages, offsets = ?self.offsets, commit_ms = self.commit.as_millis() as u64, "transaction committed");
    }
}

/// A transaction aborted: its messages are read again (`…{outcome="aborted"}`).
pub struct TransactionAborted<'a> {
    pub messages: u64,
    pub reason: &'a str,
}

impl InternalEvent for TransactionAborted<'_> {
    fn emit(self) {
        metrics::counter!(TRANSACTIONS, "outcome" => "aborted").increment(1);
        info!(target: "convoflow::kafka::transactions", messages = self.messages, reason = %self.reason, "transaction aborted: its messages are read again");
    }
}

/// The transactional producer was fenced (by a newer instance, the coordinator or the group):
/// the worker stops (`…{outcome="fenced"}`; the stop itself is logged by `shutdown::Halt`).
pub struct TransactionFenced<'a> {
    pub reason: &'a str,
}

impl InternalEvent for TransactionFenced<'_> {
    fn emit(self) {
        metrics::counter!(TRANSACTIONS, "outcome" => "fenced").increment(1);
        debug!(target: "convoflow::kafka::transactions", reason = %self.reason, "the transactional producer was fenced");
    }
}

/// A vector store call failed and is retried (`convoflow_store_retries_total`).
pub struct StoreRetry<'a, E: Display> {
    pub op: &'a str,
    pub attempt: u32,
    pub delay: Duration,
    pub error: &'a E,
}

impl<E: Display> InternalEvent for StoreRetry<'_, E> {
    fn emit(self) {
        warn!(target: "convoflow::sink::store::writer", op = self.op, attempt = self.attempt, delay_ms = self.delay.as_millis() as u64, error = %self.error, "vector store call failed; retrying (the worker is unready, its input waits)");
        metrics::counter!(STORE_RETRIES).increment(1);
    }
}
