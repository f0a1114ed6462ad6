//! Avro datum encoding with the two framings that carry the writer schema's identity:
//! single-object encoding (Rabin fingerprint) and the Confluent wire format (registry schema id).

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;

use apache_avro::{Schema, rabin::Rabin, reader::datum::GenericDatumReader, writer::datum::GenericDatumWriter};

use super::canonical::schema_fingerprint;
use super::{CONFLUENT_MAGIC, CodecError, Record, SINGLE_OBJECT_MAGIC, head_hex};

/// The fingerprint earlier convoflow versions wrote: the `apache-avro` crate's Rabin fingerprint
/// of its own canonical form, which keeps logical types (AVRO-4004). Still accepted on input so
/// topics written by those versions keep decoding; never written.
pub fn legacy_fingerprint(schema: &Schema) -> u64 {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    u64::from_le_bytes(bytes[..8].try_into().expect("Rabin fingerprints are 8 bytes"))
}

/// Resolves a Confluent schema id to the writer schema: `InMemorySchemaLookup` serves
/// configured schemas, `registry::RegistryLookup` asks a Schema Registry. An id nobody knows is
/// `UnknownSchemaId` (the message's fault); a lookup that cannot be done now is `Unavailable`.
pub trait SchemaLookup: Send + Sync {
    fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, CodecError>;

    /// Stop waiting for a dependency (the worker is stopping): pending and later lookups that
    /// would wait return `Unavailable` at once.
    fn interrupt(&self) {}
}

#[derive(Default)]
pub struct InMemorySchemaLookup {
    by_id: HashMap<u32, Arc<Schema>>,
}

impl InMemorySchemaLookup {
    pub fn insert(&mut self, id: u32, schema: Schema) {
        self.by_id.insert(id, Arc::new(schema));
    }
}

impl SchemaLookup for InMemorySchemaLookup {
    fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, CodecError> {
        self.by_id.get(&id).cloned().ok_or(CodecError::UnknownSchemaId(id))
    }
}

/// The schemas of one record type: the reader schema (what this build understands), the known
/// writer schemas by fingerprint (the reader's own plus older/newer versions), and optionally a
/// Confluent id lookup and the id under which our own schema is registered.
pub struct AvroSchemas {
    reader: Schema,
    reader_fingerprint: u64,
    writers: HashMap<u64, Arc<Schema>>,
    confluent: Option<Arc<dyn SchemaLookup>>,
    confluent_write_id: Option<u32>,
}

fn parse(json: &str) -> Result<Schema, CodecError> {
    Schema::parse_str(json).map_err(|e| CodecError::Schema(e.to_string()))
}

impl AvroSchemas {
    pub fn new(reader_schema_json: &str) -> Result<Self, CodecError> {
        let reader = parse(reader_schema_json)?;
        let reader_fingerprint = schema_fingerprint(reader_schema_json)?;
        let mut schemas =
            Self { reader: reader.clone(), reader_fingerprint, writers: HashMap::new(), confluent: None, confluent_write_id: None };
        schemas.add_writer(reader_fingerprint, reader);
        Ok(schemas)
    }

    /// Known under its specification fingerprint and under the one earlier versions wrote.
    fn add_writer(&mut self, fp: u64, schema: Schema) {
        let schema = Arc::new(schema);
        self.writers.insert(legacy_fingerprint(&schema), schema.clone());
        self.writers.insert(fp, schema);
    }

    /// Accept data written with another version of the schema (resolved to the reader schema).
    /// Returns its fingerprint.
    pub fn add_writer_schema(&mut self, schema_json: &str) -> Result<u64, CodecError> {
        let schema = parse(schema_json)?;
        let fp = schema_fingerprint(schema_json)?;
        self.add_writer(fp, schema);
        Ok(fp)
    }

    /// Confluent framing: how ids are resolved, and the id our schema is registered under.
    pub fn with_confluent(mut self, lookup: Arc<dyn SchemaLookup>, write_id: Option<u32>) -> Self {
        self.confluent = Some(lookup);
        self.confluent_write_id = write_id;
        self
    }

    /// See `SchemaLookup::interrupt`.
    pub fn interrupt(&self) {
        if let Some(lookup) = &self.confluent {
            lookup.interrupt();
        }
    }

    pub fn reader_fingerprint(&self) -> u64 {
        self.reader_fingerprint
    }

    fn datum<T: Record>(&self, record: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let value = apache_avro::to_value(record)
            .and_then(|v| v.resolve(&self.reader))
            .map_err(|e| CodecError::Avro(e.to_string()))?;
        GenericDatumWriter::builder(&self.reader)
            .build()
            .and_then(|w| w.write_value_ref(out, &value))
            .map_err(|e| CodecError::Avro(e.to_string()))?;
        Ok(())
    }

    pub fn encode_single_object<T: Record>(&self, record: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(&self.reader_fingerprint.to_le_bytes());
        self.datum(record, &mut out)?;
        Ok(out)
    }

    pub fn encode_confluent<T: Record>(&self, record: &T) -> Result<Vec<u8>, CodecError> {
        let id = self.confluent_write_id.ok_or_else(|| {
            CodecError::Schema("Confluent encoding needs codec.schema_registry or codec.confluent_output_schema_id".into())
        })?;
        let mut out = Vec::with_capacity(256);
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        self.datum(record, &mut out)?;
        Ok(out)
    }

    /// Reads a datum written with `writer`, resolved to the reader schema; all bytes must be used.
    fn read<T: Record>(&self, writer: &Schema, body: &[u8]) -> Result<T, CodecError> {
        let avro = |e: apache_avro::Error| CodecError::Avro(e.to_string());
        let mut cursor = Cursor::new(body);
        let value = GenericDatumReader::builder(writer)
            .reader_schema(&self.reader)
            .build()
            .and_then(|r| r.read_value(&mut cursor))
            .map_err(avro)?;
        let left = body.len() - cursor.position() as usize;
        if left > 0 {
            return Err(CodecError::TrailingBytes(left));
        }
        apache_avro::from_value::<T>(&value).map_err(avro)
    }

    pub fn decode_single_object<T: Record>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        if !bytes.starts_with(&SINGLE_OBJECT_MAGIC) {
            return Err(CodecError::WrongFraming { expected: "Avro single-object (c3 01)", head: head_hex(bytes) });
        }
        let fp_bytes = bytes.get(2..10).ok_or(CodecError::Truncated("single-object fingerprint"))?;
        let fp = u64::from_le_bytes(fp_bytes.try_into().expect("8 bytes"));
        let writer = self.writers.get(&fp).ok_or(CodecError::UnknownFingerprint(fp))?;
        self.read(writer, &bytes[10..])
    }

    pub fn decode_confluent<T: Record>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        if bytes.first() != Some(&CONFLUENT_MAGIC) {
            return Err(CodecError::WrongFraming { expected: "Confluent wire format (00)", head: head_hex(bytes) });
        }
        let id_bytes = bytes.get(1..5).ok_or(CodecError::Truncated("Confluent schema id"))?;
        let id = u32::from_be_bytes(id_bytes.try_into().expect("4 bytes"));
        let writer = self.confluent.as_ref().ok_or(CodecError::UnknownSchemaId(id))?.schema_by_id(id)?;
        self.read(&writer, &bytes[5..])
    }
}
