//! `convoflow bench --models-only`: inference throughput of the three models on generated turns
//! of realistic length (about 8–120 tokens), one model after the other and all three together.

pub mod e2e;
pub mod readback;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::infer::batch::{BatchStats, Budget};
use crate::infer::{Model, Task, device};
use crate::sample::SampleGenerator;

pub struct ModelsBenchArgs {
    /// Folder holding `embedding/`, `ner/` and `sentiment/` model folders (any may be absent).
    pub models: PathBuf,
    pub turns: usize,
    pub device: String,
    pub dtype: String,
    pub budget: Budget,
    pub threads: usize,
    pub json: Option<PathBuf>,
    pub dump_turns: Option<PathBuf>,
    /// Also time each model on inputs of exactly these lengths in tokens (the cost curve).
    pub lengths: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct ModelResult {
    pub task: String,
    pub model: String,
    pub turns: usize,
    pub seconds: f64,
    pub turns_per_s: f64,
    pub tokens_per_s: f64,
    pub padding_ratio: f64,
    pub batches: usize,
    /// CUDA: the model's weights, and the most memory its run took beyond what was allocated
    /// before it (activations, outputs), MiB.
    pub weights_mib: Option<f64>,
    pub peak_activations_mib: Option<f64>,
    /// How the model's Linear layers ran (`Model::linear_backend`: e.g. `onednn`, `int8+onednn`,
    /// `libtorch`); None for the combined row.
    pub linear: Option<String>,
}

impl ModelResult {
    fn new(task: &str, model: String, turns: usize, seconds: f64, stats: &BatchStats) -> Self {
        Self {
            task: task.to_string(),
            model,
            turns,
            seconds,
            turns_per_s: turns as f64 / seconds,
            tokens_per_s: stats.real_tokens as f64 / seconds,
            padding_ratio: stats.padding_ratio(),
            batches: stats.batches,
            weights_mib: None,
            peak_activations_mib: None,
            linear: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub dtype: String,
    pub threads: usize,
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    pub results: Vec<ModelResult>,
    pub peak_rss_mib: f64,
    /// CUDA only: libtorch allocator peak of allocated / reserved bytes, in MiB.
    pub gpu_peak_allocated_mib: Option<f64>,
    pub gpu_peak_reserved_mib: Option<f64>,
}

/// Generated turns: 1 to 5 consecutive sample sentences joined, so lengths spread over
/// roughly 8–120 tokens like real chat and call turns.
pub fn generate_turns(n: usize, seed: u64) -> Vec<String> {
    let g = SampleGenerator::new(seed);
    let pool: Vec<String> = (0..200).flat_map(|c| g.conversation(c).turns).map(|t| t.text).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let k = rng.random_range(1..=5usize);
            let start = rng.random_range(0..pool.len() - k);
            pool[start..start + k].join(" ")
        })
        .collect()
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

fn run_task(model: &Model, turns: &[&str], budget: &Budget) -> Result<BatchStats> {
    Ok(match model.task {
        Task::Embedding => model.embed(turns, budget)?.1,
        Task::SequenceClassification => model.classify(turns, budget)?.1,
        Task::TokenClassification => model.entities(turns, budget, 128)?.1,
    })
}

/// `count` inputs of exactly `length` tokens (special tokens included) cut from the model's
/// tokens of the generated turns, through the model (padding-free batches): the cost of one
/// input of that length.
fn fixed_length(task: &str, model: &Model, turns: &[String], length: usize, count: usize, budget: &Budget) -> Result<ModelResult> {
    let tok = &model.tokenizer;
    let mut stream: Vec<u32> = Vec::new();
    for t in turns {
        stream.extend(tok.encode_plain(t)?.get_ids());
        if stream.len() > length * 4 {
            break;
        }
    }
    let content = length.saturating_sub(tok.prefix_ids.len() + tok.suffix_ids.len()).max(1);
    anyhow::ensure!(stream.len() >= content, "not enough generated text for {length}-token inputs");
    let seqs: Vec<Vec<i64>> =
        (0..count).map(|i| tok.wrap(&[], &stream[(i * 7) % (stream.len() - content + 1)..][..content])).collect();
    model.run_sequences(&seqs[..seqs.len().min(8)], budget)?; // warm-up at this shape
    let started = Instant::now();
    let (_, stats) = model.run_sequences(&seqs, budget)?;
    let secs = started.elapsed().as_secs_f64();
    Ok(ModelResult::new(&format!("{task}@{length}"), model.folder.path.display().to_string(), count, secs, &stats))
}

pub fn run_models(args: &ModelsBenchArgs) -> Result<BenchReport> {
    if args.threads > 0 {
        tch::set_num_threads(args.threads as i32);
    }
    let dev = device::parse_device(&args.device)?;
    let kind = device::parse_dtype(&args.dtype, dev)?;
    let turns = generate_turns(args.turns, 17);
    if let Some(path) = &args.dump_turns {
        std::fs::write(path, serde_json::to_string(&turns)?).with_context(|| format!("writing {}", path.display()))?;
    }
    let refs: Vec<&str> = turns.iter().map(String::as_str).collect();
    let mut loaded = Vec::new();
    for (sub, task) in [("embedding", Task::Embedding), ("ner", Task::TokenClassification), ("sentiment", Task::SequenceClassification)] {
        let dir: &Path = &args.models.join(sub);
        if dir.exists() {
            let model = Model::load(dir, task, dev, kind).with_context(|| format!("loading {}", dir.display()))?;
            // warm-up: first kernels, allocator growth, a range of shapes
            run_task(&model, &refs[..refs.len().min(256)], &args.budget)?;
            loaded.push((sub, model));
        }
    }
    anyhow::ensure!(!loaded.is_empty(), "no model folder (embedding/, ner/, sentiment/) under {}", args.models.display());
    let cuda = match dev {
        tch::Device::Cuda(i) => Some(i),
        _ => None,
    };
    let mut results = Vec::new();
    let mut total = BatchStats::default();
    let all_started = Instant::now();
    for (sub, model) in &loaded {
        let before = cuda.and_then(|i| {
            crate::infer::cuda::reset_peak(i).ok()?;
            crate::infer::cuda::memory_stats(i).ok()
        });
        let started = Instant::now();
        let stats = run_task(model, &refs, &args.budget)?;
        let secs = started.elapsed().as_secs_f64();
        total.add(&stats);
        let mut result = ModelResult::new(sub, model.folder.path.display().to_string(), turns.len(), secs, &stats);
        result.linear = Some(model.linear_backend());
        if let (Some(i), Some(before)) = (cuda, before) {
            let after = crate::infer::cuda::memory_stats(i)?;
            result.weights_mib = Some(model.parameter_bytes as f64 / 1_048_576.0);
            result.peak_activations_mib = Some(after.allocated_peak.saturating_sub(before.allocated) as f64 / 1_048_576.0);
        }
        results.push(result);
    }
    let secs = all_started.elapsed().as_secs_f64();
    let together = format!("{} models, one after the other", loaded.len());
    results.push(ModelResult::new("all", together, turns.len(), secs, &total));
    for &length in &args.lengths {
        for (sub, model) in &loaded {
            results.push(fixed_length(sub, model, &turns, length, args.turns, &args.budget)?);
        }
    }
    if loaded.len() > 1 {
        // all at once, each model on its own thread (and CUDA stream), like the worker runs them
        let started = Instant::now();
        let stats = std::thread::scope(|scope| -> Result<BatchStats> {
            let handles: Vec<_> = std::mem::take(&mut loaded)
                .into_iter()
                .map(|(_, model)| {
                    let (refs, budget) = (&refs, &args.budget);
                    // tch tensors are Send, not Sync: each model moves to its thread
                    scope.spawn(move || -> Result<BatchStats> {
                        let _stream = match cuda {
                            Some(i) => {
                                let s = crate::infer::cuda::Stream::from_pool(i, false)?;
                                let g = crate::infer::cuda::StreamGuard::new(&s)?;
                                Some((s, g))
                            }
                            None => None,
                        };
                        run_task(&model, refs, budget)
                    })
                })
                .collect();
            let mut total = BatchStats::default();
            for h in handles {
                let stats = h.join().map_err(|_| anyhow::anyhow!("a model thread panicked"))??;
                total.add(&stats);
            }
            Ok(total)
        })?;
        let secs = started.elapsed().as_secs_f64();
        let together = format!("{} models at once, one thread (and CUDA stream) each", loaded.len());
        results.push(ModelResult::new("concurrent", together, turns.len(), secs, &stats));
    }
    let gpu = match dev {
        tch::Device::Cuda(i) => crate::infer::cuda::memory_stats(i).ok(),
        _ => None,
    };
    let report = BenchReport {
        device: format!("{dev:?}"),
        dtype: format!("{kind:?}"),
        threads: tch::get_num_threads() as usize,
        max_batch_tokens: args.budget.max_batch_tokens,
        max_batch_size: args.budget.max_batch_size,
        results,
        peak_rss_mib: peak_rss_mib(),
        gpu_peak_allocated_mib: gpu.map(|m| m.allocated_peak as f64 / 1_048_576.0),
        gpu_peak_reserved_mib: gpu.map(|m| m.reserved_peak as f64 / 1_048_576.0),
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

pub fn print_report(r: &BenchReport) {
    println!(
        "device {} {} | {} threads | budget {} tokens / {} sequences | peak RSS {:.0} MiB",
        r.device, r.dtype, r.threads, r.max_batch_tokens, r.max_batch_size, r.peak_rss_mib
    );
    if let (Some(a), Some(r)) = (r.gpu_peak_allocated_mib, r.gpu_peak_reserved_mib) {
        println!("GPU allocator peak: {a:.0} MiB allocated, {r:.0} MiB reserved");
    }
    println!("| task | turns | seconds | turns/s | tokens/s | padding | batches | linear | weights MiB | peak activations MiB |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mib = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    for m in &r.results {
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.0} | {:.1}% | {} | {} | {} | {} |",
            m.task,
            m.turns,
            m.seconds,
            m.turns_per_s,
            m.tokens_per_s,
            m.padding_ratio * 100.0,
            m.batches,
            m.linear.as_deref().unwrap_or("-"),
            mib(m.weights_mib),
            mib(m.peak_activations_mib)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_turns_are_deterministic_and_of_varied_length() {
        let a = generate_turns(200, 3);
        assert_eq!(a, generate_turns(200, 3));
        let words: Vec<usize> = a.iter().map(|t| t.split_whitespace().count()).collect();
        assert!(*words.iter().min().unwrap() <= 12 && *words.iter().max().unwrap() >= 60, "{words:?}");
    }
}
