//! Helpers for tests that compare lorafleet against the PEFT reference fixtures in
//! `tests/fixtures/` (copied from the team's shared fixtures; see their READMEs).

use candle_core::{DType, Device, Tensor};
use lorafleet_common::Batch;
use std::collections::HashMap;
use std::path::PathBuf;

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The tiny Llama fixture folder.
pub fn tiny_llama() -> PathBuf {
    fixture("tiny-llama")
}

/// Every tensor of `tiny-llama/reference.safetensors`, on the CPU.
pub fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny_llama().join("reference.safetensors"), &Device::Cpu).expect("reference tensors")
}

/// The reference batch (two rows of 16 tokens) as a [`Batch`].
pub fn reference_batch(r: &HashMap<String, Tensor>) -> Batch {
    let ids: Vec<Vec<i64>> = r["input_ids"].to_vec2().unwrap();
    let mask: Vec<Vec<i64>> = r["attention_mask"].to_vec2().unwrap();
    let labels: Vec<Vec<i64>> = r["labels"].to_vec2().unwrap();
    Batch {
        rows: ids.len(),
        seq_len: ids[0].len(),
        input_ids: ids.iter().flatten().map(|&i| i as u32).collect(),
        attention_mask: mask.iter().flatten().map(|&m| m as u8).collect(),
        labels: labels.into_iter().flatten().collect(),
        example_ids: (0..ids.len() as u64).collect(),
        packed: Vec::new(),
    }
}

/// max |a − b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_norm_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    num / den
}

/// A writable copy of a fixture folder in a fresh temporary directory.
pub fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dest = tmp.path().join(name);
    copy_dir(&fixture(name), &dest);
    (tmp, dest)
}

fn copy_dir(src: &std::path::Path, dest: &std::path::Path) {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dest.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// Reads, edits and rewrites a JSON file.
pub fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}
