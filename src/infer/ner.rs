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
            let (label, score) = p
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |best, (i, &s)| if s > best.1 { (i, s) } else { best });
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
            let label = tag(&labels[g[0].label]).1.to_string();
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
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_bio_and_io_labels() {
        assert_eq!(tag("B-PER"), ('B', "PER"));
        assert_eq!(tag("I-LOC"), ('I', "LOC"));
        assert_eq!(tag("ORG"), ('I', "ORG"));
        assert_eq!(tag("O"), ('I', "O"));
    }
}
