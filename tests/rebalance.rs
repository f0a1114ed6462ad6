//! Rebalances under backpressure against the real broker (scripts/test exports KAFKA_BROKERS).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::flaky_store::FlakyStore;
use common::*;
use convoflow::sample::SampleGenerator;
use convoflow::sink::store;

/// librdkafka keeps a partition's pause flag across revoke and assign: a member paused by
/// backpressure when another joins and leaves again must still fetch every partition it gets
/// afterwards. Member A is stalled (its store behind `FlakyStore::stalled`, a test double that
/// holds upserts) until its partitions pause; B joins, takes its share, and leaves; A's store is
/// released and every partition must drain to lag 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_paused_before_a_rebalance_are_fetched_after_it() {
    let topics = Topics::new("paused-rebalance");
    create_topic(&topics.input, 4).await;
    let g = SampleGenerator::new(9);
    let convs: Vec<_> = (0..40).map(|i| g.conversation(i)).collect();
    produce_conversations(&topics.input, &convs).await;

    let a = pausing_member_config(&topics);
    let gated = Arc::new(FlakyStore::stalled(store::open(&a.qdrant).unwrap()));
    let member_a = Member::start(a.clone(), gated.clone());
    wait_until("A pauses its 4 partitions", Duration::from_secs(30), || {
        convoflow::telemetry::prometheus().render().contains("convoflow_partitions_paused 4")
    })
    .await;

    let b = second_member_config(&a, &topics);
    let member_b = Member::start(b.clone(), store::open(&b.qdrant).unwrap());
    let (group, input) = (topics.group.clone(), topics.input.clone());
    wait_until("B commits its share", Duration::from_secs(60), move || committed(&group, &input).values().any(|o| *o > 0)).await;
    member_b.stop().await;

    // A gets every partition back, some of them paused by it before the first rebalance
    gated.closed.store(false, Ordering::SeqCst);
    let (group, input) = (topics.group.clone(), topics.input.clone());
    wait_until("every partition drains to lag 0", Duration::from_secs(90), move || {
        let lag = lag(&group, &input);
        lag.len() == 4 && lag.values().all(|l| *l == 0)
    })
    .await;
    member_a.stop().await;
}

/// The lag gauge covers every partition of the input topic, not only those this worker holds:
/// with no partition assigned (a rebalance in progress, a broker outage, another member holding
/// them) a backlog still shows. Before, unassigned partitions were reported as 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_reported_for_partitions_this_worker_does_not_hold() {
    let topics = Topics::new("lag-unheld");
    create_topic(&topics.input, 3).await;
    let g = SampleGenerator::new(19);
    let convs: Vec<_> = (0..12).map(|i| g.conversation(i)).collect();
    produce_conversations(&topics.input, &convs).await;
    let cfg = in_process_config(&topics);
    let shared = Arc::new(convoflow::source::SharedSource::default()); // holds nothing
    let readiness = Arc::new(convoflow::telemetry::Readiness::default());
    let _monitor = convoflow::source::lag::LagMonitor::start(&cfg.kafka, shared, readiness, Duration::from_millis(200)).unwrap();
    let topic = topics.input.clone();
    wait_until("lag of all 3 partitions, summing to 12", Duration::from_secs(20), move || {
        let text = convoflow::telemetry::prometheus().render();
        let lags: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("convoflow_consumer_lag{") && l.contains(&format!("topic=\"{topic}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        lags.len() == 3 && lags.iter().sum::<f64>() == 12.0
    })
    .await;
}
