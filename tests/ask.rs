//! `convoflow ask` and `convoflow serve` against a real OpenAI-compatible server on 127.0.0.1:
//! llama.cpp's server (PyPI xllamacpp, scripts/fixtures/llm_server.py) serving a tiny
//! Llama-architecture model with RANDOM weights and multilingual-e5-small's tokenizer
//! (scripts/fixtures/make_llm.py). Its answers are noise: these tests check the protocol and the
//! product around it — incremental streaming, sources = the retrieved turns, the prompt within
//! the context budget, filters and tenant isolation, clear errors, and the HTTP API under
//! concurrent and oversized requests. The store is the embedded engine, filled with turns
//! embedded by the real multilingual-e5-small weights.
//!
//! Needs what scripts/setup installs and scripts/env.sh exports: CONVOFLOW_LLM_PY,
//! CONVOFLOW_LLM_GGUF, CONVOFLOW_LLM_TOKENIZER, CONVOFLOW_E5_SMALL (run through scripts/test).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use convoflow::config::{QdrantConfig, StoreBackend};
use convoflow::infer::{Model, Task};
use convoflow::pipeline::bm25::{Bm25Params, document_vector};
use convoflow::sink::store::{self, Bootstrap, CollectionSpec, Quantization, StorePoint};
use serde_json::{Value, json};

mod common;

use common::serving::{LlmServer, MODEL, Serve, env_path, free_port};

struct Turn {
    tenant: &'static str,
    conversation: String,
    turn: String,
    speaker: &'static str,
    language: &'static str,
    text: String,
    stars: i64,
}

/// Turns of two tenants: acme's about parcels late in Lyon and a refund, globex's about a
/// router in Marseille and a technician.
fn turns() -> Vec<Turn> {
    let acme = [
        ("fr", "Bonjour, mon colis devait arriver à Lyon mardi et il est toujours en retard."),
        ("fr", "Je vérifie la livraison de votre colis pour Lyon, un instant."),
        ("fr", "Le transporteur indique un retard au dépôt de Lyon, livraison prévue jeudi."),
        ("en", "My refund for the broken kettle has not arrived yet, it has been two weeks."),
        ("en", "I can see the refund was issued on Monday, it should reach your account in three days."),
        ("fr", "Merci, pouvez-vous changer l'adresse de livraison pour mon bureau à Lyon ?"),
    ];
    let globex = [
        ("fr", "Mon routeur wifi redémarre sans arrêt depuis hier à Marseille."),
        ("fr", "Avez-vous essayé de réinitialiser le routeur en appuyant dix secondes sur le bouton ?"),
        ("en", "The technician appointment in Marseille was cancelled twice, I am very unhappy."),
        ("en", "I am sorry, I booked a new technician visit for Friday morning in Marseille."),
        ("fr", "Le colis de remplacement du routeur est parti de Marseille ce matin."),
        ("fr", "Je voudrais résilier mon forfait mobile à la fin du mois."),
    ];
    let mut out = vec![];
    for (tenant, lines) in [("acme", acme), ("globex", globex)] {
        for conv in 0..4 {
            for (i, (language, text)) in lines.iter().enumerate() {
                out.push(Turn {
                    tenant,
                    conversation: format!("{tenant}-conv-{conv}"),
                    turn: format!("t{i}"),
                    speaker: if i % 2 == 0 { "customer" } else { "agent" },
                    language,
                    text: if conv == 0 { text.to_string() } else { format!("{text} (dossier {tenant}-{conv}-{i})") },
                    stars: 1 + ((conv + i) % 5) as i64,
                });
            }
        }
    }
    out
}

fn qdrant_config(dir: &Path) -> QdrantConfig {
    QdrantConfig { backend: StoreBackend::Edge, data_dir: dir.to_path_buf(), ..QdrantConfig::default() }
}

