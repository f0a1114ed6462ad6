//! The model-free part of enrichment, run by the prepare stage: chunking, token counts, BM25
//! term weights and point ids of every turn, as the conversation's `EnrichedConversation`
//! before any model has seen it.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

use super::bm25::{Bm25Params, document_vector};
use super::chunk::{ChunkedText, Chunker, builtin_tokenizer, load_tokenizer};
use crate::config::Config;
use crate::event::{
    Chunk, Conversation, EnrichedConversation, EnrichedTurn, SourceRef,
    point_id,
};
use crate::infer::tokenize::ModelTokenizer;
use crate::language::{Detection, Languages};

/// One decoded input event ready for text enrichment.
pub struct EnrichInput<'a> {
    pub conversation: &'a Conversation,
    pub source: SourceRef,
}

/// A conversation's text enrichment and each turn's chunking (with the token ids).
pub struct TextEnriched {
    pub event: EnrichedConversation,
    pub chunked: Vec<ChunkedText>,
}

pub struct TextEnricher {
    chunker: Chunker,
    bm25: Bm25Params,
    languages: Languages,
}

impl TextEnricher {
    /// Without language detection: each turn's language is the event's field.
    pub fn new(chunker: Chunker, bm25: Bm25Params) -> Self {
        Self { chunker, bm25, languages: Languages::event_only() }
    }

    /// Each turn's language as `languages` decides.
    pub fn with_languages(self, languages: Languages) -> Self {
        Self { languages, ..self }
    }

    pub fn enrich_one(&self, input: &EnrichInput<'_>) -> Result<EnrichedConversation> {
        Ok(self.enrich(input.conversation, input.source.clone())?.event)
    }

    /// The event without model outputs, and each turn's chunking and language. Turns are
    /// chunked, tokenized and their language detected in parallel on rayon's pool (in order):
    /// one long conversation alone — an idle worker's latency — uses every core, not one.
    pub fn enrich(&self, conv: &Conversation, source: SourceRef) -> Result<TextEnriched> {
        use rayon::prelude::*;
        let detect = self.languages.detects(conv.language.as_deref());
        let per_turn: Vec<(EnrichedTurn, ChunkedText, Option<Detection>)> = conv
            .turns
            .par_iter()
            .map(|turn| -> Result<(EnrichedTurn, ChunkedText, Option<Detection>)> {
                let chunked = self.chunker.chunk(&turn.text)?;
                let chunks: Vec<Chunk> = chunked
                    .chunks
                    .iter()
                    .map(|c| Chunk {
                        index: c.index as i32,
                        start: c.chars.start as i32,
                        end: c.chars.end as i32,
                        token_count: c.token_count as i32,
                        point_id: point_id(&conv.tenant, &conv.conversation_id, &turn.turn_id, c.index).to_string(),
                        sparse: document_vector(&turn.text[c.bytes.clone()], &self.bm25),
                    })
                    .collect();
                let enriched = EnrichedTurn {
                    turn_id: turn.turn_id.clone(),
                    speaker: turn.speaker.clone(),
                    role: turn.role.clone(),
                    ts: turn.ts,
                    token_count: chunked.token_count as i32,
                    point_ids: chunks.iter().map(|c| c.point_id.clone()).collect(),
                    chunks,
                    entities: vec![],
                    sentiment: None,
                    language: None,
                    language_confidence: 0.0,
                    language_source: None,
                    entities_skipped: None,
                    sentiment_skipped: None,
                };
                let detected = if detect { self.languages.detect(&turn.text) } else { None };
                Ok((enriched, chunked, detected))
            })
            .collect::<Result<_>>()?;
        let total_tokens = per_turn.iter().map(|(_, c, _)| c.token_count as i64).sum();
        let detected: Vec<Option<Detection>> = per_turn.iter().map(|(_, _, d)| *d).collect();
        let languages = self.languages.resolve(conv.language.as_deref(), &detected);
        let (turns, chunked_turns): (Vec<EnrichedTurn>, Vec<ChunkedText>) = per_turn
            .into_iter()
            .zip(languages.turns)
            .map(|((mut turn, chunked, _), language)| {
                if let Some(l) = language {
                    turn.language = Some(l.code);
                    turn.language_confidence = l.confidence;
                    turn.language_source = Some(l.source.as_str().to_string());
                }
                (turn, chunked)
            })
            .unzip();
        let event = EnrichedConversation {
            conversation_id: conv.conversation_id.clone(),
            tenant: conv.tenant.clone(),
            channel: conv.channel.clone(),
            // the event's as it came, else what its turns tell (their majority)
            language: conv.language.clone().filter(|l| !l.trim().is_empty()).or(languages.conversation),
            turns,
            sentiment_trajectory: vec![],
            entity_counts: BTreeMap::new(),
            total_tokens,
            models: vec![],
            source,
            attributes: conv.attributes.clone(),
            processed_at: chrono::Utc::now().timestamp_millis(),
        };
        Ok(TextEnriched { event, chunked: chunked_turns })
    }
}


