//! Interop with implementations convoflow did not write: fastavro (single-object encoding,
//! fingerprints) and confluent-kafka's AvroSerializer/AvroDeserializer with a real Schema
//! Registry (Apicurio, Confluent-compatible API) and the real broker. scripts/test starts the
//! broker and the registry and exports KAFKA_BROKERS, SCHEMA_REGISTRY_URL and
//! CONVOFLOW_INTEROP_PY (the Python environment with the third-party clients).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use convoflow::codec::{RecordCodec, WireFormat, parsing_canonical_form, schema_fingerprint};
use convoflow::config::{Config, SchemaRegistryConfig};
use convoflow::event::{Conversation, EnrichedConversation};
use convoflow::sample::SampleGenerator;
use convoflow::worker;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

const CONVERSATION: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/conversation.avsc");
const ENRICHED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/enriched_conversation.avsc");
/// The output schema before issue 26 (no per-turn language).
const ENRICHED_V1: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/enriched_conversation.v1.avsc");
const ENRICHED_V2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/enriched_conversation.v2.avsc");

fn interop_py() -> String {
    std::env::var("CONVOFLOW_INTEROP_PY").expect("CONVOFLOW_INTEROP_PY is not set: run the tests with scripts/test")
}

fn registry_url() -> String {
    std::env::var("SCHEMA_REGISTRY_URL").expect("SCHEMA_REGISTRY_URL is not set: run the tests with scripts/test")
}

