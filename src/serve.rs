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
//! run at once, in two budgets — `serve.ask_share` of the slots for asks, the rest for searches,
//! so answers waiting on a slow LLM never starve searches (a streamed answer holds its slot until
//! its last event); a request whose budget is full waits `serve.queue_timeout_ms`, then gets 503.
//! A request's body is read whole before it takes a slot: over `serve.max_body_bytes` → 413, not
//! all there within `serve.body_timeout_ms` → 408. With `serve.api_key`, `/v1` routes need
//! `Authorization: Bearer <key>`. Every refusal is `{"error": "..."}` (docs/ask.md lists the
//! statuses).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::{Body, BodyDataStream, Bytes, HttpBody};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{info, warn};

use crate::ask::{self, Answer, AskError, TokenCounter};
use crate::config::{Config, Secret, ServeConfig, ServedTask};
use crate::llm::{LlmClient, LlmError};
use crate::model_api::{self, Classifiers, EmbeddingService, OpenAiError, TokenQueue};
use crate::query::{self, GroupBy, QueryEmbedder};
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
            .map(|e| query::parse_entity(e).map_err(|e| ApiError::bad(format!("filters.entities: {e:#}"))))
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

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = match &rejection {
            // axum answers well-formed JSON of the wrong shape (unknown field, wrong type, number
            // out of range) with 422; the API promises 400 for every body it cannot read
            JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => StatusCode::BAD_REQUEST,
            other => other.status(),
        };
        Self { status, message: rejection.body_text() }
    }
}

/// `Json` whose rejections are answered as every other error: `{"error"}` (axum's own are plain text).
struct ApiJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(Self(value))
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
            LlmError::Timeout { .. } | LlmError::FirstTokenTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
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


struct ServeState {
    cfg: Config,
    /// The index `/v1/search` and `/v1/ask` read; empty while its collection does not exist
    /// (a models-only deployment, or before the first worker created it), tried again per search.
    store: tokio::sync::OnceCell<Arc<dyn VectorStore>>,
    embedding: Option<EmbeddingService>,
    /// `/v1/entities` (`serve.models` names `ner`).
    ner: Option<Classifiers>,
    /// `/v1/sentiment` (`serve.models` names `sentiment`).
    sentiment: Option<Classifiers>,
    llm: Option<Arc<LlmClient>>,
    counter: Arc<TokenCounter>,
    budgets: Budgets,
    api_key: Option<Secret>,
}

/// The slots of one kind of `/v1` request.
struct Budget {
    slots: Arc<Semaphore>,
    size: usize,
    /// What the 503 calls the requests holding them, and which setting sizes them.
    holders: &'static str,
    setting: &'static str,
}

impl Budget {
    fn new(size: usize, holders: &'static str, setting: &'static str) -> Self {
        Self { slots: Arc::new(Semaphore::new(size)), size, holders, setting }
    }

    /// A slot within `wait`, or the 503 (with `Retry-After`) that says which budget is full.
    async fn acquire(&self, wait: Duration) -> Result<OwnedSemaphorePermit, Response> {
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                let message = format!("busy: {} {} in progress ({})", self.size, self.holders, self.setting);
                let mut r = ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message }.into_response();
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Err(r)
            }
        }
    }
}

/// Asks and searches in separate budgets: answers can wait on the LLM for long (a slow or silent
/// server), searches take milliseconds, and with one shared pool the first starve the second.
struct Budgets {
    search: Budget,
    ask: Budget,
}

impl Budgets {
    /// Splits `serve.max_concurrent_requests`: ⌊total × `serve.ask_share`⌋ slots for asks (at
    /// least 1, at most all but one), the rest for searches.
    fn new(serve: &ServeConfig) -> Result<Self> {
        let total = serve.max_concurrent_requests;
        anyhow::ensure!(total >= 2, "serve.max_concurrent_requests must be at least 2 (one budget for asks, one for searches), got {total}");
        let share = serve.ask_share;
        anyhow::ensure!(share > 0.0 && share < 1.0, "serve.ask_share must be above 0 and below 1, got {share}");
        let asks = ((total as f64 * share).floor() as usize).clamp(1, total - 1);
        Ok(Self {
            ask: Budget::new(asks, "answers", "the serve.ask_share of serve.max_concurrent_requests"),
            search: Budget::new(total - asks, "searches", "serve.max_concurrent_requests less its serve.ask_share for asks"),
        })
    }

