//! The BERT-family encoder (BERT, RoBERTa, CamemBERT, XLM-RoBERTa) on libtorch.
//! The families differ only in position ids (RoBERTa counts from padding_idx + 1 over
//! non-padding tokens), token-type embeddings and layer-norm epsilon; the layers are the same.

use tch::{Device, Kind, Tensor};

use super::hf::{Family, HfConfig, ModelError};
use super::packed::{CpuLinear, Fused, PackedLinear};
use super::quant::QLinear;
use super::weights::Weights;

/// A dense layer: fp32 (or the device dtype) through libtorch's `linear`, fp32 with
/// oneDNN-packed weights on CPU, or int8 weights with fp32 activations on CPU.
pub enum Linear {
    Dense { weight: Tensor, bias: Tensor },
    Packed(PackedLinear),
    Int8(QLinear),
}

impl Linear {
    pub fn load(w: &Weights, name: &str, out_dim: i64, in_dim: i64, base: bool) -> Result<Self, ModelError> {
        let get = |suffix: &str, shape: &[i64]| {
            let full = format!("{name}.{suffix}");
            if base { w.base(&full, shape) } else { w.get(&full, shape) }
        };
        Ok(Self::Dense { weight: get("weight", &[out_dim, in_dim])?, bias: get("bias", &[out_dim])? })
    }

    /// One layer computing `parts` side by side (their outputs concatenated): one GEMM instead
    /// of several over the same input.
    fn fused(parts: Vec<Linear>) -> Self {
        let (weights, biases): (Vec<Tensor>, Vec<Tensor>) = parts
            .into_iter()
            .map(|p| match p {
                Self::Dense { weight, bias } => (weight, bias),
                Self::Packed(_) | Self::Int8(_) => unreachable!("layers are fused before packing or quantization"),
            })
            .unzip();
        Self::Dense { weight: Tensor::cat(&weights, 0), bias: Tensor::cat(&biases, 0) }
    }

    /// The same layer with int8 weights (dynamic quantization, CPU).
    fn quantized(self) -> Result<Self, ModelError> {
        match self {
            Self::Dense { weight, bias } => {
                Ok(Self::Int8(QLinear::new(&weight, &bias).map_err(|e| ModelError::Inference(format!("int8 quantization: {e}")))?))
            }
            other => Ok(other),
        }
    }

    /// The same layer with its fp32 weight packed for oneDNN (CPU).
    fn packed(self) -> Result<Self, ModelError> {
        match self {
            Self::Dense { weight, bias } => Ok(Self::Packed(
                PackedLinear::new(&weight, &bias).map_err(|e| ModelError::Inference(format!("packing a Linear weight for oneDNN: {e}")))?,
            )),
            other => Ok(other),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Dense { weight, bias } => x.linear(weight, Some(bias)),
            Self::Packed(p) => p.forward(x, Fused::None),
            Self::Int8(q) => q.forward(x),
        }
    }

