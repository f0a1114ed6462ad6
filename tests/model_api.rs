//! The models over HTTP (`convoflow serve`, src/model_api.rs). The OpenAI-compatible
//! `/v1/embeddings` and `/v1/models` called by clients convoflow did not write — the official
//! `openai` Python client and LangChain's `OpenAIEmbeddings` (PyPI, `CONVOFLOW_API_PY`,
//! scripts/fixtures/openai_embeddings.py) — and checked against the vectors the model runtime
//! gives the worker and `search` (real multilingual-e5-small weights, CPU), plus the API's own
//! refusals over plain HTTP; `/v1/entities` and `/v1/sentiment` checked against what the worker
//! writes into the enriched event for the same turns (a mixed-language conversation through
//! the real broker, the models routed by language).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::routed;
use common::serving::{Serve, env_path};
use convoflow::config::{QdrantConfig, StoreBackend};
use convoflow::infer::hf::ModelFolder;
use convoflow::infer::tokenize::ModelTokenizer;
use convoflow::infer::{Model, Task};
use convoflow::sink::store::{self, Bootstrap, CollectionSpec, Quantization};
use serde_json::{Value, json};

const KEY: &str = "test-key-7f3a";
const MODEL: &str = "intfloat/multilingual-e5-small";

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// An empty embedded store with the collection `serve` opens (384-d).
async fn empty_store(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("embeddings-api").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = QdrantConfig { backend: StoreBackend::Edge, data_dir: dir.clone(), ..QdrantConfig::default() };
    let s = store::open(&cfg).unwrap();
    let spec = CollectionSpec { name: cfg.collection.clone(), dense_dim: 384, on_disk: false, quantization: Quantization::None };
    s.ensure_collection(&spec, Bootstrap::CreateIfMissing).await.unwrap();
    s.flush().await.unwrap();
    dir
}

