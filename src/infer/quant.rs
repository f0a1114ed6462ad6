//! int8 Linear layers on CPU: dynamic quantization through libtorch's fbgemm kernels
//! (`quantized::linear_prepack` / `quantized::linear_dynamic`, reached through the C++ shim in
//! src/infer/shim/qlinear_shim.cpp because tch does not bind them). Weights are int8 within
//! [-63, 63], one scale per output channel; the input is quantized to uint8 at every call, with
//! one scale per token: each row is divided by its own largest magnitude before fbgemm quantizes
//! the batch, and the output row multiplied back (a row scale commutes with the GEMM), so one
//! token with large activations (a [CLS] or [SEP]) no longer coarsens every other token's step
//! (all-MiniLM-L6-v2's lowest cosine to fp32 rose from 0.9896 with one scale per batch to 0.9929).
//! 8-bit inputs: the 7-bit weights keep fbgemm's AVX2 int16 pair sums from saturating.
//! Accumulation is int32, the output fp32 with the fp32 bias added after the row scale.

use std::ffi::{c_char, c_int, c_void};

use tch::{Device, Tensor};

use super::shim_message;

unsafe extern "C" {
    fn cf_qlinear_prepack(weight: *const c_void, err: *mut c_char, errlen: usize) -> *mut c_void;
    fn cf_qlinear_free(packed: *mut c_void);
    fn cf_qlinear_forward(
        packed: *const c_void,
        input: *const c_void,
        out: *mut c_void,
        reduce_range: c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn cf_qengine() -> c_int;
}

/// A packed int8 weight (fbgemm's packed params, owned by the shim, packed without a bias) and
/// the fp32 bias, added after the per-token scale is undone.
pub struct QLinear {
    packed: *mut c_void,
    bias: Tensor,
}

// SAFETY: the packed params are immutable once built; `linear_dynamic` only reads them. A model
// (and so its layers) is used by one thread at a time (it sits behind a Mutex), like its tensors.
unsafe impl Send for QLinear {}

impl QLinear {
    /// Quantizes `weight` [out, in] and packs it with `bias` [out]. CPU only.
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self, String> {
        if weight.device() != Device::Cpu {
            return Err(format!("int8 layers run on CPU only, the weight is on {:?}", weight.device()));
        }
        let mut err = [0 as c_char; 1024];
        // SAFETY: `weight` is a live tch tensor (at::Tensor*) for the duration of the call
        let packed = unsafe { cf_qlinear_prepack(weight.as_ptr().cast(), err.as_mut_ptr(), err.len()) };
        if packed.is_null() { Err(shim_message(&err)) } else { Ok(Self { packed, bias: bias.to_kind(tch::Kind::Float) }) }
    }

    /// `input` [..., in] fp32 → [..., out] fp32.
    pub fn forward(&self, input: &Tensor) -> Tensor {
        // one scale per token: the row's largest magnitude, max(max, −min) — two vectorized
        // reductions, no |x| copy; libtorch's ∞-norm reduction took 8.9 ms where these take
        // 0.8 ms on a [4096, 1024] input (2 threads), a third of the int8 GEMM's own time
        let dim = [-1i64];
        let mut scale = input.amax(dim.as_slice(), true).maximum(&input.amin(dim.as_slice(), true).neg());
        let _ = scale.clamp_min_(1e-12);
        let input = input / &scale;
        let mut out = Tensor::new();
        let mut err = [0 as c_char; 1024];
        // SAFETY: `packed` is owned by self; `input` and `out` are live tch tensors; the shim
        // assigns the result into `out`'s at::Tensor
        let rc = unsafe {
            cf_qlinear_forward(self.packed, input.as_ptr().cast(), out.as_mut_ptr().cast(), 0, err.as_mut_ptr(), err.len())
        };
        // tch's own ops panic on a libtorch error too; Model::run_sequences catches it
        assert!(rc == 0, "quantized linear: {}", shim_message(&err));
        let _ = out.g_mul_(&scale).g_add_(&self.bias);
        out
    }
}

impl Drop for QLinear {
    fn drop(&mut self) {
        // SAFETY: created by cf_qlinear_prepack, freed once
        unsafe { cf_qlinear_free(self.packed) }
    }
}

/// libtorch's quantized engine (at::QEngine: 0 none, 1 fbgemm, 2 qnnpack, 3 onednn, 4 x86).
pub fn engine() -> i32 {
    // SAFETY: reads a global setting
    unsafe { cf_qengine() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn int8_linear_is_close_to_fp32_and_really_int8() {
        tch::manual_seed(1);
        let w = Tensor::randn([96, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let b = Tensor::randn([96], (Kind::Float, Device::Cpu)) * 0.05;
        let x = Tensor::randn([5, 7, 64], (Kind::Float, Device::Cpu));
        let q = QLinear::new(&w, &b).unwrap();
        let y = q.forward(&x);
        let reference = x.linear(&w, Some(&b));
        assert_eq!(y.size(), [5, 7, 96]);
        assert_eq!(y.kind(), Kind::Float);
        let rel = f64::try_from((&y - &reference).abs().max()).unwrap() / f64::try_from(reference.abs().max()).unwrap();
        assert!(rel < 0.05, "relative error {rel}");
        // not the fp32 result: the output carries quantization error
        assert!(rel > 1e-5, "relative error {rel}: no quantization happened");
        assert!(engine() > 0, "a quantized engine is available");
    }

    #[test]
    fn each_token_keeps_its_own_input_scale() {
        // one token 1000× larger than the others (a [CLS] with outlier activations): with one
        // input scale for the batch the small tokens would fall under a single uint8 step
        tch::manual_seed(2);
        let w = Tensor::randn([32, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let b = Tensor::zeros([32], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([4, 64], (Kind::Float, Device::Cpu));
        let _ = x.get(0).g_mul_scalar_(1000.0);
        let y = QLinear::new(&w, &b).unwrap().forward(&x);
        let reference = x.linear(&w, Some(&b));
        for row in 1..4 {
            let (got, want) = (y.get(row), reference.get(row));
            let rel = f64::try_from((&got - &want).norm()).unwrap() / f64::try_from(want.norm()).unwrap();
            assert!(rel < 0.05, "token {row}: relative error {rel}");
        }
    }

    #[test]
    fn a_bad_weight_is_an_error_not_a_crash() {
        let w = Tensor::zeros([4, 3, 2], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        assert!(QLinear::new(&w, &b).is_err());
    }
}
