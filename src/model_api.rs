//! The models over HTTP, in the OpenAI API's shapes (`convoflow serve`): `POST /v1/embeddings`
//! and `GET /v1/models`, with errors as OpenAI's `{"error": {"message", "type", "param",
//! "code"}}` so its clients raise their usual exceptions. Requests are dynamically batched:
//! each is tokenized on the request's own task and queued on the model thread as token ids,
//! where the jobs of concurrent requests are launched together (`QueryEmbedder`); the tokens
//! waiting there are bounded by `serve.max_queued_tokens` (`TokenQueue`: 429 with `Retry-After`
//! beyond it), and a request whose client went away is dropped from the queue unrun.
//! `/v1/search` and `/v1/ask` embed their queries through the same queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::query::{InputType, PreparedInput, QueryEmbedder};

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

/// The embedding model as the API serves it: its thread and its token queue.
pub struct EmbeddingService {
    pub embedder: Arc<QueryEmbedder>,
    pub queue: TokenQueue,
}

impl EmbeddingService {
    /// Embeds prepared inputs through the queue (batched with concurrent requests), in order.
    pub async fn embed(&self, inputs: Vec<Vec<i64>>) -> Result<Vec<Vec<f32>>, OpenAiError> {
        let tokens = inputs.iter().map(Vec::len).sum();
        let _held = self.queue.admit(tokens)?;
        let withdrawn = Arc::new(AtomicBool::new(false));
        let _withdraw = WithdrawOnDrop(withdrawn.clone());
        let reply = self.embedder.submit(inputs, withdrawn).map_err(|e| OpenAiError::server(format!("{e:#}")))?;
        let answer = tokio::task::spawn_blocking(move || reply.recv())
            .await
            .map_err(|e| OpenAiError::server(format!("waiting for the embedding model: {e}")))?
            .map_err(|_| OpenAiError::server("the embedding model thread stopped"))?;
        let (output, _) = answer.map_err(|e| OpenAiError::server(format!("embedding: {e:#}")))?;
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

/// `GET /v1/models`: the loaded models in OpenAI's list shape, with what they are.
pub fn models(service: Option<&EmbeddingService>) -> Value {
    let data: Vec<Value> = service
        .iter()
        .map(|s| {
            let e = &s.embedder;
            let report = e.load_report();
            json!({
                "id": e.name(),
                "object": "model",
                "created": 0,
                "owned_by": "convoflow",
                "task": "embedding",
                "dimensions": e.dim,
                "max_input_tokens": e.max_tokens(),
                "dtype": report.as_ref().map(|r| format!("{:?}", r.kind).to_lowercase()),
                "device": report.as_ref().map(|r| crate::infer::device::label(r.device)),
            })
        })
        .collect();
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
