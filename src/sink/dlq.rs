//! Dead-letter records: the original key and value, unchanged, with headers saying why and
//! where from. Header names:
//!
//! | header | value |
//! | --- | --- |
//! | `dlq.error.class` | `deserialization`, `unknown-schema`, `schema`, `validation`, `enrichment`, `store`, `encoding`, `output-too-large` |
//! | `dlq.error.message` | human-readable reason |
//! | `dlq.original.topic` / `dlq.original.partition` / `dlq.original.offset` | where it was read |
//! | `dlq.original.timestamp` | the original record timestamp (ms), when it had one |
//! | `dlq.worker` | the consumer group of the worker that rejected it |
//! | `dlq.value.truncated` | only when the copy would exceed `kafka.message_max_bytes`: the original value's length (the value holds its start) |
//! | `dlq.headers.dropped` | only when the copy with the input's headers would still exceed it: the input's headers were left out (how many, how large) |
//! | `dlq.key.truncated` | only then too, when the key alone is too large: the original key's length (the key holds its start) |
//!
//! The original record's own headers come first, unchanged (trace context survives), up to
//! `pipeline.max_carried_header_bytes` (see `sink::headers`).

use rdkafka::message::{Header, OwnedHeaders};

use crate::fault::Rejection;
use crate::source::InboundMessage;

pub const ERROR_CLASS: &str = "dlq.error.class";
pub const ERROR_MESSAGE: &str = "dlq.error.message";
pub const ORIGINAL_TOPIC: &str = "dlq.original.topic";
pub const ORIGINAL_PARTITION: &str = "dlq.original.partition";
pub const ORIGINAL_OFFSET: &str = "dlq.original.offset";
pub const ORIGINAL_TIMESTAMP: &str = "dlq.original.timestamp";
pub const WORKER: &str = "dlq.worker";
pub const VALUE_TRUNCATED: &str = "dlq.value.truncated";
pub const HEADERS_DROPPED: &str = "dlq.headers.dropped";
pub const KEY_TRUNCATED: &str = "dlq.key.truncated";

/// The DLQ copy's headers: `carried` (the input's own, as carried) then the `dlq.*` ones.
pub fn headers(msg: &InboundMessage, why: &Rejection, group_id: &str, carried: OwnedHeaders) -> OwnedHeaders {
    let partition = msg.tp.partition.to_string();
    let offset = msg.offset.to_string();
    // keep the reason readable and bounded even for huge inputs
    let message: String = why.message.chars().take(2_000).collect();
    let mut h = carried
        .insert(Header { key: ERROR_CLASS, value: Some(why.class.as_str()) })
        .insert(Header { key: ERROR_MESSAGE, value: Some(message.as_str()) })
        .insert(Header { key: ORIGINAL_TOPIC, value: Some(&*msg.tp.topic) })
        .insert(Header { key: ORIGINAL_PARTITION, value: Some(partition.as_str()) })
        .insert(Header { key: ORIGINAL_OFFSET, value: Some(offset.as_str()) })
        .insert(Header { key: WORKER, value: Some(group_id) });
    if let Some(ts) = msg.timestamp_ms {
        h = h.insert(Header { key: ORIGINAL_TIMESTAMP, value: Some(ts.to_string().as_str()) });
    }
    h
}
