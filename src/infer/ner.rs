//! Token labels → entities with character offsets, like transformers'
//! `TokenClassificationPipeline(aggregation_strategy="simple")`: every non-special token takes
//! its argmax label; consecutive tokens of one entity type are merged unless a token starts a
//! new entity (B-); the group's score is the mean of its tokens' scores; "O" groups are dropped.

use tch::Tensor;

use crate::event::Entity;

/// (B/I marker, entity type) of a label; IO-format labels ("PER") count as "I".
fn tag(label: &str) -> (char, &str) {
    if let Some(t) = label.strip_prefix("B-") {
        ('B', t)
    } else if let Some(t) = label.strip_prefix("I-") {
        ('I', t)
    } else {
        ('I', label)
    }
}

/// One vocabulary of entity types over every model (routing mixes models in one event): PER,
/// ORG, LOC, MISC for the spelled-out names some models use, any other type (DATE, ...) upper
/// case as the model's `id2label` has it.
pub fn normalize_label(entity_type: &str) -> String {
    let upper = entity_type.trim().to_ascii_uppercase();
    match upper.as_str() {
        "PERSON" | "PERS" => "PER".into(),
        "ORGANIZATION" | "ORGANISATION" => "ORG".into(),
        "LOCATION" => "LOC".into(),
        "MISCELLANEOUS" => "MISC".into(),
        _ => upper,
    }
}

/// The entity types a model's labels (`B-PER`, `I-PER`, `O`, …) find, normalised, in first-seen
/// order.
pub fn entity_types(labels: &[String]) -> Vec<String> {
    let mut types: Vec<String> = Vec::new();
    for label in labels.iter().filter(|l| l.as_str() != "O") {
        let t = normalize_label(tag(label).1);
        if !types.contains(&t) {
            types.push(t);
        }
    }
    types
}

struct TokenLabel {
    label: usize,
    score: f32,
    start: usize,
    end: usize,
}

/// Entities of one text from its encoding (char offsets) and token probabilities [seq, labels].
pub fn aggregate_simple(text: &str, encoding: &tokenizers::Encoding, probs: &Tensor, labels: &[String]) -> Vec<Entity> {
    let probs: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(probs.narrow(0, 0, encoding.len() as i64))
        .expect("probabilities are a float matrix");
    let (offsets, rows): (Vec<(usize, usize)>, Vec<Vec<f32>>) = encoding
        .get_special_tokens_mask()
        .iter()
        .zip(encoding.get_offsets())
        .zip(probs)
        .filter(|((special, _), _)| **special == 0)
        .map(|((_, &offsets), p)| (offsets, p))
        .unzip();
    aggregate_tokens(text, &offsets, &rows, labels)
}

/// Entities from the content tokens of a text: their char offsets and label probabilities.
pub fn aggregate_tokens(text: &str, offsets: &[(usize, usize)], probs: &[Vec<f32>], labels: &[String]) -> Vec<Entity> {
    let tokens: Vec<TokenLabel> = offsets
        .iter()
        .zip(probs)
        .map(|(&(start, end), p)| {
            let (label, score) = super::argmax(p);
            TokenLabel { label, score, start, end }
        })
        .collect();
    let mut groups: Vec<Vec<&TokenLabel>> = Vec::new();
    for token in &tokens {
        let (bi, ty) = tag(&labels[token.label]);
        let continues = groups
            .last()
            .and_then(|g| g.last())
            .is_some_and(|last| tag(&labels[last.label]).1 == ty && bi != 'B');
        if continues {
            groups.last_mut().expect("checked").push(token);
        } else {
            groups.push(vec![token]);
        }
    }
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let byte_at = |c: usize| chars.get(c).map_or(text.len(), |(b, _)| *b);
    groups
        .into_iter()
        .filter_map(|g| {
            let label = normalize_label(tag(&labels[g[0].label]).1);
            if label == "O" {
                return None;
            }
            let (start, end) = (g[0].start, g.last().expect("non-empty").end);
            Some(Entity {
                text: text[byte_at(start)..byte_at(end)].to_string(),
                label,
                start: start as i32,
                end: end as i32,
                score: g.iter().map(|t| t.score).sum::<f32>() / g.len() as f32,
                model: None,
            })
        })
        .collect()
}