/// The text enricher (chunking, token counts, BM25, point ids). With an embedding model
/// (`embedding`: its tokenizer and the length of its document prefix in tokens), chunks are
/// counted and cut in that model's tokens, so each chunk is exactly one model input;
/// otherwise in those of `pipeline.chunk.tokenizer` or the built-in word-level tokenizer.
pub fn build_text_enricher(cfg: &Config, embedding: Option<(&ModelTokenizer, usize)>) -> Result<TextEnricher> {
    let chunk = &cfg.pipeline.chunk;
    let tokenizer = match (embedding, &chunk.tokenizer) {
        (Some(_), Some(path)) => bail!(
            "pipeline.chunk.tokenizer ({}) is for workers without an embedding model: with one, chunks are counted in \
             the embedding model's own tokens; remove the setting",
            path.display()
        ),
        (Some((tokenizer, leading)), None) => {
            let room = tokenizer.content_capacity().saturating_sub(leading);
            if chunk.max_tokens > room {
                bail!(
                    "pipeline.chunk.max_tokens is {}, but the embedding model takes {room} tokens of text per input \
                     ({} positions less {} special and {leading} document-prefix tokens); lower max_tokens",
                    chunk.max_tokens,
                    tokenizer.max_positions,
                    tokenizer.max_positions - tokenizer.content_capacity()
                );
            }
            tokenizer.plain_tokenizer().clone()
        }
        (None, Some(path)) => load_tokenizer(path)?,
        (None, None) => builtin_tokenizer(),
    };
    let languages = Languages::new(&cfg.pipeline.language)?;
    Ok(TextEnricher::new(Chunker::new(tokenizer, chunk.max_tokens, chunk.overlap_tokens)?, cfg.pipeline.bm25).with_languages(languages))
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
        let out = enricher.enrich(&conv, source.clone()).unwrap();
        assert_eq!(out.chunked.len(), conv.turns.len(), "one chunking per turn");
        let e = &out.event;
        assert_eq!(e.source, source);
        assert_eq!(e.turns.len(), conv.turns.len());
        assert_eq!(e.total_tokens, e.turns.iter().map(|t| i64::from(t.token_count)).sum::<i64>());
        for (turn, input) in e.turns.iter().zip(&conv.turns) {
            assert_eq!(turn.turn_id, input.turn_id);
            assert!(turn.token_count > 0);
            assert!(turn.chunks.len() > 1, "turns longer than 6 tokens are windowed");
            assert_eq!(turn.point_ids[0], point_id(&conv.tenant, &conv.conversation_id, &input.turn_id, 0).to_string());
            assert!(turn.chunks.iter().all(|c| !c.sparse.indices.is_empty()));
            assert!(turn.entities.is_empty() && turn.sentiment.is_none(), "no model configured");
        }
        assert!(e.models.is_empty());
    }
}