/// A fresh embedded store under `name` holding `turns()`, embedded by multilingual-e5-small.
async fn indexed_store(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ask").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let turns = turns();
    let texts: Vec<String> = turns.iter().map(|t| format!("passage: {}", t.text)).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let model = Model::load(&env_path("CONVOFLOW_E5_SMALL"), Task::Embedding, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let (vectors, _) = model.embed(&refs, &Default::default()).unwrap();
    let points: Vec<StorePoint> = turns
        .iter()
        .zip(vectors)
        .enumerate()
        .map(|(i, (t, dense))| {
            let payload = json!({
                "conversation_id": t.conversation, "turn_id": t.turn, "chunk_index": 0, "tenant": t.tenant,
                "channel": "chat", "language": t.language, "speaker": t.speaker, "role": t.speaker,
                "ts": convoflow::sink::store::points::rfc3339(1_795_000_000_000 + i as i64 * 60_000),
                "chunk_start": 0, "chunk_end": t.text.chars().count(), "text": t.text,
                "entities": [], "entity_labels": [], "sentiment_stars": t.stars,
            });
            StorePoint {
                id: convoflow::event::point_id(t.tenant, &t.conversation, &t.turn, 0),
                dense: Some(dense),
                sparse: document_vector(&t.text, &Bm25Params::default()),
                payload: payload.as_object().unwrap().clone(),
            }
        })
        .collect();
    let cfg = qdrant_config(&dir);
    let store = store::open(&cfg).unwrap();
    let spec = CollectionSpec { name: cfg.collection.clone(), dense_dim: 384, on_disk: false, quantization: Quantization::None };
    store.ensure_collection(&spec, Bootstrap::CreateIfMissing).await.unwrap();
    store.upsert(&points).await.unwrap();
    store.flush().await.unwrap();
    drop(store);
    dir
}

/// The environment of a `convoflow` command on `store` with the LLM at `llm_url`.
fn env(store: &Path, llm_url: &str) -> Vec<(String, String)> {
    [
        ("CONVOFLOW__QDRANT__DATA_DIR", store.display().to_string()),
        ("CONVOFLOW__MODELS__EMBEDDING__NAME", "intfloat/multilingual-e5-small".into()),
        ("CONVOFLOW__MODELS__EMBEDDING__PATH", env_path("CONVOFLOW_E5_SMALL").display().to_string()),
        ("CONVOFLOW__MODELS__EMBEDDING__DTYPE", "fp32".into()),
        ("CONVOFLOW__MODELS__EMBEDDING__QUERY_TEMPLATE", "query: {query}".into()),
        ("CONVOFLOW__GPU__DEVICE", "cpu".into()),
        ("CONVOFLOW__LLM__URL", llm_url.into()),
        ("CONVOFLOW__LLM__MODEL", MODEL.into()),
        ("CONVOFLOW__LLM__MAX_TOKENS", "64".into()),
        ("CONVOFLOW__LLM__CONTEXT_TOKENS", "1024".into()),
        ("CONVOFLOW__LLM__TOKENIZER", env_path("CONVOFLOW_LLM_TOKENIZER").display().to_string()),
        ("CONVOFLOW_LOG", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn with(mut env: Vec<(String, String)>, key: &str, value: &str) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != key);
    env.push((key.to_string(), value.to_string()));
    env
}

fn convoflow(env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_convoflow")).args(args).envs(env.iter().cloned()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ask_json(env: &[(String, String)], args: &[&str]) -> Value {
    let mut all = vec!["ask"];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, stdout, stderr) = convoflow(env, &all);
    assert_eq!(code, 0, "ask failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn tenants(answer: &Value) -> BTreeSet<String> {
    answer["sources"].as_array().unwrap().iter().map(|s| s["tenant"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_answers_from_the_retrieved_turns_of_its_tenant_within_the_context_budget() {
    let llm = LlmServer::start(4096, 4);
    let store = indexed_store("answers").await;
    let env = env(&store, &llm.url);

    // sources are exactly the turns `search` retrieves, in rank order, all of the tenant
    let answer = ask_json(&env, &["Où en est la livraison de mon colis à Lyon ?", "--tenant", "acme", "-k", "5"]);
    let (code, search_out, stderr) = convoflow(&env, &["search", "Où en est la livraison de mon colis à Lyon ?", "--tenant", "acme", "-k", "5", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let searched: Vec<String> =
        serde_json::from_str::<Value>(&search_out).unwrap().as_array().unwrap().iter().map(|h| h["id"].as_str().unwrap().to_string()).collect();
    let cited: Vec<String> = answer["sources"].as_array().unwrap().iter().map(|s| s["point_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(cited, searched, "the sources are the retrieved turns, best first");
    assert_eq!(tenants(&answer), BTreeSet::from(["acme".to_string()]));
    let first = &answer["sources"][0];
    assert!(first["text"].as_str().unwrap().contains("Lyon"), "the best turn is about Lyon: {first}");
    assert_eq!(first["n"], 1);
    // the model answered (noise, random weights) through the real protocol, and said how much
    let completion = &answer["completion"];
    assert!(!answer["answer"].as_str().unwrap().is_empty());
    assert!(completion["chunks"].as_u64().unwrap() > 1, "{completion}");
    assert!(completion["completion_tokens"].as_u64().unwrap() <= 64, "{completion}");
    let server_prompt = completion["prompt_tokens"].as_u64().unwrap() as usize;
    let counted = answer["prompt_tokens_counted"].as_u64().unwrap() as usize;
    assert!(server_prompt <= 1024 - 64, "the prompt fits the context with room for the answer: {server_prompt}");
    assert!(counted <= server_prompt && server_prompt <= counted + convoflow::ask::CHAT_TEMPLATE_MARGIN,
        "llm.tokenizer counts what the server counts, the chat template aside: {counted} vs {server_prompt}");
    println!(
        "ask against the local server: first token {:.0} ms, {} tokens in {:.0} ms",
        completion["first_token_ms"].as_f64().unwrap(),
        completion["completion_tokens"],
        completion["total_ms"].as_f64().unwrap()
    );

    // tenant isolation: globex's question never sees acme's turns, and the other way round
    let b = ask_json(&env, &["Où en est la livraison de mon colis à Lyon ?", "--tenant", "globex", "-k", "10"]);
    assert_eq!(tenants(&b), BTreeSet::from(["globex".to_string()]));
    assert!(b["sources"].as_array().unwrap().iter().all(|s| !s["text"].as_str().unwrap().contains("Lyon")));
    // other filters hold too
    let en = ask_json(&env, &["refund", "--tenant", "acme", "--language", "en", "--min-stars", "3"]);
    assert!(!en["sources"].as_array().unwrap().is_empty());
    assert!(en["sources"].as_array().unwrap().iter().all(|s| s["stars"].as_i64().unwrap() >= 3));

    // a small context: the lowest-ranked turns are dropped, the prompt still fits
    let small = with(env.clone(), "CONVOFLOW__LLM__CONTEXT_TOKENS", "700");
    let trimmed = ask_json(&small, &["livraison colis Lyon retard", "--tenant", "acme", "-k", "20"]);
    assert!(trimmed["dropped"].as_u64().unwrap() > 0, "{trimmed}");
    assert_eq!(trimmed["retrieved"].as_u64().unwrap(), 20);
    let served = trimmed["completion"]["prompt_tokens"].as_u64().unwrap();
    assert!(served <= 700 - 64, "{served}");
    // without llm.tokenizer, counting bytes (an upper bound) fits as well, with fewer turns
    let bytes: Vec<_> = small.into_iter().filter(|(k, _)| k != "CONVOFLOW__LLM__TOKENIZER").collect();
    let by_bytes = ask_json(&bytes, &["livraison colis Lyon retard", "--tenant", "acme", "-k", "20"]);
    assert!(by_bytes["completion"]["prompt_tokens"].as_u64().unwrap() <= 700 - 64);
    assert!(by_bytes["sources"].as_array().unwrap().len() <= trimmed["sources"].as_array().unwrap().len());

    // the terminal form streams the answer, then lists its sources
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["ask", "Quel est le problème du routeur ?", "--tenant", "globex", "-k", "3"])
        .envs(with(env.clone(), "CONVOFLOW__LLM__MAX_TOKENS", "300"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut reads: Vec<(Duration, usize)> = vec![];
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        reads.push((started.elapsed(), n));
        text.extend_from_slice(&buf[..n]);
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{err}");
    let text = String::from_utf8_lossy(&text);
    let (answer_text, sources) = text.split_once("\n\nSources:\n").unwrap_or_else(|| panic!("{text}"));
    assert!(!answer_text.trim().is_empty());
    assert_eq!(sources.lines().count(), 3, "{sources}");
    assert!(sources.lines().all(|l| l.contains("conversation globex-conv-")), "{sources}");
    assert!(err.contains("3 turns retrieved, 3 in the prompt"), "{err}");
    let last = reads.last().unwrap().0;
    assert!(reads.len() >= 5 && last - reads[0].0 > Duration::from_millis(300),
        "the answer arrives piece by piece, not at once: {} reads over {:?}", reads.len(), last - reads[0].0);

    // the demo ends with one question when an LLM endpoint is configured
    let out = Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["demo", "--conversations", "6", "--timeout-s", "120"])
        .env("CONVOFLOW__LLM__URL", &llm.url)
        .env("CONVOFLOW__LLM__MODEL", MODEL)
        .env("CONVOFLOW__LLM__MAX_TOKENS", "48")
        .env("CONVOFLOW__LLM__CONTEXT_TOKENS", "1024")
        .env("CONVOFLOW__LLM__TOKENIZER", env_path("CONVOFLOW_LLM_TOKENIZER"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let asked = stdout.split_once(&format!("ask {:?} ({MODEL} at {})", convoflow::demo::DEMO_QUESTION, llm.url))
        .unwrap_or_else(|| panic!("the demo asks its question: {stdout}")).1;
    let (said, sources) = asked.split_once("\n\nSources:\n").unwrap_or_else(|| panic!("{asked}"));
    assert!(!said.trim().is_empty() && !said.contains("ask failed"), "{asked}\n{stderr}");
    assert!(sources.lines().next().is_some_and(|l| l.starts_with("[1] conversation ")), "{sources}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_errors_are_clear() {
    let store = indexed_store("errors").await;
    // nothing configured: says what to set, loads nothing
    let no_llm: Vec<_> = env(&store, "").into_iter().filter(|(k, _)| k != "CONVOFLOW__LLM__URL").collect();
    let (code, _, err) = convoflow(&no_llm, &["ask", "colis ?"]);
    assert_eq!(code, 1);
    assert!(err.contains("no LLM is configured: set llm.url"), "{err}");
    // nothing listens there
    let port = free_port();
    let down = env(&store, &format!("http://127.0.0.1:{port}/v1"));
    let (code, _, err) = convoflow(&down, &["ask", "colis ?"]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("cannot reach the LLM at http://127.0.0.1:{port}/v1")) && err.contains("llm.url"), "{err}");

    let mut llm = LlmServer::start(8192, 1);
    // a model the server does not serve: the names it does serve
    let wrong = with(env(&store, &llm.url), "CONVOFLOW__LLM__MODEL", "mistral-7b-instruct");
    let (code, _, err) = convoflow(&wrong, &["ask", "colis ?"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not serve the model \"mistral-7b-instruct\"") && err.contains(MODEL) && err.contains("llm.model"), "{err}");
    // a context setting above what the server runs: the server's refusal, explained
    let big = with(with(env(&store, &llm.url), "CONVOFLOW__LLM__CONTEXT_TOKENS", "100000"), "CONVOFLOW__LLM__MAX_TOKENS", "64");
    let (code, _, err) = convoflow(&big, &["ask", &"livraison du colis à Lyon ".repeat(2000)]);
    assert_eq!(code, 1);
    assert!(err.contains("does not fit the model's context") && err.contains("llm.context_tokens"), "{err}");

    // the server goes away in the middle of an answer
    let long = with(with(env(&store, &llm.url), "CONVOFLOW__LLM__MAX_TOKENS", "6000"), "CONVOFLOW__LLM__CONTEXT_TOKENS", "8192");
    let mut child = Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["ask", "colis Lyon", "-k", "3"])
        .envs(long)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    let n = stdout.read(&mut first).unwrap();
    assert!(n > 0, "some of the answer arrived");
    llm.kill();
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("closed the stream after") && err.contains("before the answer ended"), "{err}");
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

fn post(agent: &ureq::Agent, url: &str, body: &Value, bearer: Option<&str>) -> (u16, Value) {
    let mut req = agent.post(url).header("Content-Type", "application/json");
    if let Some(b) = bearer {
        req = req.header("Authorization", &format!("Bearer {b}"));
    }
    let mut resp = req.send(body.to_string()).unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The events of an SSE answer with their arrival times.
fn sse(agent: &ureq::Agent, url: &str, body: &Value) -> Vec<(Duration, String, Value)> {
    let started = Instant::now();
    let resp = agent.post(url).header("Content-Type", "application/json").send(body.to_string()).unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/event-stream"));
    let mut events = vec![];
    let mut name = String::new();
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("event:") {
            name = n.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            events.push((started.elapsed(), name.clone(), serde_json::from_str(d.trim()).unwrap()));
        }
    }
    events
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_searches_and_answers_over_http_concurrently_and_refuses_what_it_must() {
    let llm = LlmServer::start(4096, 4);
    let store = indexed_store("serve").await;
    let env = with(with(env(&store, &llm.url), "CONVOFLOW__SERVE__MAX_BODY_BYTES", "4096"), "CONVOFLOW__LLM__MAX_TOKENS", "200");
    let serve = Serve::start(&env);
    let agent = http_agent();

    // health: the store answers, the embedding model is loaded
    let mut health = agent.get(format!("{}/healthz", serve.base)).call().unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let health: Value = serde_json::from_str(&health.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!((health["status"].as_str(), health["points"].as_u64()), (Some("ok"), Some(turns().len() as u64)));

    // search with filters, 8 clients at once
    let (status, body) = post(&agent, &format!("{}/v1/search", serve.base), &json!({"query": "routeur wifi", "k": 4, "filters": {"tenant": "globex"}}), None);
    assert_eq!(status, 200, "{body}");
    let hits = body["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 4);
    assert!(hits.iter().all(|h| h["payload"]["tenant"] == "globex"));
    assert!(hits[0]["payload"]["text"].as_str().unwrap().contains("routeur"), "{}", hits[0]);
    // grouped: the best turn of each of 3 conversations
    let (status, body) = post(&agent, &format!("{}/v1/search", serve.base),
        &json!({"query": "routeur wifi", "k": 3, "filters": {"tenant": "globex"}, "group_by": "conversation"}), None);
    assert_eq!(status, 200, "{body}");
    let grouped = body["hits"].as_array().unwrap();
    let conversations: BTreeSet<&str> = grouped.iter().map(|h| h["payload"]["conversation_id"].as_str().unwrap()).collect();
    assert_eq!((grouped.len(), conversations.len()), (3, 3), "{body}");
    let queries = ["colis en retard à Lyon", "refund kettle", "routeur wifi", "technician appointment", "adresse de livraison",
        "résilier forfait mobile", "remplacement", "bouton dix secondes"];
    let base = Arc::new(serve.base.clone());
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let base = base.clone();
            std::thread::spawn(move || {
                let agent = http_agent();
                let mut took = vec![];
                for i in 0..25 {
                    let tenant = if (c + i) % 2 == 0 { "acme" } else { "globex" };
                    let started = Instant::now();
                    let (status, body) = post(&agent, &format!("{base}/v1/search"),
                        &json!({"query": queries[(c + i) % queries.len()], "k": 5, "filters": {"tenant": tenant}}), None);
                    took.push(started.elapsed().as_secs_f64() * 1000.0);
                    assert_eq!(status, 200, "{body}");
                    assert!(body["hits"].as_array().unwrap().iter().all(|h| h["payload"]["tenant"] == tenant), "tenant isolation");
                }
                took
            })
        })
        .collect();
    let mut took: Vec<f64> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    took.sort_by(f64::total_cmp);
    println!(
        "serve /v1/search, 8 concurrent clients x 25 requests, embedded store ({} points), e5-small on CPU: p50 {:.1} ms, p99 {:.1} ms",
        turns().len(),
        percentile(&took, 0.5),
        percentile(&took, 0.99)
    );

    // ask, streamed: sources first, then the answer piece by piece, then done
    let events = sse(&agent, &format!("{}/v1/ask", serve.base), &json!({"question": "Où est mon colis pour Lyon ?", "k": 4, "filters": {"tenant": "acme"}, "stream": true}));
    assert_eq!(events[0].1, "sources");
    let sources = events[0].2["sources"].as_array().unwrap();
    assert!(!sources.is_empty() && sources.iter().all(|s| s["tenant"] == "acme"));
    let tokens: Vec<&(Duration, String, Value)> = events.iter().filter(|e| e.1 == "token").collect();
    let done = events.last().unwrap();
    assert_eq!(done.1, "done", "{:?}", done.2);
    assert!(tokens.len() > 20, "{} tokens", tokens.len());
    let answer: String = tokens.iter().map(|e| e.2["text"].as_str().unwrap()).collect();
    assert_eq!(answer, done.2["text"].as_str().unwrap(), "the streamed pieces make the answer");
    assert!(done.0 - tokens[0].0 > Duration::from_millis(300), "tokens arrive as generated: first at {:?}, done at {:?}", tokens[0].0, done.0);
    // not streamed: one JSON answer
    let (status, body) = post(&agent, &format!("{}/v1/ask", serve.base), &json!({"question": "refund", "filters": {"tenant": "acme", "language": "en"}}), None);
    assert_eq!(status, 200, "{body}");
    assert!(!body["answer"].as_str().unwrap().is_empty());
    assert!(body["sources"].as_array().unwrap().iter().all(|s| s["tenant"] == "acme"));

    // refused: oversized, malformed, out of bounds
    let huge = json!({"query": "x".repeat(10_000)});
    let (status, _) = post(&agent, &format!("{}/v1/search", serve.base), &huge, None);
    assert_eq!(status, 413, "bodies over serve.max_body_bytes are refused");
    let (status, body) = post(&agent, &format!("{}/v1/search", serve.base), &json!({"query": "x", "k": 1000}), None);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("serve.max_k"));
    let (status, body) = post(&agent, &format!("{}/v1/search", serve.base), &json!({"query": "x", "filters": {"entities": ["Marie"]}}), None);
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&agent, &format!("{}/v1/search", serve.base), &json!({"qurey": "typo"}), None);
    assert_eq!(status, 400, "unknown fields are refused: {body}");

    // the metrics count requests by route and the LLM's first-token latency
    let mut metrics = agent.get(format!("{}/metrics", serve.base)).call().unwrap();
    let metrics = metrics.body_mut().read_to_string().unwrap();
    assert!(metrics.contains("convoflow_api_requests_total{route=\"search\",status=\"200\"} 202"), "{metrics}");
    assert!(metrics.contains("convoflow_api_requests_total{route=\"search\",status=\"413\"} 1"), "{metrics}");
    assert!(metrics.contains("convoflow_llm_first_token_seconds_count 2"), "{metrics}");
    assert!(metrics.contains("convoflow_llm_requests_total{outcome=\"ok\"} 2"), "{metrics}");
    assert!(metrics.contains("convoflow_api_request_seconds_bucket{route=\"ask\""), "{metrics}");

    // a client that goes away mid-answer stops the generation and frees its slot
    let resp = agent
        .post(&format!("{}/v1/ask", serve.base))
        .header("Content-Type", "application/json")
        .send(json!({"question": "colis", "stream": true}).to_string())
        .unwrap();
    let mut lines = BufReader::new(resp.into_body().into_reader()).lines();
    assert!(lines.by_ref().map_while(Result::ok).any(|l| l.starts_with("event: token")), "a first token");
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let mut m = agent.get(format!("{}/metrics", serve.base)).call().unwrap();
        let m = m.body_mut().read_to_string().unwrap();
        if m.contains("convoflow_llm_requests_total{outcome=\"cancelled\"} 1") || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(metrics.contains("convoflow_llm_requests_total{outcome=\"cancelled\"} 1"), "{metrics}");
    assert!(metrics.contains("convoflow_api_in_flight_requests 1"), "only the metrics request itself: {metrics}");
    drop(serve);

    // bearer key and the ask budget: two long answers hold both ask slots (half of 4), a third
    // ask waits queue_timeout_ms and gets 503 while searches still pass; with the answers done
    // searches pass still
    let guarded = [
        ("CONVOFLOW__SERVE__API_KEY", "s3cret-key"),
        ("CONVOFLOW__SERVE__MAX_CONCURRENT_REQUESTS", "4"),
        ("CONVOFLOW__SERVE__ASK_SHARE", "0.5"),
        ("CONVOFLOW__SERVE__QUEUE_TIMEOUT_MS", "300"),
        ("CONVOFLOW__LLM__MAX_TOKENS", "400"),
    ]
    .iter()
    .fold(env.clone(), |e, (k, v)| with(e, k, v));
    let serve = Serve::start(&guarded);
    let url = format!("{}/v1/search", serve.base);
    assert_eq!(post(&agent, &url, &json!({"query": "colis"}), None).0, 401);
    assert_eq!(post(&agent, &url, &json!({"query": "colis"}), Some("wrong")).0, 401);
    assert_eq!(post(&agent, &url, &json!({"query": "colis"}), Some("s3cret-key")).0, 200);
    let health = agent.get(format!("{}/healthz", serve.base)).call().unwrap();
    assert_eq!(health.status().as_u16(), 200, "probes need no key");
    let ask_url = format!("{}/v1/ask", serve.base);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let long: Vec<_> = (0..2)
        .map(|_| {
            let (ask_url, started_tx) = (ask_url.clone(), started_tx.clone());
            std::thread::spawn(move || {
                let resp = http_agent()
                    .post(&ask_url)
                    .header("Authorization", "Bearer s3cret-key")
                    .header("Content-Type", "application/json")
                    .send(json!({"question": "colis", "stream": true}).to_string())
                    .unwrap();
                let mut body = String::new();
                for line in BufReader::new(resp.into_body().into_reader()).lines().map_while(Result::ok) {
                    if line.starts_with("event: token") && !body.contains("event: token") {
                        let _ = started_tx.send(());
                    }
                    body.push_str(&line);
                    body.push('\n');
                }
                body
            })
        })
        .collect();
    // both answers are generating (400 tokens each: seconds on this model), so both ask slots are held
    for _ in 0..2 {
        started_rx.recv_timeout(Duration::from_secs(60)).expect("both answers started");
    }
    let (status, body) = post(&agent, &ask_url, &json!({"question": "colis"}), Some("s3cret-key"));
    assert_eq!(status, 503, "both ask slots are held by the streamed answers: {body}");
    assert!(body["error"].as_str().unwrap().contains("serve.ask_share"), "{body}");
    let (status, body) = post(&agent, &url, &json!({"query": "colis"}), Some("s3cret-key"));
    assert_eq!(status, 200, "searches have slots of their own: {body}");
    for answer in long {
        assert!(answer.join().unwrap().contains("event: done"));
    }
    assert_eq!(post(&agent, &url, &json!({"query": "colis"}), Some("s3cret-key")).0, 200);
}

/// A test double, not an LLM: a TCP listener on 127.0.0.1 that accepts connections and never
/// answers a byte (what a stuck or overloaded server looks like from outside). It counts the
/// connections it holds and closes them all when dropped.
struct BlackHoleLlm {
    url: String,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlackHoleLlm {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let (accepted, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held = vec![];
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            held.push(conn);
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
                        Err(e) => panic!("the black hole's accept: {e}"),
                    }
                }
            })
        };
        Self { url, accepted, stop, thread: Some(thread) }
    }

    /// Waits until it holds `n` connections.
    fn wait_for(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.accepted.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "{} of {n} connections reached the black hole within {within:?}", self.accepted.load(Ordering::SeqCst));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BlackHoleLlm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn get(agent: &ureq::Agent, url: &str) -> (u16, Value) {
    let mut resp = agent.get(url).call().unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// An answer read off a raw connection.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    /// The head, lower-cased.
    head: String,
    body: Value,
}

/// `host:port` of an `http://host:port` base.
fn authority(base: &str) -> &str {
    base.strip_prefix("http://").unwrap()
}

/// Reads one HTTP/1.1 answer (Content-Length or chunked) off `conn`, without waiting for the
/// connection to close.
fn read_answer(conn: &mut TcpStream) -> std::io::Result<RawAnswer> {
    let mut buf = Vec::new();
    let mut piece = [0u8; 8192];
    loop {
        if let Some(answer) = parse_answer(&buf) {
            return Ok(answer);
        }
        let n = conn.read(&mut piece)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("closed after {:?}", String::from_utf8_lossy(&buf))));
        }
        buf.extend_from_slice(&piece[..n]);
    }
}

/// The answer in `buf` once it is complete.
fn parse_answer(buf: &[u8]) -> Option<RawAnswer> {
    let text = std::str::from_utf8(buf).ok()?;
    let (head, rest) = text.split_once("\r\n\r\n")?;
    let head = head.to_ascii_lowercase();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let body = if head.contains("transfer-encoding: chunked") {
        let mut body = String::new();
        let mut rest = rest;
        loop {
            let (size, after) = rest.split_once("\r\n")?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            body.push_str(after.get(..size)?);
            rest = after.get(size + 2..)?;
        }
        body
    } else {
        let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(Some(0), |v| v.trim().parse().ok())?;
        rest.get(..length)?.to_string()
    };
    Some(RawAnswer { status, head, body: serde_json::from_str(&body).unwrap_or(Value::String(body)) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_keeps_searching_while_every_ask_slot_waits_on_a_silent_llm() {
    let store = indexed_store("silent-llm").await;
    let llm = BlackHoleLlm::start();
    let cfg = [
        // 4 slots: 2 for asks, 2 for searches
        ("CONVOFLOW__SERVE__MAX_CONCURRENT_REQUESTS", "4"),
        ("CONVOFLOW__SERVE__ASK_SHARE", "0.5"),
        ("CONVOFLOW__SERVE__QUEUE_TIMEOUT_MS", "300"),
        ("CONVOFLOW__LLM__FIRST_TOKEN_TIMEOUT_MS", "3000"),
        ("CONVOFLOW__LLM__TIMEOUT_MS", "120000"),
    ]
    .iter()
    .fold(env(&store, &llm.url), |e, (k, v)| with(e, k, v));
    let serve = Serve::start(&cfg);
    let agent = http_agent();
    let (status, health) = get(&agent, &format!("{}/healthz", serve.base));
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")), "{health}");

    // as many asks as there are slots in all, two of them streamed: two wait on the silent LLM,
    // holding the ask budget, the others find it full
    let ask_url = format!("{}/v1/ask", serve.base);
    let asks: Vec<_> = [false, true, false, true]
        .into_iter()
        .map(|stream| {
            let ask_url = ask_url.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let (status, body) = post(&http_agent(), &ask_url, &json!({"question": "colis Lyon", "stream": stream}), None);
                (started.elapsed(), status, body)
            })
        })
        .collect();
    llm.wait_for(2, Duration::from_secs(60));
    // the searches run while the ask slots are held: no wait for a slot
    let mut took = vec![];
    for query in ["colis en retard à Lyon", "refund kettle", "routeur wifi"] {
        let started = Instant::now();
        let (status, body) = post(&agent, &format!("{}/v1/search", serve.base), &json!({"query": query, "k": 3}), None);
        took.push(started.elapsed());
        assert_eq!(status, 200, "searches have their own slots while every ask slot waits on the LLM: {body}");
        assert_eq!(body["hits"].as_array().unwrap().len(), 3, "{body}");
    }
    let (status, health) = get(&agent, &format!("{}/healthz", serve.base));
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")), "a silent LLM does not fail the health: {health}");
    // the state of the last exchange that ended: none has yet
    assert_eq!(health["llm"]["state"], "not contacted", "{health}");
    assert!(asks.iter().filter(|a| !a.is_finished()).count() >= 2, "the two hanging asks still hang after the searches");
    assert_eq!(llm.accepted.load(Ordering::SeqCst), 2, "only the ask budget's two asks reached the LLM");
    println!("serve /v1/search while both ask slots wait on a silent LLM: {took:?}");
    assert!(took.iter().all(|t| *t < Duration::from_secs(2)), "{took:?}");

    // the hanging asks end with the first-token timeout, long before llm.timeout_ms
    let (mut busy, mut timed_out) = (0, 0);
    for ask in asks {
        let (elapsed, status, body) = ask.join().unwrap();
        let text = body.as_str().map_or_else(|| body.to_string(), str::to_string);
        if status == 503 {
            assert!(body["error"].as_str().unwrap().contains("serve.ask_share"), "{body}");
            busy += 1;
        } else {
            // not streamed: 504 with the error; streamed: the `error` event ends the stream
            assert!(status == 504 || (status == 200 && text.contains("event: error")), "{status} {text}");
            assert!(text.contains("llm.first_token_timeout_ms") && text.contains("within 3000 ms"), "{text}");
            assert!(elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(30), "ended after {elapsed:?}");
            timed_out += 1;
        }
    }
    assert_eq!((busy, timed_out), (2, 2));
    let (status, health) = get(&agent, &format!("{}/healthz", serve.base));
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")), "{health}");
    let state = health["llm"]["state"].as_str().unwrap();
    assert!(state.starts_with("timed out: ") && state.contains("llm.first_token_timeout_ms"), "{health}");
    assert!(health["llm"]["last_contact_s_ago"].as_f64().is_some(), "{health}");
    let mut metrics = agent.get(format!("{}/metrics", serve.base)).call().unwrap();
    let metrics = metrics.body_mut().read_to_string().unwrap();
    assert!(metrics.contains("convoflow_llm_requests_total{outcome=\"timeout\"} 2"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_times_out_half_sent_bodies_which_hold_no_slot() {
    let store = indexed_store("half-bodies").await;
    let cfg = [
        ("CONVOFLOW__SERVE__MAX_CONCURRENT_REQUESTS", "4"),
        ("CONVOFLOW__SERVE__QUEUE_TIMEOUT_MS", "300"),
        ("CONVOFLOW__SERVE__BODY_TIMEOUT_MS", "3000"),
        ("CONVOFLOW__SERVE__API_KEY", "s3cret-key"),
    ]
    .iter()
    .fold(env(&store, ""), |e, (k, v)| with(e, k, v));
    let serve = Serve::start(&cfg);
    let agent = http_agent();
    let search = |agent: &ureq::Agent| post(agent, &format!("{}/v1/search", serve.base), &json!({"query": "colis", "k": 2}), Some("s3cret-key"));
    assert_eq!(search(&agent).0, 200);

    // more authenticated clients than slots in all, each sending 10 bytes of a 1000-byte body, then nothing
    let head = "POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret-key\r\n\
                Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"query\":\"";
    let sent = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut conn = TcpStream::connect(authority(&serve.base)).unwrap();
            conn.write_all(head.as_bytes()).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            conn
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = search(&agent);
    assert_eq!(status, 200, "half-sent bodies hold no slot: {body}");
    assert!(sent.elapsed() < Duration::from_secs(3), "the search ran while the bodies were still stalled");

    // each gets 408 after serve.body_timeout_ms, then its connection is closed
    for conn in &mut stalled {
        let answer = read_answer(conn).unwrap_or_else(|e| panic!("no answer to a stalled body: {e}"));
        assert_eq!(answer.status, 408, "{answer:?}");
        assert!(answer.body["error"].as_str().unwrap().contains("serve.body_timeout_ms"), "{answer:?}");
        assert!(answer.head.contains("connection: close"), "{answer:?}");
        let mut rest = Vec::new();
        assert_eq!(conn.read_to_end(&mut rest).unwrap(), 0, "the connection is closed after the 408");
    }
    let waited = sent.elapsed();
    assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(12), "{waited:?}");
    assert_eq!(search(&agent).0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_every_refusal_as_json() {
    let store = indexed_store("refusals").await;
    // no LLM configured; serve.max_body_bytes is 64 KiB by default
    let serve = Serve::start(&env(&store, ""));
    let agent = http_agent();
    let search_url = format!("{}/v1/search", serve.base);
    let send = |url: &str, content_type: Option<&str>, body: &[u8]| {
        let mut req = agent.post(url);
        if let Some(t) = content_type {
            req = req.header("Content-Type", t);
        }
        let mut resp = req.send(body).unwrap_or_else(|e| panic!("the client did not get an answer: {e}"));
        let status = resp.status().as_u16();
        let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (status, content_type, serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)))
    };
    let json_error = |what: &str, (status, content_type, body): (u16, String, Value), expected: u16, says: &str| {
        assert_eq!(status, expected, "{what}: {body}");
        assert!(content_type.starts_with("application/json"), "{what}: {content_type} {body}");
        let error = body["error"].as_str().unwrap_or_else(|| panic!("{what}: not {{\"error\"}}: {body}"));
        assert!(error.contains(says), "{what}: {error}");
    };
    let json = Some("application/json");
    json_error("malformed JSON", send(&search_url, json, br#"{"query": "colis""#), 400, "EOF");
    json_error("unknown field", send(&search_url, json, br#"{"qurey": "colis"}"#), 400, "unknown field `qurey`");
    json_error("wrong type", send(&search_url, json, br#"{"query": "colis", "k": "ten"}"#), 400, "invalid type");
    json_error("negative k", send(&search_url, json, br#"{"query": "colis", "k": -1}"#), 400, "invalid value");
    json_error("k over serve.max_k", send(&search_url, json, br#"{"query": "colis", "k": 1000}"#), 400, "serve.max_k");
    json_error("k of 0", send(&search_url, json, br#"{"query": "colis", "k": 0}"#), 400, "serve.max_k");
    json_error("stars out of range", send(&search_url, json, br#"{"query": "colis", "filters": {"min_stars": 9}}"#), 400, "1 to 5");
    json_error("no content type", send(&search_url, None, br#"{"query": "colis"}"#), 415, "Content-Type");
    json_error("ask without an LLM", send(&format!("{}/v1/ask", serve.base), json, br#"{"question": "colis"}"#), 503, "llm.url");
    // 10 MiB with its Content-Length: refused before it is read, and the client, still
    // uploading when the 413 is written, reads it
    let huge = format!(r#"{{"query": "{}"}}"#, "x".repeat(10 << 20));
    json_error("10 MiB body", send(&search_url, json, huge.as_bytes()), 413, "serve.max_body_bytes");
    for (what, method, path, status) in [("unknown route", "GET", "/nope", 404), ("unknown /v1 route", "POST", "/v1/nope", 404), ("wrong method", "GET", "/v1/search", 405)] {
        let mut resp = agent.run(ureq::http::Request::builder().method(method).uri(format!("{}{path}", serve.base)).body(()).unwrap()).unwrap();
        let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let text = resp.body_mut().read_to_string().unwrap();
        json_error(what, (resp.status().as_u16(), content_type, serde_json::from_str(&text).unwrap_or(Value::String(text))), status, "POST /v1/search");
    }

    // raw: a Content-Length of 10 MiB and no body at all gets its 413 at once
    let mut conn = TcpStream::connect(authority(&serve.base)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    conn.write_all(b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n\r\n").unwrap();
    let answer = read_answer(&mut conn).unwrap();
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.body["error"].as_str().unwrap().contains("serve.max_body_bytes"), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "answered without waiting for the body: {:?}", started.elapsed());
    // raw, chunked: 10 MiB in 64 KiB chunks; the server stops reading at the limit, and the 413
    // still reaches a client that sends it all before reading
    let mut conn = TcpStream::connect(authority(&serve.base)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    conn.write_all(b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let chunk = vec![b' '; 64 << 10];
    for _ in 0..160 {
        conn.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).unwrap();
        conn.write_all(&chunk).unwrap();
        conn.write_all(b"\r\n").unwrap();
    }
    conn.write_all(b"0\r\n\r\n").unwrap();
    let answer = read_answer(&mut conn).unwrap_or_else(|e| panic!("the chunked upload lost its answer: {e}"));
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.body["error"].as_str().unwrap().contains("serve.max_body_bytes"), "{answer:?}");
    // every refusal counted by its status
    let mut metrics = agent.get(format!("{}/metrics", serve.base)).call().unwrap();
    let metrics = metrics.body_mut().read_to_string().unwrap();
    assert!(metrics.contains("convoflow_api_requests_total{route=\"search\",status=\"413\"} 3"), "{metrics}");
}
