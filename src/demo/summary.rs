//! The summary printed after the demo: what came out, per language, with latencies.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;


use crate::event::EnrichedConversation;
use crate::bench::readback::percentile;


/// What the models did with the turns of one language.
#[derive(Default)]
struct LanguageCounts {
    turns: usize,
    /// Where the turns' language came from (event, detected, inherited).
    sources: BTreeMap<String, usize>,
    /// Entities per NER model.
    ner: BTreeMap<String, usize>,
    /// Turns with sentiment.
    rated: usize,
    /// Turns a task skipped ("NER", "sentiment"), by reason.
    skipped: BTreeMap<(&'static str, String), usize>,
}

fn by_language(outputs: &[(i64, EnrichedConversation)]) -> BTreeMap<String, LanguageCounts> {
    let mut langs: BTreeMap<String, LanguageCounts> = BTreeMap::new();
    for t in outputs.iter().flat_map(|(_, e)| &e.turns) {
        let l = langs.entry(t.language.clone().unwrap_or_else(|| "?".into())).or_default();
        l.turns += 1;
        *l.sources.entry(t.language_source.clone().unwrap_or_else(|| "none".into())).or_default() += 1;
        for e in &t.entities {
            *l.ner.entry(e.model.clone().unwrap_or_default()).or_default() += 1;
        }
        l.rated += usize::from(t.sentiment.is_some());
        if let Some(reason) = &t.entities_skipped {
            *l.skipped.entry(("NER", reason.clone())).or_default() += 1;
        }
        if let Some(reason) = &t.sentiment_skipped {
            *l.skipped.entry(("sentiment", reason.clone())).or_default() += 1;
        }
    }
    langs
}

pub fn print_summary(
    outputs: &[(i64, EnrichedConversation)],
    dead_lettered: usize,
    input_ts: &HashMap<(i32, i64), i64>,
    elapsed: Duration,
) {
    let turns: usize = outputs.iter().map(|(_, e)| e.turns.len()).sum();
    let tokens: i64 = outputs.iter().map(|(_, e)| e.total_tokens).sum();
    let chunks: usize = outputs.iter().flat_map(|(_, e)| &e.turns).map(|t| t.chunks.len()).sum();
    let conversations: std::collections::HashSet<_> = outputs.iter().map(|(_, e)| &e.conversation_id).collect();
    let langs = by_language(outputs);
    let mut latencies: Vec<i64> = outputs
        .iter()
        .filter_map(|(ts, e)| input_ts.get(&(e.source.partition, e.source.offset)).map(|t0| ts - t0))
        .collect();
    latencies.sort_unstable();
    let secs = elapsed.as_secs_f64();
    println!();
    println!("  {:<34} {:>12}", "conversations", conversations.len());
    println!("  {:<34} {:>12}", "events enriched (one per input)", outputs.len());
    if dead_lettered > 0 {
        println!("  {:<34} {:>12}", "events dead-lettered", dead_lettered);
    }
    println!("  {:<34} {:>12}", "turns", turns);
    println!("  {:<34} {:>12}", "tokens (built-in tokenizer)", tokens);
    println!("  {:<34} {:>12}", "chunks (Qdrant points)", chunks);
    for (lang, l) in &langs {
        println!("  {:<34} {:>12}", format!("turns in language {lang}"), l.turns);
        let sources: Vec<String> = l.sources.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let mut routed: Vec<String> = l.ner.iter().map(|(m, n)| format!("NER {m}: {n} entities")).collect();
        routed.extend(l.skipped.iter().map(|((what, reason), n)| format!("{what} skipped on {n} turns: {reason}")));
        if l.rated > 0 {
            routed.push(format!("sentiment on {} turns", l.rated));
        }
        println!("    language from: {}", sources.join(", "));
        for line in routed {
            println!("    {line}");
        }
    }
    println!("  {:<34} {:>12.1}", "wall time incl. group join (s)", secs);
    println!("  {:<34} {:>12.0}", "turns/s (incl. group join)", turns as f64 / secs);
    println!("  {:<34} {:>12}", "latency p50 publish→enriched (ms)", percentile(&latencies, 0.5));
    println!("  {:<34} {:>12}", "latency p99 publish→enriched (ms)", percentile(&latencies, 0.99));
    println!("  (events were published before the worker joined the group and the models loaded, so latency includes both)");
    let mut labels: std::collections::BTreeMap<String, i64> = Default::default();
    let mut stars = [0usize; 5];
    for (_, e) in outputs {
        for (label, n) in &e.entity_counts {
            *labels.entry(label.clone()).or_default() += i64::from(*n);
        }
        for t in &e.turns {
            if let Some(s) = &t.sentiment {
                stars[(s.stars.clamp(1, 5) - 1) as usize] += 1;
            }
        }
    }
    let entities: i64 = labels.values().sum();
    let by_label: Vec<String> = labels.iter().map(|(l, n)| format!("{l} {n}")).collect();
    println!("  {:<34} {:>12}", "entities", entities);
    if !by_label.is_empty() {
        println!("  {:<34} {:>12}", "  by label", by_label.join(", "));
    }
    let scored: usize = stars.iter().sum();
    if scored > 0 {
        println!("  sentiment (turns per star):");
        let max = *stars.iter().max().unwrap_or(&1);
        for (i, n) in stars.iter().enumerate() {
            println!("    {}★ {:>6}  {}", i + 1, n, "█".repeat(n * 30 / max.max(1)));
        }
    }
    if let Some((_, e)) = outputs.first() {
        for m in &e.models {
            println!("  model {:<9} {} [{}]", m.task, m.name, m.version);
        }
    }
    if let Some((_, e)) = outputs.first()
        && let Some(t) = e.turns.first()
    {
        println!(
            "  sample: {} turn {} ({} tokens, {} chunk(s), point {})",
            e.conversation_id,
            t.turn_id,
            t.token_count,
            t.chunks.len(),
            t.point_ids.first().map(String::as_str).unwrap_or("-")
        );
    }
}
