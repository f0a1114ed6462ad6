//! What the chaos suites share (tests/chaos.rs, tests/exactly_once.rs): one test at a time, a
//! broker of the test's own that it can stop and restart, the loss and duplicate count, the
//! seeded SIGKILL schedule, and a lag wait that explains itself.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// A test's own broker, used by every helper until the returned guard drops.
pub struct Scene {
    pub broker: OwnBroker,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// The shared broker (scripts/test's), for a test that does not stop it; still one test at a time.
pub fn shared_broker() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

impl Scene {
    pub fn start(name: &str) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let broker = OwnBroker::start(name);
        println!("{name}: own broker at {} (started in {:.1} s)", broker.addr, started.elapsed().as_secs_f64());
        use_brokers(Some(broker.addr.clone()));
        Self { broker, _serial: serial }
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        use_brokers(None);
    }
}

/// Inputs of `topic` without an enriched event in `outputs`, and the number of duplicates.
pub fn losses_and_duplicates(topic: &str, outputs: &[Record]) -> (Vec<(i32, i64)>, usize) {
    let by = by_source(outputs);
    let mut lost = Vec::new();
    let mut duplicates = 0;
    for (p, end) in high_watermarks(topic) {
        for offset in 0..end {
            match by.get(&(p, offset)).map_or(0, Vec::len) {
                0 => lost.push((p, offset)),
                n => duplicates += n - 1,
            }
        }
    }
    (lost, duplicates)
}

