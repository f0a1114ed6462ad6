//! Observability: Prometheus metrics (`metrics` facade, rendered by
//! `metrics-exporter-prometheus`), and `/metrics`, `/healthz`, `/readyz` on one port
//! (`telemetry.listen`). Every metric name is a constant here and documented in
//! `docs/metrics.md`. `lag` watches consumer lag, `gpu` samples NVML and libtorch's allocator.

pub mod gpu;
pub mod lag;
pub mod liveness;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

// Kafka
pub const MESSAGES: &str = "convoflow_messages_total";
pub const TURNS: &str = "convoflow_turns_total";
pub const TOKENS: &str = "convoflow_tokens_total";
pub const DLQ: &str = "convoflow_dlq_messages_total";
pub const TOMBSTONES: &str = "convoflow_tombstones_total";
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

/// Every metric name (the deployment files are checked against this list).
pub const ALL: &[&str] = &[
    MESSAGES, TURNS, TOKENS, DLQ, TOMBSTONES, LAG, COMMIT_SECONDS, COMMIT_FAILURES, REBALANCES, ASSIGNED_PARTITIONS, PAUSED,
    BATCH_MESSAGES, BATCH_TURNS, BATCH_TOKENS, IN_FLIGHT, QUEUE_DEPTH, ENRICH_SECONDS, MODEL_SECONDS, END_TO_END_SECONDS,
    STAGE_BUSY_SECONDS, MODEL_PHASE_SECONDS, STAGE_QUEUE_DEPTH, MODEL_TOKENS, STALE_BATCHES, STALE_MESSAGES,
    STORE_UPSERT_SECONDS, STORE_POINTS, STORE_ERRORS, STORE_RETRIES, GPU_MEMORY_USED, GPU_MEMORY_TOTAL, GPU_UTILIZATION,
    GPU_TEMPERATURE, GPU_POWER, TORCH_ALLOCATED, TORCH_RESERVED, TORCH_PEAK, REGISTRY_ERRORS, READY,
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
        if !self.store_reachable.load(Ordering::Relaxed) {
            out.push("vector store not reachable");
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends. Returns the bound address
/// (port 0 in `listen` picks a free one).
pub async fn serve(listen: &str, readiness: Arc<Readiness>, liveness: Arc<liveness::Liveness>) -> Result<SocketAddr> {
    let handle = prometheus();
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding telemetry.listen {listen}"))?;
    let addr = listener.local_addr()?;
    info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "telemetry accept failed");
                    continue;
                }
            };
            let (readiness, liveness) = (readiness.clone(), liveness.clone());
            tokio::spawn(async move {
                // Read the whole request head (it may arrive in pieces): closing a socket with
                // unread bytes makes the kernel reset the connection under the response.
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match tokio::time::timeout_at(deadline, socket.read(&mut chunk)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&buf);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, content_type, body) = respond(path, &readiness, &liveness, handle).await;
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                if let Err(e) = socket.write_all(head.as_bytes()).await.and(socket.write_all(body.as_bytes()).await) {
                    debug!(error = %e, "telemetry client went away");
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(addr)
}

async fn respond(
    path: &str,
    readiness: &Readiness,
    liveness: &liveness::Liveness,
    handle: &PrometheusHandle,
) -> (&'static str, &'static str, String) {
    match path.split('?').next().unwrap_or(path) {
        "/metrics" => {
            metrics::gauge!(READY).set(if readiness.ready() { 1.0 } else { 0.0 });
            tokio::task::spawn_blocking(gpu::sample).await.ok();
            ("200 OK", "text/plain; version=0.0.4", handle.render())
        }
        "/healthz" => probe_answer(&liveness.problems(), "ok", "not alive"),
        "/readyz" => probe_answer(&readiness.problems(), "ready", "not ready"),
        _ => ("404 Not Found", "text/plain", "not found: try /metrics, /healthz or /readyz\n".into()),
    }
}

/// A probe's answer: 200 with `ok`, or 503 with `not_ok` and the problems.
fn probe_answer(problems: &[impl AsRef<str>], ok: &str, not_ok: &str) -> (&'static str, &'static str, String) {
    if problems.is_empty() {
        ("200 OK", "text/plain", format!("{ok}\n"))
    } else {
        let problems: Vec<&str> = problems.iter().map(AsRef::as_ref).collect();
        ("503 Service Unavailable", "text/plain", format!("{not_ok}: {}\n", problems.join("; ")))
    }
}
