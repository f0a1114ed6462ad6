//! The native encoder against transformers on the same weights (fixtures built by
//! scripts/fixtures/make_models.py: random models with the reference configs, 2 layers).

use std::path::{Path, PathBuf};

use convoflow::infer::hf::ModelError;
use convoflow::infer::packed::CpuLinear;
use convoflow::infer::{Model, Task, ner};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(std::env::var("CONVOFLOW_MODEL_FIXTURES").expect(
        "CONVOFLOW_MODEL_FIXTURES is not set: run the tests with scripts/test, which builds the model fixtures",
    ))
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name).join("expected.json")).unwrap()).unwrap()
}

fn texts(exp: &Value) -> Vec<String> {
    exp["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

fn load(name: &str, task: Task) -> Model {
    Model::load(&fixtures().join(name), task, Device::Cpu, Kind::Float).unwrap()
}

fn as_matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

/// max |a - b| / max |b|
fn relative_error(ours: &[Vec<f32>], reference: &[Vec<f32>]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let (mut diff, mut scale) = (0f32, 0f32);
    for (a, b) in ours.iter().zip(reference) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            diff = diff.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    diff / scale
}

/// (label, start, end) of the entities transformers found in text `i`.
fn expected_spans(exp: &Value, i: usize) -> Vec<(String, i64, i64)> {
    expected_spans_of(exp, "entities", i)
}

fn expected_spans_of(exp: &Value, key: &str, i: usize) -> Vec<(String, i64, i64)> {
    exp[key][i]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["label"].as_str().unwrap().to_string(), e["start"].as_i64().unwrap(), e["end"].as_i64().unwrap()))
        .collect()
}

fn spans(entities: &[convoflow::event::Entity]) -> Vec<(String, i64, i64)> {
    entities.iter().map(|e| (e.label.clone(), i64::from(e.start), i64::from(e.end))).collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    Vec::<Vec<f32>>::try_from(t).unwrap()
}

#[test]
fn xlm_roberta_embeddings_match_transformers() {
    let exp = expected("embed-xlmr");
    let model = load("embed-xlmr", Task::Embedding);
    let texts = texts(&exp);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let out = rows(&model.forward(&model.tokenize(&refs).unwrap()));
    let err = relative_error(&out, &as_matrix(&exp["embeddings"]));
    println!("xlm-roberta embeddings: max relative error {err:.2e}");
    assert!(err <= 1e-4, "relative error {err}");
}

#[test]
fn both_cpu_linear_backends_match_transformers() {
    // the fp32 tests above run the default (oneDNN-packed weights, activation fused); here each
    // backend is chosen explicitly, so MKL's path (CONVOFLOW_CPU_LINEAR=mkl) stays proven too
    assert!(convoflow::infer::packed::available(), "this libtorch has no oneDNN");
    for (name, task, key) in [
        ("embed-xlmr", Task::Embedding, "embeddings"),
        ("sentiment-bert", Task::SequenceClassification, "probabilities"),
    ] {
        let exp = expected(name);
        let texts = texts(&exp);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        for (backend, shown) in [(CpuLinear::OneDnn, "onednn"), (CpuLinear::Mkl, "libtorch")] {
            let model = Model::load_with(&fixtures().join(name), task, Device::Cpu, Kind::Float, backend).unwrap();
            assert_eq!(model.linear_backend(), shown, "{name} {backend:?}");
            let out = rows(&model.forward(&model.tokenize(&refs).unwrap()));
            let err = relative_error(&out, &as_matrix(&exp[key]));
            println!("{name} with {backend:?}: max relative error {err:.2e}");
            assert!(err <= 1e-4, "{name} with {backend:?}: relative error {err}");
        }
    }
    let ner = Model::load_with(&fixtures().join("ner-camembert"), Task::TokenClassification, Device::Cpu, Kind::QInt8, CpuLinear::OneDnn);
    // int8 NER keeps its feed-forward output layers fp32: those are packed
    assert_eq!(ner.unwrap().linear_backend(), "int8+onednn");
}

