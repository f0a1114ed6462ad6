//! The worker with its vector store, against the real broker (scripts/test starts it) and the
//! embedded edge engine: points land before offsets are committed, tombstones delete, store
//! failures are retried or stop the worker without committing (through `FlakyStore`, a test
//! double wrapping the real edge store).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::flaky_store::FlakyStore;
use common::*;
use convoflow::config::Config;
use convoflow::event::Conversation;
use convoflow::sample::SampleGenerator;
use convoflow::sink::store::{self, Bootstrap, SearchFilter, StoreError};


fn config(topics: &Topics) -> Config {
    let mut cfg = in_process_config(topics);
    cfg.pipeline.shutdown_timeout_ms = 3_000;
    cfg.qdrant.dense_dim = Some(8);
    cfg
}

fn conversations(n: u64) -> Vec<Conversation> {
    let g = SampleGenerator::new(11);
    (0..n).map(|i| g.conversation(i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chunk_is_a_point_before_its_offset_is_committed_and_tombstones_delete() {
    let topics = Topics::new("store-e2e");
    create_topic(&topics.input, 2).await;
    let mut convs = conversations(30);
    convs[5].turns[2].text = "Le colis zygomorphe est arrivé écrasé sous une pile de pastèques".into();
    produce_conversations(&topics.input, &convs).await;
    // a tombstone for the first conversation, after its event (same key, same partition), naming
    // its tenant in the `tenant` header
    let deleted = convs[0].conversation_id.clone();
    produce_tombstone(&topics.input, deleted.as_bytes(), &[("tenant", &convs[0].tenant)]).await;

    let cfg = config(&topics);
    let store = store::open(&cfg.qdrant).unwrap();
    let output = topics.output.clone();
    run_until(cfg.clone(), store.clone(), Duration::from_secs(90), move || {
        read_topic(&output, 31, Duration::from_secs(5), Duration::ZERO).len() >= 31
    })
    .await
    .unwrap();

    let records = read_topic(&topics.output, 31, Duration::from_secs(10), Duration::from_millis(300));
    assert_eq!(records.len(), 31, "30 enriched events and one tombstone");
    let tombstone = records.iter().find(|r| r.payload.is_none()).expect("the tombstone is forwarded");
    assert_eq!(tombstone.key.as_deref(), Some(deleted.as_bytes()));
    // every turn chunk of the surviving conversations is a point with its payload
    let events: Vec<_> = records.iter().filter(|r| r.payload.is_some()).map(|r| r.enriched()).collect();
    let store_points = store.count(&SearchFilter::default()).await.unwrap();
    let expected: u64 = events
        .iter()
        .filter(|e| e.conversation_id != deleted)
        .map(|e| e.turns.iter().map(|t| t.chunks.len() as u64).sum::<u64>())
        .sum();
    assert_eq!(store_points, expected);
    let one = events.iter().find(|e| e.conversation_id != deleted).unwrap();
    let filter = SearchFilter { conversation_id: Some(one.conversation_id.clone()), ..Default::default() };
    assert_eq!(store.count(&filter).await.unwrap(), one.turns.iter().map(|t| t.chunks.len() as u64).sum::<u64>());
    let deleted_filter = SearchFilter { conversation_id: Some(deleted.clone()), ..Default::default() };
    assert_eq!(store.count(&deleted_filter).await.unwrap(), 0, "the tombstone deleted the conversation's points");
    // a planted sentence is found by BM25 and carries the turn's payload
    let conv = &convs[5];
    let turn = &conv.turns[2];
    let hits = store
        .search(&store::HybridQuery {
            dense: None,
            sparse: convoflow::pipeline::bm25::query_vector("colis zygomorphe pastèques"),
            filter: SearchFilter::default(),
            limit: 1,
            prefetch_limit: 20,
            group_by: None,
        })
        .await
        .unwrap();
    assert_eq!(hits[0].payload["turn_id"], serde_json::json!(turn.turn_id));
    assert_eq!(hits[0].payload["speaker"], serde_json::json!(turn.speaker));
    assert_eq!(hits[0].payload["tenant"], serde_json::json!(conv.tenant));
    let committed = committed(&topics.group, &topics.input);
    assert_eq!(committed, high_watermarks(&topics.input), "everything written is committed");
}

/// Two tenants reuse a conversation id: each gets its own points (the tenant is part of the
/// point id), and a tombstone deletes only the points of the tenant its `tenant` header names;
/// one without the header deletes the points written without a tenant. (Before: the second
/// tenant's event overwrote the first's points, and one tombstone deleted both.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_reusing_a_conversation_id_keep_their_own_points_and_tombstones() {
    let topics = Topics::new("tenants");
    create_topic(&topics.input, 1).await;
    let g = SampleGenerator::new(12);
    let mut acme = g.conversation(0);
    acme.conversation_id = "shared-1".into();
    acme.tenant = "acme".into();
    let mut globex = g.conversation(1);
    globex.conversation_id = "shared-1".into();
    globex.tenant = "globex".into();
    let mut solo = g.conversation(2);
    solo.tenant = String::new();
    produce_conversations(&topics.input, &[acme.clone(), globex.clone(), solo.clone()]).await;

    let cfg = config(&topics);
    let store = store::open(&cfg.qdrant).unwrap();
    let output = topics.output.clone();
    run_until(cfg.clone(), store.clone(), Duration::from_secs(60), move || {
        read_topic(&output, 3, Duration::from_secs(5), Duration::ZERO).len() >= 3
    })
    .await
    .unwrap();
    let events: Vec<_> = read_topic(&topics.output, 3, Duration::from_secs(10), Duration::ZERO).iter().map(|r| r.enriched()).collect();
    let chunks = |tenant: &str| -> u64 {
        events.iter().filter(|e| e.tenant == tenant).flat_map(|e| &e.turns).map(|t| t.chunks.len() as u64).sum()
    };
    let ids = |tenant: &str| -> std::collections::BTreeSet<String> {
        events.iter().filter(|e| e.tenant == tenant).flat_map(|e| &e.turns).flat_map(|t| t.point_ids.clone()).collect()
    };
    assert!(ids("acme").is_disjoint(&ids("globex")), "distinct point ids per tenant");
    let count = |tenant: &str, conversation: &str| {
        let store = store.clone();
        let f = SearchFilter { tenant: Some(tenant.into()), conversation_id: Some(conversation.into()), ..Default::default() };
        async move { store.count(&f).await.unwrap() }
    };
    assert_eq!(count("acme", "shared-1").await, chunks("acme"));
    assert_eq!(count("globex", "shared-1").await, chunks("globex"), "not overwritten by the other tenant");

    produce_tombstone(&topics.input, b"shared-1", &[("tenant", "acme")]).await;
    produce_tombstone(&topics.input, solo.conversation_id.as_bytes(), &[]).await;
    let output = topics.output.clone();
    run_until(cfg.clone(), store.clone(), Duration::from_secs(60), move || {
        read_topic(&output, 5, Duration::from_secs(5), Duration::ZERO).len() >= 5
    })
    .await
    .unwrap();
    assert_eq!(count("acme", "shared-1").await, 0, "the tombstone deleted acme's points");
    assert_eq!(count("globex", "shared-1").await, chunks("globex"), "and only acme's");
    assert_eq!(count("", &solo.conversation_id).await, 0, "a tombstone without the header deletes the tenant-less points");
    assert_eq!(committed(&topics.group, &topics.input), high_watermarks(&topics.input));

    // a tombstone as log compaction or an ordinary producer sends it (no headers) deletes the
    // conversation in every tenant (before: only the points without a tenant, i.e. nothing of
    // globex's, silently); one for an unknown conversation matches nothing and is counted so
    let none = |text: &str| metric_value(text, "convoflow_tombstones_total{matched=\"none\"}");
    let none_before = none(&convoflow::telemetry::prometheus().render());
    produce_tombstone(&topics.input, b"shared-1", &[]).await;
    produce_tombstone(&topics.input, b"never-written", &[]).await;
    let output = topics.output.clone();
    run_until(cfg.clone(), store.clone(), Duration::from_secs(60), move || {
        read_topic(&output, 7, Duration::from_secs(5), Duration::ZERO).len() >= 7
    })
    .await
    .unwrap();
    assert_eq!(count("globex", "shared-1").await, 0, "the header-less tombstone deleted globex's points");
    let text = convoflow::telemetry::prometheus().render();
    assert!(none(&text) >= none_before + 1.0, "the unknown conversation's tombstone: {text}");
    assert_eq!(committed(&topics.group, &topics.input), high_watermarks(&topics.input));
}

/// The value of one series in a Prometheus text page (0 when absent).
fn metric_value(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// A turn re-sent with fewer chunks: only the new version's chunks stay searchable (before: the
/// old version's extra chunks stayed, since point ids depend on the chunk index only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_re_sent_with_fewer_chunks_leaves_only_its_new_chunks() {
    let topics = Topics::new("stale-chunks");
    create_topic(&topics.input, 1).await;
    let g = SampleGenerator::new(13);
    let mut long = g.conversation(0);
    // about 700 words: three chunks of at most 256 tokens
    let words: Vec<String> = (0..700).map(|i| format!("mot{i}")).collect();
    long.turns[0].text = words.join(" ");
    let mut short = long.clone();
    short.turns[0].text = "Finalement, une seule phrase courte.".into();
    produce_conversations(&topics.input, &[long.clone()]).await;
    let mut cfg = config(&topics);
    cfg.pipeline.max_batch_messages = 1;
    let store = store::open(&cfg.qdrant).unwrap();
    let output = topics.output.clone();
    run_until(cfg.clone(), store.clone(), Duration::from_secs(60), move || {
        read_topic(&output, 1, Duration::from_secs(5), Duration::ZERO).len() >= 1
    })
    .await
    .unwrap();
    let first = read_topic(&topics.output, 1, Duration::from_secs(5), Duration::ZERO)[0].enriched();
    let chunks_before = first.turns[0].chunks.len();
    assert!(chunks_before >= 3, "{chunks_before} chunks");
    let of_turn = SearchFilter { conversation_id: Some(long.conversation_id.clone()), ..Default::default() };
    let all_before = store.count(&of_turn).await.unwrap();

    // the same turn again, short, in the same batch as an unrelated conversation
    produce_conversations(&topics.input, &[short.clone(), g.conversation(1)]).await;
    cfg.pipeline.max_batch_messages = 64;
    let output = topics.output.clone();
    run_until(cfg.clone(), store.clone(), Duration::from_secs(60), move || {
        read_topic(&output, 3, Duration::from_secs(5), Duration::ZERO).len() >= 3
    })
    .await
    .unwrap();
    let second = read_topic(&topics.output, 3, Duration::from_secs(5), Duration::ZERO)[1].enriched();
    assert_eq!(second.turns[0].chunks.len(), 1);
    assert_eq!(store.count(&of_turn).await.unwrap(), all_before - (chunks_before as u64 - 1), "only the new chunk of turn 0");
    let hits = store
        .search(&store::HybridQuery {
            dense: None,
            sparse: convoflow::pipeline::bm25::query_vector("mot650 mot500 mot400"),
            filter: of_turn.clone(),
            limit: 5,
            prefetch_limit: 20,
            group_by: None,
        })
        .await
        .unwrap();
    assert!(hits.is_empty(), "the old text is not searchable any more: {hits:?}");
    assert_eq!(committed(&topics.group, &topics.input), high_watermarks(&topics.input));
}

/// The store rejects one message's points for their content: the worker halves the batch until
/// it finds that message, dead-letters it (class `store`) and writes the rest; it keeps running
/// and commits everything. (Before: the rejection stopped the worker, and every restart re-read
/// the same message.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_store_rejects_is_found_by_halving_and_dead_lettered_and_the_rest_is_written() {
    let topics = Topics::new("store-reject");
    create_topic(&topics.input, 1).await;
    let mut convs = conversations(20);
    convs[13].turns[1].text = "the store refuses this: REJECT-ME".into();
    produce_conversations(&topics.input, &convs).await;
    let mut cfg = config(&topics);
    cfg.pipeline.max_batch_messages = 16;
    cfg.pipeline.max_batch_wait_ms = 500; // one batch of 16, then 4
    let edge = store::open(&cfg.qdrant).unwrap();
    let flaky = Arc::new(FlakyStore::rejecting(edge.clone(), "REJECT-ME"));
    let (output, dlq) = (topics.output.clone(), topics.dlq());
    run_until(cfg.clone(), flaky.clone(), Duration::from_secs(60), move || {
        records_in(&output) >= 19 && records_in(&dlq) >= 1
    })
    .await
    .unwrap();
    let dead = read_topic(&topics.dlq(), 1, Duration::from_secs(5), Duration::from_millis(500));
    assert_eq!(dead.len(), 1, "only the rejected message");
    assert_eq!(dead[0].headers["dlq.error.class"], "store");
    assert!(dead[0].headers["dlq.error.message"].contains("payload refused"), "{:?}", dead[0].headers);
    assert_eq!(dead[0].key.as_deref(), Some(convs[13].conversation_id.as_bytes()));
    let events: Vec<_> = read_topic(&topics.output, 19, Duration::from_secs(5), Duration::ZERO).iter().map(|r| r.enriched()).collect();
    assert_eq!(events.len(), 19);
    let expected: u64 = events.iter().flat_map(|e| &e.turns).map(|t| t.chunks.len() as u64).sum();
    assert_eq!(edge.count(&SearchFilter::default()).await.unwrap(), expected, "every other message's points");
    let rejected = flaky.rejected.load(Ordering::SeqCst);
    println!("store-reject: {rejected} rejected writes to find the message");
    assert!(rejected <= 6, "halving, not one write per message: {rejected}");
    assert_eq!(committed(&topics.group, &topics.input), high_watermarks(&topics.input));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_store_failures_are_retried_by_the_worker() {
    let topics = Topics::new("store-transient");
    create_topic(&topics.input, 1).await;
    produce_conversations(&topics.input, &conversations(10)).await;
    let cfg = config(&topics);
    let inner = store::open(&cfg.qdrant).unwrap();
    let flaky = Arc::new(FlakyStore::new(inner.clone(), 3, StoreError::Transient("unavailable (injected)".into()), usize::MAX));
    let output = topics.output.clone();
    run_until(cfg, flaky.clone(), Duration::from_secs(90), move || {
        read_topic(&output, 10, Duration::from_secs(5), Duration::ZERO).len() >= 10
    })
    .await
    .unwrap();
    assert!(flaky.calls.load(Ordering::SeqCst) > 3, "failed calls were retried");
    assert_eq!(committed(&topics.group, &topics.input)[&0], 10);
    assert!(inner.count(&SearchFilter::default()).await.unwrap() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_longer_than_the_old_retry_budget_pauses_the_worker_which_then_drains() {
    let topics = Topics::new("store-outage");
    create_topic(&topics.input, 1).await;
    produce_conversations(&topics.input, &conversations(10)).await;
    let mut cfg = config(&topics);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    cfg.telemetry.listen = format!("127.0.0.1:{port}");
    cfg.qdrant.retry.initial_backoff_ms = 50;
    cfg.qdrant.retry.max_backoff_ms = 500; // before: 8 attempts ≈ 2.3 s of backoff, then exit
    let inner = store::open(&cfg.qdrant).unwrap();
    let flaky = Arc::new(FlakyStore::new(inner.clone(), 0, StoreError::Transient("unavailable (injected)".into()), usize::MAX));
    flaky.down.store(true, Ordering::SeqCst);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = tokio::spawn(convoflow::worker::run_with_store(cfg, stop.clone(), flaky.clone()));

    // down for 8 s: the worker waits, unready but alive, nothing emitted or committed
    let f = flaky.clone();
    wait_until("upserts to fail", Duration::from_secs(60), move || f.calls.load(Ordering::SeqCst) >= 3).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!worker.is_finished(), "the worker waits out the outage");
    assert!(flaky.calls.load(Ordering::SeqCst) >= 12, "it kept retrying");
    let (status, body) = http_get(port, "/readyz").unwrap();
    assert!(status == 503 && body.contains("vector store not reachable"), "{status} {body}");
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200, "waiting out a dependency is not a stall");
    assert!(committed(&topics.group, &topics.input).get(&0).is_none_or(|&o| o <= 0), "nothing committed");
    assert_eq!(records_in(&topics.output), 0, "nothing emitted");

    // the store is back: ready again, everything stored, emitted and committed
    flaky.down.store(false, Ordering::SeqCst);
    let output = topics.output.clone();
    wait_until("the backlog to drain", Duration::from_secs(60), move || records_in(&output) >= 10).await;
    let group = topics.group.clone();
    let input = topics.input.clone();
    wait_until("the commit", Duration::from_secs(30), move || committed(&group, &input).get(&0) == Some(&10)).await;
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
    assert!(inner.count(&SearchFilter::default()).await.unwrap() >= 10);
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), worker).await.unwrap().unwrap().unwrap();
}

