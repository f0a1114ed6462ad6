//! Topic checks and creation at start-up.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::KafkaError;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use tracing::debug;

use crate::kafka;
use crate::config::KafkaConfig;

/// Records the errors that no retry can fix — authentication (wrong credentials or mechanism)
/// and TLS (certificate not trusted) — which librdkafka reports only through the error callback
/// while it keeps retrying, and a metadata request only as a transport failure at its timeout.
#[derive(Default)]
struct SecurityProbe {
    failure: Mutex<Option<String>>,
}

impl ClientContext for SecurityProbe {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if matches!(code, Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)) {
            let mut failure = self.failure.lock().expect("probe lock");
            failure.get_or_insert_with(|| reason.to_string());
        } else {
            debug!(error = %error, reason, "Kafka client error while probing");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for SecurityProbe {}

/// A broker answered and refused the client: authentication or TLS. Not "no broker answered":
/// callers must not suggest another address.
#[derive(Debug, thiserror::Error)]
#[error("Kafka at {brokers} refused the connection: {reason} (check kafka.security: protocol {protocol}, credentials, tls.ca)")]
pub struct BrokerRefused {
    pub brokers: String,
    pub reason: String,
    pub protocol: &'static str,
}

/// Partition count of `topic`, or None if the cluster does not know it. This is the first
/// contact with the cluster at start: wrong credentials or an untrusted broker certificate fail
/// here at once with librdkafka's own reason, instead of a transport error after `timeout`.
pub fn partition_count(cfg: &KafkaConfig, topic: &str, timeout: Duration) -> Result<Option<usize>> {
    let probe: BaseConsumer<SecurityProbe> = kafka::client(cfg)
        .create_with_context(SecurityProbe::default())
        
        .context("creating a metadata client")?;
    let deadline = Instant::now() + timeout;
    // short attempts, so an authentication or TLS failure is seen within a second of its
    // arrival: an attempt that times out does not close the connection, which goes on being
    // set up for the next one (clusters far away, TLS + SASL round trips before the answer)
    let mut attempt_limit = Duration::from_millis(500);
    let metadata = loop {
        let attempt = deadline.saturating_duration_since(Instant::now()).min(attempt_limit);
        attempt_limit = Duration::from_secs(1);
        let result = probe.fetch_metadata(Some(topic), attempt);
        // serve every queued event (one poll serves one error event): the TLS failure may sit
        // behind transport errors of the same attempt
        for _ in 0..64 {
            if probe.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        if let Some(reason) = probe.context().failure.lock().expect("probe lock").take() {
            return Err(BrokerRefused { brokers: cfg.brokers.clone(), reason, protocol: cfg.security.protocol.librdkafka() }.into());
        }
        match result {
            Ok(m) => break m,
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow::Error::new(e).context(format!("fetching metadata of {topic} from {}", cfg.brokers)));
            }
            Err(_) => {}
        }
    };
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
    let admin: AdminClient<DefaultClientContext> =
        kafka::client(cfg).create().context("creating an admin client")?;
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

/// The smallest `max.message.bytes` of `topics` (their effective value: the topic's own or the
/// broker's default), so the producer refuses a record the broker would refuse — before it
/// shares a batch with others, which the broker would refuse with it. None when the cluster
/// does not say (no `DescribeConfigs` permission, say): the caller keeps its own limit.
pub async fn max_message_bytes(cfg: &KafkaConfig, topics: &[String]) -> Option<u32> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = match kafka::client(cfg).create() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read the topics' max.message.bytes");
            return None;
        }
    };
    let specs: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = match tokio::time::timeout(Duration::from_secs(15), admin.describe_configs(&specs, &opts)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the topics' max.message.bytes");
            return None;
        }
        Err(_) => {
            tracing::warn!("reading the topics' max.message.bytes timed out");
            return None;
        }
    };
    let mut smallest: Option<u32> = None;
    for (topic, result) in topics.iter().zip(results) {
        let value = result.ok().and_then(|r| r.get("max.message.bytes").and_then(|e| e.value.as_deref()?.parse::<u32>().ok()));
        match value {
            Some(v) => smallest = Some(smallest.map_or(v, |s| s.min(v))),
            None => tracing::warn!(topic, "the topic's max.message.bytes is not readable"),
        }
    }
    smallest
}
