//! Configuration: a YAML file (see `convoflow.yaml`, every key documented there) with
//! environment overrides `CONVOFLOW__SECTION__KEY=value` (double underscore between levels).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::codec::WireFormat;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub codec: CodecConfig,
    pub pipeline: PipelineConfig,
    pub models: ModelsConfig,
    pub gpu: GpuConfig,
    pub qdrant: QdrantConfig,
    pub telemetry: TelemetryConfig,
    pub llm: LlmConfig,
    pub serve: ServeConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    /// Dead-letter topic; empty means `<input_topic>.dlq`.
    pub dlq_topic: String,
    /// Create the output and dead-letter topics at start if missing (partitions = input's).
    pub create_topics: bool,
    pub session_timeout_ms: u32,
    pub max_poll_interval_ms: u32,
    /// How often completed offsets are committed.
    pub commit_interval_ms: u64,
    /// `earliest` or `latest`, where a group with no committed offset starts.
    pub auto_offset_reset: String,
    /// Producer compression: none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// Largest message produced (the DLQ copies input messages whole).
    pub message_max_bytes: u32,
    /// How long librdkafka keeps retrying a record's delivery (`delivery.timeout.ms`; its
    /// default, 5 minutes). A record not delivered by then stops the worker, its message
    /// uncommitted: a broker outage longer than this becomes a restart.
    pub delivery_timeout_ms: u32,
    /// `at_least_once` (default: offsets committed after the outputs were delivered; a crash
    /// or a rebalance can duplicate outputs) or `exactly_once` (Kafka transactions: outputs and
    /// offsets commit together; `read_committed` consumers of the output and DLQ topics see each
    /// input once). See docs/reliability.md.
    pub delivery: Delivery,
    /// `exactly_once`: the producer's `transactional.id` is
    /// `<transactional_id_prefix>.<group_id>.<instance_id>`.
    pub transactional_id_prefix: String,
    /// `exactly_once`: this worker's stable identity (a StatefulSet's pod name, so that a
    /// restarted pod fences its predecessor and aborts its open transaction at once). Empty:
    /// `$HOSTNAME`, else the host name.
    pub instance_id: String,
    /// `exactly_once`: the broker aborts a transaction open longer than this
    /// (`transaction.timeout.ms`); also how long `read_committed` readers may wait behind the
    /// open transaction of a worker that died and is not restarted under the same instance id.
    /// Deliveries are retried for at most this long.
    pub transaction_timeout_ms: u32,
    /// `exactly_once`: a transaction is committed every `commit_interval_ms`, or sooner once it
    /// holds this many input messages.
    pub transaction_max_messages: usize,
    /// Authentication and encryption, applied to every client (consumer, producer, admin,
    /// lag monitor, read-back).
    pub security: KafkaSecurity,
    /// Extra librdkafka properties for every client (tuning only: what `security` covers and
    /// anything secret is refused here).
    pub client: BTreeMap<String, String>,
}

/// A secret (password, key passphrase): read from the file or the environment, never shown —
/// `Debug` and `Serialize` print `[redacted]`, and `convoflow check` says only whether it is set.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(secrecy::SecretString::from(value.into()))
    }

    /// The value, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret;
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// "set" or "not set", for reports.
pub fn set_or_not<T>(secret: &Option<T>) -> &'static str {
    if secret.is_some() { "set" } else { "not set" }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl)
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    /// OAuth 2 client credentials (OIDC): `username` is the client id, `password` the client
    /// secret, `token_endpoint` the token URL.
    #[serde(rename = "OAUTHBEARER")]
    OauthBearer,
}

impl SaslMechanism {
    pub fn librdkafka(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OauthBearer => "OAUTHBEARER",
        }
    }
}

/// `kafka.security`; every key settable from the environment, e.g.
/// `CONVOFLOW__KAFKA__SECURITY__SASL__PASSWORD`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurity {
    /// plaintext | ssl | sasl_plaintext | sasl_ssl
    pub protocol: SecurityProtocol,
    pub sasl: SaslConfig,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SaslConfig {
    /// PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | OAUTHBEARER
    pub mechanism: SaslMechanism,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// OAUTHBEARER: the OAuth token endpoint URL.
    pub token_endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate(s) (PEM) that signed the brokers' certificates; unset = the system's.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for brokers that require mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub key: Option<PathBuf>,
    pub key_password: Option<Secret>,
}

impl KafkaSecurity {
    /// The librdkafka properties, secrets included (only for `ClientConfig`; never print them).
    pub fn client_properties(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("security.protocol", self.protocol.librdkafka().to_string())];
        if self.protocol.uses_sasl() {
            let s = &self.sasl;
            out.push(("sasl.mechanism", s.mechanism.librdkafka().to_string()));
            if s.mechanism == SaslMechanism::OauthBearer {
                out.push(("sasl.oauthbearer.method", "oidc".into()));
                out.extend(s.username.clone().map(|u| ("sasl.oauthbearer.client.id", u)));
                out.extend(s.password.as_ref().map(|p| ("sasl.oauthbearer.client.secret", p.expose().to_string())));
                out.extend(s.token_endpoint.clone().map(|u| ("sasl.oauthbearer.token.endpoint.url", u)));
            } else {
                out.extend(s.username.clone().map(|u| ("sasl.username", u)));
                out.extend(s.password.as_ref().map(|p| ("sasl.password", p.expose().to_string())));
            }
        }
        if self.protocol.uses_tls() {
            let t = &self.tls;
            let path = |p: &PathBuf| p.display().to_string();
            out.extend(t.ca.as_ref().map(|p| ("ssl.ca.location", path(p))));
            out.extend(t.cert.as_ref().map(|p| ("ssl.certificate.location", path(p))));
            out.extend(t.key.as_ref().map(|p| ("ssl.key.location", path(p))));
            out.extend(t.key_password.as_ref().map(|p| ("ssl.key.password", p.expose().to_string())));
        }
        out
    }

    /// What `convoflow check` shows: no secret, only whether each is set.
    pub fn describe(&self) -> String {
        let mut out = self.protocol.librdkafka().to_string();
        if self.protocol.uses_sasl() {
            let s = &self.sasl;
            out += &format!(
                ", SASL {} as {} (password {})",
                s.mechanism.librdkafka(),
                s.username.as_deref().unwrap_or("<no username>"),
                set_or_not(&s.password)
            );
        }
        if self.protocol.uses_tls() {
            let t = &self.tls;
            let shown = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into());
            out += &format!(
                ", TLS CA {}, client cert {}, key {} (key password {})",
                t.ca.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "system".into()),
                shown(&t.cert),
                shown(&t.key),
                set_or_not(&t.key_password)
            );
        }
        out
    }

    fn validate(&self) -> Result<()> {
        if self.protocol.uses_sasl() {
            let s = &self.sasl;
            if s.username.as_deref().unwrap_or("").is_empty() || s.password.is_none() {
                bail!(
                    "kafka.security.protocol {} needs sasl.username and sasl.password \
                     (CONVOFLOW__KAFKA__SECURITY__SASL__PASSWORD)",
                    self.protocol.librdkafka()
                );
            }
            if s.mechanism == SaslMechanism::OauthBearer && s.token_endpoint.is_none() {
                bail!("kafka.security.sasl.mechanism OAUTHBEARER needs sasl.token_endpoint");
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            bail!("kafka.security.tls.cert and tls.key go together");
        }
        Ok(())
    }
}

