//! A model folder's tokenizer with its special tokens resolved to ids.

use crate::error::{Error, Result};
use lorafleet_common::{ModelConfig, SpecialTokens};
use std::path::{Path, PathBuf};

/// `tokenizer.json` plus the special-token facts the trainer and generator need.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Id of the beginning-of-sequence token, if the vocabulary has one.
    pub bos_id: Option<u32>,
    /// Ids that end generation; the first one is appended to training examples.
    pub eos_ids: Vec<u32>,
    /// Id used for right padding (falls back to eos, then 0, as transformers users do).
    pub pad_id: u32,
    /// Whether encoding with special tokens puts BOS first (decided by the tokenizer's
    /// post-processor, which is what transformers' fast tokenizers obey).
    pub adds_bos: bool,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and the special tokens of `dir`.
    pub fn from_dir(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer { path, msg: "missing: a model folder needs tokenizer.json".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer { path: path.clone(), msg: e.to_string() })?;
        let special = SpecialTokens::from_dir(dir, config)?;
        let lookup = |text: &Option<String>| text.as_deref().and_then(|t| inner.token_to_id(t));
        let bos_id = lookup(&special.bos).or(special.bos_id);
        let mut eos_ids = Vec::new();
        for id in lookup(&special.eos).into_iter().chain(special.eos_ids.iter().copied()) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let pad_id = lookup(&special.pad).or(special.pad_id).or(eos_ids.first().copied()).unwrap_or(0);
        let mut tok = Self { inner, path, bos_id, eos_ids, pad_id, adds_bos: false };
        let probe = tok.encode("a", true)?;
        tok.adds_bos = bos_id.is_some() && probe.first() == bos_id.as_ref();
        Ok(tok)
    }

    /// Token ids of `text`, with the tokenizer's special tokens (BOS) when `special` is set.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, special).map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.error(e))
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer { path: self.path.clone(), msg: e.to_string() }
    }
}

impl lorafleet_common::data::TextEncoder for Tokenizer {
    fn encode(&self, text: &str, special: bool) -> std::result::Result<Vec<u32>, String> {
        Tokenizer::encode(self, text, special).map_err(|e| e.to_string())
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos_ids.first().copied()
    }

    fn encode_offsets(&self, text: &str) -> std::result::Result<Vec<(u32, usize)>, String> {
        let enc = self.inner.encode(text, false).map_err(|e| self.error(e).to_string())?;
        Ok(enc.get_ids().iter().copied().zip(enc.get_offsets().iter().map(|o| o.0)).collect())
    }

    fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }
}
