//! Model runtime: native BERT-family encoders on libtorch (tch), HuggingFace folders.

pub mod batch;
pub mod cancel;
pub mod cuda;
pub mod device;
pub mod encoder;
pub mod hf;
pub mod manager;
pub mod model;
pub mod ner;
pub mod packed;
pub mod quant;
pub mod random;
pub mod runner;
pub mod tokenize;
pub mod weights;

pub use hf::{ModelError, ModelFolder};
pub use model::{Model, Task};

/// The error message a C++ shim (src/infer/shim/) wrote into `buf` on failure.
fn shim_message(buf: &[std::ffi::c_char]) -> String {
    // SAFETY: the buffer is zeroed by the caller and the shim writes a NUL-terminated message
    // into it (snprintf, within its length), so it always holds a C string
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

/// Index and value of the largest probability (the first one on ties).
pub fn argmax(probabilities: &[f32]) -> (usize, f32) {
    probabilities.iter().enumerate().fold((0, f32::MIN), |best, (i, &p)| if p > best.1 { (i, p) } else { best })
}

/// Argmax stars and expected stars (1..=n) from 1-to-n-star probabilities.
pub fn stars(probabilities: &[f32]) -> (i32, f32) {
    let (argmax, _) = argmax(probabilities);
    let expected = probabilities.iter().enumerate().map(|(i, p)| (i as f32 + 1.0) * p).sum();
    (argmax as i32 + 1, expected)
}
