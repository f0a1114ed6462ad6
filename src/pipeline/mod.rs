//! The stages between the Kafka source and the sinks, one file each — batch → prepare (`text`
//! is its model-free enrichment) → infer → build and store (`store`) → emit — and
//! `Pipeline::run`, which spawns them, connects them by bounded channels and joins them.

pub mod batch;
pub mod bm25;
pub mod breaker;
pub mod chunk;
pub mod emit;
pub mod infer;
pub mod message;
pub mod prepare;
pub mod stage;
pub mod store;
pub mod text;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::mpsc;
use tracing::{Instrument, warn};

use crate::config::PipelineConfig;
use crate::shutdown::{SOURCE_LEFT_BEHIND, ShutdownClock};
use crate::source::InboundMessage;
use emit::Emitter;
use prepare::Preparer;
use stage::{Flight, STAGE_BUILD, STAGE_STORE, record_depth};
use store::{Built, StoreStage};

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub enriched: u64,
    /// Points upserted to the vector store (the writer's count).
    pub points: u64,
    pub dead_lettered: u64,
    pub tombstones: u64,
}

/// The stages, ready to run.
pub struct Pipeline {
    /// The shutdown's deadline: past it (less `SOURCE_LEFT_BEHIND`) the pipeline stops
    /// without waiting for the source to leave.
    pub shutdown: ShutdownClock,
    /// The prepare stage's decoder, validator and tokenizers.
    pub preparer: Arc<Preparer>,
    /// The build and store stages (build on a task of its own, store on `run`'s).
    pub store: Arc<StoreStage>,
    /// The emit stage (moved into its task by `run`).
    pub emitter: Option<Emitter>,
}

impl Pipeline {
    /// The stages, each a task connected to the next by a bounded channel, so several
    /// micro-batches are in flight and every stage works at once: batch → prepare (CPU cores)
    /// → infer (queues each batch on the model threads and goes on) → build (model outputs,
    /// events encoded, points built) → store (this task: points upserted) → emit (output
    /// topic / DLQ, completion), all in input order.
    /// A full channel stops the stage before it, and in the end the source pauses its
    /// partitions.
    pub async fn run(mut self, rx: mpsc::Receiver<InboundMessage>, p: &PipelineConfig) -> (Stats, Option<anyhow::Error>) {
        let (batch_tx, batch_rx) = mpsc::channel(1);
        let (prepared_tx, prepared_rx) = mpsc::channel(p.prepare_workers);
        let (inflight_tx, mut inflight_rx) = mpsc::channel(p.batches_in_flight);
        let linger = Duration::from_millis(p.max_batch_wait_ms);
        let flight = Arc::new(Flight::default());
        let stages = [
            tokio::spawn({
                let (flight, preparer) = (flight.clone(), self.preparer.clone());
                let (max, room) = (p.max_batch_messages, p.batches_in_flight);
                async move {
                    batch::form_batches(rx, batch_tx, flight, max, room, linger).await;
                    // the source is gone: a lookup waiting for the registry gives up
                    preparer.interrupt();
                }
            }),
            tokio::spawn(prepare::prepare_batches(batch_rx, prepared_tx, self.preparer.clone(), self.store.shared.clone(), flight.clone(), p.prepare_workers)),
            tokio::spawn(infer::submit_batches(prepared_rx, inflight_tx, self.store.models.clone(), flight.clone())),
        ];
        // The batch stage notices the source's leaving only while it waits for messages; a stage
        // busy elsewhere (a full channel) must not keep the rest waiting on models or the store.
        // A source that has not left by shortly before the shutdown deadline is stuck (its poll
        // thread waits in librdkafka for a broker that does not answer): the pipeline stops
        // without it; what it did not complete stays uncommitted and is re-read.
        let source_watch = tokio::spawn({
            let (shared, flight, clock) = (self.store.shared.clone(), flight.clone(), self.shutdown.clone());
            async move {
                loop {
                    if shared.lock().left {
                        break;
                    }
                    if clock.stopping() && clock.remaining(SOURCE_LEFT_BEHIND).is_zero() {
                        warn!(
                            "the Kafka source has not left by the shutdown deadline (blocked on an unresponsive broker?): \
                             the pipeline stops without it; unfinished work stays uncommitted and is re-read"
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                flight.abandon();
            }
        });
        // one batch built ahead of the one being written
        let (built_tx, mut built_rx) = mpsc::channel::<Built>(1);
        let build = tokio::spawn({
            let (stage, flight) = (self.store.clone(), flight.clone());
            async move {
                while let Some(inflight) = inflight_rx.recv().await {
                    record_depth(STAGE_BUILD, inflight_rx.len());
                    let span = tracing::info_span!("batch", messages = inflight.batch.len(), queued = inflight_rx.len());
                    let built = stage.unless_stopping(&flight, stage.build(inflight).instrument(span)).await;
                    let forwarded = match built {
                        Some(built) => built_tx.send(built).await.is_ok(),
                        None => false,
                    };
                    if !forwarded {
                        flight.ended();
                    }
                }
            }
        });
        let (stored_tx, stored_rx) = mpsc::channel(2);
        let emitter = self.emitter.take().expect("run once");
        let emit = tokio::spawn(emitter.run(stored_rx, flight.clone()));
        while let Some(built) = built_rx.recv().await {
            record_depth(STAGE_STORE, built_rx.len());
            let span = tracing::info_span!("batch", messages = built.messages(), queued = built_rx.len());
            let stored = self.store.unless_stopping(&flight, self.store.store(built).instrument(span)).await;
            let forwarded = match stored {
                Some(stored) => stored_tx.send(stored).await.is_ok(),
                None => false,
            };
            if !forwarded {
                flight.ended();
            }
        }
        drop(stored_tx);
        source_watch.abort();
        for stage in stages.into_iter().chain([build]) {
            if let Err(e) = stage.await
                && e.is_panic()
            {
                self.store.halt.trip(anyhow!("a pipeline stage panicked: {e}"));
            }
        }
        let emitted = match emit.await {
            Ok(emitted) => emitted,
            Err(e) => {
                self.store.halt.trip(anyhow!("the emit stage panicked: {e}"));
                Default::default()
            }
        };
        let stats = Stats {
            enriched: emitted.enriched,
            points: self.store.store.counters.upserted_points.load(Ordering::Relaxed),
            dead_lettered: emitted.dead_lettered,
            tombstones: emitted.tombstones,
        };
        (stats, self.store.halt.take())
    }
}
