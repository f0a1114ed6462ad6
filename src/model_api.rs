//! The models over HTTP (`convoflow serve`): `POST /v1/embeddings` and `GET /v1/models` in the
//! OpenAI API's shapes, `POST /v1/entities` and `POST /v1/sentiment` with the worker's NER and
//! sentiment models routed by language as the worker routes turns (`Classifiers`); errors are
//! OpenAI's `{"error": {"message", "type", "param", "code"}}` everywhere, so its clients raise
//! their usual exceptions. Requests are dynamically batched: each is tokenized on the request's
//! own task and queued on the model thread as token ids (NER: encodings with offsets), where
//! the jobs of concurrent requests are launched together (the model thread's merging); the
//! tokens waiting on each model are bounded by `serve.max_queued_tokens` (`TokenQueue`: 429
//! with `Retry-After` beyond it), and a request whose client went away is dropped from the
//! queue unrun. `/v1/search` and `/v1/ask` embed their queries through the same queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::ModelConfig;
use crate::event::Entity;
use crate::infer::model::NerInput;
use crate::infer::runner::{ModelInput, ModelThread, Output, Reply, Served};
use crate::infer::tokenize::ModelTokenizer;
use crate::infer::Task;
use crate::language::Languages;
use crate::query::{InputType, PreparedInput, QueryEmbedder};
use crate::routing::{Route, Routes};

/// Most inputs in one `/v1/embeddings` request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// An error answer in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error`, `server_error`, …
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u32>,
}

impl OpenAiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: Some(param), code: None, retry_after: None }
    }

    /// 404 `model_not_found`, as OpenAI answers an unknown model (its client: `NotFoundError`).
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into(), kind: "invalid_request_error", param: Some("model"), code: Some("model_not_found"), retry_after: None }
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: None, retry_after: None }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// The tokens queued on a model thread by requests not answered yet, bounded: beyond the
/// bound a request is refused at once (429) rather than queued behind minutes of work.
pub struct TokenQueue {
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// Tokens held in a `TokenQueue` until dropped (the request answered, or gone).
pub struct Queued {
    queued: Arc<AtomicUsize>,
    tokens: usize,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.tokens, Ordering::SeqCst);
    }
}

impl TokenQueue {
    pub fn new(limit: usize) -> Self {
        Self { queued: Arc::default(), limit }
    }

    /// Room for `tokens` more, or the refusal: 413 for a request larger than the whole queue,
    /// 429 (`Retry-After: 1`) while the queue is full.
    pub fn admit(&self, tokens: usize) -> Result<Queued, OpenAiError> {
        if tokens > self.limit {
            return Err(OpenAiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!("the request has {tokens} tokens, more than serve.max_queued_tokens ({}): split it", self.limit),
                kind: "invalid_request_error",
                param: Some("input"),
                code: None,
                retry_after: None,
            });
        }
        let mut now = self.queued.load(Ordering::SeqCst);
        loop {
            if now + tokens > self.limit {
                return Err(OpenAiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: format!("busy: {now} tokens already queued on the model (serve.max_queued_tokens {})", self.limit),
                    kind: "rate_limit_error",
                    param: None,
                    code: Some("queue_full"),
                    retry_after: Some(1),
                });
            }
            match self.queued.compare_exchange(now, now + tokens, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(Queued { queued: self.queued.clone(), tokens }),
                Err(actual) => now = actual,
            }
        }
    }

    /// Tokens queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}

/// Withdraws a queued job when the request's future is dropped (its client went away).
struct WithdrawOnDrop(Arc<AtomicBool>);

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs one job on a model thread through its token queue: `tokens` admitted (or the 429/413),
/// the job submitted as withdrawable, withdrawn if this future is dropped (the client went
/// away), its output awaited off the async threads.
async fn run_queued(
    queue: &TokenQueue,
    tokens: usize,
    model: &str,
    submit: impl FnOnce(Arc<AtomicBool>) -> anyhow::Result<mpsc::Receiver<Reply>>,
) -> Result<Output, OpenAiError> {
    let _held = queue.admit(tokens)?;
    let withdrawn = Arc::new(AtomicBool::new(false));
    let _withdraw = WithdrawOnDrop(withdrawn.clone());
    let reply = submit(withdrawn).map_err(|e| OpenAiError::server(format!("{e:#}")))?;
    let answer = tokio::task::spawn_blocking(move || reply.recv())
        .await
        .map_err(|e| OpenAiError::server(format!("waiting for the model {model}: {e}")))?
        .map_err(|_| OpenAiError::server(format!("the model thread of {model} stopped")))?;
    answer.map(|(output, _)| output).map_err(|e| OpenAiError::server(format!("{model}: {e:#}")))
}

