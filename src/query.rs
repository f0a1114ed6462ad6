//! What `search`, `ask`, `serve`, the demo and the bench share to query the index: the payload
//! filters (CLI flags and HTTP bodies alike), grouping, the collection's dense size, opening
//! the store on its existing collection, the query embedder (one way to embed a query: the
//! embedding model on its own thread, with the configured query template), and the hybrid
//! query they all run.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;

use anyhow::{Context, Result, bail};

use crate::config::{Config, ModelConfig};
use crate::infer::manager::LoadReport;
use crate::infer::runner::{ModelInput, ModelThread, Output, Reply, Served};
use crate::infer::tokenize::ModelTokenizer;
use crate::pipeline::bm25;
use crate::sink::store::{self, Bootstrap, HybridQuery, SearchFilter, VectorStore};

/// What `search --group-by` groups hits by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// The best turn (chunk) of each conversation.
    Conversation,
}

impl GroupBy {
    /// The payload field the store groups by.
    pub fn field(self) -> &'static str {
        match self {
            GroupBy::Conversation => store::GROUP_BY_CONVERSATION,
        }
    }
}

/// The payload filters `search` and `ask` share; all given ones must hold.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Only chunks of this tenant (exact match).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only chunks of turns by this speaker (exact match, e.g. agent-7).
    #[arg(long)]
    pub speaker: Option<String>,
    /// Only chunks of conversations in this language (ISO code as in the events, e.g. fr).
    #[arg(long)]
    pub language: Option<String>,
    /// Only chunks of this conversation (its conversation_id).
    #[arg(long)]
    pub conversation: Option<String>,
    /// Only chunks of turns with at least this many sentiment stars (1-5).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=5))]
    pub min_stars: Option<i32>,
    /// Only chunks whose turn mentions this entity: LABEL:VALUE, e.g. "PER:Marie Curie" (value
    /// case-insensitive; repeatable, all must match).
    #[arg(long = "entity", value_name = "LABEL:VALUE")]
    pub entities: Vec<String>,
}

impl FilterArgs {
    pub fn filter(&self) -> Result<SearchFilter> {
        let entities = self
            .entities
            .iter()
            .map(|e| parse_entity(e))
            .collect::<Result<_>>()?;
        Ok(SearchFilter {
            conversation_id: self.conversation.clone(),
            tenant: self.tenant.clone(),
            speaker: self.speaker.clone(),
            language: self.language.clone(),
            min_stars: self.min_stars,
            entities,
        })
    }
}

/// `LABEL:VALUE` (e.g. `PER:Marie Curie`) as (label, value), both trimmed.
pub fn parse_entity(e: &str) -> Result<(String, String)> {
    match e.split_once(':') {
        Some((label, value)) if !label.trim().is_empty() && !value.trim().is_empty() => {
            Ok((label.trim().to_string(), value.trim().to_string()))
        }
        _ => bail!("--entity expects LABEL:VALUE (e.g. PER:Marie Curie), got {e:?}"),
    }
}

/// Dense dimension of the collection: `qdrant.dense_dim`, else the embedding model's hidden size.
pub fn dense_dim(cfg: &Config) -> Result<usize> {
    if let Some(dim) = cfg.qdrant.dense_dim {
        return Ok(dim);
    }
    let Some(model) = &cfg.models.embedding else {
        bail!("the vector store needs the dense vector size: configure models.embedding or set qdrant.dense_dim");
    };
    let path = model.path.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} for the dense vector size (or set qdrant.dense_dim)", path.display()))?;
    let hf: crate::infer::hf::HfConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(hf.hidden_size as usize)
}

/// Opens the configured store and its existing collection.
pub async fn open_store(cfg: &Config) -> Result<Arc<dyn VectorStore>> {
    let dim = dense_dim(cfg)?;
    let store = store::open(&cfg.qdrant)?;
    store.ensure_collection(&store::collection_spec(&cfg.qdrant, dim), Bootstrap::MustExist).await?;
    Ok(store)
}

/// The hybrid query `search`, `ask` and `serve` run, for `limit` hits (with `group_by`: `limit`
/// groups, the best hit of each).
pub fn hybrid_query(text: &str, dense: Option<Vec<f32>>, filter: SearchFilter, limit: usize, group_by: Option<GroupBy>) -> HybridQuery {
    HybridQuery {
        dense,
        sparse: bm25::query_vector(text),
        filter,
        limit,
        // grouping needs more candidates: several turns of one conversation compete
        prefetch_limit: if group_by.is_some() { (limit * 10).max(100) } else { (limit * 5).max(50) },
        group_by: group_by.map(|g| g.field().to_string()),
    }
}

/// The embedding model loaded for queries, on its own thread: every query is embedded the same
/// way (`models.embedding`'s `query_template`, dtype and device), whoever asks. Texts are
/// tokenized by the caller (`prepare_text`) and the thread gets token ids, so the jobs of
/// concurrent callers are launched together as one batch (`ModelThread`'s merging, up to the
/// model's `batch_size`) — `convoflow serve`'s dynamic batching.
pub struct QueryEmbedder {
    thread: ModelThread,
    model: ModelConfig,
    tokenizer: ModelTokenizer,
    /// The vectors' size (the model's hidden size).
    pub dim: usize,
    vocab: usize,
}