/// librdkafka properties that `kafka.client` may not set: `kafka.security` owns them, or they
/// hold secrets (which belong in redacted settings, not in a pass-through map). TLS tuning such
/// as `ssl.endpoint.identification.algorithm` stays allowed.
fn refused_client_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase().replace('_', ".");
    k == "security.protocol"
        || k.starts_with("sasl.")
        || ["ssl.key", "ssl.keystore", "ssl.certificate", "ssl.ca"].iter().any(|p| k.starts_with(p))
        || ["password", "secret", "pasword", "passwd", "token", "credential", "jaas"].iter().any(|w| k.contains(w))
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "convoflow".into(),
            input_topic: "conversations".into(),
            output_topic: "conversations.enriched".into(),
            dlq_topic: String::new(),
            create_topics: true,
            session_timeout_ms: 10_000,
            max_poll_interval_ms: 300_000,
            commit_interval_ms: 500,
            auto_offset_reset: "earliest".into(),
            compression: "lz4".into(),
            message_max_bytes: 16 * 1024 * 1024,
            delivery_timeout_ms: 300_000,
            delivery: Delivery::AtLeastOnce,
            transactional_id_prefix: "convoflow".into(),
            instance_id: String::new(),
            transaction_timeout_ms: 60_000,
            transaction_max_messages: 5_000,
            security: KafkaSecurity::default(),
            client: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// The `kafka` section's own checks.
    fn validate(&self) -> Result<()> {
        let k = self;
        if k.brokers.trim().is_empty() || k.group_id.is_empty() || k.input_topic.is_empty() || k.output_topic.is_empty() {
            bail!("kafka.brokers, group_id, input_topic and output_topic must be set");
        }
        if k.input_topic == k.output_topic || k.dlq_topic() == k.input_topic {
            bail!("kafka.output_topic and the dead-letter topic must differ from input_topic");
        }
        if let Some(key) = k.client.keys().find(|key| refused_client_key(key)) {
            // the key only: its value may be a secret
            bail!(
                "kafka.client.{key} is not accepted: security settings and secrets go in kafka.security \
                 (protocol, sasl.mechanism/username/password, tls.ca/cert/key/key_password; each settable as \
                 CONVOFLOW__KAFKA__SECURITY__…, e.g. CONVOFLOW__KAFKA__SECURITY__SASL__PASSWORD)"
            );
        }
        k.security.validate()?;
        if k.delivery == Delivery::ExactlyOnce {
            if k.transactional_id_prefix.is_empty() || k.transaction_max_messages == 0 || k.transaction_timeout_ms < 1_000 {
                bail!(
                    "kafka.delivery exactly_once needs kafka.transactional_id_prefix, transaction_max_messages > 0 \
                     and transaction_timeout_ms >= 1000"
                );
            }
            // a partial (cooperative) revoke would leave the kept partitions' place in an aborted
            // transaction unknown; the eager protocol revokes everything at once
            if k.client.iter().any(|(key, value)| {
                key.replace('_', ".").eq_ignore_ascii_case("partition.assignment.strategy") && value.to_ascii_lowercase().contains("cooperative")
            }) {
                bail!("kafka.delivery exactly_once needs an eager partition.assignment.strategy (range, roundrobin), not cooperative-sticky");
            }
            if k.client.keys().any(|key| key.replace('_', ".").eq_ignore_ascii_case("transactional.id")) {
                bail!("kafka.client.transactional.id is not accepted: it is derived from kafka.transactional_id_prefix and instance_id");
            }
        }
        Ok(())
    }
}

impl KafkaConfig {
    pub fn dlq_topic(&self) -> String {
        if self.dlq_topic.is_empty() { format!("{}.dlq", self.input_topic) } else { self.dlq_topic.clone() }
    }

    /// The transactional producer's `transactional.id` (`exactly_once`).
    pub fn transactional_id(&self) -> String {
        let instance = if !self.instance_id.is_empty() {
            self.instance_id.clone()
        } else {
            std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "worker".into())
            })
        };
        format!("{}.{}.{}", self.transactional_id_prefix, self.group_id, instance)
    }
}

/// What the output topic promises its readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    AtLeastOnce,
    ExactlyOnce,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodecConfig {
    /// How input values are encoded: avro | confluent | json | auto.
    pub input: WireFormat,
    /// How output events are encoded: avro | confluent | json.
    pub output: WireFormat,
    /// Extra writer schemas (other versions of schemas/conversation.avsc) accepted on input.
    pub input_writer_schemas: Vec<PathBuf>,
    /// Confluent wire format: schema id -> schema file, for input decoding.
    pub confluent_schemas: BTreeMap<u32, PathBuf>,
    /// Confluent wire format: the id EnrichedConversation is registered under, for output.
    pub confluent_output_schema_id: Option<u32>,
    /// A Schema Registry (Confluent REST API): input ids resolve through it (after
    /// `confluent_schemas`), and with `output: confluent` the output schema is registered or
    /// looked up under its subject at start.
    pub schema_registry: Option<SchemaRegistryConfig>,
}

/// How the subject of the output schema is named (Confluent's strategies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// `<topic>-value`
    #[default]
    TopicName,
    /// the record's full name, `dev.convoflow.v1.EnrichedConversation`
    RecordName,
    /// `<topic>-<record full name>`
    TopicRecordName,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// Base URL of the Confluent-compatible API (`http://registry:8081`; Apicurio:
    /// `http://host:8080/apis/ccompat/v7`).
    pub url: String,
    /// HTTP basic auth.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// CA certificate (PEM) of an https registry; unset = the bundled web roots.
    pub ca: Option<PathBuf>,
    pub subject_strategy: SubjectStrategy,
    /// Register the output schema if the subject does not have it (else: look it up, and
    /// refuse to start when it is not registered).
    pub auto_register: bool,
    /// Per request.
    pub timeout_ms: u64,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            username: None,
            password: None,
            ca: None,
            subject_strategy: SubjectStrategy::TopicName,
            auto_register: true,
            timeout_ms: 5_000,
        }
    }
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            input: WireFormat::Auto,
            output: WireFormat::Avro,
            input_writer_schemas: vec![],
            confluent_schemas: BTreeMap::new(),
            confluent_output_schema_id: None,
            schema_registry: None,
        }
    }
}