#[test]
fn bert_sequence_classification_matches_transformers() {
    let exp = expected("sentiment-bert");
    let model = load("sentiment-bert", Task::SequenceClassification);
    assert_eq!(model.labels, ["1 star", "2 stars", "3 stars", "4 stars", "5 stars"]);
    let texts = texts(&exp);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let out = rows(&model.forward(&model.tokenize(&refs).unwrap()));
    let reference = as_matrix(&exp["probabilities"]);
    let max_abs = out.iter().flatten().zip(reference.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("bert sequence classification: max abs probability difference {max_abs:.2e}");
    assert!(max_abs <= 1e-4, "probabilities differ by {max_abs}");
    for (p, r) in out.iter().zip(&reference) {
        assert_eq!(convoflow::infer::stars(p).0, convoflow::infer::stars(r).0);
    }
}

/// A token-classification fixture's token probabilities (≤ 1e-4 relative) and entities (the
/// same spans and labels, scores within 1e-4) against transformers' pipeline.
fn token_classification_matches_transformers(name: &str) {
    let exp = expected(name);
    let model = load(name, Task::TokenClassification);
    let texts = texts(&exp);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batch = model.tokenize(&refs).unwrap();
    let probs = model.forward(&batch);
    for (i, text) in texts.iter().enumerate() {
        let n = batch.encodings[i].len() as i64;
        let ours = rows(&probs.get(i as i64).narrow(0, 0, n));
        let reference = as_matrix(&exp["token_probabilities"][i]);
        let err = relative_error(&ours, &reference);
        println!("{name} token probabilities, text {i}: max relative error {err:.2e}");
        assert!(err <= 1e-4, "text {i}: token probabilities relative error {err}");

        let entities = ner::aggregate_simple(text, &batch.encodings[i], &probs.get(i as i64), &model.labels);
        let expected_entities = exp["entities"][i].as_array().unwrap();
        assert_eq!(spans(&entities), expected_spans(&exp, i), "text {i}: {text}");
        for (e, x) in entities.iter().zip(expected_entities) {
            assert!((f64::from(e.score) - x["score"].as_f64().unwrap()).abs() <= 1e-4);
            let chars: Vec<char> = text.chars().collect();
            assert_eq!(e.text, chars[e.start as usize..e.end as usize].iter().collect::<String>());
        }
    }
}

#[test]
fn camembert_token_classification_and_entities_match_transformers() {
    token_classification_matches_transformers("ner-camembert");
}

/// Davlan/xlm-roberta-base-ner-hrl's architecture (XLMRobertaForTokenClassification, base,
/// BIO labels with DATE), on French, English, German, Spanish, Arabic, Chinese and Portuguese.
#[test]
fn xlm_roberta_ner_token_classification_and_entities_match_transformers() {
    let exp = expected("ner-xlmr");
    assert!(texts(&exp).len() > 10, "the multilingual texts are in the fixture");
    let labels: Vec<String> = load("ner-xlmr", Task::TokenClassification).labels.clone();
    assert_eq!(labels, ["O", "B-DATE", "I-DATE", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]);
    let found: usize = (0..texts(&exp).len()).map(|i| exp["entities"][i].as_array().unwrap().len()).sum();
    assert!(found > 0, "the random head finds some entities to compare");
    token_classification_matches_transformers("ner-xlmr");
}

#[test]
fn outputs_do_not_depend_on_batch_composition_or_order() {
    let exp = expected("embed-xlmr");
    let model = load("embed-xlmr", Task::Embedding);
    let texts = texts(&exp);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let together = rows(&model.forward(&model.tokenize(&refs).unwrap()));
    let mut reversed_refs = refs.clone();
    reversed_refs.reverse();
    let mut reversed = rows(&model.forward(&model.tokenize(&reversed_refs).unwrap()));
    reversed.reverse();
    for (i, text) in refs.iter().enumerate() {
        let alone = rows(&model.forward(&model.tokenize(&[text]).unwrap()));
        for other in [&together[i], &reversed[i]] {
            let diff = alone[0].iter().zip(other).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-5, "text {i} differs by {diff} between batch compositions");
        }
    }
}

