//! Weights from safetensors, looked up by HuggingFace parameter name with shape checks.

use std::cell::RefCell;
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::hf::{ModelError, ModelFolder};

/// A checkpoint's tensors, each handed out once: `get` moves a tensor out of the map, so the
/// model holds the only reference and a weight the encoder replaces (fused query/key/value,
/// oneDNN-packed, int8) is freed as soon as it is replaced rather than when loading ends (with
/// packed fp32 weights both copies of every Linear weight otherwise coexisted until then).
pub struct Weights {
    tensors: RefCell<HashMap<String, Tensor>>,
    /// Prefix of the base model's parameters ("bert.", "roberta.", "" for a bare model...).
    pub prefix: String,
    device: Device,
    kind: Kind,
}

impl Weights {
    pub fn load(folder: &ModelFolder, device: Device, kind: Kind) -> Result<Self, ModelError> {
        let mut tensors = HashMap::new();
        for file in &folder.weight_files {
            for (name, tensor) in Tensor::read_safetensors(file)? {
                // legacy TF-converted checkpoints name LayerNorm parameters gamma/beta
                let name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias");
                tensors.insert(name, tensor);
            }
        }
        let prefix = tensors
            .keys()
            .find_map(|k| k.strip_suffix("embeddings.word_embeddings.weight").map(str::to_string))
            .ok_or_else(|| ModelError::MissingTensor { name: "embeddings.word_embeddings.weight".into() })?;
        // int8 models load in fp32: the encoder quantizes its Linear layers itself
        let kind = if kind == Kind::QInt8 { Kind::Float } else { kind };
        Ok(Self { tensors: RefCell::new(tensors), prefix, device, kind })
    }

    /// Number of values in the tensors not handed out yet (the whole checkpoint before the first `get`).
    pub fn parameter_count(&self) -> u64 {
        self.tensors.borrow().values().map(|t| t.numel() as u64).sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.borrow().contains_key(name)
    }

    /// Tensor `name` (full name), checked against `shape`, moved to the device and dtype, and
    /// taken out of the checkpoint (a second `get` of the same name is `MissingTensor`).
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        let mut tensors = self.tensors.borrow_mut();
        let t = tensors.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })?;
        if t.size() != shape {
            return Err(ModelError::ShapeMismatch { name: name.to_string(), expected: shape.to_vec(), found: t.size() });
        }
        let t = tensors.remove(name).expect("present above");
        Ok(t.to_device(self.device).to_kind(self.kind))
    }

    /// A base-model tensor: `name` under the detected prefix.
    pub fn base(&self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        self.get(&format!("{}{name}", self.prefix), shape)
    }
}