/// Runs scripts/fixtures/interop.py with `args`, `stdin` fed in; its stdout lines.
fn py(args: &[&str], stdin: &str) -> Vec<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fixtures/interop.py");
    let mut child = Command::new(interop_py())
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the interop Python");
    let mut input = child.stdin.take().unwrap();
    let text = stdin.to_string();
    let writer = std::thread::spawn(move || input.write_all(text.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "interop.py {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

fn json_lines<T: serde::Serialize>(records: &[T]) -> String {
    records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect()
}

fn conversations(seed: u64, n: u64) -> Vec<Conversation> {
    let g = SampleGenerator::new(seed);
    (0..n).map(|i| g.conversation(i)).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn fingerprints_and_canonical_forms_are_fastavros() {
    for path in [CONVERSATION, ENRICHED] {
        let text = std::fs::read_to_string(path).unwrap();
        let theirs = py(&["fingerprint", path], "");
        assert_eq!(parsing_canonical_form(&text).unwrap(), theirs[0], "{path}");
        assert_eq!(hex(&schema_fingerprint(&text).unwrap().to_le_bytes()), theirs[1], "{path}");
        println!("{path}: fastavro fingerprint {}", theirs[1]);
    }
}

#[test]
fn single_object_bytes_written_by_fastavro_decode_and_ours_decode_in_fastavro() {
    let convs = conversations(21, 6);
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    // fastavro writes, convoflow reads
    let theirs = py(&["encode", CONVERSATION], &json_lines(&convs));
    assert_eq!(theirs.len(), convs.len());
    for (hex_bytes, conv) in theirs.iter().zip(&convs) {
        assert_eq!(&codec.decode(&unhex(hex_bytes)).unwrap(), conv);
    }
    // convoflow writes, fastavro reads (checking the header against its own fingerprint)
    let ours: String = convs.iter().map(|c| hex(&codec.encode(c).unwrap()) + "\n").collect();
    let decoded = py(&["decode", CONVERSATION], &ours);
    for (line, conv) in decoded.iter().zip(&convs) {
        let theirs: Value = serde_json::from_str(line).unwrap();
        assert_eq!(theirs, serde_json::to_value(conv).unwrap());
    }
    assert_eq!(decoded.len(), convs.len());
}

/// The per-turn language fields (issue 26) across schema versions, in fastavro: an event
/// convoflow writes with the new schema is read by fastavro as written and by an old reader
/// (v1: the new fields dropped, the rest intact); a v1 event fastavro writes is read by
/// convoflow's new reader, which knows the v1 writer schema, with the new fields defaulted.
#[test]
fn enriched_events_with_turn_languages_cross_schema_versions_in_fastavro() {
    let mut conv = conversations(7, 1).remove(0);
    conv.language = None; // detected from the text
    let event = convoflow::pipeline::text::build_text_enricher(&Config::default(), None)
        .unwrap()
        .enrich_one(&convoflow::pipeline::text::EnrichInput {
            conversation: &conv,
            source: convoflow::event::SourceRef { topic: "t".into(), partition: 0, offset: 0 },
        })
        .unwrap();
    assert!(event.turns.iter().any(|t| t.language_source.as_deref() == Some("detected")), "{:?}", event.turns);
    assert!(event.language.is_some(), "the conversation's language filled from its turns");
    let codec = RecordCodec::<EnrichedConversation>::new(WireFormat::Avro).unwrap();
    let ours = hex(&codec.encode(&event).unwrap()) + "\n";
    // the new reader: every turn's language as written
    let same: Value = serde_json::from_str(&py(&["decode", ENRICHED], &ours)[0]).unwrap();
    assert_eq!(same["language"], serde_json::json!(event.language));
    for (theirs, turn) in same["turns"].as_array().unwrap().iter().zip(&event.turns) {
        assert_eq!(theirs["language"], serde_json::json!(turn.language));
        assert_eq!(theirs["language_source"], serde_json::json!(turn.language_source));
        assert!((theirs["language_confidence"].as_f64().unwrap() - f64::from(turn.language_confidence)).abs() < 1e-6);
    }
    // an old reader drops them
    let old: Value = serde_json::from_str(&py(&["decode", ENRICHED, "--reader", ENRICHED_V1], &ours)[0]).unwrap();
    let old_turns = old["turns"].as_array().unwrap();
    assert_eq!(old_turns.len(), event.turns.len());
    assert!(old_turns.iter().all(|t| t.get("language").is_none() && t.get("language_source").is_none() && t["turn_id"].is_string()));
    assert_eq!(old["conversation_id"], serde_json::json!(event.conversation_id));
    // an old writer (fastavro, v1): the new reader defaults the new fields
    let v1_bytes = py(&["encode", ENRICHED_V1], &(old.to_string() + "\n"));
    let mut schemas = convoflow::codec::AvroSchemas::new(<EnrichedConversation as convoflow::codec::Record>::SCHEMA).unwrap();
    schemas.add_writer_schema(&std::fs::read_to_string(ENRICHED_V1).unwrap()).unwrap();
    let reader = RecordCodec::<EnrichedConversation>::with_schemas(WireFormat::Avro, schemas);
    let read = reader.decode(&unhex(&v1_bytes[0])).unwrap();
    assert_eq!(read.turns.len(), event.turns.len());
    for (r, t) in read.turns.iter().zip(&event.turns) {
        assert_eq!((r.language.as_ref(), r.language_confidence, r.language_source.as_ref()), (None, 0.0, None));
        assert_eq!((&r.turn_id, &r.chunks, &r.point_ids), (&t.turn_id, &t.chunks, &t.point_ids));
    }
    assert_eq!(read.language, event.language, "the conversation-level field existed in v1");
}

/// The routing fields (issue 26 part 2: each entity's and sentiment's model, the skip reasons)
/// across schema versions in fastavro: written by convoflow and read by fastavro with the new
/// schema as written and with the previous one (v2) without them; a v2 event fastavro writes is
/// read by convoflow's new reader with them defaulted.
#[test]
fn enriched_events_with_routed_models_cross_schema_versions_in_fastavro() {
    let conv = conversations(8, 1).remove(0);
    let mut event = convoflow::pipeline::text::build_text_enricher(&Config::default(), None)
        .unwrap()
        .enrich_one(&convoflow::pipeline::text::EnrichInput {
            conversation: &conv,
            source: convoflow::event::SourceRef { topic: "t".into(), partition: 0, offset: 0 },
        })
        .unwrap();
    assert!(event.turns.len() >= 2);
    event.turns[0].entities = vec![convoflow::event::Entity {
        text: "Lyon".into(),
        label: "LOC".into(),
        start: 0,
        end: 4,
        score: 0.5,
        model: Some("camembert/camembert-ner".into()),
    }];
    event.turns[0].sentiment =
        Some(convoflow::event::Sentiment { stars: 4, score: 3.9, probabilities: vec![0.0, 0.1, 0.1, 0.6, 0.2], model: Some("nlptown".into()) });
    event.turns[1].entities_skipped = Some("unsupported-language".into());
    event.turns[1].sentiment_skipped = Some("unknown-language".into());
    let codec = RecordCodec::<EnrichedConversation>::new(WireFormat::Avro).unwrap();
    let ours = hex(&codec.encode(&event).unwrap()) + "\n";
    let same: Value = serde_json::from_str(&py(&["decode", ENRICHED], &ours)[0]).unwrap();
    let turns = same["turns"].as_array().unwrap();
    assert_eq!(turns[0]["entities"][0]["model"], "camembert/camembert-ner");
    assert_eq!(turns[0]["sentiment"]["model"], "nlptown");
    assert_eq!((turns[1]["entities_skipped"].as_str(), turns[1]["sentiment_skipped"].as_str()), (Some("unsupported-language"), Some("unknown-language")));
    assert!(turns[0]["entities_skipped"].is_null());
    let old: Value = serde_json::from_str(&py(&["decode", ENRICHED, "--reader", ENRICHED_V2], &ours)[0]).unwrap();
    let old_turns = old["turns"].as_array().unwrap();
    assert!(old_turns[0]["entities"][0].get("model").is_none() && old_turns[0]["entities"][0]["label"] == "LOC");
    assert!(old_turns[0]["sentiment"].get("model").is_none() && old_turns[0]["sentiment"]["stars"] == 4);
    assert!(
        old_turns.iter().all(|t| t.get("entities_skipped").is_none() && t.get("sentiment_skipped").is_none() && t.get("language").is_some()),
        "v2 has the languages, not the skip reasons: {old}"
    );
    let v2_bytes = py(&["encode", ENRICHED_V2], &(old.to_string() + "\n"));
    let mut schemas = convoflow::codec::AvroSchemas::new(<EnrichedConversation as convoflow::codec::Record>::SCHEMA).unwrap();
    schemas.add_writer_schema(&std::fs::read_to_string(ENRICHED_V2).unwrap()).unwrap();
    let read = RecordCodec::<EnrichedConversation>::with_schemas(WireFormat::Avro, schemas).decode(&unhex(&v2_bytes[0])).unwrap();
    assert_eq!(read.turns[0].entities[0].model, None);
    assert_eq!(read.turns[0].entities[0].text, "Lyon");
    assert_eq!(read.turns[0].sentiment.as_ref().map(|s| (s.stars, s.model.clone())), Some((4, None)));
    assert!(read.turns.iter().all(|t| t.entities_skipped.is_none() && t.sentiment_skipped.is_none()));
    assert_eq!(read.turns[1].turn_id, event.turns[1].turn_id);
}

/// Apache Avro Java 1.12 (Maven Central, scripts/avro-java): the same fingerprints, and its
/// `BinaryMessageDecoder` reads our single-object bytes (it refuses unknown fingerprints) and
/// its `BinaryMessageEncoder` writes them again byte for byte, which we read back.
#[test]
fn apache_avro_java_reads_and_writes_the_same_single_object_bytes() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/avro-java");
    let java = |args: &[&str], stdin: &str| -> Vec<String> {
        let mut child = Command::new(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("scripts/avro-java");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "avro-java {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
    };
    for path in [CONVERSATION, ENRICHED] {
        let text = std::fs::read_to_string(path).unwrap();
        let theirs = java(&["fingerprint", path], "");
        assert_eq!(parsing_canonical_form(&text).unwrap(), theirs[0], "{path}");
        assert_eq!(hex(&schema_fingerprint(&text).unwrap().to_le_bytes()), theirs[1], "{path}");
    }
    let convs = conversations(55, 5);
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let ours: Vec<String> = convs.iter().map(|c| hex(&codec.encode(c).unwrap())).collect();
    let theirs = java(&["reencode", CONVERSATION], &(ours.join("\n") + "\n"));
    assert_eq!(theirs, ours, "Java decodes our bytes and writes the same bytes");
    for (bytes, conv) in theirs.iter().zip(&convs) {
        assert_eq!(&codec.decode(&unhex(bytes)).unwrap(), conv);
    }
}

fn worker_config(topics: &Topics, input: WireFormat, output: WireFormat, registry: Option<String>) -> Config {
    let mut cfg = in_process_config(topics);
    cfg.pipeline.shutdown_timeout_ms = 3_000;
    cfg.qdrant.dense_dim = Some(8);
    cfg.codec.input = input;
    cfg.codec.output = output;
    cfg.codec.schema_registry = registry.map(|url| SchemaRegistryConfig { url, ..Default::default() });
    cfg
}

/// conversation.avsc as an older writer would have it (no `attributes`, which the reader
/// defaults) and as a newer one (an added `priority` the reader does not know).
fn schema_versions(dir: &std::path::Path) -> (String, String) {
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(CONVERSATION).unwrap()).unwrap();
    let fields = schema["fields"].as_array_mut().unwrap();
    let mut older = fields.clone();
    older.retain(|f| f["name"] != "attributes");
    fields.push(serde_json::json!({"name": "priority", "type": "int", "default": 0}));
    let newer = schema.clone();
    let mut old_schema = schema;
    old_schema["fields"] = Value::Array(older);
    let (old_path, new_path) = (dir.join("conversation.older.avsc"), dir.join("conversation.newer.avsc"));
    std::fs::write(&old_path, old_schema.to_string()).unwrap();
    std::fs::write(&new_path, newer.to_string()).unwrap();
    (old_path.display().to_string(), new_path.display().to_string())
}

/// Third-party producers (fastavro single-object bytes; confluent-kafka's AvroSerializer with the
/// current, an older and a newer schema version, registered in the registry) → the worker
/// (input `auto`, writer schemas by id from the registry) → third-party consumers
/// (AvroDeserializer through the registry; fastavro for single-object output). Nothing is
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_producers_and_consumers_around_the_worker() {
    let topics = Topics::new("interop");
    create_topic(&topics.input, 2).await;
    let brokers = brokers();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("schemas"));
    std::fs::create_dir_all(&dir).unwrap();
    let (older, newer) = schema_versions(&dir);
    let convs = conversations(33, 8);
    let publish = |framing: &str, schema: &str, batch: &[Conversation]| {
        let registry = registry_url();
        let args = ["produce", schema, "--brokers", &brokers, "--topic", &topics.input, "--framing", framing, "--registry", &registry];
        py(&args, &json_lines(batch));
    };
    publish("single-object", CONVERSATION, &convs[0..2]);
    publish("confluent", CONVERSATION, &convs[2..4]);
    publish("confluent", &older, &convs[4..6]);
    publish("confluent", &newer, &convs[6..8]);

    // output in the Confluent framing, schema registered under <output>-value
    let out = topics.output.clone();
    let cfg = worker_config(&topics, WireFormat::Auto, WireFormat::Confluent, Some(registry_url()));
    run_until(cfg.clone(), convoflow::sink::store::open(&cfg.qdrant).unwrap(), Duration::from_secs(90), move || read_topic(&out, 8, Duration::from_millis(300), Duration::ZERO).len() >= 8)
        .await
        .unwrap();
    let args = ["consume", ENRICHED, "--brokers", &brokers, "--topic", &topics.output, "--framing", "confluent"];
    let registry = registry_url();
    let mut args = args.to_vec();
    args.extend(["--registry", &registry, "--count", "8", "--timeout", "30"]);
    let enriched: Vec<Value> = py(&args, "").iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: BTreeSet<&str> = enriched.iter().map(|e| e["conversation_id"].as_str().unwrap()).collect();
    let expected: BTreeSet<&str> = convs.iter().map(|c| c.conversation_id.as_str()).collect();
    assert_eq!(ids, expected, "every conversation enriched once, read by AvroDeserializer");
    for e in &enriched {
        let (i, conv) = convs.iter().enumerate().find(|(_, c)| c.conversation_id == e["conversation_id"]).unwrap();
        assert_eq!(e["turns"].as_array().unwrap().len(), conv.turns.len());
        // schema evolution: the older writer has no `attributes`, so the reader's default
        // applies; the newer writer's `priority` is ignored
        let expected = if (4..6).contains(&i) { serde_json::json!({}) } else { serde_json::to_value(&conv.attributes).unwrap() };
        assert_eq!(e["attributes"], expected, "conversation {i}");
    }
    assert_eq!(records_in(&topics.dlq()), 0, "nothing dead-lettered");

    // the same input, output as single-object bytes, read by fastavro
    let single = Topics::new("interop-so");
    let mut cfg = worker_config(&single, WireFormat::Auto, WireFormat::Avro, Some(registry_url()));
    cfg.kafka.input_topic = topics.input.clone();
    cfg.kafka.dlq_topic = single.dlq();
    let out = single.output.clone();
    run_until(cfg.clone(), convoflow::sink::store::open(&cfg.qdrant).unwrap(), Duration::from_secs(90), move || read_topic(&out, 8, Duration::from_millis(300), Duration::ZERO).len() >= 8)
        .await
        .unwrap();
    let args = ["consume", ENRICHED, "--brokers", &brokers, "--topic", &single.output, "--count", "8", "--timeout", "30"];
    let enriched = py(&args, "");
    assert_eq!(enriched.len(), 8);
    let ours = RecordCodec::<EnrichedConversation>::new(WireFormat::Avro).unwrap();
    for record in read_topic(&single.output, 8, Duration::from_secs(10), Duration::ZERO) {
        let decoded = ours.decode(record.payload.as_ref().unwrap()).unwrap();
        assert!(enriched.iter().any(|l| serde_json::from_str::<Value>(l).unwrap()["conversation_id"] == decoded.conversation_id));
    }
    assert_eq!(records_in(&single.dlq()), 0, "nothing dead-lettered");
}

/// A loopback TCP proxy in front of the real registry, which the test can take down and bring
/// back on the same port (the registry itself stays up for the other tests).
struct Outage {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
    upstream: String,
}

impl Outage {
    async fn new() -> Self {
        let upstream = registry_url().trim_start_matches("http://").split('/').next().unwrap().to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut o = Self { port, task: None, upstream };
        o.up().await;
        o
    }

    fn url(&self) -> String {
        registry_url().replacen(&self.upstream, &format!("127.0.0.1:{}", self.port), 1)
    }

    async fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else { break };
                let upstream = upstream.clone();
                conns.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    /// Closes the listener and every open connection.
    async fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Registry down at start: a clear error. Down mid-run: ids already resolved keep decoding; an
/// id not seen yet waits (nothing dead-lettered, nothing committed past it) and is enriched
/// once the registry is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outages_pause_instead_of_dead_lettering() {
    let mut outage = Outage::new().await;
    let topics = Topics::new("registry-outage");
    create_topic(&topics.input, 1).await;
    let brokers = brokers();

    outage.down().await;
    let cfg = worker_config(&topics, WireFormat::Auto, WireFormat::Avro, Some(outage.url()));
    let err = format!("{:#}", worker::run(cfg, Arc::new(AtomicBool::new(false))).await.expect_err("no registry, no start"));
    assert!(err.contains("schema registry") && err.contains("unavailable"), "{err}");
    outage.up().await;

    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("schemas"));
    std::fs::create_dir_all(&dir).unwrap();
    let (_, newer) = schema_versions(&dir);
    let convs = conversations(44, 6);
    let registry = registry_url(); // producers use the registry directly
    let publish = |schema: &str, batch: &[Conversation]| {
        let args = ["produce", schema, "--brokers", &brokers, "--topic", &topics.input, "--framing", "confluent", "--registry", &registry];
        py(&args, &json_lines(batch));
    };
    publish(CONVERSATION, &convs[0..2]);

    let mut cfg = worker_config(&topics, WireFormat::Auto, WireFormat::Avro, Some(outage.url()));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    cfg.telemetry.listen = format!("127.0.0.1:{port}");
    let stop = Arc::new(AtomicBool::new(false));
    let run = tokio::spawn(worker::run(cfg, stop.clone()));
    let out = topics.output.clone();
    let wait_for = |n: usize, secs: u64| {
        let out = out.clone();
        tokio::task::spawn_blocking(move || read_topic(&out, n, Duration::from_secs(secs), Duration::ZERO).len())
    };
    assert_eq!(wait_for(2, 60).await.unwrap(), 2, "enriched while the registry is up");

    outage.down().await;
    publish(CONVERSATION, &convs[2..4]); // id cached by the worker
    assert_eq!(wait_for(4, 30).await.unwrap(), 4, "cached ids decode with the registry down");

    publish(&newer, &convs[4..6]); // a new id: the worker must ask the registry
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(records_in(&topics.output), 4, "it waits");
    assert_eq!(records_in(&topics.dlq()), 0, "not dead-lettered");
    assert!(!run.is_finished(), "the worker keeps running");
    // unready while it waits, as during a store outage; alive (before: /readyz 200 throughout)
    let (status, body) = tokio::task::spawn_blocking(move || http_get(port, "/readyz")).await.unwrap().unwrap();
    assert!(status == 503 && body.contains("schema registry not answering"), "{status} {body}");
    assert_eq!(tokio::task::spawn_blocking(move || http_get(port, "/healthz")).await.unwrap().unwrap().0, 200);

    outage.up().await;
    assert_eq!(wait_for(6, 60).await.unwrap(), 6, "enriched once the registry is back");
    wait_until("ready again", Duration::from_secs(20), move || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)).await;

    // an id the registry does not know is the message's fault: dead-lettered as unknown-schema
    let mut unknown = vec![0u8];
    unknown.extend_from_slice(&987_654u32.to_be_bytes());
    unknown.extend_from_slice(b"\x02ab");
    produce_raw(&topics.input, &[(Some(b"c-unknown".to_vec()), Some(unknown))]).await;
    let dlq = topics.dlq();
    let dead = tokio::task::spawn_blocking(move || read_topic(&dlq, 1, Duration::from_secs(30), Duration::ZERO)).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers["dlq.error.class"], "unknown-schema");
    assert!(dead[0].headers["dlq.error.message"].contains("987654"), "{:?}", dead[0].headers);
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(20), run).await.unwrap().unwrap().unwrap();
    assert_eq!(records_in(&topics.output), 6, "nothing else emitted");
}

