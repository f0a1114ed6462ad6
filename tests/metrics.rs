//! `/metrics`, `/healthz`, `/readyz` of a worker (in-process, real broker, embedded store,
//! all-MiniLM-L6-v2 from scripts/env.sh): not ready before the model is warm; consumer lag rises
//! while the worker is stalled (its store behind `FlakyStore::stalled`, a test double that holds
//! upserts) and returns to 0 once it drains.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::flaky_store::FlakyStore;
use common::*;
use convoflow::sample::SampleGenerator;
use convoflow::sink::store;
use convoflow::worker;

fn lag_of(metrics: &str, topic: &str) -> Option<f64> {
    let lines: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("convoflow_consumer_lag{") && l.contains(&format!("topic=\"{topic}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!lines.is_empty()).then(|| lines.iter().sum())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_model_and_lag_rises_while_stalled_then_drains_to_zero() {
    let topics = Topics::new("metrics");
    create_topic(&topics.input, 2).await;
    let port = free_port();
    let mut cfg = in_process_config(&topics);
    cfg.pipeline.max_in_flight = 4; // stalls quickly: partitions pause
    cfg.telemetry.listen = format!("127.0.0.1:{port}");
    cfg.telemetry.liveness_progress_stall_ms = 3_000; // a wedged store call fails liveness soon
    let minilm = PathBuf::from(std::env::var("CONVOFLOW_MINILM").expect("CONVOFLOW_MINILM: run with scripts/test"));
    cfg.models.embedding = Some(common::routed::model("sentence-transformers/all-MiniLM-L6-v2", minilm));
    let gated = Arc::new(FlakyStore::stalled(store::open(&cfg.qdrant).unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(worker::run_with_store(cfg, stop.clone(), gated.clone()));

    // the port answers before the model is loaded: alive, not ready
    let (status, body) = wait_for("the telemetry port", Duration::from_secs(30), || http_get(port, "/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("models not loaded"), "{body}");
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);
    wait_for("readiness", Duration::from_secs(90), || http_get(port, "/readyz").filter(|(s, _)| *s == 200)).await;

    // stalled store: produced conversations pile up as lag
    let g = SampleGenerator::new(5);
    let events: Vec<_> = (0..30).map(|n| g.conversation(n)).collect();
    produce_conversations(&topics.input, &events).await;
    let lag = wait_for("lag to rise", Duration::from_secs(30), || {
        lag_of(&http_get(port, "/metrics")?.1, &topics.input).filter(|l| *l >= 20.0)
    })
    .await;
    assert!(lag <= 30.0, "{lag}");
    let metrics = http_get(port, "/metrics").unwrap().1;
    assert!(metrics.contains("convoflow_partitions_paused"), "backpressure paused the partitions");
    // a store call that never returns is a wedged worker: liveness fails (the orchestrator
    // would restart it), naming why
    let (_, body) = wait_for("liveness to fail", Duration::from_secs(30), || http_get(port, "/healthz").filter(|(s, _)| *s == 503)).await;
    assert!(body.contains("no message completed") && body.contains("in flight"), "{body}");

    // open the gate: the worker drains and commits, lag returns to 0
    gated.closed.store(false, Ordering::SeqCst);
    wait_for("lag back to 0", Duration::from_secs(60), || {
        lag_of(&http_get(port, "/metrics")?.1, &topics.input).filter(|l| *l == 0.0)
    })
    .await;
    wait_for("liveness back", Duration::from_secs(30), || http_get(port, "/healthz").filter(|(s, _)| *s == 200)).await;
    let metrics = http_get(port, "/metrics").unwrap().1;
    for name in [
        "convoflow_messages_total",
        "convoflow_turns_total",
        "convoflow_batch_turns_bucket",
        "convoflow_model_seconds_bucket{task=\"embedding\"",
        "convoflow_store_upsert_seconds_bucket",
        "convoflow_store_points_total",
        "convoflow_end_to_end_seconds_bucket",
        "convoflow_commit_seconds_bucket",
        "convoflow_rebalances_total",
        "convoflow_assigned_partitions 2",
        "convoflow_ready 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    assert_eq!(http_get(port, "/nope").unwrap().0, 404);
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), worker).await.unwrap().unwrap().unwrap();
}

/// The telemetry port holds at most `MAX_CONNECTIONS` connections: clients that open
/// connections and never send anything cannot grow the worker's tasks and descriptors without
/// bound; a probe beyond the limit waits to be accepted, and is answered once the idle ones are
/// closed (after 5 s without a byte) or as soon as a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_telemetry_port_holds_a_bounded_number_of_connections() {
    use convoflow::telemetry::{self, MAX_CONNECTIONS, Readiness, liveness::Liveness};
    let readiness = Arc::new(Readiness::default());
    let liveness = Arc::new(Liveness::new(Duration::from_secs(15), Duration::from_secs(40)));
    let addr = telemetry::serve("127.0.0.1:0", readiness, liveness).await.unwrap();
    let port = addr.port();
    assert_eq!(tokio::task::spawn_blocking(move || http_get(port, "/healthz")).await.unwrap().unwrap().0, 200);
    // every slot taken by a connection that sends nothing, then a probe timed from its start
    let fill_slots_then_probe = || async move {
        let idle: Vec<std::net::TcpStream> = (0..MAX_CONNECTIONS).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let probe = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            (http_get(port, "/healthz"), started.elapsed())
        });
        (idle, probe)
    };
    let (idle, probe) = fill_slots_then_probe().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!probe.is_finished(), "a connection over the limit is not served while the idle ones hold every slot");
    // the idle connections stay open on the client's side: the server closes them
    let (answer, took) = tokio::time::timeout(Duration::from_secs(10), probe).await.unwrap().unwrap();
    assert_eq!(answer.unwrap().0, 200, "answered once the idle connections are closed");
    assert!(took >= Duration::from_millis(1_500) && took < Duration::from_secs(8), "{took:?}");
    for mut c in idle {
        use std::io::Read;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(c.read(&mut [0u8; 16]).unwrap(), 0, "the server closed an idle connection");
    }
    // a slot frees as soon as a client closes its connection
    let (idle, probe) = fill_slots_then_probe().await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(!probe.is_finished());
    drop(idle);
    let (answer, took) = tokio::time::timeout(Duration::from_secs(10), probe).await.unwrap().unwrap();
    assert_eq!(answer.unwrap().0, 200, "answered once slots free");
    assert!(took < Duration::from_secs(3), "{took:?}");
}
