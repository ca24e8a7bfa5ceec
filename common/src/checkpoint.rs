//! Where the weights of a Hugging Face model folder live: one `model.safetensors`, or
//! shards listed by `model.safetensors.index.json`.

use crate::error::{FormatError, Result};
use crate::json::{read_json_file, JsonObject};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors files holding a model's weights, in a stable order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let raw = read_json_file(&index)?;
        let obj = JsonObject::new(&index, &raw)?;
        let map = obj
            .get("weight_map")
            .and_then(|v| v.as_object())
            .ok_or_else(|| obj.error("weight_map", "missing or not an object"))?;
        let mut shards = BTreeSet::new();
        for (tensor, file) in map {
            let file =
                file.as_str().ok_or_else(|| obj.error(&format!("weight_map.{tensor}"), "expected a file name"))?;
            if file.contains('/') || file.contains("..") {
                return Err(obj.error(
                    &format!("weight_map.{tensor}"),
                    format!("shard {file:?} is not a file in the model folder"),
                ));
            }
            shards.insert(file.to_owned());
        }
        let files: Vec<PathBuf> = shards.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.is_file() {
                return Err(FormatError::invalid(f, format!("missing: listed in {}", index.display())));
            }
        }
        if files.is_empty() {
            return Err(obj.error("weight_map", "lists no tensors"));
        }
        return Ok(files);
    }
    if dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file() {
        return Err(FormatError::invalid(
            dir,
            "only PyTorch .bin weights found; convert them to safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))",
        ));
    }
    Err(FormatError::invalid(dir, format!("no {SINGLE_FILE} or {INDEX_FILE} in this folder")))
}