/// The embedding model as the API serves it: its thread and its token queue.
pub struct EmbeddingService {
    pub embedder: Arc<QueryEmbedder>,
    pub queue: TokenQueue,
}

impl EmbeddingService {
    /// Embeds prepared inputs through the queue (batched with concurrent requests), in order.
    pub async fn embed(&self, inputs: Vec<Vec<i64>>) -> Result<Vec<Vec<f32>>, OpenAiError> {
        let tokens = inputs.iter().map(Vec::len).sum();
        let output = run_queued(&self.queue, tokens, self.embedder.name(), |w| self.embedder.submit(inputs, w)).await?;
        crate::query::vectors(output).map_err(|e| OpenAiError::server(format!("{e:#}")))
    }

    /// One query (the query template applied), as `/v1/search` and `/v1/ask` embed it.
    pub async fn embed_query(&self, text: &str) -> Result<Vec<f32>, OpenAiError> {
        let prepared = self.embedder.prepare_text(text, InputType::Query).map_err(|e| OpenAiError::invalid("query", format!("{e:#}")))?;
        self.embed(vec![prepared.ids]).await?.pop().ok_or_else(|| OpenAiError::server("the embedding model returned no vector"))
    }
}

/// `input` of `/v1/embeddings`: a string, strings, a token array, or token arrays.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenArrays(Vec<Vec<i64>>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    pub input: EmbeddingInput,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub encoding_format: EncodingFormat,
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// OpenAI's end-user id: accepted, unused.
    #[serde(default)]
    pub user: Option<String>,
    /// convoflow's extension: `document` (default: `models.embedding.document_prefix`, as the
    /// worker indexes) or `query` (`models.embedding.query_template`, as `search` embeds).
    #[serde(default)]
    pub input_type: Option<InputType>,
}

/// A wrong model name: 404 `model_not_found`, as OpenAI answers it.
pub fn check_model(given: Option<&str>, served: &str) -> Result<(), OpenAiError> {
    match given {
        Some(m) if m != served => {
            Err(OpenAiError::model_not_found(format!("The model `{m}` does not exist: this server embeds with `{served}` (GET /v1/models)")))
        }
        _ => Ok(()),
    }
}

