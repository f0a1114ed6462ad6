//! One OS thread per model. Each thread owns its model (tch tensors are `Send`, not `Sync`),
//! loads it at start or at first use (`ManagedModel`), and on CUDA makes a stream from
//! libtorch's pool current for everything it runs — so NER, sentiment and embeddings overlap on
//! one GPU. Callers submit texts and get a receiver for the result, so the three models work at
//! the same time on one micro-batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow};

use tch::Tensor;

use super::model::{Launched, NerInput, NerWindow};
use super::{Model, Task};

use super::batch::{BatchStats, Budget};
use super::manager::{LoadReport, ManagedModel};
use super::ner::Aggregation;
use crate::event::Entity;
use crate::fault::{Fault, RejectClass};

/// What a model thread returns for a batch of texts.
#[derive(Debug)]
pub enum Output {
    Embeddings(Vec<Vec<f32>>),
    Entities(Vec<Vec<Entity>>),
    Probabilities(Vec<Vec<f32>>),
}

/// What a model thread is given: texts (it tokenizes them), or inputs the preparation stage
/// tokenized already with this model's tokenizer.
#[derive(Debug)]
pub enum ModelInput {
    Texts(Vec<String>),
    /// Id sequences with special tokens (embedding, sequence classification).
    Ids(Vec<Vec<i64>>),
    /// Encodings of whole turns (token classification), shared with the messages they belong
    /// to (which keep them to run again alone if a batch fails).
    Ner(Vec<Arc<NerInput>>),
}

impl Output {
    /// Cut into consecutive parts of `sizes` outputs (None: the sizes do not add up).
    fn split(self, sizes: &[usize]) -> Option<Vec<Output>> {
        fn cut<T>(all: Vec<T>, sizes: &[usize], wrap: fn(Vec<T>) -> Output) -> Option<Vec<Output>> {
            if all.len() != sizes.iter().sum::<usize>() {
                return None;
            }
            let mut rest = all.into_iter();
            Some(sizes.iter().map(|&n| wrap(rest.by_ref().take(n).collect())).collect())
        }
        match self {
            Output::Embeddings(v) => cut(v, sizes, Output::Embeddings),
            Output::Entities(v) => cut(v, sizes, Output::Entities),
            Output::Probabilities(v) => cut(v, sizes, Output::Probabilities),
        }
    }
}

