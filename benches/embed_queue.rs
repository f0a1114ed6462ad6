//! Dynamic batching of `convoflow serve`'s embeddings, A/B in one run: C client threads each
//! embedding one short text at a time on the embedding model's thread, either as text jobs —
//! how `serve` embedded every query before (texts are never merged: one job, one forward pass) —
//! or as token-id jobs, tokenized by the client thread, which the model thread launches together
//! (how `serve` queues `/v1/embeddings`, `/v1/search` and `/v1/ask` now). Prints requests/s and
//! p50/p99 per client count. The same clients over HTTP: scripts/api-bench.
//!   CONVOFLOW_E5_SMALL=<model folder> cargo bench --bench embed_queue   (source scripts/env.sh first)
//!   CONVOFLOW_BENCH_SECONDS=8, CONVOFLOW_BENCH_DEVICE=cpu|cuda, CONVOFLOW_BENCH_DTYPE=fp32|fp16

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use convoflow::config::ModelConfig;
use convoflow::infer::hf::ModelFolder;
use convoflow::infer::manager::ManagedModel;
use convoflow::infer::runner::{ModelInput, ModelThread, NerSettings};
use convoflow::infer::tokenize::ModelTokenizer;
use convoflow::infer::Task;

const TEXTS: &[&str] = &[
    "query: colis en retard à Lyon",
    "query: where is my refund",
    "query: Router startet ständig neu",
    "query: technicien rendez-vous vendredi",
    "query: cancel my mobile plan",
    "query: facture en double ce mois-ci",
];

#[derive(Clone, Copy, PartialEq)]
enum Jobs {
    /// One text per job: each a forward pass of its own.
    Texts,
    /// Token ids: queued jobs are launched together.
    Ids,
}

fn main() {
    let folder = std::path::PathBuf::from(std::env::var("CONVOFLOW_E5_SMALL").expect("CONVOFLOW_E5_SMALL: source scripts/env.sh"));
    let seconds: u64 = std::env::var("CONVOFLOW_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let device = convoflow::infer::device::parse_device(&std::env::var("CONVOFLOW_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into())).unwrap();
    let dtype = std::env::var("CONVOFLOW_BENCH_DTYPE").unwrap_or_else(|_| "fp32".into());
    let config: ModelConfig =
        serde_json::from_value(serde_json::json!({ "name": "multilingual-e5-small", "path": folder, "dtype": dtype })).unwrap();
    let thread = Arc::new(ModelThread::spawn(ManagedModel::new(Task::Embedding, config, device).unwrap(), true, NerSettings::default()).unwrap());
    let tokenizer = Arc::new(ModelTokenizer::load(&ModelFolder::open(&folder).unwrap()).unwrap());
    println!("embedding model thread, multilingual-e5-small {dtype} on {device:?}, single short texts, {seconds} s per row");
    println!("| clients | jobs | requests/s | p50 ms | p99 ms |");
    println!("| --- | --- | --- | --- | --- |");
    for clients in CLIENTS {
        for jobs in [Jobs::Texts, Jobs::Ids] {
            let (thread, tokenizer) = (thread.clone(), tokenizer.clone());
            let latencies = clients_for(clients, seconds, move |text| {
                let reply = match jobs {
                    Jobs::Texts => thread.submit(vec![text.to_string()]).unwrap(),
                    Jobs::Ids => {
                        let content = tokenizer.encode_plain(text).unwrap();
                        let ids = tokenizer.wrap(&[], content.get_ids());
                        thread.submit_withdrawable(ModelInput::Ids(vec![ids]), Arc::new(AtomicBool::new(false))).unwrap()
                    }
                };
                reply.recv().unwrap().unwrap();
            });
            let name = if jobs == Jobs::Texts { "text (before)" } else { "token ids, merged (after)" };
            row(clients, name, seconds, latencies);
        }
    }
}

const CLIENTS: [usize; 3] = [1, 8, 32];

/// `clients` threads each calling `call` with one text after the other for `seconds`: every
/// call's latency in ms.
fn clients_for(clients: usize, seconds: u64, call: impl Fn(&str) + Send + Sync + Clone + 'static) -> Vec<f64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let call = call.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut i = c;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    call(TEXTS[i % TEXTS.len()]);
                    i += 1;
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                }
                latencies
            })
        })
        .collect();
    handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
}

/// Requests/s, p50 and p99 ms.
fn stats(mut all: Vec<f64>, seconds: u64) -> (f64, f64, f64) {
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| all[((all.len() as f64 - 1.0) * p).round() as usize];
    (all.len() as f64 / seconds as f64, q(0.5), q(0.99))
}

fn row(clients: usize, name: &str, seconds: u64, latencies: Vec<f64>) {
    let (requests, p50, p99) = stats(latencies, seconds);
    println!("| {clients} | {name} | {requests:.0} | {p50:.1} | {p99:.1} |");
}