    /// `activation(forward(x))`: fused into the GEMM's output pass for a packed layer, in place
    /// on the output otherwise (no second [tokens, 4h] buffer either way).
    fn forward_activated(&self, x: &Tensor, activation: Activation) -> Tensor {
        if let Self::Packed(p) = self {
            return p.forward(x, activation.fused());
        }
        let mut y = self.forward(x);
        let _ = match activation {
            Activation::Gelu => y.gelu_("none"),
            Activation::GeluTanh => y.gelu_("tanh"),
            Activation::Relu => y.relu_(),
        };
        y
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

impl Activation {
    fn fused(self) -> Fused {
        match self {
            Self::Gelu => Fused::Gelu,
            Self::GeluTanh => Fused::GeluTanh,
            Self::Relu => Fused::Relu,
        }
    }
}

struct Layer {
    /// query, key and value projections fused: [3 * hidden, hidden]
    qkv: Linear,
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
    /// Token rows are rounded up to a multiple of this for the Linear layers (1: not rounded).
    /// With glibc's heap never trimmed (src/main.rs), every new row count oneDNN saw left the
    /// process larger: with a new count every batch it grew without bound (Python, same ops:
    /// 0.7 → 2.7 GB over 400 random counts; shrinking oneDNN's primitive cache did not change
    /// it, a fixed count or MKL stayed flat); rounded to 64 rows it levels off.
    row_bucket: i64,
    pub hidden_size: i64,
    pub max_positions: i64,
    pub device: Device,
    pub kind: Kind,
}

impl Encoder {
    /// `kind` is the compute dtype; `Kind::QInt8` (CPU only) keeps embeddings, layer norms,
    /// attention and the heads in fp32 and runs the encoder's Linear layers (query/key/value,
    /// attention output, intermediate, and the feed-forward output unless `int8_ffn_output` is
    /// false) with int8 weights. On CPU the encoder's fp32 Linear layers run as `cpu_linear`
    /// says (src/infer/packed.rs).
    pub fn load(
        cfg: &HfConfig,
        w: &Weights,
        device: Device,
        kind: Kind,
        int8_ffn_output: bool,
        cpu_linear: CpuLinear,
    ) -> Result<Self, ModelError> {
        if kind == Kind::QInt8 && device != Device::Cpu {
            return Err(ModelError::Inference(format!("int8 runs on CPU only, not on {device:?}")));
        }
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
        let pack = device == Device::Cpu && matches!(kind, Kind::Float | Kind::QInt8) && cpu_linear == CpuLinear::OneDnn;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let qkv = ["query", "key", "value"]
                    .iter()
                    .map(|n| Linear::load(w, &format!("{p}.attention.self.{n}"), h, h, true))
                    .collect::<Result<Vec<_>, ModelError>>()?;
                let mut layer = Layer {
                    qkv: Linear::fused(qkv),
                    attn_out: Linear::load(w, &format!("{p}.attention.output.dense"), h, h, true)?,
                    attn_norm: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
                    intermediate: Linear::load(w, &format!("{p}.intermediate.dense"), cfg.intermediate_size, h, true)?,
                    output: Linear::load(w, &format!("{p}.output.dense"), h, cfg.intermediate_size, true)?,
                    out_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), h, eps)?,
                };
                if kind == Kind::QInt8 {
                    layer.qkv = layer.qkv.quantized()?;
                    layer.attn_out = layer.attn_out.quantized()?;
                    layer.intermediate = layer.intermediate.quantized()?;
                    if int8_ffn_output {
                        layer.output = layer.output.quantized()?;
                    }
                }
                if pack {
                    // the layers still fp32 (all of them, or those int8 left alone)
                    layer.qkv = layer.qkv.packed()?;
                    layer.attn_out = layer.attn_out.packed()?;
                    layer.intermediate = layer.intermediate.packed()?;
                    layer.output = layer.output.packed()?;
                }
                Ok(layer)
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
            row_bucket: if pack { PACKED_ROW_BUCKET } else { 1 },
            hidden_size: h,
            max_positions: cfg.max_positions()?,
            device,
            kind,
        })
    }

    /// How the encoder's Linear layers run, by layer kind, e.g. `int8+onednn` (int8 layers and
    /// oneDNN-packed fp32 ones), `onednn`, `libtorch` (plain `linear`: MKL on CPU, cuBLAS on CUDA).
    pub fn linear_backend(&self) -> String {
        let mut kinds: Vec<&str> = Vec::new();
        for layer in &self.layers {
            for l in [&layer.qkv, &layer.attn_out, &layer.intermediate, &layer.output] {
                let k = match l {
                    Linear::Dense { .. } => "libtorch",
                    Linear::Packed(_) => "onednn",
                    Linear::Int8(_) => "int8",
                };
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        kinds.sort_by_key(|k| ["int8", "onednn", "libtorch"].iter().position(|o| o == k));
        kinds.join("+")
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
    /// [batch, seq], int64, 1 = token, 0 = padding). Padding positions come back as zeros.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        self.run(input_ids, attention_mask, Output::EveryToken)
    }

    /// Last hidden state of each sequence's first token ([CLS], `<s>`) [batch, hidden]: all a
    /// sequence-classification head reads. The last layer still takes keys and values from
    /// every token, but its attention, attention output, feed-forward and layer norms run on
    /// the first token only: of that layer's 12·h² multiply-adds per token the fused
    /// query/key/value GEMM's 3·h² remain (BERT-base, 12 layers: 6 % of the encoder's
    /// multiply-adds saved; the 2-layer fixtures: 38 %).
    pub fn forward_first_token(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        self.run(input_ids, attention_mask, Output::FirstToken)
    }

    /// Everything but attention works token by token, so it runs on the real tokens only,
    /// packed as [tokens, hidden] rows (with oneDNN-packed layers rounded up to `row_bucket`
    /// rows): padding costs nothing in the Linear layers, layer norms and activations; attention scatters the rows back to [batch, seq] around
    /// `scaled_dot_product_attention` with the key mask.
    fn run(&self, input_ids: &Tensor, attention_mask: &Tensor, output: Output) -> Tensor {
        let (b, t) = input_ids.size2().expect("input_ids is [batch, seq]");
        let (h, slots) = (self.hidden_size, b * t);
        let positions = self.position_ids(input_ids);
        // flat indices of the real tokens in the [b * t] slots; None when there is no padding
        // (CPU only: measured there; on CUDA `nonzero` would add a device synchronisation).
        // With oneDNN-packed layers the row count is rounded up to a multiple of `row_bucket`
        // by repeating the first token's index: the extra rows are computed and never read
        let (rows, tokens) = if self.device == Device::Cpu {
            let real = attention_mask.reshape([-1]).nonzero().squeeze_dim(1);
            let tokens = real.size()[0];
            let padded = (tokens + self.row_bucket - 1) / self.row_bucket * self.row_bucket;
            if padded > tokens {
                (Some(Tensor::cat(&[real.shallow_clone(), real.narrow(0, 0, 1).expand([padded - tokens], false)], 0)), tokens)
            } else {
                ((tokens < slots).then_some(real), tokens)
            }
        } else {
            (None, slots)
        };
        let pack = |y: Tensor| match &rows {
            Some(r) => y.index_select(0, r),
            None => y,
        };
        let unpack = |y: &Tensor| match &rows {
            Some(r) => Tensor::zeros([slots, y.size()[1]], (y.kind(), y.device())).index_copy(
                0,
                &r.narrow(0, 0, tokens),
                &y.narrow(0, 0, tokens),
            ),
            None => y.shallow_clone(),
        };
        let mut x = Tensor::embedding(&self.word, &pack(input_ids.reshape([-1])), -1, false, false)
            + Tensor::embedding(&self.position, &pack(positions.reshape([-1])), -1, false, false);
        if let Some(tt) = &self.token_type {
            x += tt.get(0); // token type 0 for every token (single-segment inputs)
        }
        let mut x = self.emb_norm.forward(&x);
        // boolean key mask [b, 1, 1, t]: true = attend
        let key_mask = attention_mask.to_kind(Kind::Bool).view([b, 1, 1, t]);
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            if super::cancel::requested() {
                break; // nobody waits for this pass any more: its (meaningless) output is dropped
            }
            // [tokens, 3h] -> q, k, v as [b, heads, t, head_dim] views
            let qkv = unpack(&layer.qkv.forward(&x)).view([b, t, 3, self.heads, self.head_dim]).permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
            if output == Output::FirstToken && i == last {
                // the first token's query only: [b, heads, 1, head_dim]; its residual row
                let ctx = Tensor::scaled_dot_product_attention(&q.narrow(2, 0, 1), &k, &v, Some(&key_mask), 0.0, false, None, false)
                    .reshape([b, h]);
                let first = unpack(&x).view([b, t, h]).select(1, 0);
                return self.after_attention(layer, &ctx, &first);
            }
            let ctx = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&key_mask), 0.0, false, None, false)
                .transpose(1, 2)
                .reshape([slots, h]);
            x = self.after_attention(layer, &pack(ctx), &x);
        }
        match output {
            Output::EveryToken => unpack(&x).view([b, t, h]),
            Output::FirstToken => unpack(&x).view([b, t, h]).select(1, 0),
        }
    }

    /// Attention output, feed-forward and their residual layer norms, row by row: `ctx` is the
    /// attention's output for the rows of `residual` (the layer's input), both [rows, hidden].
    fn after_attention(&self, layer: &Layer, ctx: &Tensor, residual: &Tensor) -> Tensor {
        // residual adds in place, the activation fused or in place: no second [tokens, 4h] buffer per layer
        let mut y = layer.attn_out.forward(ctx);
        y += residual;
        let attn = layer.attn_norm.forward(&y);
        let inter = layer.intermediate.forward_activated(&attn, self.activation);
        let mut y = layer.output.forward(&inter);
        y += &attn;
        layer.out_norm.forward(&y)
    }
}

/// `Encoder::row_bucket` with oneDNN-packed layers.
const PACKED_ROW_BUCKET: i64 = 64;

/// What `Encoder::run` returns: every token's last hidden state, or the first token's only.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    EveryToken,
    FirstToken,
}
