//! Architecture details beyond tiny-llama, each against transformers 5.24 + PEFT 0.21.2
//! (fixtures made by `tools/make_variant_fixtures.py`):
//! - qwen2: q/k/v biases, tied embeddings, an `all-linear` adapter saved as full module names;
//! - mistral: a sliding window (5) shorter than the batch, rsLoRA on every attention projection;
//! - llama3: llama3 rope scaling, attention and MLP biases, the transformers-4 config spelling
//!   (`rope_theta`, `rope_scaling`, `torch_dtype`, an eos list), `rank_pattern`.

use candle_core::{DType, Device, Tensor};
use lorafleet_tests::*;
use lorafleet_worker::adapter_io::load_adapter;
use lorafleet_worker::collective::SingleRank;
use lorafleet_worker::dropout::Dropout;
use lorafleet_worker::train::StepAccumulator;
use lorafleet_worker::Llama;

fn check(name: &str) {
    let dir = fixture("variants").join(name);
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let batch = reference_batch(&reference());
    let m = Llama::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let a = load_adapter(&dir.join("adapter"), m.config(), &Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&batch.input_ids, (batch.rows, batch.seq_len), &Device::Cpu).unwrap();
    let base = m.forward_logits(&ids, Some(&batch.attention_mask), None).unwrap();
    let d = max_abs_diff(&base, &r["base_logits"]);
    assert!(d <= 1e-4, "{name}: base logits differ by {d}");
    let lora = m.forward_logits(&ids, Some(&batch.attention_mask), Some(&a)).unwrap();
    let d = max_abs_diff(&lora, &r["lora_logits"]);
    assert!(d <= 1e-4, "{name}: LoRA logits differ by {d}");
    let mut acc = StepAccumulator::new(&a);
    acc.micro_batch(&m, &a, &batch, &Dropout::Off, false).unwrap();
    let (grads, stats) = acc.reduce(&a, &mut SingleRank, 1).unwrap();
    let ref_loss = f64::from(r["lora_loss"].to_scalar::<f32>().unwrap());
    assert!(((stats.loss - ref_loss) / ref_loss).abs() <= 1e-5, "{name}: loss {} vs {ref_loss}", stats.loss);
    let vars = a.named_vars();
    assert_eq!(vars.len(), r.keys().filter(|k| k.starts_with("grad.")).count(), "{name}: parameter count");
    for ((key, _), g) in vars.iter().zip(&grads) {
        let d = rel_norm_diff(g, &r[&format!("grad.{key}")]);
        assert!(d <= 1e-4, "{name}: gradient of {key} differs by {d}");
    }
}

#[test]
fn qwen2_with_biases_tied_embeddings_and_all_linear() {
    check("qwen2");
}

#[test]
fn mistral_with_sliding_window_and_rslora() {
    check("mistral");
}

#[test]
fn llama31_rope_scaling_biases_and_transformers4_config() {
    check("llama3");
}
