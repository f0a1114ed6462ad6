//! HuggingFace model folders: `config.json`, `model.safetensors` (or sharded with
//! `model.safetensors.index.json`), `tokenizer.json`. Parses what the BERT-family encoder needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model folder {folder}: missing {file}")]
    MissingFile { folder: PathBuf, file: &'static str },
    #[error("model folder {folder}: {file} is invalid: {reason}")]
    InvalidFile { folder: PathBuf, file: String, reason: String },
    #[error("unsupported architecture: model_type {model_type:?} ({architectures:?}); supported: bert, roberta, camembert, xlm-roberta")]
    UnsupportedArchitecture { model_type: String, architectures: Vec<String> },
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch { name: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("tensor {name} is missing from the weights")]
    MissingTensor { name: String },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("inference: {0}")]
    Inference(String),
}

/// The encoder families convoflow runs natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT: absolute positions from 0, token type embeddings.
    Bert,
    /// RoBERTa, CamemBERT, XLM-RoBERTa: positions start after the padding index.
    Roberta,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> i64 {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl HfConfig {
    pub fn family(&self) -> Result<Family, ModelError> {
        match self.model_type.as_str() {
            "bert" => Ok(Family::Bert),
            "roberta" | "camembert" | "xlm-roberta" => Ok(Family::Roberta),
            _ => Err(ModelError::UnsupportedArchitecture {
                model_type: self.model_type.clone(),
                architectures: self.architectures.clone(),
            }),
        }
    }

    /// Labels in id order (id2label keys are strings in config.json).
    pub fn labels(&self) -> Vec<String> {
        let mut labels: Vec<(i64, String)> =
            self.id2label.iter().filter_map(|(k, v)| k.parse().ok().map(|id| (id, v.clone()))).collect();
        labels.sort();
        labels.into_iter().map(|(_, v)| v).collect()
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// Longest input the model takes, special tokens included (RoBERTa reserves the first
    /// pad_id + 1 positions).
    pub fn max_positions(&self) -> Result<i64, ModelError> {
        Ok(match self.family()? {
            Family::Bert => self.max_position_embeddings,
            Family::Roberta => self.max_position_embeddings - self.pad_token_id.unwrap_or(1) - 1,
        })
    }
}

/// A validated model folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub path: PathBuf,
    pub config: HfConfig,
    /// The safetensors files holding the weights (one, or the shards of the index).
    pub weight_files: Vec<PathBuf>,
    pub tokenizer: PathBuf,
}

impl ModelFolder {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let folder = path.to_path_buf();
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::MissingFile { folder, file: "config.json" });
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| invalid(&folder, "config.json", e))?;
        let config: HfConfig = serde_json::from_str(&text).map_err(|e| invalid(&folder, "config.json", e))?;
        config.family()?;
        if config.hidden_size % config.num_attention_heads != 0 {
            return Err(invalid(&folder, "config.json", "hidden_size is not a multiple of num_attention_heads"));
        }
        let weight_files = weight_files(&folder)?;
        let tokenizer = path.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(ModelError::MissingFile { folder, file: "tokenizer.json" });
        }
        Ok(Self { path: folder, config, weight_files, tokenizer })
    }
}

fn invalid(folder: &Path, file: &str, reason: impl ToString) -> ModelError {
    ModelError::InvalidFile { folder: folder.to_path_buf(), file: file.to_string(), reason: reason.to_string() }
}

fn weight_files(folder: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = folder.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = folder.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelError::MissingFile {
            folder: folder.to_path_buf(),
            file: "model.safetensors (or model.safetensors.index.json)",
        });
    }
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(&index).map_err(|e| invalid(folder, "model.safetensors.index.json", e))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| invalid(folder, "model.safetensors.index.json", e))?;
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            let p = folder.join(&f);
            if p.is_file() { Ok(p) } else { Err(invalid(folder, "model.safetensors.index.json", format!("shard {f} is missing"))) }
        })
        .collect()
}

impl ModelFolder {
    /// Content version of the weights and config: `fnv64w:` + 16 hex digits, a 64-bit FNV-1a
    /// over 8-byte little-endian words of config.json and every weight file (in order). Cheap
    /// (memory bandwidth) and changes whenever any byte of the weights does.
    pub fn content_version(&self) -> std::io::Result<String> {
        use std::io::Read;
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let files = std::iter::once(self.path.join("config.json")).chain(self.weight_files.iter().cloned());
        let mut buf = vec![0u8; 1 << 20];
        for file in files {
            let mut f = std::fs::File::open(&file)?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                for word in buf[..n].chunks(8) {
                    let mut w = [0u8; 8];
                    w[..word.len()].copy_from_slice(word);
                    hash ^= u64::from_le_bytes(w);
                    hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
        Ok(format!("fnv64w:{hash:016x}"))
    }
}
