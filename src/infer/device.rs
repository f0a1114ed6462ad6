//! Devices and what libtorch reports about them.

use tch::{Cuda, Device, Kind};

/// `auto` (CUDA 0 when available), `cpu`, or `cuda:N`.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "auto" => Ok(if Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("gpu.device must be auto, cpu or cuda:N, got {other:?}"))?;
            if n >= Cuda::device_count() as usize {
                anyhow::bail!("gpu.device {other}: only {} CUDA device(s) visible", Cuda::device_count());
            }
            Ok(Device::Cuda(n))
        }
    }
}

/// fp32 on CPU whatever is configured; fp16/bf16/fp32 on CUDA as configured.
pub fn parse_dtype(spec: &str, device: Device) -> anyhow::Result<Kind> {
    if device == Device::Cpu {
        return Ok(Kind::Float);
    }
    match spec {
        "fp32" | "float32" => Ok(Kind::Float),
        "fp16" | "float16" => Ok(Kind::Half),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        other => anyhow::bail!("dtype must be fp32, fp16 or bf16, got {other:?}"),
    }
}

/// Process-wide settings of the device the models run on: CPU intra-op threads, or the CUDA
/// caching allocator's share of the GPU's memory (`gpu.memory_fraction`).
pub fn configure(device: Device, gpu: &crate::config::GpuConfig) -> anyhow::Result<()> {
    match device {
        Device::Cpu if gpu.cpu_threads > 0 => tch::set_num_threads(gpu.cpu_threads as i32),
        Device::Cuda(_) if gpu.memory_fraction < 1.0 => {
            super::cuda::set_memory_fraction(gpu.memory_fraction)?;
            tracing::info!(fraction = gpu.memory_fraction, "CUDA caching allocator capped");
        }
        _ => {}
    }
    Ok(())
}

/// One line per fact, for `convoflow check`.
pub fn report() -> Vec<String> {
    let mut lines = vec![
        format!("libtorch: {} (built against)", env!("CONVOFLOW_LIBTORCH_VERSION")),
        format!("cuda: available {} ({} device(s)), built with CUDA {}", Cuda::is_available(), Cuda::device_count(), tch::utils::has_cuda()),
        format!("cudnn: available {}", Cuda::cudnn_is_available()),
        format!("cpu: {} intra-op threads, mkldnn {}, openmp {}", tch::get_num_threads(), tch::utils::has_mkldnn(), tch::utils::has_openmp()),
    ];
    if Cuda::is_available() {
        lines.push(format!("cudart {} cudnn {}", tch::utils::version_cudart(), tch::utils::version_cudnn()));
    }
    lines
}
