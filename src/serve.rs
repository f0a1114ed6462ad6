//! `convoflow serve`: the search/ask HTTP API for applications (axum, HTTP/1.1).
//!
//! - `POST /v1/search` — `{"query", "k"?, "filters"?, "group_by"?}` → `{"hits": [...], "took_ms"}`
//! - `POST /v1/ask` — `{"question", "k"?, "filters"?, "group_by"?, "stream"?}` → the answer and its sources as
//!   JSON, or with `"stream": true` Server-Sent Events: `sources`, then one `token` per piece
//!   of the answer, then `done` (or `error`)
//! - `GET /healthz` (the store answers, the embedding thread is alive), `GET /metrics`
//!
//! The embedding model is loaded once at start on its own thread (queries queue on it); the LLM
//! is connected on the first question. At most `serve.max_concurrent_requests` `/v1` requests
//! run at once (a streamed answer holds its slot until its last event); others wait
//! `serve.queue_timeout_ms`, then get 503. Bodies over `serve.max_body_bytes` get 413. With
//! `serve.api_key`, `/v1` routes need `Authorization: Bearer <key>`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tracing::{info, warn};

use crate::ask::{self, Answer, AskError, TokenCounter};
use crate::config::{Config, Secret};
use crate::infer::runner::{ModelThread, NerSettings, Output};
use crate::llm::{LlmClient, LlmError};
use crate::search::GroupBy;
use crate::sink::store::{SearchFilter, StoreError, VectorStore};
use crate::telemetry;

/// Payload filters of a request (the same as `convoflow search`'s flags).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filters {
    pub tenant: Option<String>,
    pub speaker: Option<String>,
    pub language: Option<String>,
    pub conversation_id: Option<String>,
    pub min_stars: Option<i32>,
    /// `LABEL:VALUE` items, all of which must match.
    pub entities: Vec<String>,
}

impl Filters {
    fn to_filter(&self) -> Result<SearchFilter, ApiError> {
        if let Some(s) = self.min_stars
            && !(1..=5).contains(&s)
        {
            return Err(ApiError::bad(format!("filters.min_stars must be 1 to 5, got {s}")));
        }
        let entities = self
            .entities
            .iter()
            .map(|e| crate::search::parse_entity(e).map_err(|e| ApiError::bad(format!("filters.entities: {e:#}"))))
            .collect::<Result<_, _>>()?;
        Ok(SearchFilter {
            conversation_id: self.conversation_id.clone(),
            tenant: self.tenant.clone(),
            speaker: self.speaker.clone(),
            language: self.language.clone(),
            min_stars: self.min_stars,
            entities,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub query: String,
    #[serde(default)]
    pub k: Option<usize>,
    #[serde(default)]
    pub filters: Filters,
    /// `"conversation"`: the best hit of each of k conversations.
    #[serde(default)]
    pub group_by: Option<GroupBy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskRequest {
    pub question: String,
    #[serde(default)]
    pub k: Option<usize>,
    #[serde(default)]
    pub filters: Filters,
    #[serde(default)]
    pub group_by: Option<GroupBy>,
    #[serde(default)]
    pub stream: bool,
}

/// An error answer: `{"error": message}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = if e.is_transient() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::INTERNAL_SERVER_ERROR };
        Self { status, message: e.to_string() }
    }
}

impl From<LlmError> for ApiError {
    fn from(e: LlmError) -> Self {
        let status = match &e {
            LlmError::NotConfigured | LlmError::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            LlmError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        Self { status, message: e.to_string() }
    }
}

impl From<AskError> for ApiError {
    fn from(e: AskError) -> Self {
        match e {
            AskError::QuestionTooLong { .. } => Self::bad(e.to_string()),
            AskError::Llm(e) => e.into(),
            AskError::Store(e) => e.into(),
            AskError::Embedding(e) => Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("{e:#}") },
        }
    }
}

/// The embedding model on its own thread, with the query template applied.
struct QueryEmbedder {
    thread: ModelThread,
    template: crate::config::ModelConfig,
}

struct ServeState {
    cfg: Config,
    store: Arc<dyn VectorStore>,
    embedder: Option<Arc<QueryEmbedder>>,
    llm: Option<Arc<LlmClient>>,
    counter: Arc<TokenCounter>,
    slots: Arc<Semaphore>,
    api_key: Option<Secret>,
}

type Shared = Arc<ServeState>;

impl ServeState {
    async fn embed(&self, text: &str) -> Result<Option<Vec<f32>>, ApiError> {
        let Some(e) = self.embedder.clone() else { return Ok(None) };
        let query = e.template.query_text(text);
        let out = tokio::task::spawn_blocking(move || e.thread.run(vec![query])).await.map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("the embedding thread: {e}"),
        })?;
        match out {
            Ok((Output::Embeddings(mut v), _)) => Ok(v.pop()),
            Ok((other, _)) => Err(ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("unexpected model output {other:?}") }),
            Err(e) => Err(ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("embedding the query: {e:#}") }),
        }
    }

    fn k(&self, k: Option<usize>, default: usize) -> Result<usize, ApiError> {
        let k = k.unwrap_or(default);
        if k == 0 || k > self.cfg.serve.max_k {
            return Err(ApiError::bad(format!("k must be 1 to {} (serve.max_k), got {k}", self.cfg.serve.max_k)));
        }
        Ok(k)
    }

    async fn retrieve(&self, text: &str, filters: &Filters, k: usize, group_by: Option<GroupBy>) -> Result<Vec<crate::sink::store::Hit>, ApiError> {
        if text.trim().is_empty() {
            return Err(ApiError::bad("the query is empty"));
        }
        let filter = filters.to_filter()?;
        let dense = self.embed(text).await?;
        Ok(self.store.search(&ask::hybrid_query(text, dense, filter, k, group_by)).await?)
    }
}

