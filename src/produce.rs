//! `convoflow produce`: publishes sample conversations (or JSON lines) to the input topic, as
//! an upstream service would. Used by the command line, the demo and the end-to-end bench.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::codec::WireFormat;
use crate::config::Config;
use crate::event::Conversation;
use crate::sample::SampleGenerator;
use crate::kafka::producer::{EventProducer, Outgoing};
use crate::kafka::admin;

pub struct ProduceArgs {
    pub count: u64,
    pub input: Option<PathBuf>,
    pub format: WireFormat,
    pub topic: Option<String>,
    pub seed: u64,
    pub whole: bool,
    pub partitions: usize,
}

fn read_json_lines(path: &Path) -> Result<Vec<Conversation>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let conv: Conversation =
            serde_json::from_str(&line).with_context(|| format!("{}:{}: not a Conversation", path.display(), i + 1))?;
        out.push(conv);
    }
    Ok(out)
}

pub async fn produce(cfg: &Config, args: ProduceArgs) -> Result<()> {
    let topic = args.topic.unwrap_or_else(|| cfg.kafka.input_topic.clone());
    if args.format == WireFormat::Auto {
        bail!("--format must be avro, confluent or json");
    }
    let events: Vec<Conversation> = match &args.input {
        Some(path) => read_json_lines(path)?,
        None => {
            let generator = SampleGenerator::new(args.seed);
            (0..args.count)
                .flat_map(|n| if args.whole { vec![generator.conversation(n)] } else { generator.conversation_events(n) })
                .collect()
        }
    };
    if admin::partition_count(&cfg.kafka, &topic, Duration::from_secs(15))?.is_none() {
        admin::ensure_topics(&cfg.kafka, std::slice::from_ref(&topic), args.partitions).await?;
    }
    // Confluent framing: the Conversation schema registered under the topic's subject
    let codec = crate::codec::factory::writer_codec::<Conversation>(&cfg.codec, args.format, &topic, None)?;
    let producer = EventProducer::new(&cfg.kafka, cfg.kafka.message_max_bytes)?;
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(events.len());
    for event in &events {
        event.validate(&crate::event::EventLimits::UNBOUNDED).with_context(|| format!("conversation {}", event.conversation_id))?;
        let payload = codec.encode(event)?;
        let out = Outgoing { topic: &topic, key: Some(event.conversation_id.as_bytes()), payload: Some(&payload), headers: None };
        deliveries.push(producer.enqueue(out).await?);
    }
    for delivery in deliveries {
        delivery.await.context("producer closed")?.map_err(|(e, _)| e).context("delivery failed")?;
    }
    let turns: usize = events.iter().map(|e| e.turns.len()).sum();
    println!(
        "published {} events ({} turns) to {topic} as {:?} in {:.2}s",
        events.len(),
        turns,
        args.format,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_read_with_line_numbers_in_errors() {
        let dir = std::env::temp_dir().join(format!("convoflow-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        let conv = SampleGenerator::new(1).conversation(0);
        let line = serde_json::to_string(&conv).unwrap();
        std::fs::write(&good, format!("{line}\n\n{line}\n")).unwrap();
        assert_eq!(read_json_lines(&good).unwrap(), vec![conv.clone(), conv]);
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, format!("{line}\n{{\"tenant\": 1}}\n")).unwrap();
        let err = format!("{:#}", read_json_lines(&bad).unwrap_err());
        assert!(err.contains("bad.jsonl:2"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
