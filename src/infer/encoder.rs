//! The BERT-family encoder (BERT, RoBERTa, CamemBERT, XLM-RoBERTa) on libtorch.
//! The families differ only in position ids (RoBERTa counts from padding_idx + 1 over
//! non-padding tokens), token-type embeddings and layer-norm epsilon; the layers are the same.

use tch::{Device, Kind, Tensor};

use super::hf::{Family, HfConfig, ModelError};
use super::weights::Weights;

pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn load(w: &Weights, name: &str, out_dim: i64, in_dim: i64, base: bool) -> Result<Self, ModelError> {
        let get = |suffix: &str, shape: &[i64]| {
            let full = format!("{name}.{suffix}");
            if base { w.base(&full, shape) } else { w.get(&full, shape) }
        };
        Ok(Self { weight: get("weight", &[out_dim, in_dim])?, bias: get("bias", &[out_dim])? })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    dim: i64,
}

impl LayerNorm {
    fn load(w: &Weights, name: &str, dim: i64, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w.base(&format!("{name}.weight"), &[dim])?,
            bias: w.base(&format!("{name}.bias"), &[dim])?,
            eps,
            dim,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

#[derive(Clone, Copy)]
enum Activation {
    Gelu,
    GeluTanh,
    Relu,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

pub struct Encoder {
    family: Family,
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    activation: Activation,
    heads: i64,
    head_dim: i64,
    pad_id: i64,
    pub hidden_size: i64,
    pub max_positions: i64,
    pub device: Device,
    pub kind: Kind,
}

impl Encoder {
    pub fn load(cfg: &HfConfig, w: &Weights, device: Device, kind: Kind) -> Result<Self, ModelError> {
        let family = cfg.family()?;
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let activation = match cfg.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(ModelError::UnsupportedArchitecture {
                    model_type: format!("{} with hidden_act {other}", cfg.model_type),
                    architectures: cfg.architectures.clone(),
                });
            }
        };
        let token_type_name = format!("{}embeddings.token_type_embeddings.weight", w.prefix);
        let token_type = if w.has(&token_type_name) {
            Some(w.base("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h])?)
        } else {
            None
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: Linear::load(w, &format!("{p}.attention.self.query"), h, h, true)?,
                    key: Linear::load(w, &format!("{p}.attention.self.key"), h, h, true)?,
                    value: Linear::load(w, &format!("{p}.attention.self.value"), h, h, true)?,
                    attn_out: Linear::load(w, &format!("{p}.attention.output.dense"), h, h, true)?,
                    attn_norm: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
                    intermediate: Linear::load(w, &format!("{p}.intermediate.dense"), cfg.intermediate_size, h, true)?,
                    output: Linear::load(w, &format!("{p}.output.dense"), h, cfg.intermediate_size, true)?,
                    out_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            family,
            word: w.base("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?,
            position: w.base("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, h])?,
            token_type,
            emb_norm: LayerNorm::load(w, "embeddings.LayerNorm", h, eps)?,
            layers,
            activation,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            pad_id: cfg.pad_token_id.unwrap_or(if family == Family::Roberta { 1 } else { 0 }),
            hidden_size: h,
            max_positions: cfg.max_positions()?,
            device,
            kind,
        })
    }

    fn position_ids(&self, input_ids: &Tensor) -> Tensor {
        let (b, t) = input_ids.size2().expect("input_ids is [batch, seq]");
        match self.family {
            Family::Bert => Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0).expand([b, t], false),
            Family::Roberta => {
                let not_pad = input_ids.ne(self.pad_id).to_kind(Kind::Int64);
                not_pad.cumsum(1, Kind::Int64) * &not_pad + self.pad_id
            }
        }
    }

    /// Last hidden states [batch, seq, hidden] for `input_ids` and `attention_mask` (both
    /// [batch, seq], int64, 1 = token, 0 = padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let (b, t) = input_ids.size2().expect("input_ids is [batch, seq]");
        let positions = self.position_ids(input_ids);
        let mut x = Tensor::embedding(&self.word, input_ids, -1, false, false)
            + Tensor::embedding(&self.position, &positions, -1, false, false);
        if let Some(tt) = &self.token_type {
            x += tt.get(0); // token type 0 for every token (single-segment inputs)
        }
        let mut x = self.emb_norm.forward(&x);
        // boolean key mask [b, 1, 1, t]: true = attend
        let key_mask = attention_mask.to_kind(Kind::Bool).view([b, 1, 1, t]);
        for layer in &self.layers {
            let split = |y: Tensor| y.view([b, t, self.heads, self.head_dim]).transpose(1, 2);
            let q = split(layer.query.forward(&x));
            let k = split(layer.key.forward(&x));
            let v = split(layer.value.forward(&x));
            let ctx = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&key_mask), 0.0, false, None, false)
                .transpose(1, 2)
                .contiguous()
                .view([b, t, self.hidden_size]);
            let attn = layer.attn_norm.forward(&(layer.attn_out.forward(&ctx) + &x));
            let inter = layer.intermediate.forward(&attn);
            let inter = match self.activation {
                Activation::Gelu => inter.gelu("none"),
                Activation::GeluTanh => inter.gelu("tanh"),
                Activation::Relu => inter.relu(),
            };
            x = layer.out_norm.forward(&(layer.output.forward(&inter) + &attn));
        }
        x
    }
}