/// Starts the API; returns its address and the server task (ends when `shutdown` resolves).
pub async fn start(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<Result<()>>)> {
    telemetry::prometheus();
    let store = ask::open_store(&cfg).await?;
    let embedder = match &cfg.models.embedding {
        Some(m) if m.path.join("config.json").exists() => {
            let device = crate::infer::device::parse_device(&cfg.gpu.device)?;
            let managed = crate::infer::manager::ManagedModel::new(crate::infer::Task::Embedding, m.clone(), device)?;
            let thread = tokio::task::spawn_blocking(move || ModelThread::spawn(managed, true, NerSettings::default()))
                .await
                .context("loading the embedding model")??;
            info!(model = %m.name, "embedding model loaded for queries");
            Some(Arc::new(QueryEmbedder { thread, template: m.clone() }))
        }
        _ => {
            warn!("no embedding model folder configured: searches are BM25 only");
            None
        }
    };
    let llm = if cfg.llm.is_configured() { Some(Arc::new(LlmClient::new(&cfg.llm)?)) } else { None };
    let counter = Arc::new(TokenCounter::new(&cfg.llm)?);
    let listener = tokio::net::TcpListener::bind(&cfg.serve.listen).await.with_context(|| format!("binding serve.listen {}", cfg.serve.listen))?;
    let addr = listener.local_addr()?;
    let state: Shared = Arc::new(ServeState {
        slots: Arc::new(Semaphore::new(cfg.serve.max_concurrent_requests)),
        api_key: cfg.serve.api_key.clone(),
        store,
        embedder,
        llm,
        counter,
        cfg,
    });
    let app = router(state);
    info!(%addr, "serving /v1/search, /v1/ask, /healthz, /metrics");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("the API server")
    });
    Ok((addr, task))
}

fn router(state: Shared) -> Router {
    let limit = state.cfg.serve.max_body_bytes;
    Router::new()
        .route("/v1/search", axum::routing::post(search))
        .route("/v1/ask", axum::routing::post(ask_route))
        .route("/healthz", axum::routing::get(healthz))
        .route("/metrics", axum::routing::get(|| async {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], telemetry::prometheus().render())
        }))
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, message: "not found: POST /v1/search, POST /v1/ask, GET /healthz, GET /metrics".into() } })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .with_state(state)
}

/// Counts a request when its response body ends (a streamed answer: after its last event).
struct Finished {
    route: &'static str,
    status: u16,
    started: Instant,
}

impl Drop for Finished {
    fn drop(&mut self) {
        metrics::counter!(telemetry::API_REQUESTS, "route" => self.route, "status" => self.status.to_string()).increment(1);
        metrics::histogram!(telemetry::API_REQUEST_SECONDS, "route" => self.route).record(self.started.elapsed().as_secs_f64());
        metrics::gauge!(telemetry::API_IN_FLIGHT).decrement(1.0);
    }
}

