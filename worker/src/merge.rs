//! `W + scaling · B·A` folded into the base weights, written as a complete Hugging Face
//! folder (sharded, with an index, when large).
//!
//! The merge is computed in f32 against the unquantized base whatever the output dtype, so
//! an f16/bf16 merge rounds once (PEFT #1388 is what happens otherwise).

use crate::adapter_io::load_adapter;
use crate::error::{Error, Result};
use crate::weights::WeightFiles;
use candle_core::{DType, Device, Tensor};
use lorafleet_common::atomic::StagedDir;
use lorafleet_common::checkpoint::{weight_files, INDEX_FILE, SINGLE_FILE};
use lorafleet_common::peft::{module_name, LINEAR_MODULES};
use lorafleet_common::ModelConfig;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Files of a model folder that are copied verbatim into a merged model.
const COPIED: [&str; 6] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
];

/// What a merge wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeReport {
    /// Number of weight matrices that received a LoRA delta.
    pub merged: usize,
    /// Number of tensors written.
    pub tensors: usize,
    /// Number of safetensors shards.
    pub shards: usize,
}

/// The name transformers uses for a dtype in `config.json`.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Merges the adapters in `adapter` into the base model in `base`, writing `out` in `dtype`
/// with shards of at most `max_shard_bytes` (a single tensor larger than that gets its own).
pub fn merge(base: &Path, adapter: &Path, out: &Path, dtype: DType, max_shard_bytes: u64) -> Result<MergeReport> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::Invalid(format!("{}: output folder exists and is not empty", out.display())));
    }
    let config = ModelConfig::from_dir(base)?;
    let files = WeightFiles::open(&weight_files(base)?)?;
    let cpu = Device::Cpu;
    let lora = load_adapter(adapter, &config, &cpu)?;
    let mut deltas: HashMap<String, Tensor> = HashMap::new();
    for l in 0..config.num_hidden_layers {
        for (m, name) in LINEAR_MODULES.iter().enumerate() {
            if let Some(pair) = lora.get(l, m) {
                let delta = (pair.b.as_tensor().matmul(pair.a.as_tensor())? * pair.scaling)?;
                deltas.insert(format!("{}.weight", module_name(l, name)), delta);
            }
        }
    }
    // Plan the shards from the headers so that file names can carry the shard count.
    let names = files.names();
    let mut shards: Vec<Vec<&str>> = vec![Vec::new()];
    let mut size = 0u64;
    for &name in &names {
        let elems: usize = files.shape(name).unwrap_or_default().iter().product();
        let bytes = (elems * dtype.size_in_bytes()) as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("at least one shard").push(name);
        size += bytes;
    }
    let staged = StagedDir::new(out)?;
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    let mut merged = 0;
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 { SINGLE_FILE.to_owned() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
        let mut tensors = Vec::with_capacity(shard.len());
        for &name in shard {
            let mut t = files.load(name, None, DType::F32, &cpu)?;
            if let Some(delta) = deltas.get(name) {
                t = (t + delta)?;
                merged += 1;
            }
            let t = t.to_dtype(dtype)?;
            total += (t.elem_count() * dtype.size_in_bytes()) as u64;
            weight_map.insert(name.to_owned(), file.clone());
            tensors.push((name.to_owned(), t));
        }
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
            .map_err(|e| Error::weights(out.join(&file), e.to_string()))?;
        write(staged.path(), &file, &bytes, out)?;
    }
    if merged != deltas.len() {
        return Err(Error::weights(
            base,
            format!("the adapter targets {} weights but only {merged} exist in the base model", deltas.len()),
        ));
    }
    if n > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write(staged.path(), INDEX_FILE, serde_json::to_string_pretty(&index).expect("JSON").as_bytes(), out)?;
    }
    let cfg = serde_json::to_string_pretty(&config.with_dtype(dtype_name(dtype))).expect("JSON");
    write(staged.path(), "config.json", cfg.as_bytes(), out)?;
    for name in COPIED {
        let src = base.join(name);
        if src.is_file() {
            let data = std::fs::read(&src).map_err(|e| Error::weights(&src, e.to_string()))?;
            write(staged.path(), name, &data, out)?;
        }
    }
    staged.commit()?;
    Ok(MergeReport { merged, tensors: names.len(), shards: n })
}

fn write(dir: &Path, name: &str, data: &[u8], out: &Path) -> Result<()> {
    std::fs::write(dir.join(name), data).map_err(|e| Error::weights(out.join(name), e.to_string()))
}
