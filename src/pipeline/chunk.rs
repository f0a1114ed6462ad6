//! Token-aware chunking of turns: a turn longer than `max_tokens` becomes overlapping windows,
//! each one Qdrant point. Tokens are the embedding model's when one is configured (so a chunk is
//! exactly what the model sees, and its ids go to the model without a second tokenization),
//! otherwise those of `chunk.tokenizer` or of a built-in word-level tokenizer (BERT normaliser
//! and pre-tokeniser: one token per word or punctuation mark). Special tokens are not counted.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tokenizers::Tokenizer;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;

/// A window of a turn's text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextChunk {
    pub index: usize,
    /// Byte range in the turn text (for slicing).
    pub bytes: std::ops::Range<usize>,
    /// Character (Unicode scalar) range in the turn text (what events report).
    pub chars: std::ops::Range<usize>,
    /// Token range in `ChunkedText::ids`.
    pub tokens: std::ops::Range<usize>,
    pub token_count: usize,
}

#[derive(Debug, Clone)]
pub struct ChunkedText {
    pub token_count: usize,
    /// The turn's token ids (no special tokens); chunks index into them.
    pub ids: Vec<u32>,
    pub chunks: Vec<TextChunk>,
}

pub struct Chunker {
    tokenizer: Tokenizer,
    max_tokens: usize,
    overlap: usize,
}

/// The built-in tokenizer: lower-cased, accent-stripped words and punctuation, one token each.
pub fn builtin_tokenizer() -> Tokenizer {
    let vocab = HashMap::from([("[UNK]".to_string(), 0u32)]);
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".to_string())
        .build()
        .expect("a one-word vocabulary with its unknown token is valid");
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, true, Some(true), true)))
        .expect("the BERT normaliser is valid");
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer
}

/// Loads a tokenizer.json with truncation and padding off (chunking needs every token).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("loading tokenizer {}", path.display()))?;
    tokenizer.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

impl Chunker {
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn new(tokenizer: Tokenizer, max_tokens: usize, overlap: usize) -> Result<Self> {
        if max_tokens == 0 || overlap >= max_tokens {
            bail!("chunk.max_tokens must be > 0 and chunk.overlap_tokens < max_tokens (got {max_tokens}, {overlap})");
        }
        Ok(Self { tokenizer, max_tokens, overlap })
    }

    /// Tokenizes `text` (no special tokens) and splits it into windows of at most `max_tokens`
    /// tokens, consecutive windows sharing `overlap` tokens. Empty text has no chunk.
    pub fn chunk(&self, text: &str) -> Result<ChunkedText> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        // Tokens produced by the normaliser alone (e.g. BPE continuation) can carry empty
        // offsets; they still count, and windows take their bounds from real offsets.
        let offsets = encoding.get_offsets();
        let n = offsets.len();
        let ids = encoding.get_ids().to_vec();
        let mut chunks = Vec::new();
        if n == 0 {
            return Ok(ChunkedText { token_count: 0, ids, chunks });
        }
        let char_of = CharIndex::new(text);
        if n <= self.max_tokens {
            let chars = 0..char_of.at(text.len());
            chunks.push(TextChunk { index: 0, bytes: 0..text.len(), chars, tokens: 0..n, token_count: n });
            return Ok(ChunkedText { token_count: n, ids, chunks });
        }
        let stride = self.max_tokens - self.overlap;
        let mut start = 0;
        loop {
            let end = (start + self.max_tokens).min(n);
            let bytes = offsets[start].0..offsets[end - 1].1.max(offsets[start].0);
            chunks.push(TextChunk {
                index: chunks.len(),
                chars: char_of.at(bytes.start)..char_of.at(bytes.end),
                bytes,
                tokens: start..end,
                token_count: end - start,
            });
            if end == n {
                break;
            }
            start += stride;
        }
        Ok(ChunkedText { token_count: n, ids, chunks })
    }
}

/// Byte offset -> character offset, for texts that are not ASCII.
struct CharIndex<'a> {
    text: &'a str,
    ascii: bool,
}

impl<'a> CharIndex<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, ascii: text.is_ascii() }
    }
    fn at(&self, byte: usize) -> usize {
        if self.ascii { byte } else { self.text[..byte].chars().count() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_chunk_with_word_tokens() {
        let c = Chunker::new(builtin_tokenizer(), 8, 2).unwrap();
        let out = c.chunk("Bonjour, je m'appelle Hélène.").unwrap();
        // bonjour , je m ' appelle helene .
        assert_eq!(out.token_count, 8);
        assert_eq!(out.chunks.len(), 1);
        assert_eq!(out.chunks[0].chars, 0..29);
        assert_eq!(out.chunks[0].bytes, 0..31);
        assert!(c.chunk("").unwrap().chunks.is_empty());
    }

    #[test]
    fn long_text_becomes_overlapping_windows_covering_every_token() {
        let c = Chunker::new(builtin_tokenizer(), 4, 1).unwrap();
        let text = "un deux trois quatre cinq six sept huit neuf dix";
        let out = c.chunk(text).unwrap();
        assert_eq!(out.token_count, 10);
        let pieces: Vec<_> = out.chunks.iter().map(|ch| &text[ch.bytes.clone()]).collect();
        assert_eq!(pieces, ["un deux trois quatre", "quatre cinq six sept", "sept huit neuf dix"]);
        assert_eq!(out.chunks.iter().map(|c| c.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(out.chunks[2].token_count, 4);
        assert_eq!(out.chunks[1].tokens, 3..7, "windows index the turn's ids");
        assert_eq!(out.ids.len(), 10);
    }

    #[test]
    fn char_offsets_differ_from_bytes_outside_ascii() {
        let c = Chunker::new(builtin_tokenizer(), 2, 0).unwrap();
        let text = "été à Noël";
        let out = c.chunk(text).unwrap();
        assert_eq!(out.chunks.len(), 2);
        assert_eq!(&text[out.chunks[1].bytes.clone()], "Noël");
        assert_eq!(out.chunks[1].chars, 6..10);
    }

    #[test]
    fn tokenizer_json_round_trips_and_rejects_bad_settings() {
        let dir = std::env::temp_dir().join(format!("convoflow-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        builtin_tokenizer().save(&path, false).unwrap();
        let c = Chunker::new(load_tokenizer(&path).unwrap(), 8, 2).unwrap();
        assert_eq!(c.chunk("a b c").unwrap().token_count, 3);
        assert!(load_tokenizer(&dir.join("missing.json")).is_err());
        assert!(Chunker::new(builtin_tokenizer(), 4, 4).is_err());
        std::fs::remove_dir_all(dir).ok();
    }
}
