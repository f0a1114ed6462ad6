//! The build and store stages. Build waits for a micro-batch's model outputs and applies each
//! message's own (`infer::Inferred`), encodes every enriched event (an event that cannot be
//! produced is dead-lettered before any of its points is written) and builds the points
//! (`Built`); store writes them to the vector store in input order, halving a batch the store
//! rejects until the messages it refuses are found, and hands on `emit::Written`. They run as
//! two tasks, so batch *k+1* is built while batch *k* is written: the engine's upsert of one
//! shard is serial, and the encoding and point building need not wait for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::anyhow;
use rayon::prelude::*;
use tracing::{debug, warn};

use super::emit::{OutputEncoder, Stored, Written};
use super::infer::{Enriched, InFlight, Inferred, MessageOutputs, ModelThreadGone, Models, Pending};
use super::message::{Decided, Message};
use super::prepare::Prepared;
use super::stage::{Busy, Flight, STAGE_BUILD, STAGE_STORE, keep_current};
use crate::event::{EnrichedConversation, ModelInfo};
use crate::kafka::transactions::Transactions;
use crate::shutdown::Halt;
use crate::fault::{Fault, RejectClass};
use crate::sink::store::points::{PayloadText, points_for};
use crate::sink::store::writer::StoreWriter;
use crate::sink::store::{StoreError, StorePoint, WrittenTurn, WrittenTurns};
use crate::source::SharedSource;
use crate::telemetry::{self, Readiness};

/// What the store stage holds.
pub struct StoreStage {
    pub store: StoreWriter,
    pub readiness: Arc<Readiness>,
    pub payload_text: PayloadText,
    /// Encodes each enriched event before its points are written (see `OutputEncoder`).
    pub encoder: Arc<OutputEncoder>,
    /// Set when the worker is stopping (a signal or a failure).
    pub stop: Arc<AtomicBool>,
    /// The first failure that stops the worker (shared with the emit stage).
    pub halt: Arc<Halt>,
    pub models: Option<Arc<Models>>,
    pub model_infos: Vec<ModelInfo>,
    pub shared: Arc<SharedSource>,
    /// Exactly-once: the producer's transactions (a batch left out must doom the open one).
    pub transactions: Option<Arc<Transactions>>,
}

/// A batch built: each message with its event encoded and its points (none for a tombstone
/// or a message that failed), waiting for the store stage.
pub struct Built {
    messages: Vec<(Message<Written>, Vec<StorePoint>)>,
}

impl Built {
    /// Its messages (for the store stage's span).
    pub fn messages(&self) -> usize {
        self.messages.len()
    }
}

impl StoreStage {
    /// Runs a stage's work on a batch unless the worker is stopping: after a failure, or once
    /// the source has left (its shutdown timeout passed), a batch can no longer be completed,
    /// so what is still queued is neither built, written nor completed (the next owner of its
    /// partitions re-reads it), and work under way is dropped when the source leaves.
    pub async fn unless_stopping<T>(&self, flight: &Flight, work: impl std::future::Future<Output = Option<T>>) -> Option<T> {
        if self.halt.is_tripped() || flight.is_abandoned() {
            return None;
        }
        tokio::select! {
            done = work => done,
            _ = flight.abandoned() => None,
        }
    }

    fn fail(&self, e: anyhow::Error, messages: usize) {
        warn!(messages, "stopping without completing this batch");
        self.halt.trip(e);
    }

