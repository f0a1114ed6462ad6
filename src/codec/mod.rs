//! Wire formats of the events: Avro single-object encoding, Confluent wire format, JSON.
//!
//! `RecordCodec<T>` encodes and decodes one record type (Conversation or EnrichedConversation)
//! in the configured `WireFormat`; `Auto` reads any of them by their first bytes.

mod avro;
pub mod canonical;
pub mod factory;
mod json;
mod record;
pub mod registry;

pub use record::RecordCodec;
pub use avro::{AvroSchemas, InMemorySchemaLookup, SchemaLookup, legacy_fingerprint};
pub use canonical::{parsing_canonical_form, schema_fingerprint};
use serde::{Serialize, de::DeserializeOwned};

use crate::event::{Conversation, EnrichedConversation};
use crate::fault::{Fault, RejectClass};

/// Single-object encoding marker (Avro spec): 0xC3 0x01, then the 8-byte Rabin fingerprint.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// Confluent wire format marker: 0x00, then a 4-byte big-endian schema id.
pub const CONFLUENT_MAGIC: u8 = 0x00;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum WireFormat {
    /// Avro single-object encoding (C3 01 + Rabin fingerprint of the writer schema + datum).
    Avro,
    /// Confluent Schema Registry framing (00 + 4-byte schema id + datum).
    Confluent,
    /// UTF-8 JSON of the record, for debugging.
    Json,
    /// Decode whichever of the three the first bytes say; encode as Avro.
    Auto,
}

/// Why bytes could not be turned into a record. `class()` is the DLQ's error-class header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("payload is empty")]
    Empty,
    #[error("payload is not {expected}: it starts with {head}")]
    WrongFraming { expected: &'static str, head: String },
    #[error("unknown writer schema fingerprint {0:016x}")]
    UnknownFingerprint(u64),
    #[error("unknown Confluent schema id {0}")]
    UnknownSchemaId(u32),
    #[error("truncated header: {0}")]
    Truncated(&'static str),
    #[error("avro: {0}")]
    Avro(String),
    #[error("json: {0}")]
    Json(String),
    #[error("{0} trailing bytes after the record")]
    TrailingBytes(usize),
    #[error("schema: {0}")]
    Schema(String),
    /// Not the message's fault: a dependency (the Schema Registry) cannot answer now.
    #[error("{0}")]
    Unavailable(String),
}

impl CodecError {
    /// The DLQ class of bytes that are at fault; None for a dependency (the Schema Registry)
    /// that cannot answer now, which is not the message's fault.
    pub fn class(&self) -> Option<RejectClass> {
        match self {
            CodecError::Unavailable(_) => None,
            CodecError::UnknownFingerprint(_) | CodecError::UnknownSchemaId(_) => Some(RejectClass::UnknownSchema),
            CodecError::Schema(_) => Some(RejectClass::Schema),
            _ => Some(RejectClass::Deserialization),
        }
    }

    /// Whose fault: the bytes' (dead-lettered with the class), or a dependency's (never).
    pub fn fault(self) -> Fault {
        match self.class() {
            Some(class) => Fault::data(class, self.to_string()),
            None => Fault::machine(self),
        }
    }
}

/// First bytes as hex, for error messages.
fn head_hex(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// A record type with an Avro schema shipped in `schemas/`.
pub trait Record: Serialize + DeserializeOwned {
    const SCHEMA: &'static str;
}
impl Record for Conversation {
    const SCHEMA: &'static str = include_str!("../../schemas/conversation.avsc");
}
impl Record for EnrichedConversation {
    const SCHEMA: &'static str = include_str!("../../schemas/enriched_conversation.avsc");
}

#[cfg(test)]
mod tests;
