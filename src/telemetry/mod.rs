//! Observability: Prometheus metrics (`metrics` facade, rendered by
//! `metrics-exporter-prometheus`), and `/metrics`, `/healthz`, `/readyz` on one port
//! (`telemetry.listen`, served by axum with a connection limit). Every metric name is a constant
//! here and documented in `docs/metrics.md`. `lag` watches consumer lag, `gpu` samples NVML and
//! libtorch's allocator (every 5 s, off the request path).

pub mod gpu;
pub mod lag;
pub mod liveness;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

// Kafka
pub const MESSAGES: &str = "convoflow_messages_total";
pub const TURNS: &str = "convoflow_turns_total";
pub const TOKENS: &str = "convoflow_tokens_total";
pub const DLQ: &str = "convoflow_dlq_messages_total";
pub const TOMBSTONES: &str = "convoflow_tombstones_total";
/// Records produced without some of their input's headers (over `pipeline.max_carried_header_bytes`).
pub const HEADERS_DROPPED: &str = "convoflow_headers_dropped_total";
pub const LAG: &str = "convoflow_consumer_lag";
pub const COMMIT_SECONDS: &str = "convoflow_commit_seconds";
pub const COMMIT_FAILURES: &str = "convoflow_commit_failures_total";
pub const REBALANCES: &str = "convoflow_rebalances_total";
pub const ASSIGNED_PARTITIONS: &str = "convoflow_assigned_partitions";
pub const PAUSED: &str = "convoflow_partitions_paused";
// Pipeline
pub const BATCH_MESSAGES: &str = "convoflow_batch_messages";
pub const BATCH_TURNS: &str = "convoflow_batch_turns";
pub const BATCH_TOKENS: &str = "convoflow_batch_tokens";
pub const IN_FLIGHT: &str = "convoflow_in_flight_messages";
pub const QUEUE_DEPTH: &str = "convoflow_queue_depth";
pub const ENRICH_SECONDS: &str = "convoflow_enrich_seconds";
pub const MODEL_SECONDS: &str = "convoflow_model_seconds";
pub const END_TO_END_SECONDS: &str = "convoflow_end_to_end_seconds";
/// Histogram of each stage's working time per micro-batch (not waiting), by `stage`: prepare,
/// embedding, ner, sentiment (the model threads), write; `_sum` = busy seconds.
pub const STAGE_BUSY_SECONDS: &str = "convoflow_stage_busy_seconds";
/// A model thread's time per job by `task` and `phase`: `queue` (padding, upload, kernel
/// launches; on a GPU nothing waits for the device), `device` (waiting for the device to finish
/// the job's kernels and copies), `read` (turning the copied outputs into results: rows,
/// NER windows and entities). On the CPU the computation itself is in `queue`.
pub const MODEL_PHASE_SECONDS: &str = "convoflow_model_phase_seconds";
/// Micro-batches waiting in front of each stage, by `stage`.
pub const STAGE_QUEUE_DEPTH: &str = "convoflow_stage_queue_depth";
/// Batches (parts of batches) dropped by `stage` (store, emit) because their partition moved to
/// another member after they were read; `STALE_MESSAGES` counts their messages.
pub const STALE_BATCHES: &str = "convoflow_stale_batches_total";
pub const STALE_MESSAGES: &str = "convoflow_stale_messages_total";
/// Tokens the models computed, by `task` and `kind` (real, padded: real + padding).
pub const MODEL_TOKENS: &str = "convoflow_model_tokens_total";
// Qdrant
pub const STORE_UPSERT_SECONDS: &str = "convoflow_store_upsert_seconds";
pub const STORE_POINTS: &str = "convoflow_store_points_total";
pub const STORE_ERRORS: &str = "convoflow_store_errors_total";
pub const STORE_RETRIES: &str = "convoflow_store_retries_total";
// GPU and libtorch
pub const GPU_MEMORY_USED: &str = "convoflow_gpu_memory_used_bytes";
pub const GPU_MEMORY_TOTAL: &str = "convoflow_gpu_memory_total_bytes";
pub const GPU_UTILIZATION: &str = "convoflow_gpu_utilization_ratio";
pub const GPU_TEMPERATURE: &str = "convoflow_gpu_temperature_celsius";
pub const GPU_POWER: &str = "convoflow_gpu_power_watts";
pub const TORCH_ALLOCATED: &str = "convoflow_torch_allocated_bytes";
pub const TORCH_RESERVED: &str = "convoflow_torch_reserved_bytes";
pub const TORCH_PEAK: &str = "convoflow_torch_allocated_peak_bytes";
// Schema Registry
/// Failed Schema Registry requests (each retry counts); the input waits while they fail.
pub const REGISTRY_ERRORS: &str = "convoflow_schema_registry_errors_total";
// Readiness
pub const READY: &str = "convoflow_ready";
/// Exactly-once: transactions by outcome (committed, aborted, fenced), their open → commit
/// time, and the rewinds after an abort.
pub const TRANSACTIONS: &str = "convoflow_transactions_total";
pub const TRANSACTION_SECONDS: &str = "convoflow_transaction_seconds";
pub const REWINDS: &str = "convoflow_rewinds_total";
// The search/ask API (`convoflow serve`) and the LLM (`ask`, `/v1/ask`)
/// API requests by `route` (search, ask, healthz, metrics) and `status` (HTTP code).
pub const API_REQUESTS: &str = "convoflow_api_requests_total";
/// API request time by `route` (a streamed answer: until its last event).
pub const API_REQUEST_SECONDS: &str = "convoflow_api_request_seconds";
/// API requests being served now (bounded by `serve.max_concurrent_requests`).
pub const API_IN_FLIGHT: &str = "convoflow_api_in_flight_requests";
/// LLM completions by `outcome`: ok, unreachable, bad_model, rejected, disconnected, timeout, error.
pub const LLM_REQUESTS: &str = "convoflow_llm_requests_total";
/// Time from sending the prompt to the first generated token.
pub const LLM_FIRST_TOKEN_SECONDS: &str = "convoflow_llm_first_token_seconds";
/// Tokens by `kind`: prompt, completion (as the server reports them, else counted chunks).
pub const LLM_TOKENS: &str = "convoflow_llm_tokens_total";
/// Generation speed of each answer (completion tokens / time after the first token).
pub const LLM_TOKENS_PER_SECOND: &str = "convoflow_llm_tokens_per_second";

