use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::*;
use crate::event::{Conversation, EnrichedConversation, SourceRef};
use crate::sample::SampleGenerator;

fn sample() -> Conversation {
    SampleGenerator::new(7).conversation(0)
}

#[test]
fn every_format_round_trips_a_conversation() {
    let conv = sample();
    let mut lookup = InMemorySchemaLookup::default();
    lookup.insert(42, apache_avro::Schema::parse_str(Conversation::SCHEMA).unwrap());
    let confluent = AvroSchemas::new(Conversation::SCHEMA).unwrap().with_confluent(Arc::new(lookup), Some(42));
    let codecs = [
        RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap(),
        RecordCodec::<Conversation>::new(WireFormat::Json).unwrap(),
        RecordCodec::<Conversation>::with_schemas(WireFormat::Confluent, confluent),
    ];
    for codec in &codecs {
        let bytes = codec.encode(&conv).unwrap();
        assert_eq!(codec.decode(&bytes).unwrap(), conv, "{:?}", codec.format());
        // `auto` reads all three framings
        let auto = RecordCodec::<Conversation>::with_schemas(
            WireFormat::Auto,
            {
                let mut l = InMemorySchemaLookup::default();
                l.insert(42, apache_avro::Schema::parse_str(Conversation::SCHEMA).unwrap());
                AvroSchemas::new(Conversation::SCHEMA).unwrap().with_confluent(Arc::new(l), None)
            },
        );
        assert_eq!(auto.decode(&bytes).unwrap(), conv, "auto reading {:?}", codec.format());
    }
}

/// Fingerprints of the shipped schemas as fastavro 1.13 computes them
/// (`scripts/fixtures/avro_interop.py fingerprint`), hex of the 8 header
/// bytes. A schema change changes them: recompute with fastavro, never with this crate.
const FASTAVRO_CONVERSATION: &str = "e27b53e39cf92f4a";
const FASTAVRO_ENRICHED: &str = "6bfcbc2b248a987e";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn single_object_header_carries_the_specification_fingerprint() {
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let bytes = codec.encode(&sample()).unwrap();
    assert_eq!(&bytes[..2], &[0xC3, 0x01]);
    assert_eq!(hex(&bytes[2..10]), FASTAVRO_CONVERSATION);
    assert_eq!(hex(&codec.schemas().reader_fingerprint().to_le_bytes()), FASTAVRO_CONVERSATION);
    let enriched = RecordCodec::<EnrichedConversation>::new(WireFormat::Avro).unwrap();
    assert_eq!(hex(&enriched.schemas().reader_fingerprint().to_le_bytes()), FASTAVRO_ENRICHED);
}

/// Events written by earlier convoflow versions carry the `apache-avro` crate's fingerprint
/// (logical types kept in its canonical form, AVRO-4004): they still decode.
#[test]
fn fingerprints_of_earlier_versions_still_decode() {
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let conv = sample();
    let mut bytes = codec.encode(&conv).unwrap();
    let legacy = legacy_fingerprint(&apache_avro::Schema::parse_str(Conversation::SCHEMA).unwrap());
    let legacy_enriched = legacy_fingerprint(&apache_avro::Schema::parse_str(EnrichedConversation::SCHEMA).unwrap());
    println!("earlier fingerprints: conversation {}, enriched {}", hex(&legacy.to_le_bytes()), hex(&legacy_enriched.to_le_bytes()));
    assert_ne!(hex(&legacy.to_le_bytes()), FASTAVRO_CONVERSATION, "the crate's form differs (AVRO-4004)");
    bytes[2..10].copy_from_slice(&legacy.to_le_bytes());
    assert_eq!(codec.decode(&bytes).unwrap(), conv);
    let auto = RecordCodec::<Conversation>::new(WireFormat::Auto).unwrap();
    assert_eq!(auto.decode(&bytes).unwrap(), conv);
}

#[test]
fn enriched_conversation_round_trips() {
    let conv = sample();
    let enriched = EnrichedConversation {
        conversation_id: conv.conversation_id.clone(),
        tenant: conv.tenant.clone(),
        channel: conv.channel.clone(),
        language: Some("fr".into()),
        turns: vec![],
        sentiment_trajectory: vec![],
        entity_counts: BTreeMap::from([("PER".to_string(), 2)]),
        total_tokens: 12,
        models: vec![],
        source: SourceRef { topic: "in".into(), partition: 3, offset: 99 },
        attributes: BTreeMap::new(),
        processed_at: 1_700_000_000_000,
    };
    for format in [WireFormat::Avro, WireFormat::Json] {
        let codec = RecordCodec::<EnrichedConversation>::new(format).unwrap();
        assert_eq!(codec.decode(&codec.encode(&enriched).unwrap()).unwrap(), enriched);
    }
}

/// Version 2 of the input schema: one new optional field with a default.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ConversationV2 {
    conversation_id: String,
    tenant: String,
    channel: String,
    language: Option<String>,
    started_at: i64,
    participants: Vec<crate::event::Participant>,
    turns: Vec<crate::event::Turn>,
    attributes: BTreeMap<String, String>,
    priority: Option<i32>,
}

