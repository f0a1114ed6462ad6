//! The infer stage: `Models` holds the configured models, each on its own thread (and CUDA
//! stream); the stage submits each prepared micro-batch to all of them at once and goes on
//! with the next one. Each message's inputs are one entry of the batch's job on every model,
//! and each message gets its own outputs back (`MessageOutputs`, as text-embeddings-inference
//! answers each queued entry); the store stage applies them: entities and sentiment of every
//! turn, the per-conversation sentiment trajectory and entity counts, dense vectors of every
//! chunk, model versions. A message keeps its inputs until then, so a batch that fails runs
//! again message by message without anything being decoded again.

use std::sync::{Arc, mpsc};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};

use super::message::Message;
use super::prepare::{Prepared, Valid};
use super::stage::{Flight, STAGE_INFER, record_depth};
use crate::config::{GpuConfig, LoadStrategy, ModelConfig, ModelsConfig};
use crate::event::{Conversation, EnrichedConversation, Entity, ModelInfo, Sentiment, SentimentPoint};
use crate::fault::Fault;
use crate::infer::manager::ManagedModel;
use crate::infer::runner::{ModelInput, ModelThread, NerSettings, Output, Reply};
use crate::infer::{ModelFolder, Task};

/// A valid conversation with the models' outputs applied, for the store stage.
pub struct Enriched {
    pub conversation: Conversation,
    pub event: EnrichedConversation,
    /// The dense vector of each chunk (None without an embedding model).
    pub dense: Option<Vec<Vec<f32>>>,
}

impl Enriched {
    /// A conversation of a worker without models: its text enrichment only.
    pub fn without_models(v: Valid) -> Self {
        Enriched { conversation: v.conversation, event: v.event, dense: None }
    }
}

/// A message after the infer stage.
pub type Inferred = Message<Enriched>;

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

/// Results of one submitted micro-batch, one receiver per model, and each message's entry in
/// the jobs (how many inputs it gave each model).
pub struct Pending {
    embedding: Option<mpsc::Receiver<Reply>>,
    ner: Option<mpsc::Receiver<Reply>>,
    sentiment: Option<mpsc::Receiver<Reply>>,
    entries: Vec<Entry>,
    submitted: Instant,
}

/// One message's share of a submitted job, per model (0 for a message that is not valid).
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    embedding: usize,
    ner: usize,
    sentiment: usize,
}

