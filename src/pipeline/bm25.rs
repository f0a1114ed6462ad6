//! BM25 document-side term weights for Qdrant's sparse vector `bm25` (with the IDF modifier,
//! so the store multiplies in the inverse document frequency at query time).
//!
//! Terms: the text is lower-cased and split into runs of alphanumeric characters; each term's
//! id is the FNV-1a 32-bit hash of its UTF-8 bytes (collisions merge, as in any hashing
//! vectorizer). Weight: tf·(k1+1) / (tf + k1·(1 − b + b·dl/avgdl)), dl = terms in the chunk.
//! A query uses the same term ids with weight 1.

use std::collections::BTreeMap;

use crate::event::SparseVector;

/// The BM25 parameters are `pipeline.bm25` of the configuration.
pub use crate::config::Bm25Params;

pub fn term_id(term: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in term.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

pub fn terms(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_lowercase)
}

pub fn document_vector(text: &str, params: &Bm25Params) -> SparseVector {
    let mut tf: BTreeMap<u32, f32> = BTreeMap::new();
    let mut doc_len = 0usize;
    for term in terms(text) {
        *tf.entry(term_id(&term)).or_default() += 1.0;
        doc_len += 1;
    }
    let norm = params.k1 * (1.0 - params.b + params.b * doc_len as f32 / params.avg_doc_len);
    let (indices, values) =
        tf.into_iter().map(|(id, f)| (i64::from(id), f * (params.k1 + 1.0) / (f + norm))).unzip();
    SparseVector { indices, values }
}

/// Query-side vector: each distinct term once, weight 1.
pub fn query_vector(text: &str) -> SparseVector {
    let ids: std::collections::BTreeSet<u32> = terms(text).map(|t| term_id(&t)).collect();
    SparseVector { values: vec![1.0; ids.len()], indices: ids.into_iter().map(i64::from).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_values() {
        // published FNV-1a 32-bit test vectors
        assert_eq!(term_id(""), 0x811c9dc5);
        assert_eq!(term_id("a"), 0xe40c292c);
        assert_eq!(term_id("foobar"), 0xbf9cf968);
    }

    #[test]
    fn weights_follow_bm25_saturation_and_length_normalisation() {
        let p = Bm25Params { k1: 1.2, b: 0.75, avg_doc_len: 4.0 };
        let v = document_vector("Paris, paris et Lyon!", &p);
        assert_eq!(v.indices.len(), 3);
        assert!(v.indices.windows(2).all(|w| w[0] < w[1]), "ascending ids");
        let w = |t: &str| v.values[v.indices.iter().position(|&i| i == i64::from(term_id(t))).unwrap()];
        // dl = 4 = avgdl: weight = tf*2.2/(tf+1.2)
        assert!((w("paris") - 2.0 * 2.2 / 3.2).abs() < 1e-6);
        assert!((w("lyon") - 2.2 / 2.2).abs() < 1e-6);
        let longer = document_vector("lyon a b c d e f g", &p);
        let lyon_long = longer.values[longer.indices.iter().position(|&i| i == i64::from(term_id("lyon"))).unwrap()];
        assert!(lyon_long < w("lyon"), "longer documents weigh a term less");
        assert!(document_vector("  ,;", &p).indices.is_empty());
        assert_eq!(query_vector("Paris paris Lyon").values, vec![1.0, 1.0]);
    }
}
