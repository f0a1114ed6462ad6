//! The chaos suite: `convoflow run` processes against a real Apache Kafka broker of the test's
//! own (scripts/kafka on a free loopback port), which the tests stop and restart. Tests run one at
//! a time (they hold `SERIAL`: the helpers point at the test's broker). Every figure is printed
//! (`cargo test --test chaos -- --nocapture` shows them).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::scene::*;
use common::*;

/// The broker goes away mid-run for 20 s and comes back on the same data and port: the worker
/// rides it out (librdkafka retries deliveries and commits) without a restart, and every input
/// event gets its enriched event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_is_ridden_out_without_a_worker_restart_and_nothing_is_lost() {
    let report = broker_restart_round("broker-restart", &[]).await;
    assert!(report.lost.is_empty(), "inputs without an enriched event: {:?}", report.lost);
}

/// SIGTERM while the broker is away: the worker cannot deliver or commit, so it gives up
/// waiting at `pipeline.shutdown_timeout_ms` (7 s here) and exits on time (before: it waited
/// for deliveries that could never complete). Nothing is committed past what was delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_away_exits_on_time_and_commits_nothing_undelivered() {
    let mut run = busy_worker("term-no-broker", 82, SLOW).await;
    run.scene.broker.halt();
    std::thread::sleep(Duration::from_secs(1));
    let (code, took) = sigterm_and_wait("term-no-broker", &mut run.worker);
    assert_exited_on_time(code, took, &run.worker);

    run.scene.broker.restart();
    assert_committed_was_delivered("term-no-broker", &run.topics, run.events);
}

/// SIGTERM while the poll thread is blocked in a librdkafka call: the broker is frozen (SIGSTOP,
/// connections open, nothing answers), so the periodic synchronous offset commit of the work
/// completed before the freeze waits for the coordinator's answer (librdkafka's request timeout,
/// a minute) and the source cannot start its shutdown. The pipeline does not wait for the
/// source past the shutdown deadline: the worker exits on time, with code 0 (before: the
/// watchdog's exit 1 at 12 s), and nothing undelivered is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_source_waits_on_a_frozen_broker_exits_on_time() {
    let env: Vec<(&str, &str)> = SLOW.iter().copied().chain([("CONVOFLOW__KAFKA__COMMIT_INTERVAL_MS", "2000")]).collect();
    let mut run = busy_worker("term-frozen", 83, &env).await;
    run.scene.broker.freeze();
    // past the next commit tick: the commit of what completed before the freeze is waiting
    std::thread::sleep(Duration::from_secs(3));
    let (code, took) = sigterm_and_wait("term-frozen", &mut run.worker);
    run.scene.broker.thaw();
    assert_exited_on_time(code, took, &run.worker);

    assert_committed_was_delivered("term-frozen", &run.topics, run.events);
}

/// A broker of the test's own, the events of 300 conversations on a 3-partition input, and a
/// worker that has enriched at least 40 of them.
struct BusyWorker {
    scene: Scene,
    topics: Topics,
    /// How many input events there are.
    events: usize,
    worker: Worker,
}

async fn busy_worker(name: &str, seed: u64, env: &[(&str, &str)]) -> BusyWorker {
    let scene = Scene::start(name);
    let topics = Topics::new(name);
    create_topic(&topics.input, 3).await;
    let events = sample_events(seed, 300);
    produce_conversations(&topics.input, &events).await;
    let worker = Worker::start("w", &topics, env);
    read_topic(&topics.output, 40, Duration::from_secs(120), Duration::ZERO);
    BusyWorker { scene, topics, events: events.len(), worker }
}

fn sigterm_and_wait(name: &str, worker: &mut Worker) -> (Option<i32>, Duration) {
    worker.signal("TERM");
    let (code, took) = worker.wait_exit(Duration::from_secs(20));
    println!("{name}: exit code {code:?} {:.1} s after SIGTERM", took.as_secs_f64());
    (code, took)
}

