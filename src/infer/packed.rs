//! fp32 Linear layers on CPU with weights packed once for oneDNN (libtorch's MKLDNN backend):
//! `mkldnn::_reorder_linear_weight` at load, `mkldnn::_linear_pointwise` per call, with the
//! feed-forward activation fused into the GEMM's output pass. Reached through the C++ shim in
//! src/infer/shim/packed_linear_shim.cpp because tch does not bind these ops; they are what
//! PyTorch's own CPU compiler emits for a Linear with frozen weights.
//!
//! Why: `Tensor::linear` on CPU is MKL's sgemm, which repacks the weight on every call (and on
//! AMD CPUs runs its `_zen` kernels). On the AMD EPYC (Zen 4, 2 vCPU) build machine the packed
//! oneDNN GEMM ran the encoder's shapes at 186–221 GFLOP/s against MKL's 128–185 (1.15–1.5×,
//! docs/performance.md), for any row count with the same packed weight. `CONVOFLOW_CPU_LINEAR=mkl`
//! keeps MKL (for A/B runs on other CPUs); see `CpuLinear`.

use std::ffi::{CStr, c_char, c_int, c_void};

use tch::{Device, Kind, Tensor};

use super::shim_message;

unsafe extern "C" {
    fn cf_packed_available() -> c_int;
    fn cf_packed_reorder(weight: *const c_void, batch_hint: i64, out: *mut c_void, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_packed_linear(
        input: *const c_void,
        packed: *const c_void,
        bias: *const c_void,
        attr: *const c_char,
        algorithm: *const c_char,
        out: *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// Rows the weights are packed for (a hint to oneDNN's layout choice; any row count works):
/// a micro-batch's tokens are typically hundreds to a few thousand.
const BATCH_HINT: i64 = 1024;

/// How the encoder's fp32 Linear layers run on CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuLinear {
    /// oneDNN with weights packed at load, activation fused (this module)
    OneDnn,
    /// libtorch's `linear`: MKL's sgemm, the weight repacked on every call
    Mkl,
}

impl CpuLinear {
    /// `CONVOFLOW_CPU_LINEAR` (`onednn`, the default, or `mkl`); MKL when libtorch has no oneDNN.
    pub fn from_env() -> Self {
        let wanted = std::env::var("CONVOFLOW_CPU_LINEAR").map_or(true, |v| !v.eq_ignore_ascii_case("mkl"));
        if wanted && available() { Self::OneDnn } else { Self::Mkl }
    }
}

/// Whether libtorch was built with oneDNN.
pub fn available() -> bool {
    // SAFETY: reads a build/runtime capability of libtorch
    unsafe { cf_packed_available() == 1 }
}

/// The activation fused into the GEMM's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused {
    None,
    /// GELU, erf form (BERT's `gelu`)
    Gelu,
    /// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`)
    GeluTanh,
    Relu,
}

impl Fused {
    fn attr(self) -> (&'static CStr, &'static CStr) {
        match self {
            Self::None => (c"none", c""),
            Self::Gelu => (c"gelu", c"none"),
            Self::GeluTanh => (c"gelu", c"tanh"),
            Self::Relu => (c"relu", c""),
        }
    }
}

/// A Linear layer with its weight in oneDNN's layout (fp32, CPU) and its fp32 bias.
pub struct PackedLinear {
    packed: Tensor,
    bias: Tensor,
}

impl PackedLinear {
    /// Packs `weight` [out, in] (any float dtype, converted to fp32) with `bias` [out]. CPU only.
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self, String> {
        if weight.device() != Device::Cpu {
            return Err(format!("packed fp32 layers run on CPU only, the weight is on {:?}", weight.device()));
        }
        if weight.dim() != 2 || bias.size() != [weight.size()[0]] {
            return Err(format!("a Linear weight is [out, in] with a bias [out], got {:?} and {:?}", weight.size(), bias.size()));
        }
        let mut packed = Tensor::new();
        let mut err = [0 as c_char; 1024];
        // SAFETY: `weight` is a live tch tensor (at::Tensor*); the shim assigns into `packed`'s at::Tensor
        let rc = unsafe { cf_packed_reorder(weight.as_ptr().cast(), BATCH_HINT, packed.as_mut_ptr().cast(), err.as_mut_ptr(), err.len()) };
        if rc != 0 {
            return Err(shim_message(&err));
        }
        Ok(Self { packed, bias: bias.to_kind(Kind::Float).contiguous() })
    }

    /// `input` [..., in] fp32 → activation(input · Wᵀ + b) [..., out] fp32.
    pub fn forward(&self, input: &Tensor, fused: Fused) -> Tensor {
        let (attr, algorithm) = fused.attr();
        let mut out = Tensor::new();
        let mut err = [0 as c_char; 1024];
        // SAFETY: `input`, `packed`, `bias` are live tch tensors; the shim assigns into `out`'s at::Tensor
        let rc = unsafe {
            cf_packed_linear(
                input.as_ptr().cast(),
                self.packed.as_ptr().cast(),
                self.bias.as_ptr().cast(),
                attr.as_ptr(),
                algorithm.as_ptr(),
                out.as_mut_ptr().cast(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        // tch's own ops panic on a libtorch error too; Model::run_sequences catches it
        assert!(rc == 0, "packed linear: {}", shim_message(&err));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap() / f64::try_from(b.abs().max()).unwrap()
    }

    #[test]
    fn packed_linear_computes_linear_and_its_activation() {
        assert!(available(), "libtorch has no oneDNN here: the packed path cannot be tested");
        tch::manual_seed(3);
        let w = Tensor::randn([96, 64], (Kind::Float, Device::Cpu)) * 0.1;
        let b = Tensor::randn([96], (Kind::Float, Device::Cpu));
        let layer = PackedLinear::new(&w, &b).unwrap();
        // row counts other than the packing hint, 2-D and 3-D inputs
        for shape in [vec![7i64, 64], vec![3, 5, 64], vec![1500, 64]] {
            let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
            let plain = x.linear(&w, Some(&b));
            let cases = [
                (Fused::None, plain.shallow_clone()),
                (Fused::Gelu, plain.gelu("none")),
                (Fused::GeluTanh, plain.gelu("tanh")),
                (Fused::Relu, plain.relu()),
            ];
            for (fused, want) in cases {
                let got = layer.forward(&x, fused);
                assert_eq!(got.size(), want.size(), "{fused:?}");
                assert!(max_rel(&got, &want) < 1e-5, "{fused:?} {shape:?}: relative error {}", max_rel(&got, &want));
            }
        }
        // the activations differ from each other, so a wrong attr would show above
        let x = Tensor::randn([4, 64], (Kind::Float, Device::Cpu));
        assert!(max_rel(&layer.forward(&x, Fused::Relu), &layer.forward(&x, Fused::None)) > 0.1);
    }

    #[test]
    fn a_bad_weight_is_an_error_not_a_crash() {
        let w = Tensor::zeros([4, 3, 2], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        assert!(PackedLinear::new(&w, &b).is_err());
    }
}
