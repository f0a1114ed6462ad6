//! One OS thread per model. Each thread owns its model (tch tensors are `Send`, not `Sync`),
//! loads it at start or at first use (`ManagedModel`), and on CUDA makes a stream from
//! libtorch's pool current for everything it runs — so NER, sentiment and embeddings overlap on
//! one GPU. Callers submit texts and get a receiver for the result, so the three models work at
//! the same time on one micro-batch.

use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow};

use super::Task;
use super::batch::{BatchStats, Budget};
use super::manager::{LoadReport, ManagedModel};
use super::ner::Aggregation;
use crate::event::Entity;

/// What a model thread returns for a batch of texts.
#[derive(Debug)]
pub enum Output {
    Embeddings(Vec<Vec<f32>>),
    Entities(Vec<Vec<Entity>>),
    Probabilities(Vec<Vec<f32>>),
}

type Reply = mpsc::Sender<Result<(Output, BatchStats)>>;

struct Job {
    texts: Vec<String>,
    reply: Reply,
}

pub struct ModelThread {
    pub task: Task,
    pub name: String,
    jobs: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    /// Behind a mutex so the thread handle can be shared (`Sync`) by the enrichment stage.
    report: std::sync::Mutex<mpsc::Receiver<LoadReport>>,
    loaded: std::sync::OnceLock<LoadReport>,
}

/// NER settings of a model thread.
#[derive(Debug, Clone, Copy)]
pub struct NerSettings {
    pub window_overlap: usize,
    pub aggregation: Aggregation,
}

impl Default for NerSettings {
    fn default() -> Self {
        Self { window_overlap: 128, aggregation: Aggregation::Simple }
    }
}

impl ModelThread {
    /// Starts the thread; with `eager`, returns once the model is loaded and warm (or failed).
    pub fn spawn(model: ManagedModel, eager: bool, ner: NerSettings) -> Result<Self> {
        let task = model.task;
        let name = model.config.name.clone();
        let budget =
            Budget { max_batch_tokens: model.config.max_batch_tokens, max_batch_size: model.config.batch_size };
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (report_tx, report_rx) = mpsc::channel::<LoadReport>();
        let handle = std::thread::Builder::new()
            .name(format!("model-{}", task_name(task)))
            .spawn(move || {
                // the stream stays current on this thread for its whole life
                let _stream = match model.cuda_device() {
                    Some(device) => match super::cuda::Stream::from_pool(device, false)
                        .and_then(|s| super::cuda::StreamGuard::new(&s).map(|g| (s, g)))
                    {
                        Ok(pair) => Some(pair),
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow!("{e}")));
                            return;
                        }
                    },
                    None => None,
                };
                let loaded = if eager { model.ensure_loaded() } else { Ok(()) };
                let mut reported = false;
                let mut report_once = |model: &ManagedModel| {
                    if !reported {
                        if let Some(r) = model.report() {
                            reported = report_tx.send(r).is_ok();
                        }
                    }
                };
                report_once(&model);
                let failed = loaded.is_err();
                let _ = ready_tx.send(loaded);
                if failed {
                    return;
                }
                for job in jobs_rx {
                    let texts: Vec<&str> = job.texts.iter().map(String::as_str).collect();
                    let result = model
                        .with(|m| {
                            Ok(match task {
                                Task::Embedding => m.embed(&texts, &budget).map(|(o, s)| (Output::Embeddings(o), s))?,
                                Task::SequenceClassification => {
                                    m.classify(&texts, &budget).map(|(o, s)| (Output::Probabilities(o), s))?
                                }
                                Task::TokenClassification => m
                                    .entities_with(&texts, &budget, ner.window_overlap, ner.aggregation)
                                    .map(|(o, s)| (Output::Entities(o), s))?,
                            })
                        })
                        .and_then(|r: Result<_>| r);
                    report_once(&model);
                    let _ = job.reply.send(result);
                }
            })
            .context("starting a model thread")?;
        ready_rx.recv().map_err(|_| anyhow!("the {name} model thread stopped"))??;
        Ok(Self {
            task,
            name,
            jobs: Some(jobs_tx),
            handle: Some(handle),
            report: std::sync::Mutex::new(report_rx),
            loaded: std::sync::OnceLock::new(),
        })
    }

    /// Queues texts for the model; the result arrives on the returned receiver.
    pub fn submit(&self, texts: Vec<String>) -> Result<mpsc::Receiver<Result<(Output, BatchStats)>>> {
        let (reply, result) = mpsc::channel();
        self.jobs
            .as_ref()
            .expect("jobs sender lives until drop")
            .send(Job { texts, reply })
            .map_err(|_| anyhow!("the {} model thread stopped", self.name))?;
        Ok(result)
    }

    /// Submits and waits.
    pub fn run(&self, texts: Vec<String>) -> Result<(Output, BatchStats)> {
        self.submit(texts)?.recv().map_err(|_| anyhow!("the {} model thread stopped", self.name))?
    }

    /// The load report, once the model is loaded.
    pub fn load_report(&self) -> Option<LoadReport> {
        if self.loaded.get().is_none() {
            let received = self.report.lock().unwrap_or_else(|e| e.into_inner()).try_iter().last();
            if let Some(r) = received {
                let _ = self.loaded.set(r);
            }
        }
        self.loaded.get().cloned()
    }

    /// True once the model is loaded and warm.
    pub fn is_loaded(&self) -> bool {
        self.load_report().is_some()
    }
}

impl Drop for ModelThread {
    fn drop(&mut self) {
        drop(self.jobs.take()); // ends the thread's job loop
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn task_name(task: Task) -> &'static str {
    match task {
        Task::Embedding => "embedding",
        Task::TokenClassification => "ner",
        Task::SequenceClassification => "sentiment",
    }
}
