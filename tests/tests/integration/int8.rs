//! The int8 base: close to the f32 base on the reference batch, LoRA gradients through it,
//! and checkpointing exact on top of it.

use candle_core::{DType, Device, Tensor};
use lorafleet_tests::*;
use lorafleet_worker::adapter_io::load_adapter;
use lorafleet_worker::collective::SingleRank;
use lorafleet_worker::dropout::Dropout;
use lorafleet_worker::model::Quantization;
use lorafleet_worker::train::StepAccumulator;
use lorafleet_worker::Llama;

fn grads(m: &Llama, checkpointing: bool, dropout: &Dropout) -> (f64, Vec<Tensor>) {
    let a = load_adapter(&tiny_llama().join("lora-peft"), m.config(), &Device::Cpu).unwrap();
    let batch = reference_batch(&reference());
    let mut acc = StepAccumulator::new(&a);
    acc.micro_batch(m, &a, &batch, dropout, checkpointing).unwrap();
    let (g, stats) = acc.reduce(&a, &mut SingleRank, 1).unwrap();
    (stats.loss, g)
}

#[test]
fn int8_base_stays_close_to_f32_and_trains() {
    let r = reference();
    let batch = reference_batch(&r);
    let int8 =
        Llama::load_quantized(&tiny_llama(), DType::F32, &Device::Cpu, Quantization::Int8 { group: None }).unwrap();
    let ids = Tensor::from_slice(&batch.input_ids, (2, 16), &Device::Cpu).unwrap();
    let logits = int8.forward_logits(&ids, Some(&batch.attention_mask), None).unwrap();
    let d = rel_norm_diff(&logits, &r["base_logits"]);
    assert!(d < 0.05, "int8 logits differ from f32 by {d} (relative)");
    assert!(d > 0.0, "the weights were not quantized");
    let (loss, g) = grads(&int8, false, &Dropout::Off);
    let ref_loss = f64::from(r["lora_loss"].to_scalar::<f32>().unwrap());
    assert!(((loss - ref_loss) / ref_loss).abs() < 0.01, "int8 loss {loss} vs f32 {ref_loss}");
    let a = load_adapter(&tiny_llama().join("lora-peft"), int8.config(), &Device::Cpu).unwrap();
    for ((name, _), gi) in a.named_vars().iter().zip(&g) {
        let d = rel_norm_diff(gi, &r[&format!("grad.{name}")]);
        // Measured on this random-weight model (initializer range 0.2, activations far wider
        // than a pretrained model's): through the int8 kernel (activations quantized per
        // token) logits 3.9%, loss 9.6e-4, gradients 6.8-12.5% (12.5% with an f32 backward
        // too: the error is the forward's); dequantized with f32 activations
        // (LORAFLEET_NARROW=f32) 2.6%, 1e-4, 4.4-7.0%.
        assert!(d < 0.15, "{name}: int8 gradient off by {d}");
    }
}

#[test]
fn checkpointing_is_exact_on_an_int8_base_with_dropout() {
    let int8 =
        Llama::load_quantized(&tiny_llama(), DType::F32, &Device::Cpu, Quantization::Int8 { group: Some(16) }).unwrap();
    let dropout = Dropout::On { seed: 1, step: 2, example_ids: vec![3, 4] };
    let (plain_loss, plain) = grads(&int8, false, &dropout);
    let (ckpt_loss, ckpt) = grads(&int8, true, &dropout);
    assert!(((plain_loss - ckpt_loss) / plain_loss).abs() <= 1e-6);
    for (p, c) in plain.iter().zip(&ckpt) {
        assert!(rel_norm_diff(c, p) <= 1e-6);
    }
}