/// `POST /v1/embeddings`. Inputs longer than the model's length are cut at it, and say so:
/// `"truncated": true` on their item (a convoflow extension) and the count in the
/// `x-convoflow-truncated` header. `usage.prompt_tokens` counts the tokens the model computed,
/// special tokens and the prefix or template included.
pub async fn embeddings(service: &EmbeddingService, request: EmbeddingsRequest) -> Result<Response, OpenAiError> {
    let e = &service.embedder;
    check_model(request.model.as_deref(), e.name())?;
    if let Some(d) = request.dimensions
        && d != e.dim
    {
        return Err(OpenAiError::invalid(
            "dimensions",
            format!("dimensions {d} is not available: {} makes {}-dimensional vectors and does not shorten them", e.name(), e.dim),
        ));
    }
    let kind = request.input_type.unwrap_or(InputType::Document);
    let prepared: Vec<PreparedInput> = match request.input {
        EmbeddingInput::Text(t) => vec![prepare_text(e, &t, kind)?],
        EmbeddingInput::Texts(ts) => {
            check_count(ts.len())?;
            ts.iter().map(|t| prepare_text(e, t, kind)).collect::<Result<_, _>>()?
        }
        EmbeddingInput::Tokens(ids) => vec![prepare_tokens(e, &ids, kind)?],
        EmbeddingInput::TokenArrays(arrays) => {
            check_count(arrays.len())?;
            arrays.iter().map(|ids| prepare_tokens(e, ids, kind)).collect::<Result<_, _>>()?
        }
    };
    let tokens: usize = prepared.iter().map(|p| p.ids.len()).sum();
    let truncated: Vec<bool> = prepared.iter().map(|p| p.truncated).collect();
    let vectors = service.embed(prepared.into_iter().map(|p| p.ids).collect()).await?;
    let data: Vec<Value> = vectors
        .into_iter()
        .zip(&truncated)
        .enumerate()
        .map(|(index, (v, &cut))| {
            let embedding = match request.encoding_format {
                EncodingFormat::Float => json!(v),
                // little-endian float32s, as OpenAI sends them (its client decodes them so)
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            let mut item = json!({ "object": "embedding", "index": index, "embedding": embedding });
            if cut {
                item["truncated"] = json!(true);
            }
            item
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": e.name(),
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    });
    let mut response = Json(body).into_response();
    let cut = truncated.iter().filter(|&&t| t).count();
    response.headers_mut().insert("x-convoflow-truncated", HeaderValue::from(cut));
    Ok(response)
}

fn check_count(n: usize) -> Result<(), OpenAiError> {
    if n == 0 {
        return Err(OpenAiError::invalid("input", "input is an empty array"));
    }
    if n > MAX_INPUTS {
        return Err(OpenAiError::invalid("input", format!("input has {n} items, at most {MAX_INPUTS}")));
    }
    Ok(())
}

fn prepare_text(e: &QueryEmbedder, text: &str, kind: InputType) -> Result<PreparedInput, OpenAiError> {
    if text.is_empty() {
        return Err(OpenAiError::invalid("input", "an input is an empty string"));
    }
    e.prepare_text(text, kind).map_err(|err| OpenAiError::invalid("input", format!("{err:#}")))
}

fn prepare_tokens(e: &QueryEmbedder, ids: &[i64], kind: InputType) -> Result<PreparedInput, OpenAiError> {
    if ids.is_empty() {
        return Err(OpenAiError::invalid("input", "an input is an empty token array"));
    }
    e.prepare_tokens(ids, kind).map_err(|err| OpenAiError::invalid("input", format!("{err:#}")))
}

/// One NER or sentiment model as the API serves it: its thread, its tokenizer, its token queue.
pub struct ServedModel {
    config: ModelConfig,
    thread: ModelThread,
    tokenizer: ModelTokenizer,
    queue: TokenQueue,
    /// NER: the entity types it finds, in the worker's vocabulary; sentiment: its classes.
    labels: Vec<String>,
}

/// What `/v1/entities` or `/v1/sentiment` runs: every model of `models.ner` or
/// `models.sentiment`, each on its own thread with its own queue, and the routes that pick one
/// per input by its language — the worker's routes (`routing::Routes`), so an input gets the
/// model, or the reason for none, that the same text gets as a turn.
pub struct Classifiers {
    task: Task,
    models: Vec<ServedModel>,
    routes: Routes,
    languages: Arc<Languages>,
}

/// An input's language as the API resolved it.
#[derive(Debug, Clone, PartialEq)]
struct InputLanguage {
    code: String,
    confidence: f32,
    /// `request` (the request's `language`) or `detected`.
    source: &'static str,
}

/// One input's language and model.
struct Planned {
    language: Option<InputLanguage>,
    route: Route,
}

/// `input` of `/v1/entities` and `/v1/sentiment`: a string or an array of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextInput {
    Text(String),
    Texts(Vec<String>),
}

/// `language` of `/v1/entities` and `/v1/sentiment`: one code for every input, or one per
/// input (null: detect that one's).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum LanguageInput {
    One(String),
    Each(Vec<Option<String>>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    pub input: TextInput,
    /// One of the task's configured model names: every input goes to it, whatever its language.
    #[serde(default)]
    pub model: Option<String>,
    /// The inputs' language(s), ISO 639-1 (`fr`, `pt-BR`); without, each input's language is
    /// detected as the worker detects a turn's (`pipeline.language`).
    #[serde(default)]
    pub language: Option<LanguageInput>,
}

