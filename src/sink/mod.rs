//! Where enriched results go: the vector store (`store`), and the output topic and the
//! dead-letter topic through one idempotent producer (per-key order kept, no duplicates from
//! producer retries).

pub mod dlq;
pub mod headers;
pub mod producer;
pub mod store;
pub mod transactions;