    /// The budget a request takes a slot of; None: it takes none (probes, unknown routes).
    fn of(&self, method: &Method, path: &str) -> Option<&Budget> {
        match (method, path) {
            (&Method::POST, "/v1/search" | "/v1/embeddings" | "/v1/entities" | "/v1/sentiment") => Some(&self.search),
            (&Method::POST, "/v1/ask") => Some(&self.ask),
            _ => None,
        }
    }
}

type Shared = Arc<ServeState>;

impl ServeState {
    /// The query's vector, through the embedding model's queue (batched with concurrent
    /// requests); None without an embedding model (BM25 only).
    async fn embed(&self, text: &str) -> Result<Option<Vec<f32>>, ApiError> {
        let Some(service) = &self.embedding else { return Ok(None) };
        service.embed_query(text).await.map(Some).map_err(|e| ApiError { status: e.status, message: e.message })
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
        Ok(self.store().await?.search(&query::hybrid_query(text, dense, filter, k, group_by)).await?)
    }

    /// The store on its collection, opened now if it was not yet; 503 while it does not exist.
    async fn store(&self) -> Result<&Arc<dyn VectorStore>, ApiError> {
        self.store
            .get_or_try_init(|| query::open_store(&self.cfg))
            .await
            .map_err(|e| ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: format!("{e:#}") })
    }
}

/// The store on its existing collection, or an empty cell when the collection is not created
/// yet, or — `serve.models` without `embedding` — its dense size is unknown: the models are
/// served meanwhile. Any other store fault stops the start.
async fn open_store(cfg: &Config) -> Result<tokio::sync::OnceCell<Arc<dyn VectorStore>>> {
    if !cfg.serve.models.contains(&ServedTask::Embedding) && query::dense_dim(cfg).is_err() {
        warn!("serve.models leaves out embedding and qdrant.dense_dim is not set: no index to search, /v1/search and /v1/ask answer 503");
        return Ok(tokio::sync::OnceCell::new());
    }
    match query::open_store(cfg).await {
        Ok(store) => Ok(tokio::sync::OnceCell::new_with(Some(store))),
        Err(e) if matches!(e.downcast_ref::<StoreError>(), Some(StoreError::MissingCollection(_))) => {
            warn!("{e:#}: serving the models; /v1/search and /v1/ask answer 503 until a worker creates it");
            Ok(tokio::sync::OnceCell::new())
        }
        Err(e) => Err(e),
    }
}

