//! The LLM behind an OpenAI-compatible chat-completions API (`POST {llm.url}/chat/completions`
//! with `stream: true`), which vLLM, llama.cpp's server, TGI and Ollama all serve.
//!
//! Written over `ureq` (already used for the Schema Registry) rather than an OpenAI SDK crate:
//! the protocol used here is one request and a stream of `data:` lines, and the SDK crates pull
//! in reqwest and a second TLS and HTTP stack. Blocking on purpose: `ask` runs it on its own
//! thread, `serve` in `spawn_blocking`, forwarding each token as it arrives.
//!
//! "On demand": a client is cheap and connects to nothing; the first completion checks once
//! that the server serves `llm.model` (`GET /models`), so a wrong name fails with the list of
//! what the server has, not with the server's own wording.

use std::io::{BufRead, BufReader};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use crate::config::{LlmConfig, Secret};
use crate::telemetry;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: "system", content: content.into() }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user", content: content.into() }
    }
}

/// What a finished completion reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Completion {
    pub text: String,
    /// Content chunks received (one token each on vLLM and llama.cpp).
    pub chunks: usize,
    /// Token counts as the server reports them (`stream_options.include_usage`).
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    /// From sending the request to the first content chunk.
    pub first_token_ms: Option<f64>,
    pub total_ms: f64,
}

impl Completion {
    /// Completion tokens per second after the first token.
    pub fn tokens_per_second(&self) -> Option<f64> {
        let tokens = self.completion_tokens.unwrap_or(self.chunks as u64) as f64;
        let generating = (self.total_ms - self.first_token_ms?) / 1000.0;
        (tokens > 1.0 && generating > 0.0).then(|| (tokens - 1.0) / generating)
    }
}

/// Why a completion failed. Each says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    #[error(
        "no LLM is configured: set llm.url to an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1 for vLLM) \
         and llm.model (docs/ask.md)"
    )]
    NotConfigured,
    #[error("cannot reach the LLM at {url}: {reason} (is the server running? check llm.url)")]
    Unreachable { url: String, reason: String },
    #[error("the LLM server at {url} does not serve the model {model:?}; it serves {served} (set llm.model)")]
    UnknownModel { url: String, model: String, served: String },
    #[error("the LLM server at {url} refused the credentials (HTTP {status}): set llm.api_key (CONVOFLOW__LLM__API_KEY)")]
    Unauthorized { url: String, status: u16 },
    #[error(
        "the prompt does not fit the model's context: {message} (set llm.context_tokens to the served context \
         window, or llm.tokenizer to the model's tokenizer.json)"
    )]
    ContextOverflow { message: String },
    #[error("the LLM server refused the request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the LLM server closed the stream after {received} chunks, before the answer ended ({reason})")]
    Disconnected { received: usize, reason: String },
    #[error("the LLM did not finish within {timeout_ms} ms (llm.timeout_ms)")]
    Timeout { timeout_ms: u64 },
    #[error("{}", silence(*.timeout_ms, *.received))]
    FirstTokenTimeout { timeout_ms: u64, received: usize },
    #[error("the answer was cancelled by its reader after {received} chunks")]
    Cancelled { received: usize },
    #[error("the LLM server does not speak the OpenAI streaming protocol: {0}")]
    Protocol(String),
}

impl LlmError {
    /// The `outcome` label of `convoflow_llm_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            LlmError::NotConfigured | LlmError::Unreachable { .. } => "unreachable",
            LlmError::UnknownModel { .. } => "bad_model",
            LlmError::Unauthorized { .. } | LlmError::ContextOverflow { .. } | LlmError::Refused { .. } => "rejected",
            LlmError::Disconnected { .. } => "disconnected",
            LlmError::Timeout { .. } | LlmError::FirstTokenTimeout { .. } => "timeout",
            LlmError::Cancelled { .. } => "cancelled",
            LlmError::Protocol(_) => "error",
        }
    }
}