/// A copy of a fixture folder with links to its big files, to break one thing at a time.
fn broken_copy(name: &str, tag: &str) -> PathBuf {
    let src = fixtures().join(name);
    let dst = std::env::temp_dir().join(format!("convoflow-broken-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
    dst
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
}

#[test]
fn bad_model_folders_give_clear_errors() {
    let err = |dir: &Path, task| Model::load(dir, task, Device::Cpu, Kind::Float).err().expect("must fail");

    let missing_weights = broken_copy("ner-camembert", "weights");
    std::fs::remove_file(missing_weights.join("model.safetensors")).unwrap();
    let e = err(&missing_weights, Task::TokenClassification);
    assert!(matches!(e, ModelError::MissingFile { .. }) && e.to_string().contains("model.safetensors"), "{e}");

    let missing_tokenizer = broken_copy("ner-camembert", "tok");
    std::fs::remove_file(missing_tokenizer.join("tokenizer.json")).unwrap();
    assert!(err(&missing_tokenizer, Task::TokenClassification).to_string().contains("missing tokenizer.json"));

    let missing_config = broken_copy("ner-camembert", "cfg");
    std::fs::remove_file(missing_config.join("config.json")).unwrap();
    assert!(err(&missing_config, Task::TokenClassification).to_string().contains("missing config.json"));

    let unsupported = broken_copy("ner-camembert", "arch");
    edit_config(&unsupported, |c| c["model_type"] = "gpt2".into());
    let e = err(&unsupported, Task::TokenClassification);
    assert!(matches!(e, ModelError::UnsupportedArchitecture { .. }) && e.to_string().contains("gpt2"), "{e}");

    let mismatch = broken_copy("ner-camembert", "shape");
    edit_config(&mismatch, |c| c["intermediate_size"] = 1024.into());
    let e = err(&mismatch, Task::TokenClassification);
    assert!(e.to_string().contains("encoder.layer.0.intermediate.dense.weight"), "names the tensor: {e}");
    assert!(e.to_string().contains("[1024, 768]") && e.to_string().contains("[3072, 768]"), "{e}");

    for dir in [missing_weights, missing_tokenizer, missing_config, unsupported, mismatch] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn budgeted_batches_give_the_same_outputs_in_input_order() {
    use convoflow::infer::batch::Budget;
    let exp = expected("sentiment-bert");
    let model = load("sentiment-bert", Task::SequenceClassification);
    let texts = texts(&exp);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let reference = as_matrix(&exp["probabilities"]);
    for budget in [Budget { max_batch_tokens: 64, max_batch_size: 3 }, Budget { max_batch_tokens: 100_000, max_batch_size: 64 }] {
        let (probs, stats) = model.classify(&refs, &budget).unwrap();
        assert_eq!(stats.sequences, texts.len());
        assert!(stats.padded_tokens >= stats.real_tokens);
        let diff = probs.iter().flatten().zip(reference.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-4, "{budget:?}: {diff}");
    }
    let small = model.classify(&refs, &Budget { max_batch_tokens: 64, max_batch_size: 3 }).unwrap();
    let large = model.classify(&refs, &Budget { max_batch_tokens: 100_000, max_batch_size: 64 }).unwrap();
    assert!(small.1.batches > large.1.batches);
    assert!(small.1.padding_ratio() <= large.1.padding_ratio(), "sorted small batches pad less");
    let diff = small.0.iter().flatten().zip(large.0.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff <= 1e-5, "batch composition changed outputs by {diff}");
}

#[test]
fn windowed_ner_matches_transformers_on_short_texts() {
    let exp = expected("ner-camembert");
    let model = load("ner-camembert", Task::TokenClassification);
    let texts = texts(&exp);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (entities, _) = model.entities(&refs, &Default::default(), 128).unwrap();
    for (i, found) in entities.iter().enumerate() {
        assert_eq!(spans(found), expected_spans(&exp, i), "text {i}");
    }
}

#[test]
fn ner_on_a_turn_longer_than_512_tokens_finds_entities_after_token_600() {
    let model = load("ner-camembert", Task::TokenClassification);
    let tokenizer = tokenizers::Tokenizer::from_file(fixtures().join("ner-camembert/tokenizer.json")).unwrap();
    let sentence = "Le conseiller Jean Martin de la SNCF a rappelé Camille à Bordeaux pour son billet. ";
    let mut text = String::new();
    while tokenizer.encode(text.as_str(), false).unwrap().len() < 900 {
        text.push_str(sentence);
    }
    let enc = tokenizer.encode_char_offsets(text.as_str(), false).unwrap();
    assert!(enc.len() >= 900);
    let char_after_600 = enc.get_offsets()[600].0 as i32;
    let (entities, stats) = model.entities(&[&text], &Default::default(), 128).unwrap();
    assert!(stats.sequences >= 2, "the turn was split into windows");
    let late: Vec<_> = entities[0].iter().filter(|e| e.start >= char_after_600).collect();
    assert!(!late.is_empty(), "no entity found after token 600");
    // entities cover the whole turn; the truncating path stops at the model length
    let last_end = entities[0].iter().map(|e| e.end).max().unwrap();
    assert!(last_end > enc.get_offsets()[850].0 as i32, "entities reach the end of the turn");
    let truncated = model.tokenize(&[&text]).unwrap();
    assert_eq!(truncated.max_len, model.max_positions(), "the plain path truncates at {}", model.max_positions());
}

#[test]
fn a_managed_model_loads_eagerly_or_on_first_use() {
    use convoflow::config::ModelConfig;
    use convoflow::infer::manager::ManagedModel;
    let cfg = |name: &str| ModelConfig {
        name: format!("fixture/{name}"),
        path: fixtures().join(name),
        dtype: "fp16".into(), // CPU runs fp32 whatever is configured
        batch_size: 8,
        max_batch_tokens: 4096,
        document_prefix: String::new(),
        query_template: "{query}".into(),
        languages: vec![],
    };
    let cpu = tch::Device::Cpu;
    let eager = ManagedModel::new(Task::SequenceClassification, cfg("sentiment-bert"), cpu).unwrap();
    eager.ensure_loaded().unwrap();
    assert!(eager.is_loaded());
    let report = eager.report().unwrap();
    assert_eq!(report.kind, Kind::Float, "CPU runs fp32");
    assert!(report.parameter_bytes > 300 << 20, "BERT-base vocabulary alone is > 300 MiB in fp32");

    let ner = ManagedModel::new(Task::TokenClassification, cfg("ner-camembert"), cpu).unwrap();
    assert!(!ner.is_loaded(), "on demand: nothing loaded yet");
    let labels = ner.with(|m| m.labels.clone()).unwrap();
    assert_eq!(labels, ["O", "I-LOC", "I-PER", "I-MISC", "I-ORG"]);
    assert!(ner.is_loaded());
    let first_load = ner.report().unwrap().seconds;
    ner.ensure_loaded().unwrap();
    assert_eq!(ner.report().unwrap().seconds, first_load, "loaded once");

    let missing = ModelConfig { path: fixtures().join("missing"), ..cfg("sentiment-bert") };
    let err = match ManagedModel::new(Task::SequenceClassification, missing, cpu).and_then(|m| m.ensure_loaded()) {
        Err(e) => format!("{e:#}"),
        Ok(()) => panic!("a missing folder loads"),
    };
    assert!(err.contains("missing config.json"), "{err}");
}

#[test]
fn first_aggregation_matches_transformers() {
    use convoflow::infer::ner::Aggregation;
    let exp = expected("ner-camembert");
    let model = load("ner-camembert", Task::TokenClassification);
    let texts = texts(&exp);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (entities, _) = model.entities_with(&refs, &Default::default(), 128, Aggregation::First).unwrap();
    let expected_first = &exp["entities_first"];
    for (i, found) in entities.iter().enumerate() {
        assert_eq!(spans(found), expected_spans_of(&exp, "entities_first", i), "text {i}: {}", texts[i]);
        for (e, x) in found.iter().zip(expected_first[i].as_array().unwrap()) {
            assert!((f64::from(e.score) - x["score"].as_f64().unwrap()).abs() <= 1e-4);
        }
    }
}

#[test]
fn model_threads_run_the_three_models_at_once_with_the_same_results() {
    use convoflow::config::ModelConfig;
    use convoflow::infer::manager::ManagedModel;
    use convoflow::infer::runner::{ModelThread, NerSettings, Output};
    let cfg = |name: &str| ModelConfig {
        name: format!("fixture/{name}"),
        path: fixtures().join(name),
        dtype: "fp32".into(),
        batch_size: 4,
        max_batch_tokens: 2048,
        document_prefix: String::new(),
        query_template: "{query}".into(),
        languages: vec![],
    };
    let thread = |name: &str, task, eager| {
        ModelThread::spawn(ManagedModel::new(task, cfg(name), Device::Cpu).unwrap(), eager, NerSettings::default()).unwrap()
    };
    let embed = thread("embed-xlmr", Task::Embedding, true);
    let ner = thread("ner-camembert", Task::TokenClassification, false);
    let sent = thread("sentiment-bert", Task::SequenceClassification, true);
    assert!(embed.load_report().is_some(), "eager: loaded before spawn returned");
    assert!(ner.load_report().is_none(), "on demand: not loaded yet");

    let texts: Vec<String> = texts(&expected("ner-camembert"));
    // all three at once, then collect
    let (e, n, s) = (embed.submit(texts.clone()).unwrap(), ner.submit(texts.clone()).unwrap(), sent.submit(texts.clone()).unwrap());
    let Output::Embeddings(emb) = e.recv().unwrap().unwrap().0 else { panic!("embeddings expected") };
    let Output::Entities(ents) = n.recv().unwrap().unwrap().0 else { panic!("entities expected") };
    let Output::Probabilities(probs) = s.recv().unwrap().unwrap().0 else { panic!("probabilities expected") };
    assert!(ner.load_report().is_some(), "loaded at first use");

    let exp = expected("embed-xlmr");
    assert!(relative_error(&emb, &as_matrix(&exp["embeddings"])) <= 1e-4);
    let exp = expected("ner-camembert");
    for (i, found) in ents.iter().enumerate() {
        assert_eq!(spans(found), expected_spans(&exp, i), "text {i}");
    }
    let exp = expected("sentiment-bert");
    let diff = probs.iter().flatten().zip(as_matrix(&exp["probabilities"]).iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff <= 1e-4, "{diff}");

    // one job per text, all queued before any is read: a thread queues its next job on the
    // model before it reads and post-processes the previous one; each reply is still its own
    let queued: Vec<_> =
        texts.iter().map(|t| (embed.submit(vec![t.clone()]).unwrap(), ner.submit(vec![t.clone()]).unwrap())).collect();
    let (exp_emb, exp_ner) = (as_matrix(&expected("embed-xlmr")["embeddings"]), expected("ner-camembert"));
    for (i, (e, n)) in queued.into_iter().enumerate() {
        let Output::Embeddings(one) = e.recv().unwrap().unwrap().0 else { panic!("embeddings expected") };
        assert!(relative_error(&one, &exp_emb[i..=i]) <= 1e-4, "queued embedding job {i}");
        let Output::Entities(one) = n.recv().unwrap().unwrap().0 else { panic!("entities expected") };
        assert_eq!(spans(&one[0]), expected_spans(&exp_ner, i), "queued NER job {i}");
    }

    let broken = ModelThread::spawn(
        ManagedModel::new(Task::Embedding, ModelConfig { path: fixtures().join("missing"), ..cfg("embed-xlmr") }, Device::Cpu).unwrap(),
        true,
        NerSettings::default(),
    );
    assert!(format!("{:#}", broken.err().unwrap()).contains("missing config.json"));
}

// ---- int8 (dynamic quantization of the encoder's Linear layers, CPU) against fp32 ----

/// Outputs of `model` for `texts` through the production path (token-budget batches), one
/// per text: [hidden] / [labels] rows, or [len, labels] for token classification.
fn outputs(model: &Model, texts: &[&str]) -> Vec<Tensor> {
    let seqs = model.encode_ids(texts).unwrap();
    model.run_sequences(&seqs, &Default::default()).unwrap().0
}

/// The fixture's texts and generated turns (1–5 sample sentences each, French and English).
fn int8_texts(name: &str, turns: usize) -> Vec<String> {
    let mut all = texts(&expected(name));
    all.extend(convoflow::bench::generate_turns(turns, 23));
    all
}

/// (agreeing, total) argmax positions over the last dimension of each pair of outputs.
fn argmax_agreement(a: &[Tensor], b: &[Tensor]) -> (i64, i64) {
    a.iter().zip(b).fold((0, 0), |(same, total), (x, y)| {
        let (ax, ay) = (x.argmax(-1, false), y.argmax(-1, false));
        (same + ax.eq_tensor(&ay).sum(Kind::Int64).int64_value(&[]), total + ax.numel() as i64)
    })
}

fn max_abs_difference(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}

fn load_kind(path: &Path, task: Task, kind: Kind) -> Model {
    Model::load(path, task, Device::Cpu, kind).unwrap()
}

/// Lowest cosine similarity between int8 and fp32 embeddings of the same texts (both
/// L2-normalised), and the largest absolute difference.
fn int8_embedding_cosine(path: &Path, texts: &[&str]) -> (f64, f64) {
    let fp32 = outputs(&load_kind(path, Task::Embedding, Kind::Float), texts);
    let int8 = outputs(&load_kind(path, Task::Embedding, Kind::QInt8), texts);
    let lowest = fp32.iter().zip(&int8).map(|(a, b)| (a * b).sum(Kind::Float).double_value(&[])).fold(f64::MAX, f64::min);
    (lowest, max_abs_difference(&fp32, &int8))
}

/// Argmax agreement of a classification fixture in int8 against fp32 on `n` texts:
/// (agreeing, compared, largest probability difference, texts).
fn int8_argmax_agreement(name: &str, task: Task, n: usize) -> (i64, i64, f64, usize) {
    let path = fixtures().join(name);
    let texts = int8_texts(name, n);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let fp32 = outputs(&load_kind(&path, task, Kind::Float), &refs);
    let int8 = outputs(&load_kind(&path, task, Kind::QInt8), &refs);
    let (same, total) = argmax_agreement(&fp32, &int8);
    (same, total, max_abs_difference(&fp32, &int8), texts.len())
}

#[test]
fn int8_token_classification_agrees_with_fp32_per_token() {
    let (same, total, diff, _) = int8_argmax_agreement("ner-camembert", Task::TokenClassification, 128);
    let agreement = same as f64 / total as f64;
    println!("camembert NER int8 vs fp32: per-token argmax agreement {agreement:.4} ({same}/{total}), max |Δp| {diff:.2e}");
    assert!(total > 2000, "enough tokens to measure: {total}");
    assert!(agreement >= 0.99, "per-token argmax agreement {agreement} ({same}/{total})");
    assert!(diff > 0.0, "int8 gave exactly the fp32 probabilities: nothing was quantized");
}

#[test]
fn int8_sequence_classification_agrees_with_fp32_per_text() {
    let (same, total, diff, texts) = int8_argmax_agreement("sentiment-bert", Task::SequenceClassification, 256);
    let agreement = same as f64 / total as f64;
    println!("bert sentiment int8 vs fp32: per-text argmax agreement {agreement:.4} ({same}/{total}), max |Δp| {diff:.2e}");
    assert_eq!(total as usize, texts);
    assert!(agreement >= 0.99, "per-text argmax agreement {agreement} ({same}/{total})");
    assert!(diff > 0.0, "int8 gave exactly the fp32 probabilities: nothing was quantized");
}

#[test]
fn int8_embeddings_agree_with_fp32_on_the_reference_architecture() {
    let texts = int8_texts("embed-xlmr", 64);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (cosine, diff) = int8_embedding_cosine(&fixtures().join("embed-xlmr"), &refs);
    println!("xlm-roberta embeddings int8 vs fp32: lowest cosine {cosine:.5}, max |Δ| {diff:.2e}");
    assert!(cosine >= 0.99, "lowest cosine {cosine}");
    assert!(diff > 0.0, "int8 gave exactly the fp32 embeddings: nothing was quantized");
}

fn real_weights(var: &str) -> PathBuf {
    PathBuf::from(std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with scripts/test")))
}

fn real_weight_texts(expected_file: &str) -> Vec<String> {
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join(expected_file)).unwrap()).unwrap();
    let mut all = texts(&exp);
    all.extend(convoflow::bench::generate_turns(64, 29));
    all
}

/// Real weights in int8 against the same weights in fp32, on the fixture texts + generated turns.
fn assert_int8_embeddings_agree(expected_file: &str, weights_var: &str, label: &str) {
    let texts = real_weight_texts(expected_file);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (cosine, diff) = int8_embedding_cosine(&real_weights(weights_var), &refs);
    println!("{label} int8 vs fp32 ({} texts): lowest cosine {cosine:.5}, max |Δ| {diff:.2e}", texts.len());
    assert!(cosine >= 0.99, "{label}: lowest cosine {cosine}");
    assert!(diff > 0.0, "{label}: nothing was quantized");
}

#[test]
fn int8_minilm_embeddings_agree_with_fp32() {
    assert_int8_embeddings_agree("minilm-expected.json", "CONVOFLOW_MINILM", "all-MiniLM-L6-v2");
}

#[test]
fn int8_multilingual_e5_small_embeddings_agree_with_fp32() {
    assert_int8_embeddings_agree("e5small-expected.json", "CONVOFLOW_E5_SMALL", "multilingual-e5-small");
}

#[test]
fn int8_is_loaded_through_the_manager_on_cpu() {
    use convoflow::config::ModelConfig;
    use convoflow::infer::manager::ManagedModel;
    let cfg = ModelConfig {
        name: "fixture/sentiment-bert".into(),
        path: fixtures().join("sentiment-bert"),
        dtype: "int8".into(),
        batch_size: 8,
        max_batch_tokens: 4096,
        document_prefix: String::new(),
        query_template: "{query}".into(),
        languages: vec![],
    };
    let managed = ManagedModel::new(Task::SequenceClassification, cfg.clone(), Device::Cpu).unwrap();
    managed.ensure_loaded().unwrap();
    assert_eq!(managed.report().unwrap().kind, Kind::QInt8);
    let err = ManagedModel::new(Task::SequenceClassification, cfg, Device::Cuda(0)).err().expect("int8 on CUDA is refused");
    assert!(format!("{err:#}").contains("CPU only"), "{err:#}");
}
