//! What the demo shows after the run: an answer from the LLM (when one is configured) and a few
//! hybrid searches over what was indexed.


use anyhow::Result;

use crate::config::Config;
use crate::query::{self, QueryEmbedder};
use crate::sink::store::SearchFilter;


/// The question the demo asks its LLM, over the sample conversations it indexed.
pub const DEMO_QUESTION: &str = "Pourquoi les clients demandent-ils un remboursement ?";

/// One `convoflow ask` over what the demo indexed when an LLM endpoint is configured; otherwise
/// how to configure one. A failing LLM does not fail the demo (its job is the worker): the
/// error is printed as `ask` prints it.
pub async fn ask_example(cfg: &Config, llm: crate::config::LlmConfig) {
    if !llm.is_configured() {
        println!(
            "\nask: no LLM endpoint configured, so the demo asks no question. To end it with an answer, point it at \
             any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama):\n  \
             CONVOFLOW__LLM__URL=http://HOST:PORT/v1 CONVOFLOW__LLM__MODEL=NAME cargo run --release -- demo\n\
             or, without a GPU, try the protocol with the local random-weight test model (its answers are noise):\n  \
             eval \"$(scripts/llm-server start | sed 's/^/export /')\" && \\\n  \
             CONVOFLOW__LLM__URL=$LLM_URL CONVOFLOW__LLM__MODEL=$LLM_MODEL cargo run --release -- demo   (docs/ask.md)"
        );
        return;
    }
    let mut cfg = cfg.clone();
    cfg.llm = llm;
    println!("\nask {DEMO_QUESTION:?} ({} at {}):", cfg.llm.model, cfg.llm.url);
    let args = crate::ask::AskArgs {
        question: DEMO_QUESTION.into(),
        filters: Default::default(),
        k: Some(5),
        group_by: None,
        json: false,
    };
    if let Err(e) = crate::ask::run(&cfg, &args).await {
        println!("ask failed: {e:#}");
    }
}


/// A few hybrid searches over what the worker indexed: the query embedded with the demo's
/// embedding model (dense prefetch) and its BM25 terms (sparse prefetch), fused by RRF.
pub async fn search_examples(cfg: &Config) -> Result<()> {
    let store = query::open_store(cfg).await?;
    println!("\nindexed points: {}", store.count(&Default::default()).await?);
    let queries = [
        ("my refund was promised but never came", None::<&str>),
        ("panne internet dans mon quartier", None),
        ("technicien jeudi matin", Some("fr")),
    ];
    // entities of an untrained NER model are noise: not marked in the snippets
    let mark_entities = !cfg.models.ner.is_empty() && cfg.models.ner.iter().all(|m| !m.name.contains("UNTRAINED"));
    // one model load for all queries
    let dense: Vec<Option<Vec<f32>>> = {
        let cfg = cfg.clone();
        let texts: Vec<&'static str> = queries.iter().map(|(q, _)| *q).collect();
        let embedded = tokio::task::spawn_blocking(move || -> Result<_> {
            QueryEmbedder::load(&cfg)?.map(|e| e.embed(&texts)).transpose()
        });
        match embedded.await?? {
            Some(vectors) => vectors.into_iter().map(Some).collect(),
            None => vec![None; queries.len()],
        }
    };
    for ((query, language), dense) in queries.into_iter().zip(dense) {
        let how = if dense.is_some() { "dense + BM25, RRF" } else { "BM25" };
        let filter = SearchFilter { language: language.map(String::from), ..Default::default() };
        let q = query::hybrid_query(query, dense, filter, 3, None);
        let hits = store.search(&q).await?;
        let filter = language.map(|l| format!(", language = {l}")).unwrap_or_default();
        println!("\nsearch {query:?} ({how}{filter}):\n{}", crate::search::table_with(&hits, false, mark_entities));
    }
    Ok(())
}
