//! Special tokens of a model folder, gathered from `tokenizer_config.json`,
//! `generation_config.json` and `config.json`.
//!
//! Transformers spreads these over three files and older tokenizers write tokens as
//! `{"content": "<s>", ...}` objects; generation stops on the union of every eos it finds.

use crate::error::{FormatError, Result};
use crate::json::{read_json_file, JsonObject};
use crate::model_config::ModelConfig;
use serde_json::Value;
use std::path::Path;

/// Special-token strings and ids, before they are resolved against a vocabulary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token` as text.
    pub bos: Option<String>,
    /// `eos_token` as text.
    pub eos: Option<String>,
    /// `pad_token` as text.
    pub pad: Option<String>,
    /// `unk_token` as text.
    pub unk: Option<String>,
    /// `add_bos_token` when the file states it (most fast tokenizers decide in `tokenizer.json`).
    pub add_bos_token: Option<bool>,
    /// Every eos id found in `generation_config.json` and `config.json`.
    pub eos_ids: Vec<u32>,
    /// `bos_token_id` from `generation_config.json` or `config.json`.
    pub bos_id: Option<u32>,
    /// `pad_token_id` from `generation_config.json` or `config.json`.
    pub pad_id: Option<u32>,
}

impl SpecialTokens {
    /// Reads the optional `tokenizer_config.json` and `generation_config.json` of `dir`.
    pub fn from_dir(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let mut out = SpecialTokens {
            eos_ids: config.eos_token_ids.clone(),
            bos_id: config.bos_token_id,
            pad_id: config.pad_token_id,
            ..Default::default()
        };
        let tc_path = dir.join("tokenizer_config.json");
        if tc_path.is_file() {
            let raw = read_json_file(&tc_path)?;
            let obj = JsonObject::new(&tc_path, &raw)?;
            out.bos = token_text(&obj, "bos_token")?;
            out.eos = token_text(&obj, "eos_token")?;
            out.pad = token_text(&obj, "pad_token")?;
            out.unk = token_text(&obj, "unk_token")?;
            out.add_bos_token = obj.opt_bool("add_bos_token")?;
        }
        let gc_path = dir.join("generation_config.json");
        if gc_path.is_file() {
            let raw = read_json_file(&gc_path)?;
            let obj = JsonObject::new(&gc_path, &raw)?;
            for id in obj.token_ids("eos_token_id")? {
                if !out.eos_ids.contains(&id) {
                    out.eos_ids.push(id);
                }
            }
            if let Some(&id) = obj.token_ids("bos_token_id")?.first() {
                out.bos_id = Some(id);
            }
            if let Some(&id) = obj.token_ids("pad_token_id")?.first() {
                out.pad_id = Some(id);
            }
        }
        Ok(out)
    }
}

/// A token written either as a string or as an `AddedToken` object.
fn token_text(obj: &JsonObject<'_>, key: &str) -> Result<Option<String>> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(m)) => match m.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(obj.error(key, "token object without a string `content`")),
        },
        Some(v) => Err(FormatError::field(obj.path(), key, format!("expected a string or a token object, found {v}"))),
    }
}
