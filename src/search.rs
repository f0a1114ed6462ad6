//! `convoflow search`: hybrid search over the collection. The query is embedded with the
//! configured embedding model (its query template applied) and turned into BM25 query terms;
//! the store fuses a dense prefetch and a sparse prefetch by reciprocal rank fusion, under the
//! payload filters. Without an embedding model the search is BM25 alone (said on stderr).

use std::io::IsTerminal;

use anyhow::Result;
use serde_json::{Value, json};

use crate::config::Config;
use crate::query::{self, FilterArgs, GroupBy};
use crate::sink::store::Hit;

#[derive(Debug, Clone, clap::Args)]
pub struct SearchArgs {
    /// What to look for (embedded with the embedding model's query template, and BM25 terms).
    pub query: String,
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Number of hits to show (with --group-by: number of groups, one hit each).
    #[arg(long, short = 'k', default_value_t = 10)]
    pub limit: usize,
    /// Print JSON (one array of hits) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Return only the best hit per conversation (Qdrant's grouping on `conversation_id`,
    /// group size 1), so one conversation that repeats the query's words fills one row.
    #[arg(long, value_enum)]
    pub group_by: Option<GroupBy>,
}









pub async fn run(cfg: &Config, args: &SearchArgs) -> Result<()> {
    let filter = args.filters.filter()?;
    let dense = query::embed_query(cfg, &args.query)?;
    if dense.is_none() {
        eprintln!("search: no embedding model folder configured; BM25 only");
    }
    let store = query::open_store(cfg).await?;
    let hits = store.search(&query::hybrid_query(&args.query, dense, filter, args.limit, args.group_by)).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&hits_json(&hits))?);
    } else {
        print!("{}", table(&hits, std::io::stdout().is_terminal()));
    }
    Ok(())
}

pub fn hits_json(hits: &[Hit]) -> Value {
    Value::Array(hits.iter().map(|h| json!({"id": h.id.to_string(), "score": h.score, "payload": h.payload})).collect())
}

/// The chunk text with each entity shown as `[text|LABEL]` (bold on a terminal), cut to
/// about `width` characters around the first entity.
pub fn snippet(payload: &serde_json::Map<String, Value>, width: usize, ansi: bool) -> String {
    let Some(text) = payload.get("text").and_then(Value::as_str) else { return "(no text stored)".into() };
    let chars: Vec<char> = text.chars().collect();
    let base = payload.get("chunk_start").and_then(Value::as_i64).unwrap_or(0);
    let mut spans: Vec<(usize, usize, String)> = payload
        .get("entities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let start = (e.get("start")?.as_i64()? - base).clamp(0, chars.len() as i64) as usize;
            let end = (e.get("end")?.as_i64()? - base).clamp(0, chars.len() as i64) as usize;
            let label = e.get("label")?.as_str()?.to_string();
            (start < end).then_some((start, end, label))
        })
        .collect();
    spans.sort();
    let from = spans.first().map_or(0, |s| s.0.saturating_sub(width / 3));
    let (mut out, mut at) = (String::new(), from);
    if from > 0 {
        out.push('…');
    }
    for (s, e, label) in spans.into_iter().filter(|s| s.0 >= from) {
        if s < at {
            continue;
        }
        out.extend(&chars[at..s]);
        let entity: String = chars[s..e].iter().collect();
        if ansi {
            out.push_str(&format!("\x1b[1m[{entity}|{label}]\x1b[0m"));
        } else {
            out.push_str(&format!("[{entity}|{label}]"));
        }
        at = e;
    }
    out.extend(&chars[at..]);
    let visible: usize = out.chars().count();
    if visible > width + 12 && !ansi {
        let cut: String = out.chars().take(width).collect();
        return format!("{cut}…");
    }
    out.replace('\n', " ")
}

pub fn table(hits: &[Hit], ansi: bool) -> String {
    table_with(hits, ansi, true)
}

