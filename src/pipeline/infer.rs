//! The infer stage: `Models` holds the configured models, each on its own thread (and CUDA
//! stream); the stage submits each prepared micro-batch to all of them at once and goes on
//! with the next one; the store stage collects the outputs in order and applies them to the
//! events: entities and sentiment of every turn, the per-conversation sentiment trajectory and
//! entity counts, dense vectors of every chunk, model versions.

use std::sync::{Arc, mpsc};
use std::time::Instant;

use anyhow::{Context, Result};

use super::prepare::{Decided, ModelInputs, Prepared};
use super::stage::{Flight, STAGE_INFER, record_depth};
use crate::config::{GpuConfig, LoadStrategy, ModelConfig, ModelsConfig};
use crate::event::{EnrichedConversation, Entity, ModelInfo, Sentiment, SentimentPoint};
use crate::infer::manager::ManagedModel;
use crate::fault::Fault;
use crate::infer::runner::{ModelInput, ModelThread, NerSettings, Output, Reply};
use crate::infer::{ModelFolder, Task};

/// A configured model on its own thread, with what the events report about it.
struct Running {
    thread: ModelThread,
    info: ModelInfo,
}

/// The configured models (any subset of the three), each on its own thread.
pub struct Models {
    embedding: Option<Running>,
    ner: Option<Running>,
    sentiment: Option<Running>,
}

/// Results of one submitted micro-batch, one receiver per model.
pub struct Pending {
    embedding: Option<mpsc::Receiver<Reply>>,
    ner: Option<mpsc::Receiver<Reply>>,
    sentiment: Option<mpsc::Receiver<Reply>>,
    submitted: Instant,
}

/// A model thread that is gone (it panicked or stopped): the machine's fault, carried in a
/// `Fault::Machine`; a batch that meets it is not retried message by message.
#[derive(Debug, thiserror::Error)]
#[error("the {0} model thread stopped")]
pub struct ModelThreadGone(pub &'static str);

/// Model outputs of a micro-batch, in submission order.
#[derive(Default)]
pub struct Outputs {
    entities: Option<std::vec::IntoIter<Vec<Entity>>>,
    probabilities: Option<std::vec::IntoIter<Vec<f32>>>,
    dense: Option<std::vec::IntoIter<Vec<f32>>>,
}

impl Models {
    /// Starts one thread per configured model; with `load_strategy: eager` each is loaded and
    /// warmed up before this returns. None when no model is configured.
    pub fn new(models: &ModelsConfig, gpu: &GpuConfig) -> Result<Option<Self>> {
        if models.embedding.is_none() && models.ner.is_none() && models.sentiment.is_none() {
            return Ok(None);
        }
        let device = crate::infer::device::parse_device(&gpu.device)?;
        if models.stand_in {
            tracing::warn!("models.stand_in: the models are zero-cost stand-ins (a benchmark double): outputs are placeholders");
        } else {
            crate::infer::device::configure(device, gpu)?;
        }
        let eager = models.load_strategy == LoadStrategy::Eager;
        let start = |cfg: &Option<ModelConfig>, task: Task, label: &str| -> Result<Option<Running>> {
            let Some(cfg) = cfg else { return Ok(None) };
            let folder = ModelFolder::open(&cfg.path).with_context(|| format!("the {label} model {}", cfg.name))?;
            let version = folder.content_version().with_context(|| format!("reading {}", cfg.path.display()))?;
            let thread = if models.stand_in {
                ModelThread::spawn_stand_in(task, cfg.name.clone(), &folder.config)?
            } else {
                let managed = ManagedModel::new(task, cfg.clone(), device)?;
                ModelThread::spawn(managed, eager, NerSettings::default())
                    .with_context(|| format!("starting the {label} model {}", cfg.name))?
            };
            let info = ModelInfo { task: label.into(), name: cfg.name.clone(), version };
            Ok(Some(Running { thread, info }))
        };
        Ok(Some(Self {
            embedding: start(&models.embedding, Task::Embedding, "embedding")?,
            ner: start(&models.ner, Task::TokenClassification, "ner")?,
            sentiment: start(&models.sentiment, Task::SequenceClassification, "sentiment")?,
        }))
    }

    fn running(&self) -> impl Iterator<Item = &Running> {
        [&self.embedding, &self.ner, &self.sentiment].into_iter().flatten()
    }

    /// True once every model is loaded and warm (readiness).
    pub fn ready(&self) -> bool {
        self.running().all(|r| r.thread.is_loaded())
    }

    pub fn infos(&self) -> Vec<ModelInfo> {
        self.running().map(|r| r.info.clone()).collect()
    }

    /// Queues the model inputs of every valid message of `batch` (taken out of it) on every
    /// model thread at once and returns without waiting.
    pub fn submit(&self, batch: &mut [Prepared]) -> Result<Pending, Fault> {
        let (mut all, mut ner) = (ModelInputs::default(), Vec::new());
        for p in batch.iter_mut() {
            if let Decided::Valid(v) = &mut p.decided {
                let inputs = std::mem::take(&mut v.inputs);
                all.embedding.extend(inputs.embedding);
                ner.extend(inputs.ner.into_iter().map(Arc::new));
                all.sentiment.extend(inputs.sentiment);
            }
        }
        let submit = |m: &Option<Running>, input: ModelInput| -> Result<Option<mpsc::Receiver<Reply>>, Fault> {
            match m {
                Some(r) => r.thread.submit_input(input).map(Some).map_err(|_| Fault::machine(ModelThreadGone(r.info_task()))),
                None => Ok(None),
            }
        };
        Ok(Pending {
            ner: submit(&self.ner, ModelInput::Ner(ner))?,
            sentiment: submit(&self.sentiment, ModelInput::Ids(all.sentiment))?,
            embedding: submit(&self.embedding, ModelInput::Ids(all.embedding))?,
            submitted: Instant::now(),
        })
    }

    /// Waits for a submitted micro-batch's outputs (blocking).
    pub fn collect(&self, pending: Pending) -> Result<Outputs, Fault> {
        let submitted = pending.submitted;
        let wait = |rx: Option<mpsc::Receiver<Reply>>, task: &'static str| -> Result<Option<Output>, Fault> {
            let Some(rx) = rx else { return Ok(None) };
            let reply = rx.recv().map_err(|_| Fault::machine(ModelThreadGone(task)))?;
            let (out, _) = reply.map_err(|e| match e {
                Fault::Data(r) => Fault::data(r.class, format!("the {task} model failed on this input: {}", r.message)),
                Fault::Machine(e) => Fault::Machine(e.context(format!("the {task} model failed"))),
            })?;
            // submit → result: includes queueing behind earlier micro-batches and other models
            metrics::histogram!(crate::telemetry::MODEL_SECONDS, "task" => task).record(submitted.elapsed().as_secs_f64());
            Ok(Some(out))
        };
        let mut outputs = Outputs::default();
        if let Some(out) = wait(pending.ner, "ner")? {
            let Output::Entities(e) = out else { unreachable!("the NER thread returns entities") };
            outputs.entities = Some(e.into_iter());
        }
        if let Some(out) = wait(pending.sentiment, "sentiment")? {
            let Output::Probabilities(p) = out else { unreachable!("the sentiment thread returns probabilities") };
            outputs.probabilities = Some(p.into_iter());
        }
        if let Some(out) = wait(pending.embedding, "embedding")? {
            let Output::Embeddings(d) = out else { unreachable!("the embedding thread returns embeddings") };
            outputs.dense = Some(d.into_iter());
        }
        Ok(outputs)
    }
}

