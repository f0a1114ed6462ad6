//! `convoflow demo`: the whole worker with no server at all — librdkafka's in-process mock
//! cluster as Kafka, the embedded Qdrant engine in a temporary directory, sample French and
//! English conversations, the models it finds (`DemoModels`), a progress bar, a summary of what
//! came out and a few hybrid searches over what was indexed.

mod examples;
pub mod models;
mod progress;
mod readback;
mod summary;

pub use examples::DEMO_QUESTION;
pub use models::{DemoModels, NO_MODELS_HELP, find_models};
use examples::{ask_example, search_examples};
use readback::{Ended, PARTITIONS, Readback};
use summary::print_summary;
use crate::telemetry::log::progress_message;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::mocking::MockCluster;

use crate::codec::WireFormat;
use crate::config::Config;
use crate::event::EnrichedConversation;
use crate::produce::{ProduceArgs, produce};
use crate::bench::readback::{timestamps, topic_size};
use crate::worker;



/// Removes the demo's temporary store directory when dropped: on every way out of `run`,
/// errors and interruptions included.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("could not remove the demo's store {}: {e}", self.0.display()),
        }
    }
}

/// Ctrl-C during the demo: the first stops the worker (the demo then cleans up and exits with
/// an error), a second removes the store directory and quits at once.
struct Interrupt {
    flag: Arc<AtomicBool>,
    listener: tokio::task::JoinHandle<()>,
}