/// Exit code 0 within `shutdown_timeout_ms` (7 s) and a margin.
fn assert_exited_on_time(code: Option<i32>, took: Duration, worker: &Worker) {
    assert!(took < Duration::from_millis(8_500), "exit took {took:?} (shutdown_timeout_ms 7000)\n{}", worker.log_text());
    assert_eq!(code, Some(0), "{}", worker.log_text());
}

/// Every committed input offset has its enriched event on the output topic (the broker serving).
fn assert_committed_was_delivered(name: &str, topics: &Topics, events: usize) {
    let committed = committed(&topics.group, &topics.input);
    let outputs = by_source(&read_topic(&topics.output, events, Duration::from_secs(10), Duration::from_secs(1)));
    let high = high_watermarks(&topics.input);
    let mut committed_total = 0;
    for (p, end) in &high {
        let c = committed[p].max(0);
        committed_total += c;
        for offset in 0..c {
            assert!(outputs.contains_key(&(*p, offset)), "partition {p} offset {offset} committed ({c}) but never delivered");
        }
        assert!(c <= *end);
    }
    println!(
        "{name}: committed {committed_total} of {} inputs, {} delivered: {:?}",
        high.values().sum::<i64>(),
        outputs.len(),
        committed.iter().collect::<BTreeMap<_, _>>()
    );
}

/// Ten SIGKILLs of `convoflow run` at seeded random moments over 1,000 conversations, each
/// restart on the same embedded store: every input event gets its enriched event, and the store
/// holds exactly the points of every chunk the enriched events name — none missing, none extra.
/// (tests/exactly_once.rs runs the same schedule with transactions: 0 duplicates there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_sigkills_at_random_moments_lose_nothing_and_leave_each_chunk_once_in_the_store() {
    let _serial = shared_broker();
    let report = sigkill_rounds("sigkill-10", &[]).await;
    assert!(
        (report.after_each[9] as usize) < report.events,
        "the kills must interrupt the run ({} of {} out after ten rounds)",
        report.after_each[9],
        report.events
    );
    assert!(report.lost.is_empty(), "inputs without an enriched event: {:?}", report.lost);
    assert_eq!(report.points_found, report.points_expected, "exactly one point per chunk id");
}