    /// The build stage: the batch's model outputs applied, its events encoded, its points
    /// built. None when the batch ends here (nothing left of it, or a failure that stops the
    /// worker).
    pub async fn build(&self, inflight: InFlight) -> Option<Built> {
        let InFlight { batch, pending, submitted } = inflight;
        if let Some(reason) = batch.iter().find_map(|p| match &p.decided {
            Decided::Failed(Fault::Machine(e)) => Some(format!("{e:#}")),
            _ => None,
        }) {
            // only when the worker was already stopping; never dead-lettered, never completed
            self.fail(anyhow!("a message could not be decoded: {reason}"), batch.len());
            return None;
        }
        let messages = batch.len();
        let batch = match self.model_outputs(batch, pending).await {
            Ok(inferred) => inferred,
            Err(e) => {
                self.fail(anyhow::Error::new(e).context("running the models"), messages);
                return None;
            }
        };
        let _busy = Busy::start(STAGE_BUILD); // from here on: the stage's own work
        // messages of partitions revoked while the batch was in flight: the next owner re-reads them
        let batch = keep_current(&self.shared, STAGE_BUILD, batch, |p| &p.msg);
        if batch.is_empty() {
            return None;
        }
        metrics::counter!(telemetry::MESSAGES).increment(batch.len() as u64);
        metrics::histogram!(telemetry::BATCH_MESSAGES).record(batch.len() as f64);
        let (turns, tokens) = batch
            .iter()
            .filter_map(|p| p.decided.valid().map(|v| (v.event.turns.len(), v.event.total_tokens)))
            .fold((0usize, 0i64), |(t, k), (a, b)| (t + a, k + b));
        if turns > 0 {
            metrics::histogram!(telemetry::ENRICH_SECONDS).record(submitted.elapsed().as_secs_f64());
            metrics::counter!(telemetry::TURNS).increment(turns as u64);
            metrics::counter!(telemetry::TOKENS).increment(tokens.max(0) as u64);
            metrics::histogram!(telemetry::BATCH_TURNS).record(turns as f64);
            metrics::histogram!(telemetry::BATCH_TOKENS).record(tokens as f64);
        }
        // every event encoded and the points of every message built, on rayon's pool: an event
        // that cannot be produced (too large, unencodable) is dead-lettered here, before any of
        // its points is written, so no point stays searchable without its enriched event
        let (payload_text, encoder) = (self.payload_text, self.encoder.clone());
        let built = tokio::task::spawn_blocking(move || {
            batch
                .into_par_iter()
                .map(|Message { msg, decided }| {
                    let mut points = vec![];
                    let decided = decided.then(|e: Enriched| {
                        let output = encoder.encode(&msg, &e.event).map_err(Fault::Data)?;
                        points = points_for(&e.conversation, &e.event, e.dense.as_deref(), payload_text);
                        Ok(Written { event: e.event, output })
                    });
                    (Message { msg, decided }, points)
                })
                .collect::<Vec<(Message<Written>, Vec<StorePoint>)>>()
        })
        .await
        .expect("building points does not panic");
        Some(Built { messages: built })
    }

    /// The store stage: the built batch's points upserted (acknowledged), its tombstones
    /// applied. None when the batch ends here (nothing left of it, or a failure that stops the
    /// worker).
    pub async fn store(&self, built: Built) -> Option<Stored> {
        let _busy = Busy::start(STAGE_STORE);
        // checked again right before writing: a partition may have moved while the batch was
        // built or waited, and a late write could bring back points its new owner deleted
        let built = keep_current(&self.shared, STAGE_STORE, built.messages, |(p, _)| &p.msg);
        if built.is_empty() {
            return None;
        }
        // the messages' points side by side, so a run of messages is one upsert without copies
        let mut batch = Vec::with_capacity(built.len());
        let mut bounds = Vec::with_capacity(built.len());
        let mut flat = Vec::new();
        for (p, points) in built {
            let start = flat.len();
            flat.extend(points);
            bounds.push(start..flat.len());
            batch.push(p);
        }
        if let Err(e) = self.write_store(&mut batch, &flat, &bounds).await {
            self.readiness.store_reachable.store(false, Ordering::Relaxed);
            if e.is_transient() && self.stop.load(Ordering::SeqCst) {
                // stopping while the store is down: not a failure of the worker; the batch stays
                // uncommitted and the next owner of its partitions re-reads it
                warn!(messages = batch.len(), error = %e, "stopping during a vector store outage; the batch is left uncommitted");
                if let Some(txn) = &self.transactions {
                    // batches after this one may still be emitted: the open transaction must
                    // not commit their offsets past it
                    txn.doom();
                }
                return None;
            }
            self.fail(anyhow::Error::new(e).context("writing to the vector store"), batch.len());
            return None;
        }
        Some(Stored { batch })
    }