/// `FirstTokenTimeout`'s message: no answer at all, or a stream that stopped.
fn silence(timeout_ms: u64, received: usize) -> String {
    if received == 0 {
        format!("the LLM sent no answer within {timeout_ms} ms of the request (llm.first_token_timeout_ms): the server accepts connections but does not answer (overloaded or stuck?)")
    } else {
        format!("the LLM stream went silent for {timeout_ms} ms after {received} chunks (llm.first_token_timeout_ms)")
    }
}

/// What the last exchange with the server showed. `/healthz` reports it; nothing probes the
/// server for it, so an LLM outage never fails the health of search.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmState {
    NotContacted,
    /// The server answered (a refusal of one request's own content, e.g. its length, included).
    Ok,
    Unreachable(String),
    TimedOut(String),
    /// The server answered, but not with an answer: refused credentials, an unknown model, an
    /// error, a cut stream.
    Failing(String),
}

impl LlmState {
    /// The state a completion's result shows.
    fn of(result: &Result<Completion, LlmError>) -> Self {
        match result {
            Ok(_) | Err(LlmError::Cancelled { .. } | LlmError::ContextOverflow { .. }) => LlmState::Ok,
            Err(e @ (LlmError::NotConfigured | LlmError::Unreachable { .. })) => LlmState::Unreachable(e.to_string()),
            Err(e @ (LlmError::Timeout { .. } | LlmError::FirstTokenTimeout { .. })) => LlmState::TimedOut(e.to_string()),
            Err(e) => LlmState::Failing(e.to_string()),
        }
    }

    /// `"not contacted"`, `"ok"`, `"unreachable: …"`, `"timed out: …"` or `"error: …"`.
    pub fn describe(&self) -> String {
        match self {
            LlmState::NotContacted => "not contacted".into(),
            LlmState::Ok => "ok".into(),
            LlmState::Unreachable(e) => format!("unreachable: {e}"),
            LlmState::TimedOut(e) => format!("timed out: {e}"),
            LlmState::Failing(e) => format!("error: {e}"),
        }
    }
}

/// The last exchange's state and when it ended.
#[derive(Debug, Clone)]
pub struct LastContact {
    pub state: LlmState,
    pub at: Option<Instant>,
}

/// A client of one OpenAI-compatible server and model.
pub struct LlmClient {
    agent: ureq::Agent,
    base: String,
    model: String,
    authorization: Option<Secret>,
    max_tokens: u32,
    temperature: f32,
    timeout_ms: u64,
    first_token_timeout_ms: u64,
    model_checked: AtomicBool,
    last_contact: Mutex<LastContact>,
}

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient").field("base", &self.base).field("model", &self.model).finish_non_exhaustive()
    }
}

