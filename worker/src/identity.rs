//! What a model folder *is*, as a digest: two processes that computed the same digests
//! loaded the same base and tokenizer, so their replicas can train together.
//!
//! Hashing whole weight files would read gigabytes at start; a safetensors header lists
//! every tensor's name, dtype, shape and byte range, so the header plus the file size pins
//! the layout, and a re-quantised or truncated file changes one of them.

use crate::error::{Error, Result};
use lorafleet_common::checkpoint::weight_files;
use lorafleet_common::protocol::Hash;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// Digest of `dir/config.json` and every weight file's header and size.
pub fn model_digest(dir: &Path) -> Result<Hash> {
    let mut h = Sha256::new();
    add_file(&mut h, &dir.join("config.json"))?;
    for path in weight_files(dir)? {
        let mut file = std::fs::File::open(&path).map_err(|e| Error::weights(&path, e.to_string()))?;
        let size = file.metadata().map_err(|e| Error::weights(&path, e.to_string()))?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| Error::weights(&path, format!("reading the header: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > size.saturating_sub(8) {
            return Err(Error::weights(&path, format!("header length {n} is past the end of the {size}-byte file")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(|e| Error::weights(&path, format!("reading the header: {e}")))?;
        h.update(path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        h.update(size.to_le_bytes());
        h.update(&header);
    }
    Ok(h.finalize().into())
}

/// Digest of the tokenizer files that decide how text becomes ids.
pub fn tokenizer_digest(dir: &Path) -> Result<Hash> {
    let mut h = Sha256::new();
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
        let path = dir.join(name);
        if path.is_file() {
            h.update(name.as_bytes());
            add_file(&mut h, &path)?;
        }
    }
    Ok(h.finalize().into())
}

fn add_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::weights(path, e.to_string()))?;
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(&bytes);
    Ok(())
}