impl ModelInput {
    /// Appends `other`'s inputs when it is of the same kind; else gives it back.
    fn absorb(&mut self, other: ModelInput) -> std::result::Result<(), ModelInput> {
        match (self, other) {
            (ModelInput::Ids(a), ModelInput::Ids(b)) => a.extend(b),
            (ModelInput::Ner(a), ModelInput::Ner(b)) => a.extend(b),
            (_, other) => return Err(other),
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        match self {
            ModelInput::Texts(t) => t.len(),
            ModelInput::Ids(s) => s.len(),
            ModelInput::Ner(n) => n.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The result of one submitted job.
pub type Reply = Result<(Output, BatchStats), Fault>;

struct Job {
    input: ModelInput,
    reply: mpsc::Sender<Reply>,
    /// Launched on its own, never merged: a message run again alone after its batch failed
    /// (a smaller job may fit where the batch did not, and no other input can fail it).
    alone: bool,
    /// Set when nobody waits for the job any more (an API client that went away): a job still
    /// queued is dropped instead of run (its reply channel closes).
    withdrawn: Option<Arc<AtomicBool>>,
}

impl Job {
    fn is_withdrawn(&self) -> bool {
        self.withdrawn.as_ref().is_some_and(|w| w.load(Ordering::SeqCst))
    }
}

/// Who waits for a share of a merged job: the reply channel and how many inputs were theirs.
struct Waiter {
    reply: mpsc::Sender<Reply>,
    inputs: usize,
}

/// Queued jobs launched as one (their inputs in queue order), each answered with its own share.
struct Merged {
    input: ModelInput,
    waiters: Vec<Waiter>,
}

impl Merged {
    /// `first` and, while the inputs are fewer than `fill` (one full batch), the jobs queued
    /// behind it of the same input kind; a job of another kind, or one to run alone, ends the
    /// merge and is handed back. Texts are never merged: tokenizing them can fail for one
    /// caller's input (a data fault), which must not fail the others (the worker's jobs are
    /// token ids, tokenized and checked by the prepare stage).
    fn gather(first: Job, queue: &mpsc::Receiver<Job>, fill: usize) -> (Self, Option<Job>) {
        let merges = !first.alone && !matches!(first.input, ModelInput::Texts(_));
        let mut merged = Merged { waiters: vec![Waiter { reply: first.reply, inputs: first.input.len() }], input: first.input };
        while merges && merged.input.len() < fill {
            let Ok(next) = queue.try_recv() else { break };
            if next.is_withdrawn() {
                continue;
            }
            if next.alone {
                return (merged, Some(next));
            }
            let inputs = next.input.len();
            match merged.input.absorb(next.input) {
                Ok(()) => merged.waiters.push(Waiter { reply: next.reply, inputs }),
                Err(input) => return (merged, Some(Job { input, reply: next.reply, alone: false, withdrawn: next.withdrawn })),
            }
        }
        (merged, None)
    }
}

/// Answers each waiter of a merged job with its own share of the output, in order (or the
/// failure, which is every waiter's).
fn answer(waiters: Vec<Waiter>, result: Reply) {
    let sizes: Vec<usize> = waiters.iter().map(|w| w.inputs).collect();
    match result {
        Ok((out, stats)) => match out.split(&sizes) {
            Some(parts) => {
                for (w, part) in waiters.into_iter().zip(parts) {
                    let _ = w.reply.send(Ok((part, stats)));
                }
            }
            None => {
                for w in waiters {
                    let _ = w.reply.send(Err(Fault::machine(anyhow!("the model answered a merged job with the wrong number of outputs"))));
                }
            }
        },
        Err(fault) => {
            // the last waiter (the only one, unless jobs were merged) gets the fault itself, with
            // its type; the others a copy with its whole message
            let mut waiters = waiters;
            let last = waiters.pop();
            for w in waiters {
                let copy = match &fault {
                    Fault::Data(r) => Fault::Data(r.clone()),
                    Fault::Machine(e) => Fault::machine(anyhow!("{e:#}")),
                };
                let _ = w.reply.send(Err(copy));
            }
            if let Some(w) = last {
                let _ = w.reply.send(Err(fault));
            }
        }
    }
}

pub struct ModelThread {
    pub task: Task,
    pub name: String,
    jobs: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    /// Set on drop: jobs still queued are answered with an error instead of being run, so a
    /// stopping worker waits for the job at hand only.
    cancelled: Arc<AtomicBool>,
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

/// A model loaded for requests (`convoflow serve`): its folder (config), its tokenizer, and the
/// model on its own thread, warm.
pub struct Served {
    pub folder: super::ModelFolder,
    pub tokenizer: super::tokenize::ModelTokenizer,
    pub thread: ModelThread,
}

impl Served {
    /// Loads `cfg` for `task` on `device` and waits until it is warm (blocking).
    pub fn load(task: Task, cfg: &crate::config::ModelConfig, device: tch::Device) -> Result<Self> {
        let folder = super::ModelFolder::open(&cfg.path).with_context(|| format!("the {} model {}", task_name(task), cfg.name))?;
        let tokenizer = super::tokenize::ModelTokenizer::load(&folder).with_context(|| format!("the tokenizer of {}", cfg.name))?;
        let managed = ManagedModel::new(task, cfg.clone(), device)?;
        let thread = ModelThread::spawn(managed, true, NerSettings::default()).with_context(|| format!("loading {}", cfg.name))?;
        Ok(Self { folder, tokenizer, thread })
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
        let cancelled = Arc::new(AtomicBool::new(false));
        let cancel = cancelled.clone();
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
                // a forward pass stops between layers once the thread is cancelled (`cancel`)
                super::cancel::watch(cancel.clone());
                let loaded = if eager { model.ensure_loaded() } else { Ok(()) };
                let mut reported = false;
                let mut report_once = |model: &ManagedModel| {
                    if !reported {
                        if let Some(r) = model.report() {
                            let device = super::device::label(r.device);
                            metrics::gauge!(crate::telemetry::MODEL_PARAMETER_BYTES, "task" => task_name(task), "model" => r.name.clone(), "device" => device)
                                .set(r.parameter_bytes as f64);
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
                // One job in flight while the next is queued: the next job's batches go on the
                // stream before the previous job's results are read and post-processed, so the
                // GPU has work while this thread does its CPU part (a no-op split on the CPU).
                // Jobs queued together smaller than one batch are launched as one (`Merged`):
                // with models routed by language a model may get a few turns of each
                // micro-batch, and still runs full batches from a backlog.
                let mut in_flight: Option<(Started, Vec<Waiter>, std::time::Duration)> = None;
                let mut held: Option<Job> = None;
                loop {
                    let next = if let Some(job) = held.take() {
                        Some(job)
                    } else if in_flight.is_some() {
                        jobs_rx.try_recv().ok()
                    } else {
                        match jobs_rx.recv() {
                            Ok(job) => Some(job),
                            Err(_) => break,
                        }
                    };
                    // a withdrawn job is dropped unrun (its caller is gone)
                    let next = next.filter(|job| !job.is_withdrawn());
                    let next = next.map(|first| {
                        let (merged, rest) = Merged::gather(first, &jobs_rx, budget.max_batch_size);
                        held = rest;
                        merged
                    });
                    let launched = next.and_then(|job| {
                        if cancel.load(Ordering::SeqCst) {
                            answer(job.waiters, Err(Fault::machine(anyhow!("the model thread is stopping"))));
                            return None;
                        }
                        let started = std::time::Instant::now();
                        let launched = match model.with(|m| launch_job(m, task, job.input, &budget, ner)) {
                            Ok(launched) => launched,
                            Err(e) => Err(Fault::Machine(e)), // the model did not load
                        };
                        match launched {
                            Ok(l) => {
                                let queueing = started.elapsed();
                                record_phase(task, "queue", queueing);
                                Some((l, job.waiters, queueing))
                            }
                            Err(e) => {
                                answer(job.waiters, Err(e));
                                None
                            }
                        }
                    });
                    if let Some((started_job, waiters, launch_time)) = in_flight.take() {
                        let finishing = std::time::Instant::now();
                        let result = model.with(|m| finish_job(m, task, started_job, ner)).and_then(|r| r).map_err(Fault::Machine);
                        // a pass cut short by the cancellation computed nothing meaningful
                        let result = if cancel.load(Ordering::SeqCst) {
                            Err(Fault::machine(anyhow!("the model thread is stopping")))
                        } else {
                            result
                        };
                        // the thread's own time for the job: queueing it and reading it
                        metrics::histogram!(crate::telemetry::STAGE_BUSY_SECONDS, "stage" => task_name(task))
                            .record((launch_time + finishing.elapsed()).as_secs_f64());
                        if let Ok((_, stats)) = &result {
                            record_batch_stats(task, stats);
                        }
                        report_once(&model);
                        answer(waiters, result);
                    }
                    in_flight = launched;
                }
            })
            .context("starting a model thread")?;
        ready_rx.recv().map_err(|_| anyhow!("the {name} model thread stopped"))??;
        Ok(Self {
            task,
            name,
            jobs: Some(jobs_tx),
            handle: Some(handle),
            cancelled,
            report: std::sync::Mutex::new(report_rx),
            loaded: std::sync::OnceLock::new(),
        })
    }

    /// A zero-cost stand-in for a model (a test double, for measuring the stages around the
    /// models): answers every job at once with outputs of the right shape — a pseudo-random
    /// unit vector of the model's hidden size per embedding input (seeded by the input, so the
    /// vector store indexes vectors as varied as real ones), no entities, a uniform
    /// distribution over the labels — without loading any weights.
    pub fn spawn_stand_in(task: Task, name: String, config: &super::hf::HfConfig) -> Result<Self> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (report_tx, report_rx) = mpsc::channel::<LoadReport>();
        let dim = config.hidden_size as usize;
        let labels = config.labels().len().max(1);
        let report = LoadReport {
            task,
            name: format!("{name} (zero-cost stand-in)"),
            seconds: 0.0,
            parameter_bytes: 0,
            device: tch::Device::Cpu,
            kind: tch::Kind::Float,
        };
        report_tx.send(report).expect("the receiver is here");
        let fault = StandInFault::from_env()?;
        let handle = std::thread::Builder::new()
            .name(format!("stand-in-{}", task_name(task)))
            .spawn(move || {
                for (done, job) in jobs_rx.into_iter().enumerate() {
                    match fault {
                        Some(StandInFault::PanicAfter(n)) if done >= n => panic!("stand-in fault: the model thread dies"),
                        Some(StandInFault::FailAfter(n)) if done >= n => {
                            let _ = job.reply.send(Err(Fault::machine(anyhow!("stand-in fault: a device error"))));
                            continue;
                        }
                        _ => {}
                    }
                    let n = job.input.len();
                    let out = match task {
                        Task::Embedding => Output::Embeddings((0..n).map(|i| stand_in_vector(&job.input, i, dim)).collect()),
                        Task::TokenClassification => Output::Entities(vec![vec![]; n]),
                        Task::SequenceClassification => Output::Probabilities(vec![vec![1.0 / labels as f32; labels]; n]),
                    };
                    let _ = job.reply.send(Ok((out, BatchStats::default())));
                }
            })
            .context("starting a stand-in model thread")?;
        Ok(Self {
            task,
            name,
            jobs: Some(jobs_tx),
            handle: Some(handle),
            cancelled: Arc::new(AtomicBool::new(false)),
            report: std::sync::Mutex::new(report_rx),
            loaded: std::sync::OnceLock::new(),
        })
    }

    /// Queues texts for the model; the result arrives on the returned receiver.
    pub fn submit(&self, texts: Vec<String>) -> Result<mpsc::Receiver<Reply>> {
        self.submit_input(ModelInput::Texts(texts))
    }

    /// Queues an input; jobs run one after the other in submission order, so a caller can
    /// submit the next micro-batch while this one runs. The result arrives on the receiver.
    pub fn submit_input(&self, input: ModelInput) -> Result<mpsc::Receiver<Reply>> {
        self.queue(input, false, None)
    }

    /// Like `submit_input`, but the job is launched on its own, never merged with jobs queued
    /// beside it (a message run again alone after its batch failed).
    pub fn submit_alone(&self, input: ModelInput) -> Result<mpsc::Receiver<Reply>> {
        self.queue(input, true, None)
    }

    /// Like `submit_input`, for a caller that may go away: once `withdrawn` is set, the job is
    /// dropped unrun if it is still queued (an API request whose client disconnected). Such jobs
    /// are merged with the others queued beside them: concurrent requests share batches.
    pub fn submit_withdrawable(&self, input: ModelInput, withdrawn: Arc<AtomicBool>) -> Result<mpsc::Receiver<Reply>> {
        self.queue(input, false, Some(withdrawn))
    }

    fn queue(&self, input: ModelInput, alone: bool, withdrawn: Option<Arc<AtomicBool>>) -> Result<mpsc::Receiver<Reply>> {
        let (reply, result) = mpsc::channel();
        self.jobs
            .as_ref()
            .expect("jobs sender lives until drop")
            .send(Job { input, reply, alone, withdrawn })
            .map_err(|_| anyhow!("the {} model thread stopped", self.name))?;
        Ok(result)
    }

    /// Submits and waits.
    pub fn run(&self, texts: Vec<String>) -> Result<(Output, BatchStats)> {
        Ok(self.submit(texts)?.recv().map_err(|_| anyhow!("the {} model thread stopped", self.name))??)
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

/// A fault the zero-cost stand-in injects, for tests of the worker's handling of model failures
/// (a test hook, read from `CONVOFLOW_STAND_IN_FAULT`, only by stand-ins: `panic-after:N` — the
/// thread dies at its (N+1)-th job; `fail-after:N` — every job from the (N+1)-th fails with a
/// runtime error, like a device that went away).
#[derive(Debug, Clone, Copy)]
enum StandInFault {
    PanicAfter(usize),
    FailAfter(usize),
}

impl StandInFault {
    fn from_env() -> Result<Option<Self>> {
        let Ok(spec) = std::env::var("CONVOFLOW_STAND_IN_FAULT") else { return Ok(None) };
        let parse = |n: &str| n.parse::<usize>().with_context(|| format!("CONVOFLOW_STAND_IN_FAULT={spec}: not a job count"));
        match spec.split_once(':') {
            Some(("panic-after", n)) => Ok(Some(Self::PanicAfter(parse(n)?))),
            Some(("fail-after", n)) => Ok(Some(Self::FailAfter(parse(n)?))),
            _ => anyhow::bail!("CONVOFLOW_STAND_IN_FAULT={spec}: expected panic-after:N or fail-after:N"),
        }
    }
}

/// How long dropping a model thread waits for it to end.
const JOIN_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

impl ModelThread {
    /// Stops the thread's work: queued jobs are answered with an error instead of being run,
    /// the job at hand stops at its next layer (`cancel`) and is answered with an error too.
    /// For a set of threads stopping together: cancel them all before dropping any, so their
    /// jobs wind down at the same time rather than one after the other's `JOIN_WAIT`.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

impl Drop for ModelThread {
    fn drop(&mut self) {
        self.cancel();
        drop(self.jobs.take()); // ends the thread's job loop
        // The job at hand may run for seconds more (a CPU batch): a stopping worker must exit
        // on time (`pipeline.shutdown_timeout_ms`), so the thread is left to end by itself
        // (or with the process) after a short wait. Nothing waits for its result any more.
        if let Some(h) = self.handle.take() {
            let deadline = std::time::Instant::now() + JOIN_WAIT;
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::warn!(model = %self.name, "the model thread is still running a job; not waiting for it");
            }
        }
    }
}

/// The stand-in's embedding of input `i`: a unit vector from a generator seeded by a hash of
/// the input (xorshift64*), cheap next to any real model.
fn stand_in_vector(input: &ModelInput, i: usize, dim: usize) -> Vec<f32> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match input {
        ModelInput::Texts(t) => t[i].hash(&mut h),
        ModelInput::Ids(ids) => ids[i].hash(&mut h),
        ModelInput::Ner(n) => n[i].text.hash(&mut h),
    }
    let mut state = h.finish() | 1;
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// A job queued on its model, not yet read (`launch_job`).
enum Started {
    Embeddings(Launched),
    Probabilities(Launched),
    Entities { inputs: Vec<Arc<NerInput>>, windows: Vec<NerWindow>, launched: Launched },
}

/// Queues one job on the model: what `task` computes for the input (`finish_job` reads it).
/// Tokenizing a text is the input's part (`Fault::Data`, class `enrichment`); the rest is the
/// model's (`Fault::Machine`).
fn launch_job(m: &Model, task: Task, input: ModelInput, budget: &Budget, ner: NerSettings) -> Result<Started, Fault> {
    fn texts(t: &[String]) -> Vec<&str> {
        t.iter().map(String::as_str).collect()
    }
    fn bad_input<E: Into<anyhow::Error>>(e: E) -> Fault {
        Fault::data(RejectClass::Enrichment, format!("{:#}", e.into()))
    }
    fn device<E: Into<anyhow::Error>>(e: E) -> Fault {
        Fault::machine(e)
    }
    let encode = |t: &[String]| m.encode_ids(&texts(t)).map_err(bad_input);
    Ok(match (task, input) {
        (Task::Embedding, ModelInput::Texts(t)) => Started::Embeddings(m.launch_sequences(&encode(&t)?, budget).map_err(device)?),
        (Task::Embedding, ModelInput::Ids(ids)) => Started::Embeddings(m.launch_sequences(&ids, budget).map_err(device)?),
        (Task::SequenceClassification, ModelInput::Texts(t)) => {
            Started::Probabilities(m.launch_sequences(&encode(&t)?, budget).map_err(device)?)
        }
        (Task::SequenceClassification, ModelInput::Ids(ids)) => Started::Probabilities(m.launch_sequences(&ids, budget).map_err(device)?),
        (Task::TokenClassification, ModelInput::Texts(t)) => {
            let inputs: Vec<Arc<NerInput>> = m
                .tokenizer
                .encode_untruncated(&texts(&t))
                .map_err(bad_input)?
                .into_iter()
                .zip(t)
                .map(|(encoding, text)| Arc::new(NerInput { text, encoding }))
                .collect();
            let (windows, launched) = m.launch_entities(&inputs, budget, ner.window_overlap).map_err(device)?;
            Started::Entities { inputs, windows, launched }
        }
        (Task::TokenClassification, ModelInput::Ner(inputs)) => {
            let (windows, launched) = m.launch_entities(&inputs, budget, ner.window_overlap).map_err(device)?;
            Started::Entities { inputs, windows, launched }
        }
        (task, input) => return Err(Fault::machine(anyhow!("a {task:?} model cannot take {} input", input.kind()))),
    })
}

/// Waits for a queued job and turns what the model returned into its output; records the
/// time waiting for the device and reading as `convoflow_model_phase_seconds`.
fn finish_job(m: &Model, task: Task, started: Started, ner: NerSettings) -> Result<(Output, BatchStats)> {
    fn rows(out: Vec<Tensor>) -> Vec<Vec<f32>> {
        out.iter().map(Model::rows).collect()
    }
    let waiting = std::time::Instant::now();
    match &started {
        Started::Embeddings(l) | Started::Probabilities(l) | Started::Entities { launched: l, .. } => l.wait_for_device()?,
    }
    record_phase(task, "device", waiting.elapsed());
    let reading = std::time::Instant::now();
    let finished = match started {
        Started::Embeddings(l) => {
            let (out, stats) = l.read();
            (Output::Embeddings(rows(out)), stats)
        }
        Started::Probabilities(l) => {
            let (out, stats) = l.read();
            (Output::Probabilities(rows(out)), stats)
        }
        Started::Entities { inputs, windows, launched } => {
            let (out, stats) = launched.read();
            (Output::Entities(m.entities_from(&inputs, &windows, &out, ner.aggregation)), stats)
        }
    };
    record_phase(task, "read", reading.elapsed());
    Ok(finished)
}

fn record_phase(task: Task, phase: &'static str, took: std::time::Duration) {
    metrics::histogram!(crate::telemetry::MODEL_PHASE_SECONDS, "task" => task_name(task), "phase" => phase).record(took.as_secs_f64());
}

impl ModelInput {
    fn kind(&self) -> &'static str {
        match self {
            ModelInput::Texts(_) => "text",
            ModelInput::Ids(_) => "token-id",
            ModelInput::Ner(_) => "NER-encoding",
        }
    }
}

/// Padding share and sizes of what a model computed (per task).
fn record_batch_stats(task: Task, stats: &BatchStats) {
    let name = task_name(task);
    metrics::counter!(crate::telemetry::MODEL_TOKENS, "task" => name, "kind" => "real").increment(stats.real_tokens as u64);
    metrics::counter!(crate::telemetry::MODEL_TOKENS, "task" => name, "kind" => "padded").increment(stats.padded_tokens as u64);
}

pub fn task_name(task: Task) -> &'static str {
    match task {
        Task::Embedding => "embedding",
        Task::TokenClassification => "ner",
        Task::SequenceClassification => "sentiment",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(ids: usize) -> (Job, mpsc::Receiver<Reply>) {
        let (reply, rx) = mpsc::channel();
        (Job { input: ModelInput::Ids(vec![vec![ids as i64]; ids]), reply, alone: false, withdrawn: None }, rx)
    }

    #[test]
    fn small_queued_jobs_launch_as_one_and_each_gets_its_own_share() {
        let (tx, queue) = mpsc::channel();
        let (first, rx1) = job(3);
        let (second, rx2) = job(2);
        let (third, _rx3) = job(4);
        tx.send(second).unwrap();
        tx.send(third).unwrap();
        // fill 5: the first two make 5 inputs, the third waits for the next launch
        let (merged, held) = Merged::gather(first, &queue, 5);
        assert_eq!(merged.input.len(), 5);
        assert!(held.is_none());
        assert_eq!(queue.try_recv().map(|j| j.input.len()).ok(), Some(4), "left queued");
        let out = Output::Probabilities((0..5).map(|i| vec![i as f32]).collect());
        answer(merged.waiters, Ok((out, BatchStats::default())));
        let Ok((Output::Probabilities(a), _)) = rx1.recv().unwrap() else { panic!("first share") };
        let Ok((Output::Probabilities(b), _)) = rx2.recv().unwrap() else { panic!("second share") };
        assert_eq!((a, b), (vec![vec![0.0], vec![1.0], vec![2.0]], vec![vec![3.0], vec![4.0]]));
    }

    #[test]
    fn a_withdrawn_job_is_dropped_unrun_and_its_caller_sees_the_channel_close() {
        let (tx, queue) = mpsc::channel();
        let (first, _rx1) = job(1);
        let (mut gone, rx_gone) = job(2);
        let withdrawn = Arc::new(AtomicBool::new(false));
        gone.withdrawn = Some(withdrawn.clone());
        let (kept, _rx3) = job(1);
        tx.send(gone).unwrap();
        tx.send(kept).unwrap();
        withdrawn.store(true, Ordering::SeqCst);
        let (merged, held) = Merged::gather(first, &queue, 8);
        assert_eq!((merged.input.len(), merged.waiters.len(), held.is_none()), (2, 2, true), "the withdrawn job's 2 inputs were not taken");
        assert!(rx_gone.recv().is_err(), "dropped: its reply channel is closed");
    }

    #[test]
    fn a_full_job_runs_alone_and_another_kind_ends_the_merge() {
        let (tx, queue) = mpsc::channel();
        let (big, _rx) = job(8);
        let (small, _rx2) = job(1);
        tx.send(small).unwrap();
        let (merged, held) = Merged::gather(big, &queue, 8);
        assert_eq!((merged.waiters.len(), held.is_none()), (1, true), "a full batch does not wait for more");
        let (first, _rx3) = job(1);
        let (reply, _rx4) = mpsc::channel();
        tx.send(Job { input: ModelInput::Texts(vec!["x".into()]), reply, alone: false, withdrawn: None }).unwrap();
        let (merged, held) = Merged::gather(first, &queue, 8);
        assert_eq!(merged.waiters.len(), 2, "the queued one-input job joined");
        assert!(matches!(held, Some(Job { input: ModelInput::Texts(_), .. })), "texts are handed back, not merged with ids");
        // a job to run alone is neither merged into nor merged with
        let (first, _rx5) = job(1);
        let (mut retry, _rx6) = job(1);
        retry.alone = true;
        tx.send(retry).unwrap();
        let (merged, held) = Merged::gather(first, &queue, 8);
        assert_eq!(merged.waiters.len(), 1);
        let held = held.expect("handed back");
        assert!(held.alone);
        let (then, _rx7) = job(1);
        tx.send(then).unwrap();
        let (merged, left) = Merged::gather(held, &queue, 8);
        assert_eq!((merged.waiters.len(), left.is_none()), (1, true), "the one to run alone takes nothing with it");
        assert_eq!(queue.try_recv().map(|j| j.input.len()).ok(), Some(1));
        // texts (serve's queries) are not merged: one caller's bad text must not fail another's
        let (reply, _rx8) = mpsc::channel();
        let (reply2, _rx9) = mpsc::channel();
        tx.send(Job { input: ModelInput::Texts(vec!["b".into()]), reply: reply2, alone: false, withdrawn: None }).unwrap();
        let (merged, _) = Merged::gather(Job { input: ModelInput::Texts(vec!["a".into()]), reply, alone: false, withdrawn: None }, &queue, 8);
        assert_eq!(merged.waiters.len(), 1);
    }

    #[test]
    fn a_failed_merged_job_fails_every_waiter_and_a_wrong_size_is_the_machine_s_fault() {
        let (first, rx1) = job(1);
        let (second, rx2) = job(1);
        let waiters = vec![Waiter { reply: first.reply, inputs: 1 }, Waiter { reply: second.reply, inputs: 1 }];
        answer(waiters, Err(Fault::data(RejectClass::Enrichment, "bad text")));
        for rx in [rx1, rx2] {
            assert!(matches!(rx.recv().unwrap(), Err(Fault::Data(r)) if r.message == "bad text"));
        }
        let (only, rx) = job(2);
        answer(vec![Waiter { reply: only.reply, inputs: 2 }], Ok((Output::Entities(vec![vec![]]), BatchStats::default())));
        assert!(matches!(rx.recv().unwrap(), Err(Fault::Machine(_))));
    }
}
