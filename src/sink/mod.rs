//! Where enriched results go: the vector store (`store`), and what the output topic and the
//! dead-letter topic need of a record (`headers`, `dlq`); the producer itself is on the Kafka
//! floor (`kafka::producer`).

pub mod dlq;
pub mod headers;
pub mod store;
