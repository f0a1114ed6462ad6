//! The enrichment stage: turns a decoded conversation into its `EnrichedConversation` (and the
//! dense vectors of its chunks).
//!
//! `Enricher` is the interface the worker calls with a micro-batch of conversations.
//! `TextEnricher` is the part that needs no model: chunking, token counts, BM25 term weights
//! and point ids. `ModelEnricher` wraps it with the configured models, each on its own thread
//! (and CUDA stream): embeddings of every chunk, entities and sentiment of every turn, all three
//! submitted at once for the whole micro-batch; then the per-conversation sentiment trajectory,
//! entity counts and model versions.

use std::collections::BTreeMap;

use anyhow::Result;

use anyhow::Context;

use super::bm25::{Bm25Params, document_vector};
use super::chunk::Chunker;
use crate::config::{GpuConfig, LoadStrategy, ModelConfig, ModelsConfig};
use crate::infer::batch::BatchStats;
use crate::infer::manager::ManagedModel;
use crate::infer::runner::{ModelThread, NerSettings, Output};
use crate::infer::{ModelFolder, Task};
use crate::event::{
    Chunk, Conversation, EnrichedConversation, EnrichedTurn, ModelInfo, Sentiment, SentimentPoint, SourceRef, point_id,
};

/// One decoded input event ready for enrichment.
pub struct EnrichInput<'a> {
    pub conversation: &'a Conversation,
    pub source: SourceRef,
}

/// One enriched event and, with an embedding model, one dense vector per chunk (in event
/// order: turn by turn, chunk by chunk).
#[derive(Debug, Clone)]
pub struct Enriched {
    pub event: EnrichedConversation,
    pub dense: Option<Vec<Vec<f32>>>,
}

