//! Configuration: a YAML file (see `convoflow.yaml`, every key documented there) with
//! environment overrides `CONVOFLOW__SECTION__KEY=value` (double underscore between levels).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::codec::WireFormat;
use crate::pipeline::bm25::Bm25Params;
use crate::sink::store::Quantization;
use crate::sink::store::points::PayloadText;
use crate::sink::store::writer::{BatchLimits, RetryPolicy};

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
    /// Extra librdkafka properties for consumer and producer (e.g. security.protocol).
    pub client: BTreeMap<String, String>,
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
            client: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    pub fn dlq_topic(&self) -> String {
        if self.dlq_topic.is_empty() { format!("{}.dlq", self.input_topic) } else { self.dlq_topic.clone() }
    }
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
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            input: WireFormat::Auto,
            output: WireFormat::Avro,
            input_writer_schemas: vec![],
            confluent_schemas: BTreeMap::new(),
            confluent_output_schema_id: None,
        }
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
    /// On SIGTERM/SIGINT: how long in-flight work may take to finish before exit.
    pub shutdown_timeout_ms: u64,
    pub chunk: ChunkConfig,
    pub bm25: Bm25Params,
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
            shutdown_timeout_ms: 8_000,
            chunk: ChunkConfig::default(),
            bm25: Bm25Params::default(),
        }
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
    pub ner: Option<ModelConfig>,
    pub sentiment: Option<ModelConfig>,
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
    /// edge: run an optimization pass (index build, segment merge) after this many upserted
    /// points; 0 = never.
    pub edge_optimize_every_points: usize,
    /// qdrant: gRPC endpoint (`https://` for TLS).
    pub url: String,
    pub api_key: Option<String>,
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `text` or `json` log lines on stderr.
    pub log_format: String,
    /// Address of /metrics, /healthz, /readyz (port 0: any free port, logged at start).
    pub listen: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_format: "text".into(), listen: "127.0.0.1:9464".into() }
    }
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
        let env: config::Map<String, String> = env.into_iter().collect();
        builder = builder.add_source(
            config::Environment::with_prefix("CONVOFLOW")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let cfg: Config = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .with_context(|| format!("reading configuration{}", path.map(|p| format!(" {}", p.display())).unwrap_or_default()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() || k.group_id.is_empty() || k.input_topic.is_empty() || k.output_topic.is_empty() {
            bail!("kafka.brokers, group_id, input_topic and output_topic must be set");
        }
        if k.input_topic == k.output_topic || k.dlq_topic() == k.input_topic {
            bail!("kafka.output_topic and the dead-letter topic must differ from input_topic");
        }
        if self.codec.output == WireFormat::Auto {
            bail!("codec.output must be avro, confluent or json");
        }
        if self.codec.output == WireFormat::Confluent && self.codec.confluent_output_schema_id.is_none() {
            bail!("codec.output = confluent needs codec.confluent_output_schema_id");
        }
        let p = &self.pipeline;
        if p.max_in_flight == 0 || p.queue_capacity == 0 || p.max_batch_messages == 0 {
            bail!("pipeline.max_in_flight, queue_capacity and max_batch_messages must be > 0");
        }
        if p.prepare_workers == 0 || p.batches_in_flight == 0 {
            bail!("pipeline.prepare_workers and batches_in_flight must be > 0");
        }
        if !(self.gpu.memory_fraction > 0.0 && self.gpu.memory_fraction <= 1.0) {
            bail!("gpu.memory_fraction must be in (0, 1], got {}", self.gpu.memory_fraction);
        }
        if p.chunk.max_tokens == 0 || p.chunk.overlap_tokens >= p.chunk.max_tokens {
            bail!("pipeline.chunk.overlap_tokens must be smaller than max_tokens (> 0)");
        }
        let q = &self.qdrant;
        if q.collection.is_empty() || q.batch.max_points == 0 || q.retry.max_attempts == 0 {
            bail!("qdrant.collection, batch.max_points and retry.max_attempts must be set (> 0)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e5 = file_only.models.embedding.unwrap();
        assert_eq!(e5.document_text("hello"), "hello");
        assert_eq!(
            e5.query_text("refund?"),
            "Instruct: Given a customer question, retrieve conversation turns that answer it\nQuery: refund?"
        );
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
}
