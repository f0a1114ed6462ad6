//! The input record's own headers as carried onto the records produced from it (enriched event,
//! forwarded tombstone, DLQ copy), bounded: a record whose headers alone are near the broker's
//! limit would otherwise make every record produced from it too large — its DLQ copy included,
//! so it could never be dead-lettered and its partition would be blocked for good.

use rdkafka::message::{Header, Headers, OwnedHeaders};

use crate::source::InboundHeader;

/// Set on a produced record when some of the input's headers were not carried: how many and
/// how large (e.g. `2 headers, 16776500 bytes, over pipeline.max_carried_header_bytes (65536)`).
pub const HEADERS_DROPPED: &str = "convoflow.headers.dropped";

/// Bytes a header counts for: its key and value.
pub fn header_bytes(h: &InboundHeader) -> usize {
    h.key.len() + h.value.as_ref().map_or(0, Vec::len)
}

/// The headers carried, and what was left out.
pub struct Carried {
    pub headers: OwnedHeaders,
    /// Keys + values of the headers carried (the marker header included).
    pub bytes: usize,
    /// Headers left out, and their bytes.
    pub dropped: usize,
    pub dropped_bytes: usize,
}

impl Carried {
    /// No headers at all.
    pub fn none() -> Self {
        Self { headers: OwnedHeaders::new(), bytes: 0, dropped: 0, dropped_bytes: 0 }
    }

    /// The headers to produce: None when there are none.
    pub fn into_headers(self) -> Option<OwnedHeaders> {
        (self.headers.count() > 0).then_some(self.headers)
    }
}

/// `headers` in order, each kept while the kept ones stay within `max_bytes`; when any is left
/// out, a [`HEADERS_DROPPED`] header says so (and a counter counts the record).
pub fn carry(headers: &[InboundHeader], max_bytes: usize) -> Carried {
    let mut out = OwnedHeaders::new_with_capacity(headers.len() + 8);
    let (mut bytes, mut dropped, mut dropped_bytes) = (0usize, 0usize, 0usize);
    for h in headers {
        let size = header_bytes(h);
        if bytes + size > max_bytes {
            dropped += 1;
            dropped_bytes += size;
            continue;
        }
        bytes += size;
        out = out.insert(Header { key: h.key.as_str(), value: h.value.as_deref() });
    }
    if dropped > 0 {
        let note = format!("{dropped} headers, {dropped_bytes} bytes, over pipeline.max_carried_header_bytes ({max_bytes})");
        bytes += HEADERS_DROPPED.len() + note.len();
        out = out.insert(Header { key: HEADERS_DROPPED, value: Some(note.as_str()) });
        metrics::counter!(crate::telemetry::HEADERS_DROPPED).increment(1);
    }
    Carried { headers: out, bytes, dropped, dropped_bytes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn h(key: &str, len: usize) -> InboundHeader {
        InboundHeader { key: key.into(), value: Some(vec![b'x'; len]) }
    }

    #[test]
    fn headers_within_the_bound_are_carried_in_order_and_the_rest_dropped_with_a_note() {
        let all = [h("traceparent", 55), h("huge", 10_000), h("tenant-hint", 4), InboundHeader { key: "null".into(), value: None }];
        let c = carry(&all, 100);
        let keys: Vec<&str> = c.headers.iter().map(|h| h.key).collect();
        assert_eq!(keys, ["traceparent", "tenant-hint", "null", HEADERS_DROPPED]);
        assert_eq!((c.dropped, c.dropped_bytes), (1, 10_004));
        let note = c.headers.iter().last().unwrap().value.unwrap();
        assert_eq!(std::str::from_utf8(note).unwrap(), "1 headers, 10004 bytes, over pipeline.max_carried_header_bytes (100)");
        let within = carry(&all[..1], 100);
        assert_eq!((within.headers.count(), within.dropped, within.bytes), (1, 0, 66));
        assert!(carry(&[], 100).into_headers().is_none());
    }
}
