//! Domain types: the input `Conversation` and the output `EnrichedConversation`.
//! Field for field they mirror `schemas/*.avsc`; the codecs map between them and the wire.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    pub id: String,
    pub role: String,
    #[serde(default)]
    pub display_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub turn_id: String,
    pub speaker: String,
    #[serde(default = "unknown_role")]
    pub role: String,
    pub text: String,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
}

fn unknown_role() -> String {
    "unknown".to_string()
}
fn default_channel() -> String {
    "chat".to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub conversation_id: String,
    pub tenant: String,
    #[serde(default = "default_channel")]
    pub channel: String,
    #[serde(default)]
    pub language: Option<String>,
    pub started_at: i64,
    #[serde(default)]
    pub participants: Vec<Participant>,
    pub turns: Vec<Turn>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Why a decoded conversation is rejected (it goes to the dead-letter topic with this reason).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("conversation_id is empty")]
    EmptyConversationId,
    #[error("conversation has no turns")]
    NoTurns,
    #[error("no turn has text (all {turns} are empty, whitespace or invisible characters): nothing to enrich or index")]
    NoText { turns: usize },
    #[error("turn #{index} has an empty turn_id")]
    EmptyTurnId { index: usize },
    #[error("turn_id {turn_id:?} appears twice")]
    DuplicateTurnId { turn_id: String },
    #[error("turn {turn_id:?} text is {bytes} bytes, over the limit of {limit}")]
    TurnTooLarge { turn_id: String, bytes: usize, limit: usize },
    #[error("message key {key:?} differs from conversation_id {conversation_id:?}")]
    KeyMismatch { key: String, conversation_id: String },
    #[error("the event has {turns} turns, over the limit of {limit} (pipeline.max_turns_per_event)")]
    TooManyTurns { turns: usize, limit: usize },
    #[error("the event is {bytes} bytes, over the limit of {limit} (pipeline.max_event_bytes)")]
    EventTooLarge { bytes: usize, limit: usize },
    #[error("{field} is {bytes} bytes, over the limit of {limit} (pipeline.max_id_bytes): ids are copied into every point")]
    IdTooLong { field: String, bytes: usize, limit: usize },
    #[error("{field} contains a NUL character (ids must not: point ids are built from them)")]
    NulInId { field: &'static str },
    #[error("{field} is {millis} ms since the epoch, outside the representable time range")]
    TimeOutOfRange { field: String, millis: i64 },
}

/// Bounds on one event, checked before any enrichment (the DLQ takes what exceeds them).
#[derive(Debug, Clone, Copy)]
pub struct EventLimits {
    /// One turn's text, in bytes (`pipeline.max_turn_bytes`).
    pub max_turn_bytes: usize,
    /// Turns in one event (`pipeline.max_turns_per_event`).
    pub max_turns: usize,
    /// One id (conversation, tenant, turn, speaker, participant), in bytes (`pipeline.max_id_bytes`).
    pub max_id_bytes: usize,
}

impl EventLimits {
    pub const UNBOUNDED: EventLimits = EventLimits { max_turn_bytes: usize::MAX, max_turns: usize::MAX, max_id_bytes: usize::MAX };
}

/// Characters that show nothing: zero-width spaces and joiners, bidirectional controls, word
/// joiner and invisible operators, the byte-order mark, soft hyphen, variation selectors, tag
/// characters, Hangul fillers (Unicode's format characters and default-ignorables; `char::
/// is_whitespace` knows none of them).
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}' | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}'
        | '\u{FEFF}' | '\u{FFA0}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{E0000}'..='\u{E0FFF}')
}

/// Whether a text has nothing to read: empty, whitespace or invisible characters only.
pub fn is_blank(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || invisible(c))
}

/// `value` (the id `field`) within `limit` bytes.
fn id_within(field: impl FnOnce() -> String, value: &str, limit: usize) -> Result<(), ValidationError> {
    if value.len() > limit {
        return Err(ValidationError::IdTooLong { field: field(), bytes: value.len(), limit });
    }
    Ok(())
}