/// A payload field as text: strings as they are, numbers and the rest as JSON, `-` when absent.
fn field_text(payload: &serde_json::Map<String, Value>, key: &str) -> String {
    match payload.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// The turn's time (`ts`, RFC 3339) as `YYYY-MM-DD HH:MM:SS` UTC; as stored when not RFC 3339.
fn time_text(payload: &serde_json::Map<String, Value>) -> String {
    let raw = field_text(payload, "ts");
    chrono::DateTime::parse_from_rfc3339(&raw)
        .map(|t| t.with_timezone(&chrono::Utc).format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or(raw)
}

/// `table`, with entity marks only when `entities` (the demo turns them off for untrained NER).
/// Columns: rank, fused score, conversation, turn id, turn time (UTC), speaker (stars), snippet —
/// the turn and time tell apart turns that repeat the same sentence.
pub fn table_with(hits: &[Hit], ansi: bool, entities: bool) -> String {
    const COLUMNS: usize = 7;
    if hits.is_empty() {
        return "no results\n".into();
    }
    let rows: Vec<[String; COLUMNS]> = hits
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let p = &h.payload;
            let stars = p.get("sentiment_stars").and_then(Value::as_i64).map_or("-".into(), |s| format!("{s}★"));
            let snippet = {
                let mut payload = p.clone();
                if !entities {
                    payload.remove("entities");
                }
                snippet(&payload, 90, ansi)
            };
            [
                format!("{}", i + 1),
                format!("{:.4}", h.score),
                field_text(p, "conversation_id"),
                field_text(p, "turn_id"),
                time_text(p),
                format!("{} ({stars})", field_text(p, "speaker")),
                snippet,
            ]
        })
        .collect();
    let headers = ["#", "score", "conversation", "turn", "time (UTC)", "speaker", "snippet"];
    let widths: Vec<usize> = (0..COLUMNS - 1)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).chain([headers[c].chars().count()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let mut line = |cells: [&str; COLUMNS]| {
        for (cell, w) in cells.iter().zip(&widths) {
            out.push_str(cell);
            out.push_str(&" ".repeat(w - cell.chars().count() + 2));
        }
        out.push_str(cells[COLUMNS - 1]);
        out.push('\n');
    };
    line(headers);
    for r in &rows {
        line(std::array::from_fn(|c| r[c].as_str()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(text: &str, entities: Value) -> Hit {
        let payload = json!({
            "conversation_id": "conv-1", "speaker": "agent-7", "sentiment_stars": 4,
            "text": text, "chunk_start": 10, "entities": entities,
        });
        Hit { id: uuid::Uuid::nil(), score: 0.5, payload: payload.as_object().unwrap().clone() }
    }

    #[test]
    fn snippets_highlight_entities_at_chunk_relative_offsets() {
        let h = hit("Bonjour Marie Curie de Lyon", json!([
            {"label": "PER", "start": 18, "end": 29}, {"label": "LOC", "start": 33, "end": 37}
        ]));
        assert_eq!(snippet(&h.payload, 200, false), "Bonjour [Marie Curie|PER] de [Lyon|LOC]");
        assert!(snippet(&h.payload, 200, true).contains("\x1b[1m[Marie Curie|PER]\x1b[0m"));
        let t = table(&[h], false);
        assert!(t.starts_with("#  score   conversation  turn  time (UTC)  speaker       snippet"), "{t}");
        assert!(t.contains("conv-1") && t.contains("agent-7 (4★)") && t.contains("[Lyon|LOC]"), "{t}");
        assert_eq!(table(&[], false), "no results\n");
    }

    /// Two turns repeating the same sentence are told apart by their turn id and time.
    #[test]
    fn table_shows_the_turn_and_its_time() {
        let mut a = hit("Merci beaucoup", json!([]));
        a.payload.insert("turn_id".into(), json!("t3"));
        a.payload.insert("ts".into(), json!("2026-05-28T10:15:03.250Z"));
        let mut b = hit("Merci beaucoup", json!([]));
        b.payload.insert("turn_id".into(), json!(7));
        b.payload.insert("ts".into(), json!("not a time"));
        let t = table(&[a, b], false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[1].contains("  t3  ") && lines[1].contains("2026-05-28 10:15:03"), "{t}");
        assert!(lines[2].contains("  7   ") && lines[2].contains("not a time"), "{t}");
        // the columns line up: the snippet starts at the same character in every row
        let at = |l: &str| l.chars().collect::<Vec<_>>().windows(5).position(|w| w.iter().collect::<String>() == "Merci");
        assert_eq!(at(lines[1]), at(lines[2]), "{t}");
        // a hit without turn or time (older points) shows dashes
        let t = table(&[hit("x", json!([]))], false);
        assert!(t.lines().nth(1).unwrap().contains("conv-1        -     -  "), "{t}");
    }

    #[test]
    fn search_help_documents_every_flag() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SearchArgs,
        }
        let cmd = Cli::command();
        for arg in cmd.get_arguments().filter(|a| a.get_id() != "help") {
            assert!(arg.get_help().is_some_and(|h| !h.to_string().is_empty()), "--{} has no help", arg.get_id());
        }
        let help = Cli::command().render_long_help().to_string();
        for flag in ["--tenant", "--speaker", "--language", "--conversation", "--min-stars", "--entity", "--limit", "--json", "--group-by"] {
            assert!(help.contains(flag), "{flag} in {help}");
        }
        let parsed = <Cli as clap::Parser>::try_parse_from(["x", "q", "--group-by", "conversation"]).unwrap();
        assert_eq!(parsed.args.group_by.map(GroupBy::field), Some("conversation_id"));
    }

    #[test]
    fn entity_filters_are_parsed_and_checked() {
        let mut args = FilterArgs {
            tenant: Some("acme".into()), min_stars: Some(4), entities: vec!["PER: Marie Curie".into()], ..Default::default()
        };
        let f = args.filter().unwrap();
        assert_eq!(f.entities, vec![("PER".to_string(), "Marie Curie".to_string())]);
        assert_eq!(
            f.keyword_conditions(),
            vec![("tenant", "acme".to_string()), ("entity_values", "PER:marie curie".to_string())]
        );
        args.entities = vec!["Marie".into()];
        assert!(args.filter().unwrap_err().to_string().contains("LABEL:VALUE"));
    }
}