impl CodecConfig {
    /// The `codec` section's own checks.
    fn validate(&self) -> Result<()> {
        if self.output == WireFormat::Auto {
            bail!("codec.output must be avro, confluent or json");
        }
        if self.output == WireFormat::Confluent
            && self.confluent_output_schema_id.is_none()
            && self.schema_registry.is_none()
        {
            bail!("codec.output = confluent needs codec.schema_registry (or a fixed codec.confluent_output_schema_id)");
        }
        if let Some(r) = &self.schema_registry {
            if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
                bail!("codec.schema_registry.url must be an http:// or https:// URL, got {:?}", r.url);
            }
            if r.password.is_some() && r.username.is_none() {
                bail!("codec.schema_registry.password needs a username");
            }
            if r.timeout_ms == 0 {
                bail!("codec.schema_registry.timeout_ms must be > 0");
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Messages received and not yet completed; above it the partitions are paused.
    pub max_in_flight: usize,
    /// Capacity of the queue between the Kafka source and the enrichment stage.
    pub queue_capacity: usize,
    /// Most messages enriched together in one micro-batch.
    pub max_batch_messages: usize,
    /// Extra time a micro-batch waits to fill (0 = it leaves at once while fewer than
    /// `batches_in_flight` batches are in flight; otherwise when full or when one ends).
    pub max_batch_wait_ms: u64,
    /// Micro-batches prepared (decoded, chunked, tokenized) at the same time.
    pub prepare_workers: usize,
    /// Micro-batches queued on the models ahead of the writer (>= 1; 2+ keeps the GPU busy while
    /// the store and the broker take the previous batch); below this many in flight, a partial
    /// batch leaves at once.
    pub batches_in_flight: usize,
    /// A turn's text over this many bytes sends the message to the DLQ.
    pub max_turn_bytes: usize,
    /// An event with more turns goes to the DLQ (bounds the memory one event can take).
    pub max_turns_per_event: usize,
    /// An event (the encoded message value) over this many bytes goes to the DLQ before it is
    /// decoded; also the Avro decoder's allocation limit.
    pub max_event_bytes: usize,
    /// On SIGTERM/SIGINT: how long in-flight work may take to finish before exit.
    pub shutdown_timeout_ms: u64,
    /// The dead-letter circuit breaker: this many messages in a row bound for the DLQ stop the
    /// worker instead (a systemic fault, not bad data); 0: no limit.
    pub dlq_max_consecutive: usize,
    /// ... or more than this share of the last `dlq_window` messages; 1.0: no limit.
    pub dlq_max_ratio: f64,
    pub dlq_window: usize,
    /// Most bytes (keys + values) of an input record's own headers carried onto its enriched
    /// event and its DLQ copy; headers past it are dropped (in order: each that still fits is
    /// kept), and a `convoflow.headers.dropped` header says how many and how large.
    pub max_carried_header_bytes: usize,
    /// An id (`conversation_id`, `turn_id`, `tenant`, a participant or speaker id) over this
    /// many bytes sends the message to the DLQ (class `validation`): ids are copied into every
    /// point's payload and into the point ids.
    pub max_id_bytes: usize,
    /// What a tombstone without a `tenant` header deletes: the conversation's points in every
    /// tenant (`all_tenants`, the default: log compaction and ordinary producers send no
    /// headers), or only the points written without a tenant (`header_tenant`).
    pub tombstone_scope: TombstoneScope,
    pub chunk: ChunkConfig,
    pub bm25: Bm25Params,
    pub language: LanguageConfig,
}

/// Each turn's language (`pipeline.language`): the event's when the producer set it and it is
/// trusted, otherwise detected from the turn's text; a turn too short or too ambiguous to tell
/// inherits the conversation's majority.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LanguageConfig {
    /// Detect the language of turns the event does not label (false: only the event's field).
    pub detect: bool,
    /// Candidate languages, ISO 639-1 codes (`fr`, `de`, ...); empty: every language this build
    /// knows (`convoflow::language::known()`). Fewer candidates, fewer confusions.
    pub languages: Vec<String>,
    /// Turns with fewer letters than this inherit the conversation's majority language.
    pub min_chars: usize,
    /// Turns whose top language has a lower confidence (0..1, relative to the other
    /// candidates) inherit the majority language.
    pub min_confidence: f32,
    /// The event's `language`, when set, is every turn's language (false: detect anyway, the
    /// event's language only where nothing is detected).
    pub trust_event: bool,
}

impl Default for LanguageConfig {
    fn default() -> Self {
        Self { detect: true, languages: vec![], min_chars: 10, min_confidence: 0.5, trust_event: true }
    }
}

impl LanguageConfig {
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.min_confidence) {
            bail!("pipeline.language.min_confidence must be within 0..1 (is {})", self.min_confidence);
        }
        Ok(())
    }
}

/// BM25 term weighting of the sparse vectors (`pipeline.bm25`).
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Bm25Params {
    pub k1: f32,
    pub b: f32,
    /// Average document length in terms (turn chunks are short: tens of words).
    pub avg_doc_len: f32,
}

impl Default for Bm25Params {
    fn default() -> Self {
        Self { k1: 1.2, b: 0.75, avg_doc_len: 32.0 }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TombstoneScope {
    /// A tombstone without a `tenant` header deletes the conversation in every tenant.
    #[default]
    AllTenants,
    /// Only the tenant its `tenant` header names (none: the points written without a tenant).
    HeaderTenant,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 2_000,
            queue_capacity: 512,
            max_batch_messages: 64,
            max_batch_wait_ms: 0,
            prepare_workers: 2,
            batches_in_flight: 3,
            max_turn_bytes: 1 << 20,
            max_turns_per_event: 10_000,
            dlq_max_consecutive: 1_000,
            dlq_max_ratio: 0.5,
            dlq_window: 1_000,
            max_carried_header_bytes: 64 * 1024,
            max_id_bytes: 1_024,
            tombstone_scope: TombstoneScope::AllTenants,
            max_event_bytes: 8 << 20,
            shutdown_timeout_ms: 8_000,
            chunk: ChunkConfig::default(),
            bm25: Bm25Params::default(),
            language: LanguageConfig::default(),
        }
    }
}