impl Classifiers {
    /// Loads every model of the task (`Task::TokenClassification`: `models.ner`,
    /// `Task::SequenceClassification`: `models.sentiment`), each warm before this returns
    /// (blocking).
    pub fn load(
        task: Task,
        configs: &[ModelConfig],
        device: tch::Device,
        languages: Arc<Languages>,
        max_queued_tokens: usize,
    ) -> anyhow::Result<Self> {
        let label = crate::infer::runner::task_name(task);
        anyhow::ensure!(!configs.is_empty(), "serve.models names {label}, but models.{label} has no model");
        let routes = Routes::new(label, configs)?;
        let models = configs
            .iter()
            .map(|cfg| {
                let Served { folder, tokenizer, thread } = Served::load(task, cfg, device)?;
                let labels = match task {
                    Task::TokenClassification => crate::infer::ner::entity_types(&folder.config.labels()),
                    _ => folder.config.labels(),
                };
                Ok(ServedModel { config: cfg.clone(), thread, tokenizer, queue: TokenQueue::new(max_queued_tokens), labels })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { task, models, routes, languages })
    }

    /// The task's name in the API (`ner`, `sentiment`).
    fn label(&self) -> &'static str {
        crate::infer::runner::task_name(self.task)
    }

    /// Each input's language (the request's, else detected) and model (the request's `model`,
    /// else the route of its language).
    fn plan(&self, texts: &[String], model: Option<&str>, language: Option<LanguageInput>) -> Result<Vec<Planned>, OpenAiError> {
        let forced = match model {
            Some(name) => match self.models.iter().position(|m| m.config.name == name) {
                Some(i) => Some(i),
                None => {
                    let names: Vec<&str> = self.models.iter().map(|m| m.config.name.as_str()).collect();
                    return Err(OpenAiError::model_not_found(format!(
                        "The model `{name}` does not exist: the {} models are {} (GET /v1/models)",
                        self.label(),
                        names.join(", ")
                    )));
                }
            },
            None => None,
        };
        let given: Vec<Option<String>> = match language {
            None => vec![None; texts.len()],
            Some(LanguageInput::One(code)) => vec![Some(code); texts.len()],
            Some(LanguageInput::Each(codes)) if codes.len() == texts.len() => codes,
            Some(LanguageInput::Each(codes)) => {
                return Err(OpenAiError::invalid(
                    "language",
                    format!("language has {} entries for {} inputs: give one code, or one per input", codes.len(), texts.len()),
                ));
            }
        };
        Ok(texts
            .iter()
            .zip(given)
            .map(|(text, code)| {
                let language = match code.map(|c| crate::language::normalize(&c)).filter(|c| !c.is_empty()) {
                    Some(code) => Some(InputLanguage { code, confidence: 1.0, source: "request" }),
                    None => self.languages.detect(text).map(|d| InputLanguage { code: d.code.into(), confidence: d.confidence, source: "detected" }),
                };
                let route = match forced {
                    Some(i) => Route::Model(i),
                    None => self.routes.route(language.as_ref().map(|l| l.code.as_str())),
                };
                Planned { language, route }
            })
            .collect())
    }

    /// Runs the inputs routed to model `i` (in order) through its queue; the output and the
    /// tokens it computed.
    async fn run(&self, i: usize, texts: &[&str]) -> Result<(Output, usize), OpenAiError> {
        let m = &self.models[i];
        let invalid = |e: crate::infer::ModelError| OpenAiError::invalid("input", format!("{}: {e}", m.config.name));
        // tokenized as the prepare stage tokenizes a turn for this model
        let (input, tokens) = match self.task {
            Task::TokenClassification => {
                let inputs: Vec<Arc<NerInput>> = texts
                    .iter()
                    .map(|t| Ok(Arc::new(NerInput { text: t.to_string(), encoding: m.tokenizer.encode_untruncated_one(t).map_err(invalid)? })))
                    .collect::<Result<_, OpenAiError>>()?;
                let tokens = inputs.iter().map(|n| n.encoding.len()).sum();
                (ModelInput::Ner(inputs), tokens)
            }
            _ => {
                let ids: Vec<Vec<i64>> = texts.iter().map(|t| m.tokenizer.encode_ids_one(t).map_err(invalid)).collect::<Result<_, _>>()?;
                let tokens = ids.iter().map(Vec::len).sum();
                (ModelInput::Ids(ids), tokens)
            }
        };
        let output = run_queued(&m.queue, tokens, &m.config.name, |w| m.thread.submit_withdrawable(input, w)).await?;
        Ok((output, tokens))
    }