fn v2_schema() -> String {
    let mut schema: serde_json::Value = serde_json::from_str(Conversation::SCHEMA).unwrap();
    schema["fields"].as_array_mut().unwrap().push(serde_json::json!(
        {"name": "priority", "type": ["null", "int"], "default": null, "doc": "added in v2"}
    ));
    schema.to_string()
}

static V2: std::sync::LazyLock<String> = std::sync::LazyLock::new(v2_schema);

impl Record for ConversationV2 {
    const SCHEMA: &'static str = "";
}

#[test]
fn v1_writer_is_read_by_v2_reader_with_the_new_field_defaulted() {
    let conv = sample();
    let v1 = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let bytes = v1.encode(&conv).unwrap();

    let mut schemas = AvroSchemas::new(&V2).unwrap();
    schemas.add_writer_schema(Conversation::SCHEMA).unwrap();
    let v2 = RecordCodec::<ConversationV2>::with_schemas(WireFormat::Avro, schemas);
    let read: ConversationV2 = v2.decode(&bytes).unwrap();
    assert_eq!(read.priority, None);
    assert_eq!(read.conversation_id, conv.conversation_id);
    assert_eq!(read.turns, conv.turns);

    // and the other way round: v1 reader, v2 writer known by fingerprint -> field ignored
    let v2_written = v2.encode(&ConversationV2 { priority: Some(3), ..read }).unwrap();
    let mut v1_schemas = AvroSchemas::new(Conversation::SCHEMA).unwrap();
    assert!(v1.decode(&v2_written).is_err(), "unknown writer fingerprint must be rejected");
    v1_schemas.add_writer_schema(&V2).unwrap();
    let v1_reading_v2 = RecordCodec::<Conversation>::with_schemas(WireFormat::Avro, v1_schemas);
    assert_eq!(v1_reading_v2.decode(&v2_written).unwrap(), conv);
}

#[test]
fn bad_bytes_give_clear_errors() {
    let codec = RecordCodec::<Conversation>::new(WireFormat::Avro).unwrap();
    let good = codec.encode(&sample()).unwrap();

    let truncated = codec.decode(&good[..good.len() / 2]).unwrap_err();
    assert_eq!(truncated.class().map(|c| c.as_str()), Some("deserialization"), "{truncated}");

    let mut wrong_fp = good.clone();
    wrong_fp[2] ^= 0xff;
    assert!(matches!(codec.decode(&wrong_fp), Err(CodecError::UnknownFingerprint(_))));
    assert_eq!(codec.decode(&wrong_fp).unwrap_err().class().map(|c| c.as_str()), Some("unknown-schema"));

    let mut trailing = good.clone();
    trailing.extend_from_slice(b"xx");
    assert_eq!(codec.decode(&trailing), Err(CodecError::TrailingBytes(2)));

    assert!(matches!(codec.decode(&[0xde, 0xad, 0xbe, 0xef]), Err(CodecError::WrongFraming { .. })));
    assert_eq!(codec.decode(&[0xC3, 0x01, 1]), Err(CodecError::Truncated("single-object fingerprint")));
    assert_eq!(codec.decode(&[]), Err(CodecError::Empty));

    let confluent = RecordCodec::<Conversation>::new(WireFormat::Confluent).unwrap();
    assert_eq!(confluent.decode(&[0, 0, 0, 0, 9, 1]), Err(CodecError::UnknownSchemaId(9)));
    assert!(confluent.encode(&sample()).is_err(), "no schema id configured");
}

#[test]
fn json_errors_name_the_problem() {
    let codec = RecordCodec::<Conversation>::new(WireFormat::Json).unwrap();
    let missing = codec.decode(br#"{"tenant":"t","started_at":1,"turns":[]}"#).unwrap_err();
    assert!(missing.to_string().contains("missing field `conversation_id`"), "{missing}");
    let bad_utf8 = codec.decode(b"{\"conversation_id\":\"\xff\xfe\"}").unwrap_err();
    assert!(bad_utf8.to_string().contains("invalid unicode"), "{bad_utf8}");
}

/// Every field of both contracts carries a doc (the schemas are the documentation users read).
#[test]
fn every_schema_field_is_documented() {
    fn walk(t: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
        match t {
            serde_json::Value::Object(o) if o.get("type").and_then(|v| v.as_str()) == Some("record") => {
                for f in o["fields"].as_array().unwrap() {
                    let name = format!("{path}.{}", f["name"].as_str().unwrap());
                    if f.get("doc").and_then(|d| d.as_str()).is_none_or(str::is_empty) {
                        missing.push(name.clone());
                    }
                    walk(&f["type"], &name, missing);
                }
            }
            serde_json::Value::Object(o) => {
                for key in ["items", "values"] {
                    if let Some(inner) = o.get(key) {
                        walk(inner, path, missing);
                    }
                }
            }
            serde_json::Value::Array(branches) => branches.iter().for_each(|b| walk(b, path, missing)),
            _ => {}
        }
    }
    let mut missing = vec![];
    for (name, schema) in [("Conversation", Conversation::SCHEMA), ("EnrichedConversation", EnrichedConversation::SCHEMA)] {
        walk(&serde_json::from_str(schema).unwrap(), name, &mut missing);
    }
    assert!(missing.is_empty(), "fields without doc: {missing:?}");
}
