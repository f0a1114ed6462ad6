//! A loaded model: tokenizer + encoder + task head, with batched inference.

use std::path::Path;

use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use super::encoder::{Encoder, Linear};
use super::hf::{Family, ModelError, ModelFolder};
use super::weights::Weights;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Mean-pooled, L2-normalised sentence embeddings.
    Embedding,
    /// Per-token labels (NER).
    TokenClassification,
    /// One label distribution per text (sentiment).
    SequenceClassification,
}

enum Head {
    Pool,
    Token(Linear),
    /// BERT: pooler (dense + tanh on [CLS]) then classifier.
    BertSequence { pooler: Linear, classifier: Linear },
    /// RoBERTa family: dense + tanh on <s>, then out_proj.
    RobertaSequence { dense: Linear, out_proj: Linear },
}

/// Tokenized inputs of a batch, padded to its longest sequence.
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub encodings: Vec<tokenizers::Encoding>,
    pub max_len: usize,
    pub real_tokens: usize,
}

pub struct Model {
    pub task: Task,
    pub labels: Vec<String>,
    pub tokenizer: Tokenizer,
    encoder: Encoder,
    head: Head,
    pad_id: u32,
    pub folder: ModelFolder,
}

impl Model {
    pub fn load(path: &Path, task: Task, device: Device, kind: Kind) -> Result<Self, ModelError> {
        let folder = ModelFolder::open(path)?;
        let cfg = &folder.config;
        let weights = Weights::load(&folder, device, kind)?;
        let encoder = Encoder::load(cfg, &weights, device, kind)?;
        let h = cfg.hidden_size;
        let labels = cfg.labels();
        let n = labels.len() as i64;
        if task != Task::Embedding && n == 0 {
            return Err(ModelError::InvalidFile {
                folder: folder.path.clone(),
                file: "config.json".into(),
                reason: "a classification model needs id2label".into(),
            });
        }
        let head = match task {
            Task::Embedding => Head::Pool,
            Task::TokenClassification => Head::Token(Linear::load(&weights, "classifier", n, h, false)?),
            Task::SequenceClassification => match cfg.family()? {
                Family::Bert => Head::BertSequence {
                    pooler: Linear::load(&weights, "pooler.dense", h, h, true)?,
                    classifier: Linear::load(&weights, "classifier", n, h, false)?,
                },
                Family::Roberta => Head::RobertaSequence {
                    dense: Linear::load(&weights, "classifier.dense", h, h, false)?,
                    out_proj: Linear::load(&weights, "classifier.out_proj", n, h, false)?,
                },
            },
        };
        let mut tokenizer = Tokenizer::from_file(&folder.tokenizer).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: encoder.max_positions as usize,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let pad_id = cfg.pad_token_id.unwrap_or(0) as u32;
        Ok(Self { task, labels, tokenizer, encoder, head, pad_id, folder })
    }

    pub fn device(&self) -> Device {
        self.encoder.device
    }

    pub fn max_positions(&self) -> usize {
        self.encoder.max_positions as usize
    }

    /// Tokenizes `texts` (with special tokens, truncated to the model's length) into a padded batch.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Batch, ModelError> {
        let encodings = self
            .tokenizer
            .encode_batch_char_offsets(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(self.batch_from(encodings))
    }

    pub fn batch_from(&self, encodings: Vec<tokenizers::Encoding>) -> Batch {
        let max_len = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(encodings.len() * max_len);
        let mut mask = Vec::with_capacity(encodings.len() * max_len);
        let mut real_tokens = 0;
        for e in &encodings {
            real_tokens += e.len();
            ids.extend(e.get_ids().iter().map(|&i| i as i64));
            mask.extend(std::iter::repeat_n(1i64, e.len()));
            ids.extend(std::iter::repeat_n(self.pad_id as i64, max_len - e.len()));
            mask.extend(std::iter::repeat_n(0i64, max_len - e.len()));
        }
        let shape = [encodings.len() as i64, max_len as i64];
        let device = self.device();
        Batch {
            input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            encodings,
            max_len,
            real_tokens,
        }
    }

    /// Runs encoder and head. Output (float32, on CPU):
    /// Embedding → [batch, hidden]; TokenClassification → [batch, seq, labels] probabilities;
    /// SequenceClassification → [batch, labels] probabilities.
    pub fn forward(&self, batch: &Batch) -> Tensor {
        let _guard = tch::no_grad_guard();
        let hidden = self.encoder.forward(&batch.input_ids, &batch.attention_mask);
        let out = match &self.head {
            Head::Pool => {
                let mask = batch.attention_mask.to_kind(Kind::Float).unsqueeze(-1);
                let summed = (hidden.to_kind(Kind::Float) * &mask).sum_dim_intlist(1, false, Kind::Float);
                let counts = mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9);
                let mean = summed / counts;
                let norm = mean.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
                mean / norm
            }
            Head::Token(classifier) => classifier.forward(&hidden).to_kind(Kind::Float).softmax(-1, Kind::Float),
            Head::BertSequence { pooler, classifier } => {
                let cls = hidden.select(1, 0);
                classifier.forward(&pooler.forward(&cls).tanh()).to_kind(Kind::Float).softmax(-1, Kind::Float)
            }
            Head::RobertaSequence { dense, out_proj } => {
                let cls = hidden.select(1, 0);
                out_proj.forward(&dense.forward(&cls).tanh()).to_kind(Kind::Float).softmax(-1, Kind::Float)
            }
        };
        out.to_device(Device::Cpu)
    }
}