    /// Waits for the batch's model outputs and applies each message's own to it. When a model
    /// fails on the batch, each valid message is run again alone, with the inputs it kept (a
    /// smaller job may fit where a batch ran out of memory; nothing is decoded again). The
    /// models get token ids, and a text that does not tokenize was dead-lettered at the prepare
    /// stage already: whatever fails here is the machine's fault, so a message that fails
    /// alone, or a model thread that is gone (`ModelThreadGone`, not retried), stops the worker
    /// with nothing of the batch committed.
    async fn model_outputs(&self, batch: Vec<Prepared>, pending: Option<Result<Pending, Fault>>) -> Result<Vec<Inferred>, Fault> {
        let (Some(models), Some(pending)) = (self.models.clone(), pending) else {
            return Ok(batch.into_iter().map(|p| p.then(|v| Ok(Enriched::without_models(v)))).collect());
        };
        let collected = match pending {
            Ok(p) => {
                let m = models.clone();
                tokio::task::spawn_blocking(move || m.collect(p)).await.expect("collecting outputs does not panic")
            }
            Err(e) => Err(e),
        };
        let infos = &self.model_infos;
        // an answer that does not fit its message (the wrong size) is the models' fault: it stops
        // the batch, never dead-letters the message
        let apply = |p: Prepared, outputs: MessageOutputs| p.try_then(|v| outputs.apply(v, infos));
        match collected {
            Ok(outputs) => batch.into_iter().zip(outputs).map(|(p, o)| apply(p, o)).collect(),
            Err(Fault::Machine(gone)) if gone.is::<ModelThreadGone>() => Err(Fault::Machine(gone)),
            Err(failure) => {
                warn!(reason = %failure, messages = batch.len(), "a model failed on a batch; running its messages one by one");
                let mut inferred = Vec::with_capacity(batch.len());
                for p in batch {
                    if p.decided.valid().is_none() {
                        inferred.push(apply(p, MessageOutputs::default())?);
                        continue;
                    }
                    let m = models.clone();
                    let (p, result) = tokio::task::spawn_blocking(move || {
                        let alone = [p];
                        let result = m.submit_alone(&alone).and_then(|pending| m.collect(pending));
                        let [p] = alone;
                        (p, result)
                    })
                    .await
                    .expect("a single message does not panic");
                    let outputs = result?.pop().expect("one message, one entry");
                    inferred.push(apply(p, outputs)?);
                }
                Ok(inferred)
            }
        }
    }

    /// Writes the batch to the vector store in input order: the points of each enriched
    /// conversation, and for a tombstone the deletion of that tenant's conversation points
    /// (after the upserts before it, so a later re-creation is not deleted). Acknowledged on
    /// return. When the store rejects what it is given for its content, the batch is halved
    /// until the messages it rejects are found; they become dead-letter rejections (class
    /// `store`, any of their points already stored deleted) and the rest is written. A batch
    /// whose every message is rejected is the collection's problem: an error, like any other.
    /// `flat[bounds[i]]` are the points of `batch[i]`.
    async fn write_store(&self, batch: &mut [Message<Written>], flat: &[StorePoint], bounds: &[std::ops::Range<usize>]) -> Result<(), StoreError> {
        let writable = batch.iter().filter(|p| matches!(p.decided, Decided::Valid(_) | Decided::Tombstone(_))).count();
        self.write_bisecting(batch, flat, bounds).await?;
        let rejected = batch.iter().filter(|p| p.decided.rejection().is_some_and(|r| r.class == RejectClass::Store)).count();
        if writable > 1 && rejected == writable {
            // every message refused: the collection, not the data (changed vector size, index
            // type...); dead-lettering would move the whole stream into the DLQ
            return Err(StoreError::Permanent(format!(
                "the vector store rejected every one of {writable} messages of a batch; check the collection (qdrant.collection) — \
                 first reason: {}",
                batch.iter().find_map(|p| p.decided.rejection().map(|r| r.message.as_str())).unwrap_or_default()
            )));
        }
        Ok(())
    }

