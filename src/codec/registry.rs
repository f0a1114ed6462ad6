//! A Schema Registry client over the Confluent REST API (Confluent Schema Registry, Karapace,
//! Apicurio's `/apis/ccompat/v7`): writer schemas by id for Confluent-framed input, and the
//! output schema registered (or looked up) under its subject at start.
//!
//! Written over `ureq` rather than taken from `schema_registry_converter`: that crate brings its
//! own, older `apache-avro` (whose `Schema` type is not ours) and reqwest; the four calls
//! needed here are small. Blocking on purpose: lookups happen inside the prepare stage's rayon
//! workers, where a cache miss simply waits for the registry.
//!
//! Faults are classified like the rest of the worker: an id the registry does not know is the
//! message's fault (dead-lettered as `unknown-schema`); a registry that is unreachable, slow or
//! failing is not: the lookup retries with backoff (the stage stalls, the source pauses its
//! partitions, nothing is committed) until it answers or the worker stops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apache_avro::Schema;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::CodecError;
use super::avro::SchemaLookup;
use crate::config::{SchemaRegistryConfig, Secret, SubjectStrategy};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Why a registry call did not give an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// Connection refused, timeout, 5xx, 408, 429: try again later.
    #[error("schema registry {url} unavailable: {reason}")]
    Unavailable { url: String, reason: String },
    /// Any other refusal (401/403: credentials; 409: incompatible schema; 422: invalid schema).
    #[error("schema registry {url} refused the request: HTTP {status} (error_code {code}): {message}")]
    Refused { url: String, status: u16, code: i64, message: String },
}

/// A writer schema as the registry stores it.
#[derive(Debug, Clone)]
pub struct RegisteredSchema {
    /// AVRO (the default when the registry omits it), JSON or PROTOBUF.
    pub schema_type: String,
    pub schema: String,
}

pub struct SchemaRegistry {
    agent: ureq::Agent,
    base: String,
    /// `Basic base64(user:password)`, made once.
    authorization: Option<Secret>,
}

impl SchemaRegistry {
    pub fn new(cfg: &SchemaRegistryConfig) -> Result<Self> {
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_millis(cfg.timeout_ms)))
            .user_agent(concat!("convoflow/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &cfg.ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading codec.schema_registry.ca {}", ca.display()))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing {}", ca.display()))?;
            if certs.is_empty() {
                bail!("codec.schema_registry.ca {} holds no certificate", ca.display());
            }
            builder = builder.tls_config(
                ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build(),
            );
        }
        Ok(Self {
            agent: builder.build().into(),
            base: cfg.url.trim_end_matches('/').to_string(),
            authorization: cfg.username.as_ref().map(|user| {
                let password = cfg.password.as_ref().map(Secret::expose).unwrap_or("");
                let pair = format!("{user}:{password}");
                Secret::new(format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pair)))
            }),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// One request: GET without a body, POST with one; `Ok((status, body))` for any HTTP answer.
    fn call(&self, path: &str, body: Option<&Value>) -> Result<(u16, Value), RegistryError> {
        let url = format!("{}{path}", self.base);
        let unavailable = |reason: String| RegistryError::Unavailable { url: self.base.clone(), reason };
        let auth = self.authorization.as_ref().map(Secret::expose);
        let result = match body {
            None => {
                let mut req = self.agent.get(&url).header("Accept", CONTENT_TYPE);
                if let Some(a) = auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
            Some(body) => {
                let mut req = self.agent.post(&url).header("Accept", CONTENT_TYPE).header("Content-Type", CONTENT_TYPE);
                if let Some(a) = auth {
                    req = req.header("Authorization", a);
                }
                req.send(body.to_string())
            }
        };
        let mut response = result.map_err(|e| unavailable(e.to_string()))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| unavailable(format!("reading the answer: {e}")))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// A non-success answer as an error: retryable or not.
    fn refusal(&self, status: u16, body: &Value) -> RegistryError {
        let code = body.get("error_code").and_then(Value::as_i64).unwrap_or(0);
        let message = body.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| body.to_string());
        if status >= 500 || status == 408 || status == 429 {
            RegistryError::Unavailable { url: self.base.clone(), reason: format!("HTTP {status}: {message}") }
        } else {
            RegistryError::Refused { url: self.base.clone(), status, code, message }
        }
    }

    /// Is the registry there (and do the credentials work)?
    pub fn check(&self) -> Result<(), RegistryError> {
        match self.call("/subjects", None)? {
            (200, _) => Ok(()),
            (status, body) => Err(self.refusal(status, &body)),
        }
    }

    /// The schema registered under `id`; None when the registry does not know the id.
    pub fn schema_by_id(&self, id: u32) -> Result<Option<RegisteredSchema>, RegistryError> {
        match self.call(&format!("/schemas/ids/{id}"), None)? {
            (200, body) => {
                let schema = body.get("schema").and_then(Value::as_str).ok_or_else(|| RegistryError::Unavailable {
                    url: self.base.clone(),
                    reason: format!("the answer for id {id} has no schema: {body}"),
                })?;
                let schema_type = body.get("schemaType").and_then(Value::as_str).unwrap_or("AVRO").to_string();
                Ok(Some(RegisteredSchema { schema_type, schema: schema.to_string() }))
            }
            (404, _) => Ok(None),
            (status, body) => Err(self.refusal(status, &body)),
        }
    }

    /// Registers `schema` (Avro) under `subject` (or finds it there): its global id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        match self.call(&format!("/subjects/{subject}/versions"), Some(&json!({ "schema": schema })))? {
            (200, body) => self.id_of(&body),
            (status, body) => Err(self.refusal(status, &body)),
        }
    }

    /// The id of `schema` under `subject`, if registered there.
    pub fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>, RegistryError> {
        match self.call(&format!("/subjects/{subject}"), Some(&json!({ "schema": schema })))? {
            (200, body) => self.id_of(&body).map(Some),
            (404, _) => Ok(None),
            (status, body) => Err(self.refusal(status, &body)),
        }
    }

    fn id_of(&self, body: &Value) -> Result<u32, RegistryError> {
        body.get("id").and_then(Value::as_u64).and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
            RegistryError::Unavailable { url: self.base.clone(), reason: format!("an answer without a schema id: {body}") }
        })
    }
}

