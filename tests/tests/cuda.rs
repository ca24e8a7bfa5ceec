//! The PEFT fixture on a GPU (run by `tools/gpu-check.sh`): tiny-llama's logits, loss and every
//! LoRA gradient through the model's graph on CUDA (the path CUDA devices train on), in f32 at
//! the CPU tests' tolerances, and in bf16 (what a GPU run computes in) at bf16's.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use lorafleet_tests::*;
use lorafleet_worker::adapter_io::load_adapter;
use lorafleet_worker::collective::SingleRank;
use lorafleet_worker::dropout::Dropout;
use lorafleet_worker::train::StepAccumulator;
use lorafleet_worker::Llama;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

fn host(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
}

/// Logits of base and adapter, the loss and every gradient on the GPU in `dtype`, against
/// the fixture: (logits max |diff| / max |logit|, loss relative, worst gradient relative norm).
fn parity(dtype: DType) -> (f64, f64, f64) {
    let r = reference();
    let batch = reference_batch(&r);
    let dev = gpu();
    let model = Llama::load(&tiny_llama(), dtype, &dev).unwrap();
    let adapter = load_adapter(&tiny_llama().join("lora-peft"), model.config(), &dev).unwrap();
    let ids = Tensor::from_slice(&batch.input_ids, (batch.rows, batch.seq_len), &dev).unwrap();
    let logits = host(&model.forward_logits(&ids, Some(&batch.attention_mask), Some(&adapter)).unwrap());
    let want = &r["lora_logits"];
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
    let logits_err = max_abs_diff(&logits, want) / scale;

    let mut acc = StepAccumulator::new(&adapter);
    acc.micro_batch(&model, &adapter, &batch, &Dropout::Off, false).unwrap();
    let (grads, stats) = acc.reduce(&adapter, &mut SingleRank, 1).unwrap();
    let ref_loss = f64::from(r["lora_loss"].to_scalar::<f32>().unwrap());
    let loss_err = ((stats.loss - ref_loss) / ref_loss).abs();
    let grad_err = adapter
        .named_vars()
        .iter()
        .zip(&grads)
        .map(|((name, _), g)| rel_norm_diff(&host(g), &r[&format!("grad.{name}")]))
        .fold(0.0, f64::max);
    eprintln!("{dtype:?} on CUDA: logits {logits_err:.2e}, loss {loss_err:.2e}, gradients {grad_err:.2e}");
    (logits_err, loss_err, grad_err)
}

#[test]
fn peft_fixture_on_cuda_in_f32() {
    let (logits, loss, grads) = parity(DType::F32);
    // The CPU tests' bounds: 1e-4 absolute on logits of magnitude about 1, 1e-5, 1e-4.
    assert!(logits <= 1e-4 && loss <= 1e-5 && grads <= 1e-4, "f32 on CUDA: {logits:e}, {loss:e}, {grads:e}");
}

#[test]
fn peft_fixture_on_cuda_in_bf16() {
    let (logits, loss, grads) = parity(DType::BF16);
    // bf16 activations and weights (8 bits of mantissa) through 2 layers: the CPU's bf16-weight
    // bounds (2%, 1e-3, 6%) loosened for bf16 activations.
    assert!(logits <= 5e-2 && loss <= 1e-2 && grads <= 1.5e-1, "bf16 on CUDA: {logits:e}, {loss:e}, {grads:e}");
}
