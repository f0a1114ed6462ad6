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

/// The name `parse_device` reads: `cpu` or `cuda:N` (metric labels, `/v1/models`).
pub fn label(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    }
}

/// The compute dtype of a model. CUDA: fp32, fp16 or bf16 as configured. CPU: int8 (dynamic
/// quantization of the encoder's Linear layers, returned as `Kind::QInt8`), otherwise fp32
/// (fp16/bf16 configured on CPU run fp32). int8 on CUDA is a configuration error.
pub fn parse_dtype(spec: &str, device: Device) -> anyhow::Result<Kind> {
    let kind = match spec {
        "fp32" | "float32" => Kind::Float,
        "fp16" | "float16" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "int8" | "qint8" => Kind::QInt8,
        other => anyhow::bail!("dtype must be fp32, fp16, bf16 or int8 (CPU only), got {other:?}"),
    };
    match (device, kind) {
        (Device::Cpu, Kind::QInt8) => Ok(Kind::QInt8),
        (Device::Cpu, _) => Ok(Kind::Float),
        (_, Kind::QInt8) => anyhow::bail!(
            "dtype int8 runs on CPU only (dynamic int8 quantization with fbgemm); on {device:?} use fp16, bf16 or fp32"
        ),
        (_, kind) => Ok(kind),
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

/// Whether the libtorch this process loaded is a CUDA build (its `libtorch_cuda.so` sits next
/// to `libtorch_cpu.so`), found from the process's own memory map.
fn libtorch_has_cuda_library() -> Option<bool> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let cpu = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cpu.so"))?;
    Some(std::path::Path::new(cpu).with_file_name("libtorch_cuda.so").exists())
}

/// The CUDA line of `check`: what is there and what the models will run on.
fn cuda_line() -> String {
    let devices = Cuda::device_count();
    if Cuda::is_available() {
        return format!("cuda: {devices} device(s) visible; the models run on cuda:0 unless gpu.device says otherwise");
    }
    match libtorch_has_cuda_library() {
        Some(true) => "cuda: no CUDA device visible — the linked libtorch is a CUDA build (libtorch_cuda.so is present) \
                       but this machine has no usable NVIDIA GPU or driver; the models run on the CPU"
            .into(),
        Some(false) => "cuda: this libtorch is a CPU-only build; the models run on the CPU".into(),
        None => format!("cuda: not available (libtorch reports CUDA support: {}); the models run on the CPU", tch::utils::has_cuda()),
    }
}

/// One line per fact, for `convoflow check`.
pub fn report() -> Vec<String> {
    let mut lines = vec![
        format!("libtorch: {} (built against)", env!("CONVOFLOW_LIBTORCH_VERSION")),
        cuda_line(),
        format!("cudnn: available {}", Cuda::cudnn_is_available()),
        format!("cpu: {} intra-op threads, mkldnn {}, openmp {}", tch::get_num_threads(), tch::utils::has_mkldnn(), tch::utils::has_openmp()),
    ];
    if Cuda::is_available() {
        lines.push(format!("cudart {} cudnn {}", tch::utils::version_cudart(), tch::utils::version_cudnn()));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_per_device() {
        assert_eq!(parse_dtype("int8", Device::Cpu).unwrap(), Kind::QInt8);
        assert_eq!(parse_dtype("fp16", Device::Cpu).unwrap(), Kind::Float, "CPU runs fp16/bf16 configs in fp32");
        assert_eq!(parse_dtype("bf16", Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(parse_dtype("fp32", Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(parse_dtype("fp16", Device::Cuda(0)).unwrap(), Kind::Half);
        assert_eq!(parse_dtype("bf16", Device::Cuda(0)).unwrap(), Kind::BFloat16);
        let err = parse_dtype("int8", Device::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("int8") && err.contains("CPU only"), "{err}");
        assert!(parse_dtype("int4", Device::Cpu).is_err(), "an unknown dtype is an error on CPU too");
    }
}