/// The store stalls for 5 s, then fails every write with a transient error for `outage`: the
/// worker waits it out (it never exits), commits nothing while nothing is stored, and drains the
/// backlog once the store is back, every chunk once.
async fn a_store_outage_is_waited_out(name: &str, outage: Duration) {
    use common::flaky_store::FlakyStore;
    use convoflow::sink::store::{self, SearchFilter, StoreError};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let topics = Topics::new(name);
    create_topic(&topics.input, 2).await;
    let events = sample_events(84, 100);
    produce_conversations(&topics.input, &events).await;
    let mut cfg = in_process_config(&topics);
    cfg.qdrant.dense_dim = Some(8);
    cfg.pipeline.max_in_flight = 8;
    cfg.pipeline.max_batch_messages = 4;
    let edge = store::open(&cfg.qdrant).unwrap();
    let flaky = Arc::new(FlakyStore::new(edge.clone(), 0, StoreError::Transient("unavailable (test double)".into()), usize::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(convoflow::worker::run_with_store(cfg.clone(), stop.clone(), flaky.clone()));
    wait_until("first outputs", Duration::from_secs(60), {
        let output = topics.output.clone();
        move || records_in(&output) >= 20
    })
    .await;
    flaky.closed.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    flaky.down.store(true, Ordering::SeqCst);
    flaky.closed.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await; // what was stored before completes
    let (group, input) = (topics.group.clone(), topics.input.clone());
    let committed_total = move || committed(&group, &input).values().map(|c| c.max(&0)).sum::<i64>();
    let at_start = tokio::task::spawn_blocking(committed_total.clone()).await.unwrap();
    let points_at_start = edge.count(&SearchFilter::default()).await.unwrap();
    tokio::time::sleep(outage.saturating_sub(Duration::from_secs(3))).await;
    assert!(!worker.is_finished(), "the worker waits the outage out");
    let at_end = tokio::task::spawn_blocking(committed_total.clone()).await.unwrap();
    assert_eq!(at_end, at_start, "nothing committed while nothing is stored");
    assert_eq!(edge.count(&SearchFilter::default()).await.unwrap(), points_at_start);
    let calls = flaky.calls.load(Ordering::SeqCst);
    flaky.down.store(false, Ordering::SeqCst);
    let back = Instant::now();
    let records = wait_for_distinct_sources(&topics.output, events.len(), Duration::from_secs(120));
    wait_for_lag_zero(&topics, Duration::from_secs(30)).await;
    let drained = back.elapsed();
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(20), worker).await.unwrap().unwrap().unwrap();
    let (lost, duplicates) = losses_and_duplicates(&topics.input, &records);
    let ids: std::collections::BTreeSet<String> =
        records.iter().map(|r| r.enriched()).flat_map(|e| e.turns.into_iter().flat_map(|t| t.point_ids)).collect();
    let found = edge.count(&SearchFilter::default()).await.unwrap();
    println!(
        "{name}: {:.0} s outage ({calls} store calls), committed {at_start} of {} during it; drained {:.1} s after; {} lost, \
         {duplicates} duplicates; points expected {}, found {found}",
        outage.as_secs_f64(),
        events.len(),
        drained.as_secs_f64(),
        lost.len(),
        ids.len()
    );
    assert!(lost.is_empty(), "inputs without an enriched event: {lost:?}");
    assert_eq!(found, ids.len() as u64, "every chunk once");
}

/// The 30-second and the 3-minute outage run side by side (two in-process workers on their own
/// topics, groups and stores): the suite pays for the longer one only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outages_of_30_seconds_and_3_minutes_are_waited_out() {
    let _serial = shared_broker();
    tokio::join!(
        a_store_outage_is_waited_out("store-outage-30s", Duration::from_secs(30)),
        a_store_outage_is_waited_out("store-outage-3min", Duration::from_secs(180)),
    );
}

/// Two members under backpressure (`max_in_flight` 4: their partitions pause and resume all the
/// time), one SIGKILLed: the other gets its partitions after the session timeout, resumes them
/// whatever their pause state was, and drains everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_paused_members_one_sigkilled_the_other_drains_everything() {
    let _serial = shared_broker();
    let topics = Topics::new("paused-pair");
    create_topic(&topics.input, 4).await;
    let events = sample_events(85, 150);
    produce_conversations(&topics.input, &events).await;
    let mut a = Worker::start("a", &topics, SLOW);
    a.wait_for_log("partitions assigned", Duration::from_secs(60));
    let mut b = Worker::start("b", &topics, SLOW);
    b.wait_for_log("partitions assigned", Duration::from_secs(60));
    // both at work
    let started = records_in(&topics.output);
    std::thread::sleep(Duration::from_secs(4));
    assert!(records_in(&topics.output) > started, "the pair makes progress");
    b.signal("KILL");
    assert_eq!(b.wait_exit(Duration::from_secs(5)).0, None);
    let killed_at = records_in(&topics.output);
    let records = wait_for_distinct_sources(&topics.output, events.len(), Duration::from_secs(180));
    wait_for_lag_zero(&topics, Duration::from_secs(30)).await;
    assert_eq!(a.assignments().last().map_or(0, Vec::len), 4, "A took every partition: {:?}", a.assignments());
    a.signal("TERM");
    assert_eq!(a.wait_exit(Duration::from_secs(15)).0, Some(0), "{}", a.log_text());
    let (lost, duplicates) = losses_and_duplicates(&topics.input, &records);
    println!("paused-pair: {} events, {killed_at} out when B was killed; {} lost, {duplicates} duplicates", events.len(), lost.len());
    assert!(lost.is_empty(), "inputs without an enriched event: {lost:?}");
}
