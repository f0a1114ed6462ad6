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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(convoflow::demo::LogWriter);
    if json { builder.json().init() } else { builder.init() }
}

fn main() {
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
