//! Model inference on CPU (fp32 and int8) with the reference-config fixtures (2 layers, random weights):
//! `scripts/setup` builds them; `CONVOFLOW_MODEL_FIXTURES` (scripts/env.sh) points at them.
//!   source scripts/env.sh && cargo bench --bench models
//! For the side-by-side comparison with transformers use scripts/bench-models.

use std::path::PathBuf;

use convoflow::bench::generate_turns;
use convoflow::infer::batch::Budget;
use convoflow::infer::{Model, Task};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tch::{Device, Kind};

fn models(c: &mut Criterion) {
    let Ok(dir) = std::env::var("CONVOFLOW_MODEL_FIXTURES") else {
        eprintln!("CONVOFLOW_MODEL_FIXTURES is not set: `source scripts/env.sh` after scripts/setup");
        return;
    };
    let turns = generate_turns(32, 17);
    let refs: Vec<&str> = turns.iter().map(String::as_str).collect();
    let budget = Budget::default();
    for (label, kind) in [("fp32", Kind::Float), ("int8", Kind::QInt8)] {
        let mut group = c.benchmark_group(format!("models, 32 generated turns, CPU {label}"));
        group.sample_size(10);
        group.throughput(Throughput::Elements(refs.len() as u64));
        for (name, task) in [
            ("embed-xlmr", Task::Embedding),
            ("ner-camembert", Task::TokenClassification),
            ("sentiment-bert", Task::SequenceClassification),
        ] {
            let model = Model::load(&PathBuf::from(&dir).join(name), task, Device::Cpu, kind).unwrap();
            group.bench_function(name, |b| {
                b.iter(|| match task {
                    Task::Embedding => model.embed(&refs, &budget).unwrap().1,
                    Task::TokenClassification => model.entities(&refs, &budget, 128).unwrap().1,
                    Task::SequenceClassification => model.classify(&refs, &budget).unwrap().1,
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, models);
criterion_main!(benches);
