//! From an enriched conversation to its points: one per turn chunk, id = UUIDv5 of
//! (conversation_id, turn_id, chunk index), so a replay upserts the same points.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{StorePoint, entity_term};
use crate::event::{Conversation, EnrichedConversation, Entity, chunk_texts};

pub use crate::config::PayloadText;


/// Milliseconds since the epoch as RFC 3339 (Qdrant's datetime payload format).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The points of one enriched conversation. `dense`, when given, holds one vector per chunk in
/// event order (turn by turn, chunk by chunk). `conv` is the input the event was made from.
pub fn points_for(
    conv: &Conversation,
    event: &EnrichedConversation,
    dense: Option<&[Vec<f32>]>,
    text_mode: PayloadText,
) -> Vec<StorePoint> {
    let mut dense = dense.map(|d| d.iter());
    let models: Vec<Value> = event.models.iter().map(|m| json!(m.name)).collect();
    let mut out = Vec::new();
    for (turn, input) in event.turns.iter().zip(&conv.turns) {
        debug_assert_eq!(turn.turn_id, input.turn_id);
        for (chunk, text) in turn.chunks.iter().zip(chunk_texts(&input.text, &turn.chunks)) {
            let (start, end) = (chunk.start, chunk.end);
            let in_chunk: Vec<&Entity> = turn.entities.iter().filter(|e| e.start < end && e.end > start).collect();
            let mut payload = Map::new();
            payload.insert("conversation_id".into(), json!(event.conversation_id));
            payload.insert("turn_id".into(), json!(turn.turn_id));
            payload.insert("chunk_index".into(), json!(chunk.index));
            payload.insert("tenant".into(), json!(event.tenant));
            payload.insert("channel".into(), json!(event.channel));
            // the turn's own (detected, inherited or the event's, normalised), else the event's
            if let Some(lang) = turn.language.as_ref().or(event.language.as_ref()) {
                payload.insert("language".into(), json!(lang));
            }
            payload.insert("speaker".into(), json!(turn.speaker));
            payload.insert("role".into(), json!(turn.role));
            payload.insert("ts".into(), json!(rfc3339(turn.ts)));
            payload.insert("chunk_start".into(), json!(start));
            payload.insert("chunk_end".into(), json!(end));
            match text_mode {
                PayloadText::Full => {
                    payload.insert("text".into(), json!(text));
                }
                PayloadText::Masked => {
                    payload.insert("text".into(), json!(mask(text, start, &in_chunk)));
                }
                PayloadText::None => {}
            }
            // Entity offsets stay relative to the turn, like in the enriched event.
            let entities: Vec<Value> = in_chunk
                .iter()
                .map(|e| {
                    let mut o = json!({"label": e.label, "start": e.start, "end": e.end, "score": e.score});
                    if text_mode != PayloadText::Masked {
                        o["text"] = json!(e.text);
                    }
                    o
                })
                .collect();
            let labels: BTreeSet<&str> = in_chunk.iter().map(|e| e.label.as_str()).collect();
            payload.insert("entities".into(), Value::Array(entities));
            payload.insert("entity_labels".into(), json!(labels));
            if text_mode != PayloadText::Masked {
                let values: BTreeSet<String> = in_chunk.iter().map(|e| entity_term(&e.label, &e.text)).collect();
                payload.insert("entity_values".into(), json!(values));
            }
            if let Some(s) = &turn.sentiment {
                payload.insert("sentiment_stars".into(), json!(s.stars));
                payload.insert("sentiment_score".into(), json!(s.score));
            }
            payload.insert("models".into(), Value::Array(models.clone()));
            let id = Uuid::parse_str(&chunk.point_id).expect("point ids are UUIDs");
            let dense = dense.as_mut().map(|d| d.next().expect("one dense vector per chunk").clone());
            out.push(StorePoint { id, dense, sparse: chunk.sparse.clone(), payload });
        }
    }
    out
}

