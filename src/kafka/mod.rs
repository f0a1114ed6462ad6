//! Kafka plumbing shared by the source, the sinks, the lag monitor, the demo and the bench (as
//! Vector's `src/kafka.rs` is shared by its Kafka source and sink): every client is built here,
//! from one recipe, so the rule "never print a `ClientConfig`" (it holds `kafka.security`'s
//! secrets) is kept in one place; plus the partition name, the idempotent/transactional
//! producer, its transactions and the admin checks.
//!
//! This floor uses only `config` and `telemetry`; the source and the sinks use it.

pub mod admin;
pub mod producer;
pub mod transactions;

use std::sync::Arc;

use anyhow::Result;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfig, FromClientConfigAndContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// A topic's partition (what offsets, generations and transactions are kept per).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: &str, partition: i32) -> Self {
        Self { topic: Arc::from(topic), partition }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// A Kafka client about to be created: the settings every client of this worker shares
/// (brokers, `kafka.security` — secrets included —, the `kafka.client` tuning pass-through)
/// plus the caller's own. The `ClientConfig` inside is never handed out or printed (this type
/// is not `Debug`), and `create` drops a property's value from librdkafka's error (it may be a
/// secret set under a misspelt name).
pub struct ClientBuilder(ClientConfig);

/// The one way to build a Kafka client (consumer, producer, admin) of convoflow.
pub fn client(cfg: &KafkaConfig) -> ClientBuilder {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in cfg.security.client_properties() {
        c.set(k, v);
    }
    for (k, v) in &cfg.client {
        c.set(k, v);
    }
    ClientBuilder(c)
}

impl ClientBuilder {
    /// Sets a librdkafka property (later settings win, as in `ClientConfig::set`).
    pub fn set<K: Into<String>, V: Into<String>>(&mut self, key: K, value: V) -> &mut Self {
        self.0.set(key, value);
        self
    }

    pub fn create<T: FromClientConfig>(&self) -> Result<T> {
        self.0.create().map_err(redact_config_error)
    }

    pub fn create_with_context<C: ClientContext, T: FromClientConfigAndContext<C>>(&self, context: C) -> Result<T> {
        self.0.create_with_context(context).map_err(redact_config_error)
    }
}

/// A client-creation error without the property's value: rdkafka's `ClientConfig` error prints
/// the value, which may be a secret set under a misspelt name.
fn redact_config_error(e: rdkafka::error::KafkaError) -> anyhow::Error {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, description, key, _value) => {
            anyhow::anyhow!("invalid Kafka client property {key:?}: {description}")
        }
        other => anyhow::Error::new(other),
    }
}

/// Offsets (the next offset to read, per partition) as librdkafka's list.
pub fn offsets_list<'a>(offsets: impl IntoIterator<Item = (&'a TopicPartition, i64)>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (tp, next) in offsets {
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next));
    }
    tpl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_error_never_carries_the_value() {
        let mut cfg = KafkaConfig::default();
        cfg.client.insert("sasl.pasword".into(), "hunter2-secret".into());
        let err = client(&cfg).create::<rdkafka::producer::BaseProducer>().err().expect("a misspelt property is refused");
        let text = format!("{err:#}");
        assert!(text.contains("sasl.pasword"), "{text}");
        assert!(!text.contains("hunter2-secret"), "{text}");
    }
}