/// A tmpfs mounted for one test, unmounted on drop (the test runs as root, like scripts/test).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(name: &str, size_mib: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("convoflow-tmpfs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("running mount");
        assert!(out.status.success(), "mounting a tmpfs failed (this test needs root): {}", String::from_utf8_lossy(&out.stderr));
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to mount a tmpfs: scripts/test runs it where the machine allows"]
async fn a_full_disk_pauses_the_worker_until_space_returns_instead_of_crashing() {
    use convoflow::sink::store::edge::free_bytes;
    let topics = Topics::new("store-disk-full");
    create_topic(&topics.input, 1).await;
    // 512 MiB (the engine preallocates 2 × 32 MiB of WAL when it creates the collection)
    let disk = Tmpfs::mount("disk-full", 512);
    let mut cfg = config(&topics);
    cfg.qdrant.data_dir = disk.0.join("data");
    cfg.qdrant.edge_min_free_bytes = 128 << 20;
    cfg.qdrant.retry.initial_backoff_ms = 50;
    cfg.qdrant.retry.max_backoff_ms = 500;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    cfg.telemetry.listen = format!("127.0.0.1:{port}");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = tokio::spawn(convoflow::worker::run(cfg.clone(), stop.clone()));
    wait_until("readiness", Duration::from_secs(60), move || http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)).await;

    // fill the disk to 96 MiB free, under the 128 MiB reserve
    let filler = disk.0.join("filler");
    let fill = free_bytes(&disk.0).unwrap() - (96 << 20);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    produce_conversations(&topics.input, &conversations(10)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!worker.is_finished(), "no crash, no exit");
    let (status, body) = http_get(port, "/readyz").unwrap();
    assert!(status == 503 && body.contains("free disk below qdrant.edge_min_free_bytes"), "{status} {body}");
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);
    assert_eq!(records_in(&topics.output), 0, "nothing emitted");
    assert!(committed(&topics.group, &topics.input).get(&0).is_none_or(|&o| o <= 0), "nothing committed");

    // space returns: the worker resumes by itself and loses nothing
    std::fs::remove_file(&filler).unwrap();
    let output = topics.output.clone();
    wait_until("the backlog to drain", Duration::from_secs(60), move || records_in(&output) >= 10).await;
    let (group, input) = (topics.group.clone(), topics.input.clone());
    wait_until("the commit", Duration::from_secs(30), move || committed(&group, &input).get(&0) == Some(&10)).await;
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), worker).await.unwrap().unwrap().unwrap();
    let store = store::open(&cfg.qdrant).unwrap();
    store.ensure_collection(&store::collection_spec(&cfg.qdrant, 8), Bootstrap::MustExist).await.unwrap();
    assert!(store.count(&SearchFilter::default()).await.unwrap() >= 10, "every point written");
    drop(store);
    drop(disk);
}

