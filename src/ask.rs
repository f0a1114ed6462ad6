//! Retrieval-augmented answers: hybrid retrieval (the same query as `search`: dense + BM25
//! fused by RRF, payload filters, tenant) → a grounded prompt of numbered excerpts within the
//! context budget → the LLM (`llm`), streamed → the answer and its sources.
//!
//! The prompt is `llm.prompt_template` with `{sources}` (one `llm.source_template` per
//! retrieved turn, numbered from 1 in rank order) and `{question}`, sent as one user message
//! (after `llm.system_prompt` when set). It always fits: prompt budget = `context_tokens` −
//! `max_tokens` − `CHAT_TEMPLATE_MARGIN`; the lowest-ranked turns are dropped until the prompt
//! fits, and a single turn too long on its own is cut.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{Config, LlmConfig};
use crate::llm::{ChatMessage, Completion, LlmClient, LlmError};
use crate::query::{self, GroupBy};
use crate::sink::store::{Hit, StoreError};

/// Tokens kept free for the chat template's own tokens (`[INST]`, role headers, BOS).
pub const CHAT_TEMPLATE_MARGIN: usize = 32;

/// Counts prompt tokens: with the served model's tokenizer when configured, else UTF-8 bytes
/// (no byte-level BPE or SentencePiece token is shorter than one byte, so bytes never undercount).
pub struct TokenCounter {
    tokenizer: Option<tokenizers::Tokenizer>,
}

impl TokenCounter {
    pub fn new(llm: &LlmConfig) -> Result<Self> {
        let tokenizer = match &llm.tokenizer {
            Some(path) => {
                let mut t = tokenizers::Tokenizer::from_file(path)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| format!("loading llm.tokenizer {}", path.display()))?;
                // a tokenizer.json may carry truncation (often 512) or padding: either would
                // miscount a prompt, so both are turned off
                t.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
                t.with_padding(None);
                Some(t)
            }
            None => None,
        };
        Ok(Self { tokenizer })
    }

    pub fn count(&self, text: &str) -> usize {
        match &self.tokenizer {
            Some(t) => t.encode_fast(text, false).map(|e| e.len()).unwrap_or(text.len()),
            None => text.len(),
        }
    }

    pub fn describe(&self) -> &'static str {
        if self.tokenizer.is_some() { "llm.tokenizer" } else { "UTF-8 bytes (an upper bound; set llm.tokenizer for exact counts)" }
    }
}

/// One retrieved turn offered to the model, as the answer cites it (`[n]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Source {
    pub n: usize,
    pub point_id: String,
    pub score: f32,
    pub conversation_id: String,
    pub turn_id: String,
    pub speaker: String,
    pub ts: String,
    pub tenant: String,
    pub stars: Option<i64>,
    pub entities: Vec<String>,
    /// The text given to the model (cut when one turn alone exceeded the budget).
    pub text: String,
}

impl Source {
    fn from_hit(n: usize, hit: &Hit) -> Self {
        let p = &hit.payload;
        let s = |k: &str| p.get(k).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).unwrap_or_default();
        Self {
            n,
            point_id: hit.id.to_string(),
            score: hit.score,
            conversation_id: s("conversation_id"),
            turn_id: s("turn_id"),
            speaker: s("speaker"),
            ts: s("ts"),
            tenant: s("tenant"),
            stars: p.get("sentiment_stars").and_then(Value::as_i64),
            entities: entities(p),
            text: s("text"),
        }
    }

    /// The excerpt as the model sees it (`llm.source_template`).
    pub fn render(&self, template: &str) -> String {
        let stars = self.stars.map_or("sentiment unknown".to_string(), |s| format!("{s}/5 stars"));
        let entities = if self.entities.is_empty() { "none".to_string() } else { self.entities.join(", ") };
        let text = if self.text.is_empty() { "(text not stored)" } else { self.text.as_str() };
        template
            .replace("{n}", &self.n.to_string())
            .replace("{conversation_id}", &self.conversation_id)
            .replace("{turn_id}", &self.turn_id)
            .replace("{speaker}", &self.speaker)
            .replace("{ts}", &self.ts)
            .replace("{stars}", &stars)
            .replace("{entities}", &entities)
            .replace("{text}", text)
    }

    /// One line for the terminal: where it is from and the start of its text.
    pub fn line(&self) -> String {
        let snippet: String = self.text.chars().take(100).collect();
        let cut = if self.text.chars().count() > 100 { "…" } else { "" };
        format!(
            "[{}] conversation {} · turn {} · {} · {} — {}{cut}",
            self.n,
            self.conversation_id,
            self.turn_id,
            self.speaker,
            self.ts,
            snippet.replace('\n', " ")
        )
    }
}