fn serve_env(store: &std::path::Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("CONVOFLOW__QDRANT__DATA_DIR", store.display().to_string()),
        ("CONVOFLOW__MODELS__EMBEDDING__NAME", MODEL.into()),
        ("CONVOFLOW__MODELS__EMBEDDING__PATH", env_path("CONVOFLOW_E5_SMALL").display().to_string()),
        ("CONVOFLOW__MODELS__EMBEDDING__DTYPE", "fp32".into()),
        ("CONVOFLOW__MODELS__EMBEDDING__QUERY_TEMPLATE", "query: {query}".into()),
        ("CONVOFLOW__MODELS__EMBEDDING__DOCUMENT_PREFIX", "passage: ".into()),
        ("CONVOFLOW__GPU__DEVICE", "cpu".into()),
        ("CONVOFLOW__SERVE__API_KEY", KEY.into()),
        ("CONVOFLOW_LOG", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into()
}

/// POST with the key: status, headers' `x-convoflow-truncated` and `retry-after`, JSON body.
fn post(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Option<String>, Option<String>, Value) {
    let mut r = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("Authorization", &format!("Bearer {KEY}"))
        .send(body.to_string())
        .unwrap();
    let header = |name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_string());
    let (truncated, retry) = (header("x-convoflow-truncated"), header("retry-after"));
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, truncated, retry, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_and_langchain_get_the_vectors_the_worker_and_search_compute() {
    let store = empty_store("clients").await;
    let serve = Serve::start(&serve_env(&store, &[]));
    let out = Command::new(env_path("CONVOFLOW_API_PY"))
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fixtures/openai_embeddings.py"))
        .args([&serve.base, KEY, MODEL])
        .output()
        .expect("running the openai client");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();

    // what the worker indexes (document prefix) and search embeds (query template), computed
    // by the model runtime in this process
    let texts = ["Mon colis devait arriver à Lyon mardi.", "The refund has not arrived yet.", "Der Router startet ständig neu."];
    let model = Model::load(&env_path("CONVOFLOW_E5_SMALL"), Task::Embedding, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let documents: Vec<String> = texts.iter().map(|t| format!("passage: {t}")).collect();
    let refs: Vec<&str> = documents.iter().map(String::as_str).collect();
    let (ours, _) = model.embed(&refs, &Default::default()).unwrap();
    let (query, _) = model.embed(&["query: colis en retard"], &Default::default()).unwrap();

    let mut worst: f32 = 1.0;
    let mut check = |what: &str, theirs: &[f32], mine: &[f32]| {
        assert_eq!(theirs.len(), 384, "{what}");
        let c = cosine(theirs, mine);
        worst = worst.min(c);
        assert!(c >= 0.9999, "{what}: cosine {c}");
    };
    check("one string", &floats(&got["one"]), &ours[0]);
    for i in 0..3 {
        check("batch", &floats(&got["batch"][i]), &ours[i]);
        check("base64 decoded by the client", &floats(&got["base64_decoded"][i]), &ours[i]);
        check("langchain embed_documents", &floats(&got["langchain_documents"][i]), &ours[i]);
    }
    check("langchain embed_query (documents' form)", &floats(&got["langchain_query"]), &ours[0]);
    check("input_type query", &floats(&got["query"]), &query[0]);
    assert!(cosine(&floats(&got["query"]), &ours[0]) < 0.9999, "a query is not embedded as a document");
    // base64 as sent: little-endian float32s
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(got["base64_raw"].as_str().unwrap()).unwrap();
    let raw: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    check("base64 as sent", &raw, &ours[1]);
    assert_eq!(got["model"], MODEL);

    // usage: the tokens the model computed, special tokens and prefix included
    let tokenizer = ModelTokenizer::load(&ModelFolder::open(&env_path("CONVOFLOW_E5_SMALL")).unwrap()).unwrap();
    let ids = tokenizer.encode_ids(&refs).unwrap();
    assert_eq!(got["usage_one"].as_u64().unwrap() as usize, ids[0].len());
    assert_eq!(got["usage_batch"].as_u64().unwrap() as usize, ids.iter().map(Vec::len).sum::<usize>());

    // the client's own exceptions
    assert_eq!(got["wrong_model"]["class"], "NotFoundError", "{}", got["wrong_model"]);
    assert_eq!(got["wrong_model"]["code"], "model_not_found");
    assert_eq!(got["bad_key"]["class"], "AuthenticationError", "{}", got["bad_key"]);
    assert_eq!(got["dimensions"]["class"], "BadRequestError", "{}", got["dimensions"]);
    assert!(got["dimensions"]["message"].as_str().unwrap().contains("384-dimensional"), "{}", got["dimensions"]);
    println!("openai {} + langchain-openai: every vector within cosine {worst:.6} of the runtime's", "3.63.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_inputs_truncation_models_and_the_bounded_queue() {
    let store = empty_store("http").await;
    let serve = Serve::start(&serve_env(&store, &[("CONVOFLOW__SERVE__MAX_QUEUED_TOKENS", "600")]));
    let agent = agent();
    let url = format!("{}/v1/embeddings", serve.base);

    // token arrays (the model's own content ids) embed like their text
    let tokenizer = ModelTokenizer::load(&ModelFolder::open(&env_path("CONVOFLOW_E5_SMALL")).unwrap()).unwrap();
    let text = "Le technicien passera vendredi matin.";
    let content: Vec<u32> = tokenizer.encode_plain(text).unwrap().get_ids().to_vec();
    let (status, _, _, by_text) = post(&agent, &url, &json!({"input": text, "model": MODEL}));
    assert_eq!(status, 200, "{by_text}");
    let (status, _, _, by_ids) = post(&agent, &url, &json!({"input": [content.clone(), content.clone()]}));
    assert_eq!(status, 200, "{by_ids}");
    let c = cosine(&floats(&by_text["data"][0]["embedding"]), &floats(&by_ids["data"][1]["embedding"]));
    assert!(c >= 0.9999, "token ids vs text: {c}");
    assert_eq!(by_ids["usage"]["prompt_tokens"], json!(2 * by_text["usage"]["prompt_tokens"].as_u64().unwrap()));
    let (status, _, _, bad) = post(&agent, &url, &json!({"input": [[1, 2, 99_999_999]]}));
    assert_eq!((status, bad["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{bad}");

    // a text over the model's 512 tokens is cut there, and says so
    let long = "livraison ".repeat(700);
    let (status, truncated, _, body) = post(&agent, &url, &json!({"input": [long, "court"]}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(truncated.as_deref(), Some("1"));
    assert_eq!(body["data"][0]["truncated"], json!(true));
    assert!(body["data"][1].get("truncated").is_none());
    assert_eq!(body["usage"]["prompt_tokens"].as_u64().unwrap() as usize, 512 + tokenizer.encode_ids(&["passage: court"]).unwrap()[0].len());

    // refusals in OpenAI's shape
    for (body, param) in [
        (json!({"input": []}), "input"),
        (json!({"input": ""}), "input"),
        (json!({"input": "x", "encoding_format": "int8"}), "input"),
        (json!({"input": "x", "dimensions": 1024}), "dimensions"),
    ] {
        let (status, _, _, answer) = post(&agent, &url, &body);
        assert_eq!(status, 400, "{body} → {answer}");
        assert_eq!(answer["error"]["param"], param, "{body} → {answer}");
    }
    let (status, _, _, answer) = post(&agent, &url, &json!({"input": "x", "model": "text-embedding-3-small"}));
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("model_not_found")));

    // the models
    let mut models = agent.get(format!("{}/v1/models", serve.base)).header("Authorization", &format!("Bearer {KEY}")).call().unwrap();
    let models: Value = serde_json::from_str(&models.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["object"], "list");
    let m = &models["data"][0];
    assert_eq!((m["id"].as_str(), m["task"].as_str(), m["dimensions"].as_u64()), (Some(MODEL), Some("embedding"), Some(384)));
    assert_eq!((m["dtype"].as_str(), m["device"].as_str(), m["max_input_tokens"].as_u64()), (Some("float"), Some("cpu"), Some(512)));

    // the queue holds 600 tokens: a request of more is refused outright (413), and 24 requests
    // of 300 tokens sent at once find it full (429 with Retry-After) while the model works
    let (status, _, _, answer) = post(&agent, &url, &json!({"input": ["mot ".repeat(400), "mot ".repeat(400)]}));
    assert_eq!(status, 413, "{answer}");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(24));
    let handles: Vec<_> = (0..24)
        .map(|i| {
            let (agent, url, barrier) = (agent.clone(), url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let body = json!({"input": format!("{i} {}", "colis ".repeat(280))});
                barrier.wait();
                let (status, _, retry, answer) = post(&agent, &url, &body);
                (status, retry, answer)
            })
        })
        .collect();
    let answers: Vec<(u16, Option<String>, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let busy: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    assert_eq!(ok + busy.len(), 24, "{:?}", answers.iter().map(|a| (a.0, &a.2)).collect::<Vec<_>>());
    assert!(!busy.is_empty() && ok >= 1, "{ok} answered, {} refused", busy.len());
    assert!(busy.iter().all(|a| a.1.as_deref() == Some("1") && a.2["error"]["type"] == "rate_limit_error"));
    println!("24 concurrent requests of ~300 tokens, serve.max_queued_tokens 600: {ok} answered, {} refused with 429", busy.len());
    // /v1/search embeds its query through the same queue and still answers
    let (status, _, _, answer) = post(&agent, &format!("{}/v1/search", serve.base), &json!({"query": "colis", "k": 1}));
    assert_eq!(status, 200, "{answer}");
}

/// POST with the key, for a JSON answer.
fn post_json(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Value) {
    let (status, _, _, answer) = post(agent, url, body);
    (status, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_and_sentiment_over_http_equal_what_the_worker_writes_for_the_same_turns() {
    // the worker enriches the mixed conversation with the routed models
    let routed::EnrichedMixed { cfg, sent: event, enriched } = routed::enrich_mixed("api-parity").await;

    // serve with the same models, from a config file (the model lists do not fit in variables)
    let config = json!({
        "models": serde_json::to_value(&cfg.models).unwrap(),
        "pipeline": { "language": serde_json::to_value(&cfg.pipeline.language).unwrap() },
        "qdrant": { "backend": "edge", "data_dir": cfg.qdrant.data_dir, "collection": cfg.qdrant.collection, "dense_dim": 384 },
        "gpu": { "device": "cpu" },
        "serve": { "models": ["embedding", "ner", "sentiment"] },
    });
    let path = cfg.qdrant.data_dir.with_extension("serve.yaml");
    std::fs::write(&path, config.to_string()).unwrap(); // JSON is YAML
    let serve = Serve::start(&[
        ("CONVOFLOW_CONFIG".to_string(), path.display().to_string()),
        ("CONVOFLOW__SERVE__API_KEY".to_string(), KEY.to_string()),
        ("CONVOFLOW_LOG".to_string(), "warn".to_string()),
    ]);
    let agent = agent();
    let texts: Vec<&str> = enriched.turns.iter().map(|t| event.turns.iter().find(|e| e.turn_id == t.turn_id).unwrap().text.as_str()).collect();
    let languages: Vec<Option<&str>> = enriched.turns.iter().map(|t| t.language.as_deref()).collect();

    // with each turn's language as the worker resolved it, every turn gets what the worker gave it
    let (status, ner) = post_json(&agent, &format!("{}/v1/entities", serve.base), &json!({"input": texts, "language": languages}));
    assert_eq!(status, 200, "{ner}");
    let (status, stars) = post_json(&agent, &format!("{}/v1/sentiment", serve.base), &json!({"input": texts, "language": languages}));
    assert_eq!(status, 200, "{stars}");
    let (mut entities, mut rated) = (0, 0);
    for (i, turn) in enriched.turns.iter().enumerate() {
        let (row, srow) = (&ner["data"][i], &stars["data"][i]);
        assert_eq!((row["index"].as_u64(), row["language"].as_str(), row["language_source"].as_str()), (Some(i as u64), turn.language.as_deref(), Some("request")));
        assert_eq!(row["skipped"].as_str(), turn.entities_skipped.as_deref(), "{}: {row}", texts[i]);
        let got = row["entities"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert_eq!(got.len(), turn.entities.len(), "{}: {row} vs {:?}", texts[i], turn.entities);
        for (g, w) in got.iter().zip(&turn.entities) {
            assert_eq!((g["text"].as_str(), g["label"].as_str()), (Some(w.text.as_str()), Some(w.label.as_str())), "{}", texts[i]);
            assert_eq!((g["start"].as_i64(), g["end"].as_i64()), (Some(i64::from(w.start)), Some(i64::from(w.end))));
            assert!((g["score"].as_f64().unwrap() as f32 - w.score).abs() < 1e-4, "{g} vs {w:?}");
            assert_eq!(row["model"].as_str(), w.model.as_deref());
            // the offsets are characters of the input, as in the event
            assert_eq!(texts[i].chars().skip(w.start as usize).take((w.end - w.start) as usize).collect::<String>().trim(), w.text.trim());
            entities += 1;
        }
        assert_eq!(srow["skipped"].as_str(), turn.sentiment_skipped.as_deref(), "{}: {srow}", texts[i]);
        match &turn.sentiment {
            Some(s) => {
                assert_eq!((srow["stars"].as_i64(), srow["model"].as_str()), (Some(i64::from(s.stars)), s.model.as_deref()), "{srow}");
                assert!((srow["expected_stars"].as_f64().unwrap() as f32 - s.score).abs() < 1e-4, "{srow} vs {s:?}");
                let p = floats(&srow["probabilities"]);
                assert_eq!(p.len(), s.probabilities.len());
                assert!(p.iter().zip(&s.probabilities).all(|(a, b)| (a - b).abs() < 1e-4), "{p:?} vs {:?}", s.probabilities);
                rated += 1;
            }
            None => assert!(srow["stars"].is_null() && srow["model"].is_null(), "{srow}"),
        }
    }
    let covered = routed::MIXED.iter().filter(|(_, l, _)| routed::SENTIMENT_LANGUAGES.contains(l)).count();
    assert!(entities > 0 && rated == covered, "{entities} entities compared, {rated} turns rated");
    println!("parity with the worker's event: {entities} entities, {rated} sentiments, {} turns", texts.len());

    // without a language, each input's own is detected as the worker detects a turn's: the same
    // for every turn the worker detected; the turn too short to tell has none here (a request
    // is no conversation to inherit from) and no NER model takes unknown languages
    let (status, detected) = post_json(&agent, &format!("{}/v1/entities", serve.base), &json!({"input": texts}));
    assert_eq!(status, 200, "{detected}");
    for (i, turn) in enriched.turns.iter().enumerate() {
        let row = &detected["data"][i];
        if turn.language_source.as_deref() == Some("detected") {
            assert_eq!((row["language"].as_str(), row["language_source"].as_str()), (turn.language.as_deref(), Some("detected")), "{row}");
            assert_eq!(row["entities"], ner["data"][i]["entities"], "{}", texts[i]);
        } else {
            assert_eq!((row["language"].as_str(), row["skipped"].as_str()), (None, Some("unknown-language")), "{row}");
        }
    }
    // `model` sends every input to that model, whatever its language
    let (status, forced) = post_json(&agent, &format!("{}/v1/entities", serve.base), &json!({"input": [texts[4]], "model": routed::XLMR}));
    assert_eq!((status, forced["data"][0]["model"].as_str(), forced["data"][0]["language"].as_str()), (200, Some(routed::XLMR), Some("pl")), "{forced}");
    let (status, answer) = post_json(&agent, &format!("{}/v1/sentiment", serve.base), &json!({"input": "x y z", "model": "nlptown"}));
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("model_not_found")), "{answer}");
    for body in [json!({"input": []}), json!({"input": ["ok", " "]}), json!({"input": ["a", "b"], "language": ["fr"]}), json!({"input": "a", "stars": 3})] {
        let (status, answer) = post_json(&agent, &format!("{}/v1/sentiment", serve.base), &body);
        assert_eq!((status, answer["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{body} → {answer}");
    }

    // /v1/models lists all four, with their languages and labels
    let mut models = agent.get(format!("{}/v1/models", serve.base)).header("Authorization", &format!("Bearer {KEY}")).call().unwrap();
    let models: Value = serde_json::from_str(&models.body_mut().read_to_string().unwrap()).unwrap();
    let rows: Vec<(&str, &str, &Value)> =
        models["data"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap(), m["task"].as_str().unwrap(), &m["languages"])).collect();
    assert_eq!(rows.len(), 4, "{models}");
    assert_eq!((rows[1].0, rows[1].1, rows[1].2), (routed::CAMEMBERT, "ner", &json!(["fr"])));
    assert_eq!((rows[2].0, rows[2].2.as_array().unwrap().len()), (routed::XLMR, 9));
    assert_eq!((rows[3].0, rows[3].1), (routed::SENTIMENT, "sentiment"));
    assert_eq!(models["data"][1]["labels"], json!(["LOC", "PER", "MISC", "ORG"]), "{}", models["data"][1]);
    assert_eq!(models["data"][3]["labels"].as_array().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_only_deployment_needs_no_index() {
    // sentiment alone, an empty store directory (no collection), no embedding model
    let fixtures = env_path("CONVOFLOW_MODEL_FIXTURES");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("embeddings-api").join(format!("models-only-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let env: Vec<(String, String)> = [
        ("CONVOFLOW__QDRANT__DATA_DIR", dir.display().to_string()),
        ("CONVOFLOW__MODELS__SENTIMENT__NAME", "nlptown (random)".to_string()),
        ("CONVOFLOW__MODELS__SENTIMENT__PATH", fixtures.join("sentiment-bert").display().to_string()),
        ("CONVOFLOW__MODELS__SENTIMENT__DTYPE", "fp32".to_string()),
        ("CONVOFLOW__SERVE__MODELS", "sentiment".to_string()),
        ("CONVOFLOW__GPU__DEVICE", "cpu".to_string()),
        ("CONVOFLOW__SERVE__API_KEY", KEY.to_string()),
        ("CONVOFLOW_LOG", "warn".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let serve = Serve::start(&env);
    let agent = agent();
    let (status, stars) = post_json(&agent, &format!("{}/v1/sentiment", serve.base), &json!({"input": ["Super service, merci !", "Nie wieder."]}));
    assert_eq!(status, 200, "{stars}");
    for row in stars["data"].as_array().unwrap() {
        let p = floats(&row["probabilities"]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4 && (1..=5).contains(&row["stars"].as_i64().unwrap()), "{row}");
        assert_eq!(row["model"], "nlptown (random)", "one model without languages takes every input");
    }
    let (status, answer) = post_json(&agent, &format!("{}/v1/embeddings", serve.base), &json!({"input": "x"}));
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("model_not_found")), "{answer}");
    let (status, answer) = post_json(&agent, &format!("{}/v1/entities", serve.base), &json!({"input": "x"}));
    assert!(status == 404 && answer["error"]["message"].as_str().unwrap().contains("serve.models"), "{answer}");
    let (status, answer) = post_json(&agent, &format!("{}/v1/search", serve.base), &json!({"query": "colis"}));
    assert_eq!(status, 503, "no index to search: {answer}");
    let mut health = agent.get(format!("{}/healthz", serve.base)).call().unwrap();
    assert_eq!(health.status().as_u16(), 200, "{}", health.body_mut().read_to_string().unwrap());
}
