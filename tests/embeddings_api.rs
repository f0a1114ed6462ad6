//! `convoflow serve`'s OpenAI-compatible `/v1/embeddings` and `/v1/models`, called by clients
//! convoflow did not write — the official `openai` Python client and LangChain's
//! `OpenAIEmbeddings` (PyPI, `CONVOFLOW_API_PY`, scripts/fixtures/openai_embeddings.py) — and
//! checked against the vectors the model runtime gives the worker and `search` (real
//! multilingual-e5-small weights, CPU), plus the API's own refusals over plain HTTP.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

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