/// With `auto_register: false` the output schema must be registered already: a clear refusal
/// when it is not, its id when it is.
#[test]
fn lookup_only_uses_the_registered_output_schema() {
    let topic = unique("lookup-only");
    let mut codec = convoflow::config::CodecConfig::default();
    codec.schema_registry = Some(SchemaRegistryConfig { url: registry_url(), auto_register: false, ..Default::default() });
    let err = convoflow::codec::factory::writer_codec::<EnrichedConversation>(&codec, WireFormat::Confluent, &topic, None).err().unwrap();
    let err = format!("{err:#}");
    assert!(err.contains("not registered under subject") && err.contains(&format!("{topic}-value")), "{err}");
    // registered by someone else (as Confluent's clients send it: without the trailing newline)
    let text = std::fs::read_to_string(ENRICHED).unwrap();
    let answer = ureq::post(format!("{}/subjects/{topic}-value/versions", registry_url()))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .send(serde_json::json!({ "schema": text.trim_end() }).to_string())
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let id = answer["id"].as_u64().unwrap() as u32;
    let codec = convoflow::codec::factory::writer_codec::<EnrichedConversation>(&codec, WireFormat::Confluent, &topic, None).unwrap();
    let g = SampleGenerator::new(3);
    let event = convoflow::pipeline::text::build_text_enricher(&Config::default(), None)
        .unwrap()
        .enrich_one(&convoflow::pipeline::text::EnrichInput {
            conversation: &g.conversation(0),
            source: convoflow::event::SourceRef { topic: "t".into(), partition: 0, offset: 0 },
        })
        .unwrap();
    let bytes = codec.encode(&event).unwrap();
    assert_eq!(bytes[0], 0);
    assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()), id);
}