/// Starts the API; returns its address and the server task (ends when `shutdown` resolves).
pub async fn start(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<Result<()>>)> {
    telemetry::prometheus();
    // a budget setting that cannot work fails before anything is loaded
    let budgets = Budgets::new(&cfg.serve)?;
    let store = open_store(&cfg).await?;
    let serves = |task| cfg.serve.models.contains(&task);
    let embedder = if serves(ServedTask::Embedding) {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || QueryEmbedder::load(&cfg)).await.context("loading the embedding model")??
    } else {
        None
    };
    match &embedder {
        Some(e) => info!(model = %e.name(), "embedding model loaded for queries"),
        None if serves(ServedTask::Embedding) => warn!("no embedding model folder configured: searches are BM25 only"),
        None => warn!("serve.models leaves out embedding: searches are BM25 only, /v1/embeddings answers 404"),
    }
    let embedding = embedder.map(|e| EmbeddingService { embedder: Arc::new(e), queue: TokenQueue::new(cfg.serve.max_queued_tokens) });
    let (ner, sentiment) = if serves(ServedTask::Ner) || serves(ServedTask::Sentiment) {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let device = crate::infer::device::parse_device(&cfg.gpu.device)?;
            let languages = Arc::new(crate::language::Languages::new(&cfg.pipeline.language)?);
            let load = |task, served, list: &crate::config::ModelList| {
                cfg.serve.models.contains(&served).then(|| Classifiers::load(task, &list.0, device, languages.clone(), cfg.serve.max_queued_tokens)).transpose()
            };
            Ok((
                load(crate::infer::Task::TokenClassification, ServedTask::Ner, &cfg.models.ner)?,
                load(crate::infer::Task::SequenceClassification, ServedTask::Sentiment, &cfg.models.sentiment)?,
            ))
        })
        .await
        .context("loading the NER and sentiment models")??
    } else {
        (None, None)
    };
    let llm = if cfg.llm.is_configured() { Some(Arc::new(LlmClient::new(&cfg.llm)?)) } else { None };
    let counter = Arc::new(TokenCounter::new(&cfg.llm)?);
    let listener = tokio::net::TcpListener::bind(&cfg.serve.listen).await.with_context(|| format!("binding serve.listen {}", cfg.serve.listen))?;
    let addr = listener.local_addr()?;
    let state: Shared = Arc::new(ServeState {
        budgets,
        api_key: cfg.serve.api_key.clone(),
        store,
        embedding,
        ner,
        sentiment,
        llm,
        counter,
        cfg,
    });
    let app = router(state);
    info!(%addr, "serving {ROUTES}");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("the API server")
    });
    Ok((addr, task))
}

const ROUTES: &str =
    "POST /v1/search, POST /v1/ask, POST /v1/embeddings, POST /v1/entities, POST /v1/sentiment, GET /v1/models, GET /healthz, GET /metrics";

fn router(state: Shared) -> Router {
    let limit = state.cfg.serve.max_body_bytes;
    Router::new()
        .route("/v1/search", axum::routing::post(search))
        .route("/v1/ask", axum::routing::post(ask_route))
        .route("/v1/embeddings", axum::routing::post(embeddings_route))
        .route("/v1/entities", axum::routing::post(entities_route))
        .route("/v1/sentiment", axum::routing::post(sentiment_route))
        .route("/v1/models", axum::routing::get(|State(state): State<Shared>| async move {
            let classifiers: Vec<&Classifiers> = state.ner.iter().chain(&state.sentiment).collect();
            Json(model_api::models(state.embedding.as_ref(), &classifiers))
        }))
        .route("/healthz", axum::routing::get(healthz))
        .route("/metrics", axum::routing::get(|| async {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], telemetry::prometheus().render())
        }))
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, message: format!("not found: {ROUTES}") } })
        .method_not_allowed_fallback(|| async {
            ApiError { status: StatusCode::METHOD_NOT_ALLOWED, message: format!("method not allowed: {ROUTES}") }
        })
        // `admit` has read the body within this limit already; the extractor agrees with it
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