impl PipelineConfig {
    /// The `pipeline` section's own checks.
    fn validate(&self) -> Result<()> {
        let p = self;
        if p.max_in_flight == 0 || p.queue_capacity == 0 || p.max_batch_messages == 0 {
            bail!("pipeline.max_in_flight, queue_capacity and max_batch_messages must be > 0");
        }
        if !(p.dlq_max_ratio > 0.0) || p.dlq_window == 0 {
            bail!("pipeline.dlq_max_ratio must be > 0 (1.0: no limit) and dlq_window > 0");
        }
        if p.max_turns_per_event == 0 || p.max_event_bytes == 0 || p.max_turn_bytes == 0 {
            bail!("pipeline.max_turns_per_event, max_event_bytes and max_turn_bytes must be > 0");
        }
        if p.prepare_workers == 0 || p.batches_in_flight == 0 {
            bail!("pipeline.prepare_workers and batches_in_flight must be > 0");
        }
        if p.chunk.max_tokens == 0 || p.chunk.overlap_tokens >= p.chunk.max_tokens {
            bail!("pipeline.chunk.overlap_tokens must be smaller than max_tokens (> 0)");
        }
        p.language.validate()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChunkConfig {
    pub max_tokens: usize,
    pub overlap_tokens: usize,
    /// tokenizer.json used to count tokens; empty = the built-in word-level tokenizer.
    pub tokenizer: Option<PathBuf>,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        Self { max_tokens: 256, overlap_tokens: 32, tokenizer: None }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// `eager` (load all at start) or `on_demand`.
    pub load_strategy: LoadStrategy,
    pub embedding: Option<ModelConfig>,
    /// One NER model for every language, or several, each for its `languages` (`routing`).
    pub ner: ModelList,
    /// One sentiment model, or several by language, like `ner`.
    pub sentiment: ModelList,
    /// Benchmarks only: zero-cost stand-ins answer instead of the models (placeholder outputs,
    /// real tokenizers), to measure the stages around the models.
    pub stand_in: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadStrategy {
    #[default]
    Eager,
    OnDemand,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model name as on the HuggingFace hub (reported in events).
    pub name: String,
    /// Local HuggingFace folder: config.json, model.safetensors, tokenizer.json.
    pub path: PathBuf,
    /// fp32 | fp16 | bf16 (CUDA); CPU always runs fp32.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Embedding models: text put before every indexed chunk (e5: "passage: "; e5-instruct: "").
    #[serde(default)]
    pub document_prefix: String,
    /// Embedding models: how a search query is written; `{query}` is replaced
    /// (e5: "query: {query}"; e5-instruct: "Instruct: <task>\nQuery: {query}").
    #[serde(default = "default_query_template")]
    pub query_template: String,
    /// The turn languages (ISO 639-1) this model is given, `["*"]` for every language no other
    /// model of its task claims; empty: `["*"]` for a task's only model, refused in a list
    /// (`routing`, docs/models.md "Models by language").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub languages: Vec<String>,
}

/// A task's models: one (a mapping, as before routing existed) or a list, each with its
/// `languages`; null or absent: none.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct ModelList(pub Vec<ModelConfig>);

impl<'de> Deserialize<'de> for ModelList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // by hand, not `#[serde(untagged)]`: an untagged enum answers every mistake inside a
        // model with "did not match any variant"; this keeps the field's own error
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
        struct OneOrMany;
        impl<'de> serde::de::Visitor<'de> for OneOrMany {
            type Value = ModelList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a model (name, path, ...) or a list of models")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> std::result::Result<ModelList, A::Error> {
                Ok(ModelList(vec![ModelConfig::deserialize(MapAccessDeserializer::new(map))?]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> std::result::Result<ModelList, A::Error> {
                Ok(ModelList(Vec::deserialize(SeqAccessDeserializer::new(seq))?))
            }
            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<ModelList, E> {
                Ok(ModelList(vec![]))
            }
            fn visit_none<E: serde::de::Error>(self) -> std::result::Result<ModelList, E> {
                Ok(ModelList(vec![]))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<ModelList, D::Error> {
                d.deserialize_any(OneOrMany)
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

impl ModelList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ModelConfig> {
        self.0.iter()
    }

    /// The first model (the only one of an unrouted task).
    pub fn first(&self) -> Option<&ModelConfig> {
        self.0.first()
    }
}

impl From<Option<ModelConfig>> for ModelList {
    fn from(m: Option<ModelConfig>) -> Self {
        Self(m.into_iter().collect())
    }
}

fn default_query_template() -> String {
    "{query}".into()
}

impl ModelConfig {
    pub fn document_text(&self, text: &str) -> String {
        format!("{}{text}", self.document_prefix)
    }

    pub fn query_text(&self, query: &str) -> String {
        self.query_template.replace("{query}", query)
    }
}

fn default_dtype() -> String {
    "fp16".into()
}
fn default_batch_size() -> usize {
    256
}
fn default_max_batch_tokens() -> usize {
    16_384
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// `auto` (CUDA if present, else CPU), `cpu`, or `cuda:N`.
    pub device: String,
    /// CPU intra-op threads (0 = libtorch default).
    pub cpu_threads: usize,
    /// CUDA: share of the GPU's memory libtorch's caching allocator may hold (0 < f <= 1);
    /// beyond it an allocation fails as out of memory and the batch is split.
    pub memory_fraction: f64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self { device: "auto".into(), cpu_threads: 0, memory_fraction: 0.95 }
    }
}

impl GpuConfig {
    /// The `gpu` section's own checks.
    fn validate(&self) -> Result<()> {
        if !(self.memory_fraction > 0.0 && self.memory_fraction <= 1.0) {
            bail!("gpu.memory_fraction must be in (0, 1], got {}", self.memory_fraction);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// Qdrant's engine in-process (qdrant-edge), persisted in `data_dir`.
    #[default]
    Edge,
    /// A remote Qdrant server or cluster (gRPC).
    Qdrant,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QdrantConfig {
    pub backend: StoreBackend,
    pub collection: String,
    /// edge: the collection lives in `<data_dir>/<collection>`.
    pub data_dir: PathBuf,
    /// edge: an optimization pass (index build, segment merge) is due after this many upserted
    /// points; 0 = never.
    pub edge_optimize_every_points: usize,
    /// edge: a due pass waits until no point was written for this long (the pass takes the
    /// cores a backlog's writes need); 0 = start at once.
    pub edge_optimize_idle_ms: u64,
    /// edge: a due pass starts without a pause once this many points wait for it (a stream
    /// that never pauses still gets its index); 0 = no limit.
    pub edge_optimize_max_deferred_points: usize,
    /// edge: writes wait (the worker unready, partitions paused, retried like an outage) while
    /// the filesystem of `data_dir` has less free space than this: the engine writes through
    /// memory maps, and a full disk would kill the process with SIGBUS (creating a collection
    /// alone preallocates 2 × 32 MiB of WAL). 0 = no check.
    pub edge_min_free_bytes: u64,
    /// qdrant: gRPC endpoint (`https://` for TLS).
    pub url: String,
    pub api_key: Option<Secret>,
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Dense vector dimension; None = the embedding model's hidden size.
    pub dense_dim: Option<usize>,
    /// Keep original dense vectors on disk (memory-mapped).
    pub on_disk_vectors: bool,
    pub quantization: Quantization,
    /// Turn text in the payload: full | none | masked (entities replaced by [LABEL]).
    pub payload_text: PayloadText,
    pub batch: BatchLimits,
    pub retry: RetryPolicy,
}

impl Default for QdrantConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Edge,
            collection: "conversations".into(),
            data_dir: PathBuf::from("./data/qdrant"),
            edge_optimize_every_points: 20_000,
            edge_optimize_idle_ms: 1_000,
            edge_optimize_max_deferred_points: 200_000,
            edge_min_free_bytes: 256 << 20,
            url: "http://127.0.0.1:6334".into(),
            api_key: None,
            timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            dense_dim: None,
            on_disk_vectors: false,
            quantization: Quantization::None,
            payload_text: PayloadText::Full,
            batch: BatchLimits::default(),
            retry: RetryPolicy::default(),
        }
    }
}

impl QdrantConfig {
    /// The `qdrant` section's own checks.
    fn validate(&self) -> Result<()> {
        let q = self;
        if q.collection.is_empty() || q.batch.max_points == 0 {
            bail!("qdrant.collection and batch.max_points must be set (> 0)");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `text` or `json` log lines on stderr.
    pub log_format: String,
    /// Address of /metrics, /healthz, /readyz (port 0: any free port, logged at start).
    pub listen: String,
    /// `/healthz` fails when the Kafka poll loop has not turned for this long.
    pub liveness_poll_stall_ms: u64,
    /// `/healthz` fails when input is in flight and no message completed for this long (not
    /// counted while the worker waits out a store or registry outage). Above the slowest
    /// micro-batch: on a CPU with the three models one takes ~30 s.
    pub liveness_progress_stall_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: "text".into(),
            listen: "127.0.0.1:9464".into(),
            liveness_poll_stall_ms: 15_000,
            liveness_progress_stall_ms: 40_000,
        }
    }
}

impl TelemetryConfig {
    /// The `telemetry` section's own checks.
    fn validate(&self) -> Result<()> {
        if self.liveness_poll_stall_ms == 0 || self.liveness_progress_stall_ms == 0 {
            bail!("telemetry.liveness_poll_stall_ms and liveness_progress_stall_ms must be > 0");
        }
        Ok(())
    }
}

/// The LLM that answers questions (`convoflow ask`, `POST /v1/ask`): any server of the OpenAI
/// chat-completions API (vLLM, llama.cpp's server, TGI, Ollama). Nothing connects to it before
/// the first question; the worker never uses it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Base URL of the OpenAI-compatible API, up to and including `/v1`
    /// (e.g. `http://127.0.0.1:8000/v1`); empty: no LLM configured.
    pub url: String,
    /// The model name the server serves (vLLM: `--served-model-name`, else the model id).
    pub model: String,
    /// Bearer token (vLLM `--api-key`); set CONVOFLOW__LLM__API_KEY, not this file.
    pub api_key: Option<Secret>,
    /// Most tokens generated per answer.
    pub max_tokens: u32,
    pub temperature: f32,
    /// Time for one answer, from sending the prompt to the last token.
    pub timeout_ms: u64,
    /// Time to open the connection.
    pub connect_timeout_ms: u64,
    /// Most time from sending a request to the server's first byte, and the longest silence
    /// inside a streamed answer after it: a server that accepts connections but does not answer
    /// (overloaded, stuck) fails after this, not after `timeout_ms`.
    pub first_token_timeout_ms: u64,
    /// The model's context window (prompt + answer) as the server runs it (vLLM `--max-model-len`).
    pub context_tokens: usize,
    /// `tokenizer.json` of the served model, to count prompt tokens exactly; null: count UTF-8
    /// bytes (an upper bound for byte-level BPE and SentencePiece tokenizers, so the prompt
    /// always fits, with fewer retrieved turns).
    pub tokenizer: Option<PathBuf>,
    /// Sent as a `system` message when set (Mistral-Instruct's chat template refuses a system
    /// role, so by default the instructions are part of `prompt_template`).
    pub system_prompt: Option<String>,
    /// The user message: `{sources}` (the numbered excerpts) and `{question}` are replaced.
    pub prompt_template: String,
    /// One numbered excerpt: `{n}`, `{conversation_id}`, `{turn_id}`, `{speaker}`, `{ts}`,
    /// `{stars}`, `{entities}`, `{text}`.
    pub source_template: String,
    /// Retrieved turns offered to the model (before trimming to the context budget).
    pub top_k: usize,
}

pub const DEFAULT_PROMPT_TEMPLATE: &str = "You answer questions about customer conversations. Use only the numbered \
excerpts below. Cite the excerpts you use by their number in brackets, like [2]. If the excerpts do not contain the \
answer, say that the conversations do not tell. Answer in the language of the question.\n\nExcerpts:\n{sources}\n\n\
Question: {question}";
pub const DEFAULT_SOURCE_TEMPLATE: &str =
    "[{n}] conversation {conversation_id}, turn {turn_id}, {speaker}, {ts} ({stars}; entities: {entities})\n{text}";

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            model: "TheBloke/Mistral-7B-Instruct-v0.2-GPTQ".into(),
            api_key: None,
            max_tokens: 512,
            temperature: 0.2,
            timeout_ms: 120_000,
            connect_timeout_ms: 5_000,
            first_token_timeout_ms: 30_000,
            context_tokens: 8192,
            tokenizer: None,
            system_prompt: None,
            prompt_template: DEFAULT_PROMPT_TEMPLATE.into(),
            source_template: DEFAULT_SOURCE_TEMPLATE.into(),
            top_k: 8,
        }
    }
}

impl LlmConfig {
    /// The `llm` section's own checks.
    fn validate(&self) -> Result<()> {
        let l = self;
        if l.is_configured() {
            if !(l.url.starts_with("http://") || l.url.starts_with("https://")) {
                bail!("llm.url must be an http:// or https:// URL up to /v1 (e.g. http://127.0.0.1:8000/v1), got {:?}", l.url);
            }
            if l.model.trim().is_empty() {
                bail!("llm.model must name the model the server serves");
            }
        }
        if l.max_tokens == 0 || l.top_k == 0 || l.context_tokens <= l.max_tokens as usize + 64 {
            bail!(
                "llm.max_tokens and llm.top_k must be > 0 and llm.context_tokens ({}) must exceed max_tokens ({}) + 64",
                l.context_tokens,
                l.max_tokens
            );
        }
        if !l.prompt_template.contains("{question}") || !l.prompt_template.contains("{sources}") {
            bail!("llm.prompt_template must contain {{sources}} and {{question}}");
        }
        if l.timeout_ms == 0 || l.connect_timeout_ms == 0 {
            bail!("llm.timeout_ms and llm.connect_timeout_ms must be > 0");
        }
        Ok(())
    }
}

impl LlmConfig {
    pub fn is_configured(&self) -> bool {
        !self.url.trim().is_empty()
    }
}

/// A task whose models `convoflow serve` loads (`serve.models`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServedTask {
    Embedding,
    Ner,
    Sentiment,
}

impl ServedTask {
    pub fn as_str(self) -> &'static str {
        match self {
            ServedTask::Embedding => "embedding",
            ServedTask::Ner => "ner",
            ServedTask::Sentiment => "sentiment",
        }
    }
}

