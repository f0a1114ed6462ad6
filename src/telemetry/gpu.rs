//! GPU gauges, sampled when `/metrics` is scraped: NVML (`nvml-wrapper`, which loads
//! libnvidia-ml at run time) for memory, utilisation, temperature and power of every device,
//! and libtorch's caching allocator (through the CUDA shim) for allocated / reserved / peak.
//! Without NVML (no driver, CPU machine) the GPU metrics are absent: one log line, no error.

use std::sync::OnceLock;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use tracing::info;

use super::{GPU_MEMORY_LIMIT, GPU_MEMORY_TOTAL, GPU_MEMORY_USED, GPU_POWER, GPU_TEMPERATURE, GPU_UTILIZATION, TORCH_ALLOCATED, TORCH_PEAK, TORCH_RESERVED};

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| match Nvml::init() {
        Ok(n) => Some(n),
        Err(e) => {
            info!(reason = %e, "NVML not available: GPU metrics are not exported");
            None
        }
    })
    .as_ref()
}

/// Updates the GPU and allocator gauges (blocking calls into NVML / libtorch).
pub fn sample() {
    if let Some(nvml) = nvml() {
        let count = nvml.device_count().unwrap_or(0);
        for i in 0..count {
            let Ok(device) = nvml.device_by_index(i) else { continue };
            let gpu = i.to_string();
            if let Ok(mem) = device.memory_info() {
                metrics::gauge!(GPU_MEMORY_USED, "gpu" => gpu.clone()).set(mem.used as f64);
                metrics::gauge!(GPU_MEMORY_TOTAL, "gpu" => gpu.clone()).set(mem.total as f64);
                metrics::gauge!(GPU_MEMORY_LIMIT, "gpu" => gpu.clone()).set(crate::infer::cuda::memory_fraction() * mem.total as f64);
            }
            if let Ok(u) = device.utilization_rates() {
                metrics::gauge!(GPU_UTILIZATION, "gpu" => gpu.clone()).set(f64::from(u.gpu) / 100.0);
            }
            if let Ok(t) = device.temperature(TemperatureSensor::Gpu) {
                metrics::gauge!(GPU_TEMPERATURE, "gpu" => gpu.clone()).set(f64::from(t));
            }
            if let Ok(mw) = device.power_usage() {
                metrics::gauge!(GPU_POWER, "gpu" => gpu.clone()).set(f64::from(mw) / 1000.0);
            }
        }
    }
    if crate::infer::cuda::available() {
        for i in 0..tch::Cuda::device_count().max(0) as usize {
            if let Ok(s) = crate::infer::cuda::memory_stats(i) {
                let gpu = i.to_string();
                metrics::gauge!(TORCH_ALLOCATED, "gpu" => gpu.clone()).set(s.allocated as f64);
                metrics::gauge!(TORCH_RESERVED, "gpu" => gpu.clone()).set(s.reserved as f64);
                metrics::gauge!(TORCH_PEAK, "gpu" => gpu).set(s.allocated_peak as f64);
            }
        }
    }
}
