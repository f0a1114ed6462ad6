//! Topic checks and creation at start-up.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::base_client_config;
use crate::config::KafkaConfig;

/// Partition count of `topic`, or None if the cluster does not know it.
pub fn partition_count(cfg: &KafkaConfig, topic: &str, timeout: Duration) -> Result<Option<usize>> {
    let probe: BaseConsumer = base_client_config(cfg).create().context("creating a metadata client")?;
    let metadata = probe
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("fetching metadata of {topic} from {}", cfg.brokers))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0))
}

/// Creates `topics` with `partitions` partitions (replication: the broker default) where
/// missing. "Already exists" is success, so several workers may start at once.
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[String], partitions: usize) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = base_client_config(cfg).create().context("creating an admin client")?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions as i32, TopicReplication::Fixed(-1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = tokio::time::timeout(Duration::from_secs(15), admin.create_topics(&new_topics, &opts))
        .await
        .context("creating topics timed out")?
        .context("creating topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}