/// The request metrics of all routes, and the gate of `/v1` ones (`gate`).
async fn admit(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = match request.uri().path() {
        "/v1/search" => "search",
        "/v1/ask" => "ask",
        "/v1/embeddings" => "embeddings",
        "/v1/entities" => "entities",
        "/v1/sentiment" => "sentiment",
        "/v1/models" => "models",
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        _ => "other",
    };
    metrics::gauge!(telemetry::API_IN_FLIGHT).increment(1.0);
    // counted whatever happens next: a client that goes away while its request waits or runs
    // drops this future, and the guard counts it as 499 (nginx's "client closed request")
    let mut done = Finished { route, status: 499, started };
    let (request, permit) = match gate(&state, request).await {
        Ok(admitted) => admitted,
        Err(refusal) => {
            done.status = refusal.status().as_u16();
            return refusal;
        }
    };
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

/// What a `/v1` request passes before its handler, in this order: the bearer key; its whole
/// body, read within `serve.max_body_bytes` and `serve.body_timeout_ms`; then a slot of its
/// budget. The slot comes last, so a slow or stalled upload never holds one.
async fn gate(state: &ServeState, request: Request) -> Result<(Request, Option<OwnedSemaphorePermit>), Response> {
    if !request.uri().path().starts_with("/v1/") {
        return Ok((request, None));
    }
    authorize(state, request.headers())?;
    let Some(budget) = state.budgets.of(request.method(), request.uri().path()) else { return Ok((request, None)) };
    let (parts, body) = request.into_parts();
    let serve = &state.cfg.serve;
    let body = match read_body(body, serve.max_body_bytes, Duration::from_millis(serve.body_timeout_ms)).await {
        Ok(body) => body,
        Err(refusal) => return Err(refusal.answer(&parts.headers, Duration::from_millis(serve.body_timeout_ms))),
    };
    let permit = budget.acquire(Duration::from_millis(serve.queue_timeout_ms)).await?;
    Ok((Request::from_parts(parts, Body::from(body)), Some(permit)))
}

/// The bearer key of `/v1` routes (`serve.api_key`), compared in constant time; 401 otherwise.
fn authorize(state: &ServeState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(key) = &state.api_key else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.expose().as_bytes())) {
        return Ok(());
    }
    let mut r = ApiError { status: StatusCode::UNAUTHORIZED, message: "missing or wrong bearer token (serve.api_key)".into() }.into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Err(r)
}

/// Why a request body was not read.
enum BodyRefusal {
    /// Over `serve.max_body_bytes` (declared by Content-Length, or counted while reading a chunked
    /// body); `rest` is what the client has not sent yet, still unread.
    TooLarge { limit: usize, rest: BodyDataStream },
    /// Not all received within `serve.body_timeout_ms`.
    TimedOut { timeout: Duration },
    /// The upload failed (the client went away, a broken chunked encoding).
    Broken(String),
}

/// The whole body, at most `limit` bytes, within `timeout`.
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, BodyRefusal> {
    match tokio::time::timeout(timeout, read_limited(body, limit)).await {
        Ok(read) => read,
        Err(_) => Err(BodyRefusal::TimedOut { timeout }),
    }
}

async fn read_limited(body: Body, limit: usize) -> Result<Bytes, BodyRefusal> {
    // a Content-Length over the limit is refused before a byte of the body is read
    if HttpBody::size_hint(&body).lower() > limit as u64 {
        return Err(BodyRefusal::TooLarge { limit, rest: body.into_data_stream() });
    }
    let mut stream = body.into_data_stream();
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyRefusal::Broken(format!("reading the request body: {e}")))?;
        if read.len() + chunk.len() > limit {
            return Err(BodyRefusal::TooLarge { limit, rest: stream });
        }
        read.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(read))
}