impl Interrupt {
    fn listen(stop: Arc<AtomicBool>, store_dir: PathBuf) -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        let listener = tokio::spawn({
            let flag = flag.clone();
            async move {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                flag.store(true, Ordering::SeqCst);
                stop.store(true, Ordering::SeqCst);
                progress_message("interrupted: stopping the worker and removing the demo's store (Ctrl-C again to quit at once)");
                if tokio::signal::ctrl_c().await.is_ok() {
                    let _ = std::fs::remove_dir_all(&store_dir);
                    let _ = std::io::stderr().flush();
                    // SAFETY: ends the process at once, as main does (no libtorch destructors)
                    unsafe { libc::_exit(130) }
                }
            }
        });
        Self { flag, listener }
    }

    fn check(&self) -> Result<()> {
        if self.flag.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

pub async fn run(config: Option<&Path>, conversations: u64, timeout: Duration) -> Result<()> {
    // The embedded Qdrant engine in a fresh directory, removed on every way out.
    let store_dir = std::env::temp_dir().join(format!("convoflow-demo-{}", std::process::id()));
    let _remove = RemoveOnDrop(store_dir.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let interrupt = Interrupt::listen(stop.clone(), store_dir.clone());
    run_in(config, conversations, timeout, &store_dir, stop, &interrupt).await
}

async fn run_in(
    config: Option<&Path>,
    conversations: u64,
    stall_timeout: Duration,
    store_dir: &Path,
    stop: Arc<AtomicBool>,
    interrupt: &Interrupt,
) -> Result<()> {
    let configured = config.map(|p| Config::load(Some(p))).transpose()?;
    let found = find_models(configured.as_ref().map(|c| &c.models));
    let mock = MockCluster::new(3).context("starting librdkafka's mock cluster")?;
    let mut cfg = Config::default();
    if let Some(c) = &configured {
        cfg.gpu = c.gpu.clone();
    }
    cfg.models = found.models;
    cfg.kafka.brokers = mock.bootstrap_servers();
    cfg.kafka.create_topics = false; // the mock cluster's admin API hangs; topics are made here
    cfg.kafka.session_timeout_ms = 6_000;
    cfg.telemetry.listen = "127.0.0.1:0".into(); // any free port: several demos may run
    cfg.qdrant.data_dir = store_dir.to_path_buf();
    if cfg.models.embedding.is_none() {
        cfg.qdrant.dense_dim = Some(384); // sized for all-MiniLM-L6-v2; the points get BM25 only
    }
    for topic in [&cfg.kafka.input_topic, &cfg.kafka.output_topic, &cfg.kafka.dlq_topic()] {
        mock.create_topic(topic, PARTITIONS, 1).with_context(|| format!("creating {topic}"))?;
    }
    println!("convoflow demo: in-process Kafka (mock cluster, 3 brokers) at {}", cfg.kafka.brokers);
    println!("vector store: embedded Qdrant engine (qdrant-edge) in {} (removed at exit)", store_dir.display());
    println!("models ({}):", crate::infer::device::parse_device(&cfg.gpu.device).map(|d| format!("{d:?}")).unwrap_or_default());
    for line in found.lines.iter().chain(&found.help) {
        println!("  {line}");
    }

    let args = ProduceArgs {
        count: conversations,
        input: None,
        format: WireFormat::Avro,
        topic: None,
        seed: 2026,
        whole: false,
        partitions: PARTITIONS as usize,
    };
    produce(&cfg, args).await?;
    interrupt.check()?;
    let expected = topic_size(&cfg.kafka, &cfg.kafka.input_topic)?;

    // the demo stops its worker once everything is enriched and then searches the store: the
    // store's flush at the end must be waited for, not cut at a pod's grace period
    cfg.pipeline.shutdown_timeout_ms = cfg.pipeline.shutdown_timeout_ms.max(IN_PROCESS_SHUTDOWN_MS);
    if cfg.models.embedding.is_some() || !cfg.models.ner.is_empty() || !cfg.models.sentiment.is_empty() {
        println!("loading the models…");
    }
    let mut readback = Readback::new(&cfg.kafka)?;
    let started = Instant::now();
    let worker_ended = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn({
        let (cfg, stop, ended) = (cfg.clone(), stop.clone(), worker_ended.clone());
        async move {
            let result = worker::run(cfg, stop).await;
            ended.store(true, Ordering::SeqCst);
            result
        }
    });
    let waited = {
        let (ended_flag, interrupted) = (worker_ended.clone(), interrupt.flag.clone());
        tokio::task::spawn_blocking(move || {
            let ended = readback.wait(expected, stall_timeout, &ended_flag, &interrupted);
            (readback, ended)
        })
        .await
    };
    let gave_up_after = started.elapsed();
    // whatever ended the wait, the worker is stopped and waited for before anything else
    stop.store(true, Ordering::SeqCst);
    let worker_result = worker.await.context("worker task")?;
    let (readback, ended) = waited.context("reading the enriched events")?;
    let ended = ended?;
    let elapsed = readback.last_progress.unwrap_or_else(Instant::now).duration_since(started);
    // Count again now that the worker has stopped: it finishes the batches it has in flight
    // and delivers their events before it returns, so counting at the moment of giving up (as
    // the demo once did) said fewer than the worker's own `worker stopped enriched=N`.
    let readback = tokio::task::spawn_blocking(move || {
        let mut readback = readback;
        readback.drain(Duration::from_secs(30)).map(|()| readback)
    })
    .await??;
    interrupt.check()?;
    worker_result.context("the demo's worker failed")?;
    let done = readback.done();
    if done < expected {
        let why = match ended {
            Ended::Stalled => format!(
                "no event was enriched for {}s (--timeout-s), {:.0}s after the worker started",
                stall_timeout.as_secs(),
                gave_up_after.as_secs_f64()
            ),
            Ended::WorkerStopped => "the worker stopped".into(),
            Ended::Complete => "events went missing".into(),
        };
        bail!(
            "only {} of {expected} events were enriched: {why}. Counted on the output topic after the worker stopped: \
             {} records, the number in its log line `worker stopped enriched=…`{}. A slow machine: raise --timeout-s \
             or use fewer --conversations",
            readback.enriched.len(),
            readback.output_records,
            if readback.dead_lettered.is_empty() { String::new() } else { format!("; {} dead-lettered", readback.dead_lettered.len()) },
        );
    }
    let input_ts = timestamps(&cfg.kafka, &cfg.kafka.input_topic)?;
    let outputs: Vec<(i64, EnrichedConversation)> = readback.enriched.into_values().collect();
    print_summary(&outputs, readback.dead_lettered.len(), &input_ts, elapsed);
    search_examples(&cfg).await?;
    // the LLM of `convoflow ask`: the config file's llm section, else CONVOFLOW__LLM__* alone
    let llm = match &configured {
        Some(c) => c.llm.clone(),
        None => Config::load(None).map(|c| c.llm).unwrap_or_default(),
    };
    ask_example(&cfg, llm).await;
    Ok(())
}

/// Shutdown budget of an in-process worker whose store is opened again after it stops (demo,
/// bench): long enough for the embedded store's final flush (an optimizer pass can take
/// seconds on a large collection).
pub const IN_PROCESS_SHUTDOWN_MS: u64 = 600_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("convoflow-demo-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }


    #[test]
    fn the_store_directory_is_removed_on_drop() {
        let dir = scratch("drop");
        std::fs::create_dir_all(dir.join("collection/wal")).unwrap();
        drop(RemoveOnDrop(dir.clone()));
        assert!(!dir.exists());
        drop(RemoveOnDrop(dir.clone())); // already gone: fine
    }
}