/// A model thread that is gone (it panicked or stopped): the machine's fault, carried in a
/// `Fault::Machine`; a batch that meets it is not retried message by message.
#[derive(Debug, thiserror::Error)]
#[error("the {0} model thread stopped")]
pub struct ModelThreadGone(pub &'static str);

/// One message's own model outputs (None: the model is not configured).
#[derive(Debug, Default)]
pub struct MessageOutputs {
    /// One entity list per turn.
    entities: Option<Vec<Vec<Entity>>>,
    /// One 1-to-n-star distribution per turn.
    probabilities: Option<Vec<Vec<f32>>>,
    /// One vector per chunk, in event order.
    dense: Option<Vec<Vec<f32>>>,
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

    /// Queues the model inputs of every valid message of `batch` on every model thread at once
    /// (each message one entry of the job; the messages keep their inputs) and returns without
    /// waiting.
    pub fn submit(&self, batch: &[Prepared]) -> Result<Pending, Fault> {
        let mut entries = Vec::with_capacity(batch.len());
        let (mut embedding, mut ner, mut sentiment) = (vec![], vec![], vec![]);
        for p in batch {
            let Some(v) = p.decided.valid() else {
                entries.push(Entry::default());
                continue;
            };
            let inputs = &v.inputs;
            entries.push(Entry { embedding: inputs.embedding.len(), ner: inputs.ner.len(), sentiment: inputs.sentiment.len() });
            if self.embedding.is_some() {
                embedding.extend(inputs.embedding.iter().cloned());
            }
            if self.ner.is_some() {
                ner.extend(inputs.ner.iter().cloned());
            }
            if self.sentiment.is_some() {
                sentiment.extend(inputs.sentiment.iter().cloned());
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
            sentiment: submit(&self.sentiment, ModelInput::Ids(sentiment))?,
            embedding: submit(&self.embedding, ModelInput::Ids(embedding))?,
            entries,
            submitted: Instant::now(),
        })
    }

    /// Waits for a submitted micro-batch's outputs (blocking): each message's own, in order.
    pub fn collect(&self, pending: Pending) -> Result<Vec<MessageOutputs>, Fault> {
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
        let entries = pending.entries;
        let mut outputs: Vec<MessageOutputs> = entries.iter().map(|_| MessageOutputs::default()).collect();
        if let Some(out) = wait(pending.ner, "ner")? {
            let Output::Entities(all) = out else { return Err(wrong_output("ner", &out)) };
            for (o, part) in outputs.iter_mut().zip(split(all, entries.iter().map(|e| e.ner), "ner")?) {
                o.entities = Some(part);
            }
        }
        if let Some(out) = wait(pending.sentiment, "sentiment")? {
            let Output::Probabilities(all) = out else { return Err(wrong_output("sentiment", &out)) };
            for (o, part) in outputs.iter_mut().zip(split(all, entries.iter().map(|e| e.sentiment), "sentiment")?) {
                o.probabilities = Some(part);
            }
        }
        if let Some(out) = wait(pending.embedding, "embedding")? {
            let Output::Embeddings(all) = out else { return Err(wrong_output("embedding", &out)) };
            for (o, part) in outputs.iter_mut().zip(split(all, entries.iter().map(|e| e.embedding), "embedding")?) {
                o.dense = Some(part);
            }
        }
        Ok(outputs)
    }
}

/// A model thread that answered with another kind of output than its task's.
fn wrong_output(task: &'static str, out: &Output) -> Fault {
    let kind = match out {
        Output::Embeddings(_) => "embeddings",
        Output::Entities(_) => "entities",
        Output::Probabilities(_) => "probabilities",
    };
    Fault::machine(anyhow!("the {task} model thread answered with {kind}"))
}

/// A job's outputs cut into each entry's own, in order: `sizes` are the entries' input counts.
fn split<T>(all: Vec<T>, sizes: impl Iterator<Item = usize> + Clone, task: &'static str) -> Result<Vec<Vec<T>>, Fault> {
    let expected: usize = sizes.clone().sum();
    if all.len() != expected {
        return Err(Fault::machine(anyhow!("the {task} model returned {} outputs for {expected} inputs", all.len())));
    }
    let mut rest = all.into_iter();
    Ok(sizes.map(|n| rest.by_ref().take(n).collect()).collect())
}

impl Running {
    fn info_task(&self) -> &'static str {
        crate::infer::runner::task_name(self.thread.task)
    }
}

