use clap::Parser;
use tracing_subscriber::EnvFilter;

/// mimalloc for Rust's own allocations (libtorch, librdkafka and the tokenizers' C parts keep
/// their allocators): the stages around the models allocate per message and per token, and
/// glibc's malloc/free took about a quarter of the runtime threads' CPU in a profile of the
/// model-free end-to-end bench (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging() {
    let filter = EnvFilter::try_from_env("CONVOFLOW_LOG").unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,qdrant_edge=error"));
    // CONVOFLOW__TELEMETRY__LOG_FORMAT=json switches to JSON lines (also settable in the file;
    // the environment is read here because logging starts before the config is parsed).
    let json = std::env::var("CONVOFLOW__TELEMETRY__LOG_FORMAT").is_ok_and(|v| v == "json");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(convoflow::telemetry::log::LogWriter);
    if json { builder.json().init() } else { builder.init() }
}

/// libtorch allocates its CPU tensors with glibc's malloc (`posix_memalign`). By default glibc
/// serves blocks over 32 MiB with a fresh `mmap` and unmaps them when freed, and gives each
/// model thread its own arena of 64 MiB heaps, so every batch's activations (a 16,384-token
/// batch of XLM-RoBERTa-large has a 256 MiB feed-forward tensor) were page-faulted and zeroed
/// by the kernel again: a quarter of the CPU in a profile of `bench --models-only`
/// (docs/performance.md). One arena, no mmap for large blocks and no trimming keep the freed
/// pages mapped for the next batch (128-turn fp32 run of the three fixtures: 6.3 M → 1.05 M
/// page faults, 14.1 → 6.0 s system time); the process holds its peak heap (3.9 → 4.3 GB).
/// Settings given through `GLIBC_TUNABLES` (`glibc.malloc.*`) take precedence.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_tensor_memory() {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return;
    }
    // SAFETY: mallopt only changes malloc's parameters; called before any other thread exists
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_tensor_memory() {}

fn main() {
    keep_freed_tensor_memory();
    init_logging();
    let cli = convoflow::cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("starting the tokio runtime");
    let result = runtime.block_on(convoflow::cli::execute(cli));
    // Blocking tasks still running (a model batch nobody waits for any more) are not waited
    // for: a stopping worker exits on time, its unfinished work uncommitted.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // A model thread may still be running a batch nobody waits for: the C++ static destructors
    // that a normal exit runs (libtorch's) would pull its state away under it and crash the
    // process on its way out. Everything of ours is flushed and dropped by now, so leave
    // without them.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process at once; no Rust state needs to run after this point.
    unsafe { libc::_exit(code) }
}
