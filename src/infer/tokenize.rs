//! A model's tokenizer, usable without the model: the worker's preparation stage tokenizes
//! every turn once per model on the CPU cores and hands token ids (and, for NER, the encodings
//! with their character offsets) to the model threads, which only pad, upload and run them —
//! like text-embeddings-inference, where the queue between the HTTP edge and the backend holds
//! token ids, not text.

use tokenizers::{Encoding, Tokenizer};

use super::hf::{ModelError, ModelFolder};

#[derive(Clone)]
pub struct ModelTokenizer {
    /// Adds special tokens, truncates at the model's length.
    truncating: Tokenizer,
    /// No special tokens are added by callers of this one; no truncation (chunking, NER windows).
    untruncated: Tokenizer,
    /// Special tokens before one sequence ([CLS] / <s>).
    pub prefix_ids: Vec<i64>,
    /// Special tokens after one sequence ([SEP] / </s>).
    pub suffix_ids: Vec<i64>,
    /// WordPiece / BPE continuation prefix ("##"), for word-level NER aggregation.
    pub subword_prefix: Option<String>,
    pub unk_id: Option<u32>,
    /// Longest sequence the model takes, special tokens included.
    pub max_positions: usize,
    pub pad_id: u32,
}

fn tok_err(e: tokenizers::Error) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl ModelTokenizer {
    pub fn load(folder: &ModelFolder) -> Result<Self, ModelError> {
        let cfg = &folder.config;
        let max_positions = cfg.max_positions()? as usize;
        let mut tokenizer = Tokenizer::from_file(&folder.tokenizer).map_err(tok_err)?;
        tokenizer.with_padding(None);
        let mut untruncated = tokenizer.clone();
        untruncated.with_truncation(None).map_err(tok_err)?;
        // what the post-processor adds around a sequence: encode one token with and without
        let probe = "a";
        let with = untruncated.encode(probe, true).map_err(tok_err)?;
        let without = untruncated.encode(probe, false).map_err(tok_err)?;
        let ids = |e: &Encoding| e.get_ids().iter().map(|&i| i64::from(i)).collect::<Vec<_>>();
        let (with, without) = (ids(&with), ids(&without));
        let at = with.windows(without.len()).position(|w| w == without.as_slice()).ok_or_else(|| {
            ModelError::Tokenizer("the post-processor does not keep the sequence contiguous".into())
        })?;
        let prefix_ids = with[..at].to_vec();
        let suffix_ids = with[at + without.len()..].to_vec();
        let subword_prefix = match tokenizer.get_model() {
            tokenizers::ModelWrapper::WordPiece(w) => Some(w.continuing_subword_prefix.clone()),
            tokenizers::ModelWrapper::BPE(b) => b.continuing_subword_prefix.clone(),
            _ => None,
        };
        let unk_id = ["[UNK]", "<unk>"].iter().find_map(|t| tokenizer.token_to_id(t));
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_positions, ..Default::default() }))
            .map_err(tok_err)?;
        let pad_id = cfg.pad_token_id.unwrap_or(0) as u32;
        Ok(Self { truncating: tokenizer, untruncated, prefix_ids, suffix_ids, subword_prefix, unk_id, max_positions, pad_id })
    }

    /// Content tokens one sequence can hold (the model's length less the special tokens).
    pub fn content_capacity(&self) -> usize {
        self.max_positions - self.prefix_ids.len() - self.suffix_ids.len()
    }

    /// Token ids with special tokens, truncated to the model's length.
    pub fn encode_ids(&self, texts: &[&str]) -> Result<Vec<Vec<i64>>, ModelError> {
        let encodings = self.truncating.encode_batch(texts.to_vec(), true).map_err(tok_err)?;
        Ok(encodings.iter().map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect()).collect())
    }

    /// `encode_ids` of one text, on the calling thread.
    pub fn encode_ids_one(&self, text: &str) -> Result<Vec<i64>, ModelError> {
        let e = self.truncating.encode(text, true).map_err(tok_err)?;
        Ok(e.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Encodings with character offsets, with special tokens, truncated (a padded batch for
    /// `Model::tokenize`).
    pub fn encode_truncated_with_offsets(&self, texts: &[&str]) -> Result<Vec<Encoding>, ModelError> {
        self.truncating.encode_batch_char_offsets(texts.to_vec(), true).map_err(tok_err)
    }

    /// Encodings of whole texts with character offsets, no special tokens, no truncation
    /// (NER windows over long turns).
    pub fn encode_untruncated(&self, texts: &[&str]) -> Result<Vec<Encoding>, ModelError> {
        self.untruncated.encode_batch_char_offsets(texts.to_vec(), false).map_err(tok_err)
    }

    /// `encode_untruncated` of one text, on the calling thread.
    pub fn encode_untruncated_one(&self, text: &str) -> Result<Encoding, ModelError> {
        self.untruncated.encode_char_offsets(text, false).map_err(tok_err)
    }

    /// One text, no special tokens, no truncation, byte offsets (the chunker's view).
    pub fn encode_plain(&self, text: &str) -> Result<Encoding, ModelError> {
        self.untruncated.encode(text, false).map_err(tok_err)
    }

    /// The untruncated tokenizer (no special tokens added by its users), for the chunker.
    pub fn plain_tokenizer(&self) -> &Tokenizer {
        &self.untruncated
    }

    /// A model input from content ids: special tokens around `leading` + `content`, the
    /// content cut so that the whole fits the model's length.
    pub fn wrap(&self, leading: &[i64], content: &[u32]) -> Vec<i64> {
        let room = self.content_capacity().saturating_sub(leading.len());
        let mut seq = Vec::with_capacity(self.prefix_ids.len() + leading.len() + content.len().min(room) + self.suffix_ids.len());
        seq.extend_from_slice(&self.prefix_ids);
        seq.extend_from_slice(leading);
        seq.extend(content.iter().take(room).map(|&i| i64::from(i)));
        seq.extend_from_slice(&self.suffix_ids);
        seq
    }

    /// Ids of a text put before every input (the e5 `passage: ` prefix): its words tokenized
    /// without the trailing whitespace, which the next word's own token carries (a Metaspace
    /// `▁word`, a WordPiece word boundary), so prefix ids + text ids equal the ids of
    /// prefix + text.
    pub fn leading_ids(&self, prefix: &str) -> Result<Vec<i64>, ModelError> {
        let trimmed = prefix.trim_end();
        if trimmed.is_empty() {
            return Ok(vec![]);
        }
        Ok(self.encode_plain(trimmed)?.get_ids().iter().map(|&i| i64::from(i)).collect())
    }
}