/// Every metric name (the deployment files are checked against this list).
pub const ALL: &[&str] = &[
    MESSAGES, TURNS, TOKENS, DLQ, TOMBSTONES, HEADERS_DROPPED, LAG, COMMIT_SECONDS, COMMIT_FAILURES, REBALANCES, ASSIGNED_PARTITIONS, PAUSED,
    BATCH_MESSAGES, BATCH_TURNS, BATCH_TOKENS, IN_FLIGHT, QUEUE_DEPTH, ENRICH_SECONDS, MODEL_SECONDS, END_TO_END_SECONDS,
    STAGE_BUSY_SECONDS, MODEL_PHASE_SECONDS, STAGE_QUEUE_DEPTH, MODEL_TOKENS, STALE_BATCHES, STALE_MESSAGES,
    STORE_UPSERT_SECONDS, STORE_POINTS, STORE_ERRORS, STORE_RETRIES, GPU_MEMORY_USED, GPU_MEMORY_TOTAL, GPU_UTILIZATION,
    GPU_TEMPERATURE, GPU_POWER, TORCH_ALLOCATED, TORCH_RESERVED, TORCH_PEAK, REGISTRY_ERRORS, READY, TRANSACTIONS,
    TRANSACTION_SECONDS, REWINDS, API_REQUESTS, API_REQUEST_SECONDS, API_IN_FLIGHT, LLM_REQUESTS, LLM_FIRST_TOKEN_SECONDS,
    LLM_TOKENS, LLM_TOKENS_PER_SECOND,
];

/// The process-wide Prometheus recorder (installed once, on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let sizes = [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), &seconds)
            .and_then(|b| b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Prefix("convoflow_batch_".into()), &sizes))
            .expect("valid buckets");
        match builder.install_recorder() {
            Ok(handle) => handle,
            // another recorder is global already (a test harness): keep a detached one
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// What `/readyz` reports: ready when every part is.
#[derive(Debug, Default)]
pub struct Readiness {
    pub models_warm: AtomicBool,
    pub partitions_assigned: AtomicBool,
    pub store_reachable: AtomicBool,
    /// Set while the edge store's writes wait for free disk (`qdrant.edge_min_free_bytes`).
    pub store_disk_low: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.problems().is_empty()
    }

    pub fn problems(&self) -> Vec<&'static str> {
        let mut out = vec![];
        if !self.models_warm.load(Ordering::Relaxed) {
            out.push("models not loaded and warm yet");
        }
        if !self.partitions_assigned.load(Ordering::Relaxed) {
            out.push("no input partition assigned");
        }
        if self.store_disk_low.load(Ordering::Relaxed) {
            out.push("free disk below qdrant.edge_min_free_bytes under the vector store (writes wait for space)");
        } else if !self.store_reachable.load(Ordering::Relaxed) {
            out.push("vector store not reachable");
        }
        if liveness::registry_waiting() {
            out.push("schema registry not answering (input waits for a writer schema)");
        }
        out
    }
}