/// Waits for lag 0 on every partition; past `timeout`, fails with the committed offsets, the
/// high watermarks and the worker's last log lines (what a stuck commit looks like).
pub async fn lag_reaches_zero_or_explain(topics: &Topics, worker: &Worker, timeout: Duration) {
    let started = Instant::now();
    loop {
        let (group, input) = (topics.group.clone(), topics.input.clone());
        let lag = tokio::task::spawn_blocking(move || lag(&group, &input)).await.unwrap();
        if lag.values().all(|&l| l == 0) {
            return;
        }
        if started.elapsed() > timeout {
            let (group, input) = (topics.group.clone(), topics.input.clone());
            let committed = tokio::task::spawn_blocking(move || committed(&group, &input)).await.unwrap();
            let log = worker.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
            panic!(
                "lag not 0 within {timeout:?}: lag {lag:?}, committed {committed:?}, high watermarks {:?}\nworker log (last 60 lines):\n{}",
                high_watermarks(&topics.input),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What ten SIGKILL rounds came to.
#[derive(Debug)]
pub struct KillReport {
    pub events: usize,
    /// Records in the output topic's log after each kill (aborted transactions included).
    pub after_each: Vec<i64>,
    pub lost: Vec<(i32, i64)>,
    pub duplicates: usize,
    pub points_expected: u64,
    pub points_found: u64,
    pub points_missing: u64,
}

/// Ten SIGKILLs of `convoflow run` (with `extra_env`) at seeded random moments over 1,000
/// conversations, each restart on the same embedded store, then a last worker drains: the
/// outputs a `read_committed` reader sees, and the points against the chunk ids they name. The
/// schedule is the same for every caller (same seed, same throttle).
pub async fn sigkill_rounds(name: &str, extra_env: &[(&str, &str)]) -> KillReport {
    use convoflow::sink::store::{self, SearchFilter};
    let topics = Topics::new(name);
    create_topic(&topics.input, 4).await;
    let events = sample_events(83, 1_000);
    produce_conversations(&topics.input, &events).await;
    let total = events.len();
    // a throttled worker, so ten rounds of 0.5-3 s of work do not finish the input
    let throttle = [
        ("CONVOFLOW__PIPELINE__MAX_IN_FLIGHT", "16"),
        ("CONVOFLOW__PIPELINE__MAX_BATCH_MESSAGES", "8"),
        ("CONVOFLOW__PIPELINE__QUEUE_CAPACITY", "8"),
    ];
    let env: Vec<(&str, &str)> = throttle.iter().chain(extra_env).copied().collect();
    let mut seed: u64 = 0x5eed_c4a0_5000_0010;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let started = Instant::now();
    let mut after_each = Vec::new();
    for _ in 0..10 {
        let mut worker = Worker::start("w", &topics, &env);
        // killed while it works: after it got its partitions (the killed member before it
        // holds them until its session times out), at a random moment 0.5-3 s in
        worker.wait_for_log("partitions assigned", Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(500 + next() % 2_500));
        worker.signal("KILL");
        assert_eq!(worker.wait_exit(Duration::from_secs(5)).0, None, "killed by the signal");
        after_each.push(records_in(&topics.output));
    }
    println!("{name}: {total} events; output log records after each kill {after_each:?} ({:.0} s)", started.elapsed().as_secs_f64());

    let mut last = Worker::start("w", &topics, extra_env);
    let records = wait_for_distinct_sources(&topics.output, total, Duration::from_secs(180));
    lag_reaches_zero_or_explain(&topics, &last, Duration::from_secs(60)).await;
    last.signal("TERM");
    assert_eq!(last.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", last.log_text());
    // everything committed is in: read again, so late duplicates are counted too
    let records = {
        let output = topics.output.clone();
        let at_least = records.len();
        tokio::task::spawn_blocking(move || read_topic(&output, at_least, Duration::from_secs(30), Duration::from_secs(2))).await.unwrap()
    };
    let (lost, duplicates) = losses_and_duplicates(&topics.input, &records);

    // the points: every chunk id the enriched events name, once, per conversation
    let mut expected: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for r in &records {
        let e = r.enriched();
        expected.entry(e.conversation_id.clone()).or_default().extend(e.turns.iter().flat_map(|t| t.point_ids.clone()));
    }
    let mut cfg = convoflow::config::Config::default();
    cfg.qdrant.data_dir = store_dir(&topics.group, "w");
    cfg.qdrant.dense_dim = Some(8);
    let store = store::open(&cfg.qdrant).unwrap();
    store.ensure_collection(&store::collection_spec(&cfg.qdrant, 8), store::Bootstrap::MustExist).await.unwrap();
    let points_expected: u64 = expected.values().map(|ids| ids.len() as u64).sum();
    let points_found = store.count(&SearchFilter::default()).await.unwrap();
    let mut points_missing = 0u64;
    for (conversation, ids) in &expected {
        let f = SearchFilter { conversation_id: Some(conversation.clone()), ..Default::default() };
        let n = store.count(&f).await.unwrap();
        points_missing += (ids.len() as u64).saturating_sub(n);
        assert_eq!(n, ids.len() as u64, "conversation {conversation}: points");
    }
    let report = KillReport { events: total, after_each, lost, duplicates, points_expected, points_found, points_missing };
    println!(
        "{name}: {} lost, {} duplicate outputs; points expected {}, found {}, missing {}",
        report.lost.len(),
        report.duplicates,
        report.points_expected,
        report.points_found,
        report.points_missing
    );
    report
}

/// What a broker restart came to.
#[derive(Debug)]
pub struct RestartReport {
    pub events: usize,
    pub lost: Vec<(i32, i64)>,
    pub duplicates: usize,
}

/// A throttled `convoflow run` (with `extra_env`) on a broker of its own; the broker is halted
/// once a quarter of the events are out and restarted 20 s later on the same state and port.
/// The same worker process must reach lag 0 and exit 0 on SIGTERM; nothing is dead-lettered.
pub async fn broker_restart_round(name: &str, extra_env: &[(&str, &str)]) -> RestartReport {
    let scene = Scene::start(name);
    let topics = Topics::new(name);
    create_topic(&topics.input, 3).await;
    let events = sample_events(81, 150);
    produce_conversations(&topics.input, &events).await;
    let total = events.len();

    // the source's commits logged too, for the diagnosis should the lag stay above 0
    let env: Vec<(&str, &str)> = SLOW
        .iter()
        .copied()
        .chain([("CONVOFLOW_LOG", "info,rdkafka=warn,qdrant_edge=error,convoflow::source=debug,convoflow::kafka::transactions=debug")])
        .chain(extra_env.iter().copied())
        .collect();
    let mut worker = Worker::start("w", &topics, &env);
    let before = read_topic(&topics.output, total / 4, Duration::from_secs(120), Duration::ZERO);
    scene.broker.halt();
    let halted = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    assert!(worker.child.try_wait().unwrap().is_none(), "the worker exited during the outage:\n{}", worker.log_text());
    scene.broker.restart();
    println!("{name}: {} of {total} enriched before the halt; broker back after {:.1} s", before.len(), halted.elapsed().as_secs_f64());

    let back = Instant::now();
    wait_for_distinct_sources(&topics.output, total, Duration::from_secs(180));
    lag_reaches_zero_or_explain(&topics, &worker, Duration::from_secs(120)).await;
    println!("{name}: drained {:.1} s after the broker came back", back.elapsed().as_secs_f64());
    assert!(worker.child.try_wait().unwrap().is_none(), "the worker is still the same process:\n{}", worker.log_text());
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", worker.log_text());
    let records = read_topic(&topics.output, total, Duration::from_secs(30), Duration::from_secs(2));
    let (lost, duplicates) = losses_and_duplicates(&topics.input, &records);
    println!("{name}: {total} events, {} lost, {duplicates} duplicate outputs", lost.len());
    assert_eq!(records_in(&topics.dlq()), 0, "nothing dead-lettered");
    RestartReport { events: total, lost, duplicates }
}