/// `serve.models`: a list of tasks, or one string of them separated by commas (an environment
/// variable holds no list).
fn served_tasks<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<ServedTask>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<String>),
        Text(String),
    }
    let names = match Form::deserialize(d)? {
        Form::List(names) => names,
        Form::Text(text) => text.split(',').map(str::to_string).collect(),
    };
    names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .map(|n| ServedTask::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(n)))
        .collect()
}

/// `convoflow serve`: the search/ask HTTP API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address of the API (port 0: any free port, logged at start).
    pub listen: String,
    /// Requests served at once (at least 2), split in two budgets by `ask_share`; a request
    /// whose budget is full waits up to `queue_timeout_ms`, then gets 503.
    pub max_concurrent_requests: usize,
    /// The share of `max_concurrent_requests` for `/v1/ask` (⌊share × max⌋, at least 1, at most
    /// all but one); searches get the rest, so answers waiting on the LLM never take their slots.
    pub ask_share: f64,
    pub queue_timeout_ms: u64,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Time to receive a whole request body (it is read before the request takes a slot);
    /// slower ones get 408 and their connection is closed.
    pub body_timeout_ms: u64,
    /// Most hits one search may ask for (`k`).
    pub max_k: usize,
    /// Tokens waiting on the embedding model's thread for requests not answered yet (queries of
    /// `/v1/search` and `/v1/ask`, inputs of `/v1/embeddings`); a request that would go beyond
    /// gets 429 with `Retry-After: 1`, one larger than all of it 413.
    pub max_queued_tokens: usize,
    /// The models `serve` loads: `embedding` (queries of `/v1/search` and `/v1/ask`,
    /// `/v1/embeddings`), `ner` (`/v1/entities`, every model of `models.ner`, routed by
    /// language as the worker routes turns), `sentiment` (`/v1/sentiment`, `models.sentiment`).
    /// A list, or in one environment variable names separated by commas
    /// (`CONVOFLOW__SERVE__MODELS=ner,sentiment`).
    #[serde(deserialize_with = "served_tasks")]
    pub models: Vec<ServedTask>,
    /// When set, every route but /healthz and /metrics needs `Authorization: Bearer <key>`;
    /// set CONVOFLOW__SERVE__API_KEY, not this file.
    pub api_key: Option<Secret>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_concurrent_requests: 16,
            ask_share: 0.5,
            queue_timeout_ms: 10_000,
            max_body_bytes: 64 * 1024,
            body_timeout_ms: 5_000,
            max_k: 100,
            max_queued_tokens: 65_536,
            models: vec![ServedTask::Embedding],
            api_key: None,
        }
    }
}