impl BodyRefusal {
    /// The error answer, on a connection closed after it. An oversized body's rest is read and
    /// discarded meanwhile, for at most `linger` (nginx's lingering close): closing a socket
    /// with unread data sends a reset, and a client still uploading would lose the 413 with it.
    fn answer(self, headers: &HeaderMap, linger: Duration) -> Response {
        let (status, message) = match self {
            BodyRefusal::TooLarge { limit, rest } => {
                // a client waiting for `100 Continue` has sent nothing: reading now would ask
                // it for the body after its answer
                let expects_continue = headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                if !expects_continue {
                    discard_for(rest, linger);
                }
                (StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {limit} bytes (serve.max_body_bytes)"))
            }
            BodyRefusal::TimedOut { timeout } => (
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body was not received within {} ms (serve.body_timeout_ms)", timeout.as_millis()),
            ),
            BodyRefusal::Broken(message) => (StatusCode::BAD_REQUEST, message),
        };
        let mut r = ApiError { status, message }.into_response();
        // the rest of the request is unread: the connection cannot carry another one
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

/// Reads and drops what the client still sends of `rest`, for at most `linger`.
fn discard_for(mut rest: BodyDataStream, linger: Duration) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(linger, async { while let Some(Ok(_)) = rest.next().await {} }).await;
    });
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
    let mut problems = vec![];
    // no collection yet is no fault of serve's (the models still answer): `points` stays null
    let points = match state.store().await {
        Err(_) => None,
        Ok(store) => match tokio::time::timeout(Duration::from_secs(5), store.count(&SearchFilter::default())).await {
            Ok(Ok(n)) => Some(n),
            Ok(Err(e)) => {
                problems.push(format!("store: {e}"));
                None
            }
            Err(_) => {
                problems.push("store: no answer within 5 s".to_string());
                None
            }
        },
    };
    if state.embedding.is_some() {
        match tokio::time::timeout(Duration::from_secs(5), state.embed("health")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("embedding: {}", e.message)),
            Err(_) => problems.push("embedding: no answer within 5 s".to_string()),
        }
    }
    let body = json!({
        "status": if problems.is_empty() { "ok" } else { "unhealthy" },
        "problems": problems,
        "store": state.store.get().map_or("no collection yet", |s| s.backend()),
        "points": points,
        "embedding": state.embedding.as_ref().map(|e| e.embedder.name().to_string()),
        // the last exchange's outcome, never a probe: an LLM outage fails asks, not this health
        "llm": state.llm.as_ref().map(|l| llm_health(l)),
    });
    let status = if problems.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// `/healthz`'s view of the LLM: where it is and what the last completion showed of it.
fn llm_health(llm: &LlmClient) -> Value {
    let last = llm.last_contact();
    json!({
        "url": llm.url(),
        "model": llm.model(),
        "state": last.state.describe(),
        "last_contact_s_ago": last.at.map(|at| at.elapsed().as_secs_f64()),
    })
}

/// `POST /v1/embeddings` (OpenAI's API; errors in its shape, `model_api`).
async fn embeddings_route(State(state): State<Shared>, body: Bytes) -> Response {
    let Some(service) = &state.embedding else {
        return OpenAiError::model_not_found("no embedding model is loaded (models.embedding has no model folder)").into_response();
    };
    let request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return OpenAiError::invalid("input", format!("the body is not an embeddings request: {e}")).into_response(),
    };
    match model_api::embeddings(service, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/entities` (errors in OpenAI's shape, `model_api`).
async fn entities_route(State(state): State<Shared>, body: Bytes) -> Response {
    classify_route(state.ner.as_ref(), "ner", &body, model_api::entities).await
}

/// `POST /v1/sentiment`.
async fn sentiment_route(State(state): State<Shared>, body: Bytes) -> Response {
    classify_route(state.sentiment.as_ref(), "sentiment", &body, model_api::sentiment).await
}

async fn classify_route<'a, F, Fut>(service: Option<&'a Classifiers>, task: &str, body: &[u8], run: F) -> Response
where
    F: FnOnce(&'a Classifiers, model_api::ClassifyRequest) -> Fut,
    Fut: std::future::Future<Output = Result<Json<Value>, OpenAiError>>,
{
    let Some(service) = service else {
        return OpenAiError::model_not_found(format!("no {task} model is loaded: serve.models does not name {task}")).into_response();
    };
    let request = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return OpenAiError::invalid("input", format!("the body is not a {task} request: {e}")).into_response(),
    };
    match run(service, request).await {
        Ok(answer) => answer.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn search(State(state): State<Shared>, ApiJson(req): ApiJson<SearchRequest>) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let k = state.k(req.k, 10.min(state.cfg.serve.max_k))?;
    let hits = state.retrieve(&req.query, &req.filters, k, req.group_by).await?;
    Ok(Json(json!({ "hits": crate::search::hits_json(&hits), "took_ms": started.elapsed().as_secs_f64() * 1000.0 })))
}

async fn ask_route(State(state): State<Shared>, ApiJson(req): ApiJson<AskRequest>) -> Result<Response, ApiError> {
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