/// The subject a record's schema is registered under for `topic` (message values).
pub fn subject(strategy: SubjectStrategy, topic: &str, record_full_name: &str) -> String {
    match strategy {
        SubjectStrategy::TopicName => format!("{topic}-value"),
        SubjectStrategy::RecordName => record_full_name.to_string(),
        SubjectStrategy::TopicRecordName => format!("{topic}-{record_full_name}"),
    }
}

/// The registry id to frame records of `schema_json` with, written to `topic`: registered (or
/// found) under its subject, or looked up only when `auto_register` is off. Any failure is a
/// start-up error that says what to do.
pub fn writer_schema_id(cfg: &SchemaRegistryConfig, registry: &SchemaRegistry, topic: &str, schema_json: &str) -> Result<u32> {
    let full_name = match Schema::parse_str(schema_json).context("parsing the schema to register")? {
        Schema::Record(r) => r.name.fullname(None),
        other => bail!("only record schemas are registered, got {other:?}"),
    };
    let subject = subject(cfg.subject_strategy, topic, &full_name);
    // Confluent's serializers register the text without its trailing newline, and registries
    // that compare text (Apicurio) would otherwise see a new version
    let text = schema_json.trim_end();
    let id = if cfg.auto_register {
        registry.register(&subject, text).map_err(|e| match e {
            RegistryError::Refused { status: 409, message, .. } => anyhow::anyhow!(
                "the schema registry {} refuses {full_name} under subject {subject}: incompatible with the versions \
                 registered there ({message}); fix the schema change (see schemas/README.md) or the subject's \
                 compatibility level",
                registry.url()
            ),
            other => anyhow::Error::new(other).context(format!("registering {full_name} under subject {subject}")),
        })?
    } else {
        registry
            .lookup(&subject, text)
            .with_context(|| format!("looking up {full_name} under subject {subject}"))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{full_name} is not registered under subject {subject} at {} and codec.schema_registry.auto_register \
                     is off: register it first",
                    registry.url()
                )
            })?
    };
    info!(subject, id, registry = registry.url(), "output schema registered");
    Ok(id)
}

/// Resolves Confluent schema ids: fixed ids from the configuration first, then the registry,
/// whose answers are cached for the life of the worker (ids are immutable).
pub struct RegistryLookup {
    registry: Arc<SchemaRegistry>,
    cache: RwLock<HashMap<u32, Arc<Schema>>>,
    interrupted: AtomicBool,
}

impl RegistryLookup {
    pub fn new(registry: Arc<SchemaRegistry>, fixed: HashMap<u32, Schema>) -> Self {
        let cache = fixed.into_iter().map(|(id, s)| (id, Arc::new(s))).collect();
        Self { registry, cache: RwLock::new(cache), interrupted: AtomicBool::new(false) }
    }