/// Authentication and the concurrency bound of `/v1` routes, and the request metrics of all.
async fn admit(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = request.uri().path();
    let route = match path {
        "/v1/search" => "search",
        "/v1/ask" => "ask",
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        _ => "other",
    };
    metrics::gauge!(telemetry::API_IN_FLIGHT).increment(1.0);
    // counted whatever happens next: a client that goes away while its request waits or runs
    // drops this future, and the guard counts it as 499 (nginx's "client closed request")
    let mut done = Finished { route, status: 499, started };
    let mut permit = None;
    if path.starts_with("/v1/") {
        if let Some(key) = &state.api_key {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.expose().as_bytes())) {
                done.status = StatusCode::UNAUTHORIZED.as_u16();
                let mut r = ApiError { status: StatusCode::UNAUTHORIZED, message: "missing or wrong bearer token (serve.api_key)".into() }.into_response();
                r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
                return r;
            }
        }
        let wait = Duration::from_millis(state.cfg.serve.queue_timeout_ms);
        match tokio::time::timeout(wait, state.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => permit = Some(p),
            _ => {
                done.status = StatusCode::SERVICE_UNAVAILABLE.as_u16();
                let mut r = ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: format!("busy: {} requests in progress (serve.max_concurrent_requests)", state.cfg.serve.max_concurrent_requests),
                }
                .into_response();
                r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                return r;
            }
        }
    }
    let response = next.run(request).await;
    done.status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    // the slot and the count live as long as the body: a stream holds them to its end
    let body = body.into_data_stream().map(move |chunk| {
        let _held = (&permit, &done);
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// Equal byte strings, in a time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Set when the request's handler is dropped (its client went away): stops its completion.
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn healthz(State(state): State<Shared>) -> Response {
    let store = tokio::time::timeout(Duration::from_secs(5), state.store.count(&SearchFilter::default())).await;
    let mut problems = vec![];
    let points = match store {
        Ok(Ok(n)) => Some(n),
        Ok(Err(e)) => {
            problems.push(format!("store: {e}"));
            None
        }
        Err(_) => {
            problems.push("store: no answer within 5 s".to_string());
            None
        }
    };
    if state.embedder.is_some() {
        match tokio::time::timeout(Duration::from_secs(5), state.embed("health")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("embedding: {}", e.message)),
            Err(_) => problems.push("embedding: no answer within 5 s".to_string()),
        }
    }
    let body = json!({
        "status": if problems.is_empty() { "ok" } else { "unhealthy" },
        "problems": problems,
        "store": state.store.backend(),
        "points": points,
        "embedding": state.embedder.as_ref().map(|e| e.template.name.clone()),
        "llm": state.llm.as_ref().map(|l| json!({"url": l.url(), "model": l.model()})),
    });
    let status = if problems.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn search(State(state): State<Shared>, Json(req): Json<SearchRequest>) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let k = state.k(req.k, 10.min(state.cfg.serve.max_k))?;
    let hits = state.retrieve(&req.query, &req.filters, k, req.group_by).await?;
    Ok(Json(json!({ "hits": crate::search::hits_json(&hits), "took_ms": started.elapsed().as_secs_f64() * 1000.0 })))
}

async fn ask_route(State(state): State<Shared>, Json(req): Json<AskRequest>) -> Result<Response, ApiError> {
    let Some(llm) = state.llm.clone() else { return Err(LlmError::NotConfigured.into()) };
    let k = state.k(req.k, state.cfg.llm.top_k)?;
    let hits = state.retrieve(&req.question, &req.filters, k, req.group_by).await?;
    // tokenizing the prompt is CPU work: off the async threads
    let prompt = {
        let (state, question, hits) = (state.clone(), req.question.clone(), hits.clone());
        tokio::task::spawn_blocking(move || ask::build_prompt(&state.cfg.llm, &question, &hits, &state.counter))
            .await
            .map_err(|e| ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("building the prompt: {e}") })??
    };
    let meta = json!({
        "sources": prompt.sources,
        "retrieved": hits.len(),
        "dropped": prompt.dropped,
        "prompt_tokens_counted": prompt.prompt_tokens,
        "prompt_budget": prompt.budget,
        "model": llm.model(),
    });
    let messages = prompt.messages.clone();
    if !req.stream {
        // a client that goes away drops this handler: the flag stops the generation
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _cancel = CancelOnDrop(cancelled.clone());
        let client = llm.clone();
        let completion = tokio::task::spawn_blocking(move || {
            client.stream_chat(&messages, &mut |_| !cancelled.load(std::sync::atomic::Ordering::SeqCst))
        })
            .await
            .map_err(|e| ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("the LLM thread: {e}") })??;
        return Ok(Json(Answer::new(req.question, llm.model(), hits.len(), prompt, completion)).into_response());
    }
    // the answer as Server-Sent Events, each piece forwarded as the LLM produces it; a client
    // that goes away closes the channel, which stops the completion (and the LLM's generation)
    let (tx, rx) = mpsc::channel::<Event>(256);
    let first = Event::default().event("sources").json_data(&meta).expect("serializable");
    let _ = tx.send(first).await;
    // a client that stops reading without closing fills the channel: after llm.timeout_ms
    // of a full channel the answer is abandoned, so no slot is held forever
    let stall = Duration::from_millis(state.cfg.llm.timeout_ms);
    tokio::task::spawn_blocking(move || {
        let result = llm.stream_chat(&messages, &mut |text| {
            let mut event = Event::default().event("token").json_data(json!({ "text": text })).expect("serializable");
            let deadline = Instant::now() + stall;
            loop {
                match tx.try_send(event) {
                    Ok(()) => return true,
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    Err(mpsc::error::TrySendError::Full(back)) if Instant::now() < deadline => {
                        event = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => return false,
                }
            }
        });
        let last = match result {
            Ok(c) => Event::default().event("done").json_data(&c),
            Err(LlmError::Cancelled { .. }) => return,
            Err(e) => Event::default().event("error").json_data(json!({ "error": e.to_string(), "outcome": e.outcome() })),
        };
        let _ = tx.blocking_send(last.expect("serializable"));
    });
    let events = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))).into_response())
}

/// `convoflow serve` until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<()> {
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("signal received: finishing the requests in progress");
    };
    let (addr, task) = start(cfg, shutdown).await?;
    println!("convoflow serve: listening on http://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    task.await.context("the API server task")?
}
