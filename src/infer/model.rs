//! A loaded model: tokenizer + encoder + task head, with batched inference.

use std::path::Path;

use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use super::batch::{BatchStats, Budget, RunError, plan, run_splitting};
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
    /// Truncates at the model's maximum length, adds special tokens.
    pub tokenizer: Tokenizer,
    /// No truncation (NER windows over long texts).
    untruncated: Tokenizer,
    /// Special tokens around one sequence ([CLS] ... [SEP] / <s> ... </s>).
    prefix_ids: Vec<i64>,
    /// WordPiece continuation prefix ("##"), for word-level NER aggregation.
    subword_prefix: Option<String>,
    unk_id: Option<u32>,
    suffix_ids: Vec<i64>,
    encoder: Encoder,
    head: Head,
    pad_id: u32,
    pub folder: ModelFolder,
    /// Bytes of all weights as loaded (device dtype).
    pub parameter_bytes: u64,
}

impl Model {
    pub fn load(path: &Path, task: Task, device: Device, kind: Kind) -> Result<Self, ModelError> {
        let folder = ModelFolder::open(path)?;
        let cfg = &folder.config;
        let weights = Weights::load(&folder, device, kind)?;
        let parameter_bytes = weights.parameter_count() * kind.elt_size_in_bytes() as u64;
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
        let tok_err = |e: tokenizers::Error| ModelError::Tokenizer(e.to_string());
        let mut tokenizer = Tokenizer::from_file(&folder.tokenizer).map_err(tok_err)?;
        tokenizer.with_padding(None);
        let mut untruncated = tokenizer.clone();
        untruncated.with_truncation(None).map_err(tok_err)?;
        // what the post-processor adds around a sequence: encode one token with and without
        let probe = "a";
        let with = untruncated.encode(probe, true).map_err(tok_err)?;
        let without = untruncated.encode(probe, false).map_err(tok_err)?;
        let ids = |e: &tokenizers::Encoding| e.get_ids().iter().map(|&i| i64::from(i)).collect::<Vec<_>>();
        let (with, without) = (ids(&with), ids(&without));
        let at = with.windows(without.len()).position(|w| w == without.as_slice()).ok_or_else(|| {
            ModelError::Tokenizer("the post-processor does not keep the sequence contiguous".into())
        })?;
        let prefix_ids = with[..at].to_vec();
        let subword_prefix = match tokenizer.get_model() {
            tokenizers::ModelWrapper::WordPiece(w) => Some(w.continuing_subword_prefix.clone()),
            tokenizers::ModelWrapper::BPE(b) => b.continuing_subword_prefix.clone(),
            _ => None,
        };
        let unk_id = ["[UNK]", "<unk>"].iter().find_map(|t| tokenizer.token_to_id(t));
        let suffix_ids = with[at + without.len()..].to_vec();
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: encoder.max_positions as usize,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let pad_id = cfg.pad_token_id.unwrap_or(0) as u32;
        Ok(Self { task, labels, tokenizer, untruncated, prefix_ids, subword_prefix, unk_id, suffix_ids, encoder, head, pad_id, folder, parameter_bytes })
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
        let seqs: Vec<Vec<i64>> = encodings.iter().map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect()).collect();
        let refs: Vec<&[i64]> = seqs.iter().map(Vec::as_slice).collect();
        let (input_ids, attention_mask, max_len) = self.padded(&refs);
        Batch { input_ids, attention_mask, real_tokens: encodings.iter().map(|e| e.len()).sum(), encodings, max_len }
    }

    /// Id sequences padded to the longest one: (input_ids, attention_mask, longest) on the
    /// model's device, through pinned memory on CUDA.
    fn padded(&self, seqs: &[&[i64]]) -> (Tensor, Tensor, usize) {
        let max_len = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(seqs.len() * max_len);
        let mut mask = Vec::with_capacity(seqs.len() * max_len);
        for seq in seqs {
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(i64::from(self.pad_id), max_len - seq.len()));
            mask.extend(std::iter::repeat_n(1i64, seq.len()));
            mask.extend(std::iter::repeat_n(0i64, max_len - seq.len()));
        }
        let shape = [seqs.len() as i64, max_len as i64];
        let device = self.device();
        (upload(Tensor::from_slice(&ids).view(shape), device), upload(Tensor::from_slice(&mask).view(shape), device), max_len)
    }

    /// Runs encoder and head. Output (float32, on CPU):
    /// Embedding → [batch, hidden]; TokenClassification → [batch, seq, labels] probabilities;
    /// SequenceClassification → [batch, labels] probabilities.
    pub fn forward(&self, batch: &Batch) -> Tensor {
        self.forward_tensors(&batch.input_ids, &batch.attention_mask)
    }

    fn forward_tensors(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let hidden = self.encoder.forward(input_ids, attention_mask);
        let out = match &self.head {
            Head::Pool => {
                let mask = attention_mask.to_kind(Kind::Float).unsqueeze(-1);
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

/// Host → device copy of a batch's ids or mask: on CUDA through pinned (page-locked) memory
/// with a non-blocking copy on the current stream (libtorch's caching host allocator keeps the
/// pinned buffer alive until the copy has run).
fn upload(host: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cpu => host,
        // `_pin_memory`: the op behind `pin_memory` without its deprecated-argument warning
        device => host.internal_pin_memory(device).to_device_(device, Kind::Int64, true, false),
    }
}

impl Model {
    /// Token ids with special tokens, truncated to the model's length.
    pub fn encode_ids(&self, texts: &[&str]) -> Result<Vec<Vec<i64>>, ModelError> {
        let encodings =
            self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encodings.iter().map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect()).collect())
    }

    /// Runs id sequences through encoder and head in token-budget batches. Returns one output
    /// per sequence, in input order: [hidden] or [labels] rows, or [len, labels] for tokens.
    /// A batch that runs the device out of memory is split in two and retried.
    pub fn run_sequences(&self, seqs: &[Vec<i64>], budget: &Budget) -> Result<(Vec<Tensor>, BatchStats), ModelError> {
        let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let mut outputs: Vec<Option<Tensor>> = (0..seqs.len()).map(|_| None).collect();
        let mut stats = BatchStats::default();
        let run = |group: &[usize]| {
            let group_seqs: Vec<&[i64]> = group.iter().map(|&i| seqs[i].as_slice()).collect();
            // tch's tensor ops panic on a libtorch error; an out-of-memory one is recoverable
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let (ids, mask, max_len) = self.padded(&group_seqs);
                (self.forward_tensors(&ids, &mask), max_len)
            }))
            .map_err(|panic| {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "inference failed".into());
                if msg.contains("out of memory") { RunError::OutOfMemory(msg) } else { RunError::Other(msg) }
            })
        };
        let accept = |group: &[usize], (out, max_len): (Tensor, usize)| {
            for (row, &i) in group.iter().enumerate() {
                let t = out.get(row as i64);
                outputs[i] = Some(if self.task == Task::TokenClassification { t.narrow(0, 0, lengths[i] as i64) } else { t });
            }
            stats.add(&BatchStats {
                sequences: group.len(),
                batches: 1,
                real_tokens: group.iter().map(|&i| lengths[i]).sum(),
                padded_tokens: group.len() * max_len,
            });
        };
        let splits = run_splitting(plan(&lengths, budget), run, accept).map_err(|e| ModelError::Inference(format!("{e:?}")))?;
        if splits > 0 {
            tracing::warn!(splits, "batches split after running out of device memory; consider a smaller max_batch_tokens");
        }
        Ok((outputs.into_iter().map(|o| o.expect("every sequence is planned")).collect(), stats))
    }

    fn rows(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t).expect("a float vector")
    }

    /// Sentence embeddings (Embedding models), L2-normalised, in input order.
    pub fn embed(&self, texts: &[&str], budget: &Budget) -> Result<(Vec<Vec<f32>>, BatchStats), ModelError> {
        let (out, stats) = self.run_sequences(&self.encode_ids(texts)?, budget)?;
        Ok((out.iter().map(Self::rows).collect(), stats))
    }

    /// Label probabilities per text (SequenceClassification models), in input order.
    pub fn classify(&self, texts: &[&str], budget: &Budget) -> Result<(Vec<Vec<f32>>, BatchStats), ModelError> {
        let (out, stats) = self.run_sequences(&self.encode_ids(texts)?, budget)?;
        Ok((out.iter().map(Self::rows).collect(), stats))
    }

    /// Entities per text (TokenClassification models). A text longer than the model's length is
    /// split into windows overlapping by `overlap` tokens; each token takes its probabilities
    /// from the window where it has the most context on both sides.
    pub fn entities(
        &self,
        texts: &[&str],
        budget: &Budget,
        overlap: usize,
    ) -> Result<(Vec<Vec<crate::event::Entity>>, BatchStats), ModelError> {
        self.entities_with(texts, budget, overlap, super::ner::Aggregation::Simple)
    }

    /// `entities` with a chosen aggregation strategy.
    pub fn entities_with(
        &self,
        texts: &[&str],
        budget: &Budget,
        overlap: usize,
        aggregation: super::ner::Aggregation,
    ) -> Result<(Vec<Vec<crate::event::Entity>>, BatchStats), ModelError> {
        let content_max = self.max_positions() - self.prefix_ids.len() - self.suffix_ids.len();
        let overlap = overlap.min(content_max / 2);
        let encodings = self
            .untruncated
            .encode_batch_char_offsets(texts.to_vec(), false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        // (text index, first content token, end) of every window
        let mut windows: Vec<(usize, usize, usize)> = Vec::new();
        let mut seqs: Vec<Vec<i64>> = Vec::new();
        for (t, enc) in encodings.iter().enumerate() {
            let ids = enc.get_ids();
            let mut start = 0;
            loop {
                let end = (start + content_max).min(ids.len());
                let mut seq = self.prefix_ids.clone();
                seq.extend(ids[start..end].iter().map(|&i| i64::from(i)));
                seq.extend_from_slice(&self.suffix_ids);
                seqs.push(seq);
                windows.push((t, start, end));
                if end >= ids.len() {
                    break;
                }
                start += content_max - overlap;
            }
        }
        let (out, stats) = self.run_sequences(&seqs, budget)?;
        let mut per_text: Vec<Vec<(usize, Vec<f32>)>> = encodings.iter().map(|e| vec![(0, vec![]); e.len()]).collect();
        let mut best_margin: Vec<Vec<Option<usize>>> = encodings.iter().map(|e| vec![None; e.len()]).collect();
        for ((t, start, end), probs) in windows.iter().zip(&out) {
            let content = probs.narrow(0, self.prefix_ids.len() as i64, (end - start) as i64);
            let rows = Vec::<Vec<f32>>::try_from(&content).expect("a float matrix");
            for (k, row) in rows.into_iter().enumerate() {
                let token = start + k;
                // context this window gives the token: distance to its nearer window edge
                let margin = k.min(end - start - 1 - k);
                if best_margin[*t][token].is_none_or(|m| margin > m) {
                    best_margin[*t][token] = Some(margin);
                    per_text[*t][token] = (token, row);
                }
            }
        }
        let entities = texts
            .iter()
            .zip(&encodings)
            .zip(per_text)
            .map(|((text, enc), rows)| {
                let probs: Vec<Vec<f32>> = rows.into_iter().map(|(_, r)| r).collect();
                match aggregation {
                    super::ner::Aggregation::Simple => super::ner::aggregate_tokens(text, enc.get_offsets(), &probs, &self.labels),
                    super::ner::Aggregation::First => {
                        let info = super::ner::WordInfo {
                            tokens: enc.get_tokens(),
                            ids: enc.get_ids(),
                            subword_prefix: self.subword_prefix.as_deref(),
                            unk_id: self.unk_id,
                        };
                        super::ner::aggregate_first(text, enc.get_offsets(), &probs, &self.labels, &info)
                    }
                }
            })
            .collect();
        Ok((entities, stats))
    }
}
