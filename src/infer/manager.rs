//! The configured models: loaded and warmed up at start (`load_strategy: eager`) or at first use
//! (`on_demand`, for a model used rarely), with what each occupies.

use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Device, Kind};

use super::batch::Budget;
use super::{Model, Task, device};
use crate::config::ModelConfig;

/// What loading a model took.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub task: Task,
    pub name: String,
    pub seconds: f64,
    pub parameter_bytes: u64,
    pub device: Device,
    pub kind: Kind,
}

pub struct ManagedModel {
    pub task: Task,
    pub config: ModelConfig,
    device: Device,
    kind: Kind,
    /// The model once loaded. Behind a mutex (not an Arc): tch tensors are Send but not Sync,
    /// so a model is used by one thread at a time — in practice its own model thread.
    loaded: Mutex<Option<(Model, LoadReport)>>,
}

impl ManagedModel {
    /// Runs `f` on the model, loading and warming it up first if it is not loaded yet.
    pub fn with<R>(&self, f: impl FnOnce(&Model) -> R) -> Result<R> {
        let mut slot = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(self.load()?);
        }
        Ok(f(&slot.as_ref().expect("loaded above").0))
    }

    /// Loads the model now if it is not loaded yet.
    pub fn ensure_loaded(&self) -> Result<()> {
        self.with(|_| ())
    }

    fn load(&self) -> Result<(Model, LoadReport)> {
        let started = Instant::now();
        let model = Model::load(&self.config.path, self.task, self.device, self.kind)
            .with_context(|| format!("loading {} from {}", self.config.name, self.config.path.display()))?;
        let budget = Budget { max_batch_tokens: self.config.max_batch_tokens, max_batch_size: self.config.batch_size };
        warm_up(&model, &budget)?;
        let report = LoadReport {
            task: self.task,
            name: self.config.name.clone(),
            seconds: started.elapsed().as_secs_f64(),
            parameter_bytes: model.parameter_bytes,
            device: self.device,
            kind: self.kind,
        };
        tracing::info!(
            model = %report.name,
            seconds = report.seconds,
            mib = report.parameter_bytes >> 20,
            linear = %model.linear_backend(),
            "model loaded and warm"
        );
        Ok((model, report))
    }

    pub fn report(&self) -> Option<LoadReport> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, r)| r.clone())
    }

    /// The CUDA device index this model runs on, if any.
    pub fn cuda_device(&self) -> Option<usize> {
        match self.device {
            Device::Cuda(i) => Some(i),
            _ => None,
        }
    }

    /// A model to be loaded on `device` in `kind` (CPU always runs fp32).
    pub fn new(task: Task, config: ModelConfig, device: Device) -> Result<Self> {
        let kind = device::parse_dtype(&config.dtype, device)?;
        Ok(Self { task, config, device, kind, loaded: Mutex::new(None) })
    }

    pub fn is_loaded(&self) -> bool {
        self.report().is_some()
    }
}

/// One small batch through the model: first kernels, allocator pools, lazy initialisation.
/// On a GPU also a sweep of batch shapes up to the budget (lengths 16 … the model's limit, a
/// few rows and a full batch each): CUDA loads kernels lazily, at their first launch, and the
/// caching allocator grows at its first large batch — both would otherwise land on the first
/// minutes of real traffic (and on an idle worker's first conversation of a new shape).
fn warm_up(model: &Model, budget: &Budget) -> Result<()> {
    let texts = ["Bonjour, je voudrais suivre ma commande.", "Hello, I would like to track my order please."];
    match model.task {
        Task::Embedding => drop(model.embed(&texts, &Budget::default())?),
        Task::TokenClassification => drop(model.entities(&texts, &Budget::default(), 128)?),
        Task::SequenceClassification => drop(model.classify(&texts, &Budget::default())?),
    }
    if model.device() == Device::Cpu {
        return Ok(());
    }
    let filler = model.tokenizer.encode_ids_one("Bonjour, je voudrais suivre ma commande, merci beaucoup.")?;
    let token = filler.get(1).copied().unwrap_or(5);
    let limit = model.max_positions().min(budget.max_batch_tokens);
    let mut length = 16;
    while length <= limit {
        let full = (budget.max_batch_tokens / length).clamp(1, budget.max_batch_size);
        for rows in [1, 8.min(full), full] {
            let seqs = vec![vec![token; length]; rows];
            drop(model.run_sequences(&seqs, budget)?);
        }
        length *= 2;
    }
    Ok(())
}