/// `LABEL text` for each entity of the chunk (the label alone when the text is not stored).
fn entities(p: &Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for e in p.get("entities").and_then(Value::as_array).into_iter().flatten() {
        let label = e.get("label").and_then(Value::as_str).unwrap_or("?");
        let item = match e.get("text").and_then(Value::as_str) {
            Some(t) => format!("{label} {t}"),
            None => label.to_string(),
        };
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// The messages for the LLM and what went into them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prompt {
    #[serde(skip)]
    pub messages: Vec<ChatMessage>,
    /// The excerpts in the prompt, numbered as cited.
    pub sources: Vec<Source>,
    /// Retrieved turns left out to fit the budget.
    pub dropped: usize,
    /// Prompt tokens as counted (`TokenCounter`), template margin excluded.
    pub prompt_tokens: usize,
    /// Most prompt tokens allowed: context_tokens − max_tokens − CHAT_TEMPLATE_MARGIN.
    pub budget: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("the question is {tokens} tokens, more than the prompt budget of {budget} (llm.context_tokens − llm.max_tokens)")]
    QuestionTooLong { tokens: usize, budget: usize },
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0:#}")]
    Embedding(anyhow::Error),
}

/// Builds the prompt from the ranked hits: as many as fit, in rank order.
pub fn build_prompt(llm: &LlmConfig, question: &str, hits: &[Hit], counter: &TokenCounter) -> Result<Prompt, AskError> {
    let budget = llm.context_tokens.saturating_sub(llm.max_tokens as usize + CHAT_TEMPLATE_MARGIN);
    let system = llm.system_prompt.as_deref().filter(|s| !s.trim().is_empty());
    let fixed = system.map_or(0, |s| counter.count(s));
    let render = |sources: &[Source]| {
        let excerpts = if sources.is_empty() {
            "(no excerpt matched)".to_string()
        } else {
            sources.iter().map(|s| s.render(&llm.source_template)).collect::<Vec<_>>().join("\n\n")
        };
        // {question} last: a question containing "{sources}" stays as typed
        llm.prompt_template.replace("{sources}", &excerpts).replace("{question}", question)
    };
    let empty = fixed + counter.count(&render(&[]));
    if empty > budget {
        return Err(AskError::QuestionTooLong { tokens: empty, budget });
    }
    let mut sources: Vec<Source> = vec![];
    let mut tokens = empty;
    for hit in hits {
        let mut candidate = Source::from_hit(sources.len() + 1, hit);
        let mut with = sources.clone();
        with.push(candidate.clone());
        let mut total = fixed + counter.count(&render(&with));
        if total > budget && sources.is_empty() {
            // one turn longer than the whole budget: keep its start
            let chars: Vec<char> = candidate.text.chars().collect();
            let (mut lo, mut hi) = (0usize, chars.len());
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                candidate.text = chars[..mid].iter().collect::<String>() + "…";
                if fixed + counter.count(&render(std::slice::from_ref(&candidate))) <= budget { lo = mid } else { hi = mid - 1 }
            }
            if lo == 0 {
                break;
            }
            candidate.text = chars[..lo].iter().collect::<String>() + "…";
            with = vec![candidate.clone()];
            total = fixed + counter.count(&render(&with));
        }
        if total > budget {
            break;
        }
        sources = with;
        tokens = total;
    }
    let mut messages = vec![];
    if let Some(s) = system {
        messages.push(ChatMessage::system(s));
    }
    messages.push(ChatMessage::user(render(&sources)));
    Ok(Prompt { messages, dropped: hits.len() - sources.len(), sources, prompt_tokens: tokens, budget })
}


