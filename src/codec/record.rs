//! `RecordCodec<T>`: one record type in one configured wire format.

use std::sync::Arc;

use super::avro::AvroSchemas;
use super::{CONFLUENT_MAGIC, CodecError, Record, SINGLE_OBJECT_MAGIC, WireFormat, head_hex, json};

/// Encoder/decoder of one record type in one wire format.
#[derive(Clone)]
pub struct RecordCodec<T: Record> {
    format: WireFormat,
    avro: Arc<AvroSchemas>,
    _record: std::marker::PhantomData<fn() -> T>,
}

impl<T: Record> RecordCodec<T> {
    /// Codec with the record's own schema as reader and writer schema.
    pub fn new(format: WireFormat) -> Result<Self, CodecError> {
        Ok(Self::with_schemas(format, AvroSchemas::new(T::SCHEMA)?))
    }

    /// Codec with explicit schemas (extra writer versions, Confluent lookup, ...).
    pub fn with_schemas(format: WireFormat, avro: AvroSchemas) -> Self {
        Self { format, avro: Arc::new(avro), _record: std::marker::PhantomData }
    }

    pub fn format(&self) -> WireFormat {
        self.format
    }

    pub fn schemas(&self) -> &AvroSchemas {
        &self.avro
    }

    /// Stop waiting for the Schema Registry (see `SchemaLookup::interrupt`).
    pub fn interrupt(&self) {
        self.avro.interrupt();
    }

    pub fn encode(&self, record: &T) -> Result<Vec<u8>, CodecError> {
        match self.format {
            WireFormat::Avro | WireFormat::Auto => self.avro.encode_single_object(record),
            WireFormat::Confluent => self.avro.encode_confluent(record),
            WireFormat::Json => json::encode(record),
        }
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        if bytes.is_empty() {
            return Err(CodecError::Empty);
        }
        match self.format {
            WireFormat::Avro => self.avro.decode_single_object(bytes),
            WireFormat::Confluent => self.avro.decode_confluent(bytes),
            WireFormat::Json => json::decode(bytes),
            WireFormat::Auto => {
                if bytes.starts_with(&SINGLE_OBJECT_MAGIC) {
                    self.avro.decode_single_object(bytes)
                } else if bytes[0] == CONFLUENT_MAGIC {
                    self.avro.decode_confluent(bytes)
                } else if bytes.trim_ascii_start().first() == Some(&b'{') {
                    json::decode(bytes)
                } else {
                    Err(CodecError::WrongFraming {
                        expected: "Avro single-object, Confluent or JSON",
                        head: head_hex(bytes),
                    })
                }
            }
        }
    }
}
