//! Device checks, run on a CUDA machine with `cargo test --release --test gpu -- --ignored`
//! (scripts/gpu-check does it): the reference architectures at full size with random weights
//! (tests/data/archs), CUDA fp32 / fp16 / bf16 against the CPU fp32 path (which the parity tests
//! pin to transformers), plus throughput. Ignored by default: CI machines have no GPU.

use std::path::{Path, PathBuf};
use std::time::Instant;

use convoflow::infer::random::write_random_model;
use convoflow::infer::{Model, Task, ner};
use convoflow::sample::SampleGenerator;
use tch::{Cuda, Device, Kind, Tensor};

const ARCHS: [(&str, Task); 3] = [
    ("embed-xlmr", Task::Embedding),
    ("ner-camembert", Task::TokenClassification),
    ("sentiment-bert", Task::SequenceClassification),
];

fn materialise(name: &str, task: Task, layers: Option<i64>) -> PathBuf {
    // CONVOFLOW_REPO: where the repository is when the test binary runs on another machine
    let repo = std::env::var("CONVOFLOW_REPO").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let src = Path::new(&repo).join("tests/data/archs").join(name);
    let dir = std::env::temp_dir().join(format!("convoflow-arch-{name}-{}-{}", layers.unwrap_or(0), std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    if let Some(l) = layers {
        cfg["num_hidden_layers"] = l.into();
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    write_random_model(&dir, task, 7).unwrap();
    dir
}

fn turns(n: usize) -> Vec<String> {
    let g = SampleGenerator::new(9);
    (0..).flat_map(|c| g.conversation(c).turns).map(|t| t.text).take(n).collect()
}

fn run(model: &Model, texts: &[String]) -> Tensor {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    model.forward(&model.tokenize(&refs).unwrap())
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[])
}

/// Every architecture's random weights load through the real loader (CPU, one layer).
#[test]
fn random_weights_load_for_every_architecture() {
    for (name, task) in ARCHS {
        let dir = materialise(name, task, Some(1));
        let model = Model::load(&dir, task, Device::Cpu, Kind::Float).unwrap();
        let out = run(&model, &turns(3));
        assert_eq!(out.size()[0], 3, "{name}");
        assert!(out.isfinite().all().int64_value(&[]) == 1, "{name}: non-finite outputs");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_matches_cpu_and_reports_throughput() {
    assert!(Cuda::is_available(), "no CUDA device visible to libtorch");
    for line in convoflow::infer::device::report() {
        println!("{line}");
    }
    let texts = turns(64);
    println!("| model | dtype | error vs CPU fp32 | argmax agreement | turns/s | tokens/s | batch |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, task) in ARCHS {
        let dir = materialise(name, task, None);
        let cpu = Model::load(&dir, task, Device::Cpu, Kind::Float).unwrap();
        let reference = run(&cpu, &texts);
        // token outputs are compared on real tokens only: padding rows are no output (the CPU
        // path packs the real tokens and leaves padding rows zero; CUDA computes them)
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let real_rows = cpu.tokenize(&refs).unwrap().attention_mask.reshape([-1]).nonzero().squeeze_dim(1);
        let real = |t: &Tensor| match t.dim() {
            3 => t.reshape([-1, t.size()[2]]).index_select(0, &real_rows),
            _ => t.shallow_clone(),
        };
        drop(cpu);
        // Embeddings are compared directly. Classifier outputs are probabilities after a softmax
        // of large random-head logits, which amplifies half-precision error; for them the bound
        // is on the absolute probability difference, with argmax agreement reported.
        let bounds = match task {
            Task::Embedding => [(Kind::Float, 1e-4), (Kind::Half, 1e-2), (Kind::BFloat16, 3e-2)],
            // bf16 keeps 8 mantissa bits: on classifiers it is checked by argmax agreement only
            _ => [(Kind::Float, 1e-4), (Kind::Half, 5e-2), (Kind::BFloat16, f64::INFINITY)],
        };
        for (kind, bound) in bounds {
            let gpu = Model::load(&dir, task, Device::Cuda(0), kind).unwrap();
            let out = run(&gpu, &texts);
            let (o, r) = (real(&out), real(&reference));
            let err = if kind == Kind::Float || task == Task::Embedding {
                rel_err(&o, &r)
            } else {
                (&o - &r).abs().max().double_value(&[])
            };
            let agree = if task == Task::Embedding {
                1.0
            } else {
                o.argmax(-1, false).eq_tensor(&r.argmax(-1, false)).to_kind(Kind::Float).mean(Kind::Float).double_value(&[])
            };
            if kind == Kind::Float && task == Task::TokenClassification {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let batch = gpu.tokenize(&refs).unwrap();
                for (i, text) in texts.iter().enumerate() {
                    let a = ner::aggregate_simple(text, &batch.encodings[i], &out.get(i as i64), &gpu.labels);
                    let b = ner::aggregate_simple(text, &batch.encodings[i], &reference.get(i as i64), &gpu.labels);
                    let spans = |v: &[convoflow::event::Entity]| v.iter().map(|e| (e.label.clone(), e.start, e.end)).collect::<Vec<_>>();
                    assert_eq!(spans(&a), spans(&b), "{name}: entities differ on CUDA for {text:?}");
                }
            }
            // throughput: 2,048 sample turns in batches of 256, after one warm-up batch
            let bench = turns(2048);
            let _ = run(&gpu, &bench[..256]);
            Cuda::synchronize(0);
            let started = Instant::now();
            let mut tokens = 0;
            for chunk in bench.chunks(256) {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                let batch = gpu.tokenize(&refs).unwrap();
                tokens += batch.real_tokens;
                let _ = gpu.forward(&batch);
            }
            Cuda::synchronize(0);
            let secs = started.elapsed().as_secs_f64();
            println!(
                "| {name} | {kind:?} | {err:.2e} | {agree:.4} | {:.0} | {:.0} | 256 |",
                bench.len() as f64 / secs,
                tokens as f64 / secs
            );
            assert!(err <= bound, "{name} {kind:?}: error {err} over {bound}");
            assert!(agree >= 0.97, "{name} {kind:?}: argmax agreement {agree}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn ner_and_sentiment_run_concurrently_on_their_own_streams() {
    use convoflow::infer::batch::Budget;
    use convoflow::infer::cuda::{self, Stream, StreamGuard};
    assert!(cuda::available());
    let ner_dir = materialise("ner-camembert", Task::TokenClassification, None);
    let sent_dir = materialise("sentiment-bert", Task::SequenceClassification, None);
    let ner = Model::load(&ner_dir, Task::TokenClassification, Device::Cuda(0), Kind::Half).unwrap();
    let sent = Model::load(&sent_dir, Task::SequenceClassification, Device::Cuda(0), Kind::Half).unwrap();
    let texts = turns(4096);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let budget = Budget { max_batch_tokens: 32_768, max_batch_size: 256 };
    // warm-up and references on the default stream, one after the other
    let ner_ref = ner.entities(&refs, &budget, 128).unwrap().0;
    let sent_ref = sent.classify(&refs, &budget).unwrap().0;
    cuda::reset_peak(0).unwrap();
    let started = Instant::now(); // second pass on the default stream: warm
    let _ = ner.entities(&refs, &budget, 128).unwrap();
    let _ = sent.classify(&refs, &budget).unwrap();
    Cuda::synchronize(0);
    let sequential = started.elapsed().as_secs_f64();

    let default_stream = Stream::current(0).unwrap();
    // tch tensors are Send but not Sync: each thread owns its model, as the worker's model
    // threads will. Each thread warms its stream up first (cuBLAS workspaces and allocator pools are per
    // stream), then all start together at the barrier.
    let (refs_a, refs_b) = (refs.clone(), refs.clone());
    let barrier = std::sync::Barrier::new(3);
    let (ner_out, sent_out, ids, concurrent) = std::thread::scope(|s| {
        let barrier = &barrier;
        let a = s.spawn(move || {
            let refs = refs_a;
            let stream = Stream::from_pool(0, false).unwrap();
            let _guard = StreamGuard::new(&stream).unwrap();
            assert_eq!(Stream::current(0).unwrap(), stream, "the pool stream is current on this thread");
            let _ = ner.entities(&refs, &budget, 128).unwrap();
            stream.synchronize().unwrap();
            barrier.wait();
            let out = ner.entities(&refs, &budget, 128).unwrap().0;
            stream.synchronize().unwrap();
            (out, stream.id())
        });
        let b = s.spawn(move || {
            let refs = refs_b;
            let stream = Stream::from_pool(0, false).unwrap();
            let _guard = StreamGuard::new(&stream).unwrap();
            let _ = sent.classify(&refs, &budget).unwrap();
            stream.synchronize().unwrap();
            barrier.wait();
            let out = sent.classify(&refs, &budget).unwrap().0;
            stream.synchronize().unwrap();
            (out, stream.id())
        });
        barrier.wait();
        let started = Instant::now();
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        (a.0, b.0, (a.1, b.1), started.elapsed().as_secs_f64())
    });
    assert_eq!(Stream::current(0).unwrap(), default_stream, "the main thread kept its stream");
    assert_ne!(ids.0, ids.1, "each model has its own stream");
    assert_ne!(ids.0, default_stream.id());
    let spans = |v: &[convoflow::event::Entity]| v.iter().map(|e| (e.label.clone(), e.start, e.end)).collect::<Vec<_>>();
    let same_entities = ner_out.iter().zip(&ner_ref).filter(|(a, b)| spans(a) == spans(b)).count();
    assert!(same_entities as f64 >= 0.99 * texts.len() as f64, "entities changed on a side stream: {same_entities}/{}", texts.len());
    let max_diff = sent_out.iter().flatten().zip(sent_ref.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff <= 1e-3, "sentiment changed on a side stream by {max_diff}");
    let mem = cuda::memory_stats(0).unwrap();
    assert!(mem.allocated > 0 && mem.allocated_peak >= mem.allocated && mem.reserved >= mem.allocated && mem.device_total > 0);
    println!(
        "NER + sentiment on {} turns, fp16: sequential {sequential:.2}s ({:.0} turns/s), two streams {concurrent:.2}s ({:.0} turns/s)",
        texts.len(),
        texts.len() as f64 / sequential,
        texts.len() as f64 / concurrent
    );
    println!(
        "allocator: allocated {} MiB (peak {} MiB), reserved {} MiB (peak {} MiB), device free {} / {} MiB, OOMs {}",
        mem.allocated >> 20,
        mem.allocated_peak >> 20,
        mem.reserved >> 20,
        mem.reserved_peak >> 20,
        mem.device_free >> 20,
        mem.device_total >> 20,
        mem.out_of_memory_events
    );
    std::fs::remove_dir_all(ner_dir).unwrap();
    std::fs::remove_dir_all(sent_dir).unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn model_threads_on_cuda_match_the_default_stream() {
    use convoflow::config::ModelConfig;
    use convoflow::infer::manager::ManagedModel;
    use convoflow::infer::runner::{ModelThread, NerSettings, Output};
    let texts = turns(2048);
    let mut threads = Vec::new();
    let mut references = Vec::new();
    let mut dirs = Vec::new();
    for (name, task) in ARCHS {
        let dir = materialise(name, task, None);
        let cfg = ModelConfig {
            name: name.into(),
            path: dir.clone(),
            dtype: "fp16".into(),
            batch_size: 256,
            max_batch_tokens: 32_768,
            document_prefix: String::new(),
            query_template: "{query}".into(),
            languages: vec![],
        };
        // reference on this thread's default stream
        let direct = Model::load(&dir, task, Device::Cuda(0), Kind::Half).unwrap();
        references.push((run(&direct, &texts[..64]), run(&direct, &texts[64..128])));
        drop(direct);
        threads.push(ModelThread::spawn(ManagedModel::new(task, cfg, Device::Cuda(0)).unwrap(), true, NerSettings::default()).unwrap());
        dirs.push(dir);
    }
    // warm the thread streams, then all three at once
    for t in &threads {
        t.run(texts[..64].to_vec()).unwrap();
    }
    let started = Instant::now();
    let pending: Vec<_> = threads.iter().map(|t| t.submit(texts.clone()).unwrap()).collect();
    let outputs: Vec<_> = pending.into_iter().map(|p| p.recv().unwrap().unwrap().0).collect();
    let secs = started.elapsed().as_secs_f64();
    println!("three model threads on CUDA fp16: {} turns through all three models in {secs:.2}s ({:.0} turns/s)", texts.len(), texts.len() as f64 / secs);
    for (t, (reference, second_reference)) in threads.iter().zip(&references) {
        // two jobs queued back to back: the second goes on the stream before the first is read
        let first = t.submit(texts[..64].to_vec()).unwrap();
        let second = t.submit(texts[64..128].to_vec()).unwrap();
        let (out, _) = first.recv().unwrap().unwrap();
        match second.recv().unwrap().unwrap().0 {
            Output::Embeddings(e) => assert!(rel_err(&Tensor::from_slice2(&e), second_reference) <= 1e-2, "second queued job"),
            Output::Probabilities(p) => {
                assert!((&Tensor::from_slice2(&p) - second_reference).abs().max().double_value(&[]) <= 5e-2, "second queued job")
            }
            Output::Entities(e) => assert_eq!(e.len(), 64),
        }
        match out {
            Output::Embeddings(e) => {
                let e = Tensor::from_slice2(&e);
                assert!(rel_err(&e, reference) <= 1e-2, "embeddings differ on the model thread");
            }
            Output::Probabilities(p) => {
                let p = Tensor::from_slice2(&p);
                assert!((&p - reference).abs().max().double_value(&[]) <= 5e-2);
            }
            Output::Entities(e) => assert_eq!(e.len(), 64),
        }
    }
    assert!(matches!(outputs[0], Output::Embeddings(ref v) if v.len() == texts.len()));
    drop(threads);
    for d in dirs {
        std::fs::remove_dir_all(d).unwrap();
    }
}