    fn fetch(&self, id: u32) -> Result<Option<RegisteredSchema>, RegistryError> {
        let mut backoff = Duration::from_millis(100);
        let mut next_warning = Instant::now();
        // held from the first failure until the lookup returns: waiting out the registry is
        // not being wedged (liveness)
        let mut waiting = None;
        loop {
            match self.registry.schema_by_id(id) {
                Ok(found) => return Ok(found),
                Err(e) => {
                    metrics::counter!(crate::telemetry::REGISTRY_ERRORS).increment(1);
                    waiting.get_or_insert_with(crate::telemetry::liveness::DependencyWait::registry);
                    if self.interrupted.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    if Instant::now() >= next_warning {
                        warn!(error = %e, id, "cannot resolve a writer schema; retrying (the input waits, nothing is dead-lettered)");
                        next_warning = Instant::now() + Duration::from_secs(30);
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !self.interrupted.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50).min(backoff));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl SchemaLookup for RegistryLookup {
    fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, CodecError> {
        if let Some(schema) = self.cache.read().expect("cache lock").get(&id) {
            return Ok(schema.clone());
        }
        let found = self.fetch(id).map_err(|e| CodecError::Unavailable(e.to_string()))?;
        let Some(found) = found else { return Err(CodecError::UnknownSchemaId(id)) };
        if !found.schema_type.eq_ignore_ascii_case("AVRO") {
            return Err(CodecError::Schema(format!("schema id {id} is a {} schema, not Avro", found.schema_type)));
        }
        let schema = Arc::new(
            Schema::parse_str(&found.schema).map_err(|e| CodecError::Schema(format!("schema id {id} from the registry: {e}")))?,
        );
        self.cache.write().expect("cache lock").insert(id, schema.clone());
        Ok(schema)
    }

    fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_confluents_strategies() {
        let name = "dev.convoflow.v1.EnrichedConversation";
        assert_eq!(subject(SubjectStrategy::TopicName, "out", name), "out-value");
        assert_eq!(subject(SubjectStrategy::RecordName, "out", name), name);
        assert_eq!(subject(SubjectStrategy::TopicRecordName, "out", name), format!("out-{name}"));
    }

    /// A one-shot HTTP test double on loopback: answers one request with `status` and `body`,
    /// and hands back the request's head.
    fn one_answer(status: u16, body: &'static str) -> (String, std::thread::JoinHandle<String>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                head.push_str(&line);
            }
            let mut request_body = vec![0; length];
            std::io::Read::read_exact(&mut reader, &mut request_body).unwrap();
            let mut stream = stream;
            write!(stream, "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
            head + &String::from_utf8(request_body).unwrap()
        });
        (url, served)
    }

    /// Basic auth as RFC 7617 says, the Confluent content type, and the schema as JSON text.
    #[test]
    fn registering_sends_credentials_and_reads_the_id() {
        let (url, served) = one_answer(200, r#"{"id":42}"#);
        let cfg = SchemaRegistryConfig {
            url,
            username: Some("svc".into()),
            password: Some(Secret::new("s3cr3t")),
            ..Default::default()
        };
        let registry = SchemaRegistry::new(&cfg).unwrap();
        assert_eq!(registry.register("out-value", r#"{"type":"string"}"#).unwrap(), 42);
        let request = served.join().unwrap();
        assert!(request.starts_with("POST /subjects/out-value/versions HTTP/1.1"), "{request}");
        assert!(request.contains("authorization: Basic c3ZjOnMzY3IzdA==") || request.contains("Authorization: Basic c3ZjOnMzY3IzdA=="), "{request}");
        assert!(request.to_ascii_lowercase().contains("content-type: application/vnd.schemaregistry.v1+json"), "{request}");
        assert!(request.ends_with(r#"{"schema":"{\"type\":\"string\"}"}"#), "{request}");
    }

    /// 409 is a refusal the caller reports (incompatible); 5xx is "unavailable" (retried);
    /// 404 on an id is "unknown id" (the message's fault).
    #[test]
    fn answers_are_classified() {
        let (url, served) = one_answer(409, r#"{"error_code":409,"message":"incompatible"}"#);
        let registry = SchemaRegistry::new(&SchemaRegistryConfig { url, ..Default::default() }).unwrap();
        assert!(matches!(registry.register("s", "{}"), Err(RegistryError::Refused { status: 409, .. })));
        served.join().unwrap();
        let (url, served) = one_answer(503, "busy");
        let registry = SchemaRegistry::new(&SchemaRegistryConfig { url, ..Default::default() }).unwrap();
        assert!(matches!(registry.schema_by_id(3), Err(RegistryError::Unavailable { .. })));
        served.join().unwrap();
        let (url, served) = one_answer(404, r#"{"error_code":40403,"message":"not found"}"#);
        let lookup = RegistryLookup::new(Arc::new(SchemaRegistry::new(&SchemaRegistryConfig { url, ..Default::default() }).unwrap()), HashMap::new());
        assert!(matches!(lookup.schema_by_id(3), Err(CodecError::UnknownSchemaId(3))));
        served.join().unwrap();
    }

    /// Nothing listens on the port: unavailable (retried by lookups), never "unknown id".
    #[test]
    fn an_unreachable_registry_is_unavailable_not_unknown() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = SchemaRegistryConfig { url: format!("http://127.0.0.1:{port}"), timeout_ms: 500, ..Default::default() };
        let registry = Arc::new(SchemaRegistry::new(&cfg).unwrap());
        assert!(matches!(registry.check(), Err(RegistryError::Unavailable { .. })));
        let lookup = RegistryLookup::new(registry, HashMap::new());
        lookup.interrupt(); // one attempt, then give up as the worker does when it stops
        assert!(matches!(lookup.schema_by_id(7), Err(CodecError::Unavailable(_))));
    }
}