impl LlmClient {
    /// A client for `llm` (connects to nothing yet).
    pub fn new(llm: &LlmConfig) -> Result<Self, LlmError> {
        if !llm.is_configured() {
            return Err(LlmError::NotConfigured);
        }
        let first_token = Some(Duration::from_millis(llm.first_token_timeout_ms));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_millis(llm.connect_timeout_ms)))
            .timeout_global(Some(Duration::from_millis(llm.timeout_ms)))
            // the response head within first_token_timeout_ms of the request, and no read (the
            // first event, any later one) waits longer: ureq has no deadline that starts at the
            // request and ends at the first body byte, so a stream stalled after its first token
            // is bounded by the same setting
            .timeout_recv_response(first_token)
            .timeout_per_read(first_token)
            .user_agent(concat!("convoflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self {
            agent,
            base: llm.url.trim_end_matches('/').to_string(),
            model: llm.model.clone(),
            authorization: llm.api_key.as_ref().map(|k| Secret::new(format!("Bearer {}", k.expose()))),
            max_tokens: llm.max_tokens,
            temperature: llm.temperature,
            timeout_ms: llm.timeout_ms,
            first_token_timeout_ms: llm.first_token_timeout_ms,
            model_checked: AtomicBool::new(false),
            last_contact: Mutex::new(LastContact { state: LlmState::NotContacted, at: None }),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// What the last completion showed of the server (for `/healthz`).
    pub fn last_contact(&self) -> LastContact {
        self.last_contact.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record_contact(&self, result: &Result<Completion, LlmError>) {
        let contact = LastContact { state: LlmState::of(result), at: Some(Instant::now()) };
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = contact;
    }

    /// A ureq timeout as the setting it ran out of, `received` chunks into the answer.
    fn timed_out(&self, which: ureq::Timeout, received: usize) -> LlmError {
        match which {
            // no connection within llm.connect_timeout_ms: the server is not there
            t @ (ureq::Timeout::Resolve | ureq::Timeout::Connect) => {
                LlmError::Unreachable { url: self.base.clone(), reason: format!("no connection within llm.connect_timeout_ms ({t})") }
            }
            ureq::Timeout::RecvResponse | ureq::Timeout::PerRead => {
                LlmError::FirstTokenTimeout { timeout_ms: self.first_token_timeout_ms, received }
            }
            _ => LlmError::Timeout { timeout_ms: self.timeout_ms },
        }
    }

    fn transport(&self, e: ureq::Error) -> LlmError {
        match e {
            ureq::Error::Timeout(which) => self.timed_out(which, 0),
            other => LlmError::Unreachable { url: self.base.clone(), reason: other.to_string() },
        }
    }

    /// The model names the server lists (`GET /models`); None when it has no such route.
    pub fn served_models(&self) -> Result<Option<Vec<String>>, LlmError> {
        let mut req = self.agent.get(format!("{}/models", self.base));
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a.expose());
        }
        let mut response = req.call().map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        match status {
            200 => {
                let body: Value = serde_json::from_str(&text).map_err(|e| LlmError::Protocol(format!("GET /models: {e}")))?;
                let ids = body["data"].as_array().map(|a| a.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect());
                Ok(ids)
            }
            401 | 403 => Err(LlmError::Unauthorized { url: self.base.clone(), status }),
            _ => Ok(None),
        }
    }

    /// Checks once that the server serves the configured model.
    fn check_model(&self) -> Result<(), LlmError> {
        if self.model_checked.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(served) = self.served_models()?
            && !served.iter().any(|m| m == &self.model)
        {
            return Err(LlmError::UnknownModel {
                url: self.base.clone(),
                model: self.model.clone(),
                served: format!("{served:?}"),
            });
        }
        self.model_checked.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Streams one chat completion: `on_text` gets each piece of the answer as it arrives and
    /// returns false to stop reading (the connection is then closed, which stops generation on
    /// vLLM and llama.cpp). Counts `convoflow_llm_*`.
    pub fn stream_chat(&self, messages: &[ChatMessage], on_text: &mut dyn FnMut(&str) -> bool) -> Result<Completion, LlmError> {
        let result = self.check_model().and_then(|()| self.stream_inner(messages, on_text));
        self.record_contact(&result);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        metrics::counter!(telemetry::LLM_REQUESTS, "outcome" => outcome).increment(1);
        if let Ok(c) = &result {
            if let Some(ms) = c.first_token_ms {
                metrics::histogram!(telemetry::LLM_FIRST_TOKEN_SECONDS).record(ms / 1000.0);
            }
            if let Some(p) = c.prompt_tokens {
                metrics::counter!(telemetry::LLM_TOKENS, "kind" => "prompt").increment(p);
            }
            metrics::counter!(telemetry::LLM_TOKENS, "kind" => "completion").increment(c.completion_tokens.unwrap_or(c.chunks as u64));
            if let Some(rate) = c.tokens_per_second() {
                metrics::histogram!(telemetry::LLM_TOKENS_PER_SECOND).record(rate);
            }
        }
        result
    }

    fn stream_inner(&self, messages: &[ChatMessage], on_text: &mut dyn FnMut(&str) -> bool) -> Result<Completion, LlmError> {
        let body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let started = Instant::now();
        let mut req = self.agent.post(format!("{}/chat/completions", self.base)).header("Content-Type", "application/json");
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a.expose());
        }
        let mut response = req.send(body.to_string()).map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        if status != 200 {
            let text = response.body_mut().with_config().limit(64 * 1024).read_to_string().unwrap_or_default();
            return Err(self.refusal(status, &text));
        }
        let mut done = Completion::default();
        let mut finished = false;
        let reader = BufReader::new(response.into_body().into_reader());
        for line in reader.lines() {
            let line = match line.map_err(ureq::Error::from) {
                Ok(line) => line,
                Err(ureq::Error::Timeout(which)) => return Err(self.timed_out(which, done.chunks)),
                Err(e) => return Err(LlmError::Disconnected { received: done.chunks, reason: e.to_string() }),
            };
            // llama.cpp's server reports an error inside a stream as an `error: {json}` line
            if let Some(error) = line.strip_prefix("error:") {
                let error: Value = serde_json::from_str(error.trim()).unwrap_or_else(|_| json!({"message": error.trim()}));
                let message = error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_string);
                let code = error.get("code").and_then(Value::as_u64).unwrap_or(500) as u16;
                return Err(self.refusal(code, &json!({"error": {"message": message}}).to_string()));
            }
            let Some(data) = line.strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                finished = true;
                break;
            }
            let event: Value = serde_json::from_str(data).map_err(|e| LlmError::Protocol(format!("{e} in {data:?}")))?;
            if let Some(error) = event.get("error") {
                let message = error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_string);
                let code = error.get("code").and_then(Value::as_u64).unwrap_or(500) as u16;
                return Err(self.refusal(code, &json!({"error": {"message": message}}).to_string()));
            }
            if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
                done.prompt_tokens = usage["prompt_tokens"].as_u64();
                done.completion_tokens = usage["completion_tokens"].as_u64();
            }
            let Some(choice) = event["choices"].as_array().and_then(|c| c.first()) else { continue };
            if let Some(reason) = choice["finish_reason"].as_str() {
                done.finish_reason = Some(reason.to_string());
            }
            if let Some(text) = choice["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
                if done.first_token_ms.is_none() {
                    done.first_token_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
                }
                done.chunks += 1;
                done.text.push_str(text);
                if !on_text(text) {
                    return Err(LlmError::Cancelled { received: done.chunks });
                }
            }
        }
        // some servers (TGI, older llama.cpp forks) end the stream after the finish_reason
        // without `data: [DONE]`: the answer is complete all the same
        if !finished && done.finish_reason.is_none() {
            return Err(LlmError::Disconnected {
                received: done.chunks,
                reason: "the stream ended without its final `data: [DONE]`".into(),
            });
        }
        done.total_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(done)
    }

    /// A non-200 answer as an error that says what to change.
    fn refusal(&self, status: u16, text: &str) -> LlmError {
        let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let message = body["error"]["message"]
            .as_str()
            .or_else(|| body["message"].as_str())
            .or_else(|| body["detail"].as_str())
            .map_or_else(|| text.chars().take(500).collect::<String>(), str::to_string);
        let lower = message.to_lowercase();
        match status {
            401 | 403 => LlmError::Unauthorized { url: self.base.clone(), status },
            404 if lower.contains("model") => {
                LlmError::UnknownModel { url: self.base.clone(), model: self.model.clone(), served: format!("(the server says: {message})") }
            }
            _ if lower.contains("context") && (lower.contains("exceed") || lower.contains("maximum") || lower.contains("length")) => {
                LlmError::ContextOverflow { message }
            }
            _ => LlmError::Refused { status, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> LlmClient {
        LlmClient::new(&LlmConfig { url: "http://127.0.0.1:9/v1/".into(), ..Default::default() }).unwrap()
    }

    #[test]
    fn refusals_say_what_to_change() {
        let c = client();
        assert_eq!(c.url(), "http://127.0.0.1:9/v1");
        let vllm_model = r#"{"object":"error","message":"The model `mistral` does not exist.","type":"NotFoundError","code":404}"#;
        assert!(matches!(c.refusal(404, vllm_model), LlmError::UnknownModel { .. }));
        let vllm_ctx = r#"{"object":"error","message":"This model's maximum context length is 8192 tokens. However, you requested 9000 tokens","code":400}"#;
        assert!(matches!(c.refusal(400, vllm_ctx), LlmError::ContextOverflow { .. }));
        let llama_ctx = r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}}"#;
        assert!(matches!(c.refusal(400, llama_ctx), LlmError::ContextOverflow { .. }));
        assert!(matches!(c.refusal(401, "{}"), LlmError::Unauthorized { status: 401, .. }));
        match c.refusal(503, "busy") {
            LlmError::Refused { status: 503, message } => assert_eq!(message, "busy"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(LlmClient::new(&LlmConfig::default()), Err(LlmError::NotConfigured)));
    }

    #[test]
    fn unreachable_server_is_reported_with_the_url() {
        // port 9 (discard) on loopback: nothing listens in the test environment
        let err = client().stream_chat(&[ChatMessage::user("hi")], &mut |_| true).unwrap_err();
        assert!(matches!(err, LlmError::Unreachable { .. }), "{err:?}");
        assert!(err.to_string().contains("http://127.0.0.1:9/v1") && err.to_string().contains("llm.url"), "{err}");
    }

    /// A test double, not an LLM: accepts connections on 127.0.0.1 and, per connection, writes
    /// `script` (possibly nothing), then stays silent until the test ends.
    fn silent_server(script: &'static str) -> (String, std::thread::JoinHandle<()>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let held = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut head = [0u8; 4096];
            let _ = conn.read(&mut head);
            conn.write_all(script.as_bytes()).unwrap();
            // hold the connection open, answering nothing more, past the client's timeout
            std::thread::sleep(Duration::from_secs(3));
        });
        (url, held)
    }

    #[test]
    fn a_server_that_goes_silent_fails_after_the_first_token_timeout() {
        let config = |url: String| LlmConfig { url, timeout_ms: 60_000, first_token_timeout_ms: 400, ..Default::default() };
        // accepts, never answers: fails after llm.first_token_timeout_ms, not llm.timeout_ms
        let (url, held) = silent_server("");
        let client = LlmClient::new(&config(url)).unwrap();
        assert_eq!(client.last_contact().state, LlmState::NotContacted);
        client.model_checked.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let err = client.stream_chat(&[ChatMessage::user("hi")], &mut |_| true).unwrap_err();
        assert!(matches!(err, LlmError::FirstTokenTimeout { timeout_ms: 400, received: 0 }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert!(err.to_string().contains("llm.first_token_timeout_ms"), "{err}");
        assert!(client.last_contact().state.describe().starts_with("timed out: the LLM sent no answer within 400 ms"));
        held.join().unwrap();
        // answers one token, then stalls: the same bound, with what was received
        let (url, held) = silent_server(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
             31\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"Bon\"}}]}\n\n\r\n",
        );
        let client = LlmClient::new(&config(url)).unwrap();
        client.model_checked.store(true, Ordering::Relaxed);
        let err = client.stream_chat(&[ChatMessage::user("hi")], &mut |_| true).unwrap_err();
        assert!(matches!(err, LlmError::FirstTokenTimeout { received: 1, .. }), "{err:?}");
        assert!(err.to_string().contains("went silent for 400 ms after 1 chunks"), "{err}");
        held.join().unwrap();
    }

    #[test]
    fn tokens_per_second_counts_after_the_first_token() {
        let c = Completion { chunks: 11, first_token_ms: Some(100.0), total_ms: 1100.0, ..Default::default() };
        assert_eq!(c.tokens_per_second(), Some(10.0));
        assert_eq!(Completion::default().tokens_per_second(), None);
    }
}