/// Which of the model's input forms a text is embedded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputType {
    /// `models.embedding.query_template` applied (what `search` embeds).
    Query,
    /// `models.embedding.document_prefix` put before it (what the worker indexes).
    Document,
}

/// One input as the model takes it: token ids with its special tokens, and whether it was cut
/// at the model's length.
#[derive(Debug, Clone)]
pub struct PreparedInput {
    pub ids: Vec<i64>,
    pub truncated: bool,
}

impl QueryEmbedder {
    /// Loads the configured embedding model (blocking); None without an embedding model folder.
    pub fn load(cfg: &Config) -> Result<Option<Self>> {
        let Some(m) = &cfg.models.embedding else { return Ok(None) };
        if !m.path.join("config.json").exists() {
            return Ok(None);
        }
        let device = crate::infer::device::parse_device(&cfg.gpu.device)?;
        let Served { folder, tokenizer, thread } = Served::load(crate::infer::Task::Embedding, m, device)?;
        Ok(Some(Self {
            thread,
            model: m.clone(),
            tokenizer,
            dim: folder.config.hidden_size as usize,
            vocab: folder.config.vocab_size as usize,
        }))
    }

    /// The model's configured name.
    pub fn name(&self) -> &str {
        &self.model.name
    }

    /// The load report (dtype, device), once loaded (at `load`'s return).
    pub fn load_report(&self) -> Option<LoadReport> {
        self.thread.load_report()
    }

    /// Longest input in tokens, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.tokenizer.max_positions
    }

    /// `text` as `kind` (template or prefix applied), tokenized, cut to the model's length.
    pub fn prepare_text(&self, text: &str, kind: InputType) -> Result<PreparedInput> {
        let text = match kind {
            InputType::Query => self.model.query_text(text),
            InputType::Document => self.model.document_text(text),
        };
        let encoding = self.tokenizer.encode_plain(&text)?;
        let content = encoding.get_ids();
        Ok(PreparedInput { truncated: content.len() > self.tokenizer.content_capacity(), ids: self.tokenizer.wrap(&[], content) })
    }

    /// Token ids of the model's own tokenizer (content, no special tokens) as `kind`: the
    /// document prefix's ids, or the query template's text before `{query}`, go before them
    /// (a template with text after `{query}` cannot apply to ids, and is refused).
    pub fn prepare_tokens(&self, tokens: &[i64], kind: InputType) -> Result<PreparedInput> {
        let leading_text = match kind {
            InputType::Document => self.model.document_prefix.as_str(),
            InputType::Query => match self.model.query_template.split_once("{query}") {
                Some((before, "")) => before,
                Some(_) => bail!("the query template {:?} has text after {{query}}: token inputs cannot be embedded as queries", self.model.query_template),
                None => self.model.query_template.as_str(),
            },
        };
        if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= self.vocab) {
            bail!("token id {bad} is not in the model's vocabulary (0 to {})", self.vocab - 1);
        }
        let leading = self.tokenizer.leading_ids(leading_text)?;
        let content: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        let truncated = leading.len() + content.len() > self.tokenizer.content_capacity();
        Ok(PreparedInput { ids: self.tokenizer.wrap(&leading, &content), truncated })
    }

    /// Queues prepared inputs on the model thread; dropped unrun while still queued once
    /// `withdrawn` is set. The vectors (in input order) arrive on the receiver.
    pub fn submit(&self, ids: Vec<Vec<i64>>, withdrawn: Arc<AtomicBool>) -> Result<mpsc::Receiver<Reply>> {
        self.thread.submit_withdrawable(ModelInput::Ids(ids), withdrawn)
    }

    /// Embeds queries (query template applied), in input order (blocking).
    pub fn embed(&self, queries: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = queries.iter().map(|q| self.prepare_text(q, InputType::Query).map(|p| p.ids)).collect::<Result<Vec<_>>>()?;
        let reply = self.thread.submit_input(ModelInput::Ids(ids))?;
        vectors(reply.recv().map_err(|_| anyhow::anyhow!("the {} model thread stopped", self.model.name))?.map_err(anyhow::Error::from)?.0)
    }

    /// Embeds one query (blocking).
    pub fn embed_one(&self, query: &str) -> Result<Vec<f32>> {
        self.embed(&[query])?.pop().context("the embedding model returned no vector")
    }
}

/// The vectors of an embedding model's output.
pub fn vectors(output: Output) -> Result<Vec<Vec<f32>>> {
    match output {
        Output::Embeddings(v) => Ok(v),
        other => bail!("unexpected output of the embedding model: {other:?}"),
    }
}

/// Embeds one query with the configured model, loaded for it (the CLI's one-shot commands);
/// None without an embedding model folder.
pub fn embed_query(cfg: &Config, query: &str) -> Result<Option<Vec<f32>>> {
    QueryEmbedder::load(cfg)?.map(|e| e.embed_one(query)).transpose()
}