/// How token labels become entities (transformers' `aggregation_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Every token keeps its own label; consecutive tokens of one type merge.
    #[default]
    Simple,
    /// Every word takes the label of its first token, then words merge like `Simple`.
    First,
}

/// What `First` needs to know about each content token to find word boundaries.
pub struct WordInfo<'a> {
    /// The token string (e.g. "##ing" for WordPiece continuations).
    pub tokens: &'a [String],
    pub ids: &'a [u32],
    /// WordPiece-style continuation prefix, when the tokenizer has one.
    pub subword_prefix: Option<&'a str>,
    pub unk_id: Option<u32>,
}

/// transformers' word-boundary rule: with a continuation prefix, a token is a subword when its
/// string is longer than the text it covers; otherwise (SentencePiece) when it does not start
/// the text or follow a space; an unknown token always starts a word.
fn is_subword(text: &[char], start: usize, end: usize, i: usize, info: &WordInfo<'_>) -> bool {
    if info.unk_id == Some(info.ids[i]) {
        return false;
    }
    match info.subword_prefix.filter(|p| !p.is_empty()) {
        Some(_) => info.tokens[i].chars().count() != end.saturating_sub(start),
        None => start > 0 && !text[start - 1..(start + 1).min(text.len())].contains(&' '),
    }
}

/// Entities with `aggregation_strategy="first"`: words (a token and its subword continuations)
/// take the label and score of their first token's probabilities.
pub fn aggregate_first(
    text: &str,
    offsets: &[(usize, usize)],
    probs: &[Vec<f32>],
    labels: &[String],
    info: &WordInfo<'_>,
) -> Vec<Entity> {
    let chars: Vec<char> = text.chars().collect();
    let mut word_offsets: Vec<(usize, usize)> = Vec::new();
    let mut word_probs: Vec<Vec<f32>> = Vec::new();
    for (i, &(start, end)) in offsets.iter().enumerate() {
        if i > 0 && is_subword(&chars, start, end, i, info) && !word_offsets.is_empty() {
            word_offsets.last_mut().expect("checked").1 = end;
        } else {
            word_offsets.push((start, end));
            word_probs.push(probs[i].clone());
        }
    }
    aggregate_tokens(text, &word_offsets, &word_probs, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_boundaries_follow_transformers_rules() {
        let text: Vec<char> = "running fast".chars().collect();
        let tokens = vec!["run".to_string(), "##ning".to_string(), "fast".to_string()];
        let wp = WordInfo { tokens: &tokens, ids: &[5, 6, 7], subword_prefix: Some("##"), unk_id: Some(1) };
        assert!(!is_subword(&text, 0, 3, 0, &wp));
        assert!(is_subword(&text, 3, 7, 1, &wp), "'##ning' is longer than 'ning'");
        assert!(!is_subword(&text, 8, 12, 2, &wp));
        let unk = WordInfo { ids: &[5, 1, 7], ..wp };
        assert!(!is_subword(&text, 3, 7, 1, &unk), "an unknown token starts a word");
        let sp = WordInfo { tokens: &tokens, ids: &[5, 6, 7], subword_prefix: None, unk_id: None };
        assert!(is_subword(&text, 3, 7, 1, &sp), "no space before: continuation");
        assert!(!is_subword(&text, 8, 12, 2, &sp), "after a space: a new word");
    }

    #[test]
    fn tags_split_bio_and_io_labels() {
        assert_eq!(tag("B-PER"), ('B', "PER"));
        assert_eq!(tag("I-LOC"), ('I', "LOC"));
        assert_eq!(tag("ORG"), ('I', "ORG"));
        assert_eq!(tag("O"), ('I', "O"));
    }

    #[test]
    fn labels_of_every_model_share_one_vocabulary() {
        assert_eq!(normalize_label("PER"), "PER");
        assert_eq!(normalize_label("person"), "PER");
        assert_eq!(normalize_label("ORGANIZATION"), "ORG");
        assert_eq!(normalize_label("Location"), "LOC");
        assert_eq!(normalize_label("MISC"), "MISC");
        assert_eq!(normalize_label("DATE"), "DATE");
        assert_eq!(normalize_label("O"), "O");
        let labels: Vec<String> = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-DATE", "I-LOC", "person"].map(String::from).to_vec();
        assert_eq!(entity_types(&labels), ["PER", "ORG", "DATE", "LOC"], "each type once, B-/I- and spellings merged");
    }
}
