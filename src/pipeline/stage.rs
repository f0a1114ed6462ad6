//! Plumbing shared by the pipeline's stages: the count of micro-batches in flight and the
//! source's abandonment, the generation check that drops work of partitions that moved, and the
//! per-stage busy time and queue depth.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

use crate::source::{InboundMessage, SharedSource};
use crate::telemetry;
use crate::telemetry::events::{InternalEvent, StaleDropped};

pub const STAGE_PREPARE: &str = "prepare";
pub const STAGE_INFER: &str = "infer";
pub const STAGE_BUILD: &str = "build";
pub const STAGE_STORE: &str = "store";
pub const STAGE_EMIT: &str = "emit";

/// Micro-batches between the batch stage and the end of the write stage, and a signal when one
/// ends (the batch stage waits on it).
#[derive(Default)]
pub struct Flight {
    batches: AtomicUsize,
    pub ended: Notify,
    /// Set when the source has stopped for good (shutdown or failure: it committed what was
    /// complete and left): work still in the pipeline can no longer be completed, so the
    /// stages drop it instead of running it, and the worker exits promptly.
    abandoned: AtomicBool,
    abandoned_signal: Notify,
}

impl Flight {
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
        self.abandoned_signal.notify_waiters();
        self.ended.notify_one();
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// Returns once the source has stopped for good (at once if it already has).
    pub async fn abandoned(&self) {
        loop {
            // registered before the check: a notification in between is not missed
            let signal = self.abandoned_signal.notified();
            if self.is_abandoned() {
                return;
            }
            signal.await;
        }
    }

    pub fn started(&self) {
        self.batches.fetch_add(1, Ordering::SeqCst);
    }

    pub fn ended(&self) {
        self.batches.fetch_sub(1, Ordering::SeqCst);
        self.ended.notify_one();
    }

    pub fn count(&self) -> usize {
        self.batches.load(Ordering::SeqCst)
    }
}

/// Keeps the items whose message still belongs to this member's current assignment; drops (and
/// counts, by `stage`) those of partitions that moved to another member since they were read.
pub fn keep_current<T>(shared: &SharedSource, stage: &'static str, items: Vec<T>, msg: impl Fn(&T) -> &InboundMessage) -> Vec<T> {
    let before = items.len();
    let kept: Vec<T> = items.into_iter().filter(|item| shared.is_current(&msg(item).tp, msg(item).generation)).collect();
    count_stale(stage, before - kept.len());
    kept
}

/// Counts `dropped` messages of partitions that moved to another member (one stale batch).
pub fn count_stale(stage: &'static str, dropped: usize) {
    StaleDropped { stage, messages: dropped }.emit();
}

/// Adds the time until it is dropped to the stage's busy seconds.
pub struct Busy(&'static str, std::time::Instant);

impl Busy {
    pub fn start(stage: &'static str) -> Self {
        Self(stage, std::time::Instant::now())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        metrics::histogram!(telemetry::STAGE_BUSY_SECONDS, "stage" => self.0).record(self.1.elapsed().as_secs_f64());
    }
}

pub fn record_depth(stage: &'static str, depth: usize) {
    metrics::gauge!(telemetry::STAGE_QUEUE_DEPTH, "stage" => stage).set(depth as f64);
}