/// At most this many telemetry connections at once: a scraper storm or clients that never
/// close cannot take the worker's file descriptors and tasks; further ones wait to be accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// A telemetry connection is closed this long after it was accepted (probes and scrapes take
/// milliseconds; a client that holds one open cannot keep its slot).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// A telemetry connection that has sent nothing for this long is closed: idle keep-alive
/// clients holding every slot delay a liveness probe by this much at most, not by a lifetime.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the GPU and allocator gauges are sampled (off the request path).
const GPU_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Probes {
    readiness: Arc<Readiness>,
    liveness: Arc<liveness::Liveness>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` (axum, HTTP/1.1) until the process ends, at most
/// `MAX_CONNECTIONS` connections at once; samples the GPU gauges every `GPU_SAMPLE_INTERVAL`.
/// Returns the bound address (port 0 in `listen` picks a free one).
pub async fn serve(listen: &str, readiness: Arc<Readiness>, liveness: Arc<liveness::Liveness>) -> Result<SocketAddr> {
    prometheus();
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding telemetry.listen {listen}"))?;
    let addr = listener.local_addr()?;
    info!(%addr, "serving /metrics, /healthz, /readyz");
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_page))
        .route("/healthz", axum::routing::get(|State(p): State<Probes>| async move { probe_answer(&p.liveness.problems(), "ok", "not alive") }))
        .route("/readyz", axum::routing::get(|State(p): State<Probes>| async move { probe_answer(&p.readiness.problems(), "ready", "not ready") }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n") })
        .with_state(Probes { readiness, liveness });
    let listener = LimitedListener { inner: listener, slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)) };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "the telemetry server stopped");
        }
    });
    sample_gpu_periodically();
    Ok(addr)
}

async fn metrics_page(State(p): State<Probes>) -> impl IntoResponse {
    metrics::gauge!(READY).set(if p.readiness.ready() { 1.0 } else { 0.0 });
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus().render())
}

/// Starts (once per process) the task that refreshes the GPU gauges.
fn sample_gpu_periodically() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        tokio::spawn(async {
            let mut every = tokio::time::interval(GPU_SAMPLE_INTERVAL);
            loop {
                every.tick().await;
                let _ = tokio::task::spawn_blocking(gpu::sample).await;
            }
        });
    });
}

/// The TCP listener, with one of `slots` held by every open connection.
struct LimitedListener {
    inner: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let closes = Box::pin(tokio::time::sleep(CONNECTION_LIFETIME));
                    let idle = Box::pin(tokio::time::sleep(IDLE_TIMEOUT));
                    return (LimitedConnection { io, _slot: slot, closes, idle }, addr);
                }
                Err(e) => {
                    // out of file descriptors and the like: wait instead of spinning
                    debug!(error = %e, "telemetry accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A telemetry connection: holds its slot until dropped, and fails its reads once
/// `CONNECTION_LIFETIME` has passed or after `IDLE_TIMEOUT` without a byte received (the server
/// then closes it).
struct LimitedConnection {
    io: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    closes: std::pin::Pin<Box<tokio::time::Sleep>>,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl AsyncRead for LimitedConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.closes.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "telemetry connection lifetime over")));
        }
        if self.idle.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "telemetry connection idle")));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
        }
        read
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A probe's answer: 200 with `ok`, or 503 with `not_ok` and the problems.
fn probe_answer(problems: &[impl AsRef<str>], ok: &str, not_ok: &str) -> (StatusCode, String) {
    if problems.is_empty() {
        (StatusCode::OK, format!("{ok}\n"))
    } else {
        let problems: Vec<&str> = problems.iter().map(AsRef::as_ref).collect();
        (StatusCode::SERVICE_UNAVAILABLE, format!("{not_ok}: {}\n", problems.join("; ")))
    }
}