/// The chunk's text (starting at character `start` of its turn) with entity spans replaced by
/// `[LABEL]`; entity offsets are in turn characters.
fn mask(text: &str, start: i32, entities: &[&Entity]) -> String {
    let chars: Vec<char> = text.chars().collect();
    let len = chars.len() as i32;
    let mut spans: Vec<(i32, i32, &str)> =
        entities.iter().map(|e| ((e.start - start).max(0), (e.end - start).min(len), e.label.as_str())).collect();
    spans.sort();
    let mut out = String::new();
    let mut at = 0;
    for (s, e, label) in spans {
        if s < at {
            continue; // overlapping spans: the first one wins
        }
        out.extend(&chars[at as usize..s as usize]);
        out.push_str(&format!("[{label}]"));
        at = e;
    }
    out.extend(&chars[at as usize..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Sentiment, SourceRef, point_id};
    use crate::pipeline::bm25::Bm25Params;
    use crate::pipeline::chunk::{Chunker, builtin_tokenizer};
    use crate::pipeline::text::{EnrichInput, TextEnricher};
    use crate::sample::SampleGenerator;

    fn enriched(max_tokens: usize) -> (Conversation, EnrichedConversation) {
        let conv = SampleGenerator::new(5).conversation(2);
        let enricher = TextEnricher::new(Chunker::new(builtin_tokenizer(), max_tokens, 2).unwrap(), Bm25Params::default());
        let source = SourceRef { topic: "in".into(), partition: 0, offset: 1 };
        let event = enricher.enrich_one(&EnrichInput { conversation: &conv, source }).unwrap();
        (conv, event)
    }

    #[test]
    fn one_point_per_chunk_with_the_turn_payload() {
        let (conv, event) = enriched(8);
        let chunks: usize = event.turns.iter().map(|t| t.chunks.len()).sum();
        assert!(chunks > conv.turns.len(), "long turns are split");
        let dense: Vec<Vec<f32>> = (0..chunks).map(|i| vec![i as f32; 4]).collect();
        let points = points_for(&conv, &event, Some(&dense), PayloadText::Full);
        assert_eq!(points.len(), chunks);
        assert_eq!(points[0].id, point_id(&conv.tenant, &conv.conversation_id, &conv.turns[0].turn_id, 0));
        assert_eq!(points[chunks - 1].dense.as_ref().unwrap()[0], (chunks - 1) as f32);
        let p = &points[0].payload;
        assert_eq!(p["conversation_id"], json!(conv.conversation_id));
        assert_eq!(p["speaker"], json!(conv.turns[0].speaker));
        assert_eq!(p["tenant"], json!(conv.tenant));
        assert_eq!(p["ts"], json!(rfc3339(conv.turns[0].ts)));
        let text = p["text"].as_str().unwrap();
        assert!(conv.turns[0].text.starts_with(text), "{text:?}");
        // every chunk's text is the turn's text at the chunk's character offsets
        for (point, turn) in points.iter().zip(event.turns.iter().flat_map(|t| t.chunks.iter().map(move |c| (t, c)))) {
            let input = conv.turns.iter().find(|i| i.turn_id == turn.0.turn_id).unwrap();
            let expected: String =
                input.text.chars().skip(turn.1.start as usize).take((turn.1.end - turn.1.start) as usize).collect();
            assert_eq!(point.payload["text"], json!(expected));
        }
        assert!(points_for(&conv, &event, None, PayloadText::None).iter().all(|p| p.dense.is_none() && !p.payload.contains_key("text")));
    }

    #[test]
    fn each_point_carries_its_turns_language_else_the_events() {
        let (conv, mut event) = enriched(256);
        event.language = Some("fr".into());
        event.turns[0].language = Some("de".into());
        event.turns[1].language = None;
        let points = points_for(&conv, &event, None, PayloadText::None);
        let of = |turn: usize| {
            let id = &event.turns[turn].turn_id;
            points.iter().find(|p| p.payload["turn_id"] == json!(id)).unwrap().payload["language"].clone()
        };
        assert_eq!(of(0), json!("de"), "the turn's own language");
        assert_eq!(of(1), json!("fr"), "without one, the event's");
    }

    #[test]
    fn entities_sentiment_and_masking() {
        let (mut conv, mut event) = enriched(256);
        conv.turns[0].text = "Bonjour, ici Marie Curie de Lyon.".into();
        event.turns[0].chunks.truncate(1);
        event.turns[0].chunks[0].start = 0;
        event.turns[0].chunks[0].end = conv.turns[0].text.chars().count() as i32;
        event.turns[0].entities = vec![
            Entity { text: "Marie Curie".into(), label: "PER".into(), start: 13, end: 24, score: 0.99, model: None },
            Entity { text: "Lyon".into(), label: "LOC".into(), start: 28, end: 32, score: 0.98, model: None },
        ];
        event.turns[0].sentiment = Some(Sentiment { stars: 4, score: 0.7, probabilities: vec![0.0, 0.1, 0.1, 0.7, 0.1], model: None });
        let full = &points_for(&conv, &event, None, PayloadText::Full)[0].payload;
        assert_eq!(full["entity_labels"], json!(["LOC", "PER"]));
        assert_eq!(full["entity_values"], json!(["LOC:lyon", "PER:marie curie"]));
        assert_eq!(full["sentiment_stars"], json!(4));
        assert_eq!(full["entities"][0]["text"], json!("Marie Curie"));
        let masked = &points_for(&conv, &event, None, PayloadText::Masked)[0].payload;
        assert_eq!(masked["text"], json!("Bonjour, ici [PER] de [LOC]."));
        assert!(masked.get("entity_values").is_none() && masked["entities"][0].get("text").is_none(), "no entity text leaks");
        assert_eq!(masked["entity_labels"], json!(["LOC", "PER"]));
    }
}