    fn write_bisecting<'a>(
        &'a self,
        batch: &'a mut [Message<Written>],
        flat: &'a [StorePoint],
        bounds: &'a [std::ops::Range<usize>],
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match self.write_in_order(batch, flat, bounds).await {
                Err(StoreError::Rejected(why)) if batch.len() == 1 => {
                    let p = &mut batch[0];
                    warn!(tp = %p.msg.tp, offset = p.msg.offset, reason = %why, "the vector store rejects this message's write");
                    // a message whose points took several requests may have some stored: none
                    // of a dead-lettered message stays searchable
                    let ids: Vec<uuid::Uuid> = flat[bounds[0].clone()].iter().map(|point| point.id).collect();
                    if !ids.is_empty() {
                        self.store.delete_points(&ids).await?;
                    }
                    p.decided = Decided::rejected(RejectClass::Store, why);
                    Ok(())
                }
                Err(StoreError::Rejected(why)) if batch.len() > 1 => {
                    debug!(messages = batch.len(), reason = %why, "the vector store rejected a write; halving it");
                    let mid = batch.len() / 2;
                    let (left, right) = batch.split_at_mut(mid);
                    let (left_bounds, right_bounds) = bounds.split_at(mid);
                    self.write_bisecting(left, flat, left_bounds).await?;
                    self.write_bisecting(right, flat, right_bounds).await
                }
                other => other,
            }
        })
    }

    /// The writes of `batch` (whose points are `flat[bounds[i]]`), in input order. A run of
    /// consecutive messages' points is one upsert (they are adjacent in `flat`), followed by one
    /// delete of the chunks their re-sent turns no longer have; a run ends before a tombstone,
    /// before a rejected message's points and before a second message of a conversation already
    /// in it (its stale-chunk delete must not run after that message's upsert).
    async fn write_in_order(&self, batch: &mut [Message<Written>], flat: &[StorePoint], bounds: &[std::ops::Range<usize>]) -> Result<(), StoreError> {
        let mut run = Run::default();
        for (p, range) in batch.iter_mut().zip(bounds) {
            match &mut p.decided {
                Decided::Valid(v) => {
                    let written = written_turns(&v.event);
                    if run.has(&written) {
                        self.write_run(flat, &mut run).await?;
                    }
                    run.add(range.clone(), written);
                }
                Decided::Tombstone(t) => {
                    self.write_run(flat, &mut run).await?;
                    // a batch halved after a rejection runs its tombstones again: what they
                    // deleted the first time counts
                    let matched = t.matched.unwrap_or(0) + self.store.delete_conversation(t.tenant.as_deref(), &t.conversation_id).await?;
                    if matched == 0 {
                        warn!(
                            tp = %p.msg.tp, offset = p.msg.offset, conversation = %t.conversation_id, tenant = ?t.tenant,
                            "a tombstone matched no point (unknown conversation, or another tenant's)"
                        );
                    }
                    t.matched = Some(matched);
                }
                // points of a message the store rejected (found by halving) are skipped: the run
                // ends before them
                Decided::Failed(_) if !range.is_empty() => self.write_run(flat, &mut run).await?,
                Decided::Failed(_) => {}
            }
        }
        self.write_run(flat, &mut run).await
    }

    /// Upserts the run's points, then deletes its turns' stale chunks; the run is empty after.
    async fn write_run(&self, flat: &[StorePoint], run: &mut Run) -> Result<(), StoreError> {
        if let Some(r) = run.points.take() {
            self.store.upsert_all(&flat[r]).await?;
        }
        self.store.delete_stale_chunks(&run.written).await?;
        run.written.clear();
        Ok(())
    }
}

/// Consecutive valid messages written together (see `StoreStage::write_in_order`).
#[derive(Default)]
struct Run {
    /// Their points in the batch's flat list.
    points: Option<std::ops::Range<usize>>,
    /// Their turns, for the stale-chunk delete.
    written: Vec<WrittenTurns>,
}

impl Run {
    /// Whether a message of the same tenant's conversation is in the run already.
    fn has(&self, w: &WrittenTurns) -> bool {
        self.written.iter().any(|o| o.conversation_id == w.conversation_id && o.tenant == w.tenant)
    }

    fn add(&mut self, points: std::ops::Range<usize>, written: WrittenTurns) {
        self.points = Some(self.points.take().map_or(points.clone(), |r| r.start..points.end));
        self.written.push(written);
    }
}

/// A message's turns with their number of chunks now (a re-sent turn replaces the old one).
fn written_turns(e: &EnrichedConversation) -> WrittenTurns {
    let turns = e
        .turns
        .iter()
        .map(|t| WrittenTurn {
            turn_id: t.turn_id.clone(),
            chunks: t.chunks.len(),
            next_chunk_id: crate::event::point_id(&e.tenant, &e.conversation_id, &t.turn_id, t.chunks.len()),
        })
        .collect();
    WrittenTurns { tenant: e.tenant.clone(), conversation_id: e.conversation_id.clone(), turns }
}
