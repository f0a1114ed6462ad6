//! Observability: Prometheus metrics (`metrics` facade, rendered by
//! `metrics-exporter-prometheus`). Every metric name is a constant here and documented in
//! `docs/metrics.md`; `endpoint` serves `/metrics`, `/healthz`, `/readyz` on one port
//! (`telemetry.listen`); `gpu` samples NVML and libtorch's allocator; `liveness` says whether
//! the worker still makes progress. (Consumer lag is watched by `source::lag`.)

pub mod endpoint;
pub mod events;
pub mod gpu;
pub mod liveness;
pub mod log;

pub use endpoint::{MAX_CONNECTIONS, Readiness, serve};

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

// Kafka
pub const MESSAGES: &str = "convoflow_messages_total";
pub const TURNS: &str = "convoflow_turns_total";
pub const TOKENS: &str = "convoflow_tokens_total";
pub const DLQ: &str = "convoflow_dlq_messages_total";
pub const TOMBSTONES: &str = "convoflow_tombstones_total";
/// Records produced without some of their input's headers (over `pipeline.max_carried_header_bytes`).
pub const HEADERS_DROPPED: &str = "convoflow_headers_dropped_total";
pub const LAG: &str = "convoflow_consumer_lag";
/// The group's committed offset per input partition (from the same lookup as the lag): a
/// partition with a backlog whose committed offset stops moving is stalled.
pub const COMMITTED_OFFSET: &str = "convoflow_consumer_committed_offset";
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
/// Free bytes on the filesystem under the embedded store, and the reserve below which its
/// writes wait (`qdrant.edge_min_free_bytes`; absent when 0).
pub const STORE_FREE_BYTES: &str = "convoflow_store_free_bytes";
pub const STORE_MIN_FREE_BYTES: &str = "convoflow_store_min_free_bytes";
// GPU and libtorch
pub const GPU_MEMORY_USED: &str = "convoflow_gpu_memory_used_bytes";
pub const GPU_MEMORY_TOTAL: &str = "convoflow_gpu_memory_total_bytes";
pub const GPU_UTILIZATION: &str = "convoflow_gpu_utilization_ratio";
pub const GPU_TEMPERATURE: &str = "convoflow_gpu_temperature_celsius";
pub const GPU_POWER: &str = "convoflow_gpu_power_watts";
/// The share of a GPU's memory libtorch's allocator may take: `gpu.memory_fraction` × total.
pub const GPU_MEMORY_LIMIT: &str = "convoflow_gpu_memory_limit_bytes";
/// Bytes of each loaded model's parameters, by `task`, `model` and `device` (cpu, cuda:N).
pub const MODEL_PARAMETER_BYTES: &str = "convoflow_model_parameter_bytes";
pub const TORCH_ALLOCATED: &str = "convoflow_torch_allocated_bytes";
pub const TORCH_RESERVED: &str = "convoflow_torch_reserved_bytes";
pub const TORCH_PEAK: &str = "convoflow_torch_allocated_peak_bytes";
// Schema Registry
/// Failed Schema Registry requests (each retry counts); the input waits while they fail.
pub const REGISTRY_ERRORS: &str = "convoflow_schema_registry_errors_total";
// Readiness
pub const READY: &str = "convoflow_ready";
/// 1 when `/healthz` would answer 200.
pub const ALIVE: &str = "convoflow_alive";
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
    MESSAGES, TURNS, TOKENS, DLQ, TOMBSTONES, HEADERS_DROPPED, LAG, COMMITTED_OFFSET, COMMIT_SECONDS, COMMIT_FAILURES, REBALANCES, ASSIGNED_PARTITIONS, PAUSED,
    BATCH_MESSAGES, BATCH_TURNS, BATCH_TOKENS, IN_FLIGHT, QUEUE_DEPTH, ENRICH_SECONDS, MODEL_SECONDS, END_TO_END_SECONDS,
    STAGE_BUSY_SECONDS, MODEL_PHASE_SECONDS, STAGE_QUEUE_DEPTH, MODEL_TOKENS, STALE_BATCHES, STALE_MESSAGES,
    STORE_UPSERT_SECONDS, STORE_POINTS, STORE_ERRORS, STORE_RETRIES, STORE_FREE_BYTES, STORE_MIN_FREE_BYTES, GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL, GPU_UTILIZATION, GPU_TEMPERATURE, GPU_POWER, GPU_MEMORY_LIMIT, MODEL_PARAMETER_BYTES, TORCH_ALLOCATED,
    TORCH_RESERVED, TORCH_PEAK, REGISTRY_ERRORS, READY, ALIVE, TRANSACTIONS,
    TRANSACTION_SECONDS, REWINDS, API_REQUESTS, API_REQUEST_SECONDS, API_IN_FLIGHT, LLM_REQUESTS, LLM_FIRST_TOKEN_SECONDS,
    LLM_TOKENS, LLM_TOKENS_PER_SECOND,
];

/// Starts a worker's counters (and the paused-partitions gauge) at 0 for every label value they can take, so that a rate, an
/// increase or a ratio is 0 rather than absent before the first event (Prometheus's advice for
/// counters with known labels: an alert on a DLQ share, a panel of commit failures, would
/// otherwise see nothing until the first failure). `dlq_classes`: every `dlq.error.class`.
pub fn start_worker_metrics_at_zero(dlq_classes: &[&'static str]) {
    metrics::gauge!(PAUSED).set(0.0);
    for name in [MESSAGES, TURNS, TOKENS, HEADERS_DROPPED, COMMIT_FAILURES, REBALANCES, STORE_POINTS, STORE_RETRIES, REGISTRY_ERRORS, REWINDS] {
        metrics::counter!(name).increment(0);
    }
    for &class in dlq_classes {
        metrics::counter!(DLQ, "class" => class).increment(0);
    }
    for matched in ["some", "none"] {
        metrics::counter!(TOMBSTONES, "matched" => matched).increment(0);
    }
    for stage in ["build", "store", "emit"] {
        metrics::counter!(STALE_BATCHES, "stage" => stage).increment(0);
        metrics::counter!(STALE_MESSAGES, "stage" => stage).increment(0);
    }
    for op in ["upsert", "delete"] {
        for kind in STORE_ERROR_KINDS {
            metrics::counter!(STORE_ERRORS, "op" => op, "kind" => kind).increment(0);
        }
    }
    for outcome in ["committed", "aborted", "fenced", "replaced"] {
        metrics::counter!(TRANSACTIONS, "outcome" => outcome).increment(0);
    }
}

/// The `kind` label values of `STORE_ERRORS`.
pub const STORE_ERROR_KINDS: [&str; 4] = ["transient", "low_disk", "too_large", "permanent"];

/// The process-wide Prometheus recorder (installed once, on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let sizes = [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0];
        let rates = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), &seconds)
            .and_then(|b| b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Prefix("convoflow_batch_".into()), &sizes))
            // a histogram without buckets is rendered as a summary: no `_bucket` series for the
            // dashboard's quantiles (found by tests/observability.rs)
            .and_then(|b| b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(LLM_TOKENS_PER_SECOND.into()), &rates))
            .expect("valid buckets");
        match builder.install_recorder() {
            Ok(handle) => handle,
            // another recorder is global already (a test harness): keep a detached one
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

