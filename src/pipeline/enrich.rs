//! The enrichment stage: turns a decoded conversation into its `EnrichedConversation`.
//!
//! `Enricher` is the interface the worker calls with a micro-batch of conversations.
//! `TextEnricher` is the part that needs no model: chunking, token counts, BM25 term weights
//! and point ids. Model outputs (entities, sentiment, sentiment trajectory, entity counts,
//! model list) stay empty until a model-backed enricher wraps it.

use std::collections::BTreeMap;

use anyhow::Result;

use super::bm25::{Bm25Params, document_vector};
use super::chunk::Chunker;
use crate::event::{Chunk, Conversation, EnrichedConversation, EnrichedTurn, SourceRef, point_id};

/// One decoded input event ready for enrichment.
pub struct EnrichInput<'a> {
    pub conversation: &'a Conversation,
    pub source: SourceRef,
}

pub trait Enricher: Send + Sync {
    /// Enriches a batch; the output is in input order, one event per input.
    fn enrich_batch(&self, batch: &[EnrichInput<'_>]) -> Result<Vec<EnrichedConversation>>;
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
    fn enrich_batch(&self, batch: &[EnrichInput<'_>]) -> Result<Vec<EnrichedConversation>> {
        batch.iter().map(|input| self.enrich_one(input)).collect()
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
        let e = &out[0];
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