impl ServeConfig {
    /// The `serve` section's own checks.
    fn validate(&self) -> Result<()> {
        if self.max_concurrent_requests == 0 || self.max_body_bytes < 256 || self.max_k == 0 {
            bail!("serve.max_concurrent_requests and serve.max_k must be > 0, serve.max_body_bytes >= 256");
        }
        if self.max_queued_tokens < 512 {
            bail!("serve.max_queued_tokens must be at least 512 (one input of the longest models), got {}", self.max_queued_tokens);
        }
        for (i, task) in self.models.iter().enumerate() {
            if self.models[..i].contains(task) {
                bail!("serve.models names {} twice", task.as_str());
            }
        }
        Ok(())
    }
}

/// Environment variables setting one librdkafka property each (`kafka.client`).
const CLIENT_ENV_PREFIX: &str = "CONVOFLOW__KAFKA__CLIENT__";

/// Whether a configuration path (dotted, lower case) holds or may hold a secret.
fn is_secret_path(path: &str) -> bool {
    path.split('.').any(|part| {
        ["security", "sasl", "tls", "api_key", "password", "secret"].contains(&part) || part.ends_with("_password") || part.ends_with("_secret")
    })
}

/// The values set under secret-looking paths, in the file and the environment.
fn secret_values(built: &config::Config, env: &config::Map<String, String>) -> Vec<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    walk(&format!("{prefix}.{}", k.to_lowercase()), v, out);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(prefix, v, out)),
            serde_json::Value::Null => {}
            serde_json::Value::String(s) if is_secret_path(prefix) => out.push(s.clone()),
            other if is_secret_path(prefix) => out.push(other.to_string()),
            _ => {}
        }
    }
    let mut out = vec![];
    if let Ok(tree) = built.clone().try_deserialize::<serde_json::Value>() {
        walk("", &tree, &mut out);
    }
    for (k, v) in env {
        if is_secret_path(&k.to_lowercase().replace("__", ".")) {
            out.push(v.clone());
        }
    }
    out.retain(|v| !v.is_empty());
    out
}

/// `message` with every secret value replaced by `<redacted>`.
fn redact(message: &str, secrets: &[String]) -> String {
    let mut out = message.to_string();
    for secret in secrets {
        // quoted as the config crate and serde quote values; bare too when long enough not to
        // hit ordinary words of the message
        for (open, close) in [("`", "`"), ("\"", "\""), ("'", "'")] {
            out = out.replace(&format!("{open}{secret}{close}"), &format!("{open}<redacted>{close}"));
        }
        if secret.len() >= 6 {
            out = out.replace(secret.as_str(), "<redacted>");
        }
    }
    out
}

