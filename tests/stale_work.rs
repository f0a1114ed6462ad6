//! Work of a partition that moved to another member while it was in flight is dropped, not
//! written or emitted late (real broker; scripts/test exports KAFKA_BROKERS). Its own test binary:
//! it reads the process-wide `convoflow_partitions_paused` gauge.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::flaky_store::FlakyStore;
use common::*;
use convoflow::sample::SampleGenerator;
use convoflow::sink::store;

/// Member A's first batch is held inside the store write (`FlakyStore::stalled`, a test double);
/// B joins, so every partition gets a new assignment generation and is re-read by its new owner.
/// When A's write is released, that batch is stale: A must not emit it. Every input event then
/// has exactly one enriched event (before, A emitted the stale batch too: duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_partition_moved_is_not_emitted_late() {
    let topics = Topics::new("stale");
    create_topic(&topics.input, 2).await;
    let g = SampleGenerator::new(23);
    let convs: Vec<_> = (0..20).map(|i| g.conversation(i)).collect();
    produce_conversations(&topics.input, &convs).await;

    let a = pausing_member_config(&topics);
    let gated = Arc::new(FlakyStore::stalled(store::open(&a.qdrant).unwrap()));
    let member_a = Member::start(a.clone(), gated.clone());
    wait_until("A pauses its 2 partitions", Duration::from_secs(30), || {
        convoflow::telemetry::prometheus().render().contains("convoflow_partitions_paused 2")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await; // its first batch is inside the stalled write

    let b = second_member_config(&a, &topics);
    let member_b = Member::start(b.clone(), store::open(&b.qdrant).unwrap());
    // B has taken its partition once something of the group is committed
    let (group, input) = (topics.group.clone(), topics.input.clone());
    wait_until("B commits", Duration::from_secs(60), move || committed(&group, &input).values().any(|o| *o > 0)).await;
    gated.closed.store(false, Ordering::SeqCst); // A's stale write completes now

    let out = topics.output.clone();
    let records = tokio::task::spawn_blocking(move || wait_for_distinct_sources(&out, 20, Duration::from_secs(60))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // anything late would show now
    let out = topics.output.clone();
    let records = tokio::task::spawn_blocking(move || read_topic(&out, records.len(), Duration::from_secs(5), Duration::from_secs(1)))
        .await
        .unwrap();
    let sources = by_source(&records);
    assert_eq!(sources.len(), 20, "every input enriched");
    let duplicated: Vec<_> = sources.iter().filter(|(_, events)| events.len() > 1).map(|(s, _)| *s).collect();
    assert!(duplicated.is_empty(), "emitted again after their partition moved: {duplicated:?}");
    let stale = convoflow::telemetry::prometheus().render();
    assert!(stale.contains("convoflow_stale_batches_total{stage="), "the dropped batch is counted");
    member_b.stop().await;
    member_a.stop().await;
}