/// Start-up without a usable store fails at once and says so plainly (before: exit 1 after 2–5 s
/// with a message saying that writes "wait"): too little disk under the edge store, and a remote
/// Qdrant nobody listens for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_without_a_usable_store_fails_plainly() {
    let topics = Topics::new("store-start");
    create_topic(&topics.input, 1).await;
    let mut cfg = config(&topics);
    cfg.qdrant.edge_min_free_bytes = u64::MAX / 4; // more than any disk has
    let started = std::time::Instant::now();
    let err = format!("{:#}", convoflow::worker::run(cfg, Arc::new(std::sync::atomic::AtomicBool::new(false))).await.unwrap_err());
    assert!(err.contains("did not start") && err.contains("below qdrant.edge_min_free_bytes"), "{err}");
    assert!(!err.contains("wait"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cfg = config(&topics);
    cfg.qdrant.backend = convoflow::config::StoreBackend::Qdrant;
    cfg.qdrant.url = format!("http://127.0.0.1:{closed}");
    let err = format!("{:#}", convoflow::worker::run(cfg, Arc::new(std::sync::atomic::AtomicBool::new(false))).await.unwrap_err());
    assert!(err.contains("did not start") && err.contains(&closed.to_string()), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert!(committed(&topics.group, &topics.input).get(&0).is_none_or(|&o| o <= 0), "nothing consumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_store_failure_stops_the_worker_without_committing_then_a_restart_catches_up() {
    let topics = Topics::new("store-permanent");
    create_topic(&topics.input, 1).await;
    produce_conversations(&topics.input, &conversations(10)).await;
    let cfg = config(&topics);
    {
        let inner = store::open(&cfg.qdrant).unwrap();
        let broken = Arc::new(FlakyStore::new(inner, usize::MAX, StoreError::Permanent("forbidden (injected)".into()), usize::MAX));
        let err = run_until(cfg.clone(), broken.clone(), Duration::from_secs(60), || false).await.unwrap_err();
        assert!(format!("{err:#}").contains("forbidden (injected)"), "{err:#}");
        assert_eq!(broken.calls.load(Ordering::SeqCst), 1, "not retried");
    }
    let committed_after_failure = committed(&topics.group, &topics.input);
    assert!(committed_after_failure.get(&0).is_none_or(|&o| o <= 0), "nothing committed: {committed_after_failure:?}");
    assert!(read_topic(&topics.output, 1, Duration::from_secs(2), Duration::ZERO).is_empty(), "nothing emitted");

    // with a working store the same group re-reads everything
    let store = store::open(&cfg.qdrant).unwrap();
    let output = topics.output.clone();
    run_until(cfg.clone(), store.clone(), Duration::from_secs(90), move || {
        read_topic(&output, 10, Duration::from_secs(5), Duration::ZERO).len() >= 10
    })
    .await
    .unwrap();
    assert_eq!(committed(&topics.group, &topics.input)[&0], 10);
    store.ensure_collection(&store::collection_spec(&cfg.qdrant, 8), Bootstrap::MustExist).await.unwrap();
    assert!(store.count(&SearchFilter::default()).await.unwrap() >= 10);
}