impl Config {
    /// Reads `path` (if given) and then `CONVOFLOW__*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Yaml));
        }
        // librdkafka properties are dotted (`fetch.wait.max.ms`), and the config crate reads a
        // dot as a level: `CONVOFLOW__KAFKA__CLIENT__<NAME>` are taken out here and set
        // verbatim, `__` (or `.`) in NAME meaning a dot
        let (client, env): (Vec<(String, String)>, Vec<(String, String)>) =
            env.into_iter().partition(|(k, _)| k.to_ascii_uppercase().starts_with(CLIENT_ENV_PREFIX));
        let env: config::Map<String, String> = env.into_iter().collect();
        builder = builder.add_source(
            config::Environment::with_prefix("CONVOFLOW")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env.clone())),
        );
        let what = || format!("reading configuration{}", path.map(|p| format!(" {}", p.display())).unwrap_or_default());
        let built = builder.build().with_context(what)?;
        let mut cfg: Config = match built.clone().try_deserialize() {
            Ok(cfg) => cfg,
            Err(e) => {
                // a value pasted into the wrong field may be a secret: the error must not show it
                let secrets = secret_values(&built, &env);
                return Err(anyhow::anyhow!("{}", redact(&e.to_string(), &secrets))).with_context(what);
            }
        };
        for (key, value) in client {
            let name = key[CLIENT_ENV_PREFIX.len()..].to_ascii_lowercase().replace("__", ".");
            cfg.kafka.client.insert(name, value);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Each section's own checks (beside its section), then those across sections.
    pub fn validate(&self) -> Result<()> {
        self.telemetry.validate()?;
        self.llm.validate()?;
        self.serve.validate()?;
        if self.llm.top_k > self.serve.max_k {
            bail!("llm.top_k ({}) must not exceed serve.max_k ({}): it is /v1/ask's default k", self.llm.top_k, self.serve.max_k);
        }
        self.kafka.validate()?;
        self.codec.validate()?;
        self.pipeline.validate()?;
        self.gpu.validate()?;
        self.qdrant.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// librdkafka's dotted property names from the environment (before: `invalid type: map`).
    #[test]
    fn dotted_librdkafka_properties_are_set_from_the_environment() {
        let env = [
            ("CONVOFLOW__KAFKA__CLIENT__FETCH__WAIT__MAX__MS".to_string(), "50".to_string()),
            ("CONVOFLOW__KAFKA__CLIENT__queued.min.messages".to_string(), "1000".to_string()),
        ];
        let cfg = Config::load_with_env(None, env).unwrap();
        assert_eq!(cfg.kafka.client["fetch.wait.max.ms"], "50");
        assert_eq!(cfg.kafka.client["queued.min.messages"], "1000");
        assert_eq!(cfg.kafka.client.len(), 2);
        let env = [("CONVOFLOW__KAFKA__CLIENT__SASL__PASSWORD".to_string(), "x".to_string())];
        assert!(Config::load_with_env(None, env).is_err(), "secrets are refused there as before");
    }

    #[test]
    fn serve_models_name_tasks_once() {
        let mut serve = ServeConfig::default();
        assert_eq!(serve.models, [ServedTask::Embedding], "the embedding model alone by default");
        serve.models = vec![ServedTask::Ner, ServedTask::Sentiment, ServedTask::Ner];
        assert!(serve.validate().unwrap_err().to_string().contains("serve.models names ner twice"));
        let path = std::env::temp_dir().join(format!("convoflow-serve-models-{}.yaml", std::process::id()));
        std::fs::write(&path, "serve: { models: [embedding, ner, sentiment] }").unwrap();
        assert_eq!(Config::load_with_env(Some(&path), []).unwrap().serve.models.len(), 3);
        std::fs::write(&path, "serve: { models: [ner, translation] }").unwrap();
        let e = format!("{:#}", Config::load_with_env(Some(&path), []).unwrap_err());
        assert!(e.contains("serve.models") && e.contains("translation"), "{e}");
        let env = [("CONVOFLOW__SERVE__MODELS".to_string(), "ner, sentiment".to_string())];
        assert_eq!(Config::load_with_env(None, env).unwrap().serve.models, [ServedTask::Ner, ServedTask::Sentiment]);
        let env = [("CONVOFLOW__SERVE__MODELS".to_string(), "ner,translation".to_string())];
        let e = format!("{:#}", Config::load_with_env(None, env).unwrap_err());
        assert!(e.contains("translation"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn redaction_hides_quoted_and_long_values_only() {
        let secrets = vec!["hunter2".to_string(), "ab".to_string()];
        let out = redact("unknown variant `hunter2`, expected `ab` or \"ab\" in about", &secrets);
        assert_eq!(out, "unknown variant `<redacted>`, expected `<redacted>` or \"<redacted>\" in about");
        assert!(is_secret_path(".kafka.security.sasl.mechanism") && is_secret_path("llm.api_key"));
        assert!(!is_secret_path("llm.tokenizer") && !is_secret_path("pipeline.tombstone_scope"));
    }

    #[test]
    fn example_config_parses_and_env_overrides_it() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("convoflow.yaml");
        let file_only = Config::load_with_env(Some(&path), []).unwrap();
        assert_eq!(file_only.models.embedding.as_ref().unwrap().name, "intfloat/multilingual-e5-large-instruct");
        let env = [
            ("CONVOFLOW__KAFKA__BROKERS".to_string(), "10.0.0.1:9092".to_string()),
            ("CONVOFLOW__PIPELINE__MAX_IN_FLIGHT".to_string(), "7".to_string()),
            ("CONVOFLOW__CODEC__INPUT".to_string(), "json".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let cfg = Config::load_with_env(Some(&path), env).unwrap();
        assert_eq!(cfg.kafka.brokers, "10.0.0.1:9092");
        assert_eq!(cfg.pipeline.max_in_flight, 7);
        assert_eq!(cfg.codec.input, WireFormat::Json);
        assert_eq!(cfg.kafka.group_id, file_only.kafka.group_id, "untouched keys keep the file's value");
        let ner: Vec<(&str, &[String])> = file_only.models.ner.iter().map(|m| (m.name.as_str(), m.languages.as_slice())).collect();
        assert_eq!(ner.len(), 2, "the reference set-up routes NER by language: {ner:?}");
        assert_eq!(ner[0], ("camembert/camembert-ner", &["fr".to_string()][..]));
        assert_eq!(ner[1].1, ["*".to_string()]);
        assert_eq!(file_only.models.sentiment.first().map(|m| m.languages.len()), Some(6));
        let e5 = file_only.models.embedding.unwrap();
        assert_eq!(e5.document_text("hello"), "hello");
        assert_eq!(
            e5.query_text("refund?"),
            "Instruct: Given a customer question, retrieve conversation turns that answer it\nQuery: refund?"
        );
    }

    #[test]
    fn a_task_takes_one_model_a_list_or_none() {
        let dir = std::env::temp_dir().join(format!("convoflow-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |yaml: &str| {
            let path = dir.join("c.yaml");
            std::fs::write(&path, yaml).unwrap();
            Config::load_with_env(Some(&path), [])
        };
        let one = load("models:\n  ner: {name: a, path: /a}\n").unwrap();
        assert_eq!(one.models.ner.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["a"]);
        let list = load("models:\n  ner:\n    - {name: a, path: /a, languages: [fr]}\n    - {name: b, path: /b, languages: ['*']}\n").unwrap();
        assert_eq!(list.models.ner.iter().map(|m| m.languages.join(",")).collect::<Vec<_>>(), ["fr", "*"]);
        assert!(load("models:\n  ner: null\n").unwrap().models.ner.is_empty());
        assert!(load("models: {}\n").unwrap().models.sentiment.is_empty());
        // a mistake inside a model is named, not hidden behind "one or a list"
        let typo = load("models:\n  ner:\n    - {name: a, path: /a, langauges: [fr]}\n").unwrap_err();
        assert!(format!("{typo:#}").contains("langauges"), "{typo:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_configs_are_refused_clearly() {
        let err = Config::load_with_env(Some(Path::new("/nonexistent.yaml")), []).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
        let same = [
            ("CONVOFLOW__KAFKA__INPUT_TOPIC".to_string(), "a".to_string()),
            ("CONVOFLOW__KAFKA__OUTPUT_TOPIC".to_string(), "a".to_string()),
        ];
        assert!(Config::load_with_env(None, same).is_err());
        let unknown = [("CONVOFLOW__KAFKA__BROKRES".to_string(), "x".to_string())];
        let err = format!("{:#}", Config::load_with_env(None, unknown).unwrap_err());
        assert!(err.contains("brokres"), "{err}");
        assert_eq!(Config::default().kafka.dlq_topic(), "conversations.dlq");
    }

    /// `kafka.delivery` from the environment; exactly-once's own settings are checked, and the
    /// transactional id is the prefix, the group and the instance.
    #[test]
    fn exactly_once_is_configured_and_checked() {
        let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let cfg = Config::load_with_env(
            None,
            env(&[("CONVOFLOW__KAFKA__DELIVERY", "exactly_once"), ("CONVOFLOW__KAFKA__INSTANCE_ID", "convoflow-0")]),
        )
        .unwrap();
        assert_eq!(cfg.kafka.delivery, Delivery::ExactlyOnce);
        assert_eq!(cfg.kafka.transactional_id(), "convoflow.convoflow.convoflow-0");
        assert_eq!(Config::default().kafka.delivery, Delivery::AtLeastOnce, "at-least-once stays the default");
        let refused = [
            env(&[("CONVOFLOW__KAFKA__DELIVERY", "exactly_once"), ("CONVOFLOW__KAFKA__TRANSACTION_MAX_MESSAGES", "0")]),
            env(&[("CONVOFLOW__KAFKA__DELIVERY", "exactly_once"), ("CONVOFLOW__KAFKA__CLIENT__TRANSACTIONAL_ID", "x")]),
            env(&[
                ("CONVOFLOW__KAFKA__DELIVERY", "exactly_once"),
                ("CONVOFLOW__KAFKA__CLIENT__PARTITION_ASSIGNMENT_STRATEGY", "cooperative-sticky"),
            ]),
            env(&[("CONVOFLOW__KAFKA__DELIVERY", "exactly-twice")]),
        ];
        for r in refused {
            assert!(Config::load_with_env(None, r.clone()).is_err(), "{r:?}");
        }
    }

    /// Secrets from the environment land in `kafka.security`; every report of them says only
    /// "set"; SASL without a password is refused.
    #[test]
    fn security_from_the_environment_is_reported_without_secrets() {
        let env = [
            ("CONVOFLOW__KAFKA__SECURITY__PROTOCOL", "sasl_ssl"),
            ("CONVOFLOW__KAFKA__SECURITY__SASL__MECHANISM", "SCRAM-SHA-256"),
            ("CONVOFLOW__KAFKA__SECURITY__SASL__USERNAME", "svc"),
            ("CONVOFLOW__KAFKA__SECURITY__SASL__PASSWORD", "pw-0123456789"),
            ("CONVOFLOW__KAFKA__SECURITY__TLS__CA", "/etc/ca.pem"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg = Config::load_with_env(None, env.clone()).unwrap();
        let s = &cfg.kafka.security;
        assert_eq!((s.protocol, s.sasl.mechanism), (SecurityProtocol::SaslSsl, SaslMechanism::ScramSha256));
        let props = s.client_properties();
        assert!(props.contains(&("sasl.password", "pw-0123456789".to_string())));
        assert!(props.contains(&("sasl.mechanism", "SCRAM-SHA-256".to_string())));
        assert!(props.contains(&("ssl.ca.location", "/etc/ca.pem".to_string())));
        let described = s.describe();
        assert!(described.contains("password set") && described.contains("svc"), "{described}");
        for shown in [described, format!("{cfg:?}"), serde_json::to_string(&cfg).unwrap()] {
            assert!(!shown.contains("pw-0123456789"), "{shown}");
        }
        let without: Vec<_> = env.into_iter().filter(|(k, _)| !k.ends_with("PASSWORD")).collect();
        let err = format!("{:#}", Config::load_with_env(None, without).unwrap_err());
        assert!(err.contains("sasl.password"), "{err}");
    }
}

// Settings of the vector store, defined here (the store reads its configuration; the
// configuration does not depend on the store). Their behaviour lives in `sink::store`.

/// Optional compression of the dense vectors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    #[default]
    None,
    /// int8 scalar quantization (quantile 0.99, kept in RAM), originals rescored.
    Scalar,
}

/// How much of a turn's text goes into the payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadText {
    /// The chunk's text as is.
    #[default]
    Full,
    /// No text (the search table then shows no snippet).
    None,
    /// The chunk's text with each recognised entity replaced by `[LABEL]`.
    Masked,
}

/// Retries of transient vector-store errors (`qdrant.retry`); the backoff is `sink::store::writer`'s.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts per call, the first included; 0: no limit.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// How long one call may keep retrying transient errors, from its first attempt; unset: no
    /// limit. (qdrant-client itself retries a timed-out request once on a fresh channel, so one
    /// attempt can take up to twice `qdrant.timeout_ms`.)
    pub max_elapsed_ms: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 0, initial_backoff_ms: 100, max_backoff_ms: 10_000, max_elapsed_ms: None }
    }
}

/// Upsert batches (`qdrant.batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchLimits {
    pub max_points: usize,
    /// Approximate request size (vectors + payload).
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self { max_points: 256, max_bytes: 8 << 20 }
    }
}

