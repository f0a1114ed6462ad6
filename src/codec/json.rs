//! JSON encoding of records (debugging and hand-written input).

use super::{CodecError, Record};

pub fn encode<T: Record>(record: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(record).map_err(|e| CodecError::Json(e.to_string()))
}

pub fn decode<T: Record>(bytes: &[u8]) -> Result<T, CodecError> {
    // serde_json checks UTF-8 itself and names the position of invalid bytes.
    serde_json::from_slice(bytes).map_err(|e| CodecError::Json(e.to_string()))
}
