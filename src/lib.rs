//! convoflow: a Kafka consumer that enriches conversation turns and writes them to Qdrant and
//! an output topic. Data flows one way: source → codec → pipeline → sink → commit.

pub mod ask;
pub mod bench;
pub mod cli;
pub mod codec;
pub mod config;
pub mod demo;
pub mod infer;
pub mod kafka;
pub mod language;
pub mod llm;
pub mod model_api;
pub mod event;
pub mod fault;
pub mod pipeline;
pub mod produce;
pub mod routing;
pub mod query;
pub mod sample;
pub mod search;
pub mod serve;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod worker;
