//! Randomly initialised weights for a config, under HuggingFace parameter names: for
//! benchmarks (speed does not depend on weight values) and device-consistency checks where
//! the real weights cannot be shipped. Linear weights ~ N(0, 0.02) like transformers' init,
//! classifier weights ~ N(0, 0.5) so random heads still give distinct labels, biases and
//! layer-norm parameters slightly perturbed so every parameter path is exercised.

use std::path::Path;

use tch::{Kind, Tensor};

use super::Task;
use super::hf::{Family, HfConfig, ModelError};

pub fn random_weights(cfg: &HfConfig, task: Task, seed: i64) -> Result<Vec<(String, Tensor)>, ModelError> {
    tch::manual_seed(seed);
    let family = cfg.family()?;
    let (h, i, n) = (cfg.hidden_size, cfg.intermediate_size, cfg.labels().len() as i64);
    let prefix = match (family, task) {
        (_, Task::Embedding) => "",
        (Family::Bert, _) => "bert.",
        (Family::Roberta, _) => "roberta.",
    };
    let normal = |shape: &[i64], std: f64| Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * std;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let linear = |out: &mut Vec<(String, Tensor)>, name: String, o: i64, inp: i64, std: f64| {
        out.push((format!("{name}.weight"), normal(&[o, inp], std)));
        out.push((format!("{name}.bias"), normal(&[o], 0.02)));
    };
    let norm = |out: &mut Vec<(String, Tensor)>, name: String, d: i64| {
        out.push((format!("{name}.weight"), normal(&[d], 0.02) + 1.0));
        out.push((format!("{name}.bias"), normal(&[d], 0.02)));
    };
    out.push((format!("{prefix}embeddings.word_embeddings.weight"), normal(&[cfg.vocab_size, h], 0.02)));
    out.push((format!("{prefix}embeddings.position_embeddings.weight"), normal(&[cfg.max_position_embeddings, h], 0.02)));
    out.push((format!("{prefix}embeddings.token_type_embeddings.weight"), normal(&[cfg.type_vocab_size, h], 0.02)));
    norm(&mut out, format!("{prefix}embeddings.LayerNorm"), h);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("{prefix}encoder.layer.{l}");
        for part in ["query", "key", "value"] {
            linear(&mut out, format!("{p}.attention.self.{part}"), h, h, 0.02);
        }
        linear(&mut out, format!("{p}.attention.output.dense"), h, h, 0.02);
        norm(&mut out, format!("{p}.attention.output.LayerNorm"), h);
        linear(&mut out, format!("{p}.intermediate.dense"), i, h, 0.02);
        linear(&mut out, format!("{p}.output.dense"), h, i, 0.02);
        norm(&mut out, format!("{p}.output.LayerNorm"), h);
    }
    match (task, family) {
        (Task::Embedding, _) => {}
        (Task::TokenClassification, _) => linear(&mut out, "classifier".into(), n, h, 0.5),
        (Task::SequenceClassification, Family::Bert) => {
            linear(&mut out, format!("{prefix}pooler.dense"), h, h, 0.02);
            linear(&mut out, "classifier".into(), n, h, 0.5);
        }
        (Task::SequenceClassification, Family::Roberta) => {
            linear(&mut out, "classifier.dense".into(), h, h, 0.02);
            linear(&mut out, "classifier.out_proj".into(), n, h, 0.5);
        }
    }
    Ok(out)
}

/// Writes `model.safetensors` of random weights into `dir`, which must already hold the
/// config.json (and tokenizer.json) of the architecture.
pub fn write_random_model(dir: &Path, task: Task, seed: i64) -> Result<(), ModelError> {
    let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| ModelError::InvalidFile {
        folder: dir.to_path_buf(),
        file: "config.json".into(),
        reason: e.to_string(),
    })?;
    let cfg: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::InvalidFile {
        folder: dir.to_path_buf(),
        file: "config.json".into(),
        reason: e.to_string(),
    })?;
    let weights = random_weights(&cfg, task, seed)?;
    Tensor::write_safetensors(&weights, dir.join("model.safetensors"))?;
    Ok(())
}
