//! `convoflow search`: hybrid search over the collection. The query is embedded with the
//! configured embedding model (its query template applied) and turned into BM25 query terms;
//! the store fuses a dense prefetch and a sparse prefetch by reciprocal rank fusion, under the
//! payload filters. Without an embedding model the search is BM25 alone (said on stderr).

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::config::Config;
use crate::infer::{Model, Task};
use crate::pipeline::bm25;
use crate::sink::store::{self, Bootstrap, Hit, HybridQuery, SearchFilter};

#[derive(Debug, Clone, clap::Args)]
pub struct SearchArgs {
    /// What to look for.
    pub query: String,
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long)]
    pub speaker: Option<String>,
    #[arg(long)]
    pub language: Option<String>,
    #[arg(long)]
    pub conversation: Option<String>,
    /// Only chunks of turns with at least this many sentiment stars.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=5))]
    pub min_stars: Option<i32>,
    /// LABEL:VALUE, e.g. PER:Marie Curie (repeatable; all must match).
    #[arg(long = "entity")]
    pub entities: Vec<String>,
    #[arg(long, short = 'k', default_value_t = 10)]
    pub limit: usize,
    /// Print JSON (one array of hits) instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl SearchArgs {
    pub fn filter(&self) -> Result<SearchFilter> {
        let entities = self
            .entities
            .iter()
            .map(|e| match e.split_once(':') {
                Some((label, value)) if !label.trim().is_empty() && !value.trim().is_empty() => {
                    Ok((label.trim().to_string(), value.trim().to_string()))
                }
                _ => bail!("--entity expects LABEL:VALUE (e.g. PER:Marie Curie), got {e:?}"),
            })
            .collect::<Result<_>>()?;
        Ok(SearchFilter {
            conversation_id: self.conversation.clone(),
            tenant: self.tenant.clone(),
            speaker: self.speaker.clone(),
            language: self.language.clone(),
            min_stars: self.min_stars,
            entities,
        })
    }
}

/// Dense dimension of the collection: `qdrant.dense_dim`, else the embedding model's hidden size.
pub fn dense_dim(cfg: &Config) -> Result<usize> {
    if let Some(dim) = cfg.qdrant.dense_dim {
        return Ok(dim);
    }
    let Some(model) = &cfg.models.embedding else {
        bail!("the vector store needs the dense vector size: configure models.embedding or set qdrant.dense_dim");
    };
    let path = model.path.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} for the dense vector size (or set qdrant.dense_dim)", path.display()))?;
    let hf: crate::infer::hf::HfConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(hf.hidden_size as usize)
}

/// Embeds a search query with the configured model, if its folder is there.
pub fn embed_query(cfg: &Config, query: &str) -> Result<Option<Vec<f32>>> {
    Ok(embed_queries(cfg, &[query])?.and_then(|mut v| v.pop()))
}

/// Embeds several search queries with one load of the configured model (query template
/// applied), in input order; None without an embedding model folder.
pub fn embed_queries(cfg: &Config, queries: &[&str]) -> Result<Option<Vec<Vec<f32>>>> {
    let Some(m) = &cfg.models.embedding else { return Ok(None) };
    if !Path::new(&m.path).join("config.json").exists() {
        return Ok(None);
    }
    let device = crate::infer::device::parse_device(&cfg.gpu.device)?;
    let dtype = crate::infer::device::parse_dtype(&m.dtype, device)?;
    let model = Model::load(&m.path, Task::Embedding, device, dtype).with_context(|| format!("loading {}", m.name))?;
    let texts: Vec<String> = queries.iter().map(|q| m.query_text(q)).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    Ok(Some(model.embed(&texts, &Default::default())?.0))
}

pub async fn run(cfg: &Config, args: &SearchArgs) -> Result<()> {
    let filter = args.filter()?;
    let dim = dense_dim(cfg)?;
    let dense = embed_query(cfg, &args.query)?;
    if dense.is_none() {
        eprintln!("search: no embedding model folder configured; BM25 only");
    }
    let store = store::open(&cfg.qdrant)?;
    store.ensure_collection(&store::collection_spec(&cfg.qdrant, dim), Bootstrap::MustExist).await?;
    let query = HybridQuery {
        dense,
        sparse: bm25::query_vector(&args.query),
        filter,
        limit: args.limit,
        prefetch_limit: (args.limit * 5).max(50),
    };
    let hits = store.search(&query).await?;
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

/// `table`, with entity marks only when `entities` (the demo turns them off for untrained NER).
pub fn table_with(hits: &[Hit], ansi: bool, entities: bool) -> String {
    if hits.is_empty() {
        return "no results\n".into();
    }
    let get = |h: &Hit, k: &str| h.payload.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let rows: Vec<[String; 5]> = hits
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let stars = h.payload.get("sentiment_stars").and_then(Value::as_i64).map_or("-".into(), |s| format!("{s}★"));
            [format!("{}", i + 1), format!("{:.4}", h.score), get(h, "conversation_id"), format!("{} ({stars})", get(h, "speaker")), {
                let mut payload = h.payload.clone();
                if !entities {
                    payload.remove("entities");
                }
                snippet(&payload, 90, ansi)
            }]
        })
        .collect();
    let headers = ["#", "score", "conversation", "speaker", "snippet"];
    let widths: Vec<usize> =
        (0..4).map(|c| rows.iter().map(|r| r[c].chars().count()).chain([headers[c].len()]).max().unwrap_or(0)).collect();
    let mut out = String::new();
    let line = |cells: [&str; 5], out: &mut String| {
        for c in 0..4 {
            out.push_str(&format!("{:<w$}  ", cells[c], w = widths[c]));
        }
        out.push_str(cells[4]);
        out.push('\n');
    };
    line(headers, &mut out);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]], &mut out);
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
        assert!(t.starts_with("#  score   conversation  speaker"), "{t}");
        assert!(t.contains("conv-1") && t.contains("agent-7 (4★)") && t.contains("[Lyon|LOC]"), "{t}");
        assert_eq!(table(&[], false), "no results\n");
    }

    #[test]
    fn entity_filters_are_parsed_and_checked() {
        let mut args = SearchArgs {
            query: "q".into(), tenant: Some("acme".into()), speaker: None, language: None, conversation: None,
            min_stars: Some(4), entities: vec!["PER: Marie Curie".into()], limit: 5, json: false,
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
