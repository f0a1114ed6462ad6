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
use crate::infer::model::NerInput;
use crate::infer::runner::{ModelInput, ModelThread, NerSettings, Output, Reply};
use crate::routing::{Route, SkipReason};
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

/// The configured models (any subset of the three tasks; NER and sentiment may have several
/// models, each for its languages), each on its own thread.
pub struct Models {
    embedding: Option<Running>,
    /// In `models.ner` order (the indices of `routing::Route::Model`).
    ner: Vec<Running>,
    sentiment: Vec<Running>,
}

/// Results of one submitted micro-batch, one receiver per model that was given inputs, and
/// each message's entry in the jobs (how many inputs it gave each model).
pub struct Pending {
    embedding: Option<mpsc::Receiver<Reply>>,
    ner: Vec<Option<mpsc::Receiver<Reply>>>,
    sentiment: Vec<Option<mpsc::Receiver<Reply>>>,
    entries: Vec<Entry>,
    submitted: Instant,
}

/// One message's share of a submitted job, per model (0 for a message that is not valid).
#[derive(Debug, Clone, Default)]
struct Entry {
    embedding: usize,
    /// Per NER model.
    ner: Vec<usize>,
    /// Per sentiment model.
    sentiment: Vec<usize>,
}

/// A model thread that is gone (it panicked or stopped): the machine's fault, carried in a
/// `Fault::Machine`; a batch that meets it is not retried message by message.
#[derive(Debug, thiserror::Error)]
#[error("the {0} model thread stopped")]
pub struct ModelThreadGone(pub &'static str);

/// One model's outputs for one message: those of the turns routed to it, in turn order.
#[derive(Debug, Default)]
pub struct ModelOutputs<T> {
    /// The model's configured name (said on each entity and sentiment).
    pub model: String,
    pub outputs: Vec<T>,
}

/// One message's own model outputs (None: the task has no model).
#[derive(Debug, Default)]
pub struct MessageOutputs {
    /// Per NER model (in `models.ner` order): one entity list per turn routed to it.
    entities: Option<Vec<ModelOutputs<Vec<Entity>>>>,
    /// Per sentiment model: one 1-to-n-star distribution per turn routed to it.
    probabilities: Option<Vec<ModelOutputs<Vec<f32>>>>,
    /// One vector per chunk, in event order.
    dense: Option<Vec<Vec<f32>>>,
}

impl Drop for Models {
    /// Every model thread is cancelled before any is dropped (each drop waits a little for its
    /// thread): their jobs at hand stop together.
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Models {
    /// Stops every model thread's work (`ModelThread::cancel`): for a stopping worker once the
    /// pipeline has ended, so batches nobody waits for any more give the CPU back to the rest
    /// of the shutdown (the last commit, the flushes) instead of running to their end.
    pub fn cancel(&self) {
        for running in self.embedding.iter().chain(&self.ner).chain(&self.sentiment) {
            running.thread.cancel();
        }
    }

    /// Starts one thread per configured model; with `load_strategy: eager` each is loaded and
    /// warmed up before this returns. None when no model is configured.
    pub fn new(models: &ModelsConfig, gpu: &GpuConfig) -> Result<Option<Self>> {
        if models.embedding.is_none() && models.ner.is_empty() && models.sentiment.is_empty() {
            return Ok(None);
        }
        // the routes are checked here too (and by the prepare stage, which uses them)
        crate::routing::Routes::new("ner", &models.ner.0)?;
        crate::routing::Routes::new("sentiment", &models.sentiment.0)?;
        if let Some(e) = &models.embedding {
            crate::routing::Routes::covering_all("embedding", e)?;
        }
        let device = crate::infer::device::parse_device(&gpu.device)?;
        if models.stand_in {
            tracing::warn!("models.stand_in: the models are zero-cost stand-ins (a benchmark double): outputs are placeholders");
        } else {
            crate::infer::device::configure(device, gpu)?;
        }
        let eager = models.load_strategy == LoadStrategy::Eager;
        let start = |cfg: &ModelConfig, task: Task, label: &str| -> Result<Running> {
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
            Ok(Running { thread, info })
        };
        Ok(Some(Self {
            embedding: models.embedding.as_ref().map(|c| start(c, Task::Embedding, "embedding")).transpose()?,
            ner: models.ner.iter().map(|c| start(c, Task::TokenClassification, "ner")).collect::<Result<_>>()?,
            sentiment: models.sentiment.iter().map(|c| start(c, Task::SequenceClassification, "sentiment")).collect::<Result<_>>()?,
        }))
    }

    fn running(&self) -> impl Iterator<Item = &Running> {
        self.embedding.iter().chain(&self.ner).chain(&self.sentiment)
    }

    /// True once every model is loaded and warm (readiness).
    pub fn ready(&self) -> bool {
        self.running().all(|r| r.thread.is_loaded())
    }

    pub fn infos(&self) -> Vec<ModelInfo> {
        self.running().map(|r| r.info.clone()).collect()
    }

    /// Queues the model inputs of every valid message of `batch` on the model threads at once
    /// (each message one entry of each job; the messages keep their inputs) and returns without
    /// waiting. Each NER and sentiment model gets the turns routed to it from the whole batch
    /// (a model no turn of the batch went to gets no job).
    pub fn submit(&self, batch: &[Prepared]) -> Result<Pending, Fault> {
        self.submit_with(batch, false)
    }

    /// Like `submit`, each job launched on its own on its model thread (never merged with
    /// other micro-batches' jobs): a message run again alone after its batch failed.
    pub fn submit_alone(&self, batch: &[Prepared]) -> Result<Pending, Fault> {
        self.submit_with(batch, true)
    }

    fn submit_with(&self, batch: &[Prepared], alone: bool) -> Result<Pending, Fault> {
        let mut entries = Vec::with_capacity(batch.len());
        let mut embedding = vec![];
        let mut ner: Vec<Vec<Arc<NerInput>>> = self.ner.iter().map(|_| vec![]).collect();
        let mut sentiment: Vec<Vec<Vec<i64>>> = self.sentiment.iter().map(|_| vec![]).collect();
        for p in batch {
            let Some(v) = p.decided.valid() else {
                entries.push(Entry { embedding: 0, ner: vec![0; self.ner.len()], sentiment: vec![0; self.sentiment.len()] });
                continue;
            };
            let inputs = &v.inputs;
            entries.push(Entry {
                embedding: inputs.embedding.len(),
                ner: (0..self.ner.len()).map(|i| inputs.ner.count(i)).collect(),
                sentiment: (0..self.sentiment.len()).map(|i| inputs.sentiment.count(i)).collect(),
            });
            if self.embedding.is_some() {
                embedding.extend(inputs.embedding.iter().cloned());
            }
            for (job, mine) in ner.iter_mut().zip(&inputs.ner.per_model) {
                job.extend(mine.iter().cloned());
            }
            for (job, mine) in sentiment.iter_mut().zip(&inputs.sentiment.per_model) {
                job.extend(mine.iter().cloned());
            }
        }
        let submit = |r: &Running, input: ModelInput| -> Result<Option<mpsc::Receiver<Reply>>, Fault> {
            if input.is_empty() {
                return Ok(None);
            }
            let queued = if alone { r.thread.submit_alone(input) } else { r.thread.submit_input(input) };
            queued.map(Some).map_err(|_| Fault::machine(ModelThreadGone(r.info_task())))
        };
        Ok(Pending {
            ner: self.ner.iter().zip(ner).map(|(r, job)| submit(r, ModelInput::Ner(job))).collect::<Result<_, _>>()?,
            sentiment: self
                .sentiment
                .iter()
                .zip(sentiment)
                .map(|(r, job)| submit(r, ModelInput::Ids(job)))
                .collect::<Result<_, _>>()?,
            embedding: match &self.embedding {
                Some(r) => submit(r, ModelInput::Ids(embedding))?,
                None => None,
            },
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
        let unwrap_entities = |out| match out {
            Output::Entities(all) => Ok(all),
            out => Err(wrong_output("ner", &out)),
        };
        let ner = routed_outputs(&self.ner, pending.ner, entries.iter().map(|e| e.ner.as_slice()), "ner", &wait, unwrap_entities)?;
        let unwrap_probabilities = |out| match out {
            Output::Probabilities(all) => Ok(all),
            out => Err(wrong_output("sentiment", &out)),
        };
        let sentiment = routed_outputs(
            &self.sentiment,
            pending.sentiment,
            entries.iter().map(|e| e.sentiment.as_slice()),
            "sentiment",
            &wait,
            unwrap_probabilities,
        )?;
        for ((o, entities), probabilities) in outputs.iter_mut().zip(ner).zip(sentiment) {
            o.entities = entities;
            o.probabilities = probabilities;
        }
        if self.embedding.is_some() {
            let all = match wait(pending.embedding, "embedding")? {
                Some(Output::Embeddings(all)) => all,
                Some(out) => return Err(wrong_output("embedding", &out)),
                None => vec![], // no chunk in the batch
            };
            for (o, part) in outputs.iter_mut().zip(split(all, entries.iter().map(|e| e.embedding), "embedding")?) {
                o.dense = Some(part);
            }
        }
        Ok(outputs)
    }
}

/// One routed task's outputs cut per message: for each message (in order) each of the task's
/// models with the outputs of the message's turns routed to it (empty for a model that got no
/// job); None for every message when the task has no model. `counts` are the messages' input
/// counts per model.
fn routed_outputs<'a, T>(
    models: &[Running],
    receivers: Vec<Option<mpsc::Receiver<Reply>>>,
    counts: impl Iterator<Item = &'a [usize]> + Clone,
    task: &'static str,
    wait: &dyn Fn(Option<mpsc::Receiver<Reply>>, &'static str) -> Result<Option<Output>, Fault>,
    unwrap: impl Fn(Output) -> Result<Vec<T>, Fault>,
) -> Result<Vec<Option<Vec<ModelOutputs<T>>>>, Fault> {
    let messages = counts.clone().count();
    if models.is_empty() {
        return Ok((0..messages).map(|_| None).collect());
    }
    let mut per_message: Vec<Vec<ModelOutputs<T>>> = (0..messages).map(|_| Vec::with_capacity(models.len())).collect();
    for (i, (r, rx)) in models.iter().zip(receivers).enumerate() {
        let parts = match wait(rx, task)? {
            Some(out) => split(unwrap(out)?, counts.clone().map(|c| c[i]), task)?,
            None => (0..messages).map(|_| Vec::new()).collect(),
        };
        for (mine, outputs) in per_message.iter_mut().zip(parts) {
            mine.push(ModelOutputs { model: r.info.name.clone(), outputs });
        }
    }
    Ok(per_message.into_iter().map(Some).collect())
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

/// Gives each turn its output from the model it was routed to (`put`), or the reason it has
/// none (`skip`); every model's outputs must be used up exactly.
fn distribute<T>(
    turns: &mut [crate::event::EnrichedTurn],
    routes: &[Route],
    per_model: Vec<ModelOutputs<T>>,
    task: &str,
    conversation_id: &str,
    mut put: impl FnMut(&mut crate::event::EnrichedTurn, T, &str),
    mut skip: impl FnMut(&mut crate::event::EnrichedTurn, SkipReason),
) -> Result<(), Fault> {
    let mismatch = || Fault::machine(anyhow!("the {task} models' outputs do not match the turns of conversation {conversation_id}"));
    if routes.len() != turns.len() {
        return Err(mismatch());
    }
    let names: Vec<String> = per_model.iter().map(|m| m.model.clone()).collect();
    let mut outputs: Vec<std::vec::IntoIter<T>> = per_model.into_iter().map(|m| m.outputs.into_iter()).collect();
    for (turn, route) in turns.iter_mut().zip(routes) {
        match *route {
            Route::Model(i) => {
                let out = outputs.get_mut(i).and_then(Iterator::next).ok_or_else(mismatch)?;
                put(turn, out, &names[i]);
            }
            Route::Skipped(reason) => skip(turn, reason),
        }
    }
    if outputs.iter_mut().any(|rest| rest.next().is_some()) {
        return Err(mismatch());
    }
    Ok(())
}

impl MessageOutputs {
    /// Applies the message's own outputs to its conversation: entities and sentiment of each
    /// turn from the model its language was routed to (with that model's name), the reason for
    /// a turn that went to none, the trajectory and entity counts, the models; the dense
    /// vectors of its chunks.
    pub fn apply(self, v: Valid, models: &[ModelInfo]) -> Result<Enriched, Fault> {
        let Valid { conversation, mut event, inputs } = v;
        let id = event.conversation_id.clone();
        if let Some(per_model) = self.entities {
            let mut counts = std::mem::take(&mut event.entity_counts);
            distribute(
                &mut event.turns,
                &inputs.ner.routes,
                per_model,
                "ner",
                &id,
                |turn, mut entities: Vec<Entity>, model| {
                    for e in &mut entities {
                        *counts.entry(e.label.clone()).or_default() += 1;
                        e.model = Some(model.to_string());
                    }
                    turn.entities = entities;
                },
                |turn, reason| turn.entities_skipped = Some(reason.as_str().into()),
            )?;
            event.entity_counts = counts;
        }
        if let Some(per_model) = self.probabilities {
            let mut trajectory = std::mem::take(&mut event.sentiment_trajectory);
            distribute(
                &mut event.turns,
                &inputs.sentiment.routes,
                per_model,
                "sentiment",
                &id,
                |turn, probabilities: Vec<f32>, model| {
                    let (stars, score) = crate::infer::stars(&probabilities);
                    trajectory.push(SentimentPoint { turn_id: turn.turn_id.clone(), ts: turn.ts, stars, score });
                    turn.sentiment = Some(Sentiment { stars, score, probabilities, model: Some(model.to_string()) });
                },
                |turn, reason| turn.sentiment_skipped = Some(reason.as_str().into()),
            )?;
            event.sentiment_trajectory = trajectory;
        }
        if let Some(dense) = &self.dense {
            let chunks: usize = event.turns.iter().map(|t| t.chunks.len()).sum();
            if dense.len() != chunks {
                return Err(Fault::machine(anyhow!(
                    "the embedding model gave {} vectors for {chunks} of conversation {id}",
                    dense.len()
                )));
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

    fn entity(label: &str) -> Entity {
        Entity { text: "Lyon".into(), label: label.into(), start: 0, end: 4, score: 0.9, model: None }
    }

    fn one_model<T>(name: &str, outputs: Vec<T>) -> Vec<ModelOutputs<T>> {
        vec![ModelOutputs { model: name.into(), outputs }]
    }

    #[test]
    fn a_message_gets_its_own_entities_stars_and_vectors() {
        let mut v = valid(7);
        let turns = v.event.turns.len();
        let chunks: usize = v.event.turns.iter().map(|t| t.chunks.len()).sum();
        v.inputs.ner.routes = vec![Route::Model(0); turns];
        v.inputs.sentiment.routes = vec![Route::Model(0); turns];
        let outputs = MessageOutputs {
            entities: Some(one_model(
                "camembert",
                (0..turns).map(|i| if i == 0 { vec![entity("LOC"), entity("PER")] } else { vec![entity("LOC")] }).collect(),
            )),
            probabilities: Some(one_model("nlptown", vec![vec![0.0, 0.0, 0.0, 0.0, 1.0]; turns])),
            dense: Some(vec![vec![0.5; 4]; chunks]),
        };
        let info = ModelInfo { task: "ner".into(), name: "test".into(), version: "1".into() };
        let e = outputs.apply(v, std::slice::from_ref(&info)).unwrap();
        assert_eq!(e.event.turns[0].entities.len(), 2);
        assert!(e.event.turns.iter().flat_map(|t| &t.entities).all(|e| e.model.as_deref() == Some("camembert")));
        assert_eq!(e.event.entity_counts["LOC"], turns as i32);
        assert_eq!(e.event.entity_counts["PER"], 1);
        assert_eq!(e.event.sentiment_trajectory.len(), turns);
        assert!(e.event.turns.iter().all(|t| t.sentiment.as_ref().is_some_and(|s| s.stars == 5 && s.model.as_deref() == Some("nlptown"))));
        assert!(e.event.turns.iter().all(|t| t.entities_skipped.is_none() && t.sentiment_skipped.is_none()));
        assert_eq!(e.dense.map(|d| d.len()), Some(chunks));
        assert_eq!(e.event.models, vec![info]);
    }

    #[test]
    fn routed_turns_get_their_own_model_s_output_and_skipped_ones_the_reason() {
        let mut v = valid(9);
        let turns = v.event.turns.len();
        assert!(turns >= 3, "the sample has {turns} turns");
        // turn 0 → model 1, turn 1 skipped, the rest → model 0
        let routes: Vec<Route> = (0..turns)
            .map(|i| match i {
                0 => Route::Model(1),
                1 => Route::Skipped(SkipReason::UnsupportedLanguage),
                _ => Route::Model(0),
            })
            .collect();
        v.inputs.ner.routes = routes.clone();
        v.inputs.sentiment.routes = routes;
        let outputs = MessageOutputs {
            entities: Some(vec![
                ModelOutputs { model: "camembert".into(), outputs: vec![vec![entity("LOC")]; turns - 2] },
                ModelOutputs { model: "xlmr".into(), outputs: vec![vec![entity("DATE")]] },
            ]),
            probabilities: Some(vec![
                ModelOutputs { model: "nlptown".into(), outputs: vec![vec![1.0, 0.0, 0.0, 0.0, 0.0]; turns - 2] },
                ModelOutputs { model: "other".into(), outputs: vec![vec![0.0, 0.0, 0.0, 0.0, 1.0]] },
            ]),
            dense: None,
        };
        let e = outputs.apply(v, &[]).unwrap().event;
        assert_eq!(e.turns[0].entities[0].model.as_deref(), Some("xlmr"));
        assert_eq!(e.turns[0].entities[0].label, "DATE");
        assert_eq!(e.turns[0].sentiment.as_ref().map(|s| (s.stars, s.model.clone())), Some((5, Some("other".into()))));
        assert!(e.turns[1].entities.is_empty() && e.turns[1].sentiment.is_none());
        assert_eq!(e.turns[1].entities_skipped.as_deref(), Some("unsupported-language"));
        assert_eq!(e.turns[1].sentiment_skipped.as_deref(), Some("unsupported-language"));
        assert!(e.turns[2..].iter().all(|t| t.entities[0].model.as_deref() == Some("camembert") && t.entities_skipped.is_none()));
        assert_eq!(e.sentiment_trajectory.len(), turns - 1, "a skipped turn has no point");
        assert_eq!(e.entity_counts["LOC"], turns as i32 - 2);
        assert_eq!(e.entity_counts["DATE"], 1);
    }

    #[test]
    fn an_answer_of_the_wrong_size_is_the_machine_s_fault_not_the_message_s() {
        let mut v = valid(8);
        let turns = v.event.turns.len();
        v.inputs.sentiment.routes = vec![Route::Model(0); turns];
        let outputs = MessageOutputs { probabilities: Some(one_model("s", vec![vec![0.2; 5]; turns + 1])), ..Default::default() };
        let fault = outputs.apply(v, &[]).err().expect("refused");
        assert!(matches!(&fault, Fault::Machine(e) if e.to_string().contains("sentiment models' outputs do not match")), "{fault}");
        let mut v = valid(8);
        v.inputs.ner.routes = vec![Route::Model(1); turns];
        let outputs = MessageOutputs { entities: Some(one_model("n", vec![vec![]; turns])), ..Default::default() };
        assert!(matches!(outputs.apply(v, &[]), Err(Fault::Machine(_))), "a route to a model that gave nothing");
    }
}