/// A finished answer: what the LLM said, its sources and timings.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub question: String,
    pub answer: String,
    pub model: String,
    pub sources: Vec<Source>,
    pub retrieved: usize,
    pub dropped: usize,
    pub prompt_tokens_counted: usize,
    pub prompt_budget: usize,
    pub completion: Completion,
}

impl Answer {
    /// The answer to `question` from `retrieved` hits, of which `prompt` kept some.
    pub fn new(question: String, model: &str, retrieved: usize, prompt: Prompt, completion: Completion) -> Self {
        Self {
            question,
            answer: completion.text.clone(),
            model: model.to_string(),
            retrieved,
            dropped: prompt.dropped,
            prompt_tokens_counted: prompt.prompt_tokens,
            prompt_budget: prompt.budget,
            sources: prompt.sources,
            completion,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct AskArgs {
    /// The question, in any language the model speaks (it is asked to answer in the same one).
    pub question: String,
    #[command(flatten)]
    pub filters: query::FilterArgs,
    /// Turns to retrieve (default: llm.top_k); the lowest ranked are dropped to fit the context.
    #[arg(long, short = 'k')]
    pub k: Option<usize>,
    /// Give the model the best turn of each of k conversations instead of the k best turns.
    #[arg(long, value_enum)]
    pub group_by: Option<GroupBy>,
    /// Print one JSON object (answer, sources, token counts, timings) at the end instead of
    /// streaming text.
    #[arg(long)]
    pub json: bool,
}

/// `convoflow ask`: retrieve, prompt, stream the answer to stdout, then its sources.
pub async fn run(cfg: &Config, args: &AskArgs) -> Result<()> {
    // fail before loading anything when no LLM is configured
    let client = Arc::new(LlmClient::new(&cfg.llm)?);
    let filter = args.filters.filter()?;
    let counter = TokenCounter::new(&cfg.llm)?;
    let k = args.k.unwrap_or(cfg.llm.top_k).max(1);
    let dense = query::embed_query(cfg, &args.question)?;
    if dense.is_none() {
        eprintln!("ask: no embedding model folder configured; retrieving with BM25 only");
    }
    let store = query::open_store(cfg).await?;
    let hits = store.search(&query::hybrid_query(&args.question, dense, filter, k, args.group_by)).await?;
    let prompt = build_prompt(&cfg.llm, &args.question, &hits, &counter)?;
    eprintln!(
        "ask: {} turns retrieved, {} in the prompt ({} of {} prompt tokens, counted by {}); asking {} at {}",
        hits.len(),
        prompt.sources.len(),
        prompt.prompt_tokens,
        prompt.budget,
        counter.describe(),
        client.model(),
        client.url()
    );
    let streaming = !args.json;
    let messages = prompt.messages.clone();
    let worker = client.clone();
    let completion = tokio::task::spawn_blocking(move || {
        let mut out = std::io::stdout().lock();
        // a closed stdout (`ask … | head`) stops the generation
        worker.stream_chat(&messages, &mut |text| !streaming || out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_ok())
    })
    .await
    .context("the LLM thread")?;
    let completion = match completion {
        Ok(c) => c,
        Err(e) => {
            if streaming {
                println!();
            }
            return Err(e.into());
        }
    };
    let answer = Answer::new(args.question.clone(), client.model(), hits.len(), prompt, completion);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let bold = |s: &str| if std::io::stdout().is_terminal() { format!("\x1b[1m{s}\x1b[0m") } else { s.to_string() };
    println!("\n\n{}", bold("Sources:"));
    if answer.sources.is_empty() {
        println!("(no turn matched: the answer is not grounded in any conversation)");
    }
    for s in &answer.sources {
        println!("{}", s.line());
    }
    let c = &answer.completion;
    eprintln!(
        "ask: first token after {:.0} ms, {} tokens in {:.1} s{}",
        c.first_token_ms.unwrap_or(0.0),
        c.completion_tokens.unwrap_or(c.chunks as u64),
        c.total_ms / 1000.0,
        c.tokens_per_second().map(|r| format!(" ({r:.1} tokens/s)")).unwrap_or_default()
    );
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hit(n: u128, conv: &str, text: &str) -> Hit {
        let payload = json!({
            "conversation_id": conv, "turn_id": format!("t{n}"), "speaker": "agent-7", "ts": "2026-11-27T10:00:00Z",
            "tenant": "acme", "sentiment_stars": 4, "text": text,
            "entities": [{"label": "PER", "text": "Marie Curie", "start": 0, "end": 11}, {"label": "LOC", "start": 15, "end": 19}],
        });
        Hit { id: uuid::Uuid::from_u128(n), score: 1.0 / n as f32, payload: payload.as_object().unwrap().clone() }
    }

    #[test]
    fn the_prompt_template_is_pinned() {
        let llm = LlmConfig::default();
        let counter = TokenCounter { tokenizer: None };
        let p = build_prompt(&llm, "Qui a appelé pour Lyon ?", &[hit(1, "c-1", "Marie Curie de Lyon appelle.")], &counter).unwrap();
        assert_eq!(p.messages.len(), 1);
        assert_eq!(p.messages[0].role, "user");
        assert_eq!(
            p.messages[0].content,
            "You answer questions about customer conversations. Use only the numbered excerpts below. Cite the \
             excerpts you use by their number in brackets, like [2]. If the excerpts do not contain the answer, say \
             that the conversations do not tell. Answer in the language of the question.\n\nExcerpts:\n\
             [1] conversation c-1, turn t1, agent-7, 2026-11-27T10:00:00Z (4/5 stars; entities: PER Marie Curie, LOC)\n\
             Marie Curie de Lyon appelle.\n\nQuestion: Qui a appelé pour Lyon ?"
        );
        assert_eq!(p.prompt_tokens, p.messages[0].content.len());
        assert_eq!(p.budget, 8192 - 512 - CHAT_TEMPLATE_MARGIN);
        assert_eq!(p.sources[0].line(), "[1] conversation c-1 · turn t1 · agent-7 · 2026-11-27T10:00:00Z — Marie Curie de Lyon appelle.");
        // the config file's template is the built-in one
        let file = Config::load(Some(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/convoflow.yaml")))).unwrap();
        assert_eq!(file.llm.prompt_template, llm.prompt_template);
        assert_eq!(file.llm.source_template, llm.source_template);
        // a system prompt goes first, as its own message
        let with_system = LlmConfig { system_prompt: Some("Be brief.".into()), ..llm };
        let p = build_prompt(&with_system, "q", &[], &counter).unwrap();
        assert_eq!((p.messages[0].role, p.messages[1].role), ("system", "user"));
        assert!(p.messages[1].content.contains("(no excerpt matched)"));
    }

    #[test]
    fn the_prompt_fits_the_budget_by_dropping_the_lowest_ranked_turns() {
        let llm = LlmConfig { context_tokens: 1200, max_tokens: 200, ..Default::default() };
        let counter = TokenCounter { tokenizer: None };
        let hits: Vec<Hit> = (1..=20).map(|n| hit(n, &format!("c-{n}"), &"mot ".repeat(40))).collect();
        let p = build_prompt(&llm, "question ?", &hits, &counter).unwrap();
        assert_eq!(p.budget, 1200 - 200 - CHAT_TEMPLATE_MARGIN);
        assert!(p.prompt_tokens <= p.budget && p.prompt_tokens == p.messages[0].content.len());
        assert!(!p.sources.is_empty() && p.dropped > 0 && p.sources.len() + p.dropped == 20);
        // the best ranked are kept, numbered in order
        assert_eq!(p.sources.iter().map(|s| s.conversation_id.clone()).collect::<Vec<_>>()[..2], ["c-1", "c-2"]);
        assert!(p.sources.iter().enumerate().all(|(i, s)| s.n == i + 1));
        // a single turn longer than the budget is cut, not dropped
        let long = [hit(1, "c-long", &"é".repeat(5000))];
        let p = build_prompt(&llm, "question ?", &long, &counter).unwrap();
        assert_eq!(p.sources.len(), 1);
        assert!(p.sources[0].text.ends_with('…') && p.prompt_tokens <= p.budget, "{}", p.prompt_tokens);
        // a question too long on its own is refused before anything is sent
        let err = build_prompt(&llm, &"x".repeat(2000), &hits, &counter).unwrap_err();
        assert!(matches!(err, AskError::QuestionTooLong { .. }), "{err}");
    }
}