impl MessageOutputs {
    /// Applies the message's own outputs to its conversation: entities and sentiment per turn,
    /// the trajectory and entity counts, the models; the dense vectors of its chunks.
    pub fn apply(self, v: Valid, models: &[ModelInfo]) -> Result<Enriched, Fault> {
        let Valid { conversation, mut event, .. } = v;
        let turns = event.turns.len();
        let id = event.conversation_id.clone();
        let mismatch = |task: &str, what: &str, got: usize, expected: usize| {
            Fault::machine(anyhow!("the {task} model gave {got} {what} for {expected} of conversation {id}"))
        };
        if let Some(all) = self.entities {
            if all.len() != turns {
                return Err(mismatch("ner", "entity lists", all.len(), turns));
            }
            for (turn, entities) in event.turns.iter_mut().zip(all) {
                for e in &entities {
                    *event.entity_counts.entry(e.label.clone()).or_default() += 1;
                }
                turn.entities = entities;
            }
        }
        if let Some(all) = self.probabilities {
            if all.len() != turns {
                return Err(mismatch("sentiment", "distributions", all.len(), turns));
            }
            for (turn, probabilities) in event.turns.iter_mut().zip(all) {
                let (stars, score) = crate::infer::stars(&probabilities);
                event.sentiment_trajectory.push(SentimentPoint { turn_id: turn.turn_id.clone(), ts: turn.ts, stars, score });
                turn.sentiment = Some(Sentiment { stars, score, probabilities });
            }
        }
        if let Some(dense) = &self.dense {
            let chunks: usize = event.turns.iter().map(|t| t.chunks.len()).sum();
            if dense.len() != chunks {
                return Err(mismatch("embedding", "vectors", dense.len(), chunks));
            }
        }
        event.models = models.to_vec();
        Ok(Enriched { conversation, event, dense: self.dense })
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
    while let Some(batch) = rx.recv().await {
        record_depth(STAGE_INFER, rx.len());
        if flight.is_abandoned() {
            flight.ended(); // not run: nothing of it could be completed
            continue;
        }
        let submitted = std::time::Instant::now();
        let Ok(permit) = tx.reserve().await else { return };
        let pending = models.as_ref().map(|m| m.submit(&batch));
        permit.send(InFlight { batch, pending, submitted });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bm25Params;
    use crate::event::SourceRef;
    use crate::pipeline::chunk::{Chunker, builtin_tokenizer};
    use crate::pipeline::prepare::ModelInputs;
    use crate::pipeline::text::TextEnricher;
    use crate::sample::SampleGenerator;

    fn valid(seed: u64) -> Valid {
        let enricher = TextEnricher::new(Chunker::new(builtin_tokenizer(), 6, 2).unwrap(), Bm25Params::default());
        let conversation = SampleGenerator::new(seed).conversation(1);
        let event = enricher.enrich(&conversation, SourceRef { topic: "in".into(), partition: 0, offset: 1 }).unwrap().event;
        Valid { conversation, event, inputs: ModelInputs::default() }
    }

    #[test]
    fn a_job_s_outputs_go_back_to_the_entries_that_gave_its_inputs() {
        let parts = split((0..7).collect::<Vec<i32>>(), [3, 0, 4].into_iter(), "ner").unwrap();
        assert_eq!(parts, vec![vec![0, 1, 2], vec![], vec![3, 4, 5, 6]]);
        let wrong = split((0..6).collect::<Vec<i32>>(), [3, 0, 4].into_iter(), "ner").unwrap_err();
        assert!(matches!(&wrong, Fault::Machine(e) if e.to_string().contains("6 outputs for 7 inputs")), "{wrong}");
    }

    #[test]
    fn a_message_gets_its_own_entities_stars_and_vectors() {
        let v = valid(7);
        let turns = v.event.turns.len();
        let chunks: usize = v.event.turns.iter().map(|t| t.chunks.len()).sum();
        let entity = |label: &str| Entity { text: "Lyon".into(), label: label.into(), start: 0, end: 4, score: 0.9 };
        let outputs = MessageOutputs {
            entities: Some((0..turns).map(|i| if i == 0 { vec![entity("LOC"), entity("PER")] } else { vec![entity("LOC")] }).collect()),
            probabilities: Some(vec![vec![0.0, 0.0, 0.0, 0.0, 1.0]; turns]),
            dense: Some(vec![vec![0.5; 4]; chunks]),
        };
        let info = ModelInfo { task: "ner".into(), name: "test".into(), version: "1".into() };
        let e = outputs.apply(v, std::slice::from_ref(&info)).unwrap();
        assert_eq!(e.event.turns[0].entities.len(), 2);
        assert_eq!(e.event.entity_counts["LOC"], turns as i32);
        assert_eq!(e.event.entity_counts["PER"], 1);
        assert_eq!(e.event.sentiment_trajectory.len(), turns);
        assert!(e.event.turns.iter().all(|t| t.sentiment.as_ref().is_some_and(|s| s.stars == 5)));
        assert_eq!(e.dense.map(|d| d.len()), Some(chunks));
        assert_eq!(e.event.models, vec![info]);
    }

    #[test]
    fn an_answer_of_the_wrong_size_is_the_machine_s_fault_not_the_message_s() {
        let v = valid(8);
        let turns = v.event.turns.len();
        let outputs = MessageOutputs { probabilities: Some(vec![vec![0.2; 5]; turns + 1]), ..Default::default() };
        let fault = outputs.apply(v, &[]).err().expect("refused");
        assert!(matches!(&fault, Fault::Machine(e) if e.to_string().contains("distributions")), "{fault}");
    }
}
