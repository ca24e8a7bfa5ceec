//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.

use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::weights::WeightFiles;
use candle_core::{DType, Device, Tensor};
use lorafleet_common::atomic::StagedDir;
use lorafleet_common::peft::{tensor_key, CONFIG_FILE, LINEAR_MODULES, WEIGHTS_FILE};
use lorafleet_common::{LoraConfig, ModelConfig};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Loads a PEFT LoRA adapter for a model with configuration `model`.
pub fn load_adapter(dir: &Path, model: &ModelConfig, device: &Device) -> Result<LoraAdapter> {
    let config = LoraConfig::from_dir(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            return Err(Error::weights(
                dir.join("adapter_model.bin"),
                "PyTorch .bin adapters are not read; convert it to safetensors first \
                 (python: PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True))",
            ));
        }
        return Err(Error::weights(path, "missing: an adapter folder needs adapter_model.safetensors"));
    }
    let files = WeightFiles::open(std::slice::from_ref(&path))?;
    // PEFT strips the adapter name on save; tolerate files that kept `.default`.
    let canonical: HashMap<String, String> =
        files.names().iter().map(|n| (n.replace(".default.weight", ".weight"), (*n).to_owned())).collect();
    let mut used = BTreeSet::new();
    let adapter = LoraAdapter::from_tensors(config, model, |l, m, which, shape| {
        let key = tensor_key(l, LINEAR_MODULES[m], which);
        let stored = canonical.get(&key).ok_or_else(|| Error::weights(&path, format!("tensor {key} is missing")))?;
        used.insert(stored.clone());
        let t = files.load(stored, None, DType::F32, device)?;
        if t.dims() != [shape.0, shape.1] {
            return Err(Error::weights(
                &path,
                format!("tensor {key} has shape {:?} but the base model needs {:?}: was this adapter trained on another base?", t.dims(), [shape.0, shape.1]),
            ));
        }
        Ok(t)
    })?;
    let unused: Vec<&str> = files.names().into_iter().filter(|n| !used.contains(*n)).collect();
    if let Some(first) = unused.first() {
        return Err(Error::weights(
            &path,
            format!("{} tensors do not belong to any module targeted by {CONFIG_FILE} (first: {first})", unused.len()),
        ));
    }
    Ok(adapter)
}

/// The adapter's tensors under their PEFT keys, as the bytes of `adapter_model.safetensors`.
pub fn adapter_bytes(adapter: &LoraAdapter) -> Result<Vec<u8>> {
    let tensors: Vec<(String, Tensor)> =
        adapter.named_vars().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .map_err(|e| Error::Invalid(format!("adapter: {e}")))
}

/// Rebuilds an adapter from [`adapter_bytes`] (as a worker sent them) for `config`.
pub fn adapter_from_bytes(
    bytes: &[u8],
    config: LoraConfig,
    model: &ModelConfig,
    device: &Device,
) -> Result<LoraAdapter> {
    let mut tensors =
        candle_core::safetensors::load_buffer(bytes, device).map_err(|e| Error::Invalid(format!("adapter: {e}")))?;
    LoraAdapter::from_tensors(config, model, |l, m, which, shape| {
        let key = tensor_key(l, LINEAR_MODULES[m], which);
        let t = tensors.remove(&key).ok_or_else(|| Error::Invalid(format!("adapter: tensor {key} is missing")))?;
        if t.dims() != [shape.0, shape.1] {
            return Err(Error::Invalid(format!("adapter: tensor {key} has shape {:?}", t.dims())));
        }
        Ok(t)
    })
}

/// Writes `adapter` as a PEFT folder at `dir`, atomically: both files appear together or
/// neither does. Refuses an adapter whose tensors do not match its configuration.
pub fn save_adapter(adapter: &LoraAdapter, model: &ModelConfig, dir: &Path) -> Result<()> {
    let expected: usize = (0..model.num_hidden_layers)
        .map(|l| LINEAR_MODULES.iter().filter(|m| adapter.config.targets(l, m)).count() * 2)
        .sum();
    let vars = adapter.named_vars();
    if vars.len() != expected || expected == 0 {
        return Err(Error::weights(
            dir,
            format!("refusing to write {} tensors where the config targets {expected}", vars.len()),
        ));
    }
    let bytes = adapter_bytes(adapter)?;
    let staged = StagedDir::new(dir)?;
    let write = |name: &str, data: &[u8]| {
        let p = staged.path().join(name);
        std::fs::write(&p, data).map_err(|e| Error::weights(dir.join(name), e.to_string()))
    };
    write(WEIGHTS_FILE, &bytes)?;
    write(CONFIG_FILE, adapter.config.to_json().as_bytes())?;
    staged.commit()?;
    Ok(())
}