    /// Every input's language, model and output, in input order; the models of a request run
    /// at once, each input batched with concurrent requests' on its model's thread.
    async fn classify<T>(&self, request: ClassifyRequest, outputs_of: fn(Output) -> Option<Vec<T>>) -> Result<Answer<T>, OpenAiError> {
        let texts = match request.input {
            TextInput::Text(t) => vec![t],
            TextInput::Texts(ts) => ts,
        };
        check_count(texts.len())?;
        if texts.iter().any(|t| t.trim().is_empty()) {
            return Err(OpenAiError::invalid("input", "an input is empty or only blanks"));
        }
        let plan = self.plan(&texts, request.model.as_deref(), request.language)?;
        let per_model: Vec<Vec<usize>> = (0..self.models.len())
            .map(|i| (0..texts.len()).filter(|&k| plan[k].route == Route::Model(i)).collect())
            .collect();
        let runs = per_model.iter().enumerate().filter(|(_, idx)| !idx.is_empty()).map(|(i, idx)| {
            let texts: Vec<&str> = idx.iter().map(|&k| texts[k].as_str()).collect();
            async move { self.run(i, &texts).await.map(|run| (i, run)) }
        });
        let runs = futures::future::try_join_all(runs).await?;
        let mut outputs: Vec<Option<Classified<T>>> = (0..texts.len()).map(|_| None).collect();
        let mut tokens = 0;
        for (i, (output, computed)) in runs {
            let idx = &per_model[i];
            let model = &self.models[i].config.name;
            let per_input = outputs_of(output)
                .filter(|all| all.len() == idx.len())
                .ok_or_else(|| OpenAiError::server(format!("{model} answered another kind or number of outputs than {} for its inputs", idx.len())))?;
            for (&k, output) in idx.iter().zip(per_input) {
                outputs[k] = Some(Classified { model: model.clone(), output });
            }
            tokens += computed;
        }
        Ok(Answer { plan, outputs, tokens })
    }

    /// `/v1/models` rows of the task's models.
    fn model_rows(&self) -> Vec<Value> {
        let all = self.routes.languages();
        self.models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (dtype, device) = runtime_fields(m.thread.load_report());
                json!({
                    "id": m.config.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "convoflow",
                    "task": self.label(),
                    "languages": all[i],
                    "labels": m.labels,
                    "max_input_tokens": m.tokenizer.max_positions,
                    "dtype": dtype,
                    "device": device,
                })
            })
            .collect()
    }
}

/// One input's output from the model it went to (NER: its entities; sentiment: the
/// probabilities over the model's classes, 1 to n stars).
struct Classified<T> {
    model: String,
    output: T,
}

/// What a request's inputs got: per input its language and route (`plan`) and its output
/// (None: routed to no model), and the tokens computed.
struct Answer<T> {
    plan: Vec<Planned>,
    outputs: Vec<Option<Classified<T>>>,
    tokens: usize,
}

impl<T> Answer<T> {
    /// The response: per input its `index`, language, `model`, and what `item` makes of its
    /// output — or `skipped` with the worker's reason (`unsupported-language`,
    /// `unknown-language`) where no model covers its language.
    fn response(self, object: &str, item: impl Fn(T) -> Value) -> Json<Value> {
        let data: Vec<Value> = self
            .plan
            .into_iter()
            .zip(self.outputs)
            .enumerate()
            .map(|(index, (planned, output))| {
                let mut row = json!({
                    "object": object,
                    "index": index,
                    "language": planned.language.as_ref().map(|l| l.code.clone()),
                    "language_confidence": planned.language.as_ref().map(|l| l.confidence),
                    "language_source": planned.language.as_ref().map(|l| l.source),
                });
                match (planned.route, output) {
                    (_, Some(Classified { model, output })) => {
                        row["model"] = json!(model);
                        if let (Value::Object(row), Value::Object(fields)) = (&mut row, item(output)) {
                            row.extend(fields);
                        }
                    }
                    (Route::Skipped(reason), None) => {
                        row["model"] = Value::Null;
                        row["skipped"] = json!(reason.as_str());
                    }
                    (Route::Model(_), None) => unreachable!("every routed input has its model's output (classify)"),
                }
                row
            })
            .collect();
        Json(json!({ "object": "list", "data": data, "usage": { "prompt_tokens": self.tokens, "total_tokens": self.tokens } }))
    }
}