impl Running {
    fn info_task(&self) -> &'static str {
        crate::infer::runner::task_name(self.thread.task)
    }
}

impl Outputs {
    /// Gives one valid conversation its share of the outputs (in submission order): entities and
    /// sentiment per turn, the trajectory and entity counts, the models; the dense vectors of
    /// its chunks are returned.
    pub fn apply(&mut self, event: &mut EnrichedConversation, models: &[ModelInfo]) -> Option<Vec<Vec<f32>>> {
        if let Some(all) = &mut self.entities {
            for turn in &mut event.turns {
                turn.entities = all.next().expect("one entity list per turn");
                for e in &turn.entities {
                    *event.entity_counts.entry(e.label.clone()).or_default() += 1;
                }
            }
        }
        if let Some(all) = &mut self.probabilities {
            for turn in &mut event.turns {
                let probabilities = all.next().expect("one distribution per turn");
                let (stars, score) = crate::infer::stars(&probabilities);
                event.sentiment_trajectory.push(SentimentPoint { turn_id: turn.turn_id.clone(), ts: turn.ts, stars, score });
                turn.sentiment = Some(Sentiment { stars, score, probabilities });
            }
        }
        event.models = models.to_vec();
        let chunks: usize = event.turns.iter().map(|t| t.chunks.len()).sum();
        self.dense.as_mut().map(|d| d.by_ref().take(chunks).collect())
    }
}


/// A prepared micro-batch whose model inputs are queued on the model threads.
pub struct InFlight {
    pub batch: Vec<Prepared>,
    /// The models' results (None without models).
    pub pending: Option<Result<Pending, Fault>>,
    /// When the batch was submitted to the models (for the enrichment latency).
    pub submitted: std::time::Instant,
}

/// The infer stage: queues each prepared batch on the model threads (which run their jobs in
/// order, each on its own CUDA stream) and passes it on without waiting for the results. It
/// first takes a place in the write stage's queue, so at most `batches_in_flight` batches wait
/// on the models ahead of the one being written.
pub async fn submit_batches(
    mut rx: tokio::sync::mpsc::Receiver<Vec<Prepared>>,
    tx: tokio::sync::mpsc::Sender<InFlight>,
    models: Option<Arc<Models>>,
    flight: Arc<Flight>,
) {
    while let Some(mut batch) = rx.recv().await {
        record_depth(STAGE_INFER, rx.len());
        if flight.is_abandoned() {
            flight.ended(); // not run: nothing of it could be completed
            continue;
        }
        let submitted = std::time::Instant::now();
        let Ok(permit) = tx.reserve().await else { return };
        let pending = models.as_ref().map(|m| m.submit(&mut batch));
        permit.send(InFlight { batch, pending, submitted });
    }
}
