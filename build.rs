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