/// The output subject holds a schema the EnrichedConversation schema is not backward
/// compatible with: the worker refuses to start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_output_schema_refuses_to_start() {
    let topics = Topics::new("incompatible");
    create_topic(&topics.input, 1).await;
    let subject = format!("{}-value", topics.output);
    let agent = ureq::Agent::new_with_defaults();
    let base = registry_url();
    let ct = "application/vnd.schemaregistry.v1+json";
    // a record under the same name with a required field the new schema does not have
    let other = r#"{"type":"record","name":"EnrichedConversation","namespace":"dev.convoflow.v1","fields":[{"name":"x","type":"string"}]}"#;
    agent
        .post(format!("{base}/subjects/{subject}/versions"))
        .header("Content-Type", ct)
        .send(serde_json::json!({ "schema": other }).to_string())
        .unwrap();
    agent
        .put(format!("{base}/config/{subject}"))
        .header("Content-Type", ct)
        .send(serde_json::json!({ "compatibility": "FULL" }).to_string())
        .unwrap();
    let cfg = worker_config(&topics, WireFormat::Auto, WireFormat::Confluent, Some(base));
    let err = format!("{:#}", worker::run(cfg, Arc::new(AtomicBool::new(false))).await.expect_err("incompatible"));
    assert!(err.contains("incompatible") && err.contains(&subject), "{err}");
}