/// `POST /v1/entities`: each input's entities (character offsets into the input, as the
/// worker's events give them), from the NER model its language routes to.
pub async fn entities(service: &Classifiers, request: ClassifyRequest) -> Result<Json<Value>, OpenAiError> {
    let entities_of = |output| match output {
        Output::Entities(all) => Some(all),
        _ => None,
    };
    let answer = service.classify(request, entities_of).await?;
    Ok(answer.response("entities", |entities: Vec<Entity>| {
        let entities: Vec<Value> =
            entities.into_iter().map(|e| json!({ "text": e.text, "label": e.label, "start": e.start, "end": e.end, "score": e.score })).collect();
        json!({ "entities": entities })
    }))
}

/// `POST /v1/sentiment`: each input's stars (the most probable), expected stars (the
/// probability-weighted mean: the worker's `sentiment.score`) and probabilities, from the
/// sentiment model its language routes to.
pub async fn sentiment(service: &Classifiers, request: ClassifyRequest) -> Result<Json<Value>, OpenAiError> {
    let probabilities_of = |output| match output {
        Output::Probabilities(all) => Some(all),
        _ => None,
    };
    let answer = service.classify(request, probabilities_of).await?;
    Ok(answer.response("sentiment", |p: Vec<f32>| {
        let (stars, expected) = crate::infer::stars(&p);
        json!({ "stars": stars, "expected_stars": expected, "probabilities": p })
    }))
}

/// `dtype` (libtorch's kind) and `device` of a loaded model, for its `/v1/models` row.
fn runtime_fields(report: Option<crate::infer::manager::LoadReport>) -> (Option<String>, Option<String>) {
    (report.as_ref().map(|r| format!("{:?}", r.kind).to_lowercase()), report.as_ref().map(|r| crate::infer::device::label(r.device)))
}

/// `GET /v1/models`: the loaded models in OpenAI's list shape, with what they are.
pub fn models(service: Option<&EmbeddingService>, classifiers: &[&Classifiers]) -> Value {
    let mut data: Vec<Value> = service
        .iter()
        .map(|s| {
            let e = &s.embedder;
            let (dtype, device) = runtime_fields(e.load_report());
            json!({
                "id": e.name(),
                "object": "model",
                "created": 0,
                "owned_by": "convoflow",
                "task": "embedding",
                "dimensions": e.dim,
                "max_input_tokens": e.max_tokens(),
                "dtype": dtype,
                "device": device,
            })
        })
        .collect();
    data.extend(classifiers.iter().flat_map(|c| c.model_rows()));
    json!({ "object": "list", "data": data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_queue_admits_up_to_its_bound_and_frees_on_drop() {
        let q = TokenQueue::new(100);
        let a = q.admit(60).unwrap();
        let refused = q.admit(50).err().unwrap();
        assert_eq!((refused.status, refused.retry_after), (StatusCode::TOO_MANY_REQUESTS, Some(1)));
        assert_eq!(q.admit(101).err().unwrap().status, StatusCode::PAYLOAD_TOO_LARGE);
        drop(a);
        assert_eq!(q.queued(), 0);
        let _b = q.admit(100).unwrap();
    }

    #[test]
    fn inputs_of_every_openai_form_parse() {
        let parse = |v: Value| serde_json::from_value::<EmbeddingsRequest>(v).unwrap().input;
        assert!(matches!(parse(json!({"input": "a"})), EmbeddingInput::Text(_)));
        assert!(matches!(parse(json!({"input": ["a", "b"]})), EmbeddingInput::Texts(v) if v.len() == 2));
        assert!(matches!(parse(json!({"input": [1, 2, 3]})), EmbeddingInput::Tokens(v) if v.len() == 3));
        assert!(matches!(parse(json!({"input": [[1, 2], [3]]})), EmbeddingInput::TokenArrays(v) if v.len() == 2));
        let r: EmbeddingsRequest = serde_json::from_value(json!({"input": "a", "encoding_format": "base64", "input_type": "query"})).unwrap();
        assert_eq!((r.encoding_format, r.input_type), (EncodingFormat::Base64, Some(InputType::Query)));
        assert!(serde_json::from_value::<EmbeddingsRequest>(json!({"input": "a", "encoding_format": "int8"})).is_err());
    }

    #[test]
    fn a_wrong_model_name_is_openai_s_404() {
        assert!(check_model(None, "m").is_ok() && check_model(Some("m"), "m").is_ok());
        let e = check_model(Some("text-embedding-3-small"), "m").err().unwrap();
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, Some("model_not_found")));
    }
}
