//! Helpers for integration tests against a real Kafka broker (started by scripts/test, which
//! exports KAFKA_BROKERS). Every test uses its own topics and group ids.

#![allow(dead_code)]

pub mod flaky_store;
pub mod prometheus;
pub mod routed;
pub mod serving;
pub mod scene;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoflow::codec::{RecordCodec, WireFormat};
use convoflow::event::{Conversation, EnrichedConversation};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// Configuration of an in-process test worker on `topics`: the test broker, any free telemetry
/// port, its own embedded store, CPU.
pub fn in_process_config(topics: &Topics) -> convoflow::config::Config {
    let mut cfg = convoflow::config::Config::default();
    cfg.kafka.brokers = brokers();
    cfg.kafka.input_topic = topics.input.clone();
    cfg.kafka.output_topic = topics.output.clone();
    cfg.kafka.group_id = topics.group.clone();
    cfg.kafka.session_timeout_ms = 6_000;
    cfg.telemetry.listen = "127.0.0.1:0".into();
    cfg.qdrant.data_dir = store_dir(&topics.group, "in-process");
    cfg.gpu.device = "cpu".into();
    cfg
}

/// Environment of a `convoflow run` process with the three CPU models of the test fixtures
/// (all-MiniLM-L6-v2's real weights, the camembert-ner and nlptown architectures with random
/// weights), plus `extra` settings.
pub fn cpu_models_env(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let fixtures = serving::env_path("CONVOFLOW_MODEL_FIXTURES");
    let path = |p: PathBuf| p.to_str().unwrap().to_string();
    let mut env: Vec<(String, String)> = [
        ("CONVOFLOW__GPU__DEVICE", "cpu".to_string()),
        ("CONVOFLOW__QDRANT__DENSE_DIM", "384".into()),
        ("CONVOFLOW__MODELS__EMBEDDING__NAME", "sentence-transformers/all-MiniLM-L6-v2".into()),
        ("CONVOFLOW__MODELS__EMBEDDING__PATH", path(serving::env_path("CONVOFLOW_MINILM"))),
        ("CONVOFLOW__MODELS__NER__NAME", "camembert-ner architecture (random, untrained)".into()),
        ("CONVOFLOW__MODELS__NER__PATH", path(fixtures.join("ner-camembert"))),
        ("CONVOFLOW__MODELS__SENTIMENT__NAME", "nlptown architecture (random, untrained)".into()),
        ("CONVOFLOW__MODELS__SENTIMENT__PATH", path(fixtures.join("sentiment-bert"))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// The embedded-store directory of a test worker (under cargo's per-target temp dir).
pub fn store_dir(group: &str, worker: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stores").join(group).join(worker)
}

/// The broker every helper (and every worker started by `Worker::start`) uses: the one a
/// test started for itself (`use_brokers`), else the shared one scripts/test started.
pub fn brokers() -> String {
    if let Some(own) = BROKERS.read().unwrap().clone() {
        return own;
    }
    std::env::var("KAFKA_BROKERS")
        .expect("KAFKA_BROKERS is not set: run the tests with scripts/test, which starts a real Kafka broker")
}

static BROKERS: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// Points every helper of this test binary at `addr` (None: back to the shared broker). Only for
/// binaries whose tests run one at a time (tests/chaos.rs holds a lock for that).
pub fn use_brokers(addr: Option<String>) {
    *BROKERS.write().unwrap() = addr;
}

/// A broker of a test's own (`scripts/kafka` on any free loopback port, its own state dir), for
/// tests that stop and restart it; stopped (by the PID the script wrote) on drop.
pub struct OwnBroker {
    pub addr: String,
    state: PathBuf,
}

impl OwnBroker {
    pub fn start(name: &str) -> Self {
        let state = std::env::temp_dir().join(unique(&format!("convoflow-kafka-{name}")));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let out = Self::script(&state, &["start", &port.to_string()]);
        let addr = out.lines().find_map(|l| l.strip_prefix("KAFKA_BROKERS=")).expect("scripts/kafka prints the address").to_string();
        Self { addr, state }
    }

    fn script(state: &std::path::Path, args: &[&str]) -> String {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(root.join("scripts/kafka")).args(args).env("KAFKA_STATE", state).output().expect("running scripts/kafka");
        assert!(out.status.success(), "scripts/kafka {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Stops the broker process, keeping its data.
    pub fn halt(&self) {
        Self::script(&self.state, &["halt"]);
    }

    /// Freezes the broker process (SIGSTOP): its connections stay open and nothing answers, so
    /// requests wait for their timeouts instead of failing at once (`thaw` resumes it).
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// Signals the broker process this broker's script started (its PID file).
    fn signal(&self, sig: &str) {
        let pid = std::fs::read_to_string(self.state.join("pid")).expect("the broker's PID file");
        let status = Command::new("kill").args([format!("-{sig}"), pid.trim().to_string()]).status().expect("kill");
        assert!(status.success(), "kill -{sig} {}", pid.trim());
    }

    /// Starts it again on the same data and port; returns once it serves.
    pub fn restart(&self) {
        Self::script(&self.state, &["restart"]);
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new(root.join("scripts/kafka")).arg("stop").env("KAFKA_STATE", &self.state).output();
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    format!("{prefix}-{}-{now}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

fn client() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers());
    c
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client().create().unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let res = admin.create_topics([&topic], &AdminOptions::new()).await.unwrap();
    res[0].as_ref().unwrap_or_else(|e| panic!("creating {name}: {e:?}"));
}

/// Creates a topic with topic-level settings (e.g. `max.message.bytes`).
pub async fn create_topic_with(name: &str, partitions: i32, settings: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = client().create().unwrap();
    let topic = settings.iter().fold(NewTopic::new(name, partitions, TopicReplication::Fixed(1)), |t, (k, v)| t.set(k, v));
    let res = admin.create_topics([&topic], &AdminOptions::new()).await.unwrap();
    res[0].as_ref().unwrap_or_else(|e| panic!("creating {name}: {e:?}"));
}

pub fn producer() -> FutureProducer {
    client()
        .set("enable.idempotence", "true")
        .set("message.max.bytes", (16 * 1024 * 1024).to_string())
        .create()
        .unwrap()
}

/// Produces raw records in order; returns (partition, offset) of each.
pub async fn produce_raw(topic: &str, records: &[(Option<Vec<u8>>, Option<Vec<u8>>)]) -> Vec<(i32, i64)> {
    let p = producer();
    let mut futures = Vec::new();
    for (key, payload) in records {
        let mut r = FutureRecord::<[u8], [u8]>::to(topic);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(v) = payload {
            r = r.payload(v);
        }
        futures.push(p.send_result(r).map_err(|(e, _)| e).unwrap());
    }
    let mut out = Vec::new();
    for f in futures {
        let d = f.await.unwrap().map_err(|(e, _)| e).unwrap();
        out.push((d.partition, d.offset));
    }
    out
}

/// Produces one record with headers; returns its (partition, offset).
pub async fn produce_with_headers(topic: &str, key: &[u8], payload: &[u8], headers: &[(&str, &str)]) -> (i32, i64) {
    let h = headers.iter().fold(rdkafka::message::OwnedHeaders::new(), |h, (k, v)| {
        h.insert(rdkafka::message::Header { key: k, value: Some(*v) })
    });
    let record = FutureRecord::<[u8], [u8]>::to(topic).key(key).payload(payload).headers(h);
    let d = producer().send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    (d.partition, d.offset)
}

/// Produces a tombstone (null value) with headers; returns its (partition, offset).
pub async fn produce_tombstone(topic: &str, key: &[u8], headers: &[(&str, &str)]) -> (i32, i64) {
    let h = headers.iter().fold(rdkafka::message::OwnedHeaders::new(), |h, (k, v)| {
        h.insert(rdkafka::message::Header { key: k, value: Some(*v) })
    });
    let record = FutureRecord::<[u8], [u8]>::to(topic).key(key).headers(h);
    let d = producer().send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    (d.partition, d.offset)
}

/// Runs the worker in-process until `done` holds (checked every 200 ms off the runtime, it
/// reads Kafka), the worker stops by itself, or `timeout`; then stops it and returns its result.
pub async fn run_until(
    cfg: convoflow::config::Config,
    store: Arc<dyn convoflow::sink::store::VectorStore>,
    timeout: Duration,
    done: impl Fn() -> bool + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = tokio::spawn(convoflow::worker::run_with_store(cfg, stop.clone(), store));
    let done = Arc::new(done);
    let started = Instant::now();
    while !worker.is_finished() && started.elapsed() < timeout {
        let check = done.clone();
        if tokio::task::spawn_blocking(move || check()).await.unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(20), worker).await.expect("the worker stops").expect("no panic")
}

/// An in-process worker running until `stop` is called.
pub struct Member {
    stop: Arc<std::sync::atomic::AtomicBool>,
    run: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Member {
    pub fn start(cfg: convoflow::config::Config, store: Arc<dyn convoflow::sink::store::VectorStore>) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let run = tokio::spawn(convoflow::worker::run_with_store(cfg, stop.clone(), store));
        Self { stop, run }
    }

    /// Stops it and expects a clean exit within 30 s.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(30), self.run).await.expect("the worker stops").expect("no panic").unwrap();
    }
}

/// A model-free member of `topics`' group that pauses at once when its store stalls
/// (`max_in_flight` 4), with a short shutdown.
pub fn pausing_member_config(topics: &Topics) -> convoflow::config::Config {
    let mut cfg = in_process_config(topics);
    cfg.qdrant.dense_dim = Some(8);
    cfg.pipeline.max_in_flight = 4;
    cfg.pipeline.shutdown_timeout_ms = 3_000;
    cfg
}

/// Another member like `cfg`, with its own embedded store.
pub fn second_member_config(cfg: &convoflow::config::Config, topics: &Topics) -> convoflow::config::Config {
    let mut b = cfg.clone();
    b.qdrant.data_dir = store_dir(&topics.group, "member-b");
    b
}

/// Waits (checking off the runtime every 250 ms: `check` may read Kafka) until `check` holds;
/// panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, check: impl Fn() -> bool + Send + Sync + Clone + 'static) {
    let started = Instant::now();
    loop {
        let c = check.clone();
        if tokio::task::spawn_blocking(move || c()).await.unwrap() {
            return;
        }
        assert!(started.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Throttled worker settings (4 messages in flight, batches of 2) so a run lasts long enough
/// to be interrupted mid-way.
pub const SLOW: &[(&str, &str)] = &[
    ("CONVOFLOW__PIPELINE__MAX_IN_FLIGHT", "4"),
    ("CONVOFLOW__PIPELINE__MAX_BATCH_MESSAGES", "2"),
    ("CONVOFLOW__PIPELINE__QUEUE_CAPACITY", "2"),
];

/// The events of `conversations` sample conversations (several events each).
pub fn sample_events(seed: u64, conversations: u64) -> Vec<Conversation> {
    let g = convoflow::sample::SampleGenerator::new(seed);
    (0..conversations).flat_map(|n| g.conversation_events(n)).collect()
}

/// Waits until `topics`' group has committed everything of its input (lag 0 on every partition).
pub async fn wait_for_lag_zero(topics: &Topics, timeout: Duration) {
    let (group, input) = (topics.group.clone(), topics.input.clone());
    wait_until("lag 0", timeout, move || lag(&group, &input).values().all(|&l| l == 0)).await;
}

/// Avro-encodes conversations and produces them keyed by conversation id.
pub async fn produce_conversations(topic: &str, events: &[Conversation]) -> Vec<(i32, i64)> {
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let records: Vec<_> = events
        .iter()
        .map(|e| (Some(e.conversation_id.clone().into_bytes()), Some(codec.encode(e).unwrap())))
        .collect();
    produce_raw(topic, &records).await
}

#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    pub fn enriched(&self) -> EnrichedConversation {
        let codec = RecordCodec::<EnrichedConversation>::new(WireFormat::Avro).unwrap();
        codec.decode(self.payload.as_ref().expect("not a tombstone")).unwrap()
    }
}

/// Partition count of a topic, waiting up to `timeout` for it to exist (the worker creates
/// its output and DLQ topics when it starts).
pub fn wait_partition_count(topic: &str, timeout: Duration) -> i32 {
    let c: BaseConsumer = client().create().unwrap();
    let started = Instant::now();
    loop {
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let n = md.topics().first().filter(|t| t.error().is_none()).map_or(0, |t| t.partitions().len() as i32);
        if n > 0 {
            return n;
        }
        assert!(started.elapsed() < timeout, "topic {topic} does not exist after {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn partition_count(topic: &str) -> i32 {
    wait_partition_count(topic, Duration::from_secs(60))
}

/// Reads a topic from the beginning until `at_least` records arrived (or `timeout`), then keeps
/// reading for `settle` to catch any extra (duplicate) records.
pub fn read_topic(topic: &str, at_least: usize, timeout: Duration, settle: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = client()
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        // as a downstream consumer reads (librdkafka's default, said here): records of open or
        // aborted transactions are never returned
        .set("isolation.level", "read_committed")
        .set("fetch.message.max.bytes", (16 * 1024 * 1024).to_string())
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partition_count(topic) {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut settle_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if settle_until.is_some_and(|s| now >= s) || (settle_until.is_none() && now >= deadline) {
            break;
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
        if settle_until.is_none() && out.len() >= at_least {
            settle_until = Some(Instant::now() + settle);
        }
    }
    out
}

/// Committed offset per partition of `group` on `topic` (-1001 = none), read by a separate,
/// unsubscribed consumer; retried for up to 30 s while the group coordinator settles (a broker
/// just restarted or thawed answers NOT_COORDINATOR or COORDINATOR_LOAD_IN_PROGRESS for a while).
pub fn committed(group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = client().set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partition_count(topic) {
        tpl.add_partition(topic, p);
    }
    let got = retried(&format!("committed offsets of {group} on {topic}"), Duration::from_secs(30), || {
        consumer.committed_offsets(tpl.clone(), Duration::from_secs(10))
    });
    got.elements().iter().map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1))).collect()
}

pub fn high_watermarks(topic: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = client().create().unwrap();
    (0..partition_count(topic)).map(|p| (p, watermarks(&consumer, topic, p).1)).collect()
}

/// A partition's (low, high) watermarks; retried for up to 10 s while the cluster's metadata
/// settles (a topic just created can answer "not leader for partition" for a moment).
fn watermarks(consumer: &BaseConsumer, topic: &str, partition: i32) -> (i64, i64) {
    retried(&format!("watermarks of {topic}[{partition}]"), Duration::from_secs(10), || {
        consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))
    })
}

/// `call`'s value, the call retried every 200 ms while it fails for up to `within` (a broker's
/// metadata or group coordinator settling); panics with `what` and the last error after that.
fn retried<T>(what: &str, within: Duration, mut call: impl FnMut() -> rdkafka::error::KafkaResult<T>) -> T {
    let started = Instant::now();
    loop {
        match call() {
            Ok(value) => return value,
            Err(_) if started.elapsed() < within => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Lag per partition: high watermark minus committed offset.
/// Records in `topic` now (high − low watermark over its partitions): an exact count that does
/// not depend on how fast a reader fetches.
pub fn records_in(topic: &str) -> i64 {
    let c: BaseConsumer = client().create().unwrap();
    (0..partition_count(topic))
        .map(|p| {
            let (low, high) = watermarks(&c, topic, p);
            high - low
        })
        .sum()
}

pub fn lag(group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let committed = committed(group, topic);
    high_watermarks(topic).into_iter().map(|(p, high)| (p, high - committed[&p].max(0))).collect()
}

/// A `convoflow run` process with its stderr collected.
pub struct Worker {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    pub name: String,
}

pub struct Topics {
    pub input: String,
    pub output: String,
    pub group: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        let input = unique(prefix);
        Self { output: format!("{input}.out"), group: format!("{input}.group"), input }
    }
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.input)
    }
}

impl Worker {
    /// Starts `convoflow run -c convoflow.yaml` on the topics, with extra env overrides.
    pub fn start(name: &str, topics: &Topics, extra_env: &[(&str, &str)]) -> Worker {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_convoflow"));
        cmd.args(["run", "-c"])
            .arg(root.join("tests/data/worker.yaml"))
            .env("CONVOFLOW__KAFKA__BROKERS", brokers())
            .env("CONVOFLOW__KAFKA__INPUT_TOPIC", &topics.input)
            .env("CONVOFLOW__KAFKA__OUTPUT_TOPIC", &topics.output)
            .env("CONVOFLOW__KAFKA__GROUP_ID", &topics.group)
            .env("CONVOFLOW__KAFKA__SESSION_TIMEOUT_MS", "6000")
            .env("CONVOFLOW_LOG", "info,rdkafka=warn,qdrant_edge=error")
            // Each worker its own embedded store (edge locks its directory); a restarted
            // worker with the same name reopens it. No model folder: the size is given.
            .env("CONVOFLOW__QDRANT__DATA_DIR", store_dir(&topics.group, name))
            .env("CONVOFLOW__QDRANT__DENSE_DIM", "8")
            .env("CONVOFLOW__TELEMETRY__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting convoflow run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("CONVOFLOW_TEST_ECHO").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Worker { child, log, name: name.to_string() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap();
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits for exit up to `timeout`; returns the exit code (None if killed by a signal) and
    /// the time it took, or panics (after killing it) if it did not exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("{} did not exit within {timeout:?}; log:\n{}", self.name, self.log_text());
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Partition lists of every "partitions assigned" log line so far.
    pub fn assignments(&self) -> Vec<Vec<i32>> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("partitions assigned"))
            .map(|l| {
                let list = l.split("partitions=").nth(1).unwrap_or("");
                list.split(',').filter_map(|tp| tp.rsplit('[').next()?.trim_end_matches(']').parse().ok()).collect()
            })
            .collect()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} never logged {needle:?} within {timeout:?}; log:\n{}", self.name, self.log_text());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // never leave a worker behind, whatever the test outcome
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Output records grouped by their source (partition, offset).
pub fn by_source(records: &[Record]) -> HashMap<(i32, i64), Vec<EnrichedConversation>> {
    let mut map: HashMap<(i32, i64), Vec<EnrichedConversation>> = HashMap::new();
    for r in records {
        let e = r.enriched();
        map.entry((e.source.partition, e.source.offset)).or_default().push(e);
    }
    map
}

/// Counts output records until `expected` distinct sources are seen or `timeout` passes.
pub fn wait_for_distinct_sources(topic: &str, expected: usize, timeout: Duration) -> Vec<Record> {
    let started = Instant::now();
    loop {
        let records = read_topic(topic, expected, Duration::from_secs(3), Duration::from_millis(300));
        let distinct = by_source(&records).len();
        if distinct >= expected || started.elapsed() > timeout {
            return records;
        }
    }
}

/// (status code, body) of `GET path`, or None while nothing listens.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    std::io::Write::write_all(&mut s, format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut response = String::new();
    std::io::Read::read_to_string(&mut s, &mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}