fn time_in_range(millis: i64) -> bool {
    chrono::DateTime::from_timestamp_millis(millis).is_some()
}

impl Conversation {
    /// Checks what the schema cannot express, and the configured bounds.
    pub fn validate(&self, limits: &EventLimits) -> Result<(), ValidationError> {
        let max_turn_bytes = limits.max_turn_bytes;
        if self.conversation_id.trim().is_empty() {
            return Err(ValidationError::EmptyConversationId);
        }
        if self.conversation_id.contains('\0') {
            return Err(ValidationError::NulInId { field: "conversation_id" });
        }
        if self.tenant.contains('\0') {
            return Err(ValidationError::NulInId { field: "tenant" });
        }
        let max_id = limits.max_id_bytes;
        id_within(|| "conversation_id".into(), &self.conversation_id, max_id)?;
        id_within(|| "tenant".into(), &self.tenant, max_id)?;
        for (index, p) in self.participants.iter().enumerate() {
            id_within(|| format!("participant #{index} id"), &p.id, max_id)?;
        }
        if self.turns.is_empty() {
            return Err(ValidationError::NoTurns);
        }
        if self.turns.len() > limits.max_turns {
            return Err(ValidationError::TooManyTurns { turns: self.turns.len(), limit: limits.max_turns });
        }
        if self.turns.iter().all(|t| is_blank(&t.text)) {
            return Err(ValidationError::NoText { turns: self.turns.len() });
        }
        if !time_in_range(self.started_at) {
            return Err(ValidationError::TimeOutOfRange { field: "started_at".into(), millis: self.started_at });
        }
        let mut seen = HashSet::with_capacity(self.turns.len());
        for (index, turn) in self.turns.iter().enumerate() {
            if turn.turn_id.trim().is_empty() {
                return Err(ValidationError::EmptyTurnId { index });
            }
            if turn.turn_id.contains('\0') {
                return Err(ValidationError::NulInId { field: "turn_id" });
            }
            id_within(|| format!("turn #{index} turn_id"), &turn.turn_id, max_id)?;
            id_within(|| format!("turn #{index} speaker"), &turn.speaker, max_id)?;
            if !time_in_range(turn.ts) {
                return Err(ValidationError::TimeOutOfRange { field: format!("turn {:?} ts", turn.turn_id), millis: turn.ts });
            }
            if !seen.insert(turn.turn_id.as_str()) {
                return Err(ValidationError::DuplicateTurnId { turn_id: turn.turn_id.clone() });
            }
            if turn.text.len() > max_turn_bytes {
                return Err(ValidationError::TurnTooLarge {
                    turn_id: turn.turn_id.clone(),
                    bytes: turn.text.len(),
                    limit: max_turn_bytes,
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SparseVector {
    pub indices: Vec<i64>,
    pub values: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub index: i32,
    pub start: i32,
    pub end: i32,
    pub token_count: i32,
    pub point_id: String,
    pub sparse: SparseVector,
}

/// The text of each chunk of a turn, in chunk order (chunk offsets count characters). One pass
/// over the turn's characters, however many chunks there are.
pub fn chunk_texts<'a>(turn_text: &'a str, chunks: &[Chunk]) -> Vec<&'a str> {
    let bytes: Vec<usize> = turn_text.char_indices().map(|(b, _)| b).collect();
    let at = |c: i32| bytes.get(c as usize).copied().unwrap_or(turn_text.len());
    chunks.iter().map(|c| &turn_text[at(c.start)..at(c.end)]).collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    pub text: String,
    pub label: String,
    pub start: i32,
    pub end: i32,
    pub score: f32,
    /// The model that found it (its configured name; None in events written before routing).
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sentiment {
    pub stars: i32,
    pub score: f32,
    pub probabilities: Vec<f32>,
    /// The model that rated the turn (None in events written before routing).
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrichedTurn {
    pub turn_id: String,
    pub speaker: String,
    pub role: String,
    pub ts: i64,
    pub token_count: i32,
    pub chunks: Vec<Chunk>,
    pub entities: Vec<Entity>,
    pub sentiment: Option<Sentiment>,
    pub point_ids: Vec<String>,
    /// ISO 639-1 code of the turn's language (None: neither the event nor any turn told).
    #[serde(default)]
    pub language: Option<String>,
    /// How sure: detected, lingua's relative confidence; inherited, the majority's share of
    /// the detected turns; from the event, 1 (0 without a language).
    #[serde(default)]
    pub language_confidence: f32,
    /// `event`, `detected` or `inherited` (`language::LanguageSource`).
    #[serde(default)]
    pub language_source: Option<String>,
    /// Why the turn has no entities though an NER model is configured (`routing::SkipReason`:
    /// `unsupported-language`, `unknown-language`); None when it went to a model.
    #[serde(default)]
    pub entities_skipped: Option<String>,
    /// Why the turn has no sentiment though a sentiment model is configured, like `entities_skipped`.
    #[serde(default)]
    pub sentiment_skipped: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentimentPoint {
    pub turn_id: String,
    pub ts: i64,
    pub stars: i32,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub task: String,
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrichedConversation {
    pub conversation_id: String,
    pub tenant: String,
    pub channel: String,
    pub language: Option<String>,
    pub turns: Vec<EnrichedTurn>,
    pub sentiment_trajectory: Vec<SentimentPoint>,
    pub entity_counts: BTreeMap<String, i32>,
    pub total_tokens: i64,
    pub models: Vec<ModelInfo>,
    pub source: SourceRef,
    pub attributes: BTreeMap<String, String>,
    pub processed_at: i64,
}

/// Namespace of convoflow's point ids (UUIDv5 of the DNS name "convoflow.points").
fn point_namespace() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_DNS, b"convoflow.points")
}

/// Deterministic Qdrant point id of a chunk: replays upsert the same point. UUIDv5 (namespace
/// `point_namespace`) of the name `tenant \0 conversation_id \0 turn_id \0 index`, or of
/// `conversation_id \0 turn_id \0 index` when the tenant is empty — the formula before tenants
/// were part of it, so the ids of single-tenant data did not change. Ids never contain NUL
/// (rejected at validation), so no two tuples collide, and a three-part name never equals a
/// four-part one: two tenants reusing a conversation id get distinct points.
pub fn point_id(tenant: &str, conversation_id: &str, turn_id: &str, chunk_index: usize) -> Uuid {
    let name = if tenant.is_empty() {
        format!("{conversation_id}\u{0}{turn_id}\u{0}{chunk_index}")
    } else {
        format!("{tenant}\u{0}{conversation_id}\u{0}{turn_id}\u{0}{chunk_index}")
    };
    Uuid::new_v5(&point_namespace(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(turns: Vec<(&str, &str)>) -> Conversation {
        Conversation {
            conversation_id: "c1".into(),
            tenant: "t".into(),
            channel: "chat".into(),
            language: None,
            started_at: 0,
            participants: vec![],
            turns: turns
                .into_iter()
                .map(|(id, text)| Turn {
                    turn_id: id.into(),
                    speaker: "s".into(),
                    role: "agent".into(),
                    text: text.into(),
                    ts: 1,
                })
                .collect(),
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn validation_rejects_what_the_schema_cannot() {
        let ten = EventLimits { max_turn_bytes: 10, max_turns: 3, max_id_bytes: usize::MAX };
        assert_eq!(conv(vec![("1", "hi")]).validate(&ten), Ok(()));
        assert_eq!(
            conv(vec![("1", "a"), ("2", "b"), ("3", "c"), ("4", "d")]).validate(&ten),
            Err(ValidationError::TooManyTurns { turns: 4, limit: 3 })
        );
        assert_eq!(conv(vec![("1\u{0}2", "a")]).validate(&ten), Err(ValidationError::NulInId { field: "turn_id" }));
        let mut c = conv(vec![("1", "a")]);
        c.turns[0].ts = i64::MAX;
        assert!(matches!(c.validate(&ten), Err(ValidationError::TimeOutOfRange { .. })));
        let mut c = conv(vec![("1", "a")]);
        c.conversation_id.push('\0');
        assert_eq!(c.validate(&ten), Err(ValidationError::NulInId { field: "conversation_id" }));
        let mut c = conv(vec![("1", "a")]);
        c.tenant.push('\0');
        assert_eq!(c.validate(&ten), Err(ValidationError::NulInId { field: "tenant" }));
        assert_eq!(conv(vec![]).validate(&ten), Err(ValidationError::NoTurns));
        assert_eq!(conv(vec![("1", " "), ("2", "")]).validate(&ten), Err(ValidationError::NoText { turns: 2 }));
        assert_eq!(conv(vec![("1", " "), ("2", "ok")]).validate(&ten), Ok(()), "an empty turn among others is fine");
        // zero-width space, bidi controls, byte-order mark, zero-width joiner, word joiner
        let invisible = "\u{200B}\u{202E}\u{2066}\u{FEFF}\u{200D}\u{2060} \u{00AD}";
        assert_eq!(conv(vec![("1", invisible), ("2", "\u{200B}")]).validate(&ten), Err(ValidationError::NoText { turns: 2 }));
        assert_eq!(conv(vec![("1", "caf\u{00E9}\u{200D}")]).validate(&ten), Ok(()), "visible text with a joiner is text");
        let short_ids = EventLimits { max_id_bytes: 8, ..ten };
        assert_eq!(conv(vec![("1", "a")]).validate(&short_ids), Ok(()));
        let mut c = conv(vec![("1", "a")]);
        c.conversation_id = "c".repeat(9);
        assert_eq!(
            c.validate(&short_ids),
            Err(ValidationError::IdTooLong { field: "conversation_id".into(), bytes: 9, limit: 8 })
        );
        assert!(matches!(conv(vec![("123456789", "a")]).validate(&short_ids), Err(ValidationError::IdTooLong { .. })));
        assert!(matches!(
            conv(vec![("1", "a"), ("1", "b")]).validate(&ten),
            Err(ValidationError::DuplicateTurnId { .. })
        ));
        assert!(matches!(
            conv(vec![("1", "0123456789A")]).validate(&ten),
            Err(ValidationError::TurnTooLarge { bytes: 11, limit: 10, .. })
        ));
        assert!(matches!(conv(vec![(" ", "a")]).validate(&ten), Err(ValidationError::EmptyTurnId { index: 0 })));
        let mut c = conv(vec![("1", "a")]);
        c.conversation_id = "".into();
        assert_eq!(c.validate(&ten), Err(ValidationError::EmptyConversationId));
    }

    #[test]
    fn point_ids_are_deterministic_and_distinct() {
        assert_eq!(point_id("", "c", "t", 0), point_id("", "c", "t", 0));
        assert_ne!(point_id("", "c", "t", 0), point_id("", "c", "t", 1));
        // two tenants reusing a conversation id
        assert_ne!(point_id("acme", "c", "t", 0), point_id("globex", "c", "t", 0));
        assert_ne!(point_id("acme", "c", "t", 0), point_id("", "c", "t", 0));
        // without a tenant, the formula of before (ids of stored data unchanged): pinned value
        assert_eq!(
            point_id("", "c", "t", 0),
            Uuid::new_v5(&Uuid::new_v5(&Uuid::NAMESPACE_DNS, b"convoflow.points"), "c\u{0}t\u{0}0".as_bytes())
        );
        // the separator keeps ("ab","c") and ("a","bc") apart
        assert_ne!(point_id("", "ab", "c", 0), point_id("", "a", "bc", 0));
        assert_eq!(point_id("", "c", "t", 0).get_version_num(), 5);
    }
}
