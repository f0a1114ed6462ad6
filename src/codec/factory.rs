//! Builds the codecs the worker, the producer tool and the bench use from `codec.*`: the input
//! codec (extra writer schemas, fixed Confluent ids, the Schema Registry), a writer codec per
//! output topic, and the description `convoflow check` prints.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::registry::{self, RegistryLookup, SchemaRegistry};
use super::{AvroSchemas, InMemorySchemaLookup, Record, RecordCodec, WireFormat};
use crate::config::{CodecConfig, Config};
use crate::event::{Conversation, EnrichedConversation};

/// Codec for input conversations, with the configured extra writer schemas and Confluent ids
/// (fixed ones from `codec.confluent_schemas`, then the Schema Registry's, which must be
/// reachable at start).
pub fn input_codec(cfg: &CodecConfig) -> Result<RecordCodec<Conversation>> {
    let mut schemas = AvroSchemas::new(Conversation::SCHEMA)?;
    for path in &cfg.input_writer_schemas {
        let json = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        schemas.add_writer_schema(&json).with_context(|| format!("parsing {}", path.display()))?;
    }
    let mut fixed = std::collections::HashMap::new();
    for (id, path) in &cfg.confluent_schemas {
        let json = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        fixed.insert(*id, apache_avro::Schema::parse_str(&json).with_context(|| format!("parsing {}", path.display()))?);
    }
    if let Some(registry_cfg) = &cfg.schema_registry {
        let registry = Arc::new(SchemaRegistry::new(registry_cfg)?);
        registry.check().context("the schema registry (codec.schema_registry) at start")?;
        schemas = schemas.with_confluent(Arc::new(RegistryLookup::new(registry, fixed)), None);
    } else if !fixed.is_empty() {
        let mut lookup = InMemorySchemaLookup::default();
        for (id, schema) in fixed {
            lookup.insert(id, schema);
        }
        schemas = schemas.with_confluent(Arc::new(lookup), None);
    }
    Ok(RecordCodec::with_schemas(cfg.input, schemas))
}

/// Codec writing `T` to `topic` in `format`; for the Confluent framing, the schema id comes
/// from the Schema Registry (registered or looked up under the topic's subject; an
/// incompatible schema refuses to start) or from a fixed `fixed_id`.
pub fn writer_codec<T: Record>(cfg: &CodecConfig, format: WireFormat, topic: &str, fixed_id: Option<u32>) -> Result<RecordCodec<T>> {
    let mut id = fixed_id;
    if format == WireFormat::Confluent
        && let Some(registry_cfg) = &cfg.schema_registry
    {
        let registry = SchemaRegistry::new(registry_cfg)?;
        id = Some(registry::writer_schema_id(registry_cfg, &registry, topic, T::SCHEMA)?);
    }
    let schemas = AvroSchemas::new(T::SCHEMA)?.with_confluent(Arc::new(InMemorySchemaLookup::default()), id);
    Ok(RecordCodec::with_schemas(format, schemas))
}

/// Codec of the enriched events on `kafka.output_topic`.
pub fn output_codec(cfg: &Config) -> Result<RecordCodec<EnrichedConversation>> {
    writer_codec(&cfg.codec, cfg.codec.output, &cfg.kafka.output_topic, cfg.codec.confluent_output_schema_id)
}

/// Input codec sanity for `check`: what the worker will accept.
pub fn describe_codecs(cfg: &CodecConfig) -> Result<String> {
    let input = input_codec(cfg)?;
    let fingerprint: String = input.schemas().reader_fingerprint().to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let registry = match &cfg.schema_registry {
        Some(r) => format!(
            "; schema registry {} (reachable; user {}, password {}, subjects {:?}, auto_register {})",
            r.url,
            r.username.as_deref().unwrap_or("-"),
            crate::config::set_or_not(&r.password),
            r.subject_strategy,
            r.auto_register
        ),
        None => String::new(),
    };
    Ok(format!(
        "input {:?} (single-object fingerprint {fingerprint}), output {:?}{registry}",
        input.format(),
        if cfg.output == WireFormat::Auto { WireFormat::Avro } else { cfg.output }
    ))
}
