//! The CPU stages between the Kafka source and the sinks, and the offset bookkeeping that
//! makes the whole worker at-least-once.

pub mod breaker;
pub mod bm25;
pub mod chunk;
pub mod emit;
pub mod enrich;
pub mod offsets;
pub mod prepare;
pub mod stage;
