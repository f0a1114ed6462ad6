//! Whose fault a failure is, said once for the whole worker (as rust-arroyo's
//! `StrategyError::{InvalidMessage, Other}`): the **data's** — the message is dead-lettered with
//! its reason and the worker goes on — or the **machine's** (a device, a dependency, the worker
//! itself) — never dead-lettered: the message stays uncommitted and is read again, and the
//! worker stops or waits. Decoding, validation, the models and the store each say which with
//! this type; nothing compares strings to find out.

/// The `dlq.error.class` header of a dead-lettered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectClass {
    /// The bytes are not a record in the configured wire format.
    Deserialization,
    /// A writer schema (fingerprint or Confluent id) that is not known.
    UnknownSchema,
    /// The writer schema cannot be resolved against the reader schema.
    Schema,
    /// A record that breaks the event's rules (limits, key, tombstone).
    Validation,
    /// Its text cannot be chunked or tokenized for the models.
    Enrichment,
    /// The vector store refuses its points for their content.
    Store,
    /// Its enriched event cannot be encoded.
    Encoding,
    /// Its enriched event is over the producer's record limit.
    OutputTooLarge,
}

impl RejectClass {
    pub const ALL: [RejectClass; 8] = [
        RejectClass::Deserialization,
        RejectClass::UnknownSchema,
        RejectClass::Schema,
        RejectClass::Validation,
        RejectClass::Enrichment,
        RejectClass::Store,
        RejectClass::Encoding,
        RejectClass::OutputTooLarge,
    ];

    /// The header value (docs/reliability.md, `sink::dlq`).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectClass::Deserialization => "deserialization",
            RejectClass::UnknownSchema => "unknown-schema",
            RejectClass::Schema => "schema",
            RejectClass::Validation => "validation",
            RejectClass::Enrichment => "enrichment",
            RejectClass::Store => "store",
            RejectClass::Encoding => "encoding",
            RejectClass::OutputTooLarge => "output-too-large",
        }
    }
}

impl std::fmt::Display for RejectClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub class: RejectClass,
    pub message: String,
}

impl Rejection {
    pub fn new(class: RejectClass, message: impl Into<String>) -> Self {
        Self { class, message: message.into() }
    }
}

/// A failure, by whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    /// The data's: dead-letter the message with this reason, go on.
    #[error("{}", .0.message)]
    Data(Rejection),
    /// The machine's or a dependency's: never dead-lettered; the message stays uncommitted.
    #[error("{0:#}")]
    Machine(anyhow::Error),
}

impl Fault {
    pub fn data(class: RejectClass, message: impl Into<String>) -> Self {
        Fault::Data(Rejection::new(class, message))
    }

    pub fn machine(e: impl Into<anyhow::Error>) -> Self {
        Fault::Machine(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dlq_header_values_are_todays() {
        let values: Vec<&str> = RejectClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            values,
            ["deserialization", "unknown-schema", "schema", "validation", "enrichment", "store", "encoding", "output-too-large"]
        );
    }

    #[test]
    fn a_fault_says_its_reason() {
        assert_eq!(Fault::data(RejectClass::Validation, "too many turns").to_string(), "too many turns");
        let machine = Fault::machine(anyhow::anyhow!("registry down").context("decoding"));
        assert_eq!(machine.to_string(), "decoding: registry down");
    }
}