pub trait Enricher: Send + Sync {
    /// Enriches a batch; the output is in input order, one event per input.
    fn enrich_batch(&self, batch: &[EnrichInput<'_>]) -> Result<Vec<Enriched>>;
    /// The models behind this enricher (empty for the model-free one).
    fn models(&self) -> Vec<ModelInfo> {
        vec![]
    }
}

pub struct TextEnricher {
    chunker: Chunker,
    bm25: Bm25Params,
}

impl TextEnricher {
    pub fn new(chunker: Chunker, bm25: Bm25Params) -> Self {
        Self { chunker, bm25 }
    }

    pub fn enrich_one(&self, input: &EnrichInput<'_>) -> Result<EnrichedConversation> {
        let conv = input.conversation;
        let mut total_tokens = 0i64;
        let turns = conv
            .turns
            .iter()
            .map(|turn| {
                let chunked = self.chunker.chunk(&turn.text)?;
                total_tokens += chunked.token_count as i64;
                let chunks: Vec<Chunk> = chunked
                    .chunks
                    .iter()
                    .map(|c| Chunk {
                        index: c.index as i32,
                        start: c.chars.start as i32,
                        end: c.chars.end as i32,
                        token_count: c.token_count as i32,
                        point_id: point_id(&conv.conversation_id, &turn.turn_id, c.index).to_string(),
                        sparse: document_vector(&turn.text[c.bytes.clone()], &self.bm25),
                    })
                    .collect();
                Ok(EnrichedTurn {
                    turn_id: turn.turn_id.clone(),
                    speaker: turn.speaker.clone(),
                    role: turn.role.clone(),
                    ts: turn.ts,
                    token_count: chunked.token_count as i32,
                    point_ids: chunks.iter().map(|c| c.point_id.clone()).collect(),
                    chunks,
                    entities: vec![],
                    sentiment: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EnrichedConversation {
            conversation_id: conv.conversation_id.clone(),
            tenant: conv.tenant.clone(),
            channel: conv.channel.clone(),
            language: conv.language.clone(),
            turns,
            sentiment_trajectory: vec![],
            entity_counts: BTreeMap::new(),
            total_tokens,
            models: vec![],
            source: input.source.clone(),
            attributes: conv.attributes.clone(),
            processed_at: chrono::Utc::now().timestamp_millis(),
        })
    }
}

impl Enricher for TextEnricher {
    fn enrich_batch(&self, batch: &[EnrichInput<'_>]) -> Result<Vec<Enriched>> {
        batch.iter().map(|input| Ok(Enriched { event: self.enrich_one(input)?, dense: None })).collect()
    }
}

/// A configured model on its own thread, with what the events report about it.
struct Running {
    thread: ModelThread,
    info: ModelInfo,
    /// Embedding models: put before every chunk's text.
    document_prefix: String,
}

/// The text enricher plus the configured models (any subset of the three).
pub struct ModelEnricher {
    text: TextEnricher,
    embedding: Option<Running>,
    ner: Option<Running>,
    sentiment: Option<Running>,
}

impl ModelEnricher {
    /// Starts one thread per configured model; with `load_strategy: eager` each is loaded and
    /// warmed up before this returns.
    pub fn new(text: TextEnricher, models: &ModelsConfig, gpu: &GpuConfig) -> Result<Self> {
        let device = crate::infer::device::parse_device(&gpu.device)?;
        if device == tch::Device::Cpu && gpu.cpu_threads > 0 {
            tch::set_num_threads(gpu.cpu_threads as i32);
        }
        let eager = models.load_strategy == LoadStrategy::Eager;
        let start = |cfg: &Option<ModelConfig>, task: Task, label: &str| -> Result<Option<Running>> {
            let Some(cfg) = cfg else { return Ok(None) };
            let folder = ModelFolder::open(&cfg.path).with_context(|| format!("the {label} model {}", cfg.name))?;
            let version = folder.content_version().with_context(|| format!("reading {}", cfg.path.display()))?;
            let managed = ManagedModel::new(task, cfg.clone(), device)?;
            let thread = ModelThread::spawn(managed, eager, NerSettings::default())
                .with_context(|| format!("starting the {label} model {}", cfg.name))?;
            let info = ModelInfo { task: label.into(), name: cfg.name.clone(), version };
            Ok(Some(Running { thread, info, document_prefix: cfg.document_prefix.clone() }))
        };
        Ok(Self {
            embedding: start(&models.embedding, Task::Embedding, "embedding")?,
            ner: start(&models.ner, Task::TokenClassification, "ner")?,
            sentiment: start(&models.sentiment, Task::SequenceClassification, "sentiment")?,
            text,
        })
    }

    fn running(&self) -> impl Iterator<Item = &Running> {
        [&self.embedding, &self.ner, &self.sentiment].into_iter().flatten()
    }

    /// True once every model is loaded and warm (readiness).
    pub fn ready(&self) -> bool {
        self.running().all(|r| r.thread.is_loaded())
    }
}

impl Enricher for ModelEnricher {
    fn models(&self) -> Vec<ModelInfo> {
        self.running().map(|r| r.info.clone()).collect()
    }

    fn enrich_batch(&self, batch: &[EnrichInput<'_>]) -> Result<Vec<Enriched>> {
        let mut events = batch.iter().map(|i| self.text.enrich_one(i)).collect::<Result<Vec<_>>>()?;
        let turn_texts: Vec<String> =
            batch.iter().flat_map(|i| i.conversation.turns.iter().map(|t| t.text.clone())).collect();
        // Submit to all model threads first, then wait: the three models work at once.
        let ner = self.ner.as_ref().map(|m| m.thread.submit(turn_texts.clone())).transpose()?;
        let sentiment = self.sentiment.as_ref().map(|m| m.thread.submit(turn_texts)).transpose()?;
        let embedding = match &self.embedding {
            Some(m) => {
                let mut chunk_texts = Vec::new();
                for (input, event) in batch.iter().zip(&events) {
                    for (turn, enriched) in input.conversation.turns.iter().zip(&event.turns) {
                        for text in crate::event::chunk_texts(&turn.text, &enriched.chunks) {
                            chunk_texts.push(format!("{}{text}", m.document_prefix));
                        }
                    }
                }
                Some(m.thread.submit(chunk_texts)?)
            }
            None => None,
        };
        let submitted = std::time::Instant::now();
        let wait = |rx: std::sync::mpsc::Receiver<Result<(Output, BatchStats)>>, task: &'static str| -> Result<Output> {
            let out = rx.recv().map_err(|_| anyhow::anyhow!("a model thread stopped"))??.0;
            // submit → result: includes queueing behind the other models on a shared device
            metrics::histogram!(crate::telemetry::MODEL_SECONDS, "task" => task).record(submitted.elapsed().as_secs_f64());
            Ok(out)
        };
        if let Some(rx) = ner {
            let Output::Entities(all) = wait(rx, "ner")? else { anyhow::bail!("the NER thread returned another output") };
            let mut all = all.into_iter();
            for event in &mut events {
                for turn in &mut event.turns {
                    turn.entities = all.next().expect("one result per turn");
                    for e in &turn.entities {
                        *event.entity_counts.entry(e.label.clone()).or_default() += 1;
                    }
                }
            }
        }
        if let Some(rx) = sentiment {
            let Output::Probabilities(all) = wait(rx, "sentiment")? else { anyhow::bail!("the sentiment thread returned another output") };
            let mut all = all.into_iter();
            for event in &mut events {
                for turn in &mut event.turns {
                    let probabilities = all.next().expect("one result per turn");
                    let (stars, score) = crate::infer::stars(&probabilities);
                    event.sentiment_trajectory.push(SentimentPoint { turn_id: turn.turn_id.clone(), ts: turn.ts, stars, score });
                    turn.sentiment = Some(Sentiment { stars, score, probabilities });
                }
            }
        }
        let mut dense = match embedding {
            Some(rx) => {
                let Output::Embeddings(all) = wait(rx, "embedding")? else { anyhow::bail!("the embedding thread returned another output") };
                Some(all.into_iter())
            }
            None => None,
        };
        let models = self.models();
        Ok(events
            .into_iter()
            .map(|mut event| {
                event.models = models.clone();
                let chunks: usize = event.turns.iter().map(|t| t.chunks.len()).sum();
                let vectors = dense.as_mut().map(|d| d.by_ref().take(chunks).collect());
                Enriched { event, dense: vectors }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::chunk::builtin_tokenizer;
    use crate::sample::SampleGenerator;

    #[test]
    fn every_turn_is_enriched_with_chunks_tokens_and_point_ids() {
        let enricher = TextEnricher::new(Chunker::new(builtin_tokenizer(), 6, 2).unwrap(), Bm25Params::default());
        let conv = SampleGenerator::new(3).conversation(1);
        let source = SourceRef { topic: "in".into(), partition: 2, offset: 40 };
        let out = enricher.enrich_batch(&[EnrichInput { conversation: &conv, source: source.clone() }]).unwrap();
        assert!(out[0].dense.is_none());
        let e = &out[0].event;
        assert_eq!(e.source, source);
        assert_eq!(e.turns.len(), conv.turns.len());
        assert_eq!(e.total_tokens, e.turns.iter().map(|t| i64::from(t.token_count)).sum::<i64>());
        for (turn, input) in e.turns.iter().zip(&conv.turns) {
            assert_eq!(turn.turn_id, input.turn_id);
            assert!(turn.token_count > 0);
            assert!(turn.chunks.len() > 1, "turns longer than 6 tokens are windowed");
            assert_eq!(turn.point_ids[0], point_id(&conv.conversation_id, &input.turn_id, 0).to_string());
            assert!(turn.chunks.iter().all(|c| !c.sparse.indices.is_empty()));
            assert!(turn.entities.is_empty() && turn.sentiment.is_none(), "no model configured");
        }
        assert!(e.models.is_empty());
    }
}
