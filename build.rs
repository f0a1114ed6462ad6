//! Links libtorch so CUDA works wherever it exists, and records the libtorch version.
//!
//! rustc links with `--as-needed`; nothing in convoflow references libtorch_cuda's symbols
//! directly, so without this the binary never loads libtorch_cuda.so (whose static
//! initialisers register the CUDA backend) and every CUDA tensor op fails.

fn main() {
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        // find libtorch where it was built against; LD_LIBRARY_PATH still takes precedence
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}/lib");
    }
    build_cuda_shim();
    record_model_paths();
    let version = std::env::var("LIBTORCH")
        .ok()
        .and_then(|dir| std::fs::read_to_string(std::path::Path::new(&dir).join("version.py")).ok())
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string()))
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CONVOFLOW_LIBTORCH_VERSION={version}");
}

/// Where scripts/setup put the models (scripts/env.sh exports these, and setup builds with it
/// sourced): recorded as `CONVOFLOW_BUILT_*` so `convoflow demo` finds the models without the
/// environment (src/demo.rs; the variables at run time still come first).
fn record_model_paths() {
    for var in ["CONVOFLOW_MODEL_FIXTURES", "CONVOFLOW_E5_SMALL", "CONVOFLOW_MINILM"] {
        println!("cargo:rerun-if-env-changed={var}");
        if let Ok(value) = std::env::var(var)
            && !value.is_empty()
            && !value.contains('\n')
        {
            let recorded = var.replacen("CONVOFLOW_", "CONVOFLOW_BUILT_", 1);
            println!("cargo:rustc-env={recorded}={value}");
        }
    }
}

/// The C++ shims (src/infer/shim/) against libtorch's headers, for what tch does not expose:
/// CUDA streams, events and allocator statistics (cuda_shim.cpp, needs no CUDA headers), int8
/// Linear layers on fbgemm and fp32 ones on oneDNN with packed weights (the CPU ones).
fn build_cuda_shim() {
    println!("cargo:rerun-if-changed=src/infer/shim/cuda_shim.cpp");
    println!("cargo:rerun-if-changed=src/infer/shim/qlinear_shim.cpp");
    println!("cargo:rerun-if-changed=src/infer/shim/packed_linear_shim.cpp");
    println!("cargo:rerun-if-changed=src/infer/shim/shim_error.h");
    let libtorch = std::env::var("LIBTORCH").expect("LIBTORCH must point at libtorch (source scripts/env.sh)");
    let include = std::path::Path::new(&libtorch).join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("src/infer/shim/cuda_shim.cpp")
        // int8 Linear layers on CPU (quantized::linear_dynamic), see the file
        .file("src/infer/shim/qlinear_shim.cpp")
        // fp32 Linear layers on CPU with oneDNN-packed weights (mkldnn::_linear_pointwise), see the file
        .file("src/infer/shim/packed_linear_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("convoflow_cuda_shim");
    // the shim calls into libc10 / libtorch_cpu
    println!("cargo:rustc-link-search=native={libtorch}/lib");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
}
